"""One cgroup per sandbox run: its processes share one CPU and a process cap.

Why: rlimits are per process (CPU seconds, address space) or per uid
(process count), and the scheduler shares the CPU per thread, or per session
where autogroup is on. A fork swarm whose children each call setsid() gets
an autogroup per child, so 30 of them took 30 shares of the machine and a
correct program graded beside them timed out. In a cgroup of its own a run
counts as one task however it forks (autogroup does not apply below the
root cgroup), is capped at `cpus` CPUs, and at `pids_max` tasks.

The cgroup also tells the caller, independently of the jail, whether any
process of the run is left: `remove` kills what is listed and removes the
directory, which the kernel allows only once the cgroup is empty.

Works as root with cgroup v1 (`cpu` and `pids` hierarchies, as on the
Debian VM we test on) and, untested here, v2 (`cpu` and `pids` delegated to
the parent of the caller's cgroup). Where neither is writable (a container,
no root) `available()` is False and runs go without: then the jail's own
rlimits and process accounting are all there is, and a swarm of sessions
can take more than its share of the CPU. KIMI_SANDBOX_CGROUPS=0 turns them
off.
"""
from __future__ import annotations

import errno
import os
import signal
import threading
import time
from typing import Optional

_PREFIX = "kimi_sandbox."
_PERIOD_US = 100_000
_lock = threading.Lock()
# (parent directory, cgroup version, controllers there); None: not probed yet.
_layout: Optional[list[tuple[str, int, tuple[str, ...]]]] = None


def _own_paths() -> dict:
  """hierarchy key -> this process's cgroup path in it, from /proc/self/cgroup:
  the v1 controller list ("cpu,cpuacct") or "" for v2."""
  paths = {}
  with open("/proc/self/cgroup") as f:
    for line in f:
      _, controllers, path = line.rstrip("\n").split(":", 2)
      paths[controllers] = path
  return paths


def _parents() -> list[tuple[str, int, tuple[str, ...]]]:
  """Where run cgroups go, for the cpu and pids controllers.

  v1: inside the caller's own cgroup, so a run weighs like one more task
  of the caller (at the root here, as a scheduler autogroup does). v2
  forbids processes in a cgroup whose children have controllers, so there
  runs go beside the caller's cgroup, in its parent.
  """
  own = _own_paths()
  found = []
  with open("/proc/self/mountinfo") as f:
    for line in f:
      fields = line.split()
      sep = fields.index("-")
      fstype, super_opts, root, point = fields[sep + 1], fields[sep + 3], fields[3], fields[4]
      if fstype == "cgroup":
        have = super_opts.split(",")
        path = next((p for k, p in own.items() if k and set(k.split(",")) & set(have)), None)
      elif fstype == "cgroup2":
        try:
          with open(os.path.join(point, "cgroup.controllers")) as g:
            have = g.read().split()
        except OSError:
          continue
        path = own.get("")
        path = path and os.path.dirname(path)
      else:
        continue
      wanted = tuple(c for c in ("cpu", "pids") if c in have)
      if wanted and path is not None and path.startswith(root):
        found.append((os.path.normpath(os.path.join(point, os.path.relpath(path, root))),
                      1 if fstype == "cgroup" else 2, wanted))
  return found


def _write(path: str, value: str) -> None:
  with open(path, "w") as f:
    f.write(value)


def _setup() -> list[tuple[str, int, tuple[str, ...]]]:
  """The parents to use (each controller once); [] when cgroups cannot be used."""
  if os.environ.get("KIMI_SANDBOX_CGROUPS", "1") == "0" or os.geteuid() != 0:
    return []
  layout, covered = [], set()
  for parent, version, controllers in _parents():
    controllers = tuple(c for c in controllers if c not in covered)
    if version == 2:
      try:
        with open(os.path.join(parent, "cgroup.subtree_control")) as f:
          controllers = tuple(c for c in controllers if c in f.read().split())
      except OSError:
        continue
    if controllers and os.access(parent, os.W_OK):
      layout.append((parent, version, controllers))
      covered.update(controllers)
  return layout if covered == {"cpu", "pids"} else []


def _get_layout():
  global _layout
  with _lock:
    if _layout is None:
      try:
        _layout = _setup()
      except (OSError, ValueError):
        _layout = []  # an unreadable or unexpected /proc layout: go without
    return _layout


def available() -> bool:
  """Whether runs get a cgroup each (probed once)."""
  return bool(_get_layout())


def create(name: str, cpus: float, pids_max: int) -> list[str]:
  """The run's cgroup directories, limits set; the program joins them
  before it drops root (jail.py). [] when cgroups are not available. A leftover directory of
  the same name (a caller killed mid-run) is emptied and reused."""
  dirs = []
  try:
    for parent, version, controllers in _get_layout():
      d = os.path.join(parent, _PREFIX + name)
      if os.path.isdir(d):
        _kill_members(d)
      else:
        os.mkdir(d)
      dirs.append(d)
      quota = str(int(cpus * _PERIOD_US))
      if "cpu" in controllers:
        if version == 1:
          _write(os.path.join(d, "cpu.cfs_period_us"), str(_PERIOD_US))
          _write(os.path.join(d, "cpu.cfs_quota_us"), quota)
        else:
          _write(os.path.join(d, "cpu.max"), f"{quota} {_PERIOD_US}")
      if "pids" in controllers:
        _write(os.path.join(d, "pids.max"), str(pids_max))
  except OSError as e:
    remove(dirs, deadline=time.monotonic() + 1.0)
    raise OSError(e.errno, f"sandbox cgroup {d}: {e.strerror}") from None
  return dirs


def members(d: str) -> list[int]:
  """Pids in cgroup `d` (as the caller sees them)."""
  with open(os.path.join(d, "cgroup.procs")) as f:
    return [int(p) for p in f.read().split()]


def _kill_members(d: str) -> int:
  pids = members(d)
  for pid in pids:
    try:
      os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  return len(pids)


def remove(dirs: list[str], deadline: float) -> bool:
  """SIGKILLs whatever is left in the run's cgroups and removes them.

  True when all are gone; False when something outlived `deadline` (then
  the caller must not reuse the run's uid).
  """
  pending = list(dirs)
  while pending:
    for d in list(pending):
      try:
        if _kill_members(d) == 0:
          os.rmdir(d)
          pending.remove(d)
      except FileNotFoundError:
        pending.remove(d)
      except OSError as e:
        if e.errno != errno.EBUSY:  # EBUSY: a killed task not yet detached
          raise
    if pending:
      if time.monotonic() > deadline:
        return False
      time.sleep(0.002)
  return True
