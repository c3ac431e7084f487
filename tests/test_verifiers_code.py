"""Code verifier: grading (stdin/stdout and call tests, reasons, batches).

The sandbox holding against hostile programs is tested in test_sandbox.py.
"""
import time

import pytest

from kimi_jax.verifiers import code, sandbox

ADD = "a, b = map(int, input().split())\nprint(a + b)\n"
ADD_TESTS = [{"input": "1 2\n", "output": "3\n"},
             {"input": "10 -4\n", "output": "6"},
             {"input": "0 0", "output": "0\n\n"}]
# The limit of runs that are not about time: a slow start on a loaded
# machine must not turn into a "timeout" grade.
ROOMY = 30.0


# ------------------------------------------------------------------ grading

def test_correct_solution_passes():
  result = code.run_tests(ADD, ADD_TESTS, timeout_s=ROOMY)
  assert (result.passed, result.total, result.reasons) == (3, 3, [])
  assert result.all_passed


def test_trailing_whitespace_is_normalised_but_nothing_else():
  src = "print('1 2   ')\nprint('3')\nprint()\n"
  ok = code.run_tests(src, [{"input": "", "output": "1 2\n3"}], ROOMY)
  assert ok.all_passed
  bad = code.run_tests(src, [{"input": "", "output": " 1 2\n3"},
                             {"input": "", "output": "1  2\n3"}], ROOMY)
  assert bad.reasons == ["wrong_answer", "wrong_answer"]


def test_wrong_answer_is_counted_per_test():
  src = "a, b = map(int, input().split())\nprint(a + b if a else 99)\n"
  result = code.run_tests(src, ADD_TESTS, ROOMY)
  assert (result.passed, result.total, result.reasons) == (2, 3, ["wrong_answer"])


def test_call_tests():
  src = ("def f(a, b):\n  return a + b\n"
         "def pair(x):\n  return (x, [x * 0.1])\n"
         "def name():\n  return 'abc'\n"
         "class Solution:\n  def twice(self, x):\n    return 2 * x\n"
         "if __name__ == '__main__':\n  print(input())\n")  # must not run
  tests = [{"call": "f(1, 2)", "output": "3"},
           {"call": "f(1, 2)", "output": 3},
           {"call": "f([1], [2])", "output": "[1, 2]"},
           {"call": "pair(3)", "output": "[3, [0.30000001]]"},  # tuple == list, float tol
           {"call": "name()", "output": "'abc'"},
           {"call": "name()", "output": "abc"},
           {"call": "Solution().twice(21)", "output": "42"},
           {"call": "f(1, 2)", "output": "4"},
           {"call": "f(1)", "output": "1"}]
  result = code.run_tests(src, tests, ROOMY)
  assert result.passed == 7
  assert result.reasons[0] == "wrong_answer"
  assert result.reasons[1].startswith("runtime_error: TypeError")


def test_call_result_cannot_fake_equality():
  src = ("class Liar:\n  def __eq__(self, other):\n    return True\n"
         "  def __repr__(self):\n    return 'Liar()'\n"
         "def f():\n  return Liar()\n")
  result = code.run_tests(src, [{"call": "f()", "output": "5"}], ROOMY)
  assert result.reasons == ["wrong_answer"]


def test_fail_fast_skips_the_rest():
  result = code.run_tests("print(0)", ADD_TESTS, ROOMY, fail_fast=True)
  assert result.reasons == ["wrong_answer", "skipped", "skipped"]


def test_malformed_tests_are_the_callers_error():
  with pytest.raises(ValueError, match=r"tests\[1\]"):
    code.run_tests(ADD, [{"input": "", "output": ""}, {"input": "1"}])
  with pytest.raises(ValueError, match="programs"):
    code.run_batch([(ADD, "not a list")])


def test_batch_keeps_order_and_runs_in_parallel(monkeypatch):
  spans = []
  real = sandbox.run_program

  def timed(*args, **kw):
    start = time.monotonic()
    try:
      return real(*args, **kw)
    finally:
      spans.append((start, time.monotonic()))

  monkeypatch.setattr(sandbox, "run_program", timed)
  sleepy = "import time\ntime.sleep(3.0)\nprint(input())\n"
  programs = [(sleepy, [{"input": str(i), "output": str(i)}]) for i in range(4)]
  programs.append(("print(1/0)", [{"input": "", "output": ""}]))
  results = code.run_batch(programs, timeout_s=30.0, max_workers=4)
  assert [r.passed for r in results] == [1, 1, 1, 1, 0]
  assert results[-1].reasons == ["runtime_error: ZeroDivisionError: division by zero"]
  # The four sleepers were all running at one moment (each sleeps 3 s, so
  # this holds however slowly the machine starts them).
  sleepers = sorted(spans, key=lambda s: s[1] - s[0])[-4:]
  assert max(s for s, _ in sleepers) < min(e for _, e in sleepers)
