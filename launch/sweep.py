r"""Run a config sweep point by point, or print one launch command per point.

  python -m launch.sweep --sweep=configs/sweeps/arith_ablations.py --workdir=/tmp/ablations
  python -m launch.sweep --sweep=configs/sweeps/arith_ablations.py --workdir=/tmp/abl \
      --config=configs/arith_tiny.py:smoke --config.total_iterations=2
  python -m launch.sweep --sweep=... --workdir=gs://bucket/abl --print_only
  python -m launch.sweep --sweep=... --workdir=/tmp/ablations --summary_only

Each point runs `trainer.run(config, WORKDIR/<point>)` in this process, one
after another (rerunning resumes each point); the base config is the sweep
file's CONFIG unless --config (with --config.KEY=VALUE overrides applied to
every point) is given. A summary table (final eval accuracy, reward, response
length per point) is printed at the end and written to WORKDIR/summary.json.
"""
import os
import sys

from kimi_jax import cli  # first: quiets TensorFlow / XLA before they load

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top,wrong-import-order
from ml_collections import config_flags

from kimi_jax import sweep

flags.DEFINE_string("sweep", None, "Sweep file defining get_sweep() (path[:arg]).")
flags.DEFINE_string("workdir", None, "Sweep directory; point P runs in WORKDIR/P.")
config_flags.DEFINE_config_file("config", None, "Base config (default: the sweep's CONFIG).",
                                lock_config=True)
flags.DEFINE_list("points", None, "Run only these point names.")
flags.DEFINE_bool("print_only", False, "Print one launch.train command per point and exit.")
flags.DEFINE_bool("summary_only", False, "Only print the summary of existing point workdirs.")
flags.mark_flags_as_required(["sweep", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  points, default_config = sweep.load_sweep(FLAGS.sweep)
  if FLAGS.points:
    unknown = sorted(set(FLAGS.points) - {p.name for p in points})
    if unknown:
      raise app.UsageError(f"--points {unknown} not in the sweep: {[p.name for p in points]}")
    points = [p for p in points if p.name in FLAGS.points]
  if FLAGS.config is not None:
    config_path = config_flags.get_config_filename(FLAGS["config"])
    base_overrides = config_flags.get_override_values(FLAGS["config"])
    base = FLAGS.config
  elif default_config:
    config_path, base_overrides = default_config, {}
    base = sweep.load_config(default_config)
  else:
    raise app.UsageError(f"{FLAGS.sweep} names no CONFIG; pass --config")

  if FLAGS.print_only:
    for p in points:
      print(sweep.launch_command(config_path, os.path.join(FLAGS.workdir, p.name),
                                 {**base_overrides, **dict(p.overrides)}))
    return
  status = None
  if FLAGS.summary_only and not os.path.isdir(FLAGS.workdir):
    raise app.UsageError(f"--workdir {FLAGS.workdir} does not exist (nothing to summarize)")
  if not FLAGS.summary_only:
    from kimi_jax.rl import trainer
    status = sweep.run_points(base, points, FLAGS.workdir, trainer.run, log=logging.info)
  rows = sweep.summarize(FLAGS.workdir, points, status)
  print(sweep.format_table(rows))
  print(f"summary: {sweep.write_summary(FLAGS.workdir, rows)}")
  if status and any(s != "done" for s in status.values()):
    sys.exit(1)


if __name__ == "__main__":
  cli.run(main)
