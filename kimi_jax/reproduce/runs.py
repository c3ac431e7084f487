"""What the claims read from one finished run: its evaluation curve and costs.

`load(workdir, k)` reads WORKDIR/metrics.jsonl (`metrics.read_metrics`) into
a `Run`: the evaluation rows (iteration 0 = the starting checkpoint), the
samples trained and the rollout + update seconds up to each iteration. The
statistics used by the verdicts are methods, so every claim summarises a run
the same way:
  first(key)   the value at the first evaluation (before RL)
  final(key)   the mean of the last three evaluations (evaluation noise is
               about +-3 points on the toy task's 316 x 2 samples)
  curve_mean   the mean over every evaluation after iteration 0 (the area
               under the learning curve: sample efficiency)
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

import numpy as np

from kimi_jax.metrics import metrics_path, read_metrics

FINAL_EVALS = 3
ACCURACY = "eval/accuracy"
GREEDY = "eval/greedy_accuracy"
TOKENS = "eval/response_tokens_mean"


def _finite(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class Run:
  """evals: {key: float [E]} at `eval_iterations` (int [E]); samples, seconds:
  float [E], the samples trained and rollout + reward + update seconds up to
  each evaluation (compiles and evaluations excluded)."""
  workdir: str
  eval_iterations: np.ndarray
  evals: dict[str, np.ndarray]
  samples: np.ndarray
  seconds: np.ndarray

  def values(self, key: str) -> np.ndarray:
    if key not in self.evals:
      raise KeyError(f"{metrics_path(self.workdir)}: no {key!r} in its evaluation rows")
    return self.evals[key]

  def first(self, key: str) -> float:
    return float(self.values(key)[0])

  def final(self, key: str) -> float:
    return float(np.mean(self.values(key)[-FINAL_EVALS:]))

  def curve_mean(self, key: str) -> float:
    v = self.values(key)
    return float(np.mean(v[1:])) if len(v) > 1 else float(v[0])

  def tokens_per_correct(self) -> float:
    """Held-out response tokens spent per correct answer: the mean response
    length over the accuracy, at the final evaluations."""
    acc = self.final(ACCURACY)
    return self.final(TOKENS) / acc if acc > 0 else math.inf

  def at_samples(self, key: str, n: float) -> float:
    """`key` linearly interpolated at `n` samples trained."""
    return float(np.interp(n, self.samples, self.values(key)))

  def levels(self) -> list[int]:
    """The difficulty levels with per-level accuracy, ascending."""
    prefix = "eval/accuracy_d"
    return sorted(int(k[len(prefix):]) for k in self.evals
                  if k.startswith(prefix) and k[len(prefix):].isdigit())


def load(workdir: str, samples_per_prompt: int) -> Optional[Run]:
  """The `Run` in `workdir`, or None when it has no evaluation yet."""
  path = metrics_path(workdir)
  if not os.path.isfile(path):
    return None
  rows = sorted(read_metrics(path), key=lambda r: r["iteration"])
  samples = seconds = 0.0
  its, evals, cum_samples, cum_seconds = [], {}, [], []
  for row in rows:
    groups = row.get("rollout/groups_completed")
    samples += samples_per_prompt * groups if _finite(groups) else 0.0
    seconds += sum(row[k] for k in ("time/rollout_s", "time/reward_s", "time/update_s")
                   if _finite(row.get(k)))
    if not _finite(row.get(ACCURACY)):
      continue
    its.append(row["iteration"])
    cum_samples.append(samples)
    cum_seconds.append(seconds)
    for k, v in row.items():
      if k.startswith("eval/") and _finite(v):
        evals.setdefault(k, {})[row["iteration"]] = float(v)
  if not its:
    return None
  arrays = {k: np.array([d.get(i, np.nan) for i in its]) for k, d in evals.items()}
  return Run(workdir, np.array(its), arrays, np.array(cum_samples), np.array(cum_seconds))
