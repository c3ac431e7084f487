"""Long-CoT SFT warm-up (method spec §5): sequence packing, response-only loss.

Axis legend: N packed rows, T sequence length (`seq_len`), V vocab.

Examples are `(prompt_ids, response_ids)` pairs. `pack` appends eos to each
response and packs whole examples, greedy first-fit, into rows of `seq_len`
tokens; every example is one segment (segment ids 1, 2, ... within a row,
0 = padding), its positions restart at 0, and attention stays inside it.

Loss alignment (next-token prediction): the target of position t is
`tokens[t + 1]`. `loss_mask_NT[n, t] = 1` exactly when `tokens[n, t + 1]` is a
response token or the eos of the SAME segment, i.e. from the last prompt
token up to the token before eos. A segment's last position (whose "next"
token belongs to the next segment or is padding) is never in the loss, so
nothing is predicted across a segment boundary.

The library entry point is `run_sft(model_cfg, params, examples, sft_cfg)`.
`run_from_config` is the whole warm-up job on the synthetic tasks (data,
train, save, greedy eval) behind `launch/sft.py`.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
from typing import Any, Callable, Iterator, Optional, Sequence

from absl import logging
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from kimi_jax.models.transformer import ModelConfig, Transformer, init_params
from kimi_jax.data import synthetic
from kimi_jax.sampling import generate
from kimi_jax.tokenizers import BYTE_EOS_ID, BYTE_PAD_ID, byte_decode, byte_encode

Example = tuple[Sequence[int], Sequence[int]]  # (prompt_ids, response_ids)
LogFn = Callable[[int, dict], None]



@dataclasses.dataclass(frozen=True)
class SFTConfig:
  """Settings of the SFT warm-up.

  steps: optimizer steps; batch_size: packed rows per step; seq_len: tokens per row.
  learning_rate: AdamW peak, reached after `warmup_steps` (linear), then
    cosine decay to `end_lr_frac * learning_rate` at `steps`.
  weight_decay: decoupled, on matrices only (not norm scales).
  clip_norm: global gradient-norm clip. seed: data order.
  log_every: `log_fn` cadence in steps (the last step is always logged).
  """
  steps: int = 300
  batch_size: int = 16
  seq_len: int = 256
  learning_rate: float = 3e-3
  warmup_steps: int = 20
  end_lr_frac: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  weight_decay: float = 0.01
  clip_norm: float = 1.0
  seed: int = 0
  log_every: int = 20

  def __post_init__(self):
    def check(name, ok, what):
      if not ok:
        raise ValueError(f"SFTConfig.{name} must be {what}, got {getattr(self, name)!r}")
    for name in ("steps", "batch_size", "log_every"):
      check(name, _is_int(getattr(self, name)) and getattr(self, name) >= 1, "an int >= 1")
    check("seq_len", _is_int(self.seq_len) and self.seq_len >= 2, "an int >= 2")
    check("warmup_steps", _is_int(self.warmup_steps) and self.warmup_steps >= 0, "an int >= 0")
    check("seed", _is_int(self.seed), "an int")
    check("learning_rate", self.learning_rate > 0, "> 0")
    check("clip_norm", self.clip_norm > 0, "> 0")
    check("weight_decay", self.weight_decay >= 0, ">= 0")
    check("end_lr_frac", 0 <= self.end_lr_frac <= 1, "in [0, 1]")
    for name in ("b1", "b2"):
      check(name, 0 <= getattr(self, name) < 1, "in [0, 1)")


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


# ---------------------------------------------------------------- packing

@flax.struct.dataclass
class PackedBatch:
  """Packed rows (all `[N, T]`): tokens_NT int32, segment_ids_NT int32
  (1.. per example within a row, 0 = padding), positions_NT int32 (0 at each
  example's first token), loss_mask_NT float32 (1 where the NEXT token is a
  response token or eos of the same example)."""
  tokens_NT: Any
  segment_ids_NT: Any
  positions_NT: Any
  loss_mask_NT: Any

  def rows(self, idx) -> "PackedBatch":
    return jax.tree.map(lambda x: x[idx], self)


def pack(examples: Sequence[Example], seq_len: int, eos_id: int,
         pad_id: int = 0) -> tuple[PackedBatch, int]:
  """Greedy first-fit packing of whole examples (numpy, host side).

  Each example becomes `prompt + response + [eos_id]` and goes, in the given
  order, into the first row with room for all of it. An example longer than
  `seq_len` is skipped (never truncated: a cut response would teach the model
  to stop without eos). Returns `(batch, num_skipped)`; the batch has as many
  rows as needed (0 if nothing fits).
  """
  free = np.zeros(len(examples), np.int64)  # room left per row (<= one row per example)
  placed: list[list[list[int]]] = []  # per row: the examples' token lists
  prompt_lens: list[list[int]] = []
  skipped = 0
  for i, (prompt, response) in enumerate(examples):
    if len(prompt) == 0:
      raise ValueError(f"example {i}: empty prompt (the first response token needs "
                       "a token before it to be predicted from)")
    seq = list(prompt) + list(response) + [eos_id]
    if len(seq) > seq_len:
      skipped += 1
      continue
    fits = free[:len(placed)] >= len(seq)
    row = int(np.argmax(fits)) if fits.any() else len(placed)
    if row == len(placed):
      placed.append([])
      prompt_lens.append([])
      free[row] = seq_len
    placed[row].append(seq)
    prompt_lens[row].append(len(prompt))
    free[row] -= len(seq)

  n = len(placed)
  tokens = np.full((n, seq_len), pad_id, np.int32)
  segments = np.zeros((n, seq_len), np.int32)
  positions = np.zeros((n, seq_len), np.int32)
  mask = np.zeros((n, seq_len), np.float32)
  for r, (seqs, plens) in enumerate(zip(placed, prompt_lens)):
    at = 0
    for s, (seq, p) in enumerate(zip(seqs, plens), start=1):
      end = at + len(seq)
      tokens[r, at:end] = seq
      segments[r, at:end] = s
      positions[r, at:end] = np.arange(len(seq))
      # Targets tokens[at+p : end] (response + eos) are predicted at t-1.
      mask[r, at + p - 1:end - 1] = 1.0
      at = end
  return PackedBatch(tokens, segments, positions, mask), skipped


def batches(examples: Sequence[Example], sft_cfg: SFTConfig, eos_id: int,
            pad_id: int = 0) -> Iterator[tuple[int, PackedBatch]]:
  """Endless `(epoch, batch)` stream of `batch_size` rows: each epoch shuffles
  the examples (numpy RNG seeded by `sft_cfg.seed`), packs them, shuffles the
  rows; a batch may straddle two epochs (no row is dropped or padded)."""
  rng = np.random.default_rng(sft_cfg.seed)
  buf, epoch = None, -1
  while True:
    while buf is None or buf.tokens_NT.shape[0] < sft_cfg.batch_size:
      epoch += 1
      order = rng.permutation(len(examples))
      packed, _ = pack([examples[i] for i in order], sft_cfg.seq_len, eos_id, pad_id)
      if packed.tokens_NT.shape[0] == 0:
        raise ValueError(f"no example fits in seq_len={sft_cfg.seq_len}")
      packed = packed.rows(rng.permutation(packed.tokens_NT.shape[0]))
      buf = packed if buf is None else jax.tree.map(
          lambda a, b: np.concatenate([a, b]), buf, packed)
    yield epoch, buf.rows(slice(0, sft_cfg.batch_size))
    buf = buf.rows(slice(sft_cfg.batch_size, None))


# ---------------------------------------------------------------- loss and step

def sft_loss(params, cfg: ModelConfig, batch: PackedBatch):
  """Mean next-token cross-entropy (fp32) over masked targets.

  Returns `(loss, metrics)`; metrics: loss, accuracy (greedy token accuracy
  on the masked targets), tokens (number of masked targets), fill (fraction
  of non-padding positions).
  """
  logits_NTV = Transformer(cfg).apply(
      {"params": params}, batch.tokens_NT, positions_BT=batch.positions_NT,
      segment_ids_BT=batch.segment_ids_NT)
  logp_NTV = jax.nn.log_softmax(logits_NTV.astype(jnp.float32), axis=-1)
  # Target of t is token t+1; the last column's target is a dummy 0 that the
  # mask always excludes (see the module docstring).
  targets_NT = jnp.pad(batch.tokens_NT[:, 1:], ((0, 0), (0, 1)))
  logp_NT = jnp.take_along_axis(logp_NTV, targets_NT[..., None], axis=-1)[..., 0]
  mask_NT = batch.loss_mask_NT.astype(jnp.float32)
  tokens = jnp.sum(mask_NT)
  denom = jnp.maximum(tokens, 1.0)
  loss = -jnp.sum(logp_NT * mask_NT) / denom
  correct_NT = (jnp.argmax(logp_NTV, axis=-1) == targets_NT).astype(jnp.float32)
  metrics = {"loss": loss, "accuracy": jnp.sum(correct_NT * mask_NT) / denom,
             "tokens": tokens,
             "fill": jnp.mean((batch.segment_ids_NT > 0).astype(jnp.float32))}
  return loss, metrics


def lr_schedule(sft_cfg: SFTConfig) -> optax.Schedule:
  """Linear warm-up (the first step already uses a nonzero rate), then cosine."""
  peak, warmup = sft_cfg.learning_rate, sft_cfg.warmup_steps
  return optax.warmup_cosine_decay_schedule(
      init_value=peak / warmup if warmup else peak, peak_value=peak,
      warmup_steps=warmup, decay_steps=max(sft_cfg.steps, warmup + 1),
      end_value=peak * sft_cfg.end_lr_frac)


def make_optimizer(sft_cfg: SFTConfig) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW on `lr_schedule` (no decay on vectors)."""
  return optax.chain(
      optax.clip_by_global_norm(sft_cfg.clip_norm),
      optax.adamw(lr_schedule(sft_cfg), b1=sft_cfg.b1, b2=sft_cfg.b2,
                  weight_decay=sft_cfg.weight_decay,
                  mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)))


