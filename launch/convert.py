"""Convert a model between a Hugging Face directory and an orbax directory.

  python -m launch.convert --hf_dir=/models/Qwen2.5-0.5B --orbax_dir=/ckpt/qwen05b
  python -m launch.convert --direction=orbax_to_hf --orbax_dir=/ckpt/qwen05b \
      --hf_dir=/export/qwen05b --max_shard_size=2GB
  python -m launch.convert --direction=orbax_to_hf --orbax_dir=/runs/visual_tiny \
      --hf_dir=/export/visual_tiny     # an RL / SFT run: its newest checkpoint

The orbax directory holds `params/` plus `model_config.json`
(`kimi_jax.models.params_io`); the HF directory is config.json + safetensors
(`kimi_jax.models.hf`). orbax_to_hf also reads a run directory or one of its
steps (`RUN/checkpoints/<step>`), as `config.init_from` does.

Image + text models carry their image processor as preprocessor_config.json:
hf_to_orbax copies it into the orbax directory; orbax_to_hf writes the one
of `--image_processor`, else the one beside the checkpoint (the trainer and
launch.sft write it into their runs), else SigLIP's default (mean and std
0.5) at the tower's image size, with a warning.
"""
import os
from typing import Optional, Sequence

from kimi_jax import cli  # first: quiets TensorFlow / XLA before they load

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top,wrong-import-order

from kimi_jax.data import images
from kimi_jax.models import hf, params_io

_DIRECTION = flags.DEFINE_enum("direction", "hf_to_orbax", ["hf_to_orbax", "orbax_to_hf"],
                               "Which way to convert.")
_HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face model directory.")
_ORBAX_DIR = flags.DEFINE_string(
    "orbax_dir", None, "Orbax params + model_config.json directory (orbax_to_hf: also a run "
    "directory or RUN/checkpoints/<step>).")
_PARAM_DTYPE = flags.DEFINE_string(
    "param_dtype", None, "hf_to_orbax: dtype of the saved params (default: as stored); "
    "orbax_to_hf: dtype of the safetensors (default: the config's param_dtype).")
_MAX_SHARD_SIZE = flags.DEFINE_string("max_shard_size", "5GB",
                                      "orbax_to_hf: safetensors shard size.")
_IMAGE_PROCESSOR = flags.DEFINE_string(
    "image_processor", None, "orbax_to_hf, image + text models: the preprocessor_config.json "
    "(or its directory) to export (default: the one beside the checkpoint).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a non-empty output directory.")


def _processor_file(directory: str) -> Optional[str]:
  """The preprocessor_config.json in `directory` (a checkpoint or run), or None."""
  path = os.path.join(directory, images.PROCESSOR_CONFIG_NAME)
  return path if os.path.isfile(path) else None


def _export_processor(cfg, src: params_io.Source, image_processor: Optional[str]):
  """The ProcessorConfig orbax_to_hf writes (None for a text-only model)."""
  if cfg.vision is None:
    if image_processor:
      raise ValueError(f"--image_processor given but {src.path} is a text-only model")
    return None
  path = image_processor or _processor_file(src.path)
  if path is None:
    size = cfg.vision.image_size
    logging.warning("%s has no %s: writing SigLIP's default (%dx%d, mean and std 0.5); "
                    "pass --image_processor if the model was trained with another",
                    src.path, images.PROCESSOR_CONFIG_NAME, size, size)
  return images.processor_for_tower(path, cfg.vision.image_size)


def convert(direction: str, hf_dir: str, orbax_dir: str, *, param_dtype: Optional[str] = None,
            max_shard_size: str = "5GB", overwrite: bool = False,
            image_processor: Optional[str] = None) -> None:
  """One conversion; `direction` is "hf_to_orbax" or "orbax_to_hf"."""
  if direction == "hf_to_orbax":
    cfg, params = hf.load_pretrained(hf_dir, param_dtype=param_dtype)
    path = _processor_file(hf_dir) if cfg.vision is not None else None
    proc = images.load_processor(path) if path else None  # read before anything is written
    params_io.save_orbax(cfg, params, orbax_dir, overwrite=overwrite)
    if proc is not None:
      images.save_processor(proc, orbax_dir)
    logging.info("wrote %s (%d params, %s) from %s", orbax_dir, cfg.num_params(),
                 cfg.param_dtype, hf_dir)
  elif direction == "orbax_to_hf":
    src = params_io.resolve(orbax_dir)
    if src.kind == "hf":
      raise ValueError(f"{src.path} is already a Hugging Face directory")
    cfg, params = params_io.load_params(src)
    proc = _export_processor(cfg, src, image_processor)
    hf.save_pretrained(cfg, params, hf_dir, max_shard_size=max_shard_size, dtype=param_dtype,
                       overwrite=overwrite, processor=proc)
    logging.info("wrote %s from %s%s", hf_dir, src.path,
                 f" step {src.step}" if src.step is not None else "")
  else:
    raise ValueError(f"unknown direction {direction!r}; use hf_to_orbax or orbax_to_hf")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    convert(_DIRECTION.value, _HF_DIR.value, _ORBAX_DIR.value, param_dtype=_PARAM_DTYPE.value,
            max_shard_size=_MAX_SHARD_SIZE.value, overwrite=_OVERWRITE.value,
            image_processor=_IMAGE_PROCESSOR.value)
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    cli.fail(str(e))


if __name__ == "__main__":
  flags.mark_flags_as_required(["hf_dir", "orbax_dir"])
  cli.run(main)
