"""Config sweeps: points as override dicts, run one after another or printed as commands.

A sweep file (configs/sweeps/*.py) defines `get_sweep(arg="")`, a list of
dicts of dotted config keys -> values (`{"rl.loss": "rest"}`; an optional
"name" key names the point), and `CONFIG`, the config file it sweeps. Each
point gets its own workdir `DIR/<name>`, so rerunning a sweep resumes every
point, and points never share files. `summarize` reads each point's
metrics.jsonl for the end-of-sweep table.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import shlex
from typing import Any, Callable, Optional, Sequence

import ml_collections

from kimi_jax.metrics import metrics_path, read_metrics

# Summary columns: (header, metrics key). Values are the last logged ones.
COLUMNS = (("eval_acc", "eval/accuracy"), ("greedy_acc", "eval/greedy_accuracy"),
           ("reward", "rollout/reward_mean"), ("resp_tokens", "rollout/response_tokens_mean"))


@dataclasses.dataclass(frozen=True)
class Point:
  """One sweep point: a file-safe name and its overrides (dotted key -> value)."""
  name: str
  overrides: tuple[tuple[str, Any], ...]


def _format(value: Any) -> str:
  return value if isinstance(value, str) else repr(value)


def point_name(overrides: dict) -> str:
  """`loss=rest+prompt_sampling=uniform` from the last component of each key
  (no commas: names are also a --points list)."""
  parts = [f"{k.split('.')[-1]}={_format(v)}" for k, v in overrides.items()]
  name = "+".join(parts) or "base"
  return "".join(c if c.isalnum() or c in "=+._-" else "_" for c in name)


def _load_module(path: str, what: str):
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} {path}: no such file")
  module_spec = importlib.util.spec_from_file_location(f"_{what.strip('-')}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def load_config(spec: str) -> ml_collections.ConfigDict:
  """`get_config(arg)` of a config file `path[:arg]` (as --config would load it)."""
  path, _, arg = spec.partition(":")
  module = _load_module(path, "--config")
  return module.get_config(arg) if arg else module.get_config()


def load_sweep(spec: str) -> tuple[list[Point], Optional[str]]:
  """Points and base config path (its CONFIG, or None) of a sweep file `path[:arg]`."""
  path, _, arg = spec.partition(":")
  module = _load_module(path, "--sweep")
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"--sweep {path}: defines no get_sweep()")
  points = []
  for d in module.get_sweep(arg) if arg else module.get_sweep():
    d = dict(d)
    name = d.pop("name", None) or point_name(d)
    points.append(Point(name=name, overrides=tuple(d.items())))
  names = [p.name for p in points]
  if len(set(names)) != len(names):
    raise ValueError(f"--sweep {path}: point names are not unique: {names}")
  return points, getattr(module, "CONFIG", None)


def point_config(base: ml_collections.ConfigDict, point: Point) -> ml_collections.ConfigDict:
  """A copy of `base` with the point's overrides (unknown keys / wrong types raise)."""
  config = base.copy_and_resolve_references()
  config.lock()  # a typo in a sweep must fail, not add a key
  try:
    config.update_from_flattened_dict(dict(point.overrides))
  except (KeyError, TypeError) as e:
    raise ValueError(f"sweep point {point.name}: {e}") from e
  return config


def launch_command(config_path: str, workdir: str, overrides: dict,
                   module: str = "launch.train") -> str:
  """`python -m launch.train --config=... --workdir=... --config.k=v ...` (shell-quoted)."""
  args = ["python", "-m", module, f"--config={config_path}", f"--workdir={workdir}"]
  args += [f"--config.{k}={_format(v)}" for k, v in overrides.items()]
  return " ".join(shlex.quote(a) for a in args)


def run_points(base: ml_collections.ConfigDict, points: Sequence[Point], workdir: str,
               run: Callable[[ml_collections.ConfigDict, str], Any],
               log: Callable[[str], None] = print) -> dict[str, str]:
  """Run every point with `run(config, DIR/name)`, one after another.

  Every point's config is built (so a bad override fails) before any runs.
  A point that raises is logged and recorded; the others still run.
  Returns {name: "done" | "failed: <error>"}.
  """
  configs = [(p, point_config(base, p)) for p in points]
  os.makedirs(workdir, exist_ok=True)
  status = {}
  for i, (p, config) in enumerate(configs, 1):
    log(f"[{i}/{len(configs)}] {p.name}")
    try:
      run(config, os.path.join(workdir, p.name))
      status[p.name] = "done"
    except Exception as e:  # noqa: BLE001 -- one bad point must not stop the sweep
      status[p.name] = f"failed: {type(e).__name__}: {e}"
      log(f"  {status[p.name]}")
  return status


def _last(rows: list[dict], key: str) -> float:
  for row in reversed(rows):
    value = row.get(key)
    if isinstance(value, (int, float)) and not math.isnan(value):
      return float(value)
  return float("nan")


def summarize(workdir: str, points: Sequence[Point],
              status: Optional[dict[str, str]] = None) -> list[dict]:
  """One row per point: last iteration and the last value of each COLUMNS metric."""
  out = []
  for p in points:
    path = metrics_path(os.path.join(workdir, p.name))
    row = {"point": p.name, "status": (status or {}).get(p.name, "")}
    rows = read_metrics(path) if os.path.isfile(path) else []
    if not rows and not row["status"]:
      row["status"] = "no metrics"
    row["iteration"] = max((r.get("iteration", -1) for r in rows), default=-1)
    for header, key in COLUMNS:
      row[header] = _last(rows, key)
    out.append(row)
  return out


def format_table(rows: list[dict]) -> str:
  """Fixed-width text table of `summarize` rows."""
  headers = ["point", "iteration"] + [h for h, _ in COLUMNS] + ["status"]
  cell = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
  table = [headers] + [[cell(r[h]) for h in headers] for r in rows]
  widths = [max(len(line[i]) for line in table) for i in range(len(headers))]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
                   for line in table)


def write_summary(workdir: str, rows: list[dict]) -> str:
  path = os.path.join(workdir, "summary.json")
  with open(path, "w") as f:
    json.dump(rows, f, indent=1, default=str)
  return path
