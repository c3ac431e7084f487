"""Automatic code test generation: the report's 7/10 and 9/10 rules, and the
sandboxed pipeline on the small problems of tests/data/testgen_problems.py.

Sandbox runs are kept few (about 120 in all): 4 references x 6 inputs per problem.
"""
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from kimi_jax.data import prompts as prompt_sets
from kimi_jax.verifiers import code, testgen

_spec = importlib.util.spec_from_file_location(
    "testgen_problems", os.path.join(os.path.dirname(__file__), "data", "testgen_problems.py"))
problems = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(problems)

# The report's fractions; 6 inputs, of which at least 5 must become tests
# (the report: 40 of 50). Generous timeouts: none of the programs loops, and
# a loaded machine must not turn a slow start into a failed run.
SMALL = testgen.TestGenConfig(num_tests=6, min_valid_tests=5, timeout_s=30.0,
                              generator_timeout_s=60.0, max_workers=2)


def test_report_thresholds_are_counts_of_ten():
  cfg = testgen.TestGenConfig()
  assert (cfg.num_tests, cfg.num_references, cfg.min_valid_tests) == (50, 10, 40)
  assert testgen.at_least(cfg.test_agreement, 10) == 7
  assert testgen.at_least(cfg.problem_pass, 10) == 9
  assert testgen.at_least(cfg.test_agreement, 4) == 3
  assert testgen.at_least(cfg.problem_pass, 4) == 4


def _outputs(columns):
  """outputs_RI from per-input columns of 10 reference outputs."""
  return [list(row) for row in zip(*columns)]


def test_vote_needs_seven_of_ten_agreeing():
  seven = ["1\n"] * 7 + ["2\n"] * 3
  six = ["1\n"] * 6 + ["2\n"] * 2 + [None] * 2
  failed_runs = ["1\n"] * 6 + [None] * 4  # a failed run agrees with nobody
  v = testgen.vote(_outputs([seven, six, failed_runs]), 0.7)
  assert v.expected_I == ("1\n", None, None)
  assert v.agree_I == (7, 6, 6)
  assert v.valid_I == (True, False, False)
  assert v.passes_R == (1,) * 7 + (0,) * 3


def test_problem_kept_when_nine_of_ten_pass_all_selected_tests():
  cfg = testgen.TestGenConfig(num_tests=3, min_valid_tests=3)
  inputs = ["a\n", "b\n", "c\n"]
  good = ["x\n"] * 10
  one_wrong = ["y\n"] * 9 + ["z\n"]  # reference 9 fails this test
  other_wrong = ["w\n"] * 8 + ["v\n"] + ["w\n"]  # reference 8 fails this one
  tests, reason = testgen.select(inputs, testgen.vote(_outputs([good, one_wrong, good]), 0.7), cfg)
  assert reason == "kept"
  assert tests == [{"input": "a\n", "output": "x\n"}, {"input": "b\n", "output": "y\n"},
                   {"input": "c\n", "output": "x\n"}]
  # Two references each failing one (valid) test: 8/10 pass all -> dropped.
  tests, reason = testgen.select(
      inputs, testgen.vote(_outputs([good, one_wrong, other_wrong]), 0.7), cfg)
  assert len(tests) == 3 and reason == "references_disagree: 8/10 pass all < 9"


def test_problem_dropped_with_too_few_valid_tests():
  cfg = testgen.TestGenConfig(num_tests=3, min_valid_tests=3)
  split = ["p\n"] * 5 + ["q\n"] * 5
  v = testgen.vote(_outputs([["x\n"] * 10, split, ["x\n"] * 10]), 0.7)
  tests, reason = testgen.select(["a", "b", "c"], v, cfg)
  assert [t["input"] for t in tests] == ["a", "c"]
  assert reason == "too_few_valid_tests: 2 < 3"


def test_config_rejects_a_threshold_without_a_unique_majority():
  with pytest.raises(ValueError, match="test_agreement"):
    testgen.TestGenConfig(test_agreement=0.5)
  with pytest.raises(ValueError, match="num_tests"):
    testgen.TestGenConfig(num_tests=0)


def test_references_subsampled_deterministically():
  cfg = testgen.TestGenConfig(seed=3)
  used = testgen.select_references([f"print({i})" for i in range(15)], cfg)
  assert len(used) == 10 and len(set(used)) == 10 and max(used) < 15
  assert used == testgen.select_references([f"print({i})" for i in range(15)], cfg)
  assert used != testgen.select_references([f"print({i})" for i in range(15)],
                                           testgen.TestGenConfig(seed=4))
  assert testgen.select_references(["a", "b"], cfg) == (0, 1)


