"""Small loss math: per-sample reductions of token terms, masks, group statistics.

Axis legend: N samples, T tokens per sample, G prompts (groups), K samples
per prompt.
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


def reduce_tokens(x_NT: Array, mask_NT: Array,
                  normalisation: str = "sequence") -> Array:
  """Masked per-sample reduction `[N, T] -> [N]` (see module docstring)."""
  check_choice("normalisation", normalisation, NORMALISATIONS)
  check_shapes(x=x_NT, mask=mask_NT)
  mask_NT = jnp.asarray(mask_NT).astype(x_NT.dtype)
  total_N = jnp.sum(mask_NT * x_NT, axis=-1)
  if normalisation == "sequence":
    return total_N
  if normalisation == "token":
    return total_N / jnp.maximum(jnp.sum(mask_NT, axis=-1), 1.0)
  return total_N / x_NT.shape[-1]


def sample_mean(x_N: Array, sample_mask_N: Optional[Array] = None) -> Array:
  """Mean over samples, optionally over the samples with sample_mask != 0."""
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


def token_weights(mask_NT, sample_mask_N, dtype):
  w_NT = jnp.asarray(mask_NT).astype(dtype)
  if sample_mask_N is not None:
    w_NT = w_NT * jnp.asarray(sample_mask_N).astype(dtype)[:, None]
  return w_NT


def token_mean(x_NT, mask_NT, sample_mask_N):
  """Mean of x over all selected tokens of the batch (diagnostics only)."""
  w_NT = token_weights(mask_NT, sample_mask_N, x_NT.dtype)
  return jnp.sum(w_NT * x_NT) / jnp.maximum(jnp.sum(w_NT), 1.0)
