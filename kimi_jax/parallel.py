"""Device mesh, logical-axis rules for the two layouts, shardings, reshard.

Axis legend: B batch rows (decode slots), N samples, T sequence, L max total
length, S cache slots, K kv heads, E head dim.

Mesh axes: `data`, `fsdp`, `tensor`. The same devices hold the weights in two
layouts (k1.5's "hybrid" deployment, but as an on-device reshard instead of a
checkpoint round trip):

  TRAIN   FSDP + tensor parallel: every weight is split over `tensor` (heads,
          MLP width, vocab) AND over `fsdp` (model width), so optimizer state
          and gradients take 1/(fsdp*tensor) of the memory; the batch is split
          over `data` x `fsdp` (FSDP gathers each weight just before use).
  SAMPLE  tensor parallel only, batch over `data` x `fsdp`: decode reads every
          weight every step, so gathering over `fsdp` per token would dominate;
          the weights are gathered once, by `reshard`, instead.

A `Layout` binds one rule table to a mesh and a model; it gives the shardings
of params, optimizer state, batches, KV cache and RolloutState, and a context
(`activate`) under which the model's `nn.with_logical_constraint` calls pin
activations (they are no-ops without it, so unsharded code is unchanged).
A mesh axis that does not divide a parameter's dimension is dropped for that
dimension (e.g. 2 kv heads over tensor=4 are replicated): the rules describe
the intent, the shapes decide what is possible. Batches are never silently
replicated: a batch that does not divide the data axes is an error.

  mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  train, sample = Layout.train(mesh, cfg), Layout.sample(mesh, cfg)
  params = init_params(cfg, rng, train)          # created already sharded
  params_s = reshard(params, sample)             # before rollouts
  params = reshard(params_s, train, donate=True) # before the update
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import warnings
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from kimi_jax import backend
from kimi_jax.models import layer_stack, transformer
from kimi_jax.models.kv_cache import KVCache
from kimi_jax.models.transformer import ModelConfig
from kimi_jax.sampling.state import RolloutState

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both in both layouts


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh axis sizes; -1 (at most one axis) takes the devices left over.

  Multi-slice TPU: when the devices span several slices (`slice_index`), the
  `data` axis is laid across slices (data-center network) and fsdp/tensor
  stay inside a slice (ICI); `data` must then be a multiple of the slice count.
  """
  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  def __post_init__(self):
    sizes = self.sizes
    for name, size in zip(AXES, sizes):
      if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
        raise ValueError(f"MeshConfig.{name} must be a positive int or -1, got {size!r}")
    if sizes.count(-1) > 1:
      raise ValueError(f"MeshConfig: at most one axis may be -1, got {dict(zip(AXES, sizes))}")

  @property
  def sizes(self) -> tuple[int, int, int]:
    return (self.data, self.fsdp, self.tensor)

  def resolve(self, num_devices: int) -> tuple[int, int, int]:
    """Concrete (data, fsdp, tensor) for `num_devices`; raises naming both numbers."""
    fixed = math.prod(s for s in self.sizes if s != -1)
    desc = " x ".join(f"{n}={s}" for n, s in zip(AXES, self.sizes))
    if -1 in self.sizes:
      if num_devices % fixed:
        raise ValueError(f"mesh {desc} needs a multiple of {fixed} devices, but there are "
                         f"{num_devices} devices")
      return tuple(num_devices // fixed if s == -1 else s for s in self.sizes)
    if fixed != num_devices:
      raise ValueError(f"mesh {desc} has {fixed} devices, but there are {num_devices} devices")
    return self.sizes


def device_grid(cfg: MeshConfig, devices: Sequence[Any]) -> np.ndarray:
  """Devices arranged `[data, fsdp, tensor]`, topology-aware on TPU."""
  shape = cfg.resolve(len(devices))
  slices = sorted({getattr(d, "slice_index", 0) for d in devices})
  if len(slices) > 1:
    if shape[0] % len(slices):
      raise ValueError(f"mesh data={shape[0]} must be a multiple of the {len(slices)} slices")
    return mesh_utils.create_hybrid_device_mesh(
        (shape[0] // len(slices),) + shape[1:], (len(slices), 1, 1), devices,
        allow_split_physical_axes=True)
  return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)


def make_mesh(cfg: MeshConfig = MeshConfig(), devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A `data x fsdp x tensor` mesh over `devices` (default: all, every process)."""
  devices = jax.devices() if devices is None else list(devices)
  # Auto axes: shardings are hints XLA propagates (pjit semantics), not types.
  return Mesh(device_grid(cfg, devices), AXES, axis_types=(AxisType.Auto,) * len(AXES))


# Logical axis -> mesh axes, the two layouts side by side. Parameter names
# come from `nn.with_logical_partitioning` in models/transformer.py;
# activation names from its `nn.with_logical_constraint` calls.
#   logical axis            TRAIN (FSDP + TP)   SAMPLE (TP, batch over data)
_RULES = (
    # parameters
    ("vocab",               "tensor",           "tensor"),
    ("embed",               "fsdp",             None),
    ("q_heads",             "tensor",           "tensor"),
    ("kv_heads",            "tensor",           "tensor"),
    ("head_dim",            None,               None),
    ("mlp",                 "tensor",           "tensor"),
    ("norm",                None,               None),
    # the [L, ...] dim of `scan_layers` params: every device holds all layers
    # of its shard (a scan step reads one layer; splitting L would gather it)
    ("layers",              None,               None),
    # activations, batches, KV cache
    ("activation_batch",    BATCH_AXES,         BATCH_AXES),
    ("activation_length",   None,               None),
    ("activation_embed",    None,               None),
    ("activation_heads",    "tensor",           "tensor"),
    ("activation_kv_heads", "tensor",           "tensor"),
    ("activation_mlp",      "tensor",           "tensor"),
    ("activation_vocab",    "tensor",           "tensor"),
)
TRAIN_RULES = tuple((name, train) for name, train, _ in _RULES)
SAMPLE_RULES = tuple((name, sample) for name, _, sample in _RULES)
RULES = {"train": TRAIN_RULES, "sample": SAMPLE_RULES}


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """`spec` without the mesh axes that do not divide their array dimension."""
  entries = tuple(spec) + (None,) * (len(shape) - len(spec))
  out = []
  for dim, axes in zip(shape, entries):
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    kept, split = [], 1
    for a in axes:
      if dim % (split * mesh.shape[a]) == 0:
        kept.append(a)
        split *= mesh.shape[a]
    out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*out)


@dataclasses.dataclass(frozen=True)
class Layout:
  """One rule table on one mesh for one model. Hashable: usable as a jit static.

  kind: "train" or "sample" (picks the rule table).
  cfg: the model; a sample layout holds it unrolled (`scan_layers=False`,
    whatever it is given): a scanned decode step slices every weight and
    restacks the KV cache each token, so `reshard` into a sample layout
    unstacks the blocks, and back into a scanned train layout restacks them.
  """
  kind: str
  mesh: Mesh
  cfg: ModelConfig

  def __post_init__(self):
    if self.kind not in RULES:
      raise ValueError(f"Layout.kind must be one of {sorted(RULES)}, got {self.kind!r}")
    if tuple(self.mesh.axis_names) != AXES:
      raise ValueError(f"Layout needs a mesh with axes {AXES}, got {self.mesh.axis_names}")
    if self.kind == "sample" and self.cfg.scan_layers:
      object.__setattr__(self, "cfg", self.cfg.replace(scan_layers=False))

  @classmethod
  def train(cls, mesh: Mesh, cfg: ModelConfig) -> "Layout":
    return cls("train", mesh, cfg)

  @classmethod
  def sample(cls, mesh: Mesh, cfg: ModelConfig) -> "Layout":
    return cls("sample", mesh, cfg)

  @property
  def rules(self) -> tuple:
    return RULES[self.kind]

  @property
  def batch_shards(self) -> int:
    """Number of ways the batch is split (data x fsdp)."""
    return self.mesh.shape["data"] * self.mesh.shape["fsdp"]

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @contextlib.contextmanager
  def activate(self):
    """Trace-time context: the model's logical constraints apply under it."""
    with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh), nn.logical_axis_rules(self.rules):
      yield

  def logical(self, names: Sequence[Optional[str]], shape: Sequence[int]) -> NamedSharding:
    """Sharding of an array of `shape` whose axes have these logical names."""
    spec = nn.logical_to_mesh_axes(tuple(names), self.rules)
    return NamedSharding(self.mesh, fit_spec(spec, shape, self.mesh))

  def check_batch(self, n: int, what: str = "batch") -> None:
    """Raise unless `n` rows split evenly over the data axes."""
    if n % self.batch_shards:
      raise ValueError(
          f"{what} of {n} rows does not divide over the {self.batch_shards} data-parallel "
          f"devices (data={self.mesh.shape['data']} x fsdp={self.mesh.shape['fsdp']}); use a "
          f"multiple of {self.batch_shards}")

  def batch(self, n: Optional[int] = None, what: str = "batch") -> NamedSharding:
    """Leading axis over `data x fsdp`, the rest replicated (any rank: a prefix spec)."""
    if n is not None:
      self.check_batch(n, what)
    return NamedSharding(self.mesh, P(BATCH_AXES))

  def params(self) -> dict:
    """NamedSharding per parameter (a pytree like the params). Cached."""
    return _param_shardings(self)

  def opt_state(self, optimizer: optax.GradientTransformation):
    """Shardings of `optimizer.init(params)`: moment trees mirror the params,
    scalars (counts, hyperparameters) are replicated."""
    like = jax.eval_shape(optimizer.init, param_shapes(self.cfg))
    return optax.tree_map_params(optimizer, lambda _, s: s, like, self.params(),
                                 transform_non_params=lambda _: self.replicated)

  def kv_cache(self, batch: int, length: int) -> KVCache:
    """Shardings of `init_cache(cfg, batch, length)`: rows over the data axes,
    kv heads over `tensor`, in the backend's cache layout (kv_cache.py)."""
    self.check_batch(batch, "KV cache batch")
    c, cpu_layout = self.cfg, backend.is_cpu()
    k_shape, v_shape = KVCache.shapes(batch, c.num_kv_heads, length, c.head_size, cpu_layout)
    names = (("activation_batch", "activation_kv_heads", None, None) if cpu_layout else
             ("activation_batch", None, "activation_kv_heads", None))
    k, v = self.logical(names, k_shape), self.logical(names, v_shape)
    return KVCache(k=(k,) * c.num_layers, v=(v,) * c.num_layers, index=self.replicated,
                   start=self.batch(), cpu_layout=cpu_layout)

  def rollout_state(self, num_slots: int, images: bool = False) -> RolloutState:
    """Shardings of a `RolloutState` of `num_slots` rows: every field by row
    (`pixels_BSYXC` None unless `images`)."""
    self.check_batch(num_slots, "RolloutState")
    fields = {f.name: self.batch() for f in dataclasses.fields(RolloutState)}
    if not images:
      fields["pixels_BSYXC"] = None
    return RolloutState(**fields)


def param_shapes(cfg: ModelConfig) -> dict:
  """`jax.ShapeDtypeStruct` per parameter (no computation)."""
  return jax.eval_shape(lambda: transformer.init_params(cfg, jax.random.PRNGKey(0)))


@functools.lru_cache(maxsize=32)
def _param_shardings(layout: Layout) -> dict:
  logical = transformer.param_logical_axes(layout.cfg)
  return jax.tree.map(lambda spec, x: layout.logical(tuple(spec), x.shape), logical,
                      param_shapes(layout.cfg), is_leaf=lambda x: isinstance(x, P))


def init_params(cfg: ModelConfig, rng: jax.Array, layout: Layout) -> dict:
  """`transformer.init_params` created directly in `layout` (never whole on one device)."""
  return jax.jit(lambda r: transformer.init_params(cfg, r), out_shardings=layout.params())(rng)


def init_opt_state(optimizer: optax.GradientTransformation, params, layout: Layout):
  """`optimizer.init(params)` created directly in `layout`."""
  return jax.jit(optimizer.init, out_shardings=layout.opt_state(optimizer))(params)


@functools.lru_cache(maxsize=32)
def _identity(layout: Layout, donate: bool):
  cfg = layout.cfg
  return jax.jit(lambda p: layer_stack.to_layer_form(cfg.scan_layers, cfg.num_layers, p),
                 out_shardings=layout.params(), donate_argnums=(0,) if donate else ())


def reshard(params, to_layout: Layout, *, donate: bool = False):
  """Params moved on device into `to_layout` (one jitted identity with
  out_shardings: XLA emits only the collectives the change needs), in its
  layer form (stacked or unrolled, `Layout.cfg.scan_layers`).

  donate: free the input buffers (the caller must not use `params` after).
  """
  if not donate:
    return _identity(to_layout, False)(params)
  with warnings.catch_warnings():
    # Expected: a buffer whose per-device shape changes cannot be aliased.
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    out = _identity(to_layout, True)(params)
  # Free those too (the runtime keeps them alive until the copy has read them).
  for x in jax.tree.leaves(params):
    if isinstance(x, jax.Array) and not x.is_deleted():
      x.delete()
  return out


def _box(index: tuple[slice, ...], shape: Sequence[int]) -> list[tuple[int, int]]:
  return [s.indices(n)[:2] for s, n in zip(index, shape)]


def moved_bytes(shape: Sequence[int], dtype, src: jax.sharding.Sharding,
                dst: jax.sharding.Sharding) -> int:
  """Bytes that devices must receive to go from `src` to `dst`: for every
  device, the part of its `dst` shard that its `src` shard does not hold."""
  shape = tuple(shape)
  itemsize = np.dtype(dtype).itemsize
  src_map, dst_map = src.devices_indices_map(shape), dst.devices_indices_map(shape)
  total = 0
  for device, index in dst_map.items():
    want = _box(index, shape)
    size = math.prod(hi - lo for lo, hi in want)
    held = 0
    if device in src_map:
      have = _box(src_map[device], shape)
      held = math.prod(max(0, min(h1, w1) - max(h0, w0)) for (h0, h1), (w0, w1) in zip(have, want))
    total += (size - held) * itemsize
  return total


def reshard_bytes(params, to_layout: Layout) -> int:
  """Total `moved_bytes` of `reshard(params, to_layout)` from params' current shardings."""
  return sum(jax.tree.leaves(jax.tree.map(
      lambda x, s: moved_bytes(x.shape, x.dtype, x.sharding, s), params, to_layout.params())))
