"""One rollout segment: re-prefill carried trajectories, decode under a budget.

Axis legend: B slots, L max total length, W prefill width (a bucket >= the
longest running row), N budget slots (static upper bound of the per-segment
budget), V vocab.

`sample_segment` continues every row with `active & finish == RUNNING`:
  1. re-packs prompt + response-so-far left-padded into `[B, W]` and prefills
     it under the CURRENT weights (a cache built by earlier weights is stale);
     with `prefill_rows` > 0 the running rows are prefilled in groups, each
     at the width its longest row needs, so one long carried row does not
     make every row prefill at W (the cache layout is the same either way);
     image + text rows (`state.pixels_BSYXC`) are prefilled with their
     images, whose features fill the prompt's placeholders (a sampled token
     equal to the placeholder id stays a token);
  2. decodes in `decode_loop.decode_tokens` (the loop `generate` runs too)
     until each row hits eos, its budget, the max total length L, or a
     detected repeat; finished rows only cost masking until the whole batch
     is done;
  3. writes new tokens, behaviour log-probs and the iteration index back into
     the right-aligned `RolloutState`.

All shapes are static per (W, N). `SegmentSampler` picks W from a small set
of power-of-two buckets and can compile all of them up front (`warmup`), so
an RL run compiles nothing after its first iteration.

Sharding: with the sampling `parallel.Layout` (params already in it, see
`parallel.reshard`) the segment is jitted with in/out shardings: rows over
the data axes, heads over `tensor`, the KV cache pinned like `decode`'s.
Prefill groups are rounded up to a multiple of the data-parallel size, so
each group is split over the data axes like every batch. Across processes,
`SegmentSampler` takes and returns each process's own rows and picks one
width for all of them (`kimi_jax.distributed`). Without a layout nothing
changes (the plain jit, no constraints).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Optional

import jax
import jax.numpy as jnp
import numpy as np

from kimi_jax import distributed
from kimi_jax.models.transformer import ModelConfig, Transformer, init_cache
from kimi_jax.sampling import decode_loop, repetition
from kimi_jax.sampling.finish import FinishReason
from kimi_jax.sampling.phases import phase_slots
from kimi_jax.sampling.sampler import (NO_EOS, SamplingConfig, bucket, encode_images,
                                       pin_cache, prefill, prompt_positions, sample_token)
from kimi_jax.sampling.state import RolloutState

if TYPE_CHECKING:
  from kimi_jax.parallel import Layout


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


def chunk_widths(width: int, min_width: int) -> tuple[int, ...]:
  """Prefill widths a row group may use under a segment of width W, widest first.

  `W, ceil(W/2), ceil(W/4), ...` down to `min_width` (W alone when W <= min_width).
  """
  out = [width]
  while True:
    w = -(-out[-1] // 2)
    if w < max(min_width, 1) or w == out[-1]:
      return tuple(out)
    out.append(w)


def _image_args(images, rows, start_B, width) -> tuple:
  """`prefill`'s image arguments for `rows` (None: all) left-packed at
  `start_B` in `width` slots: () for text, else (features, prompt positions)."""
  if images is None:
    return ()
  feats_BSPD, prompt_len_B = images
  if rows is not None:
    feats_BSPD, prompt_len_B = feats_BSPD[rows], prompt_len_B[rows]
  return feats_BSPD, prompt_positions(start_B, prompt_len_B, width)


def _prefill_whole(model, cfg, params, tokens_BL, length_B, width, extra, images, layout=None):
  """One prefill of every row at width W (the simple layout). `images`:
  None, or (features `[B, S, Pi, D]`, prompt_len_B) of the rows' images."""
  B = tokens_BL.shape[0]
  tokens_BW, start_B = _left_pack(tokens_BL, length_B, width)
  cache = pin_cache(init_cache(cfg, B, width + extra, start=start_B), layout)
  return prefill(model, params, tokens_BW, cache, *_image_args(images, None, start_B, width))


