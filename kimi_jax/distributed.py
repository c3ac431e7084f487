"""Multi-process (multi-host) plumbing: start-up, row ownership, host data across processes.

One process per host (a TPU VM worker, a GPU node, or a local CPU process in
tests) runs the same program; jitted functions take and return global
`jax.Array`s laid out over every device of every process. With one process
every helper here is the identity, so single-host code pays nothing.

Row ownership: a batch (rollout slots, a training minibatch) is split over
the mesh's batch axes (`parallel.BATCH_AXES`); the rows held by a process's
devices are that process's rows. It fills them from its own host state
(`to_global`) and reads exactly them back (`to_local`), so each process runs
its own scheduler, prompt shard and verifiers on `rows / process_count`
rows. `owned_rows` checks that the mesh splits the rows evenly over the
processes (a batch axis replicated ACROSS processes would make two
processes' host states describe the same rows).

Values every process computes identically (eval prompts, RNG keys, scalars)
are passed as plain numpy/jax values: jax checks they agree across processes.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Optional, Sequence

from absl import logging
import jax
import numpy as np
from jax.experimental import multihost_utils

ENV_ADDRESS, ENV_NUM, ENV_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


def _env_int(name: str) -> Optional[int]:
  value = os.environ.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"${name}={value!r} is not an int") from None


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, auto: bool = False) -> bool:
  """Start `jax.distributed` before any other jax call; returns whether it started.

  The arguments, else $JAX_COORDINATOR_ADDRESS / $JAX_NUM_PROCESSES /
  $JAX_PROCESS_ID. With none of them set: nothing happens (one process),
  unless `auto`, which lets jax detect the cluster (Cloud TPU pods, SLURM,
  ...). A partial set is an error naming what is missing. CPU processes use
  gloo collectives (the CPU backend has no others without MPI).
  """
  address = coordinator_address or os.environ.get(ENV_ADDRESS) or None
  num = num_processes if num_processes is not None else _env_int(ENV_NUM)
  pid = process_id if process_id is not None else _env_int(ENV_ID)
  given = {"coordinator_address": address, "num_processes": num, "process_id": pid}
  if all(v is None for v in given.values()):
    if not auto:
      return False
    jax.distributed.initialize()  # cluster auto-detection
  else:
    missing = sorted(k for k, v in given.items() if v is None)
    if missing:
      env = {"coordinator_address": ENV_ADDRESS, "num_processes": ENV_NUM, "process_id": ENV_ID}
      raise ValueError(f"jax.distributed: {', '.join(missing)} not set (flags "
                       f"{', '.join('--' + m for m in missing)} or "
                       f"{', '.join('$' + env[m] for m in missing)}); got {given}")
    if not 0 <= pid < num:
      raise ValueError(f"jax.distributed: process_id {pid} not in [0, num_processes={num})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(address, num, pid)
  logging.info("jax.distributed: process %d of %d, %d local of %d devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def is_primary() -> bool:
  """Process 0 writes metrics, plots and the checkpoint's JSON."""
  return jax.process_index() == 0


def mesh_devices(sizes: Sequence[int]) -> list:
  """Devices for a mesh of `sizes` (-1 = the rest): all of them, except that a
  fully given mesh smaller than one process's devices takes the first ones
  (the all-ones default runs on one device, as the trainer always has)."""
  devices = jax.devices()
  n = math.prod(sizes)
  if -1 in sizes or jax.process_count() > 1 or n >= len(devices):
    return devices
  logging.info("mesh %s uses %d of the %d devices", tuple(sizes), n, len(devices))
  return devices[:n]


def owned_rows(sharding: jax.sharding.Sharding, rows: int, what: str) -> slice:
  """The rows `[start, stop)` of a `rows`-row batch that this process holds.

  Raises ValueError unless every process holds `rows / process_count`
  contiguous rows (the batch axes must split over the processes).
  """
  n = jax.process_count()
  held = sorted({idx[0].indices(rows)[:2] for idx in
                 sharding.addressable_devices_indices_map((rows,)).values()})
  start, stop = held[0][0], held[-1][1]
  contiguous = all(a[1] == b[0] or a == b for a, b in zip(held, held[1:]))
  if rows % n or not contiguous or stop - start != rows // n:
    raise ValueError(
        f"{what}: {rows} rows must split evenly over the {n} processes (each process owns "
        f"rows / {n}); this process's devices hold rows {held}. Use a mesh whose batch axes "
        f"(data x fsdp) are a multiple of the process count and a row count divisible by it")
  return slice(start, stop)


def to_global(tree: Any, shardings: Any) -> Any:
  """Each process's rows (numpy, leading axis) -> global arrays in `shardings`
  (a tree like `tree`, or one sharding for every leaf).

  Always device arrays, also with one process: a jit called with host arrays
  one time and device arrays the next compiles twice.
  """
  n = jax.process_count()
  if n == 1:
    if isinstance(shardings, jax.sharding.Sharding):
      return jax.tree.map(lambda x: jax.device_put(x, shardings), tree)
    return jax.device_put(tree, shardings)

  def put(x, s):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(s, x, (x.shape[0] * n,) + x.shape[1:])

  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x: put(x, shardings), tree)
  return jax.tree.map(put, tree, shardings)


def place(tree: Any, shardings: Any) -> Any:
  """A value every process holds whole and equal (weights after a replicated
  SFT warm-up or a checkpoint load) -> global arrays in `shardings`; each
  process copies only the pieces its devices hold."""
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)

  def put(x, s):
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, s, lambda index: host[index])

  return jax.tree.map(put, tree, shardings)


def to_local(tree: Any) -> Any:
  """Global arrays -> numpy: the rows this process holds (everything with one
  process; the whole value for a replicated array)."""

  def fetch(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return np.asarray(x)
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    blocks = {}
    for shard in x.addressable_shards:
      blocks.setdefault(shard.index[0].indices(x.shape[0])[0], shard.data)
    return np.concatenate([np.asarray(blocks[k]) for k in sorted(blocks)])

  return jax.tree.map(fetch, tree)


def fetch(tree: Any) -> Any:
  """Global arrays -> numpy copies of the WHOLE arrays on every process."""

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)

  return jax.tree.map(one, tree)


def max_over_processes(value: int) -> int:
  """The largest `value` any process holds (all must call)."""
  if jax.process_count() == 1:
    return int(value)
  return int(np.max(multihost_utils.process_allgather(np.int32(value))))


def allgather_json(obj: Any) -> list:
  """Every process's JSON-able `obj`, in process order, on every process."""
  if jax.process_count() == 1:
    return [obj]
  data = np.frombuffer(json.dumps(obj).encode("utf-8"), np.uint8)
  lengths = multihost_utils.process_allgather(np.int32(len(data)))
  buf = np.zeros(max(int(np.max(lengths)), 1), np.uint8)  # same width on every process
  buf[:len(data)] = data
  rows = multihost_utils.process_allgather(buf)
  return [json.loads(bytes(rows[i, :lengths[i]]).decode("utf-8")) for i in range(len(rows))]


def sync(name: str) -> None:
  """Barrier across processes (no-op with one)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
