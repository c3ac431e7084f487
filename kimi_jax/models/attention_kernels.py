"""Causal self-attention over a whole sequence (training, scoring): one entry
point, several implementations.

`sequence_attention(q_BTHE, k_BSKE, v_BSKE, segment_ids_BT=...)` attends
every query t to the keys s <= t of its own nonzero segment (segment 0 is
padding: left padding, or the tail of a packed row). The mask is described
by the segment ids and the causal order; only "xla" (the reference)
materialises it as a dense `[B, T, S]` array. Implementations:

- "xla": einsum + dense mask + softmax (`attention.attend`), the reference.
- "blockwise": pure-JAX flash attention (online softmax over key blocks, a
  FlashAttention-2 backward that recomputes the block probabilities); memory
  O(T * block_size), above-diagonal key blocks skipped. Any backend.
- "splash": TPU Pallas splash attention (`jax.experimental.pallas.ops.tpu.
  splash_attention`); off TPU it runs in Pallas interpret mode (tests).
- "cudnn": cuDNN flash attention via `jax.nn.dot_product_attention`; GPU only,
  no segment ids (see `_cudnn`).
- "auto": `resolve` picks one of the above.

Axis legend as in attention.py: B batch, T queries, S keys (S = T here), H
query heads, K kv heads, G = H // K query heads per kv head (query head h
uses kv head h // G), E head dim. Query rows with no visible key (segment 0)
give zeros, with zero gradients, in every implementation.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp

from kimi_jax import backend as backend_lib
from kimi_jax.models import attention

IMPLEMENTATIONS = ("auto", "xla", "blockwise", "splash", "cudnn")

# "auto" on CPU (and GPU without cuDNN): "blockwise" from this many tokens,
# "xla" below. Forward+backward on 2 CPU cores, B=1, H=12, K=2, E=128,
# fp32, block 512, xla vs blockwise: T=512 0.10 vs 0.10 s (48 vs 51 MB
# compiled temp memory), 1k 0.32 vs 0.20 s (172 vs 86 MB), 2k 2.7 vs 1.2 s
# (646 vs 101 MB), 4k 14.2 vs 2.1 s (2.5 GB vs 130 MB), 8k: xla 9.8 GB
# (killed for memory on a 23 GB host) vs 10.5 s, 218 MB. Below 1k the two
# are even and xla, the reference, is kept.
BLOCKWISE_MIN_LENGTH = 1024
# Splash attention's sequence tiles are multiples of this (TPU lane width).
SPLASH_TILE = 128


def resolve(implementation: str, T: int, *, segmented: bool = False,
            dtype=None) -> str:
  """The concrete implementation `sequence_attention` runs for `implementation`.

  The single backend-dispatch point of the module: only here does
  `backend.platform()` choose an implementation ("splash" and "cudnn"
  themselves look at the backend only to run in interpret mode or to raise).
  "auto" is "splash" on TPU; on GPU "cudnn" where it applies (no segment
  ids, fp16/bf16; else the CPU rule); on CPU "blockwise" when
  T >= BLOCKWISE_MIN_LENGTH, else "xla".

  Args:
    implementation: one of IMPLEMENTATIONS.
    T: sequence length.
    segmented: whether segment ids are given (cuDNN takes none here).
    dtype: the query dtype, or None if unknown (cuDNN takes fp16/bf16 only).
  Raises:
    ValueError: `implementation` is not one of IMPLEMENTATIONS.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {implementation!r}; "
                     f"allowed: {', '.join(map(repr, IMPLEMENTATIONS))}")
  if implementation != "auto":
    return implementation
  backend = backend_lib.platform()
  if backend == "tpu":
    return "splash"
  half = dtype is None or jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if backend == "gpu" and not segmented and half:
    return "cudnn"
  return "blockwise" if T >= BLOCKWISE_MIN_LENGTH else "xla"


