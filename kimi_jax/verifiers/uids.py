"""Private uids for sandbox runs: handing them out, and making sure one is free.

A run's program executes as a uid of its own, so that RLIMIT_NPROC (counted
per uid) caps that run alone and the host's files are only as open to it as
to "other". A uid goes back to the pool only once no process of it is left;
zombies count, since the kernel counts them against RLIMIT_NPROC until they
are reaped. Least recently used first, so a uid is not handed out again
straight after its run.
"""
from __future__ import annotations

import collections
import os
import signal
import threading
import time

# Far above real accounts and the usual subuid ranges; a block per caller pid
# so two trainers on one host never share a uid (pids stay below 2**22, so
# the largest uid is about 4.07e9 < 2**32 - 1).
UID_BASE, UIDS_PER_PROCESS = 3_000_000_000, 256


def block(pid: int) -> range:
  """The uids the runs of caller process `pid` use."""
  return range(UID_BASE + pid * UIDS_PER_PROCESS, UID_BASE + (pid + 1) * UIDS_PER_PROCESS)


class _UidPool:
  """Hands out the private uids, one per concurrent run, least recently
  used first; a uid whose run could not be verified gone is retired."""

  def __init__(self):
    self._cond = threading.Condition()
    self._free = collections.deque(range(UIDS_PER_PROCESS))

  def acquire(self) -> int:
    with self._cond:
      while not self._free:
        self._cond.wait()
      slot = self._free.popleft()
    return block(os.getpid()).start + slot

  def release(self, uid: int, reusable: bool) -> None:
    if reusable:
      with self._cond:
        self._free.append((uid - UID_BASE) % UIDS_PER_PROCESS)
        self._cond.notify()


def processes(uid: int) -> list[int]:
  """Pids of the processes (zombies too) owned by `uid`."""
  pids = []
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        if os.stat(f"/proc/{entry}").st_uid == uid:
          pids.append(int(entry))
      except OSError:
        pass  # gone meanwhile
  return pids


def kill_all(uid: int, deadline: float) -> bool:
  """SIGKILLs every process of `uid` until none is left (zombies included,
  as they still count for RLIMIT_NPROC); False if some outlive `deadline`."""
  while True:
    pids = processes(uid)
    if not pids:
      return True
    if time.monotonic() > deadline:
      return False
    for pid in pids:
      try:
        os.kill(pid, signal.SIGKILL)
      except OSError:
        pass
    time.sleep(0.002)


POOL = _UidPool()
