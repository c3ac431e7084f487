"""The report's figures: per claim, curves of the arms it compares, the mean
over seeds as a line and the range (min to max) over seeds as a band.

`write_all(runs, out_dir)` writes one PNG per claim whose arms have run and
returns {claim key: path}. Uses matplotlib's Agg canvas (no pyplot), and
replaces files atomically like `kimi_jax.plots`.
"""
from __future__ import annotations

import os
from typing import Callable, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from kimi_jax.reproduce.runs import ACCURACY, TOKENS, Run

Runs = Mapping[str, Mapping[int, Run]]


def _band(ax, runs: Sequence[Run], x: Callable[[Run], np.ndarray],
          y: Callable[[Run], np.ndarray], label: str) -> None:
  """Mean and min-max of y over seeds, on a common x grid (interpolated)."""
  xs = [np.asarray(x(r), float) for r in runs]
  ys = [np.asarray(y(r), float) for r in runs]
  grid = np.linspace(0.0, min(v[-1] for v in xs), 50) if len(runs) > 1 else xs[0]
  stack = np.stack([np.interp(grid, a, b) for a, b in zip(xs, ys)])
  line, = ax.plot(grid, stack.mean(0), label=f"{label} (n={len(runs)})")
  if len(runs) > 1:
    ax.fill_between(grid, stack.min(0), stack.max(0), color=line.get_color(), alpha=0.2, lw=0)


def _its(r: Run) -> np.ndarray:
  return r.eval_iterations


def _panel(fig, position, title, xlabel, ylabel):
  ax = fig.add_subplot(*position)
  ax.set_title(title, fontsize=10)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(True, alpha=0.3)
  return ax


def _curves(fig, position, runs: Runs, arms: Sequence[str], y: Callable[[Run], np.ndarray],
            ylabel: str, title: str, x: Callable[[Run], np.ndarray] = _its,
            xlabel: str = "RL iteration") -> None:
  ax = _panel(fig, position, title, xlabel, ylabel)
  for arm in arms:
    if runs.get(arm):
      _band(ax, list(runs[arm].values()), x, y, arm)
  ax.legend(fontsize="small")


def _rl_gains(fig, runs):
  k15 = list(runs["k15"].values())
  levels = k15[0].levels()
  for col, (prefix, ylabel) in enumerate((("eval/accuracy_d", "held-out pass@1"),
                                          ("eval/response_tokens_d", "mean response tokens"))):
    ax = _panel(fig, (1, 2, col + 1), f"k15 by difficulty: {ylabel}", "RL iteration", ylabel)
    for d in levels:
      _band(ax, k15, _its, lambda r, d=d, p=prefix: r.values(f"{p}{d}"), f"level {d}")
    if levels:
      ax.legend(fontsize="small")


def _length_penalty(fig, runs):
  arms = ("k15", "lp_off", "lp_no_warmup")
  _curves(fig, (1, 2, 1), runs, arms, lambda r: r.values(ACCURACY), "held-out pass@1",
          "accuracy")
  _curves(fig, (1, 2, 2), runs, arms,
          lambda r: r.values(TOKENS) / np.maximum(r.values(ACCURACY), 1e-3),
          "tokens per correct answer", "held-out tokens per correct answer")


def _partial(fig, runs):
  arms = ("k15", "sync")
  acc = lambda r: r.values(ACCURACY)  # noqa: E731
  _curves(fig, (1, 2, 1), runs, arms, acc, "held-out pass@1", "per sample trained",
          x=lambda r: r.samples, xlabel="samples trained")
  _curves(fig, (1, 2, 2), runs, arms, acc, "held-out pass@1", "per second (rollout + update)",
          x=lambda r: r.seconds, xlabel="seconds")


def _accuracy(arms):
  return lambda fig, runs: _curves(fig, (1, 1, 1), runs, arms, lambda r: r.values(ACCURACY),
                                   "held-out pass@1", " vs ".join(arms))


FIGURES = {"rl_gains": (("k15",), _rl_gains, (10, 3.8)),
           "negative_gradients": (("k15", "rest"), _accuracy(("k15", "rest")), (5.5, 3.8)),
           "sampling": (("k15", "uniform", "curriculum"),
                        _accuracy(("k15", "uniform", "curriculum")), (5.5, 3.8)),
           "length_penalty": (("k15", "lp_off", "lp_no_warmup"), _length_penalty, (10, 3.8)),
           "partial_rollouts": (("k15", "sync"), _partial, (10, 3.8))}


def write_all(runs: Runs, out_dir: str) -> dict[str, str]:
  os.makedirs(out_dir, exist_ok=True)
  written = {}
  for key, (arms, draw, size) in FIGURES.items():
    if not all(runs.get(a) for a in arms):
      continue
    fig = Figure(figsize=size, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    draw(fig, runs)
    path = os.path.join(out_dir, f"{key}.png")
    fig.savefig(path + ".tmp", format="png")
    os.replace(path + ".tmp", path)
    written[key] = path
  return written
