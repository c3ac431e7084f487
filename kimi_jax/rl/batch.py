"""Finished groups -> static-shape training minibatches (`Batch`).

Axis legend: G groups, K samples per group, N rows per minibatch, T tokens
per row, S sample slots per row.

The host side of the update: which tokens enter the loss, the group
baseline and advantages (`losses.group_advantages`, the one place they are
computed), and the fixed-shape arrays the jitted train step takes.

Packing (`samples_per_row` S > 1, config rl.samples_per_row): a minibatch
keeps its `minibatch_size` samples (the optimizer sees the same samples per
step either way), but they are laid end to end in rows of T tokens, at most
S per row, first-fit by decreasing length, instead of one padded sample per
row. Each token carries its sample's slot (`segment_ids_NT`, 0 = padding)
and position within the sample (`positions_NT`), so attention stays within
a sample and RoPE sees the unpacked positions. Rows fill from the front:
the train step skips microbatches with no sample, so a minibatch of short
samples costs the rows it needs, not `minibatch_size` rows. S = 1 is the
unpacked layout (row n = sample n).

Image + text samples (`images` given): row n also holds the images of its
samples, in the order the samples sit in the row (their placeholders'
order), in `I = S * image_slots` static slots (`pixels_NIYXC`, zeros after
the last); `image_prompt_NT` marks the prompt tokens, the only ones whose
placeholder ids take image features (a sampled id stays a token).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import flax.struct
import jax
import numpy as np

from kimi_jax.rl import losses
from kimi_jax.sampling.partial import Group


@flax.struct.dataclass
class Batch:
  """One minibatch of N rows (static shapes; empty sample slots have
  sample_mask 0).

  Per token, `[N, T]`: tokens_NT int32; positions_NT int32, the position
  within its sample (RoPE); segment_ids_NT int32, s + 1 for the tokens of
  the row's sample slot s, 0 for padding; mask_NT float32, the tokens that
  enter the loss; ref_logp_NT float32, log-probs under the iteration-start
  policy (the reference); behaviour_logp_NT float32, the log-probs the
  sampler recorded when it drew each response token (`Trajectory.logp`: for
  a segment carried over from an earlier iteration, that iteration's
  policy; the behaviour policy of PPO's ratio), 0 elsewhere.
  Per sample slot, `[N, S]`: rewards_NS float32 final rewards;
  advantages_NS float32, r - r_bar (/ group std with
  `LossConfig.advantage_std_norm`); sample_mask_NS float32.
  Image + text only (else None): pixels_NIYXC float32 `[N, I, Y, X, C]`,
  the row's images in I slots; image_prompt_NT bool, prompt tokens.
  """
  tokens_NT: jax.Array
  positions_NT: jax.Array
  segment_ids_NT: jax.Array
  mask_NT: jax.Array
  ref_logp_NT: jax.Array
  behaviour_logp_NT: jax.Array
  rewards_NS: jax.Array
  advantages_NS: jax.Array
  sample_mask_NS: jax.Array
  pixels_NIYXC: Optional[jax.Array] = None
  image_prompt_NT: Optional[jax.Array] = None


# Which response tokens enter the loss under partial rollouts (config key
# rl.loss_segments; README "The RL update"). A response sampled over
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


def empty_minibatch(n: int, length: int, samples_per_row: int = 1, image_slots: int = 0,
                    image_shape: Optional[tuple[int, int, int]] = None) -> dict:
  """A minibatch of `n` empty rows of `length` tokens (sample_mask 0: no
  loss, no gradient), in the fields of `Batch` except `ref_logp_NT`; with
  `image_slots` per sample, the image fields too (`image_shape` (Y, X, C))."""
  token = lambda dtype: np.zeros((n, length), dtype)  # noqa: E731
  sample = lambda: np.zeros((n, samples_per_row), np.float32)  # noqa: E731
  mb = dict(tokens_NT=token(np.int32), positions_NT=token(np.int32),
            segment_ids_NT=token(np.int32), mask_NT=token(np.float32),
            behaviour_logp_NT=token(np.float32), rewards_NS=sample(),
            advantages_NS=sample(), sample_mask_NS=sample())
  if image_slots:
    mb["pixels_NIYXC"] = np.zeros((n, samples_per_row * image_slots) + tuple(image_shape),
                                  np.float32)
    mb["image_prompt_NT"] = token(bool)
  return mb


def pack(lengths: Sequence[int], rows: int, length: int,
         samples_per_row: int) -> list[tuple[int, int, int]]:
  """Where each sample goes: `(row, offset, slot)` per length, in input order.

  One sample per row (S = 1): sample i in row i. Otherwise first-fit by
  decreasing length into `rows` rows of `length` tokens, at most
  `samples_per_row` per row, so rows fill from the front. Raises when the
  samples do not fit (more samples than rows * S, or a sample over `length`).
  """
  if len(lengths) > rows * samples_per_row:
    raise ValueError(f"{len(lengths)} samples do not fit {rows} rows of "
                     f"{samples_per_row} samples")
  order = range(len(lengths))
  if samples_per_row > 1:
    order = sorted(order, key=lambda i: -lengths[i])
  used, count = [0] * rows, [0] * rows
  out = [None] * len(lengths)
  first_open = 0  # rows before it hold samples_per_row samples already
  for i in order:
    n = lengths[i]
    if n > length:
      raise ValueError(f"a sample of {n} tokens does not fit the training length {length}")
    row = next((r for r in range(first_open, rows)
                if count[r] < samples_per_row and used[r] + n <= length), None)
    if row is None:
      raise ValueError(f"{len(lengths)} samples of {sum(lengths)} tokens do not fit {rows} "
                       f"rows of {length} tokens")
    out[i] = (row, used[row], count[row])
    used[row] += n
    count[row] += 1
    while first_open < rows and count[first_open] == samples_per_row:
      first_open += 1
  return out


def make_minibatches(groups: Sequence[Group], rewards_GK: np.ndarray, *, minibatch_size: int,
                     loss_segments: str, iteration: int, length: int = 0,
                     length_multiple: int = 64, samples_per_row: int = 1,
                     advantage_std_norm: bool = False,
                     images: Optional[Callable[[int], np.ndarray]] = None,
                     image_slots: int = 0) -> list[dict]:
  """All samples of `groups` in minibatches of `minibatch_size` samples, each
  laid out in `minibatch_size` rows (module docstring).

  Args:
    groups: completed groups (K samples each).
    rewards_GK: float32 final rewards (task + penalties) per sample.
    minibatch_size: samples per minibatch, and its rows (static); the last
      minibatch is padded with empty slots.
    loss_segments, iteration: which tokens enter the loss when training at
      `iteration` (`loss_mask`).
    length: T, a fixed row length for every iteration (0 = derive it per
      iteration). The trainer fixes it to the rollout max length so the
      update compiles once; benchmarks with one known length use
      `length_multiple` instead.
    length_multiple: T is the longest sample of the iteration rounded up to
      this multiple (one shape per iteration, few shapes per run; finer than
      powers of two, which would nearly double the work of 130-token samples).
    samples_per_row: S, the most samples packed into one row (1 = no packing).
    advantage_std_norm: divide each group's advantages by its reward std
      (`LossConfig.advantage_std_norm`).
    images: image + text: prompt index -> its images float32 `[n, Y, X, C]`
      (n <= image_slots), the ones the rollout was sampled with.
    image_slots: image slots per sample (with `images`).

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
  image_shape = None
  if images is not None:
    if image_slots < 1:
      raise ValueError(f"image_slots must be >= 1 with images, got {image_slots}")
    image_shape = images(samples[0][0].prompt_idx).shape[1:]
  out = []
  for lo in range(0, len(samples), minibatch_size):
    chunk = samples[lo:lo + minibatch_size]
    mb = empty_minibatch(minibatch_size, T, samples_per_row, image_slots if images else 0,
                         image_shape)
    where = pack([len(t.tokens) for t, _, _ in chunk], minibatch_size, T, samples_per_row)
    used = [0] * minibatch_size  # image slots filled per row
    # Samples in row order (by offset), so images follow their placeholders.
    for (t, g, k), (row, start, slot) in sorted(zip(chunk, where), key=lambda x: x[1]):
      span = slice(start, start + len(t.tokens))
      mb["tokens_NT"][row, span] = t.tokens
      mb["positions_NT"][row, span] = np.arange(len(t.tokens))
      mb["segment_ids_NT"][row, span] = slot + 1
      mb["mask_NT"][row, span] = loss_mask(t, loss_segments, iteration)
      mb["behaviour_logp_NT"][row, start + t.prompt_len:span.stop] = t.logp
      mb["rewards_NS"][row, slot] = rewards_GK[g, k]
      mb["advantages_NS"][row, slot] = advantages_GK[g, k]
      mb["sample_mask_NS"][row, slot] = 1.0
      if images is not None:
        x = images(t.prompt_idx)
        if len(x) > image_slots:
          raise ValueError(f"prompt {t.prompt_idx} has {len(x)} images, more than the "
                           f"{image_slots} image slots per sample")
        mb["pixels_NIYXC"][row, used[row]:used[row] + len(x)] = x
        used[row] += len(x)
        mb["image_prompt_NT"][row, start:start + t.prompt_len] = True
    out.append(mb)
  return out


def to_batch(mb: dict, ref_logp_NT) -> Batch:
  return Batch(ref_logp_NT=ref_logp_NT, **mb)
