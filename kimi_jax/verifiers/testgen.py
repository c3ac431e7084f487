"""Automatic test cases for code problems (report §2.3.5; method spec §7).

  from kimi_jax.verifiers import testgen
  out = testgen.generate_tests(references, generator, testgen.TestGenConfig())
  out.kept, out.tests            # True, ({"input": "3 4\\n", "output": "7\\n"}, ...)

The report's recipe, per problem: a generator writes `num_tests` (50) inputs;
`num_references` (10) ground-truth submissions run on every input; an input
becomes a test when at least `test_agreement` (7/10) of the submissions print
the same output, which is the test's expected output; the problem is kept
when at least `problem_pass` (9/10) of the submissions pass ALL the selected
tests and at least `min_valid_tests` (40) tests were selected.

Inputs come from `generator`, either
  * Python source defining `generate(seed: int) -> str` (the name is
    `TestGenConfig.generator_function`): model-written, so it runs in the
    sandbox, once for all seeds (a print of its own does no harm); or
  * a callable `seed -> str`, called here (trusted code of the caller).
Seeds are `first_seed, first_seed + 1, ...`; an input seen before is dropped.

Outputs are compared after the code verifier's normalisation (trailing
whitespace per line, trailing blank lines), so a generated test passes
`code.run_tests` exactly when the program agreed with the majority here. A
run that fails (timeout, crash, output limit) agrees with nobody. Each
(reference, input) pair is its own sandboxed process, as in `code.run_tests`.

Axis legend: R references, I inputs.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json
import math
import os
import secrets
from typing import Callable, Optional, Sequence, Union

import numpy as np

from kimi_jax.verifiers import code, sandbox

Generator = Union[str, Callable[[int], str]]

# The code verifier's own rules (run failure, stdout normalisation, compile
# check), so a generated test grades in `code.run_tests` as it voted here.
# pylint: disable=protected-access
_failure_reason, _normalize_stdout = code._failure_reason, code._normalize_stdout
_syntax_error = code._syntax_error
# pylint: enable=protected-access

# Runs the model-written generator in the jail. It decides nothing: it only
# prints each (seed, input) as one JSON line after a per-run marker, flushing
# so the inputs made before a timeout still come back.
_GENERATOR_HARNESS = """\
import json, sys
marker = sys.argv[1]
with open("job.json", encoding="utf-8") as f:
  job = json.load(f)
namespace = {"__name__": "__generator__", "__file__": "gen.py"}
with open("gen.py", encoding="utf-8") as f:
  exec(compile(f.read(), "gen.py", "exec"), namespace)
fn = namespace[job["function"]]
for seed in job["seeds"]:
  try:
    value = fn(seed)
    line = json.dumps([seed, value]) if isinstance(value, str) else json.dumps(
        [seed, None, "returned " + type(value).__name__])
  except Exception as e:
    line = json.dumps([seed, None, type(e).__name__ + ": " + str(e)[:200]])
  sys.stdout.write("\\n" + marker + line + "\\n")
  sys.stdout.flush()
