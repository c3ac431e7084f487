"""A model as an orbax directory: params + ModelConfig JSON; any checkpoint as a source.

Layout of a model `directory`:
  params/            orbax StandardCheckpointer (OCDBT + zarr, sharding aware)
  model_config.json  `config_to_dict(cfg)`

This is the format `launch/convert.py` writes from a Hugging Face checkpoint
and reads back to export one. Training runs (RL and SFT) write another:
  RUN/model_config.json          the run's ModelConfig (`write_config`)
  RUN/checkpoints/<step>/params  one orbax item per step (`kimi_jax.checkpointing`)

`resolve(path)` names what a path holds, so every consumer of starting
weights (`config.init_from` of the trainer and of launch.sft, long2short's
merge / sampling) takes any of:
  orbax  a model directory (above);
  hf     a Hugging Face directory (config.json + safetensors);
  run    an RL or SFT run directory (its newest step), or one step of it,
         `RUN/checkpoints/<step>`.
`load_params(source)` then reads `(cfg, params)`, params only.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from typing import Any, Mapping, NamedTuple, Optional, Union

import jax
import orbax.checkpoint as ocp

from kimi_jax.models import layer_stack
from kimi_jax.models.model_config import LONG_CONTEXT_FIELDS
from kimi_jax.models.transformer import ModelConfig, RopeScaling, init_params
from kimi_jax.models.vision import VisionConfig

CONFIG_NAME = "model_config.json"
PARAMS_NAME = "params"
CHECKPOINTS_NAME = "checkpoints"
HF_CONFIG_NAME = "config.json"  # kimi_jax.models.hf.CONFIG_NAME (not imported: hf is heavy)
# ModelConfig fields that are numerics or tokenizer ids rather than weights:
# a config may set them differently from the checkpoint it starts from.
NON_ARCHITECTURE_FIELDS = ("dtype", "param_dtype", "bos_id", "eos_id", "pad_id"
                           ) + LONG_CONTEXT_FIELDS
PathLike = Union[str, os.PathLike]
# ModelConfig fields that are dataclasses themselves (dicts in JSON and configs).
NESTED_CONFIGS = {"rope_scaling": RopeScaling, "vision": VisionConfig}


def config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
  """JSON-ready dict of every ModelConfig field (`rope_scaling` and `vision`
  as dicts or None)."""
  return dataclasses.asdict(cfg)


def config_from_dict(d: Mapping[str, Any], source: str = "model config") -> ModelConfig:
  """Inverse of `config_to_dict`; unknown or missing fields are a ValueError naming them."""
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(d) - fields)
  if unknown:
    raise ValueError(f"{source}: unknown ModelConfig fields {unknown}")
  d = dict(d)
  for key, cls in NESTED_CONFIGS.items():
    if d.get(key) is None:
      continue
    known = {f.name for f in dataclasses.fields(cls)}
    if not isinstance(d[key], Mapping) or set(d[key]) - known:
      raise ValueError(f"{source}: {key} must be a dict with keys from {sorted(known)}, "
                       f"got {d[key]!r}")
    d[key] = cls(**d[key])
  try:
    return ModelConfig(**d)
  except TypeError as e:  # a required field is missing
    raise ValueError(f"{source}: {e}") from e


def save_orbax(cfg: ModelConfig, params, directory: PathLike, *, overwrite: bool = False) -> None:
  """Writes params (orbax) and the config (JSON) under `directory`.

  An existing non-empty directory is an error unless `overwrite`. The params
  are written first (orbax renames a finished save into place), the config
  last and atomically, so `load_orbax` never sees a config without params.
  """
  directory = os.path.abspath(os.fspath(directory))
  if os.path.isdir(directory) and os.listdir(directory) and not overwrite:
    raise FileExistsError(f"{directory} already exists and is not empty; pass overwrite=True "
                          "to replace it")
  os.makedirs(directory, exist_ok=True)
  config_file = os.path.join(directory, CONFIG_NAME)
  if os.path.exists(config_file):
    os.remove(config_file)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(directory, PARAMS_NAME), params, force=overwrite)
    ckptr.wait_until_finished()
  write_config(cfg, directory)


def write_config(cfg: ModelConfig, directory: PathLike) -> None:
  """Writes `directory/model_config.json` atomically (process 0 only)."""
  if jax.process_index() == 0:
    config_file = os.path.join(os.fspath(directory), CONFIG_NAME)
    tmp = config_file + ".tmp"
    with open(tmp, "w") as f:
      json.dump(config_to_dict(cfg), f, indent=2)
    os.replace(tmp, config_file)


def read_config(config_file: PathLike) -> ModelConfig:
  """The ModelConfig of a model_config.json; ValueError naming the file."""
  config_file = os.fspath(config_file)
  with open(config_file) as f:
    try:
      return config_from_dict(json.load(f), source=config_file)
    except json.JSONDecodeError as e:
      raise ValueError(f"{config_file}: not valid JSON ({e})") from e


def load_orbax(directory: PathLike, params_like: Optional[Any] = None):
  """Reads `(cfg, params)` written by `save_orbax`.

  `params_like` (optional) gives shapes, dtypes and shardings of the result
  (e.g. `jax.ShapeDtypeStruct`s with `sharding=`) and their layer form
  (`restore_params`); default: the config's shapes and param dtype on the
  default device.
  """
  directory = os.path.abspath(os.fspath(directory))
  config_file = os.path.join(directory, CONFIG_NAME)
  params_dir = os.path.join(directory, PARAMS_NAME)
  for needed in (directory, config_file, params_dir):
    if not os.path.exists(needed):
      raise FileNotFoundError(f"{needed} does not exist (not a directory written by save_orbax?)")
  cfg = read_config(config_file)
  if params_like is None:
    params_like = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
  return cfg, restore_params(params_dir, params_like)


# ------------------------------------------------------------------ any checkpoint


class Source(NamedTuple):
  """What a checkpoint path holds (`resolve`).

  kind: "orbax" | "hf" | "run". config_file: model_config.json (orbax, run)
  or config.json (hf); None for a run written before runs saved one.
  params_dir: the orbax params item (None for hf). step: the run's step.
  """
  kind: str
  path: str
  config_file: Optional[str]
  params_dir: Optional[str]
  step: Optional[int] = None


def run_steps(run_dir: PathLike) -> list[int]:
  """Finished checkpoint steps of a run directory, oldest first. Orbax
  renames a step into place when it is complete, so `<step>.orbax-
  checkpoint-tmp-*` and `<step>.corrupt` directories are not steps."""
  directory = os.path.join(os.fspath(run_dir), CHECKPOINTS_NAME)
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory)
                if n.isdigit() and os.path.isdir(os.path.join(directory, n, PARAMS_NAME)))


def resolve(path: PathLike) -> Source:
  """The `Source` at `path`; FileNotFoundError / ValueError naming it."""
  path = os.path.abspath(os.path.expanduser(os.fspath(path)))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint {path} does not exist (expected a run directory, "
                            f"RUN/{CHECKPOINTS_NAME}/<step>, an orbax model directory or a "
                            "Hugging Face directory)")
  own_config = os.path.join(path, CONFIG_NAME)
  if os.path.isdir(os.path.join(path, PARAMS_NAME)) and os.path.isfile(own_config):
    return Source("orbax", path, own_config, os.path.join(path, PARAMS_NAME))
  if os.path.isfile(os.path.join(path, HF_CONFIG_NAME)):
    return Source("hf", path, os.path.join(path, HF_CONFIG_NAME), None)
  parent = os.path.dirname(path)
  if os.path.basename(path).isdigit() and os.path.basename(parent) == CHECKPOINTS_NAME:
    run, step = os.path.dirname(parent), int(os.path.basename(path))
    if not os.path.isdir(os.path.join(path, PARAMS_NAME)):
      raise ValueError(f"checkpoint {path}: step {step} has no {PARAMS_NAME}/ (finished "
                       f"steps of {run}: {run_steps(run)})")
  elif os.path.isdir(os.path.join(path, CHECKPOINTS_NAME)):
    steps = run_steps(path)
    if not steps:
      raise ValueError(f"checkpoint {path}: run directory without a finished checkpoint "
                       f"in {CHECKPOINTS_NAME}/")
    run, step = path, steps[-1]
  else:
    raise ValueError(f"checkpoint {path}: not a run directory ({CHECKPOINTS_NAME}/), a step "
                     f"of one, an orbax model directory ({PARAMS_NAME}/ + {CONFIG_NAME}) or a "
                     f"Hugging Face directory ({HF_CONFIG_NAME})")
  config_file = os.path.join(run, CONFIG_NAME)
  return Source("run", run, config_file if os.path.isfile(config_file) else None,
                os.path.join(run, CHECKPOINTS_NAME, str(step), PARAMS_NAME), step)


def _source_config(src: Source, param_dtype: str) -> Optional[ModelConfig]:
  if src.config_file is None:
    return None
  if src.kind != "hf":
    return read_config(src.config_file)
  from kimi_jax.models import hf  # pylint: disable=g-import-not-at-top
  with open(src.config_file) as f:
    try:
      hf_config = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{src.config_file}: not valid JSON ({e})") from e
  # RL and SFT updates want fp32 master weights, whatever dtype HF stores.
  return hf.model_config_from_hf(hf_config, param_dtype=param_dtype, source=src.config_file)


def config_for(src: Source, model: Optional[Mapping[str, Any]] = None, *,
               what: str = "config.model") -> ModelConfig:
  """The ModelConfig to run `src` with: its own architecture, with `model`
  (a config's model keys) setting NON_ARCHITECTURE_FIELDS and otherwise
  only repeating it. A run without model_config.json takes `model` whole.
  ValueError names `what.KEY` and the checkpoint's file on disagreement."""
  model = dict(model or {})
  for key, cls in NESTED_CONFIGS.items():
    if isinstance(model.get(key), Mapping):
      model[key] = cls(**model[key])
  cfg = _source_config(src, param_dtype=model.get("param_dtype", "float32"))
  if cfg is None:
    if not model:
      raise ValueError(f"checkpoint {src.path} has no {CONFIG_NAME} (runs started before "
                       f"runs wrote one): give the architecture in {what}, or write "
                       f"{CONFIG_NAME} there (params_io.write_config)")
    return config_from_dict(model, source=what)
  names = {f.name for f in dataclasses.fields(ModelConfig)}
  for key, value in sorted(model.items()):
    if key not in names:
      raise ValueError(f"{what}: unknown key {key!r} for ModelConfig; known: {sorted(names)}")
    if key in NON_ARCHITECTURE_FIELDS:
      cfg = cfg.replace(**{key: value})
    elif value != getattr(cfg, key):
      raise ValueError(f"{what}.{key}={value!r} but {src.config_file} says "
                       f"{getattr(cfg, key)!r}; starting from a checkpoint, the architecture "
                       "comes from it (drop the key)")
  return cfg


def same_architecture(a: ModelConfig, b: ModelConfig) -> list[str]:
  """Names (with both values) of the weight-shaping fields where a and b differ."""
  return [f"{f.name}: {getattr(a, f.name)!r} vs {getattr(b, f.name)!r}"
          for f in dataclasses.fields(ModelConfig)
          if f.name not in NON_ARCHITECTURE_FIELDS and getattr(a, f.name) != getattr(b, f.name)]


def load_params(src: Union[Source, PathLike], cfg: Optional[ModelConfig] = None,
                params_like: Optional[Any] = None):
  """Reads `(cfg, params)` from any checkpoint, params only.

  cfg: the config to load with (default `config_for(src)`). params_like:
  shapes, dtypes and shardings of the result; orbax and run checkpoints
  restore straight into them (default: the config's shapes on the first
  local device). Params come back in the layer form of `params_like`
  (default `cfg.scan_layers`), whichever form the checkpoint has. A HF
  checkpoint is read whole on every process: the caller places it
  (`distributed.place`).
  """
  src = src if isinstance(src, Source) else resolve(src)
  cfg = config_for(src) if cfg is None else cfg
  if src.kind == "hf":
    from kimi_jax.models import hf  # pylint: disable=g-import-not-at-top
    hf_cfg, params = hf.load_pretrained(src.path, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                        scan_layers=cfg.scan_layers)
    diff = same_architecture(hf_cfg, cfg)
    if diff:
      raise ValueError(f"checkpoint {src.path}: {HF_CONFIG_NAME} does not match the model "
                       f"config ({'; '.join(diff)})")
    return cfg, params
  if params_like is None:
    params_like = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
  # Orbax will not guess a layout for a checkpoint written on another topology.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  params_like = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding or device)
      if isinstance(x, jax.ShapeDtypeStruct) else x, params_like)
  return cfg, restore_params(src.params_dir, params_like)


class _NoItemMetadataWarning(logging.Filter):
  """Drops orbax's "Metadata file does not exist" for a params item: inside a
  run's step directory the step, not the item, holds _CHECKPOINT_METADATA,
  so every `init_from` a run printed a warning that reports nothing wrong."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Metadata file does not exist")


@contextlib.contextmanager
def _quiet_item_metadata():
  absl_logger, quiet = logging.getLogger("absl"), _NoItemMetadataWarning()
  absl_logger.addFilter(quiet)
  try:
    yield
  finally:
    absl_logger.removeFilter(quiet)


def restore_params(params_dir: PathLike, params_like: Any):
  """An orbax params item restored into `params_like`'s layer form
  (`layer_stack`), whichever form it was written in: `scan_layers` is a
  run-time setting, so a checkpoint may come from a run with the other."""
  params_dir = os.fspath(params_dir)
  with _quiet_item_metadata(), ocp.StandardCheckpointer() as ckptr:
    disk = layer_stack.scanned_or_none(ckptr.metadata(params_dir).item_metadata.tree)
    return layer_stack.restore_in_form(lambda like: ckptr.restore(params_dir, like),
                                       params_like, disk)
