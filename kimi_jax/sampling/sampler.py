"""Jitted prefill + decode over an explicit KV cache.

Axis legend: B batch (rows), P prompt slots, N new-token slots, V vocab.

The sampler knows nothing about RL: it turns left-padded prompts into new
tokens and their log-probs. `generate` is the list-in/list-out convenience
API; `decode` is its array-level jitted function. Both decode through
`decode_loop.decode_tokens`, the loop the rollout segment runs too, and
prefill through `prefill`, which the segment shares.

Static shapes: the batch, the prompt length and the number of new tokens are
rounded up to buckets (powers of two), so repeated calls with prompts that
fall in the same buckets reuse one compiled program. `max_new_tokens` and
`eos_id` are traced values, so changing them within a bucket does not
recompile either.

Sharding: `decode(..., layout=...)` / `generate(..., layout=...)` with the
sampling `parallel.Layout` split rows over the data axes and heads over
`tensor` (params must already be in that layout, see `parallel.reshard`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kimi_jax import decode_jit, distributed
from kimi_jax.models import layer_stack
from kimi_jax.models.kv_cache import KVCache
from kimi_jax.models.transformer import ModelConfig, Transformer, init_cache
from kimi_jax.sampling import decode_loop, phases

if TYPE_CHECKING:
  from kimi_jax.parallel import Layout

NO_EOS = -1  # eos id meaning "never stop early"
# `decode`'s default number of cache phases: bench/decode.py's model, B=32
# and 16, 256 new tokens: 4 phases +11% tokens/s over 1 (8: +13%, but the
# compile grows 7.7 -> 9.5 -> 13 s).
DECODE_PHASES = 4


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How one token is drawn from the logits (a jit static: changing it recompiles).

  temperature: 0 means greedy (argmax).
  top_k: keep the k most likely tokens (0 = off).
  top_p: nucleus sampling mass (1.0 = off).
  """
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"SamplingConfig.temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"SamplingConfig.top_k must be >= 0, got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {self.top_p}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def sample_token(logits_BV: jax.Array, rng: jax.Array, cfg: SamplingConfig, *,
                 vocab_first: bool = False):
  """Draw one token per row.

  Returns `(token_B int32, logp_B float32)`, where `logp_B` is the token's
  log-probability under softmax(logits / temperature) before top-k/top-p
  truncation (under softmax(logits) when greedy), i.e. the policy's
  probability at that temperature.

  vocab_first: the logits are `[V, B]` (the feature-major decode step of
  `models.feature_major`), and every reduction runs along axis 0; the draw
  is the same as for the transposed `[B, V]` logits with the same key. Not
  done by transposing the logits: XLA moves such a transpose into the
  head's matmul, which then runs in Eigen's slow operand order.
  """
  axis = 0 if vocab_first else 1
  logits = logits_BV.astype(jnp.float32)

  def at(x, index_B):
    return jnp.take_along_axis(x, jnp.expand_dims(index_B, axis), axis=axis).squeeze(axis)

  if cfg.greedy:
    token_B = jnp.argmax(logits, axis=axis).astype(jnp.int32)
    return token_B, at(jax.nn.log_softmax(logits, axis=axis), token_B)
  scaled = logits / cfg.temperature
  logp = jax.nn.log_softmax(scaled, axis=axis)
  masked = scaled
  neg = jnp.finfo(jnp.float32).min
  if cfg.top_k:
    if vocab_first:  # lax.top_k works along the last axis only
      kth = jax.lax.slice_in_dim(jnp.sort(scaled, axis=0), scaled.shape[0] - cfg.top_k,
                                 scaled.shape[0] - cfg.top_k + 1, axis=0)
    else:
      kth = jax.lax.top_k(scaled, cfg.top_k)[0][:, -1:]
    masked = jnp.where(scaled < kth, neg, masked)
  if cfg.top_p < 1.0:
    descending = jnp.flip(jnp.sort(masked, axis=axis), axis=axis)
    probs = jax.nn.softmax(descending, axis=axis)
    # Keep a token while the mass strictly before it is below top_p, so the
    # most likely token always survives.
    mass_before = jnp.cumsum(probs, axis=axis) - probs
    keep_count_B = jnp.sum(mass_before < cfg.top_p, axis=axis)
    threshold = jnp.expand_dims(at(descending, keep_count_B - 1), axis)
    masked = jnp.where(masked < threshold, neg, masked)
  if vocab_first:
    # jax.random.categorical's Gumbel-max draw, with the noise of the [B, V] call.
    noise = jax.random.gumbel(rng, masked.shape[::-1], masked.dtype).T
    token_B = jnp.argmax(masked + noise, axis=0).astype(jnp.int32)
  else:
    token_B = jax.random.categorical(rng, masked, axis=-1).astype(jnp.int32)
  return token_B, at(logp, token_B)


