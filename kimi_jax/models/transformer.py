"""Decoder-only transformer for the Llama and Qwen2 families (flax linen).

Axis legend: B batch, T query length, S key/cache length, D model width,
H query heads, K kv heads, G = H // K query heads per kv head, E head dim,
F MLP width, V vocab.

Every parameter carries logical axis names (`nn.with_logical_partitioning`)
so that sharding is a table of rules in `kimi_jax/parallel.py`; activations
are pinned with `nn.with_logical_constraint` at the few points where XLA's
propagation needs a hint (a no-op unless a mesh and rules are active, i.e.
under `parallel.Layout.activate`). Layers are
unrolled (`layers_0`, `layers_1`, ...) rather than scanned: on the decode path
a scan over stacked weights slices every weight every step, which measured
about twice the matmul time on CPU.

Call without a cache for training/scoring:
  logits_BTV = Transformer(cfg).apply({'params': p}, tokens_BT)
and with a `KVCache` for prefill and incremental decode:
  logits_BTV, cache = Transformer(cfg).apply({'params': p}, tokens_BT, cache=cache)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from kimi_jax.models import attention
from kimi_jax.models.kv_cache import KVCache
from kimi_jax.models.swiglu import swiglu

FAMILIES = ("llama", "qwen2")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama 3 style frequency-dependent RoPE scaling (HF `rope_type: llama3`)."""
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture and numerics of one model. Hashable: usable as a jit static.

  dtype fields are strings ("float32", "bfloat16") to keep the config
  hashable and JSON-friendly.
  """
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: Optional[int] = None  # default hidden_size // num_heads
  rope_theta: float = 10000.0
  rope_scaling: Optional[RopeScaling] = None
  rms_norm_eps: float = 1e-6
  qkv_bias: bool = False  # True for Qwen2
  tie_embeddings: bool = False
  max_position_embeddings: int = 4096
  family: str = "llama"  # "llama" | "qwen2": decides the HF export format
  param_dtype: str = "float32"
  dtype: str = "float32"  # compute dtype; norms, softmax and logits stay fp32
  bos_id: Optional[int] = None
  eos_id: Optional[int] = None
  pad_id: Optional[int] = None

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                 "num_heads", "num_kv_heads", "max_position_embeddings"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of "
          f"num_kv_heads ({self.num_kv_heads})")
    if self.head_dim is None and self.hidden_size % self.num_heads:
      raise ValueError(
          f"ModelConfig.hidden_size ({self.hidden_size}) is not divisible by "
          f"num_heads ({self.num_heads}); set head_dim explicitly")
    if self.family not in FAMILIES:
      raise ValueError(f"ModelConfig.family must be one of {FAMILIES}, got {self.family!r}")
    for name in ("dtype", "param_dtype"):
      try:
        jnp.dtype(getattr(self, name))
      except TypeError as e:
        raise ValueError(f"ModelConfig.{name}: unknown dtype {getattr(self, name)!r}") from e

  @property
  def head_size(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  def num_params(self) -> int:
    """Parameter count (exact, from the architecture)."""
    d, f, e = self.hidden_size, self.intermediate_size, self.head_size
    attn = d * e * (self.num_heads * 2 + self.num_kv_heads * 2)
    if self.qkv_bias:
      attn += e * (self.num_heads + 2 * self.num_kv_heads)
    layer = attn + 3 * d * f + 2 * d
    head = 0 if self.tie_embeddings else d * self.vocab_size
    return self.vocab_size * d + self.num_layers * layer + d + head

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)


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
  if angles_BTf.shape[1] == 1 or jax.default_backend() != "cpu":
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


def rms_normalize(x: jax.Array, scale: jax.Array, eps: float, axis: int = -1) -> jax.Array:
  """RMSNorm along `axis`, in HF's order for parity: statistics in float32,
  then `scale` (broadcast against x, cast to x's dtype) times the normalised
  x cast back to x's dtype."""
  x32 = x.astype(jnp.float32)
  normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=axis, keepdims=True) + eps)
  return jnp.asarray(scale, x.dtype) * normed.astype(x.dtype)


# Logical activation axes (rules in kimi_jax/parallel.py).
ACT_BTD = ("activation_batch", "activation_length", "activation_embed")
ACT_BTHE = ("activation_batch", "activation_length", "activation_heads", None)
ACT_BTKE = ("activation_batch", "activation_length", "activation_kv_heads", None)
ACT_BTF = ("activation_batch", "activation_length", "activation_mlp")
ACT_BTV = ("activation_batch", "activation_length", "activation_vocab")


def _kernel_init():
  return nn.initializers.normal(stddev=0.02)


class RMSNorm(nn.Module):
  eps: float
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), self.param_dtype)
    return rms_normalize(x, scale.reshape((1,) * (x.ndim - 1) + (-1,)), self.eps)


