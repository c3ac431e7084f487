"""Math verifier: extraction, an equivalence table across formats, timeouts from any thread."""
import os
import threading

import pytest

from kimi_jax.verifiers import exact
from kimi_jax.verifiers import math as vmath

LONG_PREFIX = ("Let me think step by step. First we write $x = 2$ and then "
               "compute $x^2 = 4$, so 4 is not yet the result. " * 20)

# (response, reference answer, equivalent?)
EQUIVALENCE_TABLE = [
    # integers, decimals, fractions
    (r"\boxed{42}", "42", True),
    (r"\boxed{42}", "43", False),
    (r"\boxed{-2}", "2", False),
    (r"\boxed{\frac{1}{2}}", "0.5", True),
    (r"\boxed{\dfrac{3}{4}}", "0.75", True),
    (r"\boxed{\tfrac34}", "3/4", True),
    (r"\boxed{0.5}", r"\frac{1}{2}", True),
    (r"\boxed{0.3333333}", "1/3", True),
    (r"\boxed{0.333}", "1/3", False),
    (r"\boxed{\frac{2}{4}}", r"\frac{1}{2}", True),
    (r"\boxed{\frac{1}{3}}", r"\frac{1}{2}", False),
    (r"\boxed{1,000}", "1000", True),
    (r"\boxed{3.50}", "3.5", True),
    (r"\boxed{10^{-3}}", "0.001", True),
    (r"\boxed{2^{10}}", "1024", True),
    (r"\boxed{2^{10}}", "1000", False),
    # percentages
    (r"\boxed{50\%}", "0.5", True),
    ("The answer is 50%.", r"\frac{1}{2}", True),
    (r"\boxed{25\%}", "0.5", False),
    # radicals and constants
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", True),
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\sin(\pi/3)", True),
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}", True),
    (r"\boxed{\sqrt{3}}", r"\sqrt{2}", False),
    (r"\boxed{2\pi}", r"\pi + \pi", True),
    (r"\boxed{\infty}", r"\infty", True),
    # symbolic expressions and equations
    (r"\boxed{(x+1)^2}", "x^2+2x+1", True),
    (r"\boxed{x^2 - 1}", "(x-1)(x+1)", True),
    (r"\boxed{x^2 + 1}", "(x-1)(x+1)", False),
    (r"\boxed{\frac{x}{2}}", "0.5x", True),
    (r"\boxed{x=3}", "3", True),
    (r"\boxed{3}", "x=3", True),
    (r"\boxed{y=2x+1}", "y = 1 + 2x", True),
    (r"\boxed{y=2x+1}", "y = 2x - 1", False),
    # sets, tuples, intervals
    (r"\boxed{\{1,2,3\}}", r"\{3,2,1\}", True),
    (r"\boxed{\{1,2\}}", r"\{1,3\}", False),
    (r"\boxed{(1,2)}", "(2,1)", False),
    (r"\boxed{[1,2)}", "[1, 2)", True),
    (r"\boxed{(1,2]}", "[1,2]", False),
    (r"\boxed{x \in [0, 1]}", "[0,1]", True),
    (r"\boxed{(-\infty, 0) \cup (1, \infty)}", r"(-\infty,0)\cup(1,\infty)", True),
    (r"\boxed{(-\infty, 0) \cup (1, \infty)}", r"(-\infty,0]\cup(1,\infty)", False),
    # text answers
    (r"\boxed{\text{Paris}}", "Paris", True),
    (r"\boxed{A}", "B", False),
    # boxed answers inside long text, nested braces, extraction fallbacks
    (LONG_PREFIX + r"Therefore the answer is $\boxed{\frac{\sqrt{16}}{2}}$.", "2", True),
    (LONG_PREFIX + r"First guess \boxed{3}, but on reflection \boxed{5}.", "5", True),
    (LONG_PREFIX + r"First guess \boxed{3}, but on reflection \boxed{5}.", "3", False),
    (LONG_PREFIX + r"So \boxed{\frac{1}{\frac{1}{2}}} is it.", "2", True),
    (LONG_PREFIX + "So the final answer is 12.", "12", True),
    (LONG_PREFIX + "Final Answer: $\\frac{7}{2}$", "3.5", True),
    (LONG_PREFIX + "which leaves 17 apples", "17", True),
    (LONG_PREFIX + "which leaves 17 apples", "18", False),
    ("I am not sure.", "1", False),
]


def test_table_is_large_and_mixed():
  assert len(EQUIVALENCE_TABLE) >= 40
  assert sum(expected for _, _, expected in EQUIVALENCE_TABLE) >= 15
  assert sum(not expected for _, _, expected in EQUIVALENCE_TABLE) >= 15


@pytest.mark.parametrize("response,answer,expected", EQUIVALENCE_TABLE)
def test_equivalence_table(response, answer, expected):
  verdict = vmath.check(response, answer, timeout_s=5.0)
  assert verdict.correct is expected, verdict
  assert vmath.verify(response, answer) is expected


@pytest.mark.parametrize("text,expected", [
    (r"so \boxed{\frac{a}{b^{2}}} done", r"\frac{a}{b^{2}}"),
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),              # escaped braces don't close the box
    (r"\boxed{1} then \boxed{2}", "2"),              # the last box wins
    (r"\boxed{7} and a cut-off \boxed{\frac{1}{", "7"),  # an unclosed box falls back
    (r"\fbox{9}", "9"),
    (r"\boxed 5 is it", "5"),
    ("The answer is $x^2$, I think.", "x^2"),
    ("Answer: 3.25.", "3.25"),
    ("the final answer is **42**.", "42"),
    ("costs 1,234.5 dollars, or -7/8 of it", "-7/8"),
    ("total 1,234.5 dollars", "1234.5"),
    ("no digits here", None),
])
def test_extract_answer(text, expected):
  assert vmath.extract_answer(text) == expected


