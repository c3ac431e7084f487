r"""SFT: long-CoT warm-up on synthetic traces, or any prompt/response JSONL from any checkpoint.

  python -m launch.sft --workdir=/tmp/sft
  python -m launch.sft --config=configs/arith_tiny.py --workdir=/tmp/sft \
      --config.sft.steps=300 --config.sft.error_rate=0.1
  python -m launch.sft --config=configs/visual_tiny.py --workdir=/tmp/sft_visual
  python -m launch.sft --config=configs/sft_files.py --workdir=/tmp/sft_qwen \
      --config.init_from=$HOME/models/Qwen2.5-Math-1.5B \
      --config.data.train_file=$HOME/data/warmup.jsonl \
      --config.data.tokenizer=$HOME/models/Qwen2.5-Math-1.5B

Without --config the schema's defaults (`kimi_jax.sft.default_config()`) are
used; an RL config's `model`, `sft` and `data` sub-dicts work too.
`config.init_from` starts from any checkpoint (RL or SFT run directory, one
of its steps, orbax model directory, HF directory); `config.data.train_file`
trains on a JSONL of {"prompt", "response"} lines (optionally "images", as in
prompt files) with `config.data.tokenizer` ("bytes", a tokenizer.json or its
directory); an image + text config (configs/visual_tiny.py) trains on the
synthetic visual tasks. Writes a run directory:
DIR/model_config.json, DIR/checkpoints/<step>/ (what `config.init_from`
reads), DIR/sft_metrics.jsonl, on the synthetic tasks DIR/sft_eval.json and,
with images, DIR/preprocessor_config.json.
Rerunning the same command continues from the newest checkpoint.
"""
from kimi_jax import cli  # first: quiets TensorFlow / XLA before they load

from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-order
from ml_collections import config_flags

from kimi_jax import sft

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (optional).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value if _CONFIG.value is not None else sft.default_config()
  try:
    sft.run_from_config(config, _WORKDIR.value)
  except ValueError as e:  # bad data / config values: one line, exit 2, no traceback
    cli.fail(str(e))


if __name__ == "__main__":
  cli.run(main)