def sequence_attention(q_BTHE: jax.Array, k_BSKE: jax.Array, v_BSKE: jax.Array, *,
                       segment_ids_BT: Optional[jax.Array] = None,
                       implementation: str = "auto", block_size: int = 512) -> jax.Array:
  """Causal (and segment-masked) self-attention of a whole sequence.

  Args:
    q_BTHE: queries `[B, T, H, E]`.
    k_BSKE: keys `[B, T, K, E]` (S = T: no cache), H a multiple of K.
    v_BSKE: values `[B, T, K, E]`.
    segment_ids_BT: optional int32 `[B, T]`; key s is visible to query t iff
      s <= t and both are in the same nonzero segment. 0 marks padding; its
      query rows come out as zeros.
    implementation: one of IMPLEMENTATIONS (see the module docstring).
    block_size: query/key block length of "blockwise" and "splash" (capped
      at T; splash rounds it to a multiple of 128 that divides the padded T).
  Returns:
    `[B, T, H, E]` in v's dtype; scores and softmax in float32, scale 1/sqrt(E).
  Raises:
    ValueError: unknown `implementation`, or shapes that do not fit.
    RuntimeError: "cudnn" off GPU.
  """
  B, T, H, E = q_BTHE.shape
  K = k_BSKE.shape[2]
  if k_BSKE.shape != (B, T, K, E) or v_BSKE.shape != k_BSKE.shape or H % K:
    raise ValueError(f"q {q_BTHE.shape}, k {k_BSKE.shape}, v {v_BSKE.shape}: expected "
                     "[B, T, H, E] and [B, T, K, E] with K dividing H")
  if segment_ids_BT is not None and segment_ids_BT.shape != (B, T):
    raise ValueError(f"segment_ids_BT {segment_ids_BT.shape}, expected {(B, T)}")
  impl = resolve(implementation, T, segmented=segment_ids_BT is not None,
                 dtype=q_BTHE.dtype)
  if impl == "cudnn":
    return _cudnn(q_BTHE, k_BSKE, v_BSKE, segment_ids_BT)
  if impl == "splash":
    return _splash(q_BTHE, k_BSKE, v_BSKE, segment_ids_BT, block_size)
  G = H // K
  q_BKGTE = q_BTHE.reshape(B, T, K, G, E).transpose(0, 2, 3, 1, 4)
  if impl == "xla":
    mask_BTS = _dense_mask(segment_ids_BT, B, T)
    out_BKGTE = attention.attend(q_BKGTE, k_BSKE.transpose(0, 2, 3, 1),
                                 v_BSKE.transpose(0, 2, 1, 3), mask_BTS)
    if segment_ids_BT is not None:
      # attend averages all values on rows with nothing visible; zero them as
      # the other implementations do (and their gradients with them).
      out_BKGTE = jnp.where(jnp.any(mask_BTS, -1)[:, None, None, :, None], out_BKGTE, 0)
  else:
    out_BKGTE = _blockwise_padded(q_BKGTE, k_BSKE.transpose(0, 2, 1, 3),
                                  v_BSKE.transpose(0, 2, 1, 3), segment_ids_BT, block_size)
  return out_BKGTE.transpose(0, 3, 1, 2, 4).reshape(B, T, H, E)


def _dense_mask(segment_ids_BT: Optional[jax.Array], B: int, T: int) -> jax.Array:
  """bool `[B, T, T]`: causal, within one segment, never onto segment 0."""
  causal_BTS = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), jnp.bool_))[None], (B, T, T))
  if segment_ids_BT is None:
    return causal_BTS
  return causal_BTS & _same_segment(segment_ids_BT, segment_ids_BT)


def _same_segment(seg_q_BT: jax.Array, seg_k_BS: jax.Array) -> jax.Array:
  """bool `[B, T, S]`: query and key in the same segment, and it is not 0."""
  return (seg_q_BT[:, :, None] == seg_k_BS[:, None, :]) & (seg_k_BS[:, None, :] != 0)


