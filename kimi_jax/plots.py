"""PNG plots of a run's metrics rows (see `metrics.read_metrics`).

Figures, each written only when at least one of its keys has a finite value:
  accuracy.png         eval/accuracy and eval/accuracy_d{N} per difficulty
  accuracy_by_task.png eval/accuracy_task/{name} per task category (image tasks)
  reward.png           rollout/reward_mean, rollout/task_reward_mean
  response_length.png  rollout/response_tokens_mean, eval/response_tokens_d{N}
  finish_reasons.png   rollout/finish_{reason} counts
  loss.png             train/loss
The x axis is `iteration`; missing, null and non-finite values are
skipped. Files are replaced atomically, so a viewer refreshing them mid-run
never sees half a PNG. Uses matplotlib's Agg canvas directly: no pyplot,
no global backend switch.
"""
from __future__ import annotations

import math
import numbers
import os
import re
from typing import Any, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _per_difficulty(prefix: str):
  """Selects keys `{prefix}{N}`, ordered by N."""
  pattern = re.compile(re.escape(prefix) + r"(\d+)$")

  def select(keys):
    found = [(int(m.group(1)), k) for k in keys if (m := pattern.match(k))]
    return [k for _, k in sorted(found)]
  return select


def _fixed(*names: str):
  return lambda keys: [k for k in names if k in keys]


def _prefixed(prefix: str):
  return lambda keys: sorted(k for k in keys if k.startswith(prefix))


def _either(*selects):
  return lambda keys: [k for s in selects for k in s(keys)]


# file -> (title, y label, key selector, y axis fixed to [0, 1])
FIGURES = {
    "accuracy.png": (
        "Evaluation accuracy", "accuracy",
        _either(_fixed("eval/accuracy"), _per_difficulty("eval/accuracy_d")),
        True),
    "accuracy_by_task.png": (
        "Evaluation accuracy per task", "accuracy", _prefixed("eval/accuracy_task/"), True),
    "reward.png": (
        "Rollout reward", "mean reward",
        _fixed("rollout/reward_mean", "rollout/task_reward_mean"), False),
    "response_length.png": (
        "Response length", "tokens",
        _either(_fixed("rollout/response_tokens_mean",
                       "eval/response_tokens_mean"),
                _per_difficulty("eval/response_tokens_d")), False),
    "finish_reasons.png": (
        "Rollout finish reasons", "responses per iteration",
        _prefixed("rollout/finish_"), False),
    "loss.png": ("Training loss", "loss", _fixed("train/loss"), False),
}


def write_plots(rows: Sequence[dict], out_dir: str | os.PathLike) -> list[str]:
  """Writes the figures whose keys appear in `rows`; returns their paths."""
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  keys = {k for row in rows for k in row}
  written = []
  for name, (title, ylabel, select, unit_range) in FIGURES.items():
    series = {k: _points(rows, k) for k in select(keys)}
    series = {k: xy for k, xy in series.items() if xy[0]}
    if not series:
      continue
    path = os.path.join(out_dir, name)
    _save(_figure(title, ylabel, series, unit_range), path)
    written.append(path)
  return written


def _points(rows: Sequence[dict], key: str) -> tuple[list[float], list[float]]:
  """(iterations, values) of the rows with a finite `key`, by iteration."""
  pts = []
  for row in rows:
    x, y = row.get("iteration"), row.get(key)
    if _finite(x) and _finite(y):
      pts.append((float(x), float(y)))
  pts.sort()
  return [p[0] for p in pts], [p[1] for p in pts]


def _finite(v: Any) -> bool:
  return (isinstance(v, numbers.Real) and not isinstance(v, bool)
          and math.isfinite(v))


def _figure(title: str, ylabel: str, series: dict,
            unit_range: bool) -> Figure:
  fig = Figure(figsize=(7.0, 4.2), dpi=110, layout="constrained")
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  for key, (xs, ys) in series.items():
    # Markers keep single evaluations visible; they would clutter long runs.
    ax.plot(xs, ys, label=key, linewidth=1.5,
            marker="o" if len(xs) <= 30 else None, markersize=3)
  ax.set_title(title)
  ax.set_xlabel("iteration")
  ax.set_ylabel(ylabel)
  if unit_range and all(0 <= y <= 1 for _, ys in series.values() for y in ys):
    ax.set_ylim(-0.02, 1.02)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize="small", loc="best")
  return fig


def _save(fig: Figure, path: str) -> None:
  tmp = f"{path}.tmp.{os.getpid()}"
  try:
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
  except OSError as e:  # a full disk: say which file (the old plot stays)
    raise OSError(e.errno, f"cannot write plot: {e.strerror}", path) from e
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
