"""DPO for long2short (report §2.4): prefer the shortest correct response.

Axis legend: S sequences (samples that are in some pair), P pairs, M
microbatches, m pairs per microbatch, T sequence length.

Pairs come from n samples per prompt of the long model (`samples.draw`):
chosen = the shortest correct sample; rejected = every wrong sample longer
than it and every other correct sample at least `ratio` (1.5) times its
length (`make_pairs`). The reference is the starting policy, frozen: its
sequence log-probs are computed once, before the first step
(`reference_logprobs`). `make_dpo_step` is one jitted, microbatched,
sharded optimizer step on `losses.dpo_loss`; `train` drives it over an
endless shuffled stream of pairs.

A sequence's log-prob is the sum over its response tokens (EOS included)
of log pi(token | prompt, earlier tokens).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Optional, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from kimi_jax import distributed
from kimi_jax import progress as progress_lib
from kimi_jax.long2short.samples import PromptSamples
from kimi_jax.models.transformer import ModelConfig
from kimi_jax.rl import losses
from kimi_jax.rl import update as update_lib


def make_pairs(lengths: Sequence[int], correct: Sequence[bool],
               ratio: float = 1.5) -> list[tuple[int, int]]:
  """(chosen_index, rejected_index) pairs of one prompt's samples.

  chosen: the shortest correct sample (the first of equal lengths).
  rejected, in index order: each incorrect sample strictly longer than the
  chosen one, and each other correct sample at least `ratio` times its
  length. No correct sample: no pairs.
  """
  if not ratio > 0:
    raise ValueError(f"ratio must be > 0, got {ratio!r}")
  lengths_N = np.asarray(lengths, np.int64)
  correct_N = np.asarray(correct, bool)
  if lengths_N.shape != correct_N.shape or lengths_N.ndim != 1:
    raise ValueError(f"lengths {lengths_N.shape} and correct {correct_N.shape} must be "
                     "equal-length 1-D sequences")
  if not correct_N.any():
    return []
  chosen = int(np.argmin(np.where(correct_N, lengths_N, np.iinfo(np.int64).max)))
  base = lengths_N[chosen]
  rejected = [i for i in range(len(lengths_N)) if i != chosen and (
      (not correct_N[i] and lengths_N[i] > base)
      or (correct_N[i] and lengths_N[i] >= ratio * base))]
  return [(chosen, i) for i in rejected]


@dataclasses.dataclass(frozen=True)
class DPOConfig:
  """beta: the DPO temperature (the report gives none). ratio: a correct
  sample this many times the chosen length is rejected. steps: optimizer
  steps; batch_size: pairs per step; microbatch_size: pairs per
  forward/backward (2x rows). AdamW: learning_rate (constant), b1, b2,
  weight_decay, clip_norm. seed: pair order."""
  beta: float = 0.1
  ratio: float = 1.5
  steps: int = 100
  batch_size: int = 32
  microbatch_size: int = 8
  learning_rate: float = 1e-5
  b1: float = 0.9
  b2: float = 0.95
  weight_decay: float = 0.0
  clip_norm: float = 1.0
  seed: int = 0

  def __post_init__(self):
    if not self.beta > 0:
      raise ValueError(f"DPOConfig.beta must be > 0, got {self.beta!r}")
    for name in ("steps", "batch_size", "microbatch_size"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"DPOConfig.{name} must be an int >= 1, got {value!r}")
    if self.batch_size % self.microbatch_size:
      raise ValueError(f"DPOConfig.batch_size ({self.batch_size}) must be a multiple of "
                       f"microbatch_size ({self.microbatch_size})")

  def update_config(self) -> update_lib.UpdateConfig:
    return update_lib.UpdateConfig(learning_rate=self.learning_rate, b1=self.b1, b2=self.b2,
                                   weight_decay=self.weight_decay, clip_norm=self.clip_norm,
                                   microbatch_size=self.microbatch_size)


# ---------------------------------------------------------------- data

@dataclasses.dataclass(frozen=True)
class PairSet:
  """Host arrays: tokens_ST int32 (prompt + response, right-padded with 0),
  mask_ST float32 (1 on response tokens), pairs_P2 int64 (chosen, rejected
  rows of tokens_ST), prompts (number of prompts with at least one pair)."""
  tokens_ST: np.ndarray
  mask_ST: np.ndarray
  pairs_P2: np.ndarray
  prompts: int


def build_pairs(samples: Sequence[PromptSamples], encode: Callable[[str], list[int]], *,
                ratio: float = 1.5, source: str = "samples", multiple: int = 16) -> PairSet:
  """The pairs of every prompt as rows of one padded array (T a multiple of
  `multiple`: one compiled step). ValueError naming `source` when no
  prompt gives a pair."""
  rows, pairs, prompts = [], [], 0
  for s in samples:
    found = make_pairs(s.lengths, s.correct, ratio)
    if not found:
      continue
    prompts += 1
    prompt = encode(s.prompt)
    row_of = {}
    for i in sorted({i for pair in found for i in pair}):
      row_of[i] = len(rows)
      rows.append((prompt, list(s.responses[i])))
    pairs += [(row_of[c], row_of[r]) for c, r in found]
  if not pairs:
    with_correct = sum(any(s.correct) for s in samples)
    raise ValueError(f"DPO set {source}: no (chosen, rejected) pair in {len(samples)} prompts "
                     f"({with_correct} with a correct sample; none of them has a longer wrong "
                     f"one or a correct one >= {ratio}x the shortest)")
  T = -(-max(len(p) + len(r) for p, r in rows) // multiple) * multiple
  tokens = np.zeros((len(rows), T), np.int32)
  mask = np.zeros((len(rows), T), np.float32)
  for n, (p, r) in enumerate(rows):
    tokens[n, :len(p) + len(r)] = p + r
    mask[n, len(p):len(p) + len(r)] = 1.0
  return PairSet(tokens, mask, np.asarray(pairs, np.int64), prompts)


@flax.struct.dataclass
class PairBatch:
  """One step's pairs (all `[P, ...]`): chosen / rejected tokens_PT int32 and
  mask_PT float32, the frozen reference's sequence log-probs ref_*_P float32."""
  chosen_tokens_PT: jax.Array
  chosen_mask_PT: jax.Array
  rejected_tokens_PT: jax.Array
  rejected_mask_PT: jax.Array
  ref_chosen_P: jax.Array
  ref_rejected_P: jax.Array