class Attention(nn.Module):
  cfg: ModelConfig

  def _proj(self, name, x_BTD, heads, axes):
    cfg = self.cfg
    kernel = self.param(name, nn.with_logical_partitioning(_kernel_init(), ("embed",) + axes),
                        (cfg.hidden_size, heads, cfg.head_size), jnp.dtype(cfg.param_dtype))
    y = jnp.einsum("btd,dne->btne", x_BTD, jnp.asarray(kernel, x_BTD.dtype))
    if cfg.qkv_bias:
      bias = self.param(name + "_bias", nn.with_logical_partitioning(nn.initializers.zeros, axes),
                        (heads, cfg.head_size), jnp.dtype(cfg.param_dtype))
      y = y + jnp.asarray(bias, y.dtype)[None, None]
    return y

  @nn.compact
  def __call__(self, x_BTD, rope, mask_BTS, cache_kv=None, cache_index=None):
    """`rope` is the `(cos, sin)` pair of `rope_tables`. Returns `(out_BTD, (k_BKES, v_BKSE))`; the pair is the updated cache
    layer when `cache_kv` is given, else the keys/values of this call."""
    cfg = self.cfg
    K, E = cfg.num_kv_heads, cfg.head_size
    G = cfg.num_heads // K
    q_BTHE = self._proj("q", x_BTD, cfg.num_heads, ("q_heads", "head_dim"))
    k_BTKE = self._proj("k", x_BTD, K, ("kv_heads", "head_dim"))
    v_BTKE = self._proj("v", x_BTD, K, ("kv_heads", "head_dim"))
    # Heads over `tensor`, rows over the data axes: under FSDP this makes XLA
    # gather the weights rather than the activations.
    q_BTHE = nn.with_logical_constraint(q_BTHE, ACT_BTHE)
    k_BTKE = nn.with_logical_constraint(k_BTKE, ACT_BTKE)
    v_BTKE = nn.with_logical_constraint(v_BTKE, ACT_BTKE)
    q_BTHE = apply_rope(q_BTHE, *rope)
    k_BTKE = apply_rope(k_BTKE, *rope)

    k_BKET = k_BTKE.transpose(0, 2, 3, 1)  # keys slots-last: see kv_cache.py
    v_BKTE = v_BTKE.transpose(0, 2, 1, 3)
    if cache_kv is None:
      k_BKES, v_BKSE = k_BKET, v_BKTE
    else:
      ck, cv = cache_kv
      k_BKES = jax.lax.dynamic_update_slice(ck, k_BKET.astype(ck.dtype), (0, 0, 0, cache_index))
      v_BKSE = jax.lax.dynamic_update_slice(cv, v_BKTE.astype(cv.dtype), (0, 0, cache_index, 0))

    B, T = x_BTD.shape[:2]
    q_BKGTE = q_BTHE.reshape(B, T, K, G, E).transpose(0, 2, 3, 1, 4)
    if T == 1 and cache_kv is not None and jax.default_backend() == "cpu":
      out_BKGTE = attention.decode_step_cpu(q_BKGTE[:, :, :, 0, :], k_BKES, v_BKSE,
                                            mask_BTS[:, 0, :])[:, :, :, None, :]
    else:
      out_BKGTE = attention.attend(q_BKGTE, k_BKES, v_BKSE, mask_BTS)
    out_BTHE = out_BKGTE.transpose(0, 3, 1, 2, 4).reshape(B, T, cfg.num_heads, E)
    o = self.param("o", nn.with_logical_partitioning(_kernel_init(), ("q_heads", "head_dim", "embed")),
                   (cfg.num_heads, E, cfg.hidden_size), jnp.dtype(cfg.param_dtype))
    # One [H*E, D] matmul rather than an einsum over (h, e): with the einsum,
    # XLA CPU chose to transpose the whole weight to [E, H, D] on every decode
    # step (~0.1 ms per layer at B=32) instead of the small activation.
    HE = cfg.num_heads * E
    out_BTD = (out_BTHE.reshape(B, T, HE).astype(x_BTD.dtype)
               @ jnp.asarray(o, x_BTD.dtype).reshape(HE, cfg.hidden_size))
    return out_BTD, (k_BKES, v_BKSE)


def _constrain_hidden(h_BTF):
  return nn.with_logical_constraint(h_BTF, ACT_BTF)


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD):
    cfg = self.cfg
    pd = jnp.dtype(cfg.param_dtype)

    def kernel(name, shape, axes):
      w = self.param(name, nn.with_logical_partitioning(_kernel_init(), axes), shape, pd)
      return jnp.asarray(w, x_BTD.dtype)

    d, f = cfg.hidden_size, cfg.intermediate_size
    gate = kernel("gate", (d, f), ("embed", "mlp"))
    up = kernel("up", (d, f), ("embed", "mlp"))
    down = kernel("down", (f, d), ("mlp", "embed"))
    return swiglu(x_BTD, gate, up, down, _constrain_hidden)


class Block(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, rope, mask_BTS, cache_kv=None, cache_index=None):
    cfg = self.cfg
    pd = jnp.dtype(cfg.param_dtype)
    h = RMSNorm(cfg.rms_norm_eps, pd, name="attn_norm")(x_BTD)
    attn_out, kv = Attention(cfg, name="attn")(h, rope, mask_BTS, cache_kv, cache_index)
    x_BTD = x_BTD + attn_out
    h = RMSNorm(cfg.rms_norm_eps, pd, name="mlp_norm")(x_BTD)
    return x_BTD + MLP(cfg, name="mlp")(h), kv


