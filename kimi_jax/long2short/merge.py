"""Model merging (report §2.4): the weighted average of two checkpoints' params.

`merge(a, b, out_dir, weight)` reads two checkpoints of one architecture
(any `params_io.resolve` source: run directories, orbax or Hugging Face
directories), averages every parameter as `(1 - weight) * a + weight * b`,
and writes an orbax model directory (params/ + model_config.json) that the
trainer (`config.init_from`), launch.sft and launch.convert read.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from kimi_jax.models import params_io


def merge_params(params_a, params_b, weight: float):
  """`(1 - weight) * a + weight * b` leaf by leaf, in float32, cast back to a's dtypes.

  Exact at the ends and for equal inputs: weight 0 returns a, weight 1
  returns b, and where a == b the result is a (no rounding of the average).
  """
  if not 0.0 <= weight <= 1.0:
    raise ValueError(f"merge weight must be in [0, 1], got {weight!r}")

  def leaf(a, b):
    a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    mixed = (1.0 - weight) * a32 + weight * b32
    return jnp.where(a32 == b32, a32, mixed).astype(jnp.asarray(a).dtype)

  return jax.tree.map(leaf, params_a, params_b)


def _describe(src: params_io.Source) -> str:
  return f"{src.kind} {src.path}" + (f" step {src.step}" if src.step is not None else "")


def merge(a: str, b: str, out_dir: str, weight: float = 0.5, *, overwrite: bool = False):
  """Writes the merge of checkpoints `a` and `b` (b's share `weight`) to `out_dir`.

  The merged model keeps a's config (dtypes, special ids). Raises ValueError
  naming both checkpoints and the differing fields when their architectures
  differ, and FileExistsError when `out_dir` is not empty (unless
  `overwrite`); both before anything is written. Returns the ModelConfig.
  """
  if not 0.0 <= weight <= 1.0:  # before reading two checkpoints
    raise ValueError(f"merge weight must be in [0, 1], got {weight!r}")
  out_dir = os.path.abspath(os.path.expanduser(out_dir))
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
    raise FileExistsError(f"merge output {out_dir} already exists and is not empty")
  src_a, src_b = params_io.resolve(a), params_io.resolve(b)
  cfg_a, cfg_b = params_io.config_for(src_a), params_io.config_for(src_b)
  diff = params_io.same_architecture(cfg_a, cfg_b)
  if diff:
    raise ValueError(f"cannot merge {_describe(src_a)} with {_describe(src_b)}: different "
                     f"architectures ({'; '.join(diff)})")
  _, params_a = params_io.load_params(src_a, cfg_a)
  # b in a's param dtype: both trees alike.
  _, params_b = params_io.load_params(src_b, cfg_b.replace(param_dtype=cfg_a.param_dtype))
  params_io.save_orbax(cfg_a, merge_params(params_a, params_b, weight), out_dir,
                       overwrite=overwrite)
  return cfg_a