def make_sft_step(cfg: ModelConfig, optimizer: optax.GradientTransformation):
  """Jitted `step(params, opt_state, batch) -> (params, opt_state, metrics)`;
  params and opt_state are donated. metrics add grad_norm (before clipping)."""

  def step(params, opt_state, batch: PackedBatch):
    grads, metrics = jax.grad(sft_loss, has_aux=True)(params, cfg, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, dict(metrics, grad_norm=optax.global_norm(grads))

  return jax.jit(step, donate_argnums=(0, 1))


@functools.lru_cache(maxsize=8)
def _optimizer_and_step(cfg: ModelConfig, sft_cfg: SFTConfig):
  """One compiled step per (model, optimizer settings): runs that differ only
  in data order or logging reuse it."""
  optimizer = make_optimizer(sft_cfg)
  return optimizer, make_sft_step(cfg, optimizer)


def run_sft(cfg: ModelConfig, params, examples: Sequence[Example], sft_cfg: SFTConfig, *,
            eos_id: Optional[int] = None, pad_id: int = 0, log_fn: Optional[LogFn] = None,
            progress: bool = True):
  """SFT of `params` on packed `examples` for `sft_cfg.steps` steps.

  eos_id defaults to `cfg.eos_id`. The caller's `params` stay valid (the
  loop donates a copy). Deterministic for a given `sft_cfg.seed` and params.
  Returns `(params, history)`: history has one dict per step with step
  (1-based), epoch, loss, accuracy, tokens, fill, grad_norm, learning_rate.
  """
  eos_id = cfg.eos_id if eos_id is None else eos_id
  if eos_id is None:
    raise ValueError("run_sft needs an eos_id (argument or ModelConfig.eos_id)")
  if not examples:
    raise ValueError("run_sft got no examples")
  _, skipped = pack(examples, sft_cfg.seq_len, eos_id, pad_id)
  if skipped == len(examples):
    raise ValueError(f"all {skipped} SFT examples are longer than seq_len={sft_cfg.seq_len}")
  if skipped:
    logging.warning("sft: skipping %d/%d examples longer than seq_len=%d",
                    skipped, len(examples), sft_cfg.seq_len)

  optimizer, step_fn = _optimizer_and_step(
      cfg, dataclasses.replace(sft_cfg, seed=0, log_every=1))
  params = jax.tree.map(jnp.copy, params)
  opt_state = optimizer.init(params)
  schedule = lr_schedule(sft_cfg)
  lrs = np.asarray(jax.vmap(schedule)(jnp.arange(sft_cfg.steps)))
  stream = batches(examples, sft_cfg, eos_id, pad_id)
  history: list[dict] = []
  bar = tqdm.tqdm(total=sft_cfg.steps, desc="sft", disable=not progress)

  def record(i, epoch, metrics):
    row = {"step": i + 1, "epoch": epoch, "learning_rate": float(lrs[i]),
           **{k: float(v) for k, v in jax.device_get(metrics).items()}}
    history.append(row)
    bar.update(1)
    bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['accuracy']:.3f}", refresh=False)
    if log_fn is not None and (row["step"] % sft_cfg.log_every == 0
                               or row["step"] == sft_cfg.steps):
      log_fn(row["step"], row)

  # Metrics are fetched one step late so the host packs the next batch while
  # the device computes.
  pending = None
  for i in range(sft_cfg.steps):
    epoch, batch = next(stream)
    params, opt_state, metrics = step_fn(params, opt_state, batch)
    if pending is not None:
      record(*pending)
    pending = (i, epoch, metrics)
  record(*pending)
  bar.close()
  return params, history


