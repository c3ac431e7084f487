"""One rollout segment: re-prefill carried trajectories, decode under a budget.

Axis legend: B slots, L max total length, W prefill width (a bucket >= the
longest running row), N budget slots (static upper bound of the per-segment
budget), V vocab.

`sample_segment` continues every row with `active & finish == RUNNING`:
  1. re-packs prompt + response-so-far left-padded into `[B, W]` and prefills
     it under the CURRENT weights (a cache built by earlier weights is stale);
  2. decodes in one `lax.while_loop` until each row hits eos, its budget, the
     max total length L, or a detected repeat; finished rows only cost
     masking until the whole batch is done;
  3. writes new tokens, behaviour log-probs and the iteration index back into
     the right-aligned `RolloutState`.

All shapes are static per (W, N). `SegmentSampler` picks W from a small set
of power-of-two buckets and can compile all of them up front (`warmup`), so
an RL run compiles nothing after its first iteration.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from kimi_jax.models.transformer import ModelConfig, Transformer, init_cache
from kimi_jax.sampling import repetition
from kimi_jax.sampling.finish import FinishReason
from kimi_jax.sampling.sampler import NO_EOS, SamplingConfig, bucket, prefill, sample_token
from kimi_jax.sampling.state import RolloutState


def _left_pack(tokens_BL, length_B, width):
  """Right-aligned `[B, L]` rows -> left-padded `[B, W]` and per-row start."""
  n_B = jnp.clip(length_B, 1, width)
  start_B = width - n_B
  idx_BW = jnp.arange(width, dtype=jnp.int32)[None, :] - start_B[:, None]
  L = tokens_BL.shape[1]
  packed = jnp.take_along_axis(tokens_BL, jnp.clip(idx_BW, 0, L - 1), axis=1)
  return jnp.where(idx_BW >= 0, packed, 0), start_B


def _write_back(x_BL, new_BN, offset_B, count_B):
  """Place `new_BN[b, :count_B[b]]` at `x_BL[b, offset_B[b]:]`."""
  L, N = x_BL.shape[1], new_BN.shape[1]
  t_BL = jnp.arange(L, dtype=jnp.int32)[None, :] - offset_B[:, None]
  sel = (t_BL >= 0) & (t_BL < count_B[:, None])
  vals = jnp.take_along_axis(new_BN, jnp.clip(t_BL, 0, N - 1), axis=1)
  return jnp.where(sel, vals.astype(x_BL.dtype), x_BL)


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "repeat", "width", "budget_slots"))
def sample_segment(params, state: RolloutState, budget: jax.Array, iteration: jax.Array,
                   rng: jax.Array, eos_id: jax.Array, *, cfg: ModelConfig,
                   sampling: SamplingConfig, repeat: repetition.RepeatConfig, width: int,
                   budget_slots: int):
  """Continue the running rows of `state` by up to `budget` tokens each.

  Args:
    params: current policy parameters.
    state: RolloutState (jax or numpy arrays); every running row must have
      `length_B <= width` and `length_B < L`.
    budget: int32 scalar <= budget_slots, new tokens per row this segment.
    iteration: int32 scalar stored in `token_iter_BL` for the new tokens.
    rng: PRNG key.
    eos_id: int32 scalar (`NO_EOS` = none).
    cfg, sampling, repeat, width, budget_slots: static.

  Returns:
    (new_state, steps): steps is the int32 number of decode steps the loop ran
    (slot-steps = steps * B, the denominator of the useful-token fraction).
  """
  B, L = state.tokens_BL.shape
  N = budget_slots
  model = Transformer(cfg)
  run_B = state.active_B & (state.finish_B == int(FinishReason.RUNNING))
  room_B = L - state.length_B
  limit_B = jnp.where(run_B, jnp.minimum(budget, room_B), 0)

  tokens_BW, start_B = _left_pack(state.tokens_BL, state.length_B, width)
  cache = init_cache(cfg, B, width + N, start=start_B)
  logits_BV, cache = prefill(model, params, tokens_BW, cache)
  history_BH = repetition.init_history(state.tokens_BL, state.length_B, state.prompt_len_B, repeat)

  def emit(i, token_B, logp_B, done_B, reason_B, count_B, out_BN, logp_BN, history_BH):
    """Record token i for rows not yet done; decide which rows stop now."""
    live_B = ~done_B
    token_B = jnp.where(live_B, token_B, 0)
    out_BN = jax.lax.dynamic_update_slice(out_BN, token_B[:, None], (0, i))
    logp_BN = jax.lax.dynamic_update_slice(logp_BN, jnp.where(live_B, logp_B, 0.0)[:, None], (0, i))
    count_B = count_B + live_B.astype(jnp.int32)
    history_BH = jnp.where(live_B[:, None], repetition.push(history_BH, token_B), history_BH)
    # Priority when several hold at once: eos > repeat > max length > budget.
    new_reason = jnp.full_like(reason_B, int(FinishReason.RUNNING))
    new_reason = jnp.where(count_B >= limit_B, int(FinishReason.BUDGET), new_reason)
    new_reason = jnp.where(count_B >= room_B, int(FinishReason.MAX_LENGTH), new_reason)
    if repeat.enabled:
      new_reason = jnp.where(repetition.is_repeating(history_BH, repeat),
                             int(FinishReason.REPEAT), new_reason)
    new_reason = jnp.where(token_B == eos_id, int(FinishReason.EOS), new_reason)
    stops = live_B & (new_reason != int(FinishReason.RUNNING))
    reason_B = jnp.where(stops, new_reason, reason_B)
    return done_B | stops, reason_B, count_B, out_BN, logp_BN, history_BH

  rng, sub = jax.random.split(rng)
  token_B, logp_B = sample_token(logits_BV, sub, sampling)
  done_B = ~run_B | (limit_B <= 0)
  carry = emit(0, token_B, logp_B, done_B, state.finish_B, jnp.zeros((B,), jnp.int32),
               jnp.zeros((B, N), jnp.int32), jnp.zeros((B, N), jnp.float32), history_BH)

  def cond(c):
    i, _, _, (done_B, *_), _ = c
    return (i < N) & ~jnp.all(done_B)

  def body(c):
    i, cache, token_B, (done_B, reason_B, count_B, out_BN, logp_BN, history_BH), rng = c
    logits_B1V, cache = model.apply({"params": params}, token_B[:, None], cache=cache)
    rng, sub = jax.random.split(rng)
    token_B, logp_B = sample_token(logits_B1V[:, 0, :], sub, sampling)
    inner = emit(i, token_B, logp_B, done_B, reason_B, count_B, out_BN, logp_BN, history_BH)
    return i + 1, cache, token_B, inner, rng

  steps, _, _, inner, _ = jax.lax.while_loop(
      cond, body, (jnp.ones((), jnp.int32), cache, token_B, carry, rng))
  _, reason_B, count_B, out_BN, logp_BN, _ = inner

  iter_BN = jnp.full((B, N), iteration, jnp.int32)
  new_state = state.replace(
      tokens_BL=_write_back(jnp.asarray(state.tokens_BL), out_BN, state.length_B, count_B),
      logp_BL=_write_back(jnp.asarray(state.logp_BL), logp_BN, state.length_B, count_B),
      token_iter_BL=_write_back(jnp.asarray(state.token_iter_BL), iter_BN, state.length_B, count_B),
      length_B=state.length_B + count_B,
      finish_B=jnp.where(run_B, reason_B, state.finish_B))
  return new_state, steps


@dataclasses.dataclass(frozen=True)
class SegmentSampler:
  """Static settings of the rollout decoder plus width bucketing.

  Attributes:
    cfg: the model.
    sampling: how tokens are drawn.
    repeat: repeat detector settings.
    eos_id: stop token (None = never).
    budget_slots: static maximum of the per-segment budget (N).
    min_width: smallest prefill bucket (e.g. the prompt budget).
  """
  cfg: ModelConfig
  sampling: SamplingConfig
  repeat: repetition.RepeatConfig
  eos_id: Optional[int]
  budget_slots: int
  min_width: int = 16

  def width_for(self, state: RolloutState) -> int:
    """Prefill bucket for the longest running row of a host-side state."""
    run = np.asarray(state.active_B) & (np.asarray(state.finish_B) == int(FinishReason.RUNNING))
    longest = int(np.max(np.asarray(state.length_B)[run], initial=1))
    return bucket(longest, self.min_width)

  def widths(self, max_length: int) -> list[int]:
    """Every bucket a state of this max length can need."""
    out, w = [], bucket(1, self.min_width)
    while True:
      out.append(w)
      if w >= max_length:
        return out
      w *= 2

  def __call__(self, params, state: RolloutState, budget: int, iteration: int, rng,
               width: Optional[int] = None):
    """Run one segment; returns (host RolloutState, steps)."""
    if not 1 <= budget <= self.budget_slots:
      raise ValueError(f"budget {budget} outside [1, budget_slots={self.budget_slots}]")
    width = self.width_for(state) if width is None else width
    new_state, steps = sample_segment(
        params, state, np.int32(budget), np.int32(iteration), rng,
        np.int32(NO_EOS if self.eos_id is None else self.eos_id), cfg=self.cfg,
        sampling=self.sampling, repeat=self.repeat, width=width, budget_slots=self.budget_slots)
    return new_state.to_numpy(), int(steps)

  def warmup(self, params, num_slots: int, max_length: int) -> None:
    """Compile every width bucket now, so later iterations never compile."""
    empty = RolloutState.empty(num_slots, max_length)
    for w in self.widths(max_length):
      self(params, empty, 1, 0, jax.random.PRNGKey(0), width=w)