def pair_batch(pair_set: PairSet, ref_S: np.ndarray, idx: np.ndarray) -> PairBatch:
  """The pairs `idx` of `pair_set` as a host PairBatch."""
  c, r = pair_set.pairs_P2[idx, 0], pair_set.pairs_P2[idx, 1]
  return PairBatch(pair_set.tokens_ST[c], pair_set.mask_ST[c], pair_set.tokens_ST[r],
                   pair_set.mask_ST[r], ref_S[c], ref_S[r])


# ---------------------------------------------------------------- model side

def reference_logprobs(cfg: ModelConfig, params, pair_set: PairSet, rows_per_call: int,
                       layout=None) -> np.ndarray:
  """float32 `[S]`: each row's response log-prob under `params`, computed
  once (the frozen reference), `rows_per_call` rows per microbatched call."""
  S, T = pair_set.tokens_ST.shape
  shards = 1 if layout is None else layout.batch_shards
  per = -(-rows_per_call // shards) * shards
  score = update_lib.make_ref_logprobs(cfg, per, layout)
  out = np.zeros(S, np.float32)
  for lo in range(0, S, per):
    tokens = np.zeros((per, T), np.int32)
    chunk = pair_set.tokens_ST[lo:lo + per]
    tokens[:len(chunk)] = chunk
    if layout is not None:
      tokens = distributed.place(tokens, layout.batch())
    logp_NT = distributed.to_local(score(params, tokens))
    out[lo:lo + len(chunk)] = np.sum(logp_NT[:len(chunk)] * pair_set.mask_ST[lo:lo + per], -1)
  return out


def _split(x, m):
  """[P, ...] -> [P // m, m, ...], each microbatch split over the data axes."""
  mbs = x.reshape((x.shape[0] // m, m) + x.shape[1:])
  return nn.with_logical_constraint(mbs, (None, "activation_batch") + (None,) * (x.ndim - 1))


def make_dpo_step(cfg: ModelConfig, dpo_cfg: DPOConfig, optimizer: optax.GradientTransformation,
                  layout=None):
  """Jitted `step(state: update.TrainState, batch: PairBatch) -> (state, metrics)`.

  Pairs are split into microbatches of `dpo_cfg.microbatch_size`; each runs
  one forward over its chosen and rejected rows together, the loss is
  `losses.dpo_loss` (mean over its pairs), and the gradients of the (equal
  sized) microbatches are averaged. The state is donated. With a training
  `parallel.Layout` the state is in `update.train_state_shardings`, rows are
  split over the data axes and metrics come back replicated, as in the RL
  step (`update.make_train_step`). metrics: dpo/loss, dpo/margin (mean
  beta-scaled implicit reward margin), dpo/accuracy (share of pairs whose
  margin is > 0), dpo/chosen_reward, dpo/rejected_reward, dpo/grad_norm.
  """
  m = dpo_cfg.microbatch_size

  def micro_loss(params, mb: PairBatch):
    tokens = jnp.concatenate([mb.chosen_tokens_PT, mb.rejected_tokens_PT])
    mask = jnp.concatenate([mb.chosen_mask_PT, mb.rejected_mask_PT])
    seq_N = jnp.sum(update_lib.token_logprobs(cfg, params, tokens) * mask, axis=-1)
    chosen_P, rejected_P = jnp.split(seq_N, 2)
    return losses.dpo_loss(chosen_P, rejected_P, mb.ref_chosen_P, mb.ref_rejected_P,
                           dpo_cfg.beta, return_aux=True)

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def step(state: update_lib.TrainState, batch: PairBatch):
    P = batch.chosen_tokens_PT.shape[0]
    if P % m:
      raise ValueError(f"{P} pairs are not a multiple of microbatch_size {m}")
    with contextlib.nullcontext() if layout is None else layout.activate():
      mbs = jax.tree.map(lambda x: _split(x, m), batch)
      keep = (lambda g: g) if layout is None else (
          lambda g: jax.lax.with_sharding_constraint(g, layout.params()))

      def accumulate(carry, mb):
        grads, aux_sum = carry
        (_, aux), g = grad_fn(state.params, mb)
        grads = jax.tree.map(lambda a, x: a + x, grads, keep(g))
        return (grads, jax.tree.map(lambda a, x: a + x, aux_sum, aux)), None

      zeros = keep(jax.tree.map(jnp.zeros_like, state.params))
      first = jax.tree.map(lambda x: x[0], mbs)
      aux0 = jax.tree.map(jnp.zeros_like, jax.eval_shape(micro_loss, state.params, first)[1])
      (grads, aux), _ = jax.lax.scan(accumulate, (zeros, aux0), mbs)
      M = P // m
      grads = jax.tree.map(lambda g: g / M, grads)
      updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
    finite = opt_state.last_finite
    metrics = {f"dpo/{k}": v / M for k, v in aux.items()}
    metrics["dpo/grad_norm"] = optax.global_norm(grads)
    new = update_lib.TrainState(params=params, opt_state=opt_state, step=state.step + 1,
                                skipped=state.skipped + (~finite).astype(jnp.int32))
    return new, metrics

  if layout is None:
    return jax.jit(step, donate_argnums=(0,))
  shardings = update_lib.train_state_shardings(layout, optimizer)
  batch_sharding = jax.tree.map(lambda _: layout.batch(), PairBatch(*([0] * 6)))
  jitted = jax.jit(step, in_shardings=(shardings, batch_sharding),
                   out_shardings=(shardings, layout.replicated), donate_argnums=(0,))

  def sharded_step(state, batch: PairBatch):
    layout.check_batch(batch.chosen_tokens_PT.shape[0], "DPO batch")
    layout.check_batch(m, "DPO microbatch")
    return jitted(state, batch)

  return sharded_step


def train(cfg: ModelConfig, params, pair_set: PairSet, dpo_cfg: DPOConfig, *, layout=None,
          log_fn: Optional[Callable[[int, dict], None]] = None, progress: bool = True):
  """DPO of `params` (also the frozen reference) for `dpo_cfg.steps` steps.

  Each epoch shuffles the pairs (numpy RNG seeded by `dpo_cfg.seed`); a
  step's batch may straddle two epochs. With a `layout` the params must be
  in it. Returns `(params, history)`: one dict per step with step, epoch,
  and the step's metrics. `log_fn(step, row)` is called for every row.
  """
  optimizer = update_lib.make_optimizer(dpo_cfg.update_config())
  step_fn = make_dpo_step(cfg, dpo_cfg, optimizer, layout)
  ref_S = reference_logprobs(cfg, params, pair_set, 2 * dpo_cfg.microbatch_size, layout)
  params = jax.tree.map(jnp.copy, params)  # the step donates; the caller's stay valid
  if layout is None:
    opt_state, where = optimizer.init(params), None
  else:
    opt_state = jax.jit(optimizer.init, out_shardings=layout.opt_state(optimizer))(params)
    where = layout.replicated
  # Two buffers: the step donates both counters.
  state = update_lib.TrainState(params=params, opt_state=opt_state,
                                step=jax.device_put(np.int32(0), where),
                                skipped=jax.device_put(np.int32(0), where))
  rng = np.random.default_rng(dpo_cfg.seed)
  P = len(pair_set.pairs_P2)
  order, epoch, history = np.zeros(0, np.int64), -1, []
  pending = None

  def record(i, ep, metrics):
    row = {"step": i + 1, "epoch": ep, **{k: float(v) for k, v in
                                           distributed.to_local(metrics).items()}}
    history.append(row)
    if log_fn is not None:
      log_fn(row["step"], row)

  for i in progress_lib.bar(range(dpo_cfg.steps), desc="dpo", disable=not progress):
    while len(order) < dpo_cfg.batch_size:
      epoch += 1
      order = np.concatenate([order, rng.permutation(P)])
    idx, order = order[:dpo_cfg.batch_size], order[dpo_cfg.batch_size:]
    batch = pair_batch(pair_set, ref_S, idx)
    if layout is not None:
      batch = distributed.place(batch, jax.tree.map(lambda _: layout.batch(), batch))
    state, metrics = step_fn(state, batch)
    if pending is not None:  # fetched one step late: the host builds the next batch meanwhile
      record(*pending)
    pending = (i, epoch, metrics)
  record(*pending)
  return state.params, history
