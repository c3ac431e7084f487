"""Next-token log-probs from hidden states without the `[N, T, V]` logits.

Axis legend: N rows, T tokens per row, C tokens per chunk, D model width,
V vocab.

At long context the LM head dominates memory: float32 logits are 4 * T * V
bytes per row (600 KB per token for Qwen's V = 151,936), and autodiff keeps
them for the backward pass. With `ModelConfig.logits_chunk = C > 0` the head,
the log-softmax and the pick run over chunks of C tokens in a `lax.scan`
whose body is rematerialised (`jax.checkpoint`), so forward and backward
hold the logits of one chunk: memory O(N * C * V). With C = 0 the whole
row is one chunk, computed exactly as before (the reference).
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from kimi_jax.models.model_config import ModelConfig
from kimi_jax.models.transformer import ACT_BTV, lm_head


def _score(hidden_NCD: jax.Array, head_DV: jax.Array, targets_NC: jax.Array,
           with_argmax: bool):
  """float32 `[N, C]` log p(target) (and bool `[N, C]` target == argmax)."""
  logits = hidden_NCD @ jnp.asarray(head_DV, hidden_NCD.dtype)
  logits = nn.with_logical_constraint(logits.astype(jnp.float32), ACT_BTV)
  # x - logsumexp(x) at the target only: no [N, C, V] log-softmax is written.
  picked = (jnp.take_along_axis(logits, targets_NC[..., None], axis=-1)[..., 0]
            - jax.nn.logsumexp(logits, axis=-1))
  if not with_argmax:
    return picked, None
  return picked, jnp.argmax(logits, axis=-1) == targets_NC


def next_token_logprobs(cfg: ModelConfig, params: dict, hidden_NTD: jax.Array,
                        targets_NT: jax.Array, *, with_argmax: bool = False,
                        chunk: Optional[int] = None):
  """float32 `[N, T]`: log p(targets[:, t] | hidden[:, t]) under the LM head.

  Args:
    cfg: the model (its head: `lm_head`, and `logits_chunk` unless `chunk`).
    params: the model's params.
    hidden_NTD: final-normed hidden states (`Transformer(...,
      return_hidden=True)`), compute dtype.
    targets_NT: int32 token ids scored at each position (usually the next
      token; callers pad the last column with any valid id).
    with_argmax: also return bool `[N, T]`, whether the target is the
      argmax of the logits (greedy accuracy).
    chunk: tokens per chunk; default `cfg.logits_chunk` (0 = one chunk).

  Returns `logp_NT`, or `(logp_NT, argmax_NT)` with `with_argmax`.
  """
  head_DV = lm_head(cfg, params)
  C = cfg.logits_chunk if chunk is None else chunk
  N, T, D = hidden_NTD.shape
  if C <= 0 or C >= T:
    logp, hit = _score(hidden_NTD, head_DV, targets_NT, with_argmax)
    return (logp, hit) if with_argmax else logp
  n_chunks = -(-T // C)
  pad = n_chunks * C - T
  # The pad (< C tokens of zeros) is scored and dropped: cheaper than a
  # ragged last chunk, which would be a second compiled body.
  h = jnp.pad(hidden_NTD, ((0, 0), (0, pad), (0, 0)))
  t = jnp.pad(targets_NT, ((0, 0), (0, pad)))
  h_KNCD = h.reshape(N, n_chunks, C, D).swapaxes(0, 1)
  t_KNC = t.reshape(N, n_chunks, C).swapaxes(0, 1)

  @jax.checkpoint
  def body(head, xs):
    picked, hit = _score(xs[0], head, xs[1], with_argmax)
    return picked if hit is None else (picked, hit)

  out = jax.lax.map(lambda xs: body(head_DV, xs), (h_KNCD, t_KNC))

  def unchunk(x_KNC):
    return x_KNC.swapaxes(0, 1).reshape(N, n_chunks * C)[:, :T]

  if with_argmax:
    return unchunk(out[0]), unchunk(out[1])
  return unchunk(out)
