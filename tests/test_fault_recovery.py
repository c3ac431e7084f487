"""Faults while writing state: kill -9 mid checkpoint, mid metrics row, a full disk.

Each fault is injected at a named point (kimi_jax/faults.py) in a child
process, then the same work is done again: it must resume from the last
complete state with nothing already written lost, or stop with an error
naming the path. The full disk is a small tmpfs (needs root; skipped
otherwise). The curation kill is in test_curation.py; the whole trainer
through all of them in `test_trainer_survives_kills_and_a_full_disk`.
"""
import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid

import pytest

from kimi_jax import faults

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child(code, fault=None, cwd=REPO, args=()):
  env = {**os.environ, "PYTHONPATH": REPO}
  env.pop(faults.ENV, None)
  if fault:
    env[faults.ENV] = fault
  return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=600)


@contextlib.contextmanager
def tmpfs(path, size):
  """A tmpfs of `size` at `path` (a real full disk: ENOSPC), or skip."""
  path.mkdir(parents=True, exist_ok=True)
  if os.geteuid() != 0:
    pytest.skip("mounting a tmpfs needs root")
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                           capture_output=True, text=True)
  if mounted.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path, size):
  subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


_CHECKPOINTS = """\
import sys
import numpy as np
from kimi_jax.checkpointing import Checkpointer
directory, steps = sys.argv[1], [int(s) for s in sys.argv[2].split(",")]
params = {"w": np.arange(300_000, dtype=np.float32)}
with Checkpointer(directory, keep=None) as ckpt:
  restored = ckpt.restore_or_none(params_like=params, opt_state_like=params)
  print("restored", None if restored is None else restored.step, flush=True)
  for step in steps:
    ckpt.save(step, params={"w": params["w"] + step}, opt_state=params,
              host_state={"step": step})
    print("saved", step, flush=True)
"""


def test_kill_during_a_checkpoint_write_resumes_from_the_step_before(tmp_path):
  directory = str(tmp_path / "ckpt")
  killed = _child(_CHECKPOINTS, "checkpoint_write@2", args=(directory, "0,1,2"))
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  assert killed.stdout == "restored None\nsaved 0\nsaved 1\n"
  left = sorted(os.listdir(directory))
  assert "2" not in left and any(n.startswith("2.orbax-checkpoint-tmp") for n in left), left
  again = _child(_CHECKPOINTS, args=(directory, "2,3"))  # the same work, again
  assert again.returncode == 0, again.stderr[-2000:]
  assert again.stdout == "restored 1\nsaved 2\nsaved 3\n"
  assert sorted(os.listdir(directory)) == ["0", "1", "2", "3"]  # the half-written one is gone


_METRICS = """\
import sys
from kimi_jax.metrics import MetricsWriter
with MetricsWriter(sys.argv[1], tensorboard=False) as w:
  w.truncate_after(int(sys.argv[2]) - 1)  # what the trainer does on resume
  for it in range(int(sys.argv[2]), int(sys.argv[3])):
    w.write(it, {"train/loss": 1.0 / (it + 1), "note": "x" * 50})
"""