# ---------------------------------------------------------------- synthetic job

def synthetic_examples(problems: Sequence[synthetic.Problem], n_examples: int,
                       encode: Callable[[str], list[int]], *, long_frac: float = 1.0,
                       error_rate: float = 0.0, seed: int = 0) -> list[Example]:
  """`n_examples` (prompt_ids, response_ids) pairs cycling over `problems`
  (several traces of one problem differ in their slips)."""
  if not problems:
    raise ValueError("synthetic_examples needs at least one problem")
  rng = np.random.default_rng([seed, 0x5F7])
  out = []
  for i in range(n_examples):
    p = problems[i % len(problems)]
    out.append((encode(p.prompt), encode(synthetic.sft_response(p, rng, long_frac, error_rate))))
  return out


def evaluate_greedy(cfg: ModelConfig, params, problems: Sequence[synthetic.Problem], *,
                    encode: Callable[[str], list[int]] = byte_encode,
                    decode: Callable[[Sequence[int]], str] = byte_decode,
                    eos_id: int = BYTE_EOS_ID, chunk: int = 64,
                    max_new_tokens: Optional[int] = None):
  """Greedy responses to `problems` (up to `max_new_tokens`, by default the
  longest synthetic response + eos). Returns (responses, accuracy by
  "task/difficulty", with "all" overall)."""
  max_new = max_new_tokens or synthetic.MAX_RESPONSE_BYTES + 1
  responses = []
  for i in range(0, len(problems), chunk):
    prompts = [encode(p.prompt) for p in problems[i:i + chunk]]
    outs = generate(cfg, params, prompts, max_new, eos_id=eos_id)
    responses += [decode(o) for o in outs]
  cells = collections.defaultdict(list)
  for p, r in zip(problems, responses):
    ok = synthetic.is_correct(p, r)
    cells[f"{p.task}/{p.difficulty}"].append(ok)
    cells["all"].append(ok)
  return responses, {k: float(np.mean(v)) for k, v in sorted(cells.items())}


