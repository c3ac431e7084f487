"""Does the sandbox hold? Hostile programs, many at once, checked strictly.

  from kimi_jax.verifiers import stress
  report = stress.run(rounds=20, timeout_s=2.0, workers=4)
  report["containment_failures"]      # 0, or the sandbox has a hole

Used by `python -m bench.code_sandbox --stress` and the slow test in
tests/test_verifiers_code.py. Each round grades, through `code.run_batch`
(the verifier pool), the ten programs of `HOSTILE` and `innocents` correct
programs, shuffled, so hostile runs overlap each other and correct ones.
A hostile run is contained when all of these hold:

  * its grade is the expected failure (`Hostile.expect`), never a pass;
  * it came back within `timeout_s + slack_s` (user code does not outlive
    its limit by much);
  * when `run_batch` returns, no process of any run is left: none under
    this caller's sandbox uids, no jail of its (checked at once, without a
    grace period; another process's runs are not ours to count);
  * nothing was written outside the jail, even into a world-writable
    directory of the host, and nothing reached a socket the caller listens
    on at 127.0.0.1.

Beside them, reported apart (`innocent_failures`): every correct program
should pass (a hostile neighbour neither starves nor blocks it), and one
more after the last round. A correct program can also time out because the
machine is loaded by others; give `timeout_s` room for that. The caller's
resident memory should stay flat (`rss_growth_mb`).
"""
from __future__ import annotations

import collections
import dataclasses
import os
import random
import shutil
import socket
import tempfile
import time
from typing import Callable, Optional

from kimi_jax.verifiers import code, sandbox, uids

ADD = "a, b = map(int, input().split())\nprint(a + b)\n"
ADD_TESTS = ({"input": "2 3\n", "output": "5\n"}, {"input": "-7 4\n", "output": "-3\n"})
# The correct programs graded beside the hostile ones need CPU (about 0.1 s
# each), so a hostile neighbour that takes the machine makes them time out.
PRIMES = ("n = int(input())\n"
          "print(sum(all(k % d for d in range(2, int(k ** 0.5) + 1)) for k in range(2, n)))\n")
PRIMES_TESTS = ({"input": "40000\n", "output": "4203\n"},
                {"input": "30000\n", "output": "3245\n"})
# What every hostile program is graded against; none of them prints it.
_NEVER = ({"input": "", "output": "never printed"},)


@dataclasses.dataclass(frozen=True)
class Hostile:
  """A program that tries one way out, and the grade that shows it did not get out."""
  source: str
  expect: Callable[[str], bool]


def _is(*reasons: str) -> Callable[[str], bool]:
  return lambda reason: reason in reasons


def _starts(*prefixes: str) -> Callable[[str], bool]:
  return lambda reason: reason.startswith(prefixes)


def hostile_set(escape_path: str, port: int) -> dict[str, Hostile]:
  """The ten programs. escape_path: a host file (in a world-writable
  directory) none of them may create; port: a 127.0.0.1 port the caller
  listens on, which none of them may reach."""
  return {
      "infinite_loop": Hostile("while True:\n  pass\n", _is("timeout")),
      "sleep": Hostile("import time\ntime.sleep(3600)\n", _is("timeout")),
      # Every child forks on too and leaves the session (a new scheduler
      # autogroup each): the swarm must still count as one run's worth of CPU.
      "fork_swarm": Hostile(
          "import os\nwhile True:\n  try:\n    if os.fork() == 0:\n      os.setsid()\n"
          "  except OSError:\n    pass\n", _is("timeout")),
      "allocate_6gib": Hostile("x = bytearray(6 * 1024 ** 3)\nprint(len(x))\n",
                               _is("memory_limit")),
      "write_outside": Hostile(
          f"import os\nfor path in [{escape_path!r}, os.path.expanduser('~root/kimi_escape')]:\n"
          "  try:\n    open(path, 'w').write('escaped')\n  except OSError:\n    pass\n"
          f"open({escape_path!r}, 'w').write('escaped')\n",
          _starts("runtime_error: PermissionError", "runtime_error: FileNotFoundError",
                  "runtime_error: OSError")),
      "loopback_network": Hostile(
          "import socket\n"
          f"socket.create_connection(('127.0.0.1', {port}), timeout=5).send(b'x')\n"
          "print('connected')\n", _starts("runtime_error: ")),
      "output_1gib": Hostile("chunk = 'x' * 10 ** 6\nfor _ in range(1100):\n"
                             "  print(chunk, end='')\n", _is("output_limit")),
      # The parent exits at once; the daemon would hold the run (and its
      # stdout) for an hour.
      "orphaned_daemon": Hostile(
          "import os, sys, time\nif os.fork() == 0:\n  os.setsid()\n  if os.fork() == 0:\n"
          "    while True:\n      print('daemon', flush=True)\n      time.sleep(0.01)\n"
          "  os._exit(0)\nprint('parent exits')\n", _is("wrong_answer")),
      "syntax_error": Hostile("def f(:\n  pass\n", _starts("syntax_error: ")),
      "abort": Hostile("import os\nos.abort()\n", _is("runtime_error: SIGABRT")),
  }


