"""Run a reproduction suite, resuming what exists, and write its report.

Layout of DIR:
  sft/seed{s}/       the shared SFT warm-up of seed s (a trainer run with 0
                     RL iterations: its checkpoint 0 and first evaluation)
  {arm}/seed{s}/     one RL run per arm and seed, started from sft/seed{s}
  stages.json        finished runs and their wall time (kimi_jax.stages)
  REPORT.md, report.json, figures/{claim}.png
Seeds run one after another, every arm of a seed before the next seed, so
a suite stopped early already holds whole seeds. A killed run is not in
stages.json and continues from its own checkpoints on the next call. The
report is rewritten after each seed's last arm.
"""
from __future__ import annotations

import os
import platform
from typing import Callable

from absl import logging

from kimi_jax import sweep
from kimi_jax.reproduce import claims, figures, report
from kimi_jax.reproduce import runs as runs_lib
from kimi_jax.reproduce.suites import Suite
from kimi_jax.stages import Stages


def machine() -> str:
  """This machine in words, for the report (numbers depend on it)."""
  import jax
  devices = jax.devices()
  return (f"{platform.machine()}, {os.cpu_count()} CPU cores, {len(devices)} "
          f"{devices[0].platform} device(s) ({devices[0].device_kind})")


def run_config(suite: Suite, overrides: dict):
  """The suite's config file with `overrides` (unknown keys raise, naming the run)."""
  base = sweep.load_config(suite.config)
  if "init_from" not in base:  # configs that start from random init + SFT lack the key
    base.init_from = ""
  return sweep.point_config(base, sweep.Point("run", tuple(overrides.items())))


def start_from(sft_dir: str) -> dict:
  """Overrides that start an arm from its seed's warm-up instead of its own."""
  return {"init_from": sft_dir, "sft.steps": 0}


def plan(suite: Suite, workdir: str) -> list[tuple[str, dict, str, bool]]:
  """Every run in order: (stage name, overrides, run dir, last arm of its seed)."""
  out = []
  for seed in suite.seeds:
    sft_dir = os.path.join(workdir, "sft", f"seed{seed}")
    out.append((f"sft/seed{seed}", suite.sft_overrides(seed), sft_dir, False))
    for j, arm in enumerate(suite.arms, 1):
      out.append((f"{arm}/seed{seed}", {**suite.arm_overrides(arm, seed), **start_from(sft_dir)},
                  os.path.join(workdir, arm, f"seed{seed}"), j == len(suite.arms)))
  return out


def _samples_per_prompt(suite: Suite) -> int:
  return int(sweep.load_config(suite.config).rollout.samples_per_prompt)


def write_report(suite: Suite, workdir: str, stages: Stages) -> str:
  """REPORT.md from the runs recorded as finished in `stages`."""
  k = _samples_per_prompt(suite)
  found: dict[str, dict[int, runs_lib.Run]] = {}
  for arm in suite.arms:
    for seed in suite.seeds:
      if f"{arm}/seed{seed}" in stages.done:
        r = runs_lib.load(os.path.join(workdir, arm, f"seed{seed}"), k)
        if r is not None:
          found.setdefault(arm, {})[seed] = r
  results = claims.evaluate(found)
  figs = figures.write_all(found, os.path.join(workdir, "figures"))
  return report.write(suite, results, figs, workdir, stages.seconds(), machine(),
                      report.commands(suite, plan(suite, workdir)))


def run(suite: Suite, workdir: str, train: Callable | None = None) -> str:
  """Every run of `suite` in `workdir` (resuming), then the report; returns its path.

  `train(config, workdir)` runs one trainer job (default `trainer.run`).
  Every run's config is built first, so a broken override fails before any work.
  """
  if train is None:
    from kimi_jax.rl import trainer
    train = trainer.run
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  runs = [(name, run_config(suite, overrides), run_dir, seed_done)
          for name, overrides, run_dir, seed_done in plan(suite, workdir)]
  stages = Stages(workdir, "reproduce")
  ran = False  # since the last report
  for i, (name, config, run_dir, seed_done) in enumerate(runs, 1):
    if name not in stages.done:
      logging.info("reproduce: run %d/%d %s", i, len(runs), name)
      ran = True

    def one(config=config, run_dir=run_dir):
      os.makedirs(os.path.dirname(run_dir), exist_ok=True)  # the trainer makes only the leaf
      rows = train(config, run_dir)
      return {"iterations": max((r["iteration"] for r in rows), default=0)}
    stages.run(name, one)
    if seed_done and ran and i < len(runs):
      write_report(suite, workdir, stages)
      ran = False
  return write_report(suite, workdir, stages)