def default_config() -> ml_collections.ConfigDict:
  """The config schema `run_from_config` reads (sub-dicts model, sft, data).

  Defaults from CPU measurements (2 shared cores): this 0.86M-parameter
  model reaches ~40% greedy held-out accuracy on add+chain, all levels,
  after 600 steps of 16 x 128 tokens (~6 min); see the SFT report.
  """
  c = ml_collections.ConfigDict()
  c.seed = 0  # parameter init
  c.model = dict(vocab_size=264, hidden_size=128, intermediate_size=384, num_layers=4,
                 num_heads=4, num_kv_heads=2, max_position_embeddings=512,
                 eos_id=BYTE_EOS_ID, pad_id=BYTE_PAD_ID)
  # seq_len 160 holds every add/chain trace (<= 103 tokens clean, ~140 with slips).
  c.sft = dict(dataclasses.asdict(SFTConfig(steps=600, seq_len=160, log_every=50)),
               n_examples=4000,  # (prompt, trace) pairs, cycling over data.n_train problems
               long_frac=1.0,  # share of long-CoT (vs answer-only) targets
               error_rate=0.0)  # per-step probability of a corrected slip
  c.data = dict(tasks=("add", "chain"),
                difficulties=None,  # None = every level of each task
                n_train=4000, n_heldout=256, seed=0)
  return c


