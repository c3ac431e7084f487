"""The one decode loop: `generate`, held-out evaluation and rollouts all sample here.

Axis legend: B rows, N new-token slots, V vocab, H repeat-detector history.

`decode_tokens` draws the first token from the prefill's logits, then runs
one `lax.while_loop` (in cache phases, `phases.phased_while_loop`) of
`step` + `sample_token` until every row has stopped. A row stops on eos,
after `limit_B` new tokens, when it reaches `room_B` (the max total
length), or when the repeat detector fires; the reason is recorded with
the priority eos > repeat > max length > budget. `sampler.decode`
(`generate`, evaluation, long2short sampling) calls it with one limit for
every row and no detector; `segment.sample_segment` (partial rollouts) with
per-row budgets, room and the detector.

`one_token_step` is the forward of the loop, chosen once per traced
program: `Transformer.apply` on one token, or, in a CPU decode program
without a sharding layout (`attention.in_cpu_decode_program()`, i.e.
`decode_jit` on a CPU), the feature-major CPU step
(`models.feature_major`), which returns vocab-first logits.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from kimi_jax.models import attention, feature_major
from kimi_jax.models.kv_cache import KVCache
from kimi_jax.models.transformer import ModelConfig, Transformer
from kimi_jax.sampling import phases, repetition
from kimi_jax.sampling.finish import FinishReason

# step(token_B int32, cache) -> (logits float32 [B, V] or [V, B], cache)
Step = Callable[[jax.Array, KVCache], tuple[jax.Array, KVCache]]


class Decoded(NamedTuple):
  """What `decode_tokens` returns.

  tokens_BN: int32 new tokens (0 after a row stopped).
  logp_BN: float32 their log-probs (see `sample_token`; 0 after a row stopped).
  count_B: int32 tokens emitted per row (the eos included).
  reason_B: int32 `FinishReason` per row (the given reason for rows that
    were done from the start, RUNNING for rows still going at the end).
  steps: int32 decode steps the loop ran (the prefill's token not counted).
  """
  tokens_BN: jax.Array
  logp_BN: jax.Array
  count_B: jax.Array
  reason_B: jax.Array
  steps: jax.Array


def one_token_step(cfg: ModelConfig, params, has_layout: bool) -> tuple[Step, bool]:
  """(the loop's forward, whether its logits are vocab-first `[V, B]`).

  The feature-major step transposes the weights here, once per traced call
  and outside the loop (a second copy of the weights while it runs)."""
  if not has_layout and attention.in_cpu_decode_program():
    fm = feature_major.to_feature_major(cfg, params)
    return (lambda token_B, cache: feature_major.decode_step(cfg, fm, token_B, cache)), True
  model = Transformer(cfg)

  def step(token_B, cache):
    logits_B1V, cache = model.apply({"params": params}, token_B[:, None], cache=cache)
    return logits_B1V[:, 0, :], cache
  return step, False


def decode_tokens(step: Step, vocab_first: bool, sample_token: Callable,
                  logits_BV: jax.Array, cache: KVCache, rng: jax.Array, eos_id: jax.Array, *,
                  new_slots: int, bounds: tuple[int, ...], limit_B: jax.Array,
                  room_B: Optional[jax.Array] = None, reason_B: Optional[jax.Array] = None,
                  repeat: Optional[repetition.RepeatConfig] = None,
                  history_BH: Optional[jax.Array] = None,
                  place: Callable[[KVCache], KVCache] = lambda cache: cache) -> Decoded:
  """Sample up to `new_slots` tokens per row after a prefill.

  Args:
    step, vocab_first: from `one_token_step`.
    sample_token: `sampler.sample_token` with the sampling rule bound
      (`(logits, rng, vocab_first=) -> (token_B, logp_B)`).
    logits_BV: float32 `[B, V]` prefill logits of each row's last token.
    cache: the prefilled cache, `bounds[0]` slots (see `phases.phase_slots`).
    rng: PRNG key; split once per drawn token.
    eos_id: int32 scalar (`sampler.NO_EOS` = none).
    new_slots: static N, the output buffers' width.
    bounds: static cache sizes of the decode phases.
    limit_B: int32 `[B]`, new tokens allowed per row (<= N; 0 = the row is
      done before it starts and emits nothing).
    room_B: int32 `[B]` tokens left before the max total length (None = no
      such limit).
    reason_B: int32 `[B]` finish reasons kept for rows done from the start
      (default RUNNING).
    repeat, history_BH: the repeat detector and its initial history
      (`repetition.init_history`); None or a disabled config = no detector.
    place: applied to the cache whenever a phase resizes it (e.g. a
      sharding constraint).
  """
  B, N = limit_B.shape[0], new_slots
  detect = repeat is not None and repeat.enabled
  if reason_B is None:
    reason_B = jnp.full((B,), int(FinishReason.RUNNING), jnp.int32)
  if not detect:
    history_BH = None

  def emit(i, token_B, logp_B, rows):
    """Record token i for rows not yet done; decide which rows stop now."""
    done_B, reason_B, count_B, out_BN, logp_BN, history_BH = rows
    live_B = ~done_B
    token_B = jnp.where(live_B, token_B, 0)
    out_BN = jax.lax.dynamic_update_slice(out_BN, token_B[:, None], (0, i))
    logp_BN = jax.lax.dynamic_update_slice(logp_BN, jnp.where(live_B, logp_B, 0.0)[:, None],
                                           (0, i))
    count_B = count_B + live_B.astype(jnp.int32)
    new_reason = jnp.full_like(reason_B, int(FinishReason.RUNNING))
    new_reason = jnp.where(count_B >= limit_B, int(FinishReason.BUDGET), new_reason)
    if room_B is not None:
      new_reason = jnp.where(count_B >= room_B, int(FinishReason.MAX_LENGTH), new_reason)
    if detect:
      history_BH = jnp.where(live_B[:, None], repetition.push(history_BH, token_B), history_BH)
      new_reason = jnp.where(repetition.is_repeating(history_BH, repeat),
                             int(FinishReason.REPEAT), new_reason)
    new_reason = jnp.where(token_B == eos_id, int(FinishReason.EOS), new_reason)
    stops = live_B & (new_reason != int(FinishReason.RUNNING))
    reason_B = jnp.where(stops, new_reason, reason_B)
    return done_B | stops, reason_B, count_B, out_BN, logp_BN, history_BH

  rng, sub = jax.random.split(rng)
  token_B, logp_B = sample_token(logits_BV, sub, vocab_first=False)
  rows = (limit_B <= 0, reason_B, jnp.zeros((B,), jnp.int32), jnp.zeros((B, N), jnp.int32),
          jnp.zeros((B, N), jnp.float32), history_BH)
  rows = emit(0, token_B, logp_B, rows)

  def cond(c):
    i, _, _, rows, _ = c
    return (i < N) & ~jnp.all(rows[0])

  def body(c):
    i, cache, token_B, rows, rng = c
    logits, cache = step(token_B, cache)
    rng, sub = jax.random.split(rng)
    token_B, logp_B = sample_token(logits, sub, vocab_first=vocab_first)
    return i + 1, cache, token_B, emit(i, token_B, logp_B, rows), rng

  loop = (jnp.ones((), jnp.int32), cache, token_B, rows, rng)
  steps, _, _, rows, _ = phases.phased_while_loop(cond, body, loop, bounds, place)
  _, reason_B, count_B, out_BN, logp_BN, _ = rows
  return Decoded(out_BN, logp_BN, count_B, reason_B, steps)
