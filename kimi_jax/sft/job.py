"""The SFT job behind launch.sft: data, starting weights, training, a run directory.

`run_from_config(config, workdir)` trains on the synthetic traces
(`config.data.tasks`, ...), on the synthetic image + text tasks
(`config.data.kind = "visual"`, configs/visual_tiny.py) or on a
prompt/response JSONL (`config.data.train_file` with `config.data.tokenizer`;
records may show images, preprocessed with `config.data.image_processor`,
else the starting checkpoint's preprocessor_config.json), starting from random
weights or any checkpoint (`config.init_from`, `params_io.resolve`), and
writes a run directory that `config.init_from` of the trainer and of a later
SFT reads:
  model_config.json           the ModelConfig (params_io.write_config)
  checkpoints/<step>/         params, opt_state, host (kimi_jax.checkpointing)
  sft_metrics.jsonl           one row per step
  sft_eval.json               greedy held-out accuracy (synthetic tasks only)
  preprocessor_config.json    with images: the processor they went through
Rerunning the same command continues from the newest checkpoint (a finished
run only re-evaluates); `config.sft.checkpoint_every` sets how often steps
are saved besides the last.
"""
from __future__ import annotations

import collections
import json
import os
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np

from kimi_jax.checkpointing import Checkpointer
from kimi_jax.data import images as images_lib
from kimi_jax.data import synthetic
from kimi_jax.models import params_io
from kimi_jax.models.transformer import ModelConfig, init_params
from kimi_jax.sampling import generate
from kimi_jax.sft import data as data_lib
from kimi_jax.sft.config import sft_config_from, with_image_slots
from kimi_jax.sft.train import optimizer_and_step, run_sft
from kimi_jax.tokenizers import BYTE_EOS_ID, byte_decode, byte_encode

METRICS_FILE = "sft_metrics.jsonl"
EVAL_FILE = "sft_eval.json"


def evaluate_greedy(cfg: ModelConfig, params, problems: Sequence, *,
                    encode: Callable[[str], list[int]] = byte_encode,
                    decode: Callable[[Sequence[int]], str] = byte_decode,
                    eos_id: int = BYTE_EOS_ID, chunk: int = 64,
                    max_new_tokens: Optional[int] = None,
                    prompt_ids: Optional[Callable[[Any], list[int]]] = None,
                    images: Optional[Callable[[Any], np.ndarray]] = None,
                    is_correct: Callable[[Any, str], bool] = synthetic.is_correct):
  """Greedy responses to `problems` (up to `max_new_tokens`, by default the
  longest synthetic response + eos). Returns (responses, accuracy by
  "task/difficulty", with "all" overall).

  Image + text problems (`data/visual.py`) pass `prompt_ids` (problem ->
  ids with placeholders, instead of `encode(p.prompt)`), `images` (problem
  -> float32 `[n, Y, X, C]`) and their `is_correct`."""
  max_new = max_new_tokens or synthetic.MAX_RESPONSE_BYTES + 1
  to_ids = prompt_ids or (lambda p: encode(p.prompt))
  responses = []
  for i in range(0, len(problems), chunk):
    part = problems[i:i + chunk]
    outs = generate(cfg, params, [to_ids(p) for p in part], max_new, eos_id=eos_id,
                    images=None if images is None else [images(p) for p in part])
    responses += [decode(o) for o in outs]
  cells = collections.defaultdict(list)
  for p, r in zip(problems, responses):
    ok = is_correct(p, r)
    cells[f"{p.task}/{p.difficulty}"].append(ok)
    cells["all"].append(ok)
  return responses, {k: float(np.mean(v)) for k, v in sorted(cells.items())}


def _model_config(config) -> tuple[ModelConfig, Optional[params_io.Source]]:
  """The model (and the starting checkpoint, if any); ValueError names the key."""
  model = config.get("model") or {}
  # Nested sub-dicts (model.vision) are ConfigDicts in a config file: plain dicts here.
  model = model.to_dict() if isinstance(model, ml_collections.ConfigDict) else dict(model)
  init_from = config.get("init_from") or ""
  if not init_from:
    return params_io.config_from_dict(model, source="config.model"), None
  try:
    src = params_io.resolve(init_from)
    return params_io.config_for(src, model), src
  except (ValueError, FileNotFoundError) as e:
    raise ValueError(f"config.init_from: {e}") from None


class _Data(NamedTuple):
  """What an SFT job trains and evaluates on. heldout: synthetic problems
  (None: no evaluation); eval_kwargs: `evaluate_greedy`'s for them;
  processor: the images' ProcessorConfig (None: text only)."""
  examples: list
  eos_id: int
  heldout: Optional[Sequence] = None
  eval_kwargs: Optional[dict] = None
  processor: Optional[images_lib.ProcessorConfig] = None


def _file_processor(config, cfg: ModelConfig, src: Optional[params_io.Source]):
  """The image processor of a response file's images: config.data.image_processor,
  else the starting checkpoint's preprocessor_config.json, else SigLIP's
  default (mean and std 0.5) at the tower's image size."""
  path = config.data.get("image_processor", "") or ""
  if not path and src is not None and os.path.isfile(
      os.path.join(src.path, images_lib.PROCESSOR_CONFIG_NAME)):
    path = src.path
  try:
    return images_lib.processor_for_tower(path, cfg.vision.image_size)
  except (OSError, ValueError) as e:
    raise ValueError(f"config.data.image_processor: {e}") from None


