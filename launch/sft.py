r"""SFT warm-up on the synthetic long-CoT traces (method spec §5).

  python -m launch.sft --workdir=/tmp/sft
  python -m launch.sft --config=configs/arith_tiny.py --workdir=/tmp/sft \
      --config.sft.steps=300 --config.sft.error_rate=0.1

Without --config the schema's defaults (`kimi_jax.sft.default_config()`) are
used. The config's `model`, `sft` (SFTConfig fields + n_examples, long_frac,
error_rate) and `data` (tasks, difficulties, n_train, n_heldout, seed)
sub-dicts are read. Writes DIR/sft_params (orbax), DIR/sft_metrics.jsonl and
DIR/sft_eval.json; prints the final loss and a few greedy samples.
"""
from absl import app
from absl import flags
from ml_collections import config_flags

from kimi_jax import sft

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (optional).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value if _CONFIG.value is not None else sft.default_config()
  sft.run_from_config(config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
