"""Small loss math: per-sample reductions of token terms, masks, group statistics.

Axis legend: N rows, T tokens per row, S sample slots per packed row, G
prompts (groups), K samples per prompt.

Rows are either one sample each (per-sample arrays `[N]`) or packed: several
samples laid end to end in a row, `segment_ids[n, t]` = s + 1 for a token of
the row's sample slot s and 0 for padding, per-sample arrays `[N, S]`
(package docstring). The reductions here are the only place the two layouts
differ: a sum over the row, or a sum per segment (a masked sum against the
`[N, T, S]` one-hot of the segment ids, elementwise so it stays float32-exact
on every backend; S is static).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from kimi_jax.rl.losses.config import NORMALISATIONS, check_choice

Array = jax.Array


def check_shapes(**arrays) -> None:
  """All named arrays must have the same shape as the first (static check)."""
  items = list(arrays.items())
  name0, a0 = items[0]
  for name, a in items[1:]:
    if jnp.shape(a) != jnp.shape(a0):
      raise ValueError(f"{name} has shape {jnp.shape(a)} but {name0} has shape "
                       f"{jnp.shape(a0)}")


def segment_onehot(segment_ids_NT: Array, num_samples: int, dtype) -> Array:
  """`[N, T, S]`: 1 where token t of row n belongs to sample slot s."""
  slots_S = jnp.arange(1, num_samples + 1, dtype=jnp.asarray(segment_ids_NT).dtype)
  return (jnp.asarray(segment_ids_NT)[..., None] == slots_S[None, None, :]).astype(dtype)


def per_sample_sum(x_NT: Array, segment_ids: Optional[Array] = None,
                   num_samples: int = 1) -> Array:
  """Sum of each sample's token values: `[N]` (one sample per row, no
  segment ids) or `[N, S]` (packed rows)."""
  if segment_ids is None:
    return jnp.sum(x_NT, axis=-1)
  check_shapes(x=x_NT, segment_ids=segment_ids)
  return jnp.sum(x_NT[..., None] * segment_onehot(segment_ids, num_samples, x_NT.dtype), axis=1)


def to_tokens(v, segment_ids: Optional[Array] = None) -> Array:
  """A per-sample value `[N]` (or `[N, S]` with segment ids) at each of the
  sample's tokens: `[N, 1]` (broadcasts over T) or `[N, T]` (0 on padding)."""
  v = jnp.asarray(v)
  if segment_ids is None:
    return v[:, None]
  onehot_NTS = segment_onehot(segment_ids, v.shape[-1], v.dtype)
  return jnp.sum(onehot_NTS * v[:, None, :], axis=-1)


def reduce_tokens(x_NT: Array, mask_NT: Array, normalisation: str = "sequence", *,
                  segment_ids: Optional[Array] = None, num_samples: int = 1) -> Array:
  """Masked per-sample reduction `[N, T] -> [N]`, or `-> [N, S]` over packed
  rows with `segment_ids` and `num_samples` = S (package docstring)."""
  check_choice("normalisation", normalisation, NORMALISATIONS)
  check_shapes(x=x_NT, mask=mask_NT)
  mask_NT = jnp.asarray(mask_NT).astype(x_NT.dtype)
  total = per_sample_sum(mask_NT * x_NT, segment_ids, num_samples)
  if normalisation == "sequence":
    return total
  if normalisation == "token":
    return total / jnp.maximum(per_sample_sum(mask_NT, segment_ids, num_samples), 1.0)
  return total / x_NT.shape[-1]


def per_sample(name: str, value, logp_NT: Array, segment_ids: Optional[Array]) -> Array:
  """`value` as a per-sample array, checked: `[N]`, or `[N, S]` with segment ids."""
  value = jnp.asarray(value)
  n = logp_NT.shape[0]
  if segment_ids is None:
    if value.shape != (n,):
      raise ValueError(f"{name} must be [N] = ({n},), got shape {value.shape}")
  elif value.ndim != 2 or value.shape[0] != n:
    raise ValueError(f"{name} must be [N, S] with N = {n} (packed rows: segment_ids given), "
                     f"got shape {value.shape}")
  return value


