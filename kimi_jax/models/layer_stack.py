"""Params in the two layer forms of `ModelConfig.scan_layers`.

Unrolled: `params["layers_0"]`, `params["layers_1"]`, ... one subtree per
block. Scanned: `params["layers"]`, the same subtree with every leaf stacked
`[L, ...]` (what `nn.scan` in `transformer.scanned_blocks` creates). Leaves
may be numpy, jax arrays or `jax.ShapeDtypeStruct`s (a `NamedSharding` on a
struct gains / loses a replicated leading "layers" dim with it).

  p = stack_layers(params, cfg.num_layers)   # unrolled -> scanned
  p = unstack_layers(p)                      # scanned -> unrolled
  p = to_layer_form(cfg.scan_layers, cfg.num_layers, params)  # whichever form cfg asks for

`convert_tree` applies the conversion to every params tree inside a bigger
one (an optax state's moments), and `restore_in_form` lets a checkpoint
written in one form restore into targets in the other (params_io,
checkpointing).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

SCANNED = "layers"


def _unrolled_name(i: int) -> str:
  return f"{SCANNED}_{i}"


def is_scanned(params: dict) -> bool:
  """True when `params` (a transformer params dict) holds stacked blocks."""
  return SCANNED in params


def is_params(tree: Any) -> bool:
  """True for a transformer params dict (either form): what `convert_tree`
  converts. The vision tower has `layers_i` but no `embed`, so stays put."""
  return isinstance(tree, dict) and "embed" in tree and (
      SCANNED in tree or _unrolled_name(0) in tree)


def scanned_or_none(tree: Any) -> Optional[bool]:
  """`is_scanned` of a params dict (or orbax metadata tree of one); None
  for any other tree."""
  return is_scanned(tree) if is_params(tree) else None


def num_layers_of(params: dict) -> int:
  """L of a params dict in either form."""
  if is_scanned(params):
    leaves = jax.tree.leaves(params[SCANNED])
    if not leaves:
      raise ValueError("params['layers'] has no arrays; cannot tell the number of layers")
    return int(leaves[0].shape[0])
  n = 0
  while _unrolled_name(n) in params:
    n += 1
  return n


def _stack_struct(x: jax.ShapeDtypeStruct, n: int) -> jax.ShapeDtypeStruct:
  sharding = x.sharding
  if isinstance(sharding, NamedSharding):  # the layers dim is replicated (parallel.py)
    sharding = NamedSharding(sharding.mesh, P(None, *sharding.spec))
  elif sharding is not None and not isinstance(sharding, jax.sharding.SingleDeviceSharding):
    sharding = None  # a positional sharding has no rank-free meaning
  return jax.ShapeDtypeStruct((n,) + tuple(x.shape), x.dtype, sharding=sharding)


def _unstack_struct(x: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
  sharding = x.sharding
  if isinstance(sharding, NamedSharding):
    sharding = NamedSharding(sharding.mesh, P(*tuple(sharding.spec)[1:]))
  elif sharding is not None and not isinstance(sharding, jax.sharding.SingleDeviceSharding):
    sharding = None
  return jax.ShapeDtypeStruct(tuple(x.shape)[1:], x.dtype, sharding=sharding)


def stack_layers(params: dict, num_layers: int) -> dict:
  """Unrolled -> scanned. ValueError if `params` is already stacked or is
  not unrolled with exactly `num_layers` blocks."""
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
      return _stack_struct(xs[0], len(xs))
    if all(isinstance(x, np.ndarray) for x in xs):  # host stays host (HF import)
      return np.stack(xs)
    return jnp.stack(xs)

  out = {k: v for k, v in params.items() if k not in names}
  out[SCANNED] = jax.tree.map(stack, *[params[n] for n in names])
  return out


def unstack_layers(params: dict, num_layers: Optional[int] = None) -> dict:
  """Scanned -> unrolled. ValueError if `params` has no stacked blocks (or,
  given `num_layers`, a different number of them)."""
  if not is_scanned(params):
    raise ValueError("params have no stacked 'layers' subtree; nothing to unstack")
  stacked = params[SCANNED]
  L = num_layers_of(params)
  if num_layers is not None and num_layers != L:
    raise ValueError(f"params hold {L} stacked layers, expected {num_layers}")

  def take(i):
    def one(x):
      if isinstance(x, jax.ShapeDtypeStruct):
        return _unstack_struct(x)
      return x[i]
    return jax.tree.map(one, stacked)

  out = {k: v for k, v in params.items() if k != SCANNED}
  out.update({_unrolled_name(i): take(i) for i in range(L)})
  return out


def to_layer_form(scan_layers: bool, num_layers: int, params: dict) -> dict:
  """`params` in the form `scan_layers` asks for, whichever form they are
  in (returned as is when they already are). ValueError if they hold
  another number of layers than `num_layers`."""
  if scan_layers == is_scanned(params):
    if num_layers_of(params) != num_layers:
      raise ValueError(f"params hold {num_layers_of(params)} layers, the config {num_layers}")
    return params
  return stack_layers(params, num_layers) if scan_layers else unstack_layers(params, num_layers)


def convert_tree(tree: Any, scan_layers: bool, num_layers: int) -> Any:
  """`tree` with every params dict inside it (`is_params`: the params, an
  optax state's `mu` / `nu`, ...) in the form `scan_layers` asks for."""
  return jax.tree.map(
      lambda x: to_layer_form(scan_layers, num_layers, x) if is_params(x) else x,
      tree, is_leaf=is_params)


def form_of(tree: Any) -> Optional[tuple[bool, int]]:
  """`(scanned, num_layers)` of the first params dict inside `tree`; None
  when it holds none."""
  found = [x for x in jax.tree.leaves(tree, is_leaf=is_params) if is_params(x)]
  return (is_scanned(found[0]), num_layers_of(found[0])) if found else None


def restore_in_form(restore: Callable[[Any], Any], like: Any, disk_scanned: Optional[bool]):
  """`restore(like)`, for a checkpoint whose params may be in the other form.

  restore: reads the checkpoint into targets shaped like `like`. like: the
    targets (arrays or ShapeDtypeStructs, params dicts anywhere inside, in
    the form wanted). disk_scanned: the checkpoint's form (its params
    metadata has a "layers" key); None when unknown.

  When the forms differ the checkpoint is read in its own form (targets
  converted, shardings too) and converted after, then placed on `like`'s
  shardings: for a moment twice the params' memory.
  """
  form = form_of(like)
  if form is None or disk_scanned is None or disk_scanned == form[0]:
    return restore(like)
  scanned, num_layers = form
  out = convert_tree(restore(convert_tree(like, disk_scanned, num_layers)), scanned, num_layers)

  def place(x, target):
    sharding = getattr(target, "sharding", None)
    return x if sharding is None or not isinstance(x, jax.Array) else jax.device_put(x, sharding)
  return jax.tree.map(place, out, like)
