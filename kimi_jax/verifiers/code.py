"""Code rewards: run a Python program against tests in the sandbox and grade it.

  from kimi_jax.verifiers import code
  result = code.run_tests(source, [{"input": "1 2\\n", "output": "3\\n"}], timeout_s=2.0)
  result.passed, result.total, result.reasons      # 1, 1, []
  code.run_batch([(source, tests), ...], timeout_s=2.0, max_workers=2)

Test forms (a list may mix them):
  {"input": str, "output": str}
      The program reads `input` on stdin; its stdout must equal `output` up
      to trailing whitespace on each line and trailing blank lines.
  {"call": "f(1, 2)", "output": "3"}            (optional "input": stdin)
      The program is executed as a module (so an `if __name__ == "__main__"`
      block does not run), then the expression `call` is evaluated in its
      namespace. `output` is the expected value: a Python literal as `repr`
      would print it ("3", "[1, 2]", "'abc'"), or any JSON value (3, [1, 2]).
      Values compare with ==, lists equal tuples, floats within 1e-6
      relative/absolute. An `output` that is not a literal is compared with
      the returned value when that is a string, else with its repr. The
      value crosses the jail as its repr and is parsed and compared here, so
      a returned object cannot fake equality with a custom __eq__.

Reasons, one per test: "ok", "wrong_answer", "timeout", "output_limit",
"memory_limit", "file_size_limit", "syntax_error: <msg>",
"runtime_error: <last stderr line>" (also "runtime_error: SIGSEGV" etc. for
a crash), "sandbox_error: <detail>", "skipped" (after a failure, with
fail_fast). Each test is its own sandboxed process (see sandbox.py), so
`timeout_s` bounds every test separately and no test sees another's files.
"""
from __future__ import annotations

import ast
import concurrent.futures
import dataclasses
import math
import os
import secrets
import signal
from typing import Any, Mapping, Optional, Sequence

from kimi_jax.verifiers import sandbox

MAX_SOURCE_BYTES = 1 << 20
_MAX_REASON_CHARS = 200
_FLOAT_TOL = 1e-6

# Staged next to main.py for call tests. It runs inside the jail, as the
# untrusted program's own process, so it decides nothing: it only prints
# the repr of the result after a per-run marker.
_CALL_HARNESS = """\
import sys
marker = sys.argv[1]
with open("call.py", encoding="utf-8") as f:
  call = f.read()
namespace = {"__name__": "__solution__", "__file__": "main.py"}
with open("main.py", encoding="utf-8") as f:
  exec(compile(f.read(), "main.py", "exec"), namespace)
text = repr(eval(compile(call, "<call>", "eval"), namespace))
sys.stdout.flush()
sys.stdout.write("\\n" + marker + text + "\\n")
sys.stdout.flush()
"""


@dataclasses.dataclass(frozen=True)
class Outcome:
  """passed, the reason ("ok" when passed) and the wall time of one test."""
  passed: bool
  reason: str
  wall_s: float = 0.0


@dataclasses.dataclass(frozen=True)
class Result:
  """Grades of one program. `passed` of `total` tests passed."""
  passed: int
  total: int
  outcomes: tuple[Outcome, ...]

  @property
  def all_passed(self) -> bool:
    return self.total > 0 and self.passed == self.total

  @property
  def reasons(self) -> list[str]:
    """The reasons of the failing tests, in test order."""
    return [o.reason for o in self.outcomes if not o.passed]


def _validate(tests: Sequence[Mapping[str, Any]]) -> None:
  """Malformed tests are the caller's bug (not the program's): raise clearly."""
  if isinstance(tests, (str, bytes)) or not isinstance(tests, Sequence):
    raise ValueError(f"tests must be a list of dicts, got {type(tests).__name__}")
  for i, test in enumerate(tests):
    if not isinstance(test, Mapping):
      raise ValueError(f"tests[{i}] must be a dict, got {type(test).__name__}")
    if "output" not in test:
      raise ValueError(f"tests[{i}] has no 'output' field")
    if "call" in test and not isinstance(test["call"], str):
      raise ValueError(f"tests[{i}]['call'] must be a str")
    if "call" not in test and not isinstance(test.get("input"), str):
      raise ValueError(f"tests[{i}] needs a str 'input' (stdin test) or a 'call'")
    if "call" not in test and not isinstance(test["output"], str):
      raise ValueError(f"tests[{i}]['output'] must be a str for a stdin test")
    if not isinstance(test.get("input", ""), str):
      raise ValueError(f"tests[{i}]['input'] must be a str")