def _file_data(config, cfg: ModelConfig, src: Optional[params_io.Source]) -> _Data:
  d = config.data
  try:
    codec = data_lib.make_codec(d.get("tokenizer", "bytes"), add_bos=d.get("add_bos", False))
    data_lib.check_vocab(codec, cfg.vocab_size, f"config.data.tokenizer {codec}")
  except (ValueError, FileNotFoundError) as e:
    raise ValueError(f"config.data.tokenizer: {e}") from None
  records = data_lib.read_responses(d.train_file)
  first = next((i for i, r in enumerate(records) if r.get("images")), None)
  if first is None:
    return _Data(data_lib.response_examples(records, codec), codec.eos_id)
  if cfg.vision is None:
    raise ValueError(f"{d.train_file}: record {first + 1} has images but the model has no "
                     "image encoder (start from a LLaVA checkpoint or set config.model.vision "
                     "and config.model.image_token_id)")
  proc = _file_processor(config, cfg, src)
  enc = data_lib.ImageEncoding(proc, cfg.vision.tokens_per_image, cfg.image_token_id)
  try:
    examples = data_lib.response_examples(records, codec, enc)
  except ValueError as e:
    raise ValueError(f"{d.train_file}: {e}") from None
  return _Data(examples, codec.eos_id, processor=proc)


def _visual_data(config, cfg: ModelConfig, seed: int) -> _Data:
  """The synthetic image + text tasks (config.data.kind = "visual")."""
  from kimi_jax.data import visual  # pylint: disable=g-import-not-at-top
  from kimi_jax.rl import visual_task  # pylint: disable=g-import-not-at-top
  d = config.data
  visual_task.check_model(cfg)
  vd = visual_task.VisualData(
      tasks=tuple(d.get("tasks", visual.TASKS)),
      difficulties=None if d.get("difficulties") is None else tuple(d.difficulties),
      n_train=d.n_train, n_heldout=d.n_heldout, heldout_frac=d.get("heldout_frac", 0.2),
      n_warmup=d.get("n_warmup", 0))
  _, heldout, warmup = visual_task.problem_sets(seed, vd)
  P = cfg.vision.tokens_per_image
  examples = data_lib.visual_examples(warmup, config.sft.n_examples, P, visual_task.PROCESSOR,
                                      long_frac=config.sft.long_frac,
                                      error_rate=config.sft.error_rate, seed=seed)
  eval_kwargs = dict(prompt_ids=lambda p: visual.encode_prompt(p, P),
                     images=visual_task.problem_pixels, is_correct=visual.is_correct)
  return _Data(examples, BYTE_EOS_ID, heldout, eval_kwargs, visual_task.PROCESSOR)


def _examples(config, cfg: ModelConfig, seed: int,
              src: Optional[params_io.Source] = None) -> _Data:
  d = config.data
  if d.get("train_file") or "":
    return _file_data(config, cfg, src)
  if d.get("kind", "synthetic") == "visual":
    return _visual_data(config, cfg, seed)
  train, heldout = synthetic.make_splits(
      seed, d.n_train, d.n_heldout, difficulties=d.difficulties, tasks=tuple(d.tasks),
      heldout_frac=d.get("heldout_frac", 0.2))
  examples = data_lib.synthetic_examples(train, config.sft.n_examples, byte_encode,
                                         long_frac=config.sft.long_frac,
                                         error_rate=config.sft.error_rate,
                                         recheck_rate=config.sft.get("recheck_rate", 0.0),
                                         seed=seed)
  return _Data(examples, BYTE_EOS_ID, heldout, {})


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
  data = _examples(config, cfg, seed, src)
  examples, eos_id, heldout = data.examples, data.eos_id, data.heldout
  sft_cfg = with_image_slots(sft_cfg, max(
      (len(e[2]) for e in examples if len(e) > 2 and e[2] is not None), default=0))

  os.makedirs(workdir, exist_ok=True)
  params_io.write_config(cfg, workdir)
  if data.processor is not None:  # the images' normalisation, for convert and init_from
    images_lib.save_processor(data.processor, workdir)
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

  t0 = time.perf_counter()

  def log(step, row):
    # One line per log_every steps: in a log file the bar is off (kimi_jax.progress).
    per_step = (time.perf_counter() - t0) / max(1, step - start)
    print(f"sft step {step}/{sft_cfg.steps} | loss {row['loss']:.4f} | accuracy "
          f"{row['accuracy']:.3f} | lr {row['learning_rate']:.2e} | {per_step:.2f} s/step",
          flush=True)

  if start < sft_cfg.steps:
    params, _ = run_sft(cfg, params, examples, sft_cfg, eos_id=eos_id, opt_state=opt_state,
                        start_step=start, progress=progress, save_fn=save,
                        log_fn=log if progress else None)
  ckpt.close()
  if heldout is None or not evaluate:
    return {}
  responses, acc = evaluate_greedy(cfg, params, heldout, max_new_tokens=max_new_tokens,
                                   **data.eval_kwargs)
  with open(os.path.join(workdir, EVAL_FILE), "w") as f:
    json.dump(acc, f, indent=1)
  final = _read_rows(metrics_path, sft_cfg.steps)
  if final:
    print(f"sft: final loss {final[-1]['loss']:.4f}; held-out greedy accuracy {acc}")
  for p, r in list(zip(heldout, responses))[::max(1, len(heldout) // num_samples)][:num_samples]:
    ok = data.eval_kwargs.get("is_correct", synthetic.is_correct)(p, r)
    print(f"  {'OK ' if ok else 'BAD'} {p.prompt}{r!r}")
  return acc
