"""Finished groups -> static-shape training minibatches.

Axis legend: G groups, K samples per group, N samples per minibatch,
T padded sequence length.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from kimi_jax.rl.update import Batch
from kimi_jax.sampling.partial import Group


def loss_mask(traj, train_old_segments: bool) -> np.ndarray:
  """float32 `[len(tokens)]`: the response tokens that enter the loss.

  With `train_old_segments=False` only the trajectory's final segment (the
  tokens generated in its last iteration) counts; earlier segments were
  sampled by older policies and are context only (method spec §8).
  """
  mask = np.zeros(len(traj.tokens), np.float32)
  if train_old_segments:
    mask[traj.prompt_len:] = 1.0
  else:
    mask[traj.prompt_len:] = (traj.token_iter == traj.last_iteration).astype(np.float32)
  return mask


def empty_minibatch(n: int, length: int) -> dict:
  """A minibatch of `n` padding samples of `length` tokens (sample_mask 0: no
  loss, no gradient), in the fields of `update.Batch` except `ref_logp_NT`."""
  return dict(tokens_NT=np.zeros((n, length), np.int32),
              mask_NT=np.zeros((n, length), np.float32), rewards_N=np.zeros(n, np.float32),
              baseline_N=np.zeros(n, np.float32), advantages_N=np.zeros(n, np.float32),
              sample_mask_N=np.zeros(n, np.float32))


def make_minibatches(groups: Sequence[Group], rewards_GK: np.ndarray, *, minibatch_size: int,
                     length: int = 0, length_multiple: int = 64,
                     train_old_segments: bool = False) -> list[dict]:
  """Pack all samples of `groups` into padded minibatches of `minibatch_size`.

  Args:
    groups: completed groups (K samples each).
    rewards_GK: float32 final rewards (task + penalties) per sample.
    minibatch_size: samples per minibatch (static); the last one is padded
      with sample_mask 0.
    length: a fixed T for every iteration (0 = derive it per iteration).
      The trainer fixes it to the rollout max length so the update compiles
      once; benchmarks with one known length use `length_multiple` instead.
    length_multiple: T is the longest sample of the iteration rounded up to
      this multiple (one shape per iteration, few shapes per run; finer than
      powers of two, which would nearly double the work of 130-token samples).
    train_old_segments: see `loss_mask`.

  Returns:
    A list of dicts of numpy arrays with the fields of `update.Batch` except
    `ref_logp_NT` (computed on device under the iteration-start params).
  """
  if not groups:
    return []
  rewards_GK = np.asarray(rewards_GK, np.float32)
  # The k1.5 baseline: mean reward of the group (numpy: host data, and eager
  # jnp would compile a kernel for every new group count).
  baseline_GK = np.broadcast_to(rewards_GK.mean(axis=1, keepdims=True), rewards_GK.shape)
  advantages_GK = rewards_GK - baseline_GK
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
      mb["mask_NT"][n, :len(t.tokens)] = loss_mask(t, train_old_segments)
      mb["rewards_N"][n] = rewards_GK[g, k]
      mb["baseline_N"][n] = baseline_GK[g, k]
      mb["advantages_N"][n] = advantages_GK[g, k]
      mb["sample_mask_N"][n] = 1.0
    out.append(mb)
  return out


def to_batch(mb: dict, ref_logp_NT) -> Batch:
  return Batch(ref_logp_NT=ref_logp_NT, **mb)