def _normalize_stdout(text: str) -> list[str]:
  lines = [line.rstrip() for line in text.splitlines()]
  while lines and not lines[-1]:
    lines.pop()
  return lines


def _last_line(stderr: bytes) -> str:
  lines = [l.strip() for l in stderr.decode("utf-8", "replace").splitlines()]
  lines = [l for l in lines if l]
  return lines[-1][:_MAX_REASON_CHARS] if lines else ""


def _values_equal(a: Any, b: Any) -> bool:
  if isinstance(a, bool) or isinstance(b, bool):
    return a == b
  if isinstance(a, (int, float)) and isinstance(b, (int, float)):
    return a == b or math.isclose(a, b, rel_tol=_FLOAT_TOL, abs_tol=_FLOAT_TOL)
  if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
    return len(a) == len(b) and all(_values_equal(x, y) for x, y in zip(a, b))
  if isinstance(a, dict) and isinstance(b, dict):
    return a.keys() == b.keys() and all(_values_equal(a[k], b[k]) for k in a)
  try:
    return bool(a == b)  # literals only: sets, str, None, complex, bytes
  except Exception:  # pylint: disable=broad-except
    return False


_NOT_A_LITERAL = object()


def _literal(text: str) -> Any:
  try:
    return ast.literal_eval(text.strip())
  except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
    return _NOT_A_LITERAL


def _call_matches(result_repr: str, expected: Any) -> bool:
  actual = _literal(result_repr)
  if isinstance(expected, str):
    wanted = _literal(expected)
    if wanted is _NOT_A_LITERAL:  # e.g. "abc" meant as a plain string
      if isinstance(actual, str):
        return actual.strip() == expected.strip()
      return result_repr.strip() == expected.strip()
  else:
    wanted = expected
  return actual is not _NOT_A_LITERAL and _values_equal(actual, wanted)


def _failure_reason(run: sandbox.Run) -> Optional[str]:
  """Why a finished run failed before its output is even looked at (None: it ran fine)."""
  if run.setup_error is not None:
    return f"sandbox_error: {run.setup_error}"[:_MAX_REASON_CHARS]
  if run.timed_out:
    return "timeout"
  if run.output_overflow:
    return "output_limit"
  if run.signal is not None:
    if run.signal == signal.SIGXCPU:  # the CPU rlimit
      return "timeout"
    if run.signal == signal.SIGXFSZ:
      return "file_size_limit"
    try:
      name = signal.Signals(run.signal).name
    except ValueError:
      name = f"signal {run.signal}"
    return f"runtime_error: {name}"
  if run.exit_code != 0:
    last = _last_line(run.stderr)
    if "MemoryError" in last or "Cannot allocate memory" in last:
      return "memory_limit"  # RLIMIT_AS turns a huge allocation into MemoryError
    return f"runtime_error: {last or f'exit code {run.exit_code}'}"
  return None


