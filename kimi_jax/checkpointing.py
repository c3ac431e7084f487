"""Checkpoints: params, optimizer state and host state in one orbax step.

One step directory `<directory>/<step>/` holds three items:
  params     device arrays (orbax StandardSave: OCDBT + zarr, sharding aware)
  opt_state  optax state (namedtuples round-trip through the restore target)
  host       JSON: run-wide host values (iteration, counters, ...) and, under
             "processes", one `process_state` per process (its scheduler /
             prompt-sampler `state_dict()`s, ...), in process order (JsonSave)

Multi-host: every process calls `save` / `restore` together. Orbax writes
each process's shards of the params and optimizer state (OCDBT; the
directory must be on a filesystem every host sees) and restores them into
the shardings of the targets, whatever the writer's mesh or process count.
Each process's `process_state` is gathered to process 0, which writes the
JSON; on restore every process reads its own back (`Restored.process_state`),
None when the checkpoint was written by another number of processes (then
`host_state["processes"]` still holds them all).

Resume is "restore the newest readable step, else init": `restore_or_none`.
Orbax writes each step to `<step>.orbax-checkpoint-tmp*` and renames it when
complete, so a run killed mid-save leaves no step that looks finished (the
temporary directory is removed when the next Checkpointer opens). A full
disk during a save removes that step's temporary directory and raises an
OSError (ENOSPC) naming the directory; the earlier steps are intact. A step
that is finished but unreadable (truncated file, broken JSON) is skipped with
a warning and the next older one is tried. Skipped steps are then renamed to
`<step>.corrupt` (never deleted) so that orbax, which refuses to save a step
<= its latest, can save those step numbers again. A checkpoint that reads
fine but does not fit the targets (model config changed) is an error, not
corruption: nothing is skipped or renamed.
"""
from __future__ import annotations

import errno
import glob
import os
import shutil
from typing import Any, NamedTuple, Optional

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from kimi_jax import distributed, faults, save_faults
from kimi_jax.models import layer_stack

PyTree = Any
PROCESSES = "processes"  # host-state key of the per-process states


class Restored(NamedTuple):
  step: int
  params: PyTree
  opt_state: PyTree
  host_state: dict

  @property
  def process_state(self) -> Optional[dict]:
    """This process's `process_state` as saved; None when none was saved or
    the checkpoint was written by another number of processes."""
    states = self.host_state.get(PROCESSES)
    if isinstance(states, list) and len(states) == jax.process_count():
      return states[jax.process_index()]
    return None


class CheckpointMismatchError(ValueError):
  """The checkpoint is readable but does not fit the given targets."""


def _host_handler(step_of) -> ocp.JsonCheckpointHandler:
  """The handler of the "host" JSON item, with fault point
  "checkpoint_write" in its save: the step's temporary directory exists, the
  step is not finalised. (A subclass would not match orbax's registry of
  handlers for JsonSaveArgs; the instance's method is wrapped instead.)"""
  handler = ocp.JsonCheckpointHandler()
  save = handler.async_save

  async def async_save(directory, item=None, args=None):
    faults.reached("checkpoint_write", step_of())
    return await save(directory, item, args)

  handler.async_save = async_save
  return handler


