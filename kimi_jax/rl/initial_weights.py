"""The RL run's starting weights: a checkpoint, a HF directory, or random
init + the long-CoT SFT warm-up (method spec §5)."""
from __future__ import annotations

import time

import jax
from absl import logging

from kimi_jax import distributed, parallel
from kimi_jax.models import hf, params_io
from kimi_jax.models.transformer import init_params
from kimi_jax.rl import settings as settings_lib
from kimi_jax.rl import tasks as tasks_lib


def warm_up(s: settings_lib.Settings, params, task: tasks_lib.Task):
  """Long-CoT SFT on verified traces of the train split (method spec §5);
  image + text tasks train on their images (the tower too, unless
  config.sft.train_vision is False)."""
  from kimi_jax import sft
  d = s.sft_data
  if task.sft_examples is not None:
    if d.recheck_rate:
      raise ValueError("config.sft.recheck_rate: rechecked traces exist for the arithmetic "
                       "tasks only; set it to 0 for this task")
    examples = task.sft_examples(d.n_examples, d.long_frac, d.error_rate, s.seed)
  else:
    examples = sft.synthetic_examples(task.sft_problems, d.n_examples, task.encode,
                                      long_frac=d.long_frac, error_rate=d.error_rate,
                                      recheck_rate=d.recheck_rate, seed=s.seed)
  sft_cfg = sft.with_image_slots(s.sft, task.image_slots)
  logging.info("SFT warm-up: %d examples, %d steps", len(examples), sft_cfg.steps)
  params, history = sft.run_sft(s.model, params, examples, sft_cfg, eos_id=task.eos_id)
  return params, history


def initial_params(s: settings_lib.Settings, task: tasks_lib.Task, key,
                   layout: parallel.Layout):
  """Starting weights in `layout`: the params of `s.init_from` (any
  checkpoint; orbax ones restore straight into the layout), the HF checkpoint
  of `s.hf_path`, else random init + SFT warm-up (if configured). HF loading
  and the warm-up run whole on every process (the same values on each)."""
  if s.init_from:
    t = time.perf_counter()
    src = params_io.resolve(s.init_from)
    like = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                        parallel.param_shapes(s.model), layout.params())
    _, params = params_io.load_params(src, s.model, params_like=like)
    logging.info("Started from %s %s%s in %.0f s", src.kind, src.path,
                 f" step {src.step}" if src.step is not None else "", time.perf_counter() - t)
    return distributed.place(params, layout.params()) if src.kind == "hf" else params
  if s.hf_path:
    t = time.perf_counter()
    cfg, params = hf.load_pretrained(s.hf_path, dtype=s.model.dtype,
                                     param_dtype=s.model.param_dtype,
                                     scan_layers=s.model.scan_layers)
    # Settings read the same config.json (the context limit may be raised).
    if params_io.same_architecture(
        cfg.replace(max_position_embeddings=s.model.max_position_embeddings), s.model):
      raise settings_lib.ConfigError(f"config.model.hf_path {s.hf_path}: config.json "
                                     f"changed since the run was configured")
    logging.info("Loaded %s in %.0f s", s.hf_path, time.perf_counter() - t)
    return distributed.place(params, layout.params())
  if not s.sft_steps:
    return parallel.init_params(s.model, key, layout)
  t = time.perf_counter()
  params, _ = warm_up(s, init_params(s.model, key), task)
  logging.info("SFT warm-up done in %.0f s", time.perf_counter() - t)
  return distributed.place(params, layout.params())
