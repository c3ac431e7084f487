"""The long2short comparison end to end at toy sizes (configs/long2short_tiny.py:smoke)."""
import json
import os
import subprocess
import sys

import pytest

from configs import long2short_tiny
from kimi_jax.long2short import comparison, report
from kimi_jax.models import params_io

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_smoke_comparison_runs_every_method_and_resumes(tmp_path):
  workdir = tmp_path / "l2s"
  workdir.mkdir()
  summary = comparison.run(long2short_tiny.get_config("smoke"), str(workdir))
  assert list(summary["models"]) == list(report.LABELS)
  for name, m in summary["models"].items():
    assert 0.0 <= m["accuracy"] <= 1.0 and 1.0 <= m["response_tokens_mean"] <= 64.0, name
    assert "accuracy_d1" in m["per_difficulty"]
    # Every method's model is a checkpoint the trainer's init_from reads.
    assert params_io.resolve(summary["models_paths"][name]).kind in ("run", "orbax")
  assert json.loads((workdir / "long2short.json").read_text())["models"] == summary["models"]
  assert (workdir / "plots" / "long2short.png").stat().st_size > 0
  stages = json.loads((workdir / "stages.json").read_text())
  assert set(summary["stage_seconds"]) == set(stages)
  assert stages["rs"]["result"]["kept"] >= 1 and stages["dpo"]["result"]["pairs"] >= 1

  # The same command again resumes: every stage is done, nothing is recomputed.
  proc = subprocess.run(
      [sys.executable, "-m", "launch.long2short", "--config=configs/long2short_tiny.py:smoke",
       f"--workdir={workdir}"], cwd=REPO, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, PYTHONPATH=REPO))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads((workdir / "stages.json").read_text()) == stages
  assert "| long2short RL |" in proc.stdout
