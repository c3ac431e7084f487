r"""SFT on a prompt/response JSONL, starting from a checkpoint (long-CoT warm-up sets, long2short).

  python -m launch.sft --config=configs/sft_files.py --workdir=$HOME/runs/warmup \
      --config.init_from=$HOME/models/Qwen2.5-Math-1.5B \
      --config.data.train_file=$HOME/data/warmup.jsonl \
      --config.data.tokenizer=$HOME/models/Qwen2.5-Math-1.5B

`init_from`: an RL or SFT run directory (newest step) or RUN/checkpoints/<step>,
an orbax model directory, or a HF directory; the architecture comes from it.
`data.train_file`: one {"prompt": ..., "response": ...} object per line (other
keys, e.g. the prompt-set fields, are kept but unused; "images" as in prompt
files, with a LLaVA checkpoint); `data.tokenizer`: "bytes", a tokenizer.json
or the directory holding it; `data.image_processor`: the images'
preprocessor_config.json (default: the checkpoint's). Hyperparameters are
the schema's defaults (kimi_jax/sft/config.py) unless overridden.
"""
import ml_collections

from kimi_jax.sft import default_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg:
    raise ValueError(f"configs/sft_files.py: unknown variant {arg!r} (it has none)")
  c = default_config()
  c.model = ml_collections.ConfigDict()  # the checkpoint's architecture (may set dtypes)
  c.sft.update(steps=1000, seq_len=2048, batch_size=16, learning_rate=1e-5, warmup_steps=50,
               checkpoint_every=200)
  return c
