"""Fault injection: the process kills itself (SIGKILL) at a named point.

Tests of crash recovery need the crash to land at a known place, on any
machine and under any load; a kill timed by the wall clock lands wherever
the run happens to be. Code that writes state calls `reached(point, step)`
at the places worth crashing in; the environment variable

  KIMI_JAX_FAULT=<point>@<step>[,<point>@<step>...]

makes the matching call kill the process with SIGKILL (no cleanup, no
atexit, no flush: what a power cut or the OOM killer leaves behind). Unset,
`reached` is a dictionary lookup and nothing else.

Points (where each is reached is documented at the call site):
  iteration            kimi_jax/rl/trainer.py: at the start of RL iteration
                       <step>, once every earlier checkpoint write is committed
                       (rows 0..step-1 written, nothing of iteration <step>).
  checkpoint_write     kimi_jax/checkpointing.py: while checkpoint step <step>
                       is being written (its temporary directory exists, it is
                       not finalised; every earlier step is).
  metrics_write        kimi_jax/metrics.py: in the middle of writing the
                       metrics row of iteration <step> (half the line is on
                       disk, fsync'ed, without its newline).
  curation             kimi_jax/data/curation_journal.py: after the <step>-th
                       chunk of model work of this process is journaled.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Callable, Optional

ENV = "KIMI_JAX_FAULT"


def parse(spec: str) -> set[tuple[str, int]]:
  """`"a@3,b@0"` -> {("a", 3), ("b", 0)}; a clear error for anything else."""
  out = set()
  for item in filter(None, (s.strip() for s in spec.split(","))):
    point, sep, step = item.partition("@")
    if not sep or not point or not step.lstrip("-").isdigit():
      raise ValueError(f"${ENV}: {item!r} is not <point>@<step> (e.g. iteration@3)")
    out.add((point, int(step)))
  return out


def _armed() -> set[tuple[str, int]]:
  spec = os.environ.get(ENV, "")
  return parse(spec) if spec else set()


def armed(point: str, step: int) -> bool:
  """Whether `reached(point, step)` will kill (to prepare the state it defines)."""
  return (point, step) in _armed()


def reached(point: str, step: int, settle: Optional[Callable[[], None]] = None) -> None:
  """SIGKILL this process if `point@step` is armed in $KIMI_JAX_FAULT.

  settle: called first when armed, to bring the run to the state the fault
    is defined at (e.g. wait for an asynchronous checkpoint write to commit),
    so the state left behind does not depend on the machine's speed.
  """
  if (point, step) not in _armed():
    return
  if settle is not None:
    settle()
  print(f"[{ENV}] killing this process at {point}@{step}", file=sys.stderr, flush=True)
  os.kill(os.getpid(), signal.SIGKILL)
