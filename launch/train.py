"""Main job: SFT warm-up then k1.5 RL; rerunning the same command resumes.

  python -m launch.train --config=configs/arith_tiny.py --workdir=/tmp/arith
  python -m launch.train --config=configs/arith_tiny.py:smoke --workdir=/tmp/smoke \\
      --config.total_iterations=4 --config.rl.loss=rest

Writes WORKDIR/metrics.jsonl, TensorBoard events, WORKDIR/checkpoints/ and
WORKDIR/plots/*.png.

Several hosts: run the same command on every host with
  --coordinator_address=HOST0:PORT --num_processes=N --process_id=I
(or $JAX_COORDINATOR_ADDRESS / $JAX_NUM_PROCESSES / $JAX_PROCESS_ID), or
--distributed_auto on a Cloud TPU pod; WORKDIR must be shared by all hosts.
"""
from kimi_jax import cli  # first: quiets TensorFlow / XLA before they load

from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-order
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Experiment config file (get_config).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (created; its parent must exist).")
flags.DEFINE_string("coordinator_address", None, "jax.distributed: host:port of process 0 "
                    "(else $JAX_COORDINATOR_ADDRESS); unset with the two below = one process.")
flags.DEFINE_integer("num_processes", None, "jax.distributed: processes (else $JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "jax.distributed: this process, 0-based "
                     "(else $JAX_PROCESS_ID).")
flags.DEFINE_bool("distributed_auto", False, "jax.distributed with cluster auto-detection "
                  "(Cloud TPU pods, SLURM) when the three above are unset.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from kimi_jax import distributed
  try:  # before anything touches a jax backend
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                           auto=FLAGS.distributed_auto)
  except ValueError as e:
    raise app.UsageError(str(e))
  from kimi_jax.rl import trainer
  trainer.run(FLAGS.config, FLAGS.workdir)  # bad input: one line, exit 2 (cli.run)


if __name__ == "__main__":
  cli.run(main)