class Checkpointer:
  """Small orbax wrapper: save one step, restore the newest readable one.

  Args:
    directory: where step directories live (created if missing; its parent
      must exist).
    keep: number of most recent steps kept (orbax `max_to_keep`); None keeps
      all.
    async_save: save in a background thread; call `wait_until_finished()`
      before reading the files. Off by default: a synchronous save has
      finished (renamed into place) when `save` returns.
  """

  def __init__(self, directory: str | os.PathLike, *, keep: Optional[int] = 3,
               async_save: bool = False):
    self.directory = os.path.abspath(os.fspath(directory))
    parent = os.path.dirname(self.directory)
    if not os.path.isdir(parent):
      raise FileNotFoundError(
          f"checkpoint directory {self.directory}: parent directory {parent} "
          "does not exist")
    if keep is not None and keep < 1:
      raise ValueError(f"Checkpointer: keep must be >= 1 or None, got {keep}")
    # cleanup_tmp_directories: a step left half-written by a killed run goes
    # (on a full disk its space is needed).
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, save_interval_steps=1,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
    self._saving = -1  # the step being saved (for the fault point)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"params": ocp.StandardCheckpointHandler(),
                       "opt_state": ocp.StandardCheckpointHandler(),
                       "host": _host_handler(lambda: self._saving)})

  # ------------------------------------------------------------------ save

  def save(self, step: int, *, params: PyTree, opt_state: PyTree,
           host_state: dict, process_state: Optional[dict] = None) -> None:
    """Writes one step. `step` must be newer than every existing step.

    host_state: JSON-able values, the same on every process.
    process_state: JSON-able values of THIS process (all processes pass one
      or none); stored as `host_state["processes"][process_index]`.
    """
    step = int(step)
    latest = self.latest_step()
    if latest is not None and step <= latest:
      # Orbax would silently skip this save; a lost checkpoint is worse.
      raise ValueError(f"checkpoint step {step} in {self.directory}: a step "
                       f">= it already exists (latest {latest})")
    host = _to_json(host_state, "host_state")
    if process_state is not None:
      if PROCESSES in host:
        raise ValueError(f"host_state: key {PROCESSES!r} is reserved for process_state")
      host[PROCESSES] = distributed.allgather_json(
          _to_json(process_state, "process_state"))
    self._saving = step
    save_faults.quiet_abandoned_writes()
    try:
      saved = self._manager.save(step, args=ocp.args.Composite(
          params=ocp.args.StandardSave(params),
          opt_state=ocp.args.StandardSave(opt_state),
          host=ocp.args.JsonSave(host)))
    except Exception as e:  # pylint: disable=broad-except
      if not save_faults.no_space(e):
        raise
      self._remove_partial(step)
      raise OSError(errno.ENOSPC, f"no space left on device while writing checkpoint step "
                    f"{step} (steps {self.all_steps()} are intact)", self.directory) from None
    if not saved:
      raise RuntimeError(f"orbax refused to save step {step} in "
                         f"{self.directory}")
    logging.info("saved checkpoint step %d in %s", step, self.directory)

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def _remove_partial(self, step: int) -> None:
    """Deletes what a failed save of `step` left (only orbax's temporary
    directories: a finished step is never touched)."""
    if jax.process_index() == 0:
      for path in glob.glob(os.path.join(self.directory, f"{step}.orbax-checkpoint-tmp*")):
        shutil.rmtree(path, ignore_errors=True)

  def close(self) -> None:
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # --------------------------------------------------------------- restore

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def restore(self, step: Optional[int] = None, *, params_like: PyTree,
              opt_state_like: PyTree) -> Restored:
    """Restores `step`, or the newest readable step when `step` is None.

    `params_like` / `opt_state_like` give structure, shapes, dtypes and
    shardings: concrete arrays, `jax.eval_shape` output or ShapeDtypeStruct
    trees (with `sharding=` set, arrays come back laid out that way across
    devices; without, on the default device). Raises FileNotFoundError when
    there is nothing to restore, CheckpointMismatchError when the
    checkpoint's arrays do not fit the targets.
    """
    self.wait_until_finished()
    targets = (_abstract(params_like), _abstract(opt_state_like))
    if step is not None:
      return self._restore_step(int(step), *targets)
    restored = self._restore_newest(*targets)
    if restored is None:
      raise FileNotFoundError(f"no restorable checkpoint in {self.directory}")
    return restored

  def restore_or_none(self, *, params_like: PyTree,
                      opt_state_like: PyTree) -> Optional[Restored]:
    """The single resume point: the newest readable step, or None to init."""
    self.wait_until_finished()
    return self._restore_newest(_abstract(params_like),
                                _abstract(opt_state_like))

  def _restore_step(self, step: int, params_abs: PyTree,
                    opt_abs: PyTree) -> Restored:
    host = []

    def read(targets):
      out = self._manager.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(targets[0]),
          opt_state=ocp.args.StandardRestore(targets[1]),
          host=ocp.args.JsonRestore()))
      host.append(out["host"])
      return out["params"], out["opt_state"]

    try:  # unreadable metadata: the restore itself reports the problem
      disk = layer_stack.scanned_or_none(self._manager.item_metadata(step)["params"].tree)
    except Exception:  # pylint: disable=broad-except
      disk = None
    try:
      # `scan_layers` may differ from the writer's (a run-time setting): the
      # step is read in its own layer form and converted (params and moments).
      params, opt_state = layer_stack.restore_in_form(read, (params_abs, opt_abs), disk)
    except Exception as e:
      mismatch = self._mismatch(step, params_abs, opt_abs)
      if mismatch:
        raise CheckpointMismatchError(
            f"checkpoint step {step} in {self.directory} does not fit the "
            f"current model / optimizer: {mismatch}") from e
      raise
    return Restored(step, params, opt_state, host[0])

  def _restore_newest(self, params_abs: PyTree,
                      opt_abs: PyTree) -> Optional[Restored]:
    self._manager.reload()
    unreadable = []
    for step in reversed(self.all_steps()):
      try:
        restored = self._restore_step(step, params_abs, opt_abs)
      except CheckpointMismatchError:
        raise  # every older step would fail the same way: not corruption
      except Exception as e:  # any read error means "this step is broken"
        logging.warning(
            "checkpoint step %d in %s is unreadable (%s); trying an older "
            "step", step, self.directory, save_faults.short(e))
        unreadable.append(step)
        continue
      self._quarantine(unreadable)
      logging.info("restored checkpoint step %d from %s", step, self.directory)
      return restored
    if unreadable:
      logging.warning("no readable checkpoint in %s (unreadable steps %s); "
                      "starting from scratch", self.directory, unreadable)
      self._quarantine(unreadable)
    return None

  def _quarantine(self, steps: list[int]) -> None:
    """Renames unreadable steps out of orbax's view, keeping every file."""
    if not steps:
      return
    if jax.process_index() == 0:
      for step in steps:
        src = os.path.join(self.directory, str(step))
        dst, n = src + ".corrupt", 1
        while os.path.exists(dst):
          dst, n = f"{src}.corrupt.{n}", n + 1
        os.rename(src, dst)
        logging.warning("moved unreadable checkpoint step %d to %s (kept for "
                        "inspection)", step, dst)
    ocp.multihost.sync_global_processes("kimi_jax_checkpoint_quarantine")
    self._manager.reload()

  def _mismatch(self, step: int, params_abs: PyTree, opt_abs: PyTree) -> str:
    """Names array paths whose shapes differ on disk; '' if none or unknown."""
    try:
      meta = self._manager.item_metadata(step)
      problems = []
      for name, target in (("params", params_abs), ("opt_state", opt_abs)):
        on_disk = {m.name: tuple(m.shape)
                   for m in jax.tree.leaves(meta[name].tree)}
        names = ocp.tree.get_param_names(target, include_empty_nodes=False)
        wanted = {n: tuple(x.shape) for n, x in zip(
            jax.tree.leaves(names), jax.tree.leaves(target))}
        for key in sorted(set(on_disk) | set(wanted)):
          if on_disk.get(key) != wanted.get(key):
            problems.append(f"{name}/{key}: checkpoint {on_disk.get(key)} vs "
                            f"target {wanted.get(key)}")
    except Exception:  # unreadable metadata is corruption, not a mismatch
      return ""
    more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
    return "; ".join(problems[:5]) + more


