r"""Ablations of the CPU config (report §3.5): k1.5 surrogate vs ReST x prioritized vs uniform prompts.

  python -m launch.sweep --sweep=configs/sweeps/arith_ablations.py --workdir=/tmp/ablations

Each point is configs/arith_tiny.py plus its overrides, in /tmp/ablations/<point>
(k15-prioritized, k15-uniform, rest-prioritized, rest-uniform).
Shrink every point with a base config and --config.* overrides, e.g.
  python -m launch.sweep --sweep=configs/sweeps/arith_ablations.py --workdir=/tmp/abl \
      --config=configs/arith_tiny.py:smoke --config.total_iterations=2
or print one launch.train command per point for a cluster with --print_only.
"""
CONFIG = "configs/arith_tiny.py"  # the config swept (--config replaces it)


def get_sweep(arg: str = "") -> list[dict]:
  del arg  # no variants
  return [{"name": f"{loss}-{sampling}", "rl.loss": loss, "rl.prompt_sampling": sampling}
          for loss in ("k15", "rest")  # the report's surrogate vs positive-only ReST
          for sampling in ("prioritized", "uniform")]  # 1 - success rate vs uniform