def pin_cache(cache: KVCache, layout: Optional["Layout"]) -> KVCache:
  """The KV cache in the layout's shardings (rows over data, kv heads over
  tensor); unchanged without a layout."""
  if layout is None:
    return cache
  return jax.lax.with_sharding_constraint(cache, layout.kv_cache(cache.start.shape[0],
                                                                 cache.length))


def prefill(model: Transformer, params, tokens_BP: jax.Array, cache: KVCache):
  """Encode left-padded prompts into `cache`; returns (last logits `[B, V]`, cache).

  With `model.cfg.prefill_chunk = C` (0 < C < P) the P tokens go in as a
  first call of the P mod C leading tokens (if any) and a `lax.scan` of
  P // C calls of C tokens, each attending over the cache so far: the
  attention scores are `[B, H, C, S]` instead of `[B, H, P, S]` and the
  activations those of C tokens, so prefill memory grows linearly with P.
  Same cache and logits as one call, up to float rounding.
  """
  C = model.cfg.prefill_chunk
  P = tokens_BP.shape[1]
  if C <= 0 or C >= P:
    logits_B1V, cache = model.apply({"params": params}, tokens_BP, cache=cache, last_only=True)
    return logits_B1V[:, 0, :], cache
  head = P % C
  if head:
    _, cache = model.apply({"params": params}, tokens_BP[:, :head], cache=cache, last_only=True)
  chunks_KBC = tokens_BP[:, head:].reshape(tokens_BP.shape[0], P // C, C).swapaxes(0, 1)

  def one_chunk(cache, tokens_BC):
    logits_B1V, cache = model.apply({"params": params}, tokens_BC, cache=cache, last_only=True)
    return cache, logits_B1V[:, 0, :]

  # The logits of every chunk are stacked ([K, B, V], small); the last is kept.
  cache, logits_KBV = jax.lax.scan(one_chunk, cache, chunks_KBC)
  return logits_KBV[-1], cache


@decode_jit.decode_jit(static_argnames=("cfg", "sampling", "new_slots", "layout",
                                        "decode_phases"))
def decode(params, tokens_BP: jax.Array, start_B: jax.Array, max_new_tokens: jax.Array,
           eos_id: jax.Array, rng: jax.Array, *, cfg: ModelConfig, sampling: SamplingConfig,
           new_slots: int, layout: Optional["Layout"] = None,
           decode_phases: int = DECODE_PHASES):
  """Prefill left-padded prompts, then decode up to `max_new_tokens` tokens.

  Args:
    params: model parameters.
    tokens_BP: int32 left-padded prompts; row b's prompt occupies
      `tokens_BP[b, start_B[b]:]`.
    start_B: int32 first prompt slot of each row.
    max_new_tokens: int32 scalar <= `new_slots`.
    eos_id: int32 scalar; `NO_EOS` disables early stopping.
    rng: PRNG key.
    cfg, sampling, new_slots: static (model, sampling rule, output buffer size).
    layout: static sampling `parallel.Layout` or None (one device / no
      constraints). B must divide over its data axes.
    decode_phases: static, decode over a KV cache grown in this many steps
      (`phases.phase_slots`): early tokens attend over fewer slots, for one
      more copy of the decode loop per phase in the compiled program.

  Returns:
    tokens_BN int32 new tokens (0 after a row's eos), logp_BN float32 their
    log-probs (0 after eos), num_new_B int32 tokens generated per row
    (eos included).
  """
  bounds = phases.phase_slots(tokens_BP.shape[1], new_slots, decode_phases)
  if layout is None:
    return _decode(params, tokens_BP, start_B, max_new_tokens, eos_id, rng, cfg, sampling,
                   new_slots, bounds, None)
  if layout.cfg != cfg:
    raise ValueError("decode: layout.cfg differs from cfg (the layout was built for another model)")
  layout.kv_cache(tokens_BP.shape[0], bounds[-1])  # checks that B divides
  with layout.activate():
    tokens_BP, start_B = jax.lax.with_sharding_constraint((tokens_BP, start_B), layout.batch())
    return _decode(params, tokens_BP, start_B, max_new_tokens, eos_id, rng, cfg, sampling,
                   new_slots, bounds, layout)


def _decode(params, tokens_BP, start_B, max_new_tokens, eos_id, rng, cfg, sampling, new_slots,
            bounds, layout):
  """`decode`'s body over the cache sizes `bounds`; `layout` (or None) pins the
  cache. The loop is `decode_loop.decode_tokens`, the rollouts' loop, with one
  limit for every row and no repeat detector."""
  B = tokens_BP.shape[0]
  place = functools.partial(pin_cache, layout=layout)
  cache = place(init_cache(cfg, B, bounds[0], start=start_B))
  logits_BV, cache = prefill(Transformer(cfg), params, tokens_BP, cache)
  step, vocab_first = decode_loop.one_token_step(cfg, params, layout is not None)
  out = decode_loop.decode_tokens(
      step, vocab_first, functools.partial(sample_token, cfg=sampling), logits_BV, cache, rng,
      eos_id, new_slots=new_slots, bounds=bounds,
      limit_B=jnp.full((B,), max_new_tokens, jnp.int32), place=place)
  return out.tokens_BN, out.logp_BN, out.count_B


def bucket(n: int, minimum: int = 8) -> int:
  """Smallest power of two >= max(n, minimum): the static size used for n."""
  size = minimum
  while size < n:
    size *= 2
  return size


def left_pad(prompts: Sequence[Sequence[int]], rows: int, length: int, pad_id: int = 0):
  """Left-pad prompts into int32 `[rows, length]`; returns (tokens, start)."""
  tokens = np.full((rows, length), pad_id, np.int32)
  start = np.full((rows,), length - 1, np.int32)
  for b, p in enumerate(prompts):
    tokens[b, length - len(p):] = p
    start[b] = length - len(p)
  return tokens, start


def generate(cfg: ModelConfig, params, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             temperature: float = 0.0, seed: int = 0, eos_id: Optional[int] = None, *,
             top_k: int = 0, top_p: float = 1.0, max_length: Optional[int] = None,
             return_logprobs: bool = False, layout: Optional["Layout"] = None,
             decode_phases: int = DECODE_PHASES):
  """Generate continuations for a batch of token-id prompts.

  Args:
    cfg, params: the model.
    prompts: list of non-empty token-id lists (any lengths).
    max_new_tokens: tokens to generate per prompt (fewer if eos comes first).
    temperature: 0 = greedy; otherwise sampling at this temperature.
    seed: PRNG seed for sampling.
    eos_id: stop a row after it emits this token (the eos is returned).
    top_k, top_p: optional truncation of the sampling distribution.
    max_length: limit on prompt + new tokens; default
      `cfg.max_position_embeddings`. A longer request raises ValueError.
    return_logprobs: also return each token's log-prob (see `sample_token`).
    layout: the sampling `parallel.Layout` that `params` are in, or None.
      Rows are padded to a multiple of its data-parallel size.
    decode_phases: decode over a KV cache grown in this many steps (see
      `decode`); changing it recompiles.

  Returns:
    A list of generated token-id lists, one per prompt (and a matching list of
    log-prob lists when `return_logprobs`).
  """
  sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if not prompts:
    raise ValueError("generate() needs at least one prompt")
  if cfg.scan_layers:
    # Decode runs unrolled: a scan over stacked weights slices every weight
    # and restacks the cache every step (the training form, not a decode one).
    # Params resharded into a sample layout are unrolled already.
    params = layer_stack.to_layer_form(False, cfg.num_layers, params)
    cfg = cfg.replace(scan_layers=False)
  limit = cfg.max_position_embeddings if max_length is None else max_length
  for i, p in enumerate(prompts):
    if len(p) == 0:
      raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
    if len(p) + max_new_tokens > limit:
      raise ValueError(
          f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} that "
          f"exceeds the maximum length {limit} (prompt + new tokens)")
  rows = bucket(len(prompts), minimum=1 if layout is None else layout.batch_shards)
  tokens, start = left_pad(prompts, rows, bucket(max(len(p) for p in prompts)))
  out, logp, num_new = decode(
      params, tokens, start, np.int32(max_new_tokens),
      np.int32(NO_EOS if eos_id is None else eos_id), jax.random.PRNGKey(seed),
      cfg=cfg, sampling=sampling, new_slots=bucket(max_new_tokens), layout=layout,
      decode_phases=decode_phases)
  # Whole arrays on every process (a multi-process layout splits the rows).
  out, logp, num_new = distributed.fetch((out, logp, num_new))
  seqs = [out[b, :num_new[b]].tolist() for b in range(len(prompts))]
  if return_logprobs:
    return seqs, [logp[b, :num_new[b]].tolist() for b in range(len(prompts))]
  return seqs