def _pad_time(x: jax.Array, axis: int, to: int) -> jax.Array:
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, to - x.shape[axis])
  return jnp.pad(x, pad)


# ----------------------------------------------------------------- blockwise


def _blockwise_padded(q_BKGTE, k_BKTE, v_BKTE, segment_ids_BT, block_size):
  """`[B, K, G, T, E]` blockwise attention; T padded up to whole blocks.

  Padded positions (at the end) get segment 0: seen by no query, and their
  own rows (dropped) see nothing. Without segment ids every real position
  is segment 1, so one code path serves both.
  """
  B, T = k_BKTE.shape[0], k_BKTE.shape[2]
  bs = max(1, min(block_size, T))
  Tp = -(-T // bs) * bs
  seg_BT = (jnp.ones((B, T), jnp.int32) if segment_ids_BT is None
            else segment_ids_BT.astype(jnp.int32))
  out = _blockwise(_pad_time(q_BKGTE, 3, Tp), _pad_time(k_BKTE, 2, Tp),
                   _pad_time(v_BKTE, 2, Tp), _pad_time(seg_BT, 1, Tp), bs)
  return out[:, :, :, :T]


def _block(x, i, bs, axis):
  return jax.lax.dynamic_slice_in_dim(x, i * bs, bs, axis)


def _scores_visible(q_BKGQE, k_BKSE, seg_q_BQ, seg_k_BS, i, j, bs):
  """float32 scaled scores `[B, K, G, Q, S]` of query block i against key
  block j, and where they are visible (bool, broadcastable to them)."""
  s = jnp.einsum("bkgqe,bkse->bkgqs", q_BKGQE, k_BKSE.astype(q_BKGQE.dtype),
                 preferred_element_type=jnp.float32) * (1.0 / math.sqrt(q_BKGQE.shape[-1]))
  pos = jnp.arange(bs)
  causal_QS = (i * bs + pos)[:, None] >= (j * bs + pos)[None, :]
  visible = causal_QS[None] & _same_segment(seg_q_BQ, seg_k_BS)
  return s, visible[:, None, None]


def _forward(q, k, v, seg, bs):
  """Online-softmax forward: out `[B, K, G, T, E]` (v's dtype) and float32
  logsumexp `[B, K, G, T]` (0 on rows with no visible key)."""
  nq = q.shape[3] // bs

  def query_block(i):
    q_i, seg_i = _block(q, i, bs, 3), _block(seg, i, bs, 1)

    def key_block(j, carry):
      m, l, acc = carry
      s, vis = _scores_visible(q_i, _block(k, j, bs, 2), seg_i, _block(seg, j, bs, 1), i, j, bs)
      m_new = jnp.maximum(m, jnp.max(jnp.where(vis, s, attention._NEG), axis=-1))
      # Masked entries are zeroed explicitly rather than by a -inf fill, so
      # a row with nothing visible yet keeps l = 0 and stays finite.
      p = jnp.where(vis, jnp.exp(s - m_new[..., None]), 0.0)
      corr = jnp.exp(m - m_new)
      pv = jnp.einsum("bkgqs,bkse->bkgqe", p.astype(v.dtype), _block(v, j, bs, 2),
                      preferred_element_type=jnp.float32)
      return m_new, l * corr + jnp.sum(p, axis=-1), acc * corr[..., None] + pv

    init = (jnp.full(q_i.shape[:-1], attention._NEG, jnp.float32),
            jnp.zeros(q_i.shape[:-1], jnp.float32), jnp.zeros(q_i.shape, jnp.float32))
    # Key blocks past the diagonal are fully masked by causality: the loop
    # stops at block i (a while loop with a traced bound).
    m, l, acc = jax.lax.fori_loop(0, i + 1, key_block, init)
    empty = l == 0
    out = acc / jnp.where(empty, 1.0, l)[..., None]
    return out.astype(v.dtype), jnp.where(empty, 0.0, m + jnp.log(jnp.where(empty, 1.0, l)))

  out, lse = jax.lax.map(query_block, jnp.arange(nq))  # [nq, B, K, G, bs, (E)]
  B, K, G, Tp, E = q.shape
  out = jnp.moveaxis(out, 0, 3).reshape(B, K, G, Tp, v.shape[-1])
  return out, jnp.moveaxis(lse, 0, 3).reshape(B, K, G, Tp)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blockwise(q, k, v, seg, bs):
  """q `[B, K, G, T, E]`, k/v `[B, K, T, E]`, seg int32 `[B, T]`, T % bs == 0."""
  return _forward(q, k, v, seg, bs)[0]


def _blockwise_fwd(q, k, v, seg, bs):
  out, lse = _forward(q, k, v, seg, bs)
  return out, (q, k, v, seg, out, lse)


def _blockwise_bwd(bs, res, dout):
  """FlashAttention-2 backward: for each key block j, the query blocks
  i >= j recompute their probabilities from the saved logsumexp; dk_j, dv_j
  accumulate in the loop and dq in one `[B, K, G, T, E]` float32 carry."""
  q, k, v, seg, out, lse = res
  scale = 1.0 / math.sqrt(q.shape[-1])
  nk = k.shape[2] // bs
  # D_i = rowsum(dO * O): the softmax Jacobian's diagonal term.
  D = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)

  def key_block(dq, j):
    k_j, v_j, seg_j = _block(k, j, bs, 2), _block(v, j, bs, 2), _block(seg, j, bs, 1)

    def query_block(i, carry):
      dq, dk, dv = carry
      q_i, do_i = _block(q, i, bs, 3), _block(dout, i, bs, 3)
      s, vis = _scores_visible(q_i, k_j, _block(seg, i, bs, 1), seg_j, i, j, bs)
      p = jnp.where(vis, jnp.exp(s - _block(lse, i, bs, 3)[..., None]), 0.0)
      dv = dv + jnp.einsum("bkgqs,bkgqe->bkse", p.astype(do_i.dtype), do_i,
                           preferred_element_type=jnp.float32)
      dp = jnp.einsum("bkgqe,bkse->bkgqs", do_i, v_j.astype(do_i.dtype),
                      preferred_element_type=jnp.float32)
      ds = p * (dp - _block(D, i, bs, 3)[..., None]) * scale
      dk = dk + jnp.einsum("bkgqs,bkgqe->bkse", ds.astype(q.dtype), q_i,
                           preferred_element_type=jnp.float32)
      dq_i = jnp.einsum("bkgqs,bkse->bkgqe", ds.astype(k.dtype), k_j,
                        preferred_element_type=jnp.float32)
      dq = jax.lax.dynamic_update_slice_in_dim(dq, _block(dq, i, bs, 3) + dq_i, i * bs, 3)
      return dq, dk, dv

    zeros = jnp.zeros(k_j.shape, jnp.float32)
    # Query blocks before j see none of key block j (causality).
    dq, dk, dv = jax.lax.fori_loop(j, q.shape[3] // bs, query_block, (dq, zeros, zeros))
    return dq, (dk, dv)

  dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(q.shape, jnp.float32), jnp.arange(nk))
  B, K, Tp, E = k.shape
  dk = jnp.moveaxis(dk, 0, 2).reshape(B, K, Tp, E)
  dv = jnp.moveaxis(dv, 0, 2).reshape(B, K, Tp, v.shape[-1])
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