"""


@dataclasses.dataclass(frozen=True)
class TestGenConfig:
  """Thresholds of the report (defaults) and run limits.

  num_tests: inputs asked of the generator (report: 50).
  num_references: submissions used; more given are subsampled with `seed`
    (report: 10).
  test_agreement: fraction of the R used references that must print the
    same output for an input to become a test (report: 7/10). > 0.5, so
    a majority is unique.
  problem_pass: fraction of the R references that must pass every selected
    test for the problem to be kept (report: 9/10).
  min_valid_tests: fewest selected tests for a kept problem (report: 40 of
    50).
  timeout_s: wall clock per reference run; generator_timeout_s: for the
    generator's single run over all seeds.
  max_input_bytes: longer generated inputs are dropped (counted).
  max_workers: concurrent sandbox runs (default: CPU count).
  """
  num_tests: int = 50
  num_references: int = 10
  test_agreement: float = 0.7
  problem_pass: float = 0.9
  min_valid_tests: int = 40
  first_seed: int = 0
  seed: int = 0
  generator_function: str = "generate"
  timeout_s: float = 2.0
  generator_timeout_s: float = 20.0
  max_input_bytes: int = 1 << 20
  max_workers: Optional[int] = None
  limits: sandbox.Limits = sandbox.Limits()

  def __post_init__(self):
    for name in ("num_tests", "num_references"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f"TestGenConfig.{name} must be an int >= 1, got {getattr(self, name)!r}")
    if not 0.5 < self.test_agreement <= 1.0:
      raise ValueError("TestGenConfig.test_agreement must be in (0.5, 1], got "
                       f"{self.test_agreement!r}")
    if not 0.0 < self.problem_pass <= 1.0:
      raise ValueError(f"TestGenConfig.problem_pass must be in (0, 1], got {self.problem_pass!r}")
    if not isinstance(self.min_valid_tests, int) or self.min_valid_tests < 0:
      raise ValueError("TestGenConfig.min_valid_tests must be an int >= 0, got "
                       f"{self.min_valid_tests!r}")
    if self.timeout_s <= 0 or self.generator_timeout_s <= 0:
      raise ValueError("TestGenConfig timeouts must be > 0")


def at_least(fraction: float, n: int) -> int:
  """Smallest count c with c / n >= fraction (7 for 0.7 of 10; the epsilon
  keeps 0.7 * 10 = 7.000000000000001 from asking for 8)."""
  return int(math.ceil(fraction * n - 1e-9))


@dataclasses.dataclass(frozen=True)
class Vote:
  """The agreement of R references on I inputs.

  expected_I: the majority output per input (normalised text), or None when
    no output reached the agreement threshold.
  agree_I: references printing the majority output, per input.
  passes_R: selected tests each reference passes.
  """
  expected_I: tuple
  agree_I: tuple
  passes_R: tuple

  @property
  def valid_I(self) -> tuple:
    return tuple(e is not None for e in self.expected_I)


def vote(outputs_RI: Sequence[Sequence[Optional[str]]], test_agreement: float) -> Vote:
  """Majority vote per input. outputs_RI[r][i]: normalised stdout of
  reference r on input i, or None when the run failed (agrees with nobody)."""
  R = len(outputs_RI)
  I = len(outputs_RI[0]) if R else 0
  need = at_least(test_agreement, R)
  expected, agree = [], []
  for i in range(I):
    counts = collections.Counter(o[i] for o in outputs_RI if o[i] is not None)
    top, n = counts.most_common(1)[0] if counts else (None, 0)
    expected.append(top if n >= max(need, 1) else None)
    agree.append(n)
  passes = tuple(sum(e is not None and o[i] == e for i, e in enumerate(expected))
                 for o in outputs_RI)
  return Vote(tuple(expected), tuple(agree), passes)


@dataclasses.dataclass(frozen=True)
class GeneratedTests:
  """Tests for one problem and why it was kept or dropped.

  tests: the selected tests, {"input": str, "output": str} (stdin/stdout).
  kept: whether the problem passes the report's filters.
  reason: "kept", "no_references", "generator_failed: ...",
    "too_few_valid_tests: v < min", "references_disagree: p/R pass all < need".
  inputs: distinct generated inputs I; agree_I: references agreeing per input.
  passes_R: selected tests each used reference passes (order of
    `references_used`, indices into the given list).
  generator_errors: reason -> count for seeds without a usable input.
  """
  tests: tuple
  kept: bool
  reason: str
  inputs: tuple
  agree_I: tuple
  passes_R: tuple
  references_used: tuple
  generator_errors: dict

  @property
  def references_passing_all(self) -> int:
    return sum(p == len(self.tests) for p in self.passes_R) if self.tests else 0

  def summary(self) -> dict:
    """JSON-ready counts for a curation report."""
    return {"kept": self.kept, "reason": self.reason, "inputs": len(self.inputs),
            "valid_tests": len(self.tests), "references": len(self.references_used),
            "references_passing_all": self.references_passing_all,
            "generator_errors": dict(self.generator_errors)}


def _as_text(lines: list[str]) -> str:
  return "".join(line + "\n" for line in lines)


def make_inputs(generator: Generator, cfg: TestGenConfig) -> tuple[list[str], dict]:
  """Distinct inputs in seed order and a reason -> count of seeds that gave none."""
  seeds = list(range(cfg.first_seed, cfg.first_seed + cfg.num_tests))
  errors = collections.Counter()
  produced = []  # (seed, value or None, error)
  if callable(generator):
    for seed in seeds:
      try:
        produced.append((seed, generator(seed), None))
      except Exception as e:  # pylint: disable=broad-except
        produced.append((seed, None, f"{type(e).__name__}: {e}"[:200]))
  elif isinstance(generator, str):
    # Compiling here is safe and spares a sandbox run for a broken generator.
    failure = _syntax_error(generator.encode("utf-8", "replace"))
    if failure is None:
      produced, failure = _run_generator(generator, seeds, cfg)
    failure = failure and f"generator {failure}"
    if failure is not None:
      errors[failure] += cfg.num_tests - len(produced)
  else:
    raise ValueError("generator must be Python source or a callable, got "
                     f"{type(generator).__name__}")
  inputs, seen = [], set()
  for _, value, error in produced:
    if error is not None or not isinstance(value, str):
      errors["error: " + (error or f"returned {type(value).__name__}")] += 1
    elif len(value.encode("utf-8", "replace")) > cfg.max_input_bytes:
      errors["input_too_large"] += 1
    elif value in seen:
      errors["duplicate"] += 1
    else:
      seen.add(value)
      inputs.append(value)
  return inputs, dict(errors)


def _run_generator(source: str, seeds: list[int], cfg: TestGenConfig):
  """Runs generator source in the jail: ([(seed, value, error)], failure or None)."""
  marker = "@@kimi_input_" + secrets.token_hex(8) + "@@"
  job = json.dumps({"function": cfg.generator_function, "seeds": seeds}).encode()
  files = {"gen.py": source.encode("utf-8", "replace"), "job.json": job,
           "harness.py": _GENERATOR_HARNESS.encode()}
  # JSON escaping can double an input's size; the cap is for all seeds together.
  limits = dataclasses.replace(
      cfg.limits, output_bytes=max(cfg.limits.output_bytes,
                                   len(seeds) * (2 * cfg.max_input_bytes + 256)))
  try:
    run = sandbox.run_program(files, ["python", "-I", "harness.py", marker], b"",
                              cfg.generator_timeout_s, limits)
  except Exception as e:  # pylint: disable=broad-except
    return [], f"sandbox_error: {type(e).__name__}: {e}"[:200]
  produced = []
  for line in run.stdout.decode("utf-8", "replace").split("\n"):
    if line.startswith(marker):
      try:
        seed, value, *error = json.loads(line[len(marker):])
      except ValueError:
        continue  # a line cut by a kill
      produced.append((seed, value, error[0] if error else None))
  failure = _failure_reason(run)
  if failure is None and len(produced) < len(seeds):
    failure = "runtime_error: exited early"
  return produced, failure


def _reference_output(source: bytes, stdin: str, cfg: TestGenConfig) -> Optional[str]:
  """Normalised stdout of one sandboxed run, or None when it failed."""
  try:
    run = sandbox.run_program({"main.py": source}, ["python", "-I", "main.py"],
                              stdin.encode("utf-8"), cfg.timeout_s, cfg.limits)
  except Exception:  # pylint: disable=broad-except
    return None  # host trouble: this run agrees with nobody
  if _failure_reason(run) is not None:
    return None
  # One canonical text per normalised output, so equal outputs vote together.
  return _as_text(_normalize_stdout(run.stdout.decode("utf-8", "replace")))


def reference_outputs(references: Sequence[str], inputs: Sequence[str],
                      cfg: TestGenConfig) -> list[list[Optional[str]]]:
  """outputs_RI for `vote`: every reference on every input, in the sandbox."""
  encoded = [r.encode("utf-8", "replace") for r in references]
  # A reference that does not compile would fail every run: spare the sandbox.
  broken = [_syntax_error(src) is not None for src in encoded]
  outputs = [[None] * len(inputs) for _ in references]
  jobs = [(r, i) for r in range(len(references)) if not broken[r] for i in range(len(inputs))]
  if not jobs:
    return outputs
  workers = max(1, cfg.max_workers or os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    futures = {pool.submit(_reference_output, encoded[r], inputs[i], cfg): (r, i) for r, i in jobs}
    for future, (r, i) in futures.items():
      outputs[r][i] = future.result()
  return outputs


def select_references(references: Sequence[str], cfg: TestGenConfig) -> tuple[int, ...]:
  """Indices of the references used: all, or `num_references` drawn with `seed`."""
  if len(references) <= cfg.num_references:
    return tuple(range(len(references)))
  rng = np.random.default_rng(cfg.seed)
  return tuple(sorted(int(i) for i in rng.choice(len(references), cfg.num_references,
                                                 replace=False)))


def generate_tests(references: Sequence[str], generator: Generator,
                   cfg: TestGenConfig = TestGenConfig()) -> GeneratedTests:
  """Tests for one problem from its reference solutions and input generator.

  references: Python programs (stdin -> stdout) believed correct.
  generator: source defining `generate(seed) -> str`, or such a callable.
  Never raises because of the references or a source generator; a bad
  argument (not a list of str, a generator of the wrong type) raises
  ValueError.
  """
  if isinstance(references, str) or not all(isinstance(r, str) for r in references):
    raise ValueError("references must be a list of Python source strings")
  used = select_references(references, cfg)
  if not used:
    return GeneratedTests((), False, "no_references", (), (), (), (), {})
  inputs, gen_errors = make_inputs(generator, cfg)

  def result(tests, kept, reason, agree=(), passes=()):
    return GeneratedTests(tuple(tests), kept, reason, tuple(inputs), tuple(agree),
                          tuple(passes), used, gen_errors)

  if not inputs:
    failures = ", ".join(sorted(gen_errors)) or "no inputs"
    return result((), False, f"generator_failed: {failures}"[:300])
  v = vote(reference_outputs([references[r] for r in used], inputs, cfg), cfg.test_agreement)
  tests, reason = select(inputs, v, cfg)
  return result(tests, reason == "kept", reason, v.agree_I, v.passes_R)


def select(inputs: Sequence[str], v: Vote, cfg: TestGenConfig) -> tuple[list[dict], str]:
  """The tests (valid inputs with their majority output) and the problem's
  verdict: "kept" or why not, by `min_valid_tests` and `problem_pass`."""
  tests = [{"input": x, "output": e} for x, e in zip(inputs, v.expected_I) if e is not None]
  passing = sum(p == len(tests) for p in v.passes_R) if tests else 0
  need = at_least(cfg.problem_pass, len(v.passes_R))
  if len(tests) < max(cfg.min_valid_tests, 1):
    return tests, f"too_few_valid_tests: {len(tests)} < {max(cfg.min_valid_tests, 1)}"
  if passing < need:
    return tests, f"references_disagree: {passing}/{len(v.passes_R)} pass all < {need}"
  return tests, "kept"