def causal_segment_mask(segment_ids_BT: Optional[jax.Array], T: int) -> jax.Array:
  """bool `[B|1, T, T]`: causal, within one segment, never onto segment 0 (padding)."""
  causal_TT = jnp.tril(jnp.ones((T, T), jnp.bool_))
  if segment_ids_BT is None:
    return causal_TT[None]
  same = segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :]
  return causal_TT[None] & same & (segment_ids_BT[:, None, :] != 0)


class Transformer(nn.Module):
  """Llama / Qwen2 decoder. See the module docstring for the two call forms."""
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    pd = jnp.dtype(cfg.param_dtype)
    self.embed = self.param(
        "embed", nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), ("vocab", "embed")),
        (cfg.vocab_size, cfg.hidden_size), pd)
    self.layers = [Block(cfg, name=f"layers_{i}") for i in range(cfg.num_layers)]
    self.final_norm = RMSNorm(cfg.rms_norm_eps, pd)
    if not cfg.tie_embeddings:
      self.lm_head = self.param(
          "lm_head", nn.with_logical_partitioning(_kernel_init(), ("embed", "vocab")),
          (cfg.hidden_size, cfg.vocab_size), pd)

  def __call__(self, tokens_BT: jax.Array, *, positions_BT: Optional[jax.Array] = None,
               segment_ids_BT: Optional[jax.Array] = None, cache: Optional[KVCache] = None,
               last_only: bool = False):
    """Logits float32 `[B, T, V]` (`[B, 1, V]` with `last_only`).

    Args:
      tokens_BT: int32 token ids.
      positions_BT: RoPE positions; default 0..T-1 without a cache, or the
        cache's per-row positions with one.
      segment_ids_BT: packed-sequence ids (0 = padding) for the cache-free
        path: attention stays causal and within a segment.
      cache: a `KVCache`; the new tokens are written at `cache.index` and the
        updated cache is returned as the second output.
      last_only: compute the LM head for the last position only (prefill).
    """
    cfg = self.cfg
    B, T = tokens_BT.shape
    if cache is None:
      mask_BTS = causal_segment_mask(segment_ids_BT, T)
      if positions_BT is None:
        positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    else:
      if segment_ids_BT is not None:
        raise ValueError("segment_ids_BT is only supported without a KV cache")
      if T > cache.length:
        raise ValueError(f"{T} new tokens do not fit in a KV cache of {cache.length} slots")
      mask_BTS = cache.key_mask(T)
      if positions_BT is None:
        positions_BT = cache.positions(T)

    # FSDP: gather the table's model-width shards before the lookup (the
    # gather cannot move from width-sharded to row-sharded output cheaply).
    embed_VD = nn.with_logical_constraint(jnp.asarray(self.embed, cfg.compute_dtype),
                                          ("vocab", None))
    x_BTD = jnp.take(embed_VD, tokens_BT, axis=0)
    x_BTD = nn.with_logical_constraint(x_BTD, ACT_BTD)
    rope = rope_tables(positions_BT, rope_inv_freq(cfg))
    new_k, new_v = [], []
    for i, layer in enumerate(self.layers):
      cache_kv = None if cache is None else (cache.k[i], cache.v[i])
      x_BTD, (k, v) = layer(x_BTD, rope, mask_BTS, cache_kv,
                            None if cache is None else cache.index)
      x_BTD = nn.with_logical_constraint(x_BTD, ACT_BTD)
      new_k.append(k)
      new_v.append(v)
    x_BTD = self.final_norm(x_BTD)
    if last_only:
      x_BTD = x_BTD[:, -1:, :]
    if cfg.tie_embeddings:
      logits = jnp.einsum("btd,vd->btv", x_BTD, jnp.asarray(self.embed, x_BTD.dtype))
    else:
      logits = x_BTD @ jnp.asarray(self.lm_head, x_BTD.dtype)
    logits = nn.with_logical_constraint(logits.astype(jnp.float32), ACT_BTV)
    if cache is None:
      return logits
    return logits, cache.replace(k=tuple(new_k), v=tuple(new_v), index=cache.index + T)


def init_params(cfg: ModelConfig, rng: jax.Array) -> dict:
  """Random parameters (plain arrays, logical-axis boxes removed)."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  # Jitted: eager init dispatches (and compiles) every initializer separately.
  init = jax.jit(lambda r: nn.unbox(Transformer(cfg).init(r, tokens)["params"]))
  return init(rng)


def param_logical_axes(cfg: ModelConfig) -> dict:
  """A pytree like the params whose leaves are `PartitionSpec`s of logical names."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  boxed = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.PRNGKey(0), tokens))
  return nn.get_partition_spec(boxed)["params"]


def init_cache(cfg: ModelConfig, batch: int, length: int, start=None) -> KVCache:
  """An empty cache for `cfg` in its compute dtype."""
  return KVCache.init(cfg.num_layers, batch, cfg.num_kv_heads, length, cfg.head_size,
                      cfg.compute_dtype, start)
