"""Throughput of the code sandbox, or (--stress) whether it holds under load.

  python -m bench.code_sandbox --json [--n=200] [--workers=2] [--timeout_s=1]
  python -m bench.code_sandbox --stress --json [--rounds=20] [--workers=4] [--load=2]

Throughput: a deterministic mix of correct solutions, wrong answers,
runtime errors and (1 in 20) infinite loops, over five small tasks with
stdin and function-call tests. The last line (with --json) is one JSON
object: programs per second, wall time, pass counts, failure reasons, and
whether every program got the grade it was built to get.

--stress: `kimi_jax.verifiers.stress` (its docstring says what "contained"
means) for --rounds rounds of the ten hostile programs plus four correct
ones, --workers at a time, while --load busy-loop processes load the
machine (started here, killed at the end). The JSON object is the stress
report plus the machine's load average; containment_failures must be 0.
"""
import collections
import json
import os
import subprocess
import sys
import time

from absl import app, flags

from kimi_jax.verifiers import code, sandbox, stress

_JSON = flags.DEFINE_bool("json", False, "Print one JSON object as the last line.")
_N = flags.DEFINE_integer("n", 200, "Number of programs.")
_WORKERS = flags.DEFINE_integer("workers", os.cpu_count() or 1,
                                "Programs graded at once.")
_TIMEOUT = flags.DEFINE_float("timeout_s", 1.0, "Wall-clock limit per test.")
_STRESS = flags.DEFINE_bool("stress", False, "Run the hostile-program stress check instead.")
_ROUNDS = flags.DEFINE_integer("rounds", 20, "--stress: rounds of the ten hostile programs.")
_LOAD = flags.DEFINE_integer("load", 2, "--stress: busy-loop processes loading the machine.")

# task -> (correct source, wrong source, tests)
_TASKS = {
    "add": ("a, b = map(int, input().split())\nprint(a + b)\n",
            "a, b = map(int, input().split())\nprint(a - b)\n",
            [{"input": f"{a} {b}\n", "output": f"{a + b}\n"}
             for a, b in ((1, 2), (5, 7), (-3, 10))]),
    "reverse": ("print(input()[::-1])\n",
                "print(input())\n",
                [{"input": w + "\n", "output": w[::-1]} for w in ("abc", "kimi", "jax")]),
    "count_words": ("import sys\nprint(len(sys.stdin.read().split()))\n",
                    "import sys\nprint(len(sys.stdin.read().split('  ')))\n",
                    [{"input": t, "output": str(len(t.split()))}
                     for t in ("a b c", "one  two\nthree four", "x")]),
    "fib": ("def fib(n):\n  a, b = 0, 1\n  for _ in range(n):\n    a, b = b, a + b\n"
            "  return a\n",
            "def fib(n):\n  return n\n",
            [{"call": f"fib({n})", "output": str(v)} for n, v in ((0, 0), (7, 13), (20, 6765))]),
    "sort": ("def solve(xs):\n  return sorted(xs)\n",
             "def solve(xs):\n  return xs\n",
             [{"call": f"solve({xs})", "output": str(sorted(xs))}
              for xs in ([3, 1, 2], [5, 4], [1])]),
}
_CRASH = "import sys\nsys.setrecursionlimit(100)\ndef f(n):\n  return f(n + 1)\nf(0)\n"
_LOOP = "while True:\n  pass\n"


def _program(i: int):
  """(source, tests, expected to pass all?) for program i."""
  task = list(_TASKS)[i % len(_TASKS)]
  correct, wrong, tests = _TASKS[task]
  kind = i % 20
  if kind == 19:
    return _LOOP, tests, False
  if kind in (3, 8, 13):
    return _CRASH, tests, False
  if kind in (1, 6, 11, 16, 17):
    return wrong, tests, False
  return correct, tests, True


def _stress() -> dict:
  load = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
          for _ in range(_LOAD.value)]
  try:
    report = stress.run(
        rounds=_ROUNDS.value, timeout_s=max(_TIMEOUT.value, 2.0),
        workers=_WORKERS.value,
        on_round=None if _JSON.value else lambda r, c: print(f"round {r + 1}: {c}", flush=True))
    report["loadavg_1m_at_end"] = os.getloadavg()[0]
  finally:
    for p in load:
      p.kill()
      p.wait()
  return {"bench": "code_sandbox_stress", "load_processes": _LOAD.value, **report}


def main(argv):
  del argv
  if _STRESS.value:
    report = _stress()
    if not _JSON.value:
      for key, value in report.items():
        print(f"{key:>26}: {value}")
    print(json.dumps(report))
    return
  programs = [_program(i) for i in range(_N.value)]
  mode = sandbox.mode()  # the one-time probe is not part of the timing
  start = time.monotonic()
  results = code.run_batch([(src, tests) for src, tests, _ in programs],
                           timeout_s=_TIMEOUT.value, max_workers=_WORKERS.value,
                           fail_fast=True)
  wall_s = time.monotonic() - start
  reasons = collections.Counter(r.split(":")[0] for res in results for r in res.reasons)
  expected = [want for _, _, want in programs]
  report = {
      "bench": "code_sandbox",
      "sandbox_mode": mode,
      "interpreter": sandbox.interpreter(),
      "programs": len(programs),
      "workers": _WORKERS.value,
      "timeout_s": _TIMEOUT.value,
      "wall_s": round(wall_s, 3),
      "programs_per_s": round(len(programs) / wall_s, 2),
      "tests_run": sum(1 for res in results for o in res.outcomes if o.reason != "skipped"),
      "programs_all_passed": sum(res.all_passed for res in results),
      "programs_expected_to_pass": sum(expected),
      "tests_passed": sum(res.passed for res in results),
      "tests_total": sum(res.total for res in results),
      "failure_reasons": dict(sorted(reasons.items())),
      "grades_as_expected": [res.all_passed for res in results] == expected,
  }
  if not _JSON.value:
    for key, value in report.items():
      print(f"{key:>26}: {value}")
  print(json.dumps(report))


if __name__ == "__main__":
  app.run(main)