def test_callable_generator_drops_duplicates_errors_and_huge_inputs():
  def gen(seed):
    if seed == 3:
      raise RuntimeError("boom")
    if seed == 4:
      return 7
    if seed == 5:
      return "x" * 100
    return f"{seed % 2}\n"

  cfg = testgen.TestGenConfig(num_tests=6, max_input_bytes=50)
  inputs, errors = testgen.make_inputs(gen, cfg)
  assert inputs == ["0\n", "1\n"]
  assert errors == {"duplicate": 1, "error: RuntimeError: boom": 1, "error: returned int": 1,
                    "input_too_large": 1}


@pytest.mark.parametrize("problem", problems.PROBLEMS, ids=lambda p: p["name"])
def test_problems_from_the_repo(problem):
  out = testgen.generate_tests(problem["references"], problem["generator"], SMALL)
  assert len(out.inputs) == 6 and out.generator_errors == {}
  assert out.kept == problem["kept"], out.summary()
  # Whatever the verdict, every selected test carries the correct output.
  for test in out.tests:
    assert test["output"] == problem["solve"](test["input"])
  if problem["name"] == "add":
    assert out.reason == "kept" and len(out.tests) == 6
    assert out.passes_R == (6, 6, 6, 6)
  elif problem["name"] in ("sort", "distinct"):
    # Three correct references outvote the bad one on every input...
    assert len(out.tests) == 6 and min(out.agree_I) >= 3
    # ...and the bad one fails, so 3/4 pass all < the 9/10 rule (4 of 4).
    assert out.passes_R[:3] == (6, 6, 6) and out.passes_R[3] < 6
    assert out.reason == "references_disagree: 3/4 pass all < 4"
  else:  # argmax: inputs with a tied maximum split the references 2-2.
    tied = [x for x in out.inputs if x.split().count(max(x.split(), key=int)) > 1]
    assert len(tied) == 3 and not {t["input"] for t in out.tests} & set(tied)
    assert out.reason == "too_few_valid_tests: 3 < 5"


def test_generated_tests_grade_programs_like_the_code_verifier():
  add = problems.ADD
  out = testgen.generate_tests(add["references"][:3], add["generator"],
                               testgen.TestGenConfig(num_tests=3, min_valid_tests=3,
                                                     timeout_s=30.0, max_workers=2))
  assert out.kept
  # The reference printing trailing spaces passes under code.run_tests too.
  assert code.run_tests(add["references"][2], out.tests, timeout_s=30.0).passed == 3
  wrong = "a, b = map(int, input().split())\nprint(a - b)\n"
  assert code.run_tests(wrong, out.tests, timeout_s=30.0, fail_fast=True).passed == 0


def test_source_generator_failures_are_reported_not_raised():
  cfg = testgen.TestGenConfig(num_tests=4, min_valid_tests=1, generator_timeout_s=30.0,
                              timeout_s=30.0, max_workers=2)
  refs = ["print(input())\n"]
  broken = testgen.generate_tests(refs, "def generate(seed):\n  return (", cfg)
  assert not broken.kept and broken.reason.startswith("generator_failed: generator syntax_error")
  assert broken.generator_errors == {"generator syntax_error: '(' was never closed (line 2)": 4}
  # Odd seeds raise; the even ones still make tests. A generator printing on
  # its own stdout does not corrupt the inputs.
  flaky = ("def generate(seed):\n  print('noise')\n"
           "  if seed % 2:\n    raise ValueError(seed)\n  return f'{seed}\\n'\n")
  out = testgen.generate_tests(refs, flaky, cfg)
  assert out.inputs == ("0\n", "2\n") and out.kept
  assert out.generator_errors == {"error: ValueError: 1": 1, "error: ValueError: 3": 1}
  assert [t["output"] for t in out.tests] == ["0\n", "2\n"]


def test_hanging_generator_keeps_the_inputs_made_before_the_timeout():
  # 3 s: seeds 0 and 1 take milliseconds, on any machine; seed 2 never ends.
  cfg = testgen.TestGenConfig(num_tests=4, min_valid_tests=1, generator_timeout_s=3.0,
                              timeout_s=30.0, max_workers=2)
  hang = "def generate(seed):\n  while seed == 2:\n    pass\n  return f'{seed}\\n'\n"
  out = testgen.generate_tests(["print(input())\n"], hang, cfg)
  assert out.inputs == ("0\n", "1\n")
  assert out.generator_errors == {"generator timeout": 2}
  assert len(out.tests) == 2 and out.kept