def _prefill_grouped(model, cfg, params, tokens_BL, length_B, run_B, width, extra, rows,
                     min_width, images, layout=None):
  """Prefill the running rows in groups of `rows`, each at the width it needs.

  Running rows are sorted by length (longest first) and cut into groups of
  `rows`; group g is left-packed at the smallest of `chunk_widths(W)` that
  holds its longest row and prefilled alone (`lax.switch` over the widths, so
  one program per W), and its keys/values are scattered into the cache of
  `W + extra` slots at slots `[W - w_g, W)`. Every row then sits exactly where
  `_prefill_whole` would put it (left-padded to W, one write index W), so the
  decode loop is unchanged; the prefill costs `sum_g rows * w_g` tokens
  instead of `B * W`. Rows that are not running are not prefilled (zero
  cache, zero logits: they are done before the first step anyway).
  """
  B = tokens_BL.shape[0]
  G = rows
  widths = chunk_widths(width, min_width)
  len_B = jnp.where(run_B, length_B, 0).astype(jnp.int32)
  order = jnp.argsort(-len_B, stable=True).astype(jnp.int32)
  num_groups = -(-B // G)
  pad = num_groups * G - B
  order = jnp.concatenate([order, jnp.full((pad,), B, jnp.int32)])
  take = jnp.clip(order, 0, B - 1)
  # Scatter target of each sorted position: the row, or B (dropped) for rows
  # that are not running and for the padding.
  target = jnp.where((order < B) & run_B[take], order, B)
  n_groups = (jnp.sum(run_B.astype(jnp.int32)) + G - 1) // G
  widths_arr = jnp.asarray(widths, jnp.int32)

  def place(x, axis, w):
    """Group cache `[G, ..., w (slots), ...]` -> slots `[W - w, W)` of a W-slot one."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (width - w, 0)
    return jnp.pad(x, pad)

  def make_branch(w):
    def branch(rows_G):
      tokens_Gw, start_G = _left_pack(tokens_BL[rows_G], len_B[rows_G], w)
      cache = init_cache(cfg, G, w, start=start_G)
      logits_GV, cache = prefill(model, params, tokens_Gw, cache,
                                 *_image_args(images, rows_G, start_G, w))
      return (logits_GV, tuple(place(x, cache.k_slot_axis, w) for x in cache.k),
              tuple(place(x, cache.v_slot_axis, w) for x in cache.v))
    return branch

  def scatter(full, group, dest_G, axis):
    """Rows `dest_G` (B = dropped), slots `[0, W)` of `full` <- `group`."""
    idx = [slice(None)] * full.ndim
    idx[0], idx[axis] = dest_G, slice(0, width)
    return full.at[tuple(idx)].set(group.astype(full.dtype), mode="drop")

  branches = [make_branch(w) for w in widths]

  def body(g, carry):
    logits_BV, k, v = carry
    rows_G = jax.lax.dynamic_slice(take, (g * G,), (G,))
    dest_G = jax.lax.dynamic_slice(target, (g * G,), (G,))
    longest = jnp.maximum(len_B[rows_G[0]], 1)
    which = jnp.sum((widths_arr >= longest).astype(jnp.int32)) - 1
    logits_GV, k_G, v_G = jax.lax.switch(which, branches, rows_G)
    logits_BV = logits_BV.at[dest_G].set(logits_GV, mode="drop")
    k = tuple(scatter(c, x, dest_G, cache.k_slot_axis) for c, x in zip(k, k_G))
    v = tuple(scatter(c, x, dest_G, cache.v_slot_axis) for c, x in zip(v, v_G))
    return logits_BV, k, v

  start_B = width - jnp.clip(length_B, 1, width)  # as `_left_pack` would place the rows
  cache = pin_cache(init_cache(cfg, B, width + extra, start=start_B), layout)
  logits_BV = jnp.zeros((B, cfg.vocab_size), jnp.float32)
  logits_BV, k, v = jax.lax.fori_loop(0, n_groups, body, (logits_BV, cache.k, cache.v))
  return logits_BV, cache.replace(k=k, v=v, index=jnp.asarray(width, jnp.int32))


def sample_segment(params, state: RolloutState, budget: jax.Array, iteration: jax.Array,
                   rng: jax.Array, eos_id: jax.Array, *, cfg: ModelConfig,
                   sampling: SamplingConfig, repeat: repetition.RepeatConfig, width: int,
                   budget_slots: int, prefill_rows: int = 0, prefill_min_width: int = 16,
                   decode_phases: int = 1, layout: Optional["Layout"] = None):
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
    prefill_rows: static; 0 (or >= B) prefills every row at width W in one
      call; otherwise the running rows are prefilled in groups of this many,
      longest first, each group at the smallest width of
      `chunk_widths(width, prefill_min_width)` that holds it (see
      `_prefill_grouped`). Same result up to float rounding; much cheaper
      when a few long carried rows set W.
    prefill_min_width: static, narrowest group width.
    decode_phases: static, decode the segment over a cache grown in this
      many steps (`phase_slots`); 1 = attend over all W + N slots throughout.
    layout: the sampling `parallel.Layout` that `params` are in, or None.
      B must divide over its data axes; `state` (global arrays or, with one
      process, host arrays) is taken and returned in `layout.rollout_state(B)`.

  Returns:
    (new_state, steps): steps is the int32 number of decode steps the loop ran
    (slot-steps = steps * B, the denominator of the useful-token fraction).
  """
  statics = dict(cfg=cfg, sampling=sampling, repeat=repeat, width=width,
                 budget_slots=budget_slots, prefill_rows=prefill_rows,
                 prefill_min_width=prefill_min_width, decode_phases=decode_phases)
  if layout is None:
    return _plain_segment(params, state, budget, iteration, rng, eos_id, **statics)
  if layout.cfg != cfg:
    raise ValueError("sample_segment: layout.cfg differs from cfg (a layout of another model)")
  fn = _sharded_segment(layout, state.tokens_BL.shape[0], state.pixels_BSYXC is not None,
                        **statics)
  return fn(params, state, budget, iteration, rng, eos_id)


@functools.lru_cache(maxsize=64)
def _sharded_segment(layout: "Layout", num_slots: int, images: bool, **statics):
  """`_segment_body` jitted with the layout's in/out shardings (statics bound)."""
  state = layout.rollout_state(num_slots, images)  # checks that the rows divide
  rep = layout.replicated
  # Prefill groups split over the data axes like every batch.
  shards = layout.batch_shards
  statics = dict(statics, prefill_rows=-(-statics["prefill_rows"] // shards) * shards)

  def segment(params, state, budget, iteration, rng, eos_id):
    with layout.activate():
      return _segment_body(params, state, budget, iteration, rng, eos_id, layout=layout,
                           **statics)

  return jax.jit(segment, in_shardings=(layout.params(), state, rep, rep, rep, rep),
                 out_shardings=(state, rep))


def _segment_body(params, state: RolloutState, budget, iteration, rng, eos_id, *, cfg, sampling,
                  repeat, width, budget_slots, prefill_rows, prefill_min_width, decode_phases=1,
                  layout=None):
  """`sample_segment`'s computation (traced under `layout.activate()` when sharded)."""
  B, L = state.tokens_BL.shape
  N = budget_slots
  model = Transformer(cfg)
  run_B = state.active_B & (state.finish_B == int(FinishReason.RUNNING))
  room_B = L - state.length_B
  limit_B = jnp.where(run_B, jnp.minimum(budget, room_B), 0)

  tokens_BL = jnp.asarray(state.tokens_BL)
  length_B = jnp.asarray(state.length_B)
  # The decode loop runs in phases over a growing cache (`decode_phases`):
  # phase j attends over `bounds[j]` slots only, instead of all W + N. The
  # prefill builds the first phase's cache.
  bounds = phase_slots(width, N, decode_phases)
  extra = bounds[0] - width
  # Carried rows are re-prefilled with their images, encoded once here under
  # the current weights (the tower may be training too).
  images = None
  if state.pixels_BSYXC is not None:
    images = (encode_images(model, params, jnp.asarray(state.pixels_BSYXC)),
              jnp.asarray(state.prompt_len_B))
  if 0 < prefill_rows < B and len(chunk_widths(width, prefill_min_width)) > 1:
    logits_BV, cache = _prefill_grouped(model, cfg, params, tokens_BL, length_B, run_B, width,
                                        extra, prefill_rows, prefill_min_width, images, layout)
  else:
    logits_BV, cache = _prefill_whole(model, cfg, params, tokens_BL, length_B, width, extra,
                                      images, layout)
  history_BH = repetition.init_history(state.tokens_BL, state.length_B, state.prompt_len_B, repeat)
  step, vocab_first = decode_loop.one_token_step(cfg, params, layout is not None)
  out = decode_loop.decode_tokens(
      step, vocab_first, functools.partial(sample_token, cfg=sampling), logits_BV, cache, rng,
      eos_id, new_slots=N, bounds=bounds, limit_B=limit_B, room_B=room_B,
      reason_B=state.finish_B, repeat=repeat, history_BH=history_BH,
      place=functools.partial(pin_cache, layout=layout))

  count_B = out.count_B
  iter_BN = jnp.full((B, N), iteration, jnp.int32)
  new_state = state.replace(
      tokens_BL=_write_back(jnp.asarray(state.tokens_BL), out.tokens_BN, state.length_B, count_B),
      logp_BL=_write_back(jnp.asarray(state.logp_BL), out.logp_BN, state.length_B, count_B),
      token_iter_BL=_write_back(jnp.asarray(state.token_iter_BL), iter_BN, state.length_B, count_B),
      length_B=state.length_B + count_B,
      finish_B=jnp.where(run_B, out.reason_B, state.finish_B))
  return new_state, out.steps


# XLA's default (YNNPACK) matmuls, unlike `sampler.decode` (see decode_jit.py):
# the rollout batches are wider (bench/rl_iteration.py, 128 slots: rollout 2.5-2.7 s
# with YNNPACK, 3.6-3.8 s with Eigen) and re-prefill is matmul-heavy.
_plain_segment = jax.jit(_segment_body, static_argnames=(
    "cfg", "sampling", "repeat", "width", "budget_slots", "prefill_rows", "prefill_min_width",
    "decode_phases"))


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
    prefill_rows: rows per prefill group (`sample_segment`'s `prefill_rows`):
      running rows are re-prefilled this many at a time, each group at the
      width its longest row needs, so one long carried row no longer makes
      every row prefill at its width. 0 = one prefill of all B rows at W.
    decode_phases: decode over a KV cache grown in this many steps
      (`phase_slots`): early tokens attend over fewer slots, at the price of
      one more copy of the decode loop per phase in the compiled program.
    layout: the sampling `parallel.Layout` (params must be in it), or None.
      States passed in and returned are then this process's rows (all of
      them with one process); the segment runs over the rows of every
      process, at the width the longest row of any process needs.
  """
  cfg: ModelConfig
  sampling: SamplingConfig
  repeat: repetition.RepeatConfig
  eos_id: Optional[int]
  budget_slots: int
  min_width: int = 16
  prefill_rows: int = 4
  decode_phases: int = 1
  layout: Optional["Layout"] = None

  def __post_init__(self):
    if not isinstance(self.prefill_rows, int) or self.prefill_rows < 0:
      raise ValueError(f"SegmentSampler.prefill_rows must be an int >= 0, got {self.prefill_rows!r}")
    if not isinstance(self.decode_phases, int) or self.decode_phases < 1:
      raise ValueError(
          f"SegmentSampler.decode_phases must be an int >= 1, got {self.decode_phases!r}")

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
    if width is None:
      # Every process must run the same program: the widest bucket any needs.
      width = distributed.max_over_processes(self.width_for(state))
    if self.layout is not None:
      rows = state.num_slots * jax.process_count()
      state = distributed.to_global(
          state, self.layout.rollout_state(rows, state.pixels_BSYXC is not None))
    new_state, steps = sample_segment(
        params, state, np.int32(budget), np.int32(iteration), rng,
        np.int32(NO_EOS if self.eos_id is None else self.eos_id), cfg=self.cfg,
        sampling=self.sampling, repeat=self.repeat, width=width, budget_slots=self.budget_slots,
        prefill_rows=self.prefill_rows, prefill_min_width=self.min_width,
        decode_phases=self.decode_phases, layout=self.layout)
    if self.layout is None:
      return new_state.to_numpy(), int(steps)
    return distributed.to_local(new_state), int(distributed.to_local(steps))

  def warmup(self, params, num_slots: int, max_length: int, image_slots: int = 0) -> None:
    """Compile every width bucket now, so later iterations never compile.

    num_slots: this process's rows (as `__call__` takes them).
    image_slots: S of the states' `pixels_BSYXC` (0: text only).
    """
    empty = RolloutState.empty(num_slots, max_length)
    if image_slots:
      v = self.cfg.vision
      empty = empty.replace(pixels_BSYXC=np.zeros(
          (num_slots, image_slots, v.image_size, v.image_size, v.num_channels), np.float32))
    for w in self.widths(max_length):
      self(params, empty, 1, 0, jax.random.PRNGKey(0), width=w)
