"""The long2short comparison (report §2.4, Fig. 7): every method from one long-CoT model.

`run(config, workdir)` (behind launch.long2short; config schema in
configs/long2short_tiny.py) runs these stages, each recorded in
DIR/stages.json with its wall time so that a rerun skips finished ones:

  long        the long-CoT model: `config.long_from`, or the RL main job
              (`config.long`, e.g. configs/arith_tiny.py) trained in DIR/long
  short       a short-CoT model: `config.short_from`, or SFT of the long model
              on answer-only traces (synthetic tasks) in DIR/short
  merge       the average of long and short (merge.py) in DIR/merge
  samples_*   n samples per train prompt from long / merge, verified
              (samples.py): DIR/samples/{long,merge}.jsonl
  rs          SFT of long on its shortest correct samples (rejection.py), DIR/rs
  merge_rs    the same from the merged model's samples, DIR/merge_rs
  dpo         DPO of long on pairs of its samples (dpo.py), DIR/dpo
  l2s_rl      RL from long with the length penalty from iteration 0 and a
              shorter max length (`config.l2s_rl`), DIR/l2s_rl
  more_rl     the control: as many more iterations of the long model's own
              RL (`config.more_rl`: the long config, from the long model),
              DIR/more_rl; what l2s_rl gains beyond it is the length
              reward's and the shorter cap's, not more RL's
  eval_<m>    every model on the same held-out prompts: pass@1 averaged over
              `config.eval.samples` draws, mean response tokens, per difficulty
and writes DIR/long2short.json and DIR/plots/long2short.png (report.py).

Prompts, codec and verifier come from the long config's task
(`rl.tasks.make_task`): the synthetic tasks, or prompt files + tokenizer,
so the same stages run on a real checkpoint (given `long_from` and
`short_from`: answer-only traces exist for the synthetic tasks only).
"""
from __future__ import annotations

import dataclasses
import json
import os

from absl import logging
import jax
import ml_collections

from kimi_jax import distributed, parallel, sft
from kimi_jax.stages import Stages
from kimi_jax.long2short import dpo, merge, rejection, report
from kimi_jax.long2short import samples as samples_lib
from kimi_jax.models import params_io
from kimi_jax.rl import multihost, settings as settings_lib, tasks as tasks_lib, trainer
from kimi_jax.rl.evaluation import evaluate

MODELS = tuple(report.LABELS)
RL_STAGES = ("l2s_rl", "more_rl")  # RL runs from the long model, one config section each


def _check_keys(section: str, values: dict, known) -> None:
  unknown = sorted(set(values) - set(known))
  if unknown:
    raise ValueError(f"config.{section}: unknown key(s) {unknown}; known: {sorted(known)}")


def check_config(c: ml_collections.ConfigDict) -> None:
  """ValueError naming the key of a setting a later stage would refuse."""
  sft_keys = {f.name for f in dataclasses.fields(sft.SFTConfig)}
  _check_keys("short", c.short, sft_keys | {"from_long", "n_examples"})
  _check_keys("rs", c.rs, sft_keys)
  for section in ("short", "rs"):
    try:
      sft.sft_config_from(c[section])
    except ValueError as e:
      raise ValueError(f"config.{section}: {e}") from None
  try:
    dpo.DPOConfig(**c.dpo)
  except (TypeError, ValueError) as e:
    raise ValueError(f"config.dpo: {e}") from None
  if not 0.0 <= c.merge.weight <= 1.0:
    raise ValueError(f"config.merge.weight must be in [0, 1], got {c.merge.weight!r}")
  for key in ("n", "prompts", "max_new_tokens", "batch_size"):
    if not isinstance(c.samples[key], int) or c.samples[key] < 1:
      raise ValueError(f"config.samples.{key} must be an int >= 1, got {c.samples[key]!r}")
  for section in RL_STAGES:
    if not c[section].get("init_from"):  # the long model's path is filled in later
      try:
        settings_lib.from_config(c[section])
      except settings_lib.ConfigError as e:
        raise ValueError(f"config.{section}: {e}") from None