def sample_mean(x_N: Array, sample_mask_N: Optional[Array] = None) -> Array:
  """Mean over samples (`[N]` or `[N, S]`), optionally over the samples with
  sample_mask != 0."""
  if sample_mask_N is None:
    return jnp.mean(x_N)
  check_shapes(x=x_N, sample_mask=sample_mask_N)
  w_N = jnp.asarray(sample_mask_N).astype(x_N.dtype)
  return jnp.sum(w_N * x_N) / jnp.maximum(jnp.sum(w_N), 1.0)


# ------------------------------------------------ group statistics (host)
# The group structure lives on the host: the K samples of a prompt may land
# in different minibatches, so r_bar is taken here once per iteration, in
# numpy (eager jnp would compile a kernel for every new group count), and
# enters the jitted losses as per-sample advantages.


def group_baseline(rewards_GK, *, leave_one_out: bool = False) -> np.ndarray:
  """float32 `[G, K]`: the mean reward of each sample's group.

  r_bar[g] = mean_k rewards[g, k] (the report's approximation of tau log Z),
  broadcast to every sample of the group so `baseline_GK.reshape(-1)` lines up
  with `rewards_GK.reshape(-1)` as the `baseline` argument of `k15_loss`.
  leave_one_out: mean of the OTHER K - 1 rewards instead (RLOO; needs K >= 2).
  """
  return _baseline(np.asarray(rewards_GK, np.float64), leave_one_out).astype(np.float32)


def group_advantages(rewards_GK, *, std_normalise: bool = False, eps: float = 1e-6,
                     leave_one_out: bool = False) -> np.ndarray:
  """float32 `[G, K]`: A = r - group_baseline(r), optionally divided by the
  group's reward standard deviation + eps (GRPO; `LossConfig.advantage_std_norm`).
  A group of equal rewards has A = 0 exactly, either way."""
  rewards_GK = np.asarray(rewards_GK, np.float64)
  adv_GK = rewards_GK - _baseline(rewards_GK, leave_one_out)
  if std_normalise:
    adv_GK = adv_GK / (rewards_GK.std(axis=1, keepdims=True) + eps)
  return adv_GK.astype(np.float32)


def _baseline(rewards_GK: np.ndarray, leave_one_out: bool) -> np.ndarray:
  if rewards_GK.ndim != 2:
    raise ValueError(f"rewards_GK must be [G, K], got shape {rewards_GK.shape}")
  k = rewards_GK.shape[1]
  sum_G1 = rewards_GK.sum(axis=1, keepdims=True)
  if leave_one_out:
    if k < 2:
      raise ValueError(f"leave_one_out baseline needs K >= 2, got K={k}")
    baseline_GK = (sum_G1 - rewards_GK) / (k - 1)
  else:
    baseline_GK = np.broadcast_to(sum_G1 / k, rewards_GK.shape)
  # Equal rewards give r - r_bar = 0 exactly (3 * 0.3 / 3 != 0.3 in floats).
  equal_G1 = np.ptp(rewards_GK, axis=1, keepdims=True) == 0
  return np.where(equal_G1, rewards_GK, baseline_GK)


# ------------------------------------------------------------ diagnostics


def token_weights(mask_NT, sample_mask, dtype, segment_ids=None):
  """`[N, T]`: the loss mask, zeroed on the tokens of samples with sample_mask 0."""
  w_NT = jnp.asarray(mask_NT).astype(dtype)
  if sample_mask is not None:
    w_NT = w_NT * to_tokens(jnp.asarray(sample_mask).astype(dtype), segment_ids)
  return w_NT


def token_mean(x_NT, mask_NT, sample_mask, segment_ids=None):
  """Mean of x over all selected tokens of the batch (diagnostics only)."""
  w_NT = token_weights(mask_NT, sample_mask, x_NT.dtype, segment_ids)
  return jnp.sum(w_NT * x_NT) / jnp.maximum(jnp.sum(w_NT), 1.0)
