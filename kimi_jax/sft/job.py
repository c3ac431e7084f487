"""The SFT job behind launch.sft: data, starting weights, training, a run directory.

`run_from_config(config, workdir)` trains on the synthetic traces
(`config.data.tasks`, ...) or on a prompt/response JSONL
(`config.data.train_file` with `config.data.tokenizer`), starting from random
weights or any checkpoint (`config.init_from`, `params_io.resolve`), and
writes a run directory that `config.init_from` of the trainer and of a later
SFT reads:
  model_config.json           the ModelConfig (params_io.write_config)
  checkpoints/<step>/         params, opt_state, host (kimi_jax.checkpointing)
  sft_metrics.jsonl           one row per step
  sft_eval.json               greedy held-out accuracy (synthetic tasks only)
Rerunning the same command continues from the newest checkpoint (a finished
run only re-evaluates); `config.sft.checkpoint_every` sets how often steps
are saved besides the last.
"""
from __future__ import annotations

import collections
import json
import os
from typing import Callable, Optional, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np

from kimi_jax.checkpointing import Checkpointer
from kimi_jax.data import synthetic
from kimi_jax.models import params_io
from kimi_jax.models.transformer import ModelConfig, init_params
from kimi_jax.sampling import generate
from kimi_jax.sft import data as data_lib
from kimi_jax.sft.config import sft_config_from
from kimi_jax.sft.train import optimizer_and_step, run_sft
from kimi_jax.tokenizers import BYTE_EOS_ID, byte_decode, byte_encode

METRICS_FILE = "sft_metrics.jsonl"
EVAL_FILE = "sft_eval.json"


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


def _model_config(config) -> tuple[ModelConfig, Optional[params_io.Source]]:
  """The model (and the starting checkpoint, if any); ValueError names the key."""
  model = dict(config.get("model") or {})
  init_from = config.get("init_from") or ""
  if not init_from:
    return params_io.config_from_dict(model, source="config.model"), None
  try:
    src = params_io.resolve(init_from)
    return params_io.config_for(src, model), src
  except (ValueError, FileNotFoundError) as e:
    raise ValueError(f"config.init_from: {e}") from None


def _examples(config, cfg: ModelConfig, seed: int):
  """(examples, eos_id, held-out synthetic problems or None)."""
  d = config.data
  train_file = d.get("train_file") or ""
  if train_file:
    try:
      codec = data_lib.make_codec(d.get("tokenizer", "bytes"), add_bos=d.get("add_bos", False))
      data_lib.check_vocab(codec, cfg.vocab_size, f"config.data.tokenizer {codec}")
    except (ValueError, FileNotFoundError) as e:
      raise ValueError(f"config.data.tokenizer: {e}") from None
    records = data_lib.read_responses(train_file)
    return data_lib.response_examples(records, codec), codec.eos_id, None
  train, heldout = synthetic.make_splits(
      seed, d.n_train, d.n_heldout, difficulties=d.difficulties, tasks=tuple(d.tasks),
      heldout_frac=d.get("heldout_frac", 0.2))
  examples = data_lib.synthetic_examples(train, config.sft.n_examples, byte_encode,
                                         long_frac=config.sft.long_frac,
                                         error_rate=config.sft.error_rate, seed=seed)
  return examples, BYTE_EOS_ID, heldout


def _read_rows(path: str, up_to: int) -> list[dict]:
  """Metric rows of steps <= up_to (a killed run's later rows are recomputed)."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [r for r in rows if r["step"] <= up_to]


def run_from_config(config: ml_collections.ConfigDict, workdir: str, *,
                    num_samples: int = 4, max_new_tokens: Optional[int] = None,
                    progress: bool = True, evaluate: bool = True) -> dict:
  """SFT, then (synthetic tasks, `evaluate`) greedy held-out eval; see the
  module docstring.

  Bad data or config stops with a ValueError naming the file:line:field or
  the config key before anything is written. Returns the eval accuracies
  ({} without a held-out set or evaluation).
  """
  cfg, src = _model_config(config)
  sft_cfg = sft_config_from(config.sft)
  seed = config.data.get("seed", config.seed)  # RL configs split on the top-level seed
  examples, eos_id, heldout = _examples(config, cfg, seed)

  os.makedirs(workdir, exist_ok=True)
  params_io.write_config(cfg, workdir)
  optimizer, _ = optimizer_and_step(cfg, sft_cfg)
  like = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
  ckpt = Checkpointer(os.path.join(workdir, params_io.CHECKPOINTS_NAME), keep=None)
  restored = ckpt.restore_or_none(params_like=like,
                                  opt_state_like=jax.eval_shape(optimizer.init, like))
  if restored is not None:
    params, opt_state, start = restored.params, restored.opt_state, restored.step
    logging.info("sft: continuing %s from step %d", workdir, start)
  elif src is not None:
    _, params = params_io.load_params(src, cfg)
    opt_state, start = None, 0
  else:
    params, opt_state, start = init_params(cfg, jax.random.PRNGKey(config.seed)), None, 0
  where = f"from {src.kind} {src.path}" if src is not None else "from random init"
  print(f"sft: {cfg.num_params():,} params {where}, {len(examples)} examples")

  metrics_path = os.path.join(workdir, METRICS_FILE)
  rows = _read_rows(metrics_path, start)

  def save(step, params, opt_state, history):
    # Rows first: a checkpoint never gets ahead of its metrics.
    with open(metrics_path + ".tmp", "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows + history)
    os.replace(metrics_path + ".tmp", metrics_path)
    ckpt.save(step, params=params, opt_state=opt_state, host_state={"step": step})

  if start < sft_cfg.steps:
    params, _ = run_sft(cfg, params, examples, sft_cfg, eos_id=eos_id, opt_state=opt_state,
                        start_step=start, progress=progress, save_fn=save)
  ckpt.close()
  if heldout is None or not evaluate:
    return {}
  responses, acc = evaluate_greedy(cfg, params, heldout, max_new_tokens=max_new_tokens)
  with open(os.path.join(workdir, EVAL_FILE), "w") as f:
    json.dump(acc, f, indent=1)
  final = _read_rows(metrics_path, sft_cfg.steps)
  if final:
    print(f"sft: final loss {final[-1]['loss']:.4f}; held-out greedy accuracy {acc}")
  for p, r in list(zip(heldout, responses))[::max(1, len(heldout) // num_samples)][:num_samples]:
    print(f"  {'OK ' if synthetic.is_correct(p, r) else 'BAD'} {p.prompt}{r!r}")
  return acc
