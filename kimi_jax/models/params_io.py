"""A model as an orbax directory: params + ModelConfig JSON, and config <-> dict.

Layout of `directory`:
  params/            orbax StandardCheckpointer (OCDBT + zarr, sharding aware)
  model_config.json  `config_to_dict(cfg)`

This is the format `launch/convert.py` writes from a Hugging Face checkpoint
and reads back to export one; training checkpoints (`kimi_jax.checkpointing`)
are a separate, step-numbered format.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Optional, Union

import jax
import orbax.checkpoint as ocp

from kimi_jax.models.transformer import ModelConfig, RopeScaling, init_params

CONFIG_NAME = "model_config.json"
PARAMS_NAME = "params"
PathLike = Union[str, os.PathLike]


def config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
  """JSON-ready dict of every ModelConfig field (`rope_scaling` as a dict or None)."""
  return dataclasses.asdict(cfg)


def config_from_dict(d: Mapping[str, Any], source: str = "model config") -> ModelConfig:
  """Inverse of `config_to_dict`; unknown or missing fields are a ValueError naming them."""
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(d) - fields)
  if unknown:
    raise ValueError(f"{source}: unknown ModelConfig fields {unknown}")
  d = dict(d)
  if d.get("rope_scaling") is not None:
    rope = d["rope_scaling"]
    rope_fields = {f.name for f in dataclasses.fields(RopeScaling)}
    if not isinstance(rope, Mapping) or set(rope) - rope_fields:
      raise ValueError(f"{source}: rope_scaling must be a dict with keys from "
                       f"{sorted(rope_fields)}, got {rope!r}")
    d["rope_scaling"] = RopeScaling(**rope)
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
  if jax.process_index() == 0:
    tmp = config_file + ".tmp"
    with open(tmp, "w") as f:
      json.dump(config_to_dict(cfg), f, indent=2)
    os.replace(tmp, config_file)


def load_orbax(directory: PathLike, params_like: Optional[Any] = None):
  """Reads `(cfg, params)` written by `save_orbax`.

  `params_like` (optional) gives shapes, dtypes and shardings of the result
  (e.g. `jax.ShapeDtypeStruct`s with `sharding=`); default: the config's
  shapes and param dtype on the default device.
  """
  directory = os.path.abspath(os.fspath(directory))
  config_file = os.path.join(directory, CONFIG_NAME)
  params_dir = os.path.join(directory, PARAMS_NAME)
  for needed in (directory, config_file, params_dir):
    if not os.path.exists(needed):
      raise FileNotFoundError(f"{needed} does not exist (not a directory written by save_orbax?)")
  with open(config_file) as f:
    try:
      cfg = config_from_dict(json.load(f), source=config_file)
    except json.JSONDecodeError as e:
      raise ValueError(f"{config_file}: not valid JSON ({e})") from e
  if params_like is None:
    params_like = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(params_dir, params_like)
  return cfg, params