# ---------------------------------------------------------------- launcher


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(*args):
  env = {**os.environ, "PYTHONPATH": REPO}
  return subprocess.run([sys.executable, "-m", "launch.testgen", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


def _problem_file(path, chosen=("add", "argmax"), **overrides):
  with open(path, "w") as f:
    for p in problems.PROBLEMS:
      if p["name"] in chosen:
        line = {"id": p["name"], "prompt": f"Solve {p['name']}.",
                "references": p["references"], "generator": p["generator"], "tags": ["toy"],
                **overrides}
        f.write(json.dumps(line) + "\n")
  return str(path)


SMALL_FLAGS = ("--num_tests=6", "--min_valid_tests=5", "--timeout_s=30", "--workers=2")


def test_launcher_writes_a_prompt_set_and_a_report(tmp_path):
  src = _problem_file(tmp_path / "problems.jsonl")
  out = tmp_path / "out"
  proc = _launch(f"--problems={src}", f"--out={out}", *SMALL_FLAGS)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "kept 1 of 2 problems" in proc.stdout
  lines = [l.split(" ", 1)[1] for l in proc.stderr.splitlines()]  # less the HH:MM:SS
  assert lines == ["[1/2] add: kept, 6 tests from 6 inputs, 4/4 references pass all",
                   "[2/2] argmax: dropped (too_few_valid_tests: 3 < 5); 3 tests from 6 "
                   "inputs, 4/4 references pass all"], proc.stderr
  kept = prompt_sets.read_jsonl(out / "prompts.jsonl").prompts
  assert [(p.id, p.type, len(p.tests), p.tags) for p in kept] == [("add", "code", 6, ("toy",))]
  for test in kept[0].tests:
    assert test["output"] == problems.ADD["solve"](test["input"])
  rows = [json.loads(l) for l in (out / "report.jsonl").read_text().splitlines()]
  assert [(r["id"], r["kept"], r["valid_tests"]) for r in rows] == [("add", True, 6),
                                                                   ("argmax", False, 3)]
  assert "| argmax | no | too_few_valid_tests: 3 < 5 |" in (out / "report.md").read_text()


def test_launcher_resumes_where_it_stopped(tmp_path):
  src = _problem_file(tmp_path / "problems.jsonl")
  out = tmp_path / "out"
  assert _launch(f"--problems={src}", f"--out={out}", *SMALL_FLAGS).returncode == 0
  whole = (out / "prompts.jsonl").read_text(), (out / "report.jsonl").read_text()
  journal = (out / "results.jsonl").read_text().splitlines(keepends=True)
  # What a kill during the second problem leaves: its line half written.
  (out / "results.jsonl").write_text("".join(journal[:2]) + journal[2][:40])
  for name in ("prompts.jsonl", "report.jsonl", "report.md"):
    (out / name).unlink()
  again = _launch(f"--problems={src}", f"--out={out}", *SMALL_FLAGS)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resuming: 1 of 2 problems already done" in again.stderr
  assert ((out / "prompts.jsonl").read_text(), (out / "report.jsonl").read_text()) == whole
  # Other settings: the journal is not theirs.
  other = _launch(f"--problems={src}", f"--out={out}", "--num_tests=7")
  assert other.returncode == 2 and "written for other settings" in other.stderr
  assert len(other.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("edit,pattern", [
    ({"references": []}, r"problems.jsonl:1: field 'references': missing or empty"),
    ({"generator": 3}, r"problems.jsonl:1: field 'generator': expected a non-empty string"),
    ({"tags": "toy"}, r"problems.jsonl:1: field 'tags': expected a list of strings"),
    ({"referencs": ["x"]}, r"problems.jsonl:1: field 'referencs': unknown field"),
])
def test_launcher_bad_input_is_one_line(tmp_path, edit, pattern):
  src = _problem_file(tmp_path / "problems.jsonl", chosen=("add",), **edit)
  proc = _launch(f"--problems={src}", f"--out={tmp_path / 'out'}")
  assert proc.returncode == 2, proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
  assert re.search(pattern, proc.stderr), proc.stderr


def test_launcher_other_mistakes_are_one_line(tmp_path):
  src = _problem_file(tmp_path / "problems.jsonl", chosen=("add",))
  with open(src, "a") as f:
    f.write(open(src).read())  # the same id twice
  for args, pattern in (
      ([f"--problems={src}", f"--out={tmp_path / 'o'}"], r"duplicate 'add' \(first on line 1\)"),
      ([f"--problems={tmp_path / 'none.jsonl'}", f"--out={tmp_path / 'o'}"], "does not exist"),
      ([f"--problems={src}"], "--out is required"),
      ([f"--problems={src}", f"--out={tmp_path / 'o'}", "--test_agreement=0.5"],
       "test_agreement must be in"),
  ):
    proc = _launch(*args)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert re.search(pattern, proc.stderr), proc.stderr
