"""One-token decode step with feature-major activations: `generate`'s CPU path.

Axis legend as in transformer.py (B batch, D model width, H query heads, K kv
heads, G = H // K, E head dim, F MLP width, V vocab, S cache slots).

Why a second form of the decoder: in a decode step every weight matrix is
multiplied by only B rows. XLA CPU hands each product to Eigen in the
operand order and layouts it is given, and for these shapes Eigen is much
faster when the WEIGHT is the left operand with the activations feature-major,
`W_out,in @ x_in,B`, than for the training form `x_B,in @ W_in,out`. Time
for six products with six different weights of each shape, B=32 (2 cores,
fp32, Eigen), training form -> this form:

  [512, 512]   1.14 -> 0.67 ms    [512, 896] 1.69 -> 1.11 ms
  [896, 512]   1.69 -> 1.11 ms    [512, 8192] 14.2 -> 12.9 ms

XLA folds a transpose written around a matmul back into the dot (measured:
no faster, often 3x slower), so the layout has to be real: weights are
transposed once per `decode` call (`to_feature_major`, outside the decode
loop) and the hidden state stays `[D, B]` from layer to layer. Only the
small per-step tensors (q, the new k/v, the attention output: B x H*E
values) are transposed around the attention core, which reads the KV cache
in its CPU layout (kv_cache.py), so prefill and the cache are shared with
`Transformer`. The attention output is produced batch-last by the closing
sum of its p.v (`attention.decode_values(batch_last=True)`) and the logits
are returned `[V, B]`, because XLA also folds a transpose of a product's
RESULT into the product. The math is `Transformer`'s (same norms, RoPE,
GQA, SwiGLU, biases, tied or untied head) and tested against it.

bench/decode.py's 20.6M Llama, whole `generate` decode, this step vs
`Transformer.apply` in the same loop (alternating, one process): B=32 greedy
1483 -> 1593 tokens/s, B=32 temperature 1.0 1288 -> 1361, B=16 greedy
1238 -> 1417.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kimi_jax.models import attention
from kimi_jax.models.kv_cache import KVCache
from kimi_jax.models.transformer import (ModelConfig, rms_normalize, rope_inv_freq, rope_tables,
                                         rotate_half)


def to_feature_major(cfg: ModelConfig, params: dict) -> dict:
  """The inference weight layout: each matrix `[out, in]` in the compute dtype.

  Per layer: "q" `[H*E, D]`, "k"/"v" `[K*E, D]`, their biases `[*, 1]`
  (Qwen2), "o" `[D, H*E]`, "gate"/"up" `[F, D]`, "down" `[D, F]`, norm scales
  `[D, 1]`; "embed" `[V, D]` (the embedding table is already `[out, in]` for
  a tied head), "head" `[V, D]`, "final_norm" `[D, 1]`.
  """
  dt = cfg.compute_dtype
  D = cfg.hidden_size

  def mat(w, rows_in):
    return jnp.asarray(w, dt).reshape(rows_in, -1).T

  def col(w):
    return jnp.asarray(w, dt).reshape(-1, 1)

  layers = []
  for i in range(cfg.num_layers):
    p = params[f"layers_{i}"]
    a, m = p["attn"], p["mlp"]
    layer = {"attn_norm": col(p["attn_norm"]["scale"]), "mlp_norm": col(p["mlp_norm"]["scale"]),
             "q": mat(a["q"], D), "k": mat(a["k"], D), "v": mat(a["v"], D),
             "o": mat(a["o"], cfg.num_heads * cfg.head_size),
             "gate": mat(m["gate"], D), "up": mat(m["up"], D),
             "down": mat(m["down"], cfg.intermediate_size)}
    if cfg.qkv_bias:
      layer.update(q_bias=col(a["q_bias"]), k_bias=col(a["k_bias"]), v_bias=col(a["v_bias"]))
    layers.append(layer)
  embed = jnp.asarray(params["embed"], dt)
  head = embed if cfg.tie_embeddings else mat(params["lm_head"], D)
  return {"embed": embed, "head": head, "final_norm": col(params["final_norm"]["scale"]),
          "layers": tuple(layers)}


def _proj(w, x_DB, layer, name, heads, E):
  """`[heads, E, B]`: the projection `w @ x` plus the layer's `name` bias if any."""
  y = w @ x_DB
  if name + "_bias" in layer:
    y = y + layer[name + "_bias"]
  return y.reshape(heads, E, -1)


def decode_step(cfg: ModelConfig, fm: dict, token_B: jax.Array, cache: KVCache):
  """One new token per row: float32 logits `[V, B]` and the updated cache.

  The same values as `Transformer(cfg).apply(params, token_B[:, None],
  cache=cache)` (whose logits are `[B, 1, V]`), with `fm` from
  `to_feature_major(cfg, params)`. The logits stay vocab-first: transposing
  the head's product would make XLA run it in the slow operand order
  (`sampler.sample_token(..., vocab_first=True)` takes them as they are).
  """
  if not cache.cpu_layout:
    raise ValueError("feature_major.decode_step is the CPU step: it needs the CPU cache layout")
  K, E = cfg.num_kv_heads, cfg.head_size
  H = cfg.num_heads
  B = token_B.shape[0]
  mask_BS = cache.key_mask(1)[:, 0, :]
  cos, sin = rope_tables(cache.positions(1), rope_inv_freq(cfg))  # [B, 1, E/2]
  cos_1fB, sin_1fB = cos[:, 0, :].T[None], sin[:, 0, :].T[None]
  x_DB = jnp.take(fm["embed"], token_B, axis=0).T
  new_k, new_v = [], []
  for i, layer in enumerate(fm["layers"]):
    h_DB = rms_normalize(x_DB, layer["attn_norm"], cfg.rms_norm_eps, axis=0)
    q_HEB = rotate_half(_proj(layer["q"], h_DB, layer, "q", H, E), cos_1fB, sin_1fB, axis=1)
    k_KEB = rotate_half(_proj(layer["k"], h_DB, layer, "k", K, E), cos_1fB, sin_1fB, axis=1)
    v_KEB = _proj(layer["v"], h_DB, layer, "v", K, E)
    ck, cv = cache.k[i], cache.v[i]
    k_BKES = jax.lax.dynamic_update_slice(
        ck, k_KEB.transpose(2, 0, 1)[..., None].astype(ck.dtype), (0, 0, 0, cache.index))
    v_BKSE = jax.lax.dynamic_update_slice(
        cv, v_KEB.transpose(2, 0, 1)[:, :, None, :].astype(cv.dtype), (0, 0, cache.index, 0))
    new_k.append(k_BKES)
    new_v.append(v_BKSE)
    q_BKGE = q_HEB.reshape(K, H // K, E, B).transpose(3, 0, 1, 2)
    out_KGEB = attention.decode_step_cpu(q_BKGE, k_BKES, v_BKSE, mask_BS, batch_last=True)
    out_HEB = out_KGEB.reshape(H * E, B).astype(x_DB.dtype)
    x_DB = x_DB + layer["o"] @ out_HEB
    h_DB = rms_normalize(x_DB, layer["mlp_norm"], cfg.rms_norm_eps, axis=0)
    g_FB = layer["gate"] @ h_DB
    x_DB = x_DB + layer["down"] @ (jax.nn.silu(g_FB) * (layer["up"] @ h_DB))
  x_DB = rms_normalize(x_DB, fm["final_norm"], cfg.rms_norm_eps, axis=0)
  logits_VB = (fm["head"] @ x_DB).astype(jnp.float32)
  return logits_VB, cache.replace(k=tuple(new_k), v=tuple(new_v), index=cache.index + 1)
