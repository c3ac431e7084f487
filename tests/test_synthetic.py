"""Synthetic tasks: exact answers, traces that verify, byte budgets, disjoint splits."""
import collections
import json
import re

import numpy as np
import pytest

from kimi_jax.data import synthetic as S

CELLS = [(t, d) for t in S.TASKS for d in range(1, S.MAX_DIFFICULTY[t] + 1)]


def _problems(task, d, n=150, seed=0):
  rng = np.random.default_rng([seed, d, len(task)])
  return [S.make_problem(task, rng, d) for _ in range(n)]


@pytest.mark.parametrize("task,d", CELLS)
def test_answers_are_exact(task, d):
  for p in _problems(task, d):
    assert p.difficulty == d and p.task == task
    if task == "countdown":
      nums, target = p.body.split(" to ")
      assert eval(p.answer) == int(target)  # pylint: disable=eval-used
      assert sorted(re.findall(r"\d+", p.answer)) == sorted(nums.split(","))
      assert len(nums.split(",")) == d + 1
    else:
      assert str(eval(p.body)) == p.answer  # Python precedence = ours  # pylint: disable=eval-used
      assert len(re.findall(r"[-+*]", p.body)) == (1 if task == "add" else d)
    if task == "add":
      assert all(len(x) == d for x in p.body.split("+"))


@pytest.mark.parametrize("task,d", CELLS)
@pytest.mark.parametrize("error_rate", [0.0, 0.3])
def test_traces_verify_and_fit_budgets(task, d, error_rate):
  rng = np.random.default_rng(1)
  for p in _problems(task, d):
    assert len(p.prompt.encode()) <= S.MAX_PROMPT_BYTES
    for response in (S.long_cot(p, rng, error_rate), S.short_cot(p)):
      assert response.isascii()
      assert len(response) <= S.MAX_RESPONSE_BYTES
      assert response.endswith(S.TERMINATOR) and response.count(S.TERMINATOR) == 1
      assert response.count(S.ANSWER_TAG) == 1
      assert S.extract_answer(response) == p.answer
      assert S.reward(p, response) == 1.0
    assert S.long_cot(p, rng, error_rate)[0] != "A"  # the first byte tells the mode


@pytest.mark.parametrize("task", S.TASKS)
def test_slips_are_corrected(task):
  rng = np.random.default_rng(2)
  for p in _problems(task, S.MAX_DIFFICULTY[task], n=50):
    trace = S.long_cot(p, rng, error_rate=1.0)  # every step slips once
    clean = S.long_cot(p, np.random.default_rng(3), error_rate=0.0)
    assert S.CORRECTION in trace and len(trace) <= S.MAX_RESPONSE_BYTES
    for wrong, right in re.findall(r"=(\d+)" + S.CORRECTION + r"[^=]+=(\d+)", trace):
      assert wrong != right
    assert S.reward(p, trace) == 1.0
    if task != "countdown":  # countdown draws its misses from rng too
      assert re.sub(r"=\d+" + S.CORRECTION + r"[^=]+=", "=", trace) == clean


@pytest.mark.parametrize("task", S.TASKS)
def test_long_cot_grows_with_difficulty(task):
  rng = np.random.default_rng(4)
  means = [np.mean([len(S.long_cot(p, rng, 0.1)) for p in _problems(task, d, n=200)])
           for d in range(1, S.MAX_DIFFICULTY[task] + 1)]
  assert all(a < b for a, b in zip(means, means[1:])), means
  assert means[-1] >= 70  # the hardest level is a long trace, not a one-liner


def test_determinism():
  a = S.make_splits(7, 300, 100, tasks=S.TASKS)
  b = S.make_splits(7, 300, 100, tasks=S.TASKS)
  assert a == b
  assert S.make_splits(8, 300, 100, tasks=S.TASKS) != a
  p = a[0][0]
  assert S.long_cot(p, np.random.default_rng(5), 0.5) == S.long_cot(p, np.random.default_rng(5), 0.5)
  # The id is a pure function of the content.
  p = S.make_problem("add", np.random.default_rng(0), 2)
  assert p == S._problem("add", "86+67", "153", 2)  # pylint: disable=protected-access
  assert p.id == "add-5e0f20c0c9d7"  # pinned: ids name problems in checkpoints


