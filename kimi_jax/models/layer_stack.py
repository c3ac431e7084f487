"""Params in the two layer forms of `ModelConfig.scan_layers`.

Unrolled: `params["layers_0"]`, `params["layers_1"]`, ... one subtree per
block. Scanned: `params["layers"]`, the same subtree with every leaf stacked
`[L, ...]` (what `nn.scan` in `transformer.scanned_blocks` creates). Leaves
may be numpy, jax arrays or `jax.ShapeDtypeStruct`s.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SCANNED = "layers"


def _unrolled_name(i: int) -> str:
  return f"{SCANNED}_{i}"


def is_scanned(params: dict) -> bool:
  return SCANNED in params


def stack_layers(params: dict, num_layers: int) -> dict:
  """Unrolled -> scanned. ValueError if `params` is not unrolled with
  exactly `num_layers` blocks."""
  if is_scanned(params):
    raise ValueError("params are already stacked (a 'layers' subtree); nothing to stack")
  names = [_unrolled_name(i) for i in range(num_layers)]
  missing = [n for n in names if n not in params]
  extra = sorted(k for k in params if k.startswith(SCANNED + "_") and k not in names)
  if missing or extra:
    raise ValueError(f"params do not hold blocks layers_0..layers_{num_layers - 1}: "
                     f"missing {missing}, unexpected {extra}")

  def stack(*xs):
    if isinstance(xs[0], jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct((len(xs),) + xs[0].shape, xs[0].dtype)
    if isinstance(xs[0], np.ndarray):
      return np.stack(xs)
    return jnp.stack(xs)

  out = {k: v for k, v in params.items() if k not in names}
  out[SCANNED] = jax.tree.map(stack, *[params[n] for n in names])
  return out


def unstack_layers(params: dict) -> dict:
  """Scanned -> unrolled. ValueError if `params` has no stacked blocks."""
  if not is_scanned(params):
    raise ValueError("params have no stacked 'layers' subtree; nothing to unstack")
  stacked = params[SCANNED]
  L = jax.tree.leaves(stacked)[0].shape[0]

  def take(i):
    def one(x):
      if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
      return x[i]
    return jax.tree.map(one, stacked)

  out = {k: v for k, v in params.items() if k != SCANNED}
  out.update({_unrolled_name(i): take(i) for i in range(L)})
  return out


def to_layer_form(scan_layers: bool, num_layers: int, params: dict) -> dict:
  """`params` in the form `scan_layers` asks for, whichever form they are in."""
  if scan_layers == is_scanned(params):
    return params
  return stack_layers(params, num_layers) if scan_layers else unstack_layers(params)
