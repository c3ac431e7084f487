r"""Generate tests for code problems from reference solutions and an input generator.

  python -m launch.testgen --problems=problems.jsonl --out=/tmp/testgen
  python -m launch.testgen --problems=problems.jsonl --out=/tmp/testgen \
      --num_tests=20 --min_valid_tests=15 --timeout_s=5

Per problem (report §2.3.5, kimi_jax/verifiers/testgen.py): the generator
writes --num_tests inputs; --num_references reference solutions run on each
in the sandbox; an input whose output at least --test_agreement of them agree
on becomes a test; the problem is kept when at least --problem_pass of them
pass every selected test and at least --min_valid_tests were selected.

The input format and the outputs (prompts.jsonl, report.jsonl, report.md in
--out) are described in kimi_jax/verifiers/testgen_io.py. One line per
problem is printed as it finishes. Rerunning the same command after a kill
skips the problems already finished (--out/results.jsonl); --overwrite
starts over.
"""
import dataclasses
import json
import os
from typing import Sequence

from kimi_jax import cli  # first: quiets TensorFlow / XLA before they load

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top,wrong-import-order

from kimi_jax.verifiers import testgen, testgen_io

_D = testgen.TestGenConfig()  # the flag defaults are the library's
_PROBLEMS = flags.DEFINE_string("problems", None, "Input JSONL, one problem per line.",
                                required=True)
_OUT = flags.DEFINE_string("out", None, "Output directory (its parent must exist).",
                           required=True)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Start over, replacing outputs in --out.")
_NUM_TESTS = flags.DEFINE_integer("num_tests", _D.num_tests, "Inputs asked of the generator.")
_NUM_REFS = flags.DEFINE_integer("num_references", _D.num_references,
                                 "References used (more given: a seeded sample).")
_AGREE = flags.DEFINE_float("test_agreement", _D.test_agreement,
                            "Fraction of references that must agree for an input to be a test.")
_PASS = flags.DEFINE_float("problem_pass", _D.problem_pass,
                           "Fraction of references that must pass all tests to keep a problem.")
_MIN_TESTS = flags.DEFINE_integer("min_valid_tests", _D.min_valid_tests,
                                  "Fewest tests for a kept problem.")
_TIMEOUT = flags.DEFINE_float("timeout_s", _D.timeout_s, "Wall clock per reference run.")
_GEN_TIMEOUT = flags.DEFINE_float("generator_timeout_s", _D.generator_timeout_s,
                                  "Wall clock of the generator's run over all seeds.")
_FIRST_SEED = flags.DEFINE_integer("first_seed", _D.first_seed, "Seed of the first input.")
_SEED = flags.DEFINE_integer("seed", _D.seed, "Seed of the reference subsample.")
_WORKERS = flags.DEFINE_integer("workers", os.cpu_count() or 1, "Sandbox runs at once.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    config = testgen.TestGenConfig(
        num_tests=_NUM_TESTS.value, num_references=_NUM_REFS.value,
        test_agreement=_AGREE.value, problem_pass=_PASS.value,
        min_valid_tests=_MIN_TESTS.value, first_seed=_FIRST_SEED.value, seed=_SEED.value,
        timeout_s=_TIMEOUT.value, generator_timeout_s=_GEN_TIMEOUT.value,
        max_workers=_WORKERS.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  problems = testgen_io.read_problems(_PROBLEMS.value)
  out = testgen_io.out_dir_ready(_OUT.value)
  settings = {k: v for k, v in dataclasses.asdict(config).items()
              if k not in ("max_workers", "limits")}  # these cannot change a result
  done = testgen_io.open_results(out, testgen_io.fingerprint(settings, _PROBLEMS.value),
                                 overwrite=_OVERWRITE.value)
  if done:
    logging.info("resuming: %d of %d problems already done", len(done), len(problems))
  journal = os.path.join(out, testgen_io.RESULTS_FILE)
  for i, problem in enumerate(problems, 1):
    if problem.id not in done:
      result = testgen.generate_tests(list(problem.references), problem.generator, config)
      done[problem.id] = {"id": problem.id, "summary": result.summary(),
                          "tests": list(result.tests)}
      testgen_io.append(journal, done[problem.id])
    logging.info("[%d/%d] %s", i, len(problems),
                 testgen_io.summary_line(problem.id, done[problem.id]["summary"]))
  rows = [testgen_io.report_row(done[p.id]) for p in problems]
  kept = testgen_io.kept_prompts(problems, done)
  paths = {name: os.path.join(out, name) for name in (
      testgen_io.PROMPTS_FILE, testgen_io.REPORT_FILE, testgen_io.REPORT_MD)}
  from kimi_jax.data import prompts  # pylint: disable=g-import-not-at-top
  prompts.write_jsonl(kept, paths[testgen_io.PROMPTS_FILE])
  testgen_io.write_text(paths[testgen_io.REPORT_FILE],
                        "".join(f"{json.dumps(r)}\n" for r in rows))
  testgen_io.write_text(paths[testgen_io.REPORT_MD],
                        testgen_io.markdown(rows, _PROBLEMS.value, settings))
  print(f"kept {len(kept)} of {len(problems)} problems; wrote {paths[testgen_io.PROMPTS_FILE]} "
        f"and {paths[testgen_io.REPORT_MD]}")


if __name__ == "__main__":
  cli.run(main)
