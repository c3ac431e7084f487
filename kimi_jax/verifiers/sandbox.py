"""Runs one untrusted program in a jail and returns what it did (no grading).

  run = sandbox.run_program({"main.py": src}, ["python", "main.py"],
                            stdin=b"1 2\\n", timeout_s=2.0)
  run.exit_code, run.signal, run.stdout, run.stderr, run.timed_out, ...

`run_program` returns only when no process of the run is left: whatever
the program forked, daemonised or left running is dead by then, and the
run's private uid is handed out again only after that is verified.

Mechanisms, strongest mode first (`mode()` says which one is in effect; the
first is chosen automatically when it works, KIMI_SANDBOX_MODE forces one):

  "namespaces" (root with CAP_SYS_ADMIN; what this Debian box gives us):
    * new PID, mount, network, IPC and UTS namespaces (unshare(2)): no
      network but a downed loopback, no view of host processes (a fresh
      /proc), and when the jail's init dies the kernel kills every process
      left inside, however it forked or setsid()-ed;
    * every host mount read-only (in the jail's mount namespace only), a
      private tmpfs (size- and inode-capped) on /tmp holding only this
      run's files, which is the working directory, and empty read-only
      tmpfs over /var/tmp, /dev/shm, /run/lock: nothing on the host is
      writable, not even a world-writable directory, and no other run's
      files are visible;
    * the program runs as a private unprivileged uid (one per concurrent run,
      no passwd entry), after setgroups([])/setgid/setuid and
      PR_SET_NO_NEW_PRIVS. This makes RLIMIT_NPROC bite (the kernel does
      not enforce it for root);
    * a cgroup per run where the host allows (cgroup.py): the run's
      processes share one CPU and a task cap, so a fork swarm cannot starve
      the runs beside it;
    * rlimits: RLIMIT_CPU, RLIMIT_AS, RLIMIT_NPROC, RLIMIT_FSIZE,
      RLIMIT_NOFILE, RLIMIT_CORE=0;
    * the caller enforces the wall clock (from the program's start) and
      the output caps; the jail kills the program if the caller dies or
      stops acting (jail.py).
  "uid" (root, but unshare is refused): private uid + rlimits + cgroup +
    kills of the program's group, its orphans and every process of its uid.
    Weaker: the network is reachable and world-writable dirs (/tmp,
    /dev/shm) are writable.
  "rlimits" (not root): rlimits + process-group kill + orphans reparented
    to the jail (PR_SET_CHILD_SUBREAPER) and killed when the program exits;
    the program runs as the caller's user with its network and files, and
    RLIMIT_NPROC counts all the caller's processes. Weakest: trusted code only.
    (Forced as root it also leaves RLIMIT_NPROC unenforced.)

Programs run under `interpreter()`: the caller's Python when the private uid
can execute it, else /usr/bin/python3 (e.g. a venv under a 0700 /root: then
programs get the system Python's packages, not the venv's).
"""
from __future__ import annotations

import dataclasses
import marshal
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Mapping, Optional, Sequence

from kimi_jax.verifiers import cgroup, uids

MODES = ("namespaces", "uid", "rlimits")
JAIL_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "jail.py")
UID_BASE = uids.UID_BASE
_SETUP_S = 10.0  # the jail's start-up (before the program's clock starts), at most
_STOP_S = 10.0  # the jail's time to kill and reap the run once asked to stop
_CLEAR_S = 10.0  # the caller's own sweep after that
_BACKSTOP_S = 5.0  # the jail kills the program this long past its timeout by itself


@dataclasses.dataclass(frozen=True)
class Limits:
  """Per-run resource limits (wall clock is `timeout_s` of `run_program`).

  memory_mb: RLIMIT_AS (address space) of each process of the program.
  nproc: RLIMIT_NPROC, processes + threads of the run's private uid, and
    the task cap of the run's cgroup.
  cpus: CPUs the whole run may use at once (its cgroup's quota).
  fsize_mb: RLIMIT_FSIZE, largest file the program may write.
  tmpfs_mb: size of its private /tmp (namespaces mode).
  output_bytes: stdout beyond this kills the run (output_overflow); stderr
    beyond it too (only its tail is kept).
  """
  memory_mb: int = 1024
  nproc: int = 32
  cpus: float = 1.0
  fsize_mb: int = 16
  nofile: int = 256
  tmpfs_mb: int = 64
  output_bytes: int = 1 << 20


@dataclasses.dataclass(frozen=True)
class Run:
  """What one program run did. `exit_code` xor `signal` is set unless the
  run was killed by the caller (timed_out / output_overflow) or the jail
  failed (setup_error). wall_s counts from the call, start-up included."""
  exit_code: Optional[int]
  signal: Optional[int]
  stdout: bytes
  stderr: bytes  # the last `_STDERR_TAIL` bytes
  timed_out: bool
  output_overflow: bool
  setup_error: Optional[str]
  wall_s: float
  cpu_s: float = 0.0
  maxrss_kb: int = 0


_STDERR_TAIL = 4096
_CHOSEN_LOCK = threading.Lock()
_CHOSEN: Optional[tuple[str, str]] = None


