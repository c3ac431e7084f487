"""Rotary position embeddings (HF "rotate half" convention), with Llama 3
frequency scaling."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from kimi_jax import backend
from kimi_jax.models.model_config import ModelConfig


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
  """float32 `[E/2]` inverse frequencies, with Llama 3 scaling if configured."""
  e = cfg.head_size
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, e, 2, dtype=jnp.float32) / e))
  s = cfg.rope_scaling
  if s is None:
    return inv_freq
  # Same piecewise rule as HF `_compute_llama3_parameters`: long wavelengths
  # are divided by `factor`, short ones kept, the band between interpolated.
  low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
  high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
  smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
      s.high_freq_factor - s.low_freq_factor)
  smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
  is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return jnp.where(is_medium, smoothed, scaled)


def rope_tables(positions_BT: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
  """float32 `(cos, sin)`, each `[B, T, E/2]`: the RoPE rotation, computed once
  per forward and shared by every layer's q and k."""
  angles_BTf = positions_BT.astype(jnp.float32)[..., None] * inv_freq[None, None, :]
  cos, sin = jnp.cos(angles_BTf), jnp.sin(angles_BTf)
  if angles_BTf.shape[1] == 1 or not backend.is_cpu():
    return cos, sin
  # XLA CPU counts cos/sin as cheap and fuses them into every consumer, so
  # they were re-evaluated per head and element of each layer's q and k
  # (two transcendentals per entry; 7-10% of the 20.6M train step of
  # bench/train_step.py). A dot is never fused into its consumers: a product
  # with the identity materialises the tables once. Exact: x * 1 + 0 + ... = x.
  f = angles_BTf.shape[-1]
  both = jnp.concatenate([cos, sin], axis=-1) @ jnp.eye(2 * f, dtype=jnp.float32)
  return both[..., :f], both[..., f:]


def rotate_half(x: jax.Array, cos: jax.Array, sin: jax.Array, axis: int = -1) -> jax.Array:
  """RoPE in the HF "rotate half" convention (not interleaved) along the head
  dim `axis` of `x`; float32 `cos`/`sin` broadcast against either half.
  Computed in float32, returned in x's dtype."""
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=axis)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=axis)
  return out.astype(x.dtype)


def apply_rope(x_BTNE: jax.Array, cos_BTf: jax.Array, sin_BTf: jax.Array) -> jax.Array:
  """`rotate_half` of `[B, T, N, E]` heads with the `[B, T, E/2]` tables."""
  return rotate_half(x_BTNE, cos_BTf[:, :, None, :], sin_BTf[:, :, None, :])
