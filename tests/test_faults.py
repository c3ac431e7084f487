"""Fault injection: the spec parser and the kill itself (in a child process)."""
import os
import signal
import subprocess
import sys

import pytest

from kimi_jax import faults


def test_parse_accepts_lists_and_rejects_junk():
  assert faults.parse("iteration@3, checkpoint@0") == {("iteration", 3), ("checkpoint", 0)}
  assert faults.parse("") == set()
  for bad in ("iteration", "iteration@", "@3", "iteration@x"):
    with pytest.raises(ValueError, match="KIMI_JAX_FAULT.*<point>@<step>"):
      faults.parse(bad)


def _child(spec, point, step):
  code = ("from kimi_jax import faults\n"
          f"faults.reached({point!r}, {step}, settle=lambda: print('settled', flush=True))\n"
          "print('survived', flush=True)\n")
  env = dict(os.environ)
  env.pop(faults.ENV, None)
  if spec:
    env[faults.ENV] = spec
  return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=120)


def test_armed_point_settles_then_kills_and_others_pass():
  killed = _child("iteration@3", "iteration", 3)
  assert killed.returncode == -signal.SIGKILL
  assert killed.stdout == "settled\n"
  assert "killing this process at iteration@3" in killed.stderr
  for spec, point, step in (("iteration@3", "iteration", 2), ("iteration@3", "other", 3),
                            ("", "iteration", 3)):
    ok = _child(spec, point, step)
    assert ok.returncode == 0 and ok.stdout == "survived\n", (spec, point, step, ok.stderr)