def _rows(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def test_kill_during_a_metrics_write_keeps_every_finished_row(tmp_path):
  killed = _child(_METRICS, "metrics_write@3", args=(str(tmp_path), "0", "6"))
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  data = (tmp_path / "metrics.jsonl").read_bytes()
  assert not data.endswith(b"\n")  # row 3 is half written
  again = _child(_METRICS, args=(str(tmp_path), "3", "6"))
  assert again.returncode == 0, again.stderr[-2000:]
  assert [r["iteration"] for r in _rows(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3, 4, 5]
  orphaned = _rows(tmp_path / "metrics.jsonl.orphaned")
  assert len(orphaned) == 1 and orphaned[0]["torn_line"].startswith('{"iteration":3')


def _used(path):
  st = os.statvfs(path)
  return (st.f_blocks - st.f_bfree) * st.f_frsize


def test_full_disk_during_a_checkpoint_write_names_the_path_and_keeps_the_rest(tmp_path):
  with tmpfs(tmp_path / "disk", "64m") as disk:
    directory = str(disk / "ckpt")
    first = _child(_CHECKPOINTS, args=(directory, "0"))
    assert first.returncode == 0, first.stderr[-2000:]
    step = _used(disk)  # what one step takes, whatever orbax's format
    remount(disk, f"{2 * step + step // 2}")  # room for one more step, not two
    full = _child(_CHECKPOINTS, args=(directory, "1,2,3"))
    assert full.returncode == 1
    assert full.stdout == "restored 0\nsaved 1\n"
    last = full.stderr.strip().splitlines()[-1]
    assert "[Errno 28] no space left on device while writing checkpoint step 2" in last
    assert directory in last and "steps [0, 1] are intact" in last
    assert sorted(os.listdir(directory)) == ["0", "1"]  # the partial step 2 removed
    remount(disk, "64m")  # space freed: the same work again picks up after step 1
    again = _child(_CHECKPOINTS, args=(directory, "2,3"))
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout == "restored 1\nsaved 2\nsaved 3\n"


def test_full_disk_during_a_metrics_write_names_the_file(tmp_path):
  with tmpfs(tmp_path / "disk", "64k") as disk:
    (disk / "filler").write_bytes(b"\0" * (64 * 1024 - 4096))  # one page left
    code = ("import sys\nfrom kimi_jax.metrics import MetricsWriter\n"
            "w = MetricsWriter(sys.argv[1], tensorboard=False)\n"
            "for it in range(1000):\n  w.write(it, {'note': 'x' * 500})\n")
    proc = _child(code, args=(str(disk),))
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert "No space left on device" in last and str(disk / "metrics.jsonl") in last


def _launch(workdir, fault=None):
  env = {**os.environ, "PYTHONPATH": REPO, "PYTHONUNBUFFERED": "1"}
  env.pop(faults.ENV, None)
  if fault:
    env[faults.ENV] = fault
  return subprocess.run([sys.executable, "-m", "launch.train",
                         "--config=configs/arith_tiny.py:smoke", f"--workdir={workdir}"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)


def _comparable(rows):
  return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


@pytest.mark.slow
def test_trainer_survives_kills_and_a_full_disk(tmp_path):
  """The main job, one workdir, four faults in a row, each followed by the
  same command: killed while writing checkpoint 2, killed mid metrics row 3,
  a full disk at checkpoint 4 (a one-line error naming the directory), then
  space freed. The rows at the end equal an uninterrupted run's, bit for bit."""
  ref = _launch(tmp_path / "ref")
  assert ref.returncode == 0, ref.stderr[-3000:]
  want = _comparable(_rows(tmp_path / "ref" / "metrics.jsonl"))
  with tmpfs(tmp_path / "disk", "512m") as disk:
    run = disk / "run"
    killed = _launch(run, fault="checkpoint_write@2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert sorted(n for n in os.listdir(run / "checkpoints") if n.isdigit()) == ["0"]

    killed = _launch(run, fault="metrics_write@3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert "Resumed from iteration 0" in killed.stderr
    assert not (run / "metrics.jsonl").read_bytes().endswith(b"\n")

    st = os.statvfs(disk)
    filler = disk / f"filler_{uuid.uuid4().hex}"
    filler.write_bytes(b"\0" * (st.f_bavail * st.f_frsize - (2 << 20)))  # 2 MB left
    full = _launch(run)
    assert full.returncode == 1, full.stderr[-3000:]
    # The error is the last line of ours; orbax may still warn at interpreter
    # exit (an unawaited write coroutine), after it.
    lines = [l for l in full.stderr.strip().splitlines() if "RuntimeWarning" not in l]
    last = lines[-1]
    assert last.startswith("error: [Errno 28] no space left on device while writing "
                           "checkpoint step 4 (steps [0, 2] are intact)"), last
    assert str(run / "checkpoints") in last and "Traceback" not in full.stderr

    filler.unlink()
    done = _launch(run)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Resumed from iteration 2" in done.stderr
    assert _comparable(_rows(run / "metrics.jsonl")) == want