def sandbox_processes(caller: Optional[int] = None) -> list[int]:
  """Pids of the processes of the sandbox runs of process `caller` (default:
  this one): programs under its private uids, and its jails. Runs of other
  processes (another test session, a trainer) are not counted."""
  caller = os.getpid() if caller is None else caller
  own_uids = uids.block(caller)
  tag = f"caller={caller}".encode()
  pids = []
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      if os.stat(f"/proc/{entry}").st_uid in own_uids:
        pids.append(int(entry))
        continue
      with open(f"/proc/{entry}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
      if sandbox.JAIL_SCRIPT.encode() in argv and tag in argv:
        pids.append(int(entry))
    except OSError:
      pass  # gone meanwhile
  return pids


def _rss_mb() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def run(rounds: int = 20, timeout_s: float = 2.0, workers: int = 4, innocents: int = 4,
        slack_s: float = 3.0, seed: int = 0,
        on_round: Optional[Callable[[int, dict], None]] = None) -> dict:
  """Runs the stress check; returns a JSON-ready report (see the module docstring).

  rounds: batches of 10 hostile + `innocents` correct programs.
  workers: programs graded at once (`run_batch`'s max_workers).
  slack_s: how much longer than `timeout_s` a run may take to come back.
  on_round: called after each round with (round, counts so far), e.g. to print.
  """
  escape_dir = tempfile.mkdtemp(prefix=".kimi_stress_", dir=os.getcwd())
  os.chmod(escape_dir, 0o777)  # anyone on the host may write here; the jail may not
  escape_path = os.path.join(escape_dir, "escaped.txt")
  listener = socket.socket()
  listener.bind(("127.0.0.1", 0))
  listener.listen(64)
  listener.setblocking(False)
  programs = hostile_set(escape_path, listener.getsockname()[1])
  rng = random.Random(seed)
  failures, innocent_failures = collections.Counter(), collections.Counter()
  reasons = collections.defaultdict(collections.Counter)
  max_wall = collections.defaultdict(float)
  hostile_runs = innocent_runs = 0
  rss_start = None
  start = time.monotonic()
  try:
    for r in range(rounds):
      batch = [(name, p.source, _NEVER) for name, p in programs.items()]
      batch += [("innocent", PRIMES, PRIMES_TESTS)] * innocents
      rng.shuffle(batch)
      results = code.run_batch([(src, list(tests)) for _, src, tests in batch],
                               timeout_s=timeout_s, max_workers=workers)
      left = sandbox_processes()  # at once: a run must clean up before it returns
      if left:
        failures[f"processes_left_after_round: {len(left)}"] += 1
      for (name, _, _), res in zip(batch, results):
        wall = max((o.wall_s for o in res.outcomes), default=0.0)
        max_wall[name] = max(max_wall[name], wall)
        if name == "innocent":
          innocent_runs += 1
          if not res.all_passed:
            innocent_failures[res.reasons[0][:80]] += 1
          continue
        hostile_runs += 1
        reason = res.reasons[0] if res.reasons else "passed"
        reasons[name][reason[:60]] += 1
        if not programs[name].expect(reason):
          failures[f"{name}: {reason[:80]}"] += 1
        if wall > timeout_s + slack_s:
          failures[f"{name}: came back after {wall:.1f} s"] += 1
      if os.path.exists(escape_path):
        failures["write_outside: file created on the host"] += 1
        os.unlink(escape_path)
      try:
        while True:
          listener.accept()[0].close()
          failures["loopback_network: connection reached the host"] += 1
      except BlockingIOError:
        pass
      if rss_start is None:
        rss_start = _rss_mb()  # after the first round: thread pool and imports warm
      if on_round is not None:
        on_round(r, {"hostile_runs": hostile_runs,
                     "containment_failures": sum(failures.values())})
    after = code.run_tests(ADD, list(ADD_TESTS), timeout_s=timeout_s)
    if not after.all_passed:
      innocent_failures[f"after the stress: {after.reasons[0][:80]}"] += 1
  finally:
    listener.close()
    shutil.rmtree(escape_dir, ignore_errors=True)
  return {
      "sandbox_mode": sandbox.mode(),
      "rounds": rounds, "workers": workers, "timeout_s": timeout_s, "slack_s": slack_s,
      "hostile_runs": hostile_runs, "innocent_runs": innocent_runs,
      "containment_failures": sum(failures.values()),
      "failures": dict(sorted(failures.items())),
      "innocent_failures": sum(innocent_failures.values()),
      "innocent_failure_reasons": dict(sorted(innocent_failures.items())),
      "reasons": {k: dict(v) for k, v in sorted(reasons.items())},
      "max_wall_s": {k: round(v, 2) for k, v in sorted(max_wall.items())},
      "rss_growth_mb": round(_rss_mb() - (rss_start or _rss_mb()), 1),
      "wall_s": round(time.monotonic() - start, 1),
  }