def _run_one(source: bytes, test: Mapping[str, Any], timeout_s: float,
             limits: sandbox.Limits) -> Outcome:
  stdin = test.get("input", "").encode("utf-8")
  files = {"main.py": source}
  if "call" in test:
    marker = "@@kimi_result_" + secrets.token_hex(8) + "@@"
    files["harness.py"] = _CALL_HARNESS.encode()
    files["call.py"] = test["call"].encode("utf-8")  # a file: argv is size-capped
    argv = ["python", "-I", "harness.py", marker]
  else:
    argv = ["python", "-I", "main.py"]
  try:
    run = sandbox.run_program(files, argv, stdin, timeout_s, limits)
  except Exception as e:  # pylint: disable=broad-except
    # Host trouble (disk full, fork failing): not the program's fault, but
    # still no crash for the trainer.
    return Outcome(False, f"sandbox_error: {type(e).__name__}: {e}"[:_MAX_REASON_CHARS])
  failure = _failure_reason(run)
  if failure is not None:
    return Outcome(False, failure, run.wall_s)
  stdout = run.stdout.decode("utf-8", "replace")
  if "call" in test:
    at = stdout.rfind(marker)
    if at < 0:
      return Outcome(False, "runtime_error: exited before returning", run.wall_s)
    ok = _call_matches(stdout[at + len(marker):], test["output"])
  else:
    ok = _normalize_stdout(stdout) == _normalize_stdout(test["output"])
  return Outcome(ok, "ok" if ok else "wrong_answer", run.wall_s)


def _syntax_error(source: bytes) -> Optional[str]:
  """Compiling (not running) in this process is safe and saves a sandbox per test."""
  try:
    compile(source, "main.py", "exec", dont_inherit=True)
  except SyntaxError as e:
    return f"syntax_error: {e.msg} (line {e.lineno})"[:_MAX_REASON_CHARS]
  except (ValueError, MemoryError, RecursionError) as e:  # null bytes, absurd nesting
    return f"syntax_error: {type(e).__name__}"
  return None


def run_tests(source: str, tests: Sequence[Mapping[str, Any]], timeout_s: float = 2.0,
              *, limits: sandbox.Limits = sandbox.Limits(),
              fail_fast: bool = False) -> Result:
  """Runs `source` on each test in the sandbox; never raises because of the program.

  timeout_s: wall-clock limit per test (the CPU rlimit is its ceiling).
  fail_fast: stop at the first failure (the rest are "skipped"); for
    all-or-nothing rewards this saves up to (n - 1) * timeout_s.
  Raises ValueError for malformed `tests` (the caller's bug).
  """
  _validate(tests)
  if not isinstance(source, (str, bytes)):
    raise ValueError(f"source must be str or bytes, got {type(source).__name__}")
  encoded = source.encode("utf-8", "replace") if isinstance(source, str) else source
  early = None
  if len(encoded) > MAX_SOURCE_BYTES:
    early = "source_too_large"
  else:
    early = _syntax_error(encoded)
  outcomes = []
  for test in tests:
    if early is not None:
      outcomes.append(Outcome(False, early))
      continue
    outcome = _run_one(encoded, test, timeout_s, limits)
    outcomes.append(outcome)
    if fail_fast and not outcome.passed:
      early = "skipped"
  return Result(sum(o.passed for o in outcomes), len(outcomes), tuple(outcomes))


def run_batch(programs: Sequence[tuple[str, Sequence[Mapping[str, Any]]]],
              timeout_s: float = 2.0, max_workers: Optional[int] = None, *,
              limits: sandbox.Limits = sandbox.Limits(),
              fail_fast: bool = False) -> list[Result]:
  """`run_tests` over (source, tests) pairs, at most `max_workers` programs at once.

  Threads suffice: each one only waits on its sandboxed subprocess. Default
  max_workers: the number of CPUs. Results are in input order.
  """
  for i, item in enumerate(programs):
    if not (isinstance(item, Sequence) and len(item) == 2):
      raise ValueError(f"programs[{i}] must be a (source, tests) pair")
    try:
      _validate(item[1])
    except ValueError as e:
      raise ValueError(f"programs[{i}]: {e}") from None
  workers = max(1, max_workers or os.cpu_count() or 1)
  try:
    sandbox.mode()  # probe once, before the threads race to it
  except Exception:  # pylint: disable=broad-except
    pass  # each test will then report the sandbox_error
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    futures = [pool.submit(run_tests, src, tests, timeout_s, limits=limits,
                           fail_fast=fail_fast) for src, tests in programs]
    return [f.result() for f in futures]