class Comparison:
  """The static pieces of one comparison: config, task, layouts, stage log."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.c = config
    try:
      self.long_settings = settings_lib.from_config(config.long)
    except settings_lib.ConfigError as e:
      raise ValueError(f"config.long: {e}") from None
    check_config(config)  # every stage's settings, before the first stage's work
    self.task = tasks_lib.make_task(self.long_settings)  # reads and checks the prompt files
    self.workdir = trainer.prepare_workdir(workdir)
    trainer.quiet_library_logs()
    self.train_layout, self.sample_layout = multihost.make_mesh_layouts(self.long_settings)
    self.stages = Stages(self.workdir, "long2short")
    self.models: dict[str, str] = {}  # name -> checkpoint path

  def path(self, *parts) -> str:
    return os.path.join(self.workdir, *parts)

  def load(self, path: str, layout: parallel.Layout):
    """(cfg, params in `layout`) of any checkpoint."""
    src = params_io.resolve(path)
    cfg = params_io.config_for(src)
    layout = parallel.Layout(layout.kind, layout.mesh, cfg)
    cfg = layout.cfg  # a sample layout's form (unrolled); restore converts
    like = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                        parallel.param_shapes(cfg), layout.params())
    _, params = params_io.load_params(src, cfg, params_like=like)
    if src.kind == "hf":
      params = distributed.place(params, layout.params())
    return cfg, params

  # ------------------------------------------------------------- stages

  def long(self) -> dict:
    if self.c.long_from:
      params_io.resolve(self.c.long_from)  # fails now, naming the path, if it is no checkpoint
      return {"path": os.path.abspath(os.path.expanduser(self.c.long_from))}
    trainer.run(self.c.long, self.path("long"))
    return {"path": self.path("long")}

  def sft(self, name: str, init_from: str, settings: dict, data: dict) -> dict:
    """An SFT run directory DIR/name from `init_from` (the sft job)."""
    c = sft.default_config()
    c.seed = self.c.seed
    c.init_from = init_from
    # From a checkpoint the architecture is its own; from scratch, the long model's.
    c.model = {} if init_from else params_io.config_to_dict(self.long_settings.model)
    c.sft.update(settings)
    c.data.update(data)
    sft.run_from_config(c, self.path(name), evaluate=False)
    return {"path": self.path(name)}

  def short(self) -> dict:
    if self.c.short_from:
      params_io.resolve(self.c.short_from)
      return {"path": os.path.abspath(os.path.expanduser(self.c.short_from))}
    if not isinstance(self.long_settings.data, settings_lib.DataSettings):
      raise ValueError("config.short_from is required: answer-only traces exist only for the "
                       "synthetic tasks")
    d = self.long_settings.data
    short = dict(self.c.short)
    from_long = short.pop("from_long")
    data = dict(tasks=d.tasks, difficulties=d.difficulties, n_train=d.n_train,
                n_heldout=d.n_heldout, heldout_frac=d.heldout_frac, seed=self.c.long.seed)
    return self.sft("short", self.models["long"] if from_long else "",
                    dict(short, long_frac=0.0, error_rate=0.0), data)

  def merge(self) -> dict:
    merge.merge(self.models["long"], self.models["short"], self.path("merge"),
                weight=self.c.merge.weight, overwrite=True)  # not done: a partial one is ours
    return {"path": self.path("merge")}

  def draw(self, model: str) -> dict:
    """n verified samples per train prompt from `model`."""
    s = self.c.samples
    cfg, params = self.load(self.models[model], self.sample_layout)
    records = list(self.task.train[:s.prompts])
    drawn = samples_lib.draw(cfg, params, self.task, records, s.n,
                             max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                             seed=self.c.seed, batch_size=s.batch_size,
                             layout=self.sample_layout)
    os.makedirs(self.path("samples"), exist_ok=True)
    path = self.path("samples", f"{model}.jsonl")
    samples_lib.write(drawn, path)
    n = len(drawn) * s.n
    return {"path": path, "prompts": len(drawn),
            "accuracy": sum(sum(x.correct) for x in drawn) / n,
            "tokens_mean": sum(sum(x.lengths) for x in drawn) / n}

  def rejection(self, name: str, model: str, samples_path: str) -> dict:
    """SFT of `model` on the shortest correct of its samples."""
    os.makedirs(self.path(name), exist_ok=True)
    data_path = self.path(name, "data.jsonl")
    stats = rejection.write_set(samples_lib.read(samples_path), data_path)
    d = self.long_settings.data
    tokenizer = getattr(d, "tokenizer", "bytes")
    out = self.sft(name, self.models[model], dict(self.c.rs),
                   dict(train_file=data_path, tokenizer=tokenizer,
                        add_bos=getattr(d, "add_bos", False)))
    return dict(out, **stats)

  def dpo(self, samples_path: str) -> dict:
    dpo_cfg = dpo.DPOConfig(**self.c.dpo)
    pairs = dpo.build_pairs(samples_lib.read(samples_path), self.task.encode,
                            ratio=dpo_cfg.ratio, source=samples_path)
    cfg, params = self.load(self.models["long"], self.train_layout)
    layout = parallel.Layout(self.train_layout.kind, self.train_layout.mesh, cfg)
    os.makedirs(self.path("dpo"), exist_ok=True)

    def log(step, row):  # a line per 10 steps: off a terminal the bar is off
      if step % 10 == 0 or step == dpo_cfg.steps:
        logging.info("dpo step %d/%d | %s", step, dpo_cfg.steps,
                     " | ".join(f"{k.removeprefix('dpo/')} {v:.4g}" for k, v in row.items()
                                if k not in ("step", "epoch")))

    params, history = dpo.train(cfg, params, pairs, dpo_cfg, layout=layout, log_fn=log)
    with open(self.path("dpo", "metrics.jsonl"), "w") as f:
      f.writelines(json.dumps(row) + "\n" for row in history)
    params_io.save_orbax(cfg, params, self.path("dpo", "model"), overwrite=True)
    return {"path": self.path("dpo", "model"), "pairs": int(len(pairs.pairs_P2)),
            "prompts_with_pairs": pairs.prompts, "last_step": history[-1]}

  def rl(self, name: str) -> dict:
    """RL from the long model (`config.<name>`, init_from "" = long) in DIR/name."""
    c = ml_collections.ConfigDict(self.c[name].to_dict())
    c.init_from = c.init_from or self.models["long"]
    trainer.run(c, self.path(name))
    return {"path": self.path(name)}

  def evaluate(self, model: str) -> dict:
    e = self.c.eval
    cfg, params = self.load(self.models[model], self.sample_layout)
    t = self.task
    return evaluate(cfg, params, t.heldout, encode=t.encode, decode=t.decode, score=t.score,
                    max_new_tokens=e.max_new_tokens, eos_id=t.eos_id,
                    temperature=e.temperature, samples=e.samples, seed=self.c.seed,
                    verifier_workers=t.verifier_workers, layout=self.sample_layout)

  # ------------------------------------------------------------- driver

  def run(self) -> dict:
    st = self.stages
    self.models["long"] = st.run("long", self.long)["path"]
    self.models["short"] = st.run("short", self.short)["path"]
    self.models["merge"] = st.run("merge", self.merge)["path"]
    long_samples = st.run("samples_long", lambda: self.draw("long"))["path"]
    self.models["rs"] = st.run("rs", lambda: self.rejection("rs", "long", long_samples))["path"]
    merge_samples = st.run("samples_merge", lambda: self.draw("merge"))["path"]
    self.models["merge_rs"] = st.run(
        "merge_rs", lambda: self.rejection("merge_rs", "merge", merge_samples))["path"]
    self.models["dpo"] = st.run("dpo", lambda: self.dpo(long_samples))["path"]
    for name in RL_STAGES:
      self.models[name] = st.run(name, lambda name=name: self.rl(name))["path"]
    evals = {m: st.run(f"eval_{m}", lambda m=m: self.evaluate(m)) for m in MODELS}
    summary = report.summarize(evals)
    summary["stage_seconds"] = st.seconds()
    summary["total_seconds"] = round(sum(summary["stage_seconds"].values()), 1)
    summary["models_paths"] = dict(self.models)
    summary["stages"] = {k: v["result"] for k, v in st.done.items() if not k.startswith("eval_")}
    if distributed.is_primary():
      report.write(summary, self.workdir)
    logging.info("long2short:\n%s", report.table(summary))
    return summary


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) the comparison in `workdir`; returns the summary."""
  return Comparison(config, workdir).run()