def sft_config_from(config_sft) -> SFTConfig:
  """The SFTConfig fields of a config's `sft` sub-dict (other keys ignored)."""
  names = {f.name for f in dataclasses.fields(SFTConfig)}
  return SFTConfig(**{k: v for k, v in dict(config_sft).items() if k in names})


def run_from_config(config: ml_collections.ConfigDict, workdir: str, *,
                    num_samples: int = 4, max_new_tokens: Optional[int] = None) -> dict:
  """SFT on synthetic long-CoT traces, then greedy held-out eval.

  Writes `workdir/sft_params` (orbax StandardCheckpointer), `sft_metrics.jsonl`
  (the history) and `sft_eval.json`; returns the eval accuracies.
  """
  import orbax.checkpoint as ocp  # only the job saves

  model_cfg = ModelConfig(**config.model)
  sft_cfg = sft_config_from(config.sft)
  d = config.data
  seed = d.get("seed", config.seed)  # configs/arith_tiny.py splits on the top-level seed
  train, heldout = synthetic.make_splits(
      seed, d.n_train, d.n_heldout, difficulties=d.difficulties, tasks=tuple(d.tasks),
      heldout_frac=d.get("heldout_frac", 0.2))
  examples = synthetic_examples(train, config.sft.n_examples, byte_encode,
                                long_frac=config.sft.long_frac,
                                error_rate=config.sft.error_rate, seed=seed)
  params = init_params(model_cfg, jax.random.PRNGKey(config.seed))
  print(f"sft: {model_cfg.num_params():,} params, {len(examples)} examples "
        f"from {len(train)} problems")
  params, history = run_sft(model_cfg, params, examples, sft_cfg, eos_id=BYTE_EOS_ID)

  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "sft_metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(row) + "\n" for row in history)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(os.path.abspath(os.path.join(workdir, "sft_params")), params, force=True)
  ckpt.wait_until_finished()

  responses, acc = evaluate_greedy(model_cfg, params, heldout, max_new_tokens=max_new_tokens)
  with open(os.path.join(workdir, "sft_eval.json"), "w") as f:
    json.dump(acc, f, indent=1)
  print(f"sft: final loss {history[-1]['loss']:.4f}; held-out greedy accuracy {acc}")
  for p, r in list(zip(heldout, responses))[::max(1, len(heldout) // num_samples)][:num_samples]:
    print(f"  {'OK ' if synthetic.is_correct(p, r) else 'BAD'} {p.prompt}{r!r}")
  return acc
