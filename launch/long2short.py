r"""long2short comparison (report §2.4, Fig. 7); rerunning the same command resumes.

  python -m launch.long2short --config=configs/long2short_tiny.py --workdir=/tmp/l2s
  python -m launch.long2short --config=configs/long2short_tiny.py --workdir=/tmp/l2s \
      --config.long_from=/tmp/arith_tiny        # the main job's finished run

Takes (or trains) the long-CoT model, builds the short-CoT model and the
long2short methods (merge, merge + shortest rejection sampling, shortest
rejection sampling, DPO, long2short RL), evaluates every model on the same
held-out prompts, and writes WORKDIR/long2short.json (accuracy, mean tokens,
per difficulty, stage times) and WORKDIR/plots/long2short.png.
"""
from kimi_jax import cli  # first: quiets TensorFlow / XLA before they load

from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-order
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Comparison config file (get_config).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Output directory (created; its parent must exist).")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from kimi_jax.long2short import comparison, report
  try:
    summary = comparison.run(FLAGS.config, FLAGS.workdir)
  except (ValueError, FileExistsError) as e:  # config, data, checkpoints: one line, exit 2
    cli.fail(str(e))
  print(report.table(summary))


if __name__ == "__main__":
  cli.run(main)
