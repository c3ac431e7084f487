"""Decoder-only transformer for the Llama and Qwen2 families (flax linen).

Axis legend: B batch, T query length, S key/cache length, D model width,
H query heads, K kv heads, G = H // K query heads per kv head, E head dim,
F MLP width, V vocab.

Every parameter carries logical axis names (`nn.with_logical_partitioning`)
so that sharding is a table of rules in `kimi_jax/parallel.py`; activations
are pinned with `nn.with_logical_constraint` at the few points where XLA's
propagation needs a hint (a no-op unless a mesh and rules are active, i.e.
under `parallel.Layout.activate`).

Layers are unrolled (`layers_0`, `layers_1`, ...) by default, or with
`cfg.scan_layers` one `nn.scan` over params stacked `[L, ...]` under
`layers` (compile time of deep models; `layer_stack.stack_layers` /
`unstack_layers` convert). On the decode path a scan slices every weight
every step (about twice the matmul time on CPU), so samplers may prefer the
unrolled form. `cfg.remat` rematerialises each block in the backward pass.

Call without a cache for training/scoring:
  logits_BTV = Transformer(cfg).apply({'params': p}, tokens_BT)
  hidden_BTD = Transformer(cfg).apply({'params': p}, tokens_BT, return_hidden=True)
(the final-normed hidden states, for an LM head applied in chunks:
`models.logits`), and with a `KVCache` for prefill and incremental decode:
  logits_BTV, cache = Transformer(cfg).apply({'params': p}, tokens_BT, cache=cache)

Image + text (`cfg.vision`): either call also takes `pixel_values` float32
`[N, Y, X, C]` (normalised, `data.images.preprocess`); the image encoder's
features replace the embeddings of the `cfg.image_token_id` placeholders,
images in order of their placeholders (`vision.merge_image_features`; with
`images_per_row` S the images are S static slots per row). Precomputed
features (`method=Transformer.encode_images`) may be passed as
`image_features` instead, so a prefill in chunks encodes the images once.

Without a cache attention goes through `attention_kernels.sequence_attention`
(`cfg.attention`: blockwise / splash / cuDNN / XLA), masked by causality and
segment ids only; with a cache the new queries attend over the cache slots
with the cache's `[B, T, S]` key mask (T is one decode step or one prefill
chunk, `cfg.prefill_chunk`). The layers themselves are `models/blocks.py`.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from kimi_jax import backend
from kimi_jax.models import vision as vision_lib
from kimi_jax.models.blocks import (  # noqa: F401  (re-exported: the layers live there)
    ACT_BTD, ACT_BTF, ACT_BTHE, ACT_BTKE, ACT_BTV, MLP, Attention, Block, RMSNorm, _kernel_init,
    block_class, remat_policy, rms_normalize, scanned_blocks)
from kimi_jax.models.kv_cache import KVCache
from kimi_jax.models.model_config import (  # noqa: F401  (re-exported)
    ATTENTION_IMPLEMENTATIONS, FAMILIES, REMAT_POLICIES, ModelConfig, RopeScaling)
from kimi_jax.models.rope import (  # noqa: F401  (re-exported)
    apply_rope, rope_inv_freq, rope_tables, rotate_half)


class Transformer(nn.Module):
  """Llama / Qwen2 decoder. See the module docstring for the two call forms."""
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    pd = jnp.dtype(cfg.param_dtype)
    self.embed = self.param(
        "embed", nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), ("vocab", "embed")),
        (cfg.vocab_size, cfg.hidden_size), pd)
    if cfg.scan_layers:
      self.layers = scanned_blocks(cfg)
    else:
      block = block_class(cfg)
      self.layers = [block(cfg, name=f"layers_{i}") for i in range(cfg.num_layers)]
    self.final_norm = RMSNorm(cfg.rms_norm_eps, pd)
    if not cfg.tie_embeddings:
      self.lm_head = self.param(
          "lm_head", nn.with_logical_partitioning(_kernel_init(), ("embed", "vocab")),
          (cfg.hidden_size, cfg.vocab_size), pd)
    if cfg.vision is not None:
      # Its params land under vision_lib.PARAMS_KEY, this attribute's name.
      self.vision = vision_lib.VisionEncoder(cfg.vision, cfg.hidden_size)

  def encode_images(self, pixel_values: jax.Array) -> jax.Array:
    """Projected image features `[N, P, D]` (compute dtype) of float32
    pixels `[N, Y, X, C]`: what the placeholders' embeddings become."""
    if self.cfg.vision is None:
      raise ValueError("this model has no image encoder (ModelConfig.vision is None)")
    return self.vision(pixel_values)

  def init_all(self, tokens_BT: jax.Array):
    """Every parameter's initialiser, the image encoder's too (for `init`)."""
    out = self(tokens_BT)
    if self.cfg.vision is not None:
      v = self.cfg.vision
      self.encode_images(jnp.zeros((1, v.image_size, v.image_size, v.num_channels), jnp.float32))
    return out

  def _embed_images(self, x_BTD, tokens_BT, pixel_values, image_features, images_per_row,
                    image_prompt_BT, image_offset_B):
    """Token embeddings with the placeholders' replaced (see the module docstring)."""
    if pixel_values is None and image_features is None:
      return x_BTD
    if self.cfg.vision is None:
      raise ValueError("pixel_values / image_features given, but this model has no image "
                       "encoder (ModelConfig.vision is None)")
    if pixel_values is not None and image_features is not None:
      raise ValueError("give pixel_values or image_features, not both")
    feats_NPD = self.encode_images(pixel_values) if image_features is None else image_features
    return vision_lib.merge_image_features(x_BTD, tokens_BT, feats_NPD, self.cfg.image_token_id,
                                           images_per_row, image_prompt_BT, image_offset_B)

  def __call__(self, tokens_BT: jax.Array, *, positions_BT: Optional[jax.Array] = None,
               segment_ids_BT: Optional[jax.Array] = None, cache: Optional[KVCache] = None,
               last_only: bool = False, return_hidden: bool = False,
               pixel_values: Optional[jax.Array] = None,
               image_features: Optional[jax.Array] = None, images_per_row: Optional[int] = None,
               image_prompt_BT: Optional[jax.Array] = None,
               image_offset_B: Optional[jax.Array] = None):
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
      return_hidden: return the final-normed hidden states `[B, T, D]`
        (compute dtype) instead of logits; `lm_head(cfg, params)` is the
        head to apply (`models.logits` does it in chunks).
      pixel_values / image_features, images_per_row, image_prompt_BT,
        image_offset_B: the images of these tokens, as `pixels` float32
        `[N, Y, X, C]` or encoded `[N, P, D]`, and `merge_image_features`'s
        images_per_row / prompt_BT / offset_B. None: text only.
    """
    cfg = self.cfg
    B, T = tokens_BT.shape
    if cache is None:
      mask = segment_ids_BT
      if positions_BT is None:
        positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    else:
      if segment_ids_BT is not None:
        raise ValueError("segment_ids_BT is only supported without a KV cache")
      if T > cache.length:
        raise ValueError(f"{T} new tokens do not fit in a KV cache of {cache.length} slots")
      if cache.cpu_layout != backend.is_cpu():
        raise ValueError(
            f"the KV cache has the {'CPU' if cache.cpu_layout else 'accelerator'} layout but "
            f"this program is traced for the other (see kv_cache.py; make it with init_cache "
            f"under the same backend forms)")
      mask = cache.key_mask(T)
      if positions_BT is None:
        positions_BT = cache.positions(T)

    # FSDP: gather the table's model-width shards before the lookup (the
    # gather cannot move from width-sharded to row-sharded output cheaply).
    embed_VD = nn.with_logical_constraint(jnp.asarray(self.embed, cfg.compute_dtype),
                                          ("vocab", None))
    x_BTD = jnp.take(embed_VD, tokens_BT, axis=0)
    x_BTD = self._embed_images(x_BTD, tokens_BT, pixel_values, image_features, images_per_row,
                               image_prompt_BT, image_offset_B)
    x_BTD = nn.with_logical_constraint(x_BTD, ACT_BTD)
    rope = rope_tables(positions_BT, rope_inv_freq(cfg))
    index = None if cache is None else cache.index
    if cfg.scan_layers:
      stacked = None if cache is None else (jnp.stack(cache.k), jnp.stack(cache.v))
      x_BTD, kv = self.layers(x_BTD, rope, mask, stacked, index)
      new_k = None if kv is None else tuple(kv[0])
      new_v = None if kv is None else tuple(kv[1])
    else:
      new_k, new_v = [], []
      for i, layer in enumerate(self.layers):
        cache_kv = None if cache is None else (cache.k[i], cache.v[i])
        x_BTD, kv = layer(x_BTD, rope, mask, cache_kv, index)
        if kv is not None:
          new_k.append(kv[0])
          new_v.append(kv[1])
    x_BTD = self.final_norm(x_BTD)
    if last_only:
      x_BTD = x_BTD[:, -1:, :]
    if return_hidden:
      if cache is not None:
        raise ValueError("return_hidden is only supported without a KV cache")
      return x_BTD
    if cfg.tie_embeddings:
      logits = jnp.einsum("btd,vd->btv", x_BTD, jnp.asarray(self.embed, x_BTD.dtype))
    else:
      logits = x_BTD @ jnp.asarray(self.lm_head, x_BTD.dtype)
    logits = nn.with_logical_constraint(logits.astype(jnp.float32), ACT_BTV)
    if cache is None:
      return logits
    return logits, cache.replace(k=tuple(new_k), v=tuple(new_v), index=cache.index + T)


def lm_head(cfg: ModelConfig, params: dict) -> jax.Array:
  """The LM head as `[D, V]` (param dtype): `lm_head`, or the embedding
  table transposed when tied."""
  if cfg.tie_embeddings:
    return params["embed"].T
  return params["lm_head"]


def init_params(cfg: ModelConfig, rng: jax.Array) -> dict:
  """Random parameters (plain arrays, logical-axis boxes removed)."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  # Jitted: eager init dispatches (and compiles) every initializer separately.
  init = jax.jit(lambda r: nn.unbox(
      Transformer(cfg).init(r, tokens, method=Transformer.init_all)["params"]))
  return init(rng)


def param_logical_axes(cfg: ModelConfig) -> dict:
  """A pytree like the params whose leaves are `PartitionSpec`s of logical names."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  boxed = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.PRNGKey(0), tokens,
                                                       method=Transformer.init_all))
  return nn.get_partition_spec(boxed)["params"]


def init_cache(cfg: ModelConfig, batch: int, length: int, start=None) -> KVCache:
  """An empty cache for `cfg` in its compute dtype."""
  return KVCache.init(cfg.num_layers, batch, cfg.num_kv_heads, length, cfg.head_size,
                      cfg.compute_dtype, start)  # the layout: backend.is_cpu()
