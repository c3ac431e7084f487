"""metrics.jsonl writing / reading / resume truncation, TensorBoard, plots."""
import json
import math
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax import metrics
from kimi_jax import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _lines(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_write_and_read_plain_values(tmp_path):
  with metrics.MetricsWriter(tmp_path, tensorboard=False) as w:
    w.write(0, {"eval/accuracy": np.float32(0.25)})
    w.write(1, {"train/loss": jnp.asarray(1.5),
                "rollout/finish_eos": np.int64(3),
                "train/nan": float("nan"), "train/inf": np.float32("inf"),
                "phase": "rl", "hist": np.arange(3)})
  rows = metrics.read_metrics(tmp_path / "metrics.jsonl")
  assert rows == [
      {"iteration": 0, "eval/accuracy": 0.25},
      {"iteration": 1, "train/loss": 1.5, "rollout/finish_eos": 3,
       "train/nan": None, "train/inf": None, "phase": "rl", "hist": [0, 1, 2]}]
  assert isinstance(rows[1]["rollout/finish_eos"], int)
  with open(tmp_path / "metrics.jsonl") as f:
    assert "NaN" not in f.read()  # strict JSON


def test_rows_survive_without_close(tmp_path):
  w = metrics.MetricsWriter(tmp_path, tensorboard=False)
  w.write(0, {"train/loss": 1.0})
  # Each line is flushed and fsync'ed: visible before close (or a SIGKILL).
  assert metrics.read_metrics(tmp_path / "metrics.jsonl") == [
      {"iteration": 0, "train/loss": 1.0}]
  w.close()


def test_torn_last_line_is_skipped_counted_and_moved(tmp_path):
  path = tmp_path / "metrics.jsonl"
  with metrics.MetricsWriter(tmp_path, tensorboard=False) as w:
    w.write(0, {"a": 1})
    w.write(1, {"a": 2})
  with open(path, "a") as f:
    f.write('{"iteration": 2, "a": 3')  # killed mid-write
  rows, torn = metrics.read_metrics_counted(path)
  assert [r["iteration"] for r in rows] == [0, 1] and torn == 1
  assert len(metrics.read_metrics(path)) == 2

  # Reopening moves the fragment aside, so new rows start on a clean line.
  with metrics.MetricsWriter(tmp_path, tensorboard=False) as w:
    w.write(2, {"a": 4})
  assert metrics.read_metrics_counted(path) == (
      [{"iteration": 0, "a": 1}, {"iteration": 1, "a": 2},
       {"iteration": 2, "a": 4}], 0)
  assert _lines(str(path) + ".orphaned") == [
      {"torn_line": '{"iteration": 2, "a": 3'}]


def test_broken_line_in_the_middle_is_an_error(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"iteration": 0}\n{oops\n{"iteration": 1}\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
    metrics.read_metrics(path)


def test_truncate_after_moves_late_rows(tmp_path):
  path = tmp_path / "metrics.jsonl"
  with metrics.MetricsWriter(tmp_path, tensorboard=False) as w:
    for i in range(6):
      w.write(i, {"train/loss": float(i)})
  # Restart from a checkpoint at iteration 3: rows 4 and 5 are orphans.
  with metrics.MetricsWriter(tmp_path, tensorboard=False) as w:
    assert w.truncate_after(3) == 2
    w.write(4, {"train/loss": 40.0})
  assert [(r["iteration"], r["train/loss"]) for r in
          metrics.read_metrics(path)] == [(0, 0.0), (1, 1.0), (2, 2.0),
                                          (3, 3.0), (4, 40.0)]
  assert _lines(str(path) + ".orphaned") == [
      {"iteration": 4, "train/loss": 4.0}, {"iteration": 5, "train/loss": 5.0}]
  # A second restart appends to the orphans, never overwrites them.
  with metrics.MetricsWriter(tmp_path, tensorboard=False) as w:
    assert w.truncate_after(3) == 1
    assert w.truncate_after(3) == 0
  assert len(_lines(str(path) + ".orphaned")) == 3
  assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]


def test_tensorboard_events_are_written(tmp_path):
  with metrics.MetricsWriter(tmp_path) as w:
    w.write(0, {"train/loss": 0.5, "eval/accuracy": float("nan"),
                "phase": "rl"})
    w.write(1, {"train/loss": 0.25})
  events = os.listdir(tmp_path / "tb")
  assert any(n.startswith("events.out.tfevents") for n in events)
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(str(tmp_path / "tb"))
  acc.Reload()
  assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(0, 0.5), (1, 0.25)]
  assert math.isnan(acc.Scalars("eval/accuracy")[0].value)  # TensorBoard gets the real NaN
  assert "phase" not in acc.Tags()["scalars"]


def test_tensorboard_writer_does_not_import_tensorflow(tmp_path):
  # TensorFlow's start-up would print CUDA / oneDNN lines on every run.
  code = ("import sys\nfrom kimi_jax import metrics\n"
          f"with metrics.MetricsWriter({str(tmp_path)!r}) as w:\n  w.write(0, {{'a': 1.0}})\n"
          "print('tensorflow' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       check=True)
  assert out.stdout.strip() == "False", out.stderr


def _synthetic_rows():
  rows = []
  for i in range(12):
    row = {"iteration": i, "train/loss": 1.0 / (i + 1),
           "rollout/reward_mean": i / 12, "rollout/task_reward_mean": i / 11,
           "rollout/response_tokens_mean": 100.0 + 10 * i,
           "rollout/finish_eos": 20 + i, "rollout/finish_budget": 10 - i // 2,
           "rollout/finish_repeat": 1}
    if i % 4 == 0:
      row.update({"eval/accuracy": 0.1 + 0.05 * i, "eval/accuracy_d1": 0.5,
                  "eval/accuracy_d10": 0.01 * i, "eval/accuracy_d2": 0.3,
                  "eval/response_tokens_d1": 50.0 + i,
                  "eval/response_tokens_d2": 80.0 + 2 * i})
    rows.append(row)
  rows[3]["train/loss"] = float("nan")
  rows[5]["train/loss"] = None
  rows[7]["rollout/reward_mean"] = float("inf")
  del rows[9]["rollout/finish_eos"]
  return rows


def test_write_plots_makes_valid_pngs(tmp_path):
  written = plots.write_plots(_synthetic_rows(), tmp_path / "plots")
  names = sorted(os.path.basename(p) for p in written)
  assert names == ["accuracy.png", "finish_reasons.png", "loss.png",
                   "response_length.png", "reward.png"]
  for path in written:
    with open(path, "rb") as f:
      assert f.read(8) == PNG_SIGNATURE
  assert sorted(os.listdir(tmp_path / "plots")) == names  # no tmp files left
  # Refreshing replaces the files in place.
  assert plots.write_plots(_synthetic_rows()[:3], tmp_path / "plots")


def test_write_plots_only_existing_keys(tmp_path):
  rows = [{"iteration": 0, "train/loss": float("nan")},
          {"iteration": 1, "train/loss": None, "rollout/reward_mean": 0.5},
          {"rollout/reward_mean": 0.7},  # no iteration: ignored
          {"iteration": 2, "eval/accuracy": math.nan}]
  written = plots.write_plots(rows, tmp_path)
  assert [os.path.basename(p) for p in written] == ["reward.png"]
  assert plots.write_plots([], tmp_path / "empty") == []
