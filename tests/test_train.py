"""Main job tests: config errors, a smoke run, and exact resume after SIGKILL."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from configs import arith_tiny
from kimi_jax.rl import settings, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_settings_from_default_config():
  s = settings.from_config(arith_tiny.get_config())
  assert s.loss.algorithm == "k15" and s.prompts.mode == "prioritized"
  assert s.scheduler.partial and s.model.vocab_size == 264
  s = settings.from_config(arith_tiny.get_config("smoke"))
  assert s.total_iterations == 4


@pytest.mark.parametrize("path,value,msg", [
    ("rl.loss", "reinforce", "config.rl: .*algorithm"),
    ("rl.prompt_sampling", "random", "config.rl: .*mode"),
    ("rollout.num_slots", 0, "config.rollout: .*num_slots"),
    ("optim.microbatch_size", 48, "multiple of config.optim.microbatch_size"),
    ("model.num_kv_heads", 3, "config.model: .*num_kv_heads"),
    ("eval_every", 0, "eval_every"),
])
def test_bad_config_values_name_the_key(path, value, msg):
  config = arith_tiny.get_config()
  node, key = config, path.split(".")
  for k in key[:-1]:
    node = node[k]
  node[key[-1]] = value
  with pytest.raises(settings.ConfigError, match=msg):
    settings.from_config(config)


def test_unknown_key_is_reported():
  config = arith_tiny.get_config()
  config.rollout.temprature = 0.5
  with pytest.raises(settings.ConfigError, match="unknown key.*temprature"):
    settings.from_config(config)


def test_missing_workdir_parent(tmp_path):
  with pytest.raises(FileNotFoundError, match="parent directory .*does not exist"):
    trainer.prepare_workdir(str(tmp_path / "no" / "such" / "run"))


def test_byte_codec_round_trip_and_eos():
  ids = trainer.encode("Q:12+7=")
  assert trainer.decode(ids + [trainer.EOS_ID, 50]) == "Q:12+7="
  assert trainer.decode([263, 260] + ids) == "Q:12+7="  # ids past the bytes are ignored


def _launch(workdir, *extra):
  cmd = [sys.executable, "-m", "launch.train", "--config=configs/arith_tiny.py:smoke",
         f"--workdir={workdir}", *extra]
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def _comparable(row):
  return {k: v for k, v in row.items() if not k.startswith("time/")}


def test_malformed_override_fails_cleanly(tmp_path):
  proc = _launch(tmp_path / "run", "--config.rl.loss=reinforce")
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode != 0
  assert "config.rl" in out and "reinforce" in out
  assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_smoke_run_and_exact_resume_after_sigkill(tmp_path):
  ref_dir, killed_dir = tmp_path / "ref", tmp_path / "killed"
  ref = _launch(ref_dir)
  out, _ = ref.communicate(timeout=1200)
  assert ref.returncode == 0, out[-3000:]
  ref_rows = _rows(ref_dir)
  assert [r["iteration"] for r in ref_rows] == [0, 1, 2, 3, 4]
  for key in ("train/loss", "rollout/reward_mean", "rollout/response_tokens_mean",
              "eval/accuracy"):
    assert key in ref_rows[0]
  assert any(r.get("train/steps", 0) > 0 for r in ref_rows)
  assert (ref_dir / "plots" / "accuracy.png").exists()
  assert [r.get("time/compiles") for r in ref_rows[2:]] == [0, 0, 0]  # no recompiles

  # Kill the second run in the middle of iteration 3 (after checkpoint 2).
  proc = _launch(killed_dir)
  deadline = time.time() + 1200
  while time.time() < deadline:
    # Step directories appear under their final name only once fully written.
    if (killed_dir / "checkpoints" / "2").is_dir():
      break
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    time.sleep(0.2)
  time.sleep(1.0)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  written = _rows(killed_dir)
  assert 3 <= len(written) <= 4, "the kill should land inside iteration 3"

  resumed = _launch(killed_dir)
  out, _ = resumed.communicate(timeout=1200)
  assert resumed.returncode == 0, out[-3000:]
  assert "Resumed from iteration 2" in out
  got = _rows(killed_dir)
  assert [r["iteration"] for r in got] == [0, 1, 2, 3, 4]
  for a, b in zip(got, ref_rows):
    a, b = _comparable(a), _comparable(b)
    assert a.keys() == b.keys()
    for k in a:  # bit-identical: CPU XLA is deterministic and all RNG is (seed, iteration)
      assert a[k] == b[k], (a["iteration"], k, a[k], b[k])
