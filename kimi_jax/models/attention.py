"""Attention over a KV cache: softmax(q.k / sqrt(E)) . v with a `[B, T, S]` key mask.

Axis legend: B batch, T queries, S key slots, K kv heads, G query heads per
kv head, E head dim, H = K * G. `attend_cache` reads the accelerator cache
layout (keys and values `[B, S, K, E]`); the rest is the CPU layout's (keys
`[B, K, E, S]`, values `[B, K, S, E]`, see kv_cache.py) and its one-token
decode step. Masked slots get a finite fill so fully masked rows (left
padding) stay free of NaNs. Attention without a cache (training, scoring)
is `attention_kernels.sequence_attention`.
"""
from __future__ import annotations

import contextlib
import contextvars
import math

import jax
import jax.numpy as jnp

_NEG = float(jnp.finfo(jnp.float32).min)


def attend_cache(q_BTHE: jax.Array, k_BSKE: jax.Array, v_BSKE: jax.Array,
                 mask_BTS: jax.Array) -> jax.Array:
  """`[B, T, H, E]` (v's dtype) attention over a cache in the accelerator layout;
  scores and softmax in float32 (the einsums XLA TPU / GPU tile directly)."""
  B, T, H, E = q_BTHE.shape
  K = k_BSKE.shape[2]
  q_BTKGE = q_BTHE.reshape(B, T, K, H // K, E)
  scores = jnp.einsum("btkge,bske->bkgts", q_BTKGE, k_BSKE.astype(q_BTHE.dtype),
                      preferred_element_type=jnp.float32)
  probs = _probs(scores, mask_BTS[:, None, None, :, :], E, v_BSKE.dtype)
  return jnp.einsum("bkgts,bske->btkge", probs, v_BSKE).reshape(B, T, H, E)


def attend(q_BKGTE: jax.Array, k_BKES: jax.Array, v_BKSE: jax.Array,
           mask_BTS: jax.Array) -> jax.Array:
  """`[B, K, G, T, E]` (v's dtype) attention over a cache in the CPU layout;
  scores and softmax in float32."""
  scores = jnp.einsum("bkgte,bkes->bkgts", q_BKGTE, k_BKES.astype(q_BKGTE.dtype),
                      preferred_element_type=jnp.float32)
  probs = _probs(scores, mask_BTS[:, None, None, :, :], q_BKGTE.shape[-1], v_BKSE.dtype)
  return jnp.einsum("bkgts,bkse->bkgte", probs, v_BKSE)


def _probs(scores: jax.Array, visible: jax.Array, head_dim: int, dtype) -> jax.Array:
  """softmax over the last axis of the scaled float32 `scores` where `visible`
  (broadcast), cast to `dtype`."""
  scores = jnp.where(visible, scores * (1.0 / math.sqrt(head_dim)), _NEG)
  return jax.nn.softmax(scores, axis=-1).astype(dtype)


def _chunk(n: int, upto: int, min_parts: int = 1) -> int:
  """The largest divisor c <= upto of n with n // c >= min_parts (1 if none)."""
  return max((c for c in range(2, min(n, upto) + 1) if n % c == 0 and n // c >= min_parts),
             default=1)


# Contraction chunk sizes of the two decode-step products (see decode_step_cpu).
QK_CHUNK = 16
PV_CHUNK = 8
# Reductions longer than this become reduce-window + reduce in XLA CPU
# (its TreeReductionRewriter's window size); see decode_values.
_TREE_REDUCE_WINDOW = 32


def decode_scores(q_BKGE: jax.Array, k_BKES: jax.Array, chunk: int = QK_CHUNK) -> jax.Array:
  """float32 `[B, K, G, S]` q.k of one new query per row.

  The contraction over E runs as `chunk`-term multiply-adds (one elementwise
  loop over the cache, vectorised along the contiguous slot axis), then a sum
  over the E / chunk partial results. With `chunk >= E` (one partial) it is
  a single loop that XLA fuses into the mask and the softmax.
  """
  c = _chunk(q_BKGE.shape[-1], chunk)
  q = q_BKGE.astype(jnp.float32)
  k = k_BKES.astype(jnp.float32)
  # Strided slices, not a reshape of the cache: XLA fused a reshape of the
  # freshly updated cache with its update and copied the cache every step.
  acc = q[..., 0::c, None] * k[:, :, None, 0::c, :]
  for j in range(1, c):
    acc = acc + q[..., j::c, None] * k[:, :, None, j::c, :]
  return jnp.sum(acc, axis=3)


def decode_values(p_BKGS: jax.Array, v_BKSE: jax.Array, chunk: int = PV_CHUNK,
                  batch_last: bool = False) -> jax.Array:
  """`[B, K, G, E]` p.v of one query per row: up-to-`chunk`-term multiply-adds
  over slots (vectorised along E), then a sum over the S / c partial results.

  batch_last: return `[K, G, E, B]`, made by the closing sum itself (a
  separate transpose of the result would be folded by XLA into the matmul
  that consumes it, in Eigen's slow operand order; see feature_major.py).

  c is the largest divisor of S up to `chunk` that leaves more than
  `_TREE_REDUCE_WINDOW` partials: XLA CPU rewrites longer reductions into
  reduce-window + reduce, which stores the partials and sums them in a
  separate loop (fast), while a shorter one is fused into the product loop
  (2-5x slower here: at 256 slots with c = 8, i.e. 32 partials, the decode
  attention took 2.35 ms instead of 1.0). Without such a c >= 2 (e.g. S <=
  64, or S odd) the einsum is used.
  """
  c = _chunk(p_BKGS.shape[-1], chunk, min_parts=_TREE_REDUCE_WINDOW + 1)
  if c == 1:
    return jnp.einsum("bkgs,bkse->" + ("kgeb" if batch_last else "bkge"), p_BKGS, v_BKSE)
  acc = p_BKGS[..., 0::c, None] * v_BKSE[:, :, None, 0::c, :]
  for j in range(1, c):
    acc = acc + p_BKGS[..., j::c, None] * v_BKSE[:, :, None, j::c, :]
  if batch_last:  # [B, K, G, S/c, E] -> sum over S/c into [K, G, E, B]
    return jnp.sum(acc.transpose(1, 2, 4, 3, 0), axis=3)
  return jnp.sum(acc, axis=3)


_CPU_DECODE_PROGRAM = contextvars.ContextVar("kimi_jax_cpu_decode_program", default=False)


@contextlib.contextmanager
def cpu_decode_program():
  """Marks the tracing of a CPU decode program compiled with Eigen matmuls.

  `decode_jit` enters it for the programs it compiles without YNNPACK
  (`sampling.generate`); under it `decode_step_cpu` uses the chunked
  products and the sampler the feature-major decode step
  (`models.feature_major`), the forms measured fastest with Eigen."""
  token = _CPU_DECODE_PROGRAM.set(True)
  try:
    yield
  finally:
    _CPU_DECODE_PROGRAM.reset(token)


def in_cpu_decode_program() -> bool:
  """True while tracing under `cpu_decode_program()`."""
  return _CPU_DECODE_PROGRAM.get()


def decode_step_cpu(q_BKGE: jax.Array, k_BKES: jax.Array, v_BKSE: jax.Array,
                    mask_BS: jax.Array, batch_last: bool = False) -> jax.Array:
  """`[B, K, G, E]` (v's dtype) attention of one new query per row over the cache
  (`[K, G, E, B]` with `batch_last`, see `decode_values`).

  The CPU form of `attend` for T = 1; which form depends on the XLA options
  of the program being traced:
  - Under `cpu_decode_program()` (programs compiled with Eigen matmuls, i.e.
    `sampling.generate`): XLA CPU would run both einsums as B*K tiny matmuls
    ([G, E] x [E, S] and [G, S] x [S, E]), the p.v on one thread; written as
    chunked multiply-adds (`decode_scores`, `decode_values`) they become
    loops that XLA vectorises and splits over the cores. The sum closing
    q.k also keeps XLA from fusing the whole q.k into both consumers of the
    scores (the max and the exp of the softmax), i.e. computing it twice.
    bench/decode.py's model (B=32, 2 kv heads x 4 groups, E=64, 384 slots),
    per layer and step, isolated: 1.84 ms for the form below, 1.11 ms
    chunked; other chunk sizes were slower (q.k 2, 4: 1.60, 1.51 ms; p.v 4,
    12, 16: 1.70, 3.42, 3.56 ms), and so was keeping keys [B, K, S, E] and
    reducing over E (1.39-2.50 ms). Whole decode at B=32: 1214 -> 1437
    tokens/s (alternating, 3 rounds).
  - Otherwise (the rollout segment, compiled with XLA's default YNNPACK
    fusions): q.k unrolled over E and fused with mask and softmax, p.v as
    an einsum. The chunked form was 2x slower there (bench/rl_iteration's
    rollout, 128 rows: 3.38 vs 1.62 s) and the plain einsums about equal.
  """
  E = q_BKGE.shape[-1]
  chunked = in_cpu_decode_program()
  scores = decode_scores(q_BKGE, k_BKES, chunk=QK_CHUNK if chunked else E)
  probs = _probs(scores, mask_BS[:, None, None, :], E, v_BKSE.dtype)
  if chunked:
    return decode_values(probs, v_BKSE, batch_last=batch_last)
  return jnp.einsum("bkgs,bkse->" + ("kgeb" if batch_last else "bkge"), probs, v_BKSE)