def test_splits_never_overlap():
  train, heldout = S.make_splits(0, 4000, 1000, tasks=S.TASKS)
  train_keys = [S.canonical_key(p) for p in train]
  heldout_keys = [S.canonical_key(p) for p in heldout]
  assert not set(train_keys) & set(heldout_keys)
  assert len(set(train_keys)) == len(train_keys)
  assert len(set(heldout_keys)) == len(heldout_keys)
  assert not {p.prompt for p in train} & {p.prompt for p in heldout}
  # Every cell gets its share; only one-step cells (1-digit add: 55 problems) run short.
  for problems, n in ((train, 4000), (heldout, 1000)):
    counts = collections.Counter((p.task, p.difficulty) for p in problems)
    assert set(counts) == set(CELLS)
    assert all(c >= n // len(CELLS) for (_, d), c in counts.items() if d > 1), counts
    assert all(c >= 10 for c in counts.values()), counts
  # Held-out does not move when the train size changes.
  assert S.make_splits(0, 100, 1000, tasks=S.TASKS)[1] == heldout


def test_canonical_key_is_commutative_for_add():
  a = S._problem("add", "47+38", "85", 2)  # pylint: disable=protected-access
  b = S._problem("add", "38+47", "85", 2)  # pylint: disable=protected-access
  assert a.id != b.id and S.canonical_key(a) == S.canonical_key(b)
  # The same content under another task is the same problem.
  c = S._problem("chain", "38+47", "85", 1)  # pylint: disable=protected-access
  assert S.canonical_key(c) == S.canonical_key(a)
  d = S._problem("chain", "7-3", "4", 1)  # pylint: disable=protected-access
  assert S.canonical_key(d) != S.canonical_key(S._problem("chain", "3-7", "-4", 1))  # pylint: disable=protected-access


def test_make_splits_difficulties_and_errors():
  train, heldout = S.make_splits(1, 40, 20, difficulties=(3, 4))
  assert {p.difficulty for p in train + heldout} == {3, 4}
  assert {p.task for p in train} == set(S.DEFAULT_TASKS)
  with pytest.raises(ValueError, match="difficulty"):
    S.make_splits(1, 10, 10, difficulties=(9,))
  with pytest.raises(ValueError, match="unknown synthetic task"):
    S.make_splits(1, 10, 10, tasks=("nope",))
  with pytest.raises(ValueError, match="difficulty"):
    S.make_problem("add", np.random.default_rng(0), 0)


@pytest.mark.parametrize("response", [
    "", "85", "7+8=15;c1 r5\n", "A:", "A: \n", "A:\n85", "A:12;3+4=7\n", "A:12 wait\n",
    "A:abc\n", "work;A:8 5\n", "\nA:85",
])
def test_extract_answer_malformed(response):
  assert S.extract_answer(response) is None


def test_extract_answer_wellformed():
  assert S.extract_answer("7+8=15;c1 r5;A:15\n") == "15"
  assert S.extract_answer("A:15") == "15"  # terminator stripped by the sampler
  assert S.extract_answer("A:14 wait A:15\n") == "15"  # the last answer counts
  assert S.extract_answer("A:15\nA:16\n") == "15"  # nothing after the terminator
  assert S.extract_answer("A:(3+5)*4\n") == "(3+5)*4"


def test_countdown_accepts_any_valid_expression():
  p = S._problem("countdown", "3,4,5 to 17", "5*4-3", 2)  # pylint: disable=protected-access
  assert S.reward(p, "A:4*5-3\n") == 1.0
  assert S.reward(p, "A:(4*5)-3\n") == 1.0
  for bad in ("A:5*4\n",          # a number unused
              "A:5*4-3+0\n",      # a number not given
              "A:5*4-3-3+3\n",    # a number used twice
              "A:(5+4)*3\n",      # wrong value
              "A:(5*4-3\n", "A:5**4\n", "A:" + "(" * 500 + "3\n"):
    assert S.reward(p, bad) == 0.0, bad
  rng = np.random.default_rng(0)
  assert S.reward(p, S.long_cot(p, rng, 0.5)) == 1.0


def test_sft_response_mix():
  rng = np.random.default_rng(0)
  p = S._problem("chain", "3+4*2", "11", 2)  # pylint: disable=protected-access
  assert S.sft_response(p, rng, long_frac=0.0) == "A:11\n"
  assert S.sft_response(p, rng, long_frac=1.0) == "4*2=8;3+8;3+8=11;A:11\n"
  mix = [S.sft_response(p, rng, long_frac=0.5)[0] == "A" for _ in range(400)]
  assert 0.4 < np.mean(mix) < 0.6


@pytest.mark.parametrize("task", S.TASKS)
def test_rechecks_redo_the_work_and_rate_zero_draws_nothing(task):
  for p in _problems(task, S.MAX_DIFFICULTY[task], n=60):
    plain_rng, zero_rng = np.random.default_rng(5), np.random.default_rng(5)
    plain = S.long_cot(p, plain_rng, 0.2)
    # recheck_rate=0 is the trace of old, and leaves the generator where it was.
    assert S.long_cot(p, zero_rng, 0.2, recheck_rate=0.0) == plain
    assert zero_rng.random() == plain_rng.random()
    trace = S.long_cot(p, np.random.default_rng(6), 0.0, recheck_rate=1.0)
    assert len(trace) <= S.MAX_RESPONSE_BYTES and S.reward(p, trace) == 1.0
    assert trace.count(S.ANSWER_TAG) == 1 and trace.count(S.TERMINATOR) == 1
    if S.RECHECK in trace.split(S.STEP_SEP) and task != "countdown":
      first, again = trace[:-len(f";A:{p.answer}\n")].split(f";{S.RECHECK};")
      assert first == again  # no slips: the second pass repeats the first exactly
  # Every add/chain trace up to level 3 fits a recheck; the rate is honoured.
  rng = np.random.default_rng(7)
  ps = _problems("add", 3, n=400)
  share = np.mean([S.RECHECK in S.long_cot(q, rng, 0.1, 0.8).split(S.STEP_SEP) for q in ps])
  assert 0.74 < share < 0.86, share


def test_jsonl_round_trip(tmp_path):
  _, heldout = S.make_splits(3, 0, 50, tasks=S.TASKS)
  path = tmp_path / "synthetic.jsonl"
  S.to_jsonl(heldout, path)
  assert S.from_jsonl(path) == heldout
  record = json.loads(path.read_text().splitlines()[0])
  assert record["source"] == "synthetic" and record["type"] == "math"
  assert record["tags"] == [record["task"], f"difficulty:{record['difficulty']}"]


def test_jsonl_errors_name_file_line_field(tmp_path):
  path = tmp_path / "bad.jsonl"
  good = {"id": "x", "task": "add", "prompt": "Q:1+2=", "answer": "3", "difficulty": 1}
  path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "difficulty": "1"}) + "\n")
  with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'difficulty'"):
    S.from_jsonl(path)
  path.write_text("{not json\n")
  with pytest.raises(ValueError, match=r"bad.jsonl:1: not valid JSON"):
    S.from_jsonl(path)