def _user_env() -> dict:
  return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp",
          "LANG": "C.UTF-8", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
          "MKL_NUM_THREADS": "1"}


def _run(mode: str, files: Mapping[str, bytes], argv: Sequence[str], stdin: bytes,
         timeout_s: float, limits: Limits, python: str) -> Run:
  start = time.monotonic()
  staging = tempfile.mkdtemp(prefix="kimi_sbx_")  # 0700, root-owned
  uid = uids.POOL.acquire()
  proc, groups, cleared = None, [], False
  status_r = status_w = -1
  try:
    for name, data in files.items():
      if os.sep in name or name.startswith("."):
        raise ValueError(f"file name {name!r} must be a plain name")
      with open(os.path.join(staging, name), "wb") as f:
        f.write(data)
    stdin_path = os.path.join(staging, ".stdin")
    with open(stdin_path, "wb") as f:
      f.write(stdin)
    if mode == "uid":
      os.chown(staging, uid, uid)
    groups = cgroup.create(f"run{uid}", limits.cpus, limits.nproc)
    status_r, status_w = os.pipe()
    cfg = {"mode": mode, "uid": uid, "staging": staging, "files": sorted(files),
           "argv": [python if a == "python" else a for a in argv],
           "env": _user_env(), "limits": dataclasses.asdict(limits),
           "cpu_s": max(1, int(timeout_s + 0.999)), "status_fd": status_w,
           "caller_pid": os.getpid(), "cgroups": groups,
           "backstop_s": timeout_s + _BACKSTOP_S}
    with open(stdin_path, "rb") as stdin_file:
      proc = subprocess.Popen(
          # caller=PID: which process a jail belongs to, for ps and for checks.
          [sys.executable, "-I", "-S", JAIL_SCRIPT, marshal.dumps(cfg).hex(),
           f"caller={os.getpid()}"],
          stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
          pass_fds=(status_w,), start_new_session=True, env={}, cwd=staging)
    os.close(status_w)
    status_w = -1
    out, err, status, timed_out, overflow, late = _collect(
        proc, status_r, start, timeout_s, limits.output_bytes)
  finally:
    if proc is not None:
      _stop(proc)
    cleared = _clear(mode, uid, groups)
    for fd in (status_r, status_w):
      if fd >= 0:
        os.close(fd)
    shutil.rmtree(staging, ignore_errors=True)
    uids.POOL.release(uid, reusable=cleared)
  wall_s = time.monotonic() - start
  report = _parse_status(status)
  setup_error = report.get("setup_error")
  if late:
    setup_error = f"the jail did not start the program within {_SETUP_S:.0f} s"
  elif not report and not (timed_out or overflow):
    setup_error = f"jail exited {proc.returncode} without a status: {err[-300:]!r}"
  if not cleared:
    setup_error = f"processes of the run (uid {uid}) outlived it by {_CLEAR_S:.0f} s"
  return Run(exit_code=report.get("exit"), signal=report.get("signal"),
             stdout=bytes(out), stderr=bytes(err[-_STDERR_TAIL:]),
             timed_out=timed_out or bool(report.get("backstop")),
             output_overflow=overflow, setup_error=setup_error, wall_s=wall_s,
             cpu_s=float(report.get("cpu_s", 0.0)),
             maxrss_kb=int(report.get("maxrss_kb", 0)))


def _parse_status(text: str) -> dict:
  """Inverse of jail._write_status on its last line: {"exit"|"signal": int,
  "cpu_s", "maxrss_kb", "backstop"} or {"setup_error"}; {} when there is none."""
  lines = [l.strip() for l in text.splitlines() if l.strip() and l.strip() != "started=1"]
  if not lines:
    return {}
  line = lines[-1]
  if line.startswith("setup_error="):
    return {"setup_error": line[len("setup_error="):]}
  try:
    pairs = dict(item.split("=", 1) for item in line.split())
    report = {k: int(v) for k, v in pairs.items()
              if k in ("exit", "signal", "maxrss_kb", "backstop")}
    report["cpu_s"] = float(pairs.get("cpu_s", 0.0))
    return report
  except ValueError:
    return {"setup_error": f"bad status {line[:200]!r}"}