# ---------------------------------------------------------- splash / cudnn


def _splash(q_BTHE, k_BSKE, v_BSKE, segment_ids_BT, block_size):
  """Splash attention: MQA kernels (G query heads on one kv head) vmapped
  over kv heads and batch.

  T is padded at the end to a multiple of SPLASH_TILE (padding positions in
  segment 0; causality already hides them from real queries when there are
  no segment ids). All splash block sizes are one b = gcd(padded T,
  min(block_size, padded T) rounded down to a multiple of 128, at least
  128): a multiple of 128 dividing padded T (by default 512 for T a
  multiple of 512). Off TPU the kernel runs in Pallas interpret mode (slow:
  for tests). Splash's segment mask is equality only, so segment-0 rows see
  segment-0 keys; those rows are zeroed afterwards.
  """
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  B, T, H, E = q_BTHE.shape
  K = k_BSKE.shape[2]
  G = H // K
  Tp = -(-T // SPLASH_TILE) * SPLASH_TILE
  b = math.gcd(Tp, max(SPLASH_TILE, min(block_size, Tp) // SPLASH_TILE * SPLASH_TILE))
  sizes = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                            block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b,
                            block_kv_dq=b)
  mask = splash.MultiHeadMask([splash.CausalMask((Tp, Tp))] * G)
  kernel = splash.make_splash_mqa_single_device(
      mask, block_sizes=sizes, interpret=backend_lib.platform() != "tpu")
  # Splash takes queries unscaled: scale them here.
  q_BKGTE = (q_BTHE * jnp.asarray(1.0 / math.sqrt(E), q_BTHE.dtype)).reshape(
      B, T, K, G, E).transpose(0, 2, 3, 1, 4)
  q_BKGTE = _pad_time(q_BKGTE, 3, Tp)
  k_BKTE = _pad_time(k_BSKE.transpose(0, 2, 1, 3).astype(q_BTHE.dtype), 2, Tp)
  v_BKTE = _pad_time(v_BSKE.transpose(0, 2, 1, 3).astype(q_BTHE.dtype), 2, Tp)
  if segment_ids_BT is None:
    per_head = lambda q, k, v, seg: kernel(q, k, v)
    seg_BT = jnp.zeros((B, Tp), jnp.int32)  # unused
  else:
    seg_BT = _pad_time(segment_ids_BT.astype(jnp.int32), 1, Tp)
    per_head = lambda q, k, v, seg: kernel(q, k, v, segment_ids=splash.SegmentIds(seg, seg))
  per_row = jax.vmap(per_head, in_axes=(0, 0, 0, None))
  out_BKGTE = jax.vmap(per_row)(q_BKGTE, k_BKTE, v_BKTE, seg_BT)[:, :, :, :T]
  out_BKGTE = out_BKGTE.astype(v_BSKE.dtype)
  if segment_ids_BT is not None:
    out_BKGTE = jnp.where((segment_ids_BT != 0)[:, None, None, :, None], out_BKGTE, 0)
  return out_BKGTE.transpose(0, 3, 1, 2, 4).reshape(B, T, H, v_BSKE.shape[-1])


def _cudnn(q_BTHE, k_BSKE, v_BSKE, segment_ids_BT):
  """cuDNN flash attention, causal by `is_causal`.

  jax 0.10.2's `jax.nn.dot_product_attention` takes no segment ids (only
  right-padding lengths, which express neither packing nor left padding),
  so segment ids are refused rather than approximated ("auto" then picks
  blockwise or xla). cuDNN takes fp16/bf16 only; jax raises for others.
  """
  backend = backend_lib.platform()
  if backend != "gpu":
    raise RuntimeError(f"implementation='cudnn' needs a GPU (cuDNN); jax.default_backend() "
                       f"is {backend!r}; use 'blockwise' or 'auto'")
  if segment_ids_BT is not None:
    raise NotImplementedError("implementation='cudnn' takes no segment_ids_BT (jax."
                              "nn.dot_product_attention has none); use 'blockwise'")
  out = jax.nn.dot_product_attention(q_BTHE, k_BSKE, v_BSKE, is_causal=True,
                                     scale=1.0 / math.sqrt(q_BTHE.shape[-1]),
                                     implementation="cudnn")
  return out.astype(v_BSKE.dtype)