def test_reference_may_be_wrapped():
  assert vmath.verify(r"\boxed{0.5}", r"$\frac{1}{2}$")
  assert vmath.verify(r"\boxed{0.5}", r"\boxed{\frac{1}{2}}")


def test_reasons():
  assert vmath.check("no answer at all", "1").reason == "no_answer"
  assert vmath.check(r"\boxed{12}", "12").reason == "exact_match"
  assert vmath.check(r"\boxed{\frac{24}{2}}", "12").reason == "equivalent"
  assert vmath.check(r"\boxed{13}", "12").reason == "not_equivalent"
  too_long = vmath.check(r"\boxed{" + "1+" * 1000 + "1}", "2")
  assert (too_long.correct, too_long.reason) == (False, "answer_too_long")


@pytest.mark.parametrize("response,answer", [
    (None, "1"), (r"\boxed{1}", None), (123, 456), (r"\boxed{1}", ""),
    (r"\boxed{\frac{}{}}", r"\sqrt{}"), ("\\boxed{" + "(" * 500 + "}", "1"),
])
def test_never_raises(response, answer):
  verdict = vmath.check(response, answer, timeout_s=1.0)
  assert verdict.correct is False
  assert isinstance(verdict.reason, str)


def _idle_worker_pids():
  return [w.proc.pid for w in vmath._POOL._idle]  # pylint: disable=protected-access


def test_pathological_power_tower_times_out(monkeypatch):
  """The worker's own timer stops the check: the verdict is a timeout and the
  same worker, still alive, serves the next check. (A generous caller grace,
  so a loaded machine cannot turn this into the caller's hard kill.)"""
  vmath.shutdown()
  vmath.verify(r"\boxed{1}", "1.0")  # one warm worker
  (pid,) = _idle_worker_pids()
  monkeypatch.setattr(vmath, "_HARD_GRACE_S", 120.0)
  verdict = vmath.check(r"The answer is \boxed{9^{9^{9^{9}}}}", "1", timeout_s=1.0)
  assert (verdict.correct, verdict.reason) == (False, "timeout")
  assert _idle_worker_pids() == [pid]
  assert vmath.verify(r"\boxed{\frac{1}{2}}", "0.5")  # the verifier still works


def test_timeout_from_worker_threads(monkeypatch):
  """math_verify's signal.alarm needs the main thread; our timeout must not."""
  monkeypatch.setattr(vmath, "_HARD_GRACE_S", 120.0)  # the workers' own timers decide
  results = {}

  def work(i):
    response = r"\boxed{2^{2^{2^{2^{2^{2}}}}}}" if i % 2 else r"\boxed{\frac{2}{4}}"
    results[i] = vmath.check(response, "0.5", timeout_s=1.0)

  threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert sorted(results) == [0, 1, 2, 3]
  for i, verdict in results.items():
    assert verdict.reason == ("timeout" if i % 2 else "equivalent"), (i, verdict)


def test_hard_timeout_kills_a_wedged_worker(monkeypatch):
  """If the worker's own timer can't stop it (a long C call), the caller kills
  it: with the caller's deadline before the worker's own 1 s timer, the check
  is a timeout, that worker process is gone, and a fresh worker takes over."""
  vmath.shutdown()
  vmath.verify(r"\boxed{1}", "1.0")  # one warm worker
  (pid,) = _idle_worker_pids()
  monkeypatch.setattr(vmath, "_HARD_GRACE_S", -0.7)  # caller gives up at 0.3 s
  verdict = vmath.check(r"\boxed{9^{9^{9^{9}}}}", "1", timeout_s=1.0)
  assert (verdict.correct, verdict.reason) == (False, "timeout")
  assert _idle_worker_pids() == []
  with pytest.raises(ProcessLookupError):
    os.kill(pid, 0)  # killed and reaped, not left to finish
  monkeypatch.undo()
  assert vmath.verify(r"\boxed{\frac{1}{2}}", "0.5")  # a fresh worker takes over
  assert pid not in _idle_worker_pids()


def test_check_batch_matches_check():
  responses = [row[0] for row in EQUIVALENCE_TABLE[:8]]
  answers = [row[1] for row in EQUIVALENCE_TABLE[:8]]
  verdicts = vmath.check_batch(responses, answers, max_workers=2)
  assert [v.correct for v in verdicts] == [row[2] for row in EQUIVALENCE_TABLE[:8]]
  with pytest.raises(ValueError):
    vmath.check_batch(["a"], [], max_workers=1)


# ------------------------------------------------------------------ exact

@pytest.mark.parametrize("response,answer,tag,expected", [
    ("4+3=7;A:7\n", "7", "A:", True),
    ("A:12\n", "7", "A:", False),
    ("3+4*2-5=6;A: 6 \n", "6", "A:", True),
    ("no tag here", "6", "A:", False),
    (r"so \boxed{1  2}", "1 2", None, True),           # whitespace is normalised
    (r"so \boxed{7.0}", "7", None, False),             # nothing else is forgiven
    ("the answer is Paris.", "Paris", None, True),
])
def test_exact(response, answer, tag, expected):
  assert exact.verify(response, answer, tag=tag) is expected