# ------------------------------------------------------------------ helpers


def _abstract(tree: PyTree) -> PyTree:
  """Arrays -> ShapeDtypeStruct keeping their sharding; a ShapeDtypeStruct
  without one gets the default device (orbax refuses to guess a layout for
  a checkpoint written on another topology); others as given."""
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def leaf(x):
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is None:
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=default)
    return x
  return jax.tree.map(leaf, tree)


def _to_json(x: Any, path: str) -> Any:
  """Plain JSON values; numpy values become Python, tuples lists.

  Raises TypeError naming the path of anything that would not round-trip
  exactly (non-string dict keys, arbitrary objects).
  """
  if isinstance(x, dict):
    out = {}
    for k, v in x.items():
      if not isinstance(k, str):
        raise TypeError(f"{path}: dict key {k!r} is not a str (JSON would "
                        "turn it into one)")
      out[k] = _to_json(v, f"{path}[{k!r}]")
    return out
  if isinstance(x, (list, tuple)):
    return [_to_json(v, f"{path}[{i}]") for i, v in enumerate(x)]
  if isinstance(x, np.ndarray):
    return _to_json(x.tolist(), path)
  if isinstance(x, np.generic):
    return x.item()
  if x is None or isinstance(x, (bool, int, str)):
    return x
  if isinstance(x, float):
    return x  # NaN / inf are written as the NaN / Infinity JSON extensions
  raise TypeError(f"{path}: {type(x).__name__} is not JSON-able")
