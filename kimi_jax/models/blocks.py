"""The decoder's layers: RMSNorm, attention, SwiGLU MLP, the block, remat and scan.

Axis legend as `models/transformer.py` (B batch, T query length, S key/cache
length, D model width, H query heads, K kv heads, E head dim, F MLP width,
V vocab). Every parameter carries logical axis names, activations are
pinned with logical constraints at the points XLA's propagation needs; the
rules are `kimi_jax/parallel.py`'s. `Transformer` stacks `block_class(cfg)`
unrolled (`layers_{i}`) or `scanned_blocks(cfg)` (one `nn.scan`).
"""
from __future__ import annotations


import flax.linen as nn
import jax
import jax.numpy as jnp

from kimi_jax import backend
from kimi_jax.models import attention, attention_kernels, kv_cache
from kimi_jax.models.model_config import ModelConfig
from kimi_jax.models.rope import apply_rope
from kimi_jax.models.swiglu import swiglu


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
  def __call__(self, x_BTD, rope, mask, cache_kv=None, cache_index=None):
    """`rope` is the `(cos, sin)` pair of `rope_tables`.

    Without `cache_kv`, `mask` is the int32 `[B, T]` segment ids (or None):
    causal self-attention within a segment. With it, `mask` is the bool
    `[B, T, S]` key mask of the cache and the new keys/values are written at
    `cache_index`. Returns `(out_BTD, kv)`: the updated cache layer
    `(keys, values)` (in the backend's layout, see kv_cache.py) with a
    cache, else None.
    """
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

    B, T = x_BTD.shape[:2]
    if cache_kv is None:
      kv = None
      out_BTHE = attention_kernels.sequence_attention(
          q_BTHE, k_BTKE, v_BTKE, segment_ids_BT=mask, implementation=cfg.attention)
    else:
      # The cache layout is the backend's (kv_cache.py): Transformer.__call__
      # checked that the cache was made for it.
      cpu_layout = backend.is_cpu()
      kv = kv_cache.write_layer(cpu_layout, *cache_kv, k_BTKE, v_BTKE, cache_index)
      if not cpu_layout:
        out_BTHE = attention.attend_cache(q_BTHE, *kv, mask)
      else:
        k_BKES, v_BKSE = kv
        q_BKGTE = q_BTHE.reshape(B, T, K, G, E).transpose(0, 2, 3, 1, 4)
        if T == 1:
          out_BKGTE = attention.decode_step_cpu(q_BKGTE[:, :, :, 0, :], k_BKES, v_BKSE,
                                                mask[:, 0, :])[:, :, :, None, :]
        else:
          out_BKGTE = attention.attend(q_BKGTE, k_BKES, v_BKSE, mask)
        out_BTHE = out_BKGTE.transpose(0, 3, 1, 2, 4).reshape(B, T, cfg.num_heads, E)
    o = self.param("o", nn.with_logical_partitioning(_kernel_init(), ("q_heads", "head_dim", "embed")),
                   (cfg.num_heads, E, cfg.hidden_size), jnp.dtype(cfg.param_dtype))
    # One [H*E, D] matmul rather than an einsum over (h, e): with the einsum,
    # XLA CPU chose to transpose the whole weight to [E, H, D] on every decode
    # step (~0.1 ms per layer at B=32) instead of the small activation.
    HE = cfg.num_heads * E
    out_BTD = (out_BTHE.reshape(B, T, HE).astype(x_BTD.dtype)
               @ jnp.asarray(o, x_BTD.dtype).reshape(HE, cfg.hidden_size))
    return out_BTD, kv


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
  """One pre-norm decoder layer; `(x_BTD, kv)` as `Attention` (see there for
  `mask`). Its signature is a scan body's: carry x, then the per-layer
  cache, so `nn.scan` stacks it as is."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, rope, mask, cache_kv=None, cache_index=None):
    cfg = self.cfg
    pd = jnp.dtype(cfg.param_dtype)
    h = RMSNorm(cfg.rms_norm_eps, pd, name="attn_norm")(x_BTD)
    attn_out, kv = Attention(cfg, name="attn")(h, rope, mask, cache_kv, cache_index)
    x_BTD = x_BTD + attn_out
    h = RMSNorm(cfg.rms_norm_eps, pd, name="mlp_norm")(x_BTD)
    x_BTD = nn.with_logical_constraint(x_BTD + MLP(cfg, name="mlp")(h), ACT_BTD)
    return x_BTD, kv


def remat_policy(name: str):
  """The `jax.checkpoint` policy of `ModelConfig.remat` (None: save nothing
  but each block's input)."""
  if name == "full":
    return None
  if name == "dots":
    # Matmul outputs without batch dims: the projections and MLP products
    # are kept, the elementwise ops and attention recomputed.
    return jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
  if name == "offload":
    # The same saved values as "dots", held in host memory between the
    # forward and the backward pass (device -> pinned host and back): HBM
    # for activations traded for host transfers, where the backend has host
    # memory spaces (TPU, GPU; the CPU's are one memory, so no saving there).
    return jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host")
  raise ValueError(f"no remat policy for {name!r}")


def block_class(cfg: ModelConfig):
  """`Block`, wrapped in `nn.remat` per `cfg.remat`."""
  if cfg.remat == "none":
    return Block
  # prevent_cse is only needed outside a scan (XLA could merge the recomputed
  # forward with the original); inside nn.scan it costs speed for nothing.
  return nn.remat(Block, policy=remat_policy(cfg.remat), prevent_cse=not cfg.scan_layers)


def scanned_blocks(cfg: ModelConfig, name: str = "layers"):
  """All `cfg.num_layers` blocks as one `nn.scan` module: params `[L, ...]`
  (logical axis "layers" in front), the carried x, the per-layer cache
  `(k [L, ...], v [L, ...])` scanned over, rope / mask / cache index shared."""
  scan = nn.scan(block_class(cfg), variable_axes={"params": 0}, split_rngs={"params": True},
                 in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast),
                 length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
  return scan(cfg, name=name)
