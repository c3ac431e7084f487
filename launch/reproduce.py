r"""Reproduce the report's claims at toy scale; rerunning the same command resumes.

  python -m launch.reproduce --suite=toy --workdir=/tmp/repro     # ~25 min per seed, 2 CPU cores
  python -m launch.reproduce --suite=smoke --workdir=/tmp/repro_smoke
  python -m launch.reproduce --suite=toy --workdir=/tmp/repro --report_only

Runs every arm of the suite (kimi_jax/reproduce/suites.py: k1.5, ReST,
uniform and curriculum prompt sampling, length penalty off / without
warm-up, synchronous rollouts) for each seed from that seed's SFT warm-up,
then writes WORKDIR/REPORT.md: a verdict per claim (reproduced / not
reproduced / inconclusive, with the numbers over seeds), figures in
WORKDIR/figures/ and the launch.train command of every run.
"""
import os

from kimi_jax import cli  # first: quiets TensorFlow / XLA before they load

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top,wrong-import-order

flags.DEFINE_string("suite", "toy", "Suite name: toy (the claims) or smoke (the machinery).")
flags.DEFINE_string("workdir", None, "Suite directory (created); rerunning resumes it.")
flags.DEFINE_bool("report_only", False, "Only rewrite REPORT.md from the finished runs.")
flags.DEFINE_bool("compile_cache", True, "Share compiled programs between the suite's runs "
                  "(jax's persistent cache in WORKDIR/jax_cache, or in "
                  "$JAX_COMPILATION_CACHE_DIR when that is set).")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from kimi_jax.reproduce import runner, suites
  from kimi_jax.stages import Stages
  try:
    suite = suites.get(FLAGS.suite)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  workdir = os.path.abspath(FLAGS.workdir)
  if FLAGS.report_only:
    if not os.path.isdir(workdir):
      raise app.UsageError(f"--workdir {workdir} does not exist (no runs to report)")
    path = runner.write_report(suite, workdir, Stages(workdir, "reproduce"))
  else:
    if FLAGS.compile_cache:
      # Every arm compiles the same rollout, update and eval programs.
      import jax
      if not jax.config.jax_compilation_cache_dir:  # the caller's own cache wins
        jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    try:
      path = runner.run(suite, workdir)
    except ValueError as e:  # a broken override, a bad stages.json: one line, exit 2
      cli.fail(str(e))
  logging.info("report: %s", path)
  print(f"report: {path}")


if __name__ == "__main__":
  cli.run(main)
