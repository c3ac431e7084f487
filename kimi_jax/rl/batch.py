"""Finished groups -> static-shape training minibatches (`Batch`).

Axis legend: G groups, K samples per group, N samples per minibatch,
T padded sequence length.

The host side of the update: which tokens enter the loss, the group
baseline and advantages (`losses.group_advantages`, the one place they are
computed), and the fixed-shape arrays the jitted train step takes.
"""
from __future__ import annotations

from typing import Sequence

import flax.struct
import jax
import numpy as np

from kimi_jax.rl import losses
from kimi_jax.sampling.partial import Group


@flax.struct.dataclass
class Batch:
  """One minibatch (static shapes; padded samples have sample_mask 0).

  tokens_NT int32; mask_NT float32, the tokens that enter the loss;
  ref_logp_NT float32, log-probs under the iteration-start policy (the
  reference); behaviour_logp_NT float32, the log-probs the sampler recorded
  when it drew each response token (`Trajectory.logp`: for a segment
  carried over from an earlier iteration, that iteration's policy; the
  behaviour policy of PPO's ratio), 0 elsewhere; rewards_N float32 final
  rewards; advantages_N float32,
  r - r_bar (/ group std with `LossConfig.advantage_std_norm`);
  sample_mask_N float32.
  """
  tokens_NT: jax.Array
  mask_NT: jax.Array
  ref_logp_NT: jax.Array
  behaviour_logp_NT: jax.Array
  rewards_N: jax.Array
  advantages_N: jax.Array
  sample_mask_N: jax.Array


# Which response tokens enter the loss under partial rollouts (config key
# rl.loss_segments; README "Which tokens train"). A response sampled over
# iterations n-m..n is a chain of segments; only the segment drawn at the
# training iteration n comes from the iteration-start policy pi_theta_n.
LOSS_SEGMENTS = ("all", "current_iteration", "last_segment")


def loss_mask(traj, loss_segments: str, iteration: int) -> np.ndarray:
  """float32 `[len(tokens)]`: the response tokens of `traj` that enter the loss
  when training at `iteration`.

  all: every response token, older segments too (they were drawn by older
    policies; the k1.5 squared loss admits off-policy samples, report §2.3.2).
  current_iteration: the tokens generated at `iteration`, i.e. by the
    policy being trained from (on-policy). A sample that finished in an
    earlier iteration while its group waited has none: it only sets the
    group's baseline.
  last_segment: the trajectory's own last segment, generated at
    `traj.last_iteration`, which is earlier than `iteration` for a sample
    whose group waited for its other members.
  """
  if loss_segments not in LOSS_SEGMENTS:
    raise ValueError(f"loss_segments must be one of {LOSS_SEGMENTS}, got {loss_segments!r}")
  mask = np.zeros(len(traj.tokens), np.float32)
  if loss_segments == "all":
    mask[traj.prompt_len:] = 1.0
  else:
    at = iteration if loss_segments == "current_iteration" else traj.last_iteration
    mask[traj.prompt_len:] = traj.token_iter == at
  return mask


def empty_minibatch(n: int, length: int) -> dict:
  """A minibatch of `n` padding samples of `length` tokens (sample_mask 0: no
  loss, no gradient), in the fields of `Batch` except `ref_logp_NT`."""
  return dict(tokens_NT=np.zeros((n, length), np.int32),
              mask_NT=np.zeros((n, length), np.float32),
              behaviour_logp_NT=np.zeros((n, length), np.float32),
              rewards_N=np.zeros(n, np.float32),
              advantages_N=np.zeros(n, np.float32),
              sample_mask_N=np.zeros(n, np.float32))


def make_minibatches(groups: Sequence[Group], rewards_GK: np.ndarray, *, minibatch_size: int,
                     loss_segments: str, iteration: int, length: int = 0,
                     length_multiple: int = 64, advantage_std_norm: bool = False) -> list[dict]:
  """Pack all samples of `groups` into padded minibatches of `minibatch_size`.

  Args:
    groups: completed groups (K samples each).
    rewards_GK: float32 final rewards (task + penalties) per sample.
    minibatch_size: samples per minibatch (static); the last one is padded
      with sample_mask 0.
    loss_segments, iteration: which tokens enter the loss when training at
      `iteration` (`loss_mask`).
    length: a fixed T for every iteration (0 = derive it per iteration).
      The trainer fixes it to the rollout max length so the update compiles
      once; benchmarks with one known length use `length_multiple` instead.
    length_multiple: T is the longest sample of the iteration rounded up to
      this multiple (one shape per iteration, few shapes per run; finer than
      powers of two, which would nearly double the work of 130-token samples).
    advantage_std_norm: divide each group's advantages by its reward std
      (`LossConfig.advantage_std_norm`).

  Returns:
    A list of dicts of numpy arrays with the fields of `Batch` except
    `ref_logp_NT` (computed on device under the iteration-start params).
  """
  if not groups:
    return []
  rewards_GK = np.asarray(rewards_GK, np.float32)
  advantages_GK = losses.group_advantages(rewards_GK, std_normalise=advantage_std_norm)
  samples = [(t, g, k) for g, grp in enumerate(groups) for k, t in enumerate(grp.trajectories)]
  longest = max(len(t.tokens) for t, _, _ in samples)
  T = length or -(-longest // length_multiple) * length_multiple
  if longest > T:
    raise ValueError(f"a sample of {longest} tokens does not fit the training length {T}")
  out = []
  for lo in range(0, len(samples), minibatch_size):
    chunk = samples[lo:lo + minibatch_size]
    mb = empty_minibatch(minibatch_size, T)
    for n, (t, g, k) in enumerate(chunk):
      mb["tokens_NT"][n, :len(t.tokens)] = t.tokens
      mb["mask_NT"][n, :len(t.tokens)] = loss_mask(t, loss_segments, iteration)
      mb["behaviour_logp_NT"][n, t.prompt_len:len(t.tokens)] = t.logp
      mb["rewards_N"][n] = rewards_GK[g, k]
      mb["advantages_N"][n] = advantages_GK[g, k]
      mb["sample_mask_N"][n] = 1.0
    out.append(mb)
  return out


def to_batch(mb: dict, ref_logp_NT) -> Batch:
  return Batch(ref_logp_NT=ref_logp_NT, **mb)
