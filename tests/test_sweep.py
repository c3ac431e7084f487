"""Sweeps: points from get_sweep(), overrides, launch commands, the summary table."""
import json
import os
import shlex
import subprocess
import sys

import pytest

from kimi_jax import sweep
from kimi_jax.rl import settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABLATIONS = os.path.join(ROOT, "configs", "sweeps", "arith_ablations.py")
# The smoke variant shrunk to one synchronous iteration without SFT: every
# row runs to the max length in one segment, so groups complete and train.
TINY = ["--config=configs/arith_tiny.py:smoke", "--config.total_iterations=1",
        "--config.sft.steps=0", "--config.eval.greedy=False", "--config.eval.max_new_tokens=16",
        "--config.rollout.max_length=64", "--config.rollout.partial=False",
        "--config.data.n_heldout=8"]


def test_ablation_points_cover_loss_by_prompt_sampling():
  points, config = sweep.load_sweep(ABLATIONS)
  assert config == "configs/arith_tiny.py"
  assert [p.name for p in points] == ["k15-prioritized", "k15-uniform", "rest-prioritized",
                                      "rest-uniform"]
  base = sweep.load_config(os.path.join(ROOT, config))
  seen = set()
  for p in points:
    s = settings.from_config(sweep.point_config(base, p))
    seen.add((s.loss.algorithm, s.prompts.mode))
  assert seen == {("k15", "prioritized"), ("k15", "uniform"), ("rest", "prioritized"),
                  ("rest", "uniform")}
  assert base.rl.loss == "k15" and base.rl.prompt_sampling == "prioritized"  # base untouched


def test_bad_overrides_fail_before_anything_runs(tmp_path):
  base = sweep.load_config(os.path.join(ROOT, "configs/arith_tiny.py:smoke"))
  typo = sweep.Point("typo", (("rl.losss", "rest"),))
  with pytest.raises(ValueError, match="sweep point typo: .*losss"):
    sweep.point_config(base, typo)
  ran = []
  with pytest.raises(ValueError, match="sweep point wrong_type"):
    sweep.run_points(base, [sweep.Point("ok", ()), sweep.Point("wrong_type", (("seed", "x"),))],
                     str(tmp_path), lambda c, w: ran.append(w))
  assert ran == []


def test_failing_point_is_recorded_and_the_rest_still_run(tmp_path):
  base = sweep.load_config(os.path.join(ROOT, "configs/arith_tiny.py:smoke"))
  points = [sweep.Point("a", (("seed", 1),)), sweep.Point("b", (("seed", 2),))]
  ran = []

  def run(config, workdir):
    if config.seed == 1:
      raise RuntimeError("boom")
    ran.append(workdir)

  status = sweep.run_points(base, points, str(tmp_path), run, log=lambda _: None)
  assert status == {"a": "failed: RuntimeError: boom", "b": "done"}
  assert ran == [os.path.join(str(tmp_path), "b")]


def test_point_names_and_launch_commands():
  assert sweep.point_name({"rl.loss": "rest", "rl.tau": 0.5}) == "loss=rest+tau=0.5"
  cmd = sweep.launch_command("configs/arith_tiny.py:smoke", "/runs/a b",
                             {"total_iterations": 2, "rl.loss": "rest", "rollout.partial": False})
  assert shlex.split(cmd) == [
      "python", "-m", "launch.train", "--config=configs/arith_tiny.py:smoke",
      "--workdir=/runs/a b", "--config.total_iterations=2", "--config.rl.loss=rest",
      "--config.rollout.partial=False"]


def test_summary_reads_last_logged_values(tmp_path):
  points = [sweep.Point("p", ()), sweep.Point("missing", ())]
  os.makedirs(tmp_path / "p")
  rows = [{"iteration": 0, "eval/accuracy": 0.1, "rollout/reward_mean": float("nan")},
          {"iteration": 1, "rollout/reward_mean": 0.5, "rollout/response_tokens_mean": 40.0},
          {"iteration": 2, "eval/accuracy": 0.3, "rollout/reward_mean": float("nan")}]
  with open(tmp_path / "p" / "metrics.jsonl", "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in rows))
  got = sweep.summarize(str(tmp_path), points, {"p": "done"})
  assert got[0]["iteration"] == 2 and got[0]["status"] == "done"
  assert (got[0]["eval_acc"], got[0]["reward"], got[0]["resp_tokens"]) == (0.3, 0.5, 40.0)
  assert got[1]["status"] == "no metrics"
  table = sweep.format_table(got).splitlines()
  assert table[0].split() == ["point", "iteration", "eval_acc", "greedy_acc", "reward",
                              "resp_tokens", "status"]
  assert table[1].split()[:6] == ["p", "2", "0.300", "nan", "0.500", "40.000"]


def _sweep_cli(*args, timeout=900):
  return subprocess.run([sys.executable, "-m", "launch.sweep", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


def test_print_only_prints_one_command_per_point(tmp_path):
  out = _sweep_cli(f"--sweep={ABLATIONS}", f"--workdir={tmp_path}", "--print_only", *TINY[:2])
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 4
  for line, name in zip(lines, ["k15-prioritized", "k15-uniform", "rest-prioritized",
                                "rest-uniform"]):
    args = shlex.split(line)
    assert args[:3] == ["python", "-m", "launch.train"]
    assert f"--workdir={tmp_path}/{name}" in args
    assert "--config=configs/arith_tiny.py:smoke" in args
    assert "--config.total_iterations=1" in args
    assert f"--config.rl.loss={name.split('-')[0]}" in args


@pytest.mark.slow
def test_sweep_runs_every_point_and_prints_the_summary(tmp_path):
  out = _sweep_cli(f"--sweep={ABLATIONS}", f"--workdir={tmp_path}", *TINY)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert [r["point"] for r in summary] == ["k15-prioritized", "k15-uniform", "rest-prioritized",
                                           "rest-uniform"]
  for row in summary:
    assert row["status"] == "done" and row["iteration"] == 1
    assert 0.0 <= row["eval_acc"] <= 1.0 and row["resp_tokens"] > 0
    assert row["point"] in out.stdout
    rows = [json.loads(line) for line in (tmp_path / row["point"] / "metrics.jsonl").open()]
    assert [r["iteration"] for r in rows] == [0, 1]
    assert isinstance(rows[1]["train/loss"], float)  # an update ran (NaN is written as null)