def _collect(proc, status_r: int, start: float, timeout_s: float, cap: int):
  """Reads stdout/stderr/status until the jail is done, the deadline, or the cap.

  The program's clock starts when the jail reports "started" (the jail's
  own start-up, slow on a loaded machine, is not the program's time); the
  jail has `_SETUP_S` for that. The jail is done when its status pipe
  closes (it has exited, and with it every process of the run); what the
  program wrote is in the pipes by then, so we drain them without waiting
  for an end-of-file.
  Returns (stdout, stderr tail, status text, timed_out, overflow, late start).
  """
  out, err, status = bytearray(), bytearray(), bytearray()
  timed_out = overflow = jail_done = started = False
  deadline = start + _SETUP_S
  sel = selectors.DefaultSelector()  # epoll: the trainer may hold fds > 1024
  try:
    for f, buf in ((proc.stdout, out), (proc.stderr, err)):
      os.set_blocking(f.fileno(), False)
      sel.register(f.fileno(), selectors.EVENT_READ, buf)
    sel.register(status_r, selectors.EVENT_READ, status)
    err_total = 0
    while sel.get_map() and not overflow:
      remaining = 0.0 if jail_done else deadline - time.monotonic()
      if remaining <= 0 and not jail_done:
        timed_out = True
        break
      events = sel.select(remaining)
      if not events and jail_done:
        break
      for key, _ in events:
        try:
          chunk = os.read(key.fd, 1 << 16)
        except BlockingIOError:
          continue
        if not chunk:
          sel.unregister(key.fd)
          jail_done = jail_done or key.data is status
          continue
        key.data.extend(chunk)
        if key.data is status and not started and status.startswith(b"started=1\n"):
          started = True
          deadline = time.monotonic() + timeout_s
        if key.data is err:  # keep only the tail, but a flood still counts
          err_total += len(chunk)
          del err[:-_STDERR_TAIL]
        if len(out) > cap or err_total > cap:
          overflow = True
          break
  finally:
    sel.close()
  late = timed_out and not started
  return (out, err, bytes(status).decode("utf-8", "replace"), timed_out and started,
          overflow, late)


def _stop(proc) -> None:
  """Has the jail end the run and waits for it. Once the jail (J0) is
  reaped, no process of the run is left in namespaces mode (jail.py)."""
  if proc.poll() is None:
    proc.send_signal(signal.SIGTERM)  # J0 SIGKILLs the run and waits for it
    try:
      proc.wait(_STOP_S)
    except subprocess.TimeoutExpired:
      # J0 itself stuck: it never should be. Its pid is not reaped yet, so
      # the group id cannot have been reused; _clear sweeps the rest.
      try:
        os.killpg(proc.pid, signal.SIGKILL)
      except OSError:
        pass
      proc.wait()
  proc.stdout.close()
  proc.stderr.close()


def _clear(mode: str, uid: int, groups: list[str]) -> bool:
  """Verifies (killing what remains) that no process of the run is left.

  Independent of the jail: the run's cgroup must be empty, and (namespaces
  without cgroups, uid mode) no process may hold its uid.
  """
  deadline = time.monotonic() + _CLEAR_S
  ok = cgroup.remove(groups, deadline) if groups else True
  if mode == "uid" or (mode == "namespaces" and not groups):
    ok = uids.kill_all(uid, deadline) and ok
  return ok


def _probe(candidate: str, python: str) -> Optional[bool]:
  """True: works; False: this interpreter can't run there; None: the mode fails."""
  try:
    run = _run(candidate, {"main.py": b"print('ok')\n"}, ["python", "main.py"], b"",
               30.0, Limits(), python)
  except OSError:
    return None  # e.g. a cgroup the host refuses
  if run.setup_error is not None:
    return None
  return run.exit_code == 0 and run.stdout == b"ok\n"


def _choose() -> tuple[str, str]:
  """(mode, interpreter): the strongest mode that works, with the first
  interpreter its private uid can execute (ours may sit under a 0700 /root)."""
  forced_mode = os.environ.get("KIMI_SANDBOX_MODE")
  if forced_mode and forced_mode not in MODES:
    raise ValueError(f"KIMI_SANDBOX_MODE={forced_mode!r}, expected one of {MODES}")
  forced_python = os.environ.get("KIMI_SANDBOX_PYTHON")
  pythons = [forced_python] if forced_python else [
      p for p in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3")
      if os.path.exists(p)]
  if forced_mode:
    modes = [forced_mode]
  else:
    modes = (["namespaces", "uid"] if os.geteuid() == 0 else []) + ["rlimits"]
  for candidate in modes:
    for python in pythons:
      ok = _probe(candidate, python)
      if ok is None:
        break  # the mode itself is refused: try the next one
      if ok:
        return candidate, python
  raise RuntimeError(f"no sandbox mode works here (tried {modes} with {pythons})")


def _chosen() -> tuple[str, str]:
  global _CHOSEN
  with _CHOSEN_LOCK:
    if _CHOSEN is None:
      _CHOSEN = _choose()
    return _CHOSEN


def mode() -> str:
  """The mechanism in effect (see the module docstring); probed once, then cached."""
  return _chosen()[0]


def interpreter() -> str:
  """The Python that runs programs: the first of this interpreter,
  /usr/bin/python3, /usr/local/bin/python3 that the jail can execute
  (KIMI_SANDBOX_PYTHON overrides)."""
  return _chosen()[1]


def run_program(files: Mapping[str, bytes], argv: Sequence[str], stdin: bytes = b"",
                timeout_s: float = 2.0, limits: Limits = Limits()) -> Run:
  """Runs `argv` in the jail with `files` in its working directory.

  files: plain file name -> content, staged into the private working dir.
  argv: the command; an element "python" is replaced by `interpreter()`.
  Returns once every process of the run is gone. Never raises because of
  the program; a jail failure is `Run.setup_error`.
  """
  jail_mode, python = _chosen()
  return _run(jail_mode, files, argv, stdin, timeout_s, limits, python)
