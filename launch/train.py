"""Main job: SFT warm-up then k1.5 RL; rerunning the same command resumes.

  python -m launch.train --config=configs/arith_tiny.py --workdir=/tmp/arith
  python -m launch.train --config=configs/arith_tiny.py:smoke --workdir=/tmp/smoke \\
      --config.total_iterations=4 --config.rl.loss=rest

Writes WORKDIR/metrics.jsonl, TensorBoard events, WORKDIR/checkpoints/ and
WORKDIR/plots/*.png.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Experiment config file (get_config).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (created; its parent must exist).")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from kimi_jax.data.prompts import PromptFileError
  from kimi_jax.models.hf import HFCheckpointError
  from kimi_jax.rl import settings, trainer
  logging.set_verbosity(logging.INFO)
  try:
    trainer.run(FLAGS.config, FLAGS.workdir)
  except (settings.ConfigError, FileNotFoundError, PromptFileError, HFCheckpointError) as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
