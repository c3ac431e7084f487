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
from kimi_jax.models import vision as vision_lib
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


def encode_images(model: Transformer, params, pixels_BSYXC: jax.Array) -> jax.Array:
  """Image features `[B, S, Pi, D]` (Pi placeholders per image) of the S
  image slots of each row, float32 pixels `[B, S, Y, X, C]`; computed once
  per prefill, however many calls the prefill makes."""
  B, S = pixels_BSYXC.shape[:2]
  pixels_NYXC = pixels_BSYXC.reshape((B * S,) + pixels_BSYXC.shape[2:])
  feats_NPD = model.apply({"params": params}, pixels_NYXC, method=Transformer.encode_images)
  return feats_NPD.reshape((B, S) + feats_NPD.shape[1:])


def prompt_positions(start_B: jax.Array, prompt_len_B: jax.Array, width: int) -> jax.Array:
  """bool `[B, W]`: the prompt slots of left-padded rows whose prompt starts
  at `start_B` (the tokens after it are a response so far)."""
  idx_BW = jnp.arange(width, dtype=jnp.int32)[None, :] - start_B[:, None]
  return (idx_BW >= 0) & (idx_BW < prompt_len_B[:, None])


def prefill(model: Transformer, params, tokens_BP: jax.Array, cache: KVCache,
            image_features_BSPD: Optional[jax.Array] = None,
            image_prompt_BP: Optional[jax.Array] = None):
  """Encode left-padded prompts into `cache`; returns (last logits `[B, V]`, cache).

  With `model.cfg.prefill_chunk = C` (0 < C < P) the P tokens go in as a
  first call of the P mod C leading tokens (if any) and a `lax.scan` of
  P // C calls of C tokens, each attending over the cache so far: the
  attention scores are `[B, H, C, S]` instead of `[B, H, P, S]` and the
  activations those of C tokens, so prefill memory grows linearly with P.
  Same cache and logits as one call, up to float rounding.

  Image + text: `image_features_BSPD` (`encode_images`) are each row's S
  image slots; the placeholders among `image_prompt_BP` (bool, default
  every slot) take them in order, across chunks too (each chunk starts at
  the placeholders counted so far).
  """
  C = model.cfg.prefill_chunk
  B, P = tokens_BP.shape
  images = image_features_BSPD is not None
  # Text only: the mask and the placeholder count are None, so neither is
  # computed nor carried through the chunk scan.
  prompt_BP = offset_B = None
  if images:
    prompt_BP = jnp.ones((B, P), bool) if image_prompt_BP is None else image_prompt_BP
    offset_B = jnp.zeros((B,), jnp.int32)

  def call(tokens_BT, prompt_BT, offset_B, cache):
    kw = {}
    if images:
      S, Pi, D = image_features_BSPD.shape[1:]
      kw = dict(image_features=image_features_BSPD.reshape(B * S, Pi, D), images_per_row=S,
                image_prompt_BT=prompt_BT, image_offset_B=offset_B)
      offset_B = offset_B + jnp.sum((tokens_BT == model.cfg.image_token_id) & prompt_BT, axis=1,
                                    dtype=jnp.int32)
    logits_B1V, cache = model.apply({"params": params}, tokens_BT, cache=cache, last_only=True,
                                    **kw)
    return logits_B1V[:, 0, :], cache, offset_B

  if C <= 0 or C >= P:
    logits_BV, cache, _ = call(tokens_BP, prompt_BP, offset_B, cache)
    return logits_BV, cache
  head = P % C
  if head:
    head_prompt = None if prompt_BP is None else prompt_BP[:, :head]
    _, cache, offset_B = call(tokens_BP[:, :head], head_prompt, offset_B, cache)

  def chunks(x_BP):
    return None if x_BP is None else x_BP[:, head:].reshape(B, P // C, C).swapaxes(0, 1)

  def one_chunk(carry, xs):
    cache, offset_B = carry
    logits_BV, cache, offset_B = call(*xs, offset_B, cache)
    return (cache, offset_B), logits_BV

  # The logits of every chunk are stacked ([K, B, V], small); the last is kept.
  (cache, _), logits_KBV = jax.lax.scan(one_chunk, (cache, offset_B),
                                        (chunks(tokens_BP), chunks(prompt_BP)))
  return logits_KBV[-1], cache


@decode_jit.decode_jit(static_argnames=("cfg", "sampling", "new_slots", "layout",
                                        "decode_phases"))
def decode(params, tokens_BP: jax.Array, start_B: jax.Array, max_new_tokens: jax.Array,
           eos_id: jax.Array, rng: jax.Array, pixels_BSYXC: Optional[jax.Array] = None, *,
           cfg: ModelConfig, sampling: SamplingConfig, new_slots: int,
           layout: Optional["Layout"] = None, decode_phases: int = DECODE_PHASES):
  """Prefill left-padded prompts, then decode up to `max_new_tokens` tokens.

  Args:
    params: model parameters.
    tokens_BP: int32 left-padded prompts; row b's prompt occupies
      `tokens_BP[b, start_B[b]:]`.
    start_B: int32 first prompt slot of each row.
    max_new_tokens: int32 scalar <= `new_slots`.
    eos_id: int32 scalar; `NO_EOS` disables early stopping.
    rng: PRNG key.
    pixels_BSYXC: float32 `[B, S, Y, X, C]`, each row's S image slots (a
      multimodal `cfg`; placeholders anywhere in the prompt), or None.
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
    return _decode(params, tokens_BP, start_B, max_new_tokens, eos_id, rng, pixels_BSYXC, cfg,
                   sampling, new_slots, bounds, None)
  if layout.cfg != cfg:
    raise ValueError("decode: layout.cfg differs from cfg (the layout was built for another model)")
  layout.kv_cache(tokens_BP.shape[0], bounds[-1])  # checks that B divides
  with layout.activate():
    tokens_BP, start_B, pixels_BSYXC = jax.lax.with_sharding_constraint(
        (tokens_BP, start_B, pixels_BSYXC), layout.batch())
    return _decode(params, tokens_BP, start_B, max_new_tokens, eos_id, rng, pixels_BSYXC, cfg,
                   sampling, new_slots, bounds, layout)


def _decode(params, tokens_BP, start_B, max_new_tokens, eos_id, rng, pixels_BSYXC, cfg, sampling,
            new_slots, bounds, layout):
  """`decode`'s body over the cache sizes `bounds`; `layout` (or None) pins the
  cache. The loop is `decode_loop.decode_tokens`, the rollouts' loop, with one
  limit for every row and no repeat detector."""
  B = tokens_BP.shape[0]
  place = functools.partial(pin_cache, layout=layout)
  cache = place(init_cache(cfg, B, bounds[0], start=start_B))
  model = Transformer(cfg)
  feats = None if pixels_BSYXC is None else encode_images(model, params, pixels_BSYXC)
  logits_BV, cache = prefill(model, params, tokens_BP, cache, feats)
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
             decode_phases: int = DECODE_PHASES, images: Optional[Sequence] = None):
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
    images: image + text (a `cfg` with `vision`): per prompt, its images
      float32 `[n, Y, X, C]` (preprocessed; n may be 0), one per
      placeholder run of `cfg.vision.tokens_per_image` ids, in order. A
      count that disagrees with the placeholders raises ValueError.

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
  pixels = None if images is None else image_slots(cfg, prompts, images, rows)
  out, logp, num_new = decode(
      params, tokens, start, np.int32(max_new_tokens),
      np.int32(NO_EOS if eos_id is None else eos_id), jax.random.PRNGKey(seed), pixels,
      cfg=cfg, sampling=sampling, new_slots=bucket(max_new_tokens), layout=layout,
      decode_phases=decode_phases)
  # Whole arrays on every process (a multi-process layout splits the rows).
  out, logp, num_new = distributed.fetch((out, logp, num_new))
  seqs = [out[b, :num_new[b]].tolist() for b in range(len(prompts))]
  if return_logprobs:
    return seqs, [logp[b, :num_new[b]].tolist() for b in range(len(prompts))]
  return seqs


def image_slots(cfg: ModelConfig, prompts: Sequence[Sequence[int]], images: Sequence,
                rows: int, slots: Optional[int] = None) -> np.ndarray:
  """float32 `[rows, S, Y, X, C]`: prompt b's images in its first slots, zeros
  after (never read). S = `slots`, default the most images of any prompt
  (at least 1). ValueError when a prompt's placeholders and images disagree
  or the model has no image encoder."""
  if cfg.vision is None:
    raise ValueError("images given, but the model has no image encoder (ModelConfig.vision)")
  if len(images) != len(prompts):
    raise ValueError(f"{len(images)} image lists for {len(prompts)} prompts")
  v = cfg.vision
  shape = (v.image_size, v.image_size, v.num_channels)
  per_prompt = [np.zeros((0,) + shape, np.float32) if x is None else np.asarray(x, np.float32)
                for x in images]
  S = slots if slots is not None else max(1, max(len(x) for x in per_prompt))
  out = np.zeros((rows, S) + shape, np.float32)
  for b, (p, x) in enumerate(zip(prompts, per_prompt)):
    if x.ndim != 4 or tuple(x.shape[1:]) != shape:
      raise ValueError(f"prompt {b}: images must be [n, {shape[0]}, {shape[1]}, {shape[2]}] "
                       f"(data.images.preprocess), got {x.shape}")
    if len(x) > S:
      raise ValueError(f"prompt {b} has {len(x)} images, more than the {S} image slots")
    try:
      vision_lib.check_image_placeholders(np.asarray(p)[None], len(x), v.tokens_per_image,
                                          cfg.image_token_id, images_per_row=S,
                                          images_in_row=[len(x)])
    except ValueError as e:
      raise ValueError(f"prompt {b}: {str(e).removeprefix('row 0: ')}") from None
    out[b, :len(x)] = x
  return out
