"""Convert a model between a Hugging Face directory and an orbax directory.

  python -m launch.convert --hf_dir=/models/Qwen2.5-0.5B --orbax_dir=/ckpt/qwen05b
  python -m launch.convert --direction=orbax_to_hf --orbax_dir=/ckpt/qwen05b \
      --hf_dir=/export/qwen05b --max_shard_size=2GB

The orbax directory holds `params/` plus `model_config.json`
(`kimi_jax.models.params_io`); the HF directory is config.json + safetensors
(`kimi_jax.models.hf`).
"""
from typing import Optional, Sequence

from kimi_jax import cli  # first: quiets TensorFlow / XLA before they load

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top,wrong-import-order

from kimi_jax.models import hf, params_io

_DIRECTION = flags.DEFINE_enum("direction", "hf_to_orbax", ["hf_to_orbax", "orbax_to_hf"],
                               "Which way to convert.")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face model directory.")
_ORBAX_DIR = flags.DEFINE_string("orbax_dir", None, "Orbax params + model_config.json directory.")
_PARAM_DTYPE = flags.DEFINE_string(
    "param_dtype", None, "hf_to_orbax: dtype of the saved params (default: as stored); "
    "orbax_to_hf: dtype of the safetensors (default: the config's param_dtype).")
_MAX_SHARD_SIZE = flags.DEFINE_string("max_shard_size", "5GB",
                                      "orbax_to_hf: safetensors shard size.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty output directory.")


def convert(direction: str, hf_dir: str, orbax_dir: str, *, param_dtype: Optional[str] = None,
            max_shard_size: str = "5GB", overwrite: bool = False) -> None:
  """One conversion; `direction` is "hf_to_orbax" or "orbax_to_hf"."""
  if direction == "hf_to_orbax":
    cfg, params = hf.load_pretrained(hf_dir, param_dtype=param_dtype)
    params_io.save_orbax(cfg, params, orbax_dir, overwrite=overwrite)
    logging.info("wrote %s (%d params, %s) from %s", orbax_dir, cfg.num_params(),
                 cfg.param_dtype, hf_dir)
  elif direction == "orbax_to_hf":
    cfg, params = params_io.load_orbax(orbax_dir)
    hf.save_pretrained(cfg, params, hf_dir, max_shard_size=max_shard_size, dtype=param_dtype,
                       overwrite=overwrite)
    logging.info("wrote %s from %s", hf_dir, orbax_dir)
  else:
    raise ValueError(f"unknown direction {direction!r}; use hf_to_orbax or orbax_to_hf")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  convert(_DIRECTION.value, _HF_DIR.value, _ORBAX_DIR.value, param_dtype=_PARAM_DTYPE.value,
          max_shard_size=_MAX_SHARD_SIZE.value, overwrite=_OVERWRITE.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["hf_dir", "orbax_dir"])
  cli.run(main)
