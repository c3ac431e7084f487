"""Runs one untrusted program in a jail and returns what it did (no grading).

  run = sandbox.run_program({"main.py": src}, ["python", "main.py"],
                            stdin=b"1 2\\n", timeout_s=2.0)
  run.exit_code, run.signal, run.stdout, run.stderr, run.timed_out, ...

Mechanisms, strongest mode first (`mode()` says which one is in effect; the
first is chosen automatically when it works, KIMI_SANDBOX_MODE forces one):

  "namespaces" (root with CAP_SYS_ADMIN; what this Debian box gives us):
    * new PID, mount, network, IPC and UTS namespaces (unshare(2) via
      ctypes): no network but a downed loopback, no view of host processes
      (a fresh /proc), and when the jail's init dies the kernel kills every
      process left inside, however it forked or setsid()-ed;
    * a private tmpfs (size- and inode-capped) on /tmp holding only this
      run's files, which is the working directory; read-only empty tmpfs on
      /var/tmp, /dev/shm, /run/lock: with the uid below, nothing else on
      the filesystem is writable, and no other run's files are visible;
    * the program runs as a private unprivileged uid (one per concurrent run,
      no passwd entry), after setgroups([])/setgid/setuid and
      PR_SET_NO_NEW_PRIVS. This is what makes RLIMIT_NPROC bite (the kernel
      does not enforce it for root) and keeps one run's fork bomb from
      starving another run (the limit counts per uid);
    * rlimits: RLIMIT_CPU, RLIMIT_AS, RLIMIT_NPROC, RLIMIT_FSIZE,
      RLIMIT_NOFILE, RLIMIT_CORE=0;
    * the caller enforces wall-clock and output caps and SIGKILLs the whole
      process group (which takes the jail's init, hence the namespace).
  "uid" (root, but unshare is refused): private uid + rlimits + process
    group kill + a sweep that SIGKILLs every process of the run's uid.
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

Process tree (namespaces): caller -> J0 (`python -I -S sandbox.py CONFIG`,
root, host namespaces; unshares, forks, waits) -> J1 (pid 1 of the new
namespace, root: mounts, forks, reaps, reports) -> the program (private uid,
limits, execve). J1 reports the program's exit status on a dedicated pipe,
so a program's own exit code can never be mistaken for a jail failure.

When run as a script this file must import only the standard library.
"""
from __future__ import annotations

# The jail runs this file as a script before every test. It needs only the
# imports and functions of the first half and stops at `__main__` below, so
# it never pays for the caller-side imports (they would double its start-up).
import ctypes
import marshal  # built in: the config crosses argv without importing json (and re)
import os
import resource
import signal
import sys

_CLONE_NEWNS, _CLONE_NEWUTS, _CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
_CLONE_NEWPID, _CLONE_NEWNET = 0x20000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REC, _MS_PRIVATE = 0x4000, 0x40000
_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 1, 36, 38
# Dirs any user may write to on Debian; covered by empty read-only tmpfs.
_WORLD_WRITABLE = ("/var/tmp", "/dev/shm", "/run/lock", "/dev/mqueue")

# ------------------------------------------------------------- jail (child) side

def _libc():
  return ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
  if ret != 0:
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(libc, source, target, fstype, flags, data=None) -> None:
  enc = lambda s: None if s is None else s.encode()
  _check(libc.mount(enc(source), enc(target), enc(fstype),
                    ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def _private_filesystem(libc, cfg: dict) -> str:
  """In the new mount namespace: private /tmp with the run's files, fresh /proc."""
  _mount(libc, None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing leaks to the host
  # Read the staged files before the tmpfs hides the host /tmp they live in.
  files = {}
  for name in cfg["files"]:
    with open(os.path.join(cfg["staging"], name), "rb") as f:
      files[name] = f.read()
  uid, lim = cfg["uid"], cfg["limits"]
  _mount(libc, "tmpfs", "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV,
         f"size={lim['tmpfs_mb']}m,nr_inodes=4096,mode=0700,uid={uid},gid={uid}")
  for name, data in files.items():
    with open(os.path.join("/tmp", name), "wb") as f:
      f.write(data)
  for path in _WORLD_WRITABLE:
    if os.path.isdir(path):
      _mount(libc, "tmpfs", path, "tmpfs",
             _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "size=4k,mode=0755")
  _mount(libc, "proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
  return "/tmp"


def _exec_program(libc, cfg: dict, workdir: str) -> None:
  """In the forked program process: limits, drop root, exec. Never returns."""
  try:
    lim = cfg["limits"]
    mib = 1 << 20
    cpu = cfg["cpu_s"]
    for rlimit, soft, hard in (
        (resource.RLIMIT_CPU, cpu, cpu + 1),
        (resource.RLIMIT_AS, lim["memory_mb"] * mib, lim["memory_mb"] * mib),
        (resource.RLIMIT_FSIZE, lim["fsize_mb"] * mib, lim["fsize_mb"] * mib),
        (resource.RLIMIT_NOFILE, lim["nofile"], lim["nofile"]),
        (resource.RLIMIT_NPROC, lim["nproc"], lim["nproc"]),
        (resource.RLIMIT_CORE, 0, 0)):
      resource.setrlimit(rlimit, (soft, hard))
    if cfg["mode"] != "rlimits":
      uid = cfg["uid"]
      os.setgroups([])
      os.setgid(uid)
      os.setuid(uid)  # real, effective and saved: no way back to root
    _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    os.chdir(workdir)
    os.close(cfg["status_fd"])
    os.execve(cfg["argv"][0], cfg["argv"], cfg["env"])
  except BaseException as e:  # pylint: disable=broad-except
    os.write(2, f"sandbox: cannot start program: {e}\n".encode())
  os._exit(127)


def _write_status(fd: int, status: dict) -> None:
  """One line of key=value pairs; a setup_error, if any, comes last (it may hold spaces)."""
  os.write(fd, (" ".join(f"{k}={v}" for k, v in status.items()) + "\n").encode())


def _kill_orphans() -> None:
  """Outside a PID namespace: SIGKILL the program's orphans, reparented to us
  as subreaper (a double fork + setsid would otherwise escape the group kill)."""
  me = str(os.getpid())
  for _ in range(20):
    kids = []
    for entry in os.listdir("/proc"):
      try:
        with open(f"/proc/{entry}/stat", "rb") as f:
          ppid = f.read().rsplit(b")", 1)[1].split()[1].decode()
      except (OSError, IndexError):
        continue
      if ppid == me:
        kids.append(int(entry))
    if not kids:
      return
    for kid in kids:
      try:
        os.kill(kid, signal.SIGKILL)
        os.waitpid(kid, 0)
      except OSError:
        pass


def _run_and_report(libc, cfg: dict, workdir: str) -> None:
  """Forks the program, reaps until it exits, reports its status on the status fd."""
  if cfg["mode"] != "namespaces":
    _check(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "subreaper")
  pid = os.fork()
  if pid == 0:
    _exec_program(libc, cfg, workdir)
  while True:  # as a namespace init we also reap orphans, so they don't pile up
    got, status, usage = os.wait4(-1, 0)
    if got == pid:
      break
  if os.WIFSIGNALED(status):
    report = {"signal": os.WTERMSIG(status)}
  else:
    report = {"exit": os.WEXITSTATUS(status)}
  report.update(cpu_s=usage.ru_utime + usage.ru_stime, maxrss_kb=usage.ru_maxrss)
  if cfg["mode"] != "namespaces":  # (in a namespace, our exit kills them all)
    _kill_orphans()
  _write_status(cfg["status_fd"], report)


def _jail_main(cfg: dict) -> None:
  libc = _libc()
  try:
    if cfg["mode"] == "namespaces":
      _check(libc.unshare(_CLONE_NEWNS | _CLONE_NEWPID | _CLONE_NEWNET |
                          _CLONE_NEWIPC | _CLONE_NEWUTS), "unshare")
      pid = os.fork()  # only children enter the new PID namespace
      if pid:
        os.waitpid(pid, 0)  # J0: J1 does the reporting
        os._exit(0)
      # J1: if J0 is killed, die too (and with us the whole namespace).
      _check(libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
      workdir = _private_filesystem(libc, cfg)
    else:
      workdir = cfg["staging"]
    _run_and_report(libc, cfg, workdir)
  except BaseException as e:  # pylint: disable=broad-except
    _write_status(cfg["status_fd"], {"setup_error": f"{type(e).__name__}: {e}"})
    os._exit(1)
  os._exit(0)


if __name__ == "__main__":
  _jail_main(marshal.loads(bytes.fromhex(sys.argv[1])))  # never returns


# ----------------------------------------------------------- caller (parent) side
# pylint: disable=wrong-import-position,wrong-import-order
import dataclasses
import selectors
import shutil
import subprocess
import tempfile
import threading
import time
from typing import Mapping, Optional, Sequence

MODES = ("namespaces", "uid", "rlimits")
# Private uids: far above real accounts and the usual subuid ranges; a block
# per caller pid so two trainers on one host do not share a uid.
_UID_BASE, _UIDS_PER_PROCESS = 3_000_000_000, 256


@dataclasses.dataclass(frozen=True)
class Limits:
  """Per-run resource limits (wall clock is `timeout_s` of `run_program`).

  memory_mb: RLIMIT_AS (address space) of the program.
  nproc: RLIMIT_NPROC, processes + threads of the run's private uid.
  fsize_mb: RLIMIT_FSIZE, largest file the program may write.
  tmpfs_mb: size of its private /tmp (namespaces mode).
  output_bytes: stdout beyond this kills the run (output_overflow); stderr
    beyond it too (only its tail is kept).
  """
  memory_mb: int = 1024
  nproc: int = 32
  fsize_mb: int = 16
  nofile: int = 256
  tmpfs_mb: int = 64
  output_bytes: int = 1 << 20


@dataclasses.dataclass(frozen=True)
class Run:
  """What one program run did. `exit_code` xor `signal` is set unless the
  run was killed by the caller (timed_out / output_overflow) or the jail
  failed (setup_error)."""
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


class _UidPool:
  """Hands out the private uids, one per concurrent run."""

  def __init__(self):
    self._lock = threading.Lock()
    self._free = list(range(_UIDS_PER_PROCESS))
    self._sem = threading.Semaphore(_UIDS_PER_PROCESS)

  def acquire(self) -> int:
    self._sem.acquire()
    with self._lock:
      slot = self._free.pop()
    return _UID_BASE + (os.getpid() % 1_000_000) * _UIDS_PER_PROCESS + slot

  def release(self, uid: int) -> None:
    with self._lock:
      self._free.append((uid - _UID_BASE) % _UIDS_PER_PROCESS)
    self._sem.release()


_UIDS = _UidPool()
_CHOSEN_LOCK = threading.Lock()
_CHOSEN: Optional[tuple[str, str]] = None


def _kill_uid(uid: int) -> None:
  """SIGKILLs every process owned by `uid` (the "uid" mode's stragglers)."""
  for _ in range(5):
    found = False
    for entry in os.listdir("/proc"):
      if entry.isdigit():
        try:
          if os.stat(f"/proc/{entry}").st_uid == uid:
            os.kill(int(entry), signal.SIGKILL)
            found = True
        except OSError:
          pass
    if not found:
      return
    time.sleep(0.01)


def _user_env() -> dict:
  return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp",
          "LANG": "C.UTF-8", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
          "MKL_NUM_THREADS": "1"}


def _run(mode: str, files: Mapping[str, bytes], argv: Sequence[str], stdin: bytes,
         timeout_s: float, limits: Limits, python: str) -> Run:
  start = time.monotonic()
  staging = tempfile.mkdtemp(prefix="kimi_sbx_")  # 0700, root-owned
  uid = _UIDS.acquire()
  proc = None
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
    status_r, status_w = os.pipe()
    cfg = {"mode": mode, "uid": uid, "staging": staging, "files": sorted(files),
           "argv": [python if a == "python" else a for a in argv],
           "env": _user_env(), "limits": dataclasses.asdict(limits),
           "cpu_s": max(1, int(timeout_s + 0.999)), "status_fd": status_w}
    with open(stdin_path, "rb") as stdin_file:
      proc = subprocess.Popen(
          [sys.executable, "-I", "-S", os.path.abspath(__file__), marshal.dumps(cfg).hex()],
          stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
          pass_fds=(status_w,), start_new_session=True, env={}, cwd=staging)
    os.close(status_w)
    status_w = -1
    out, err, status, timed_out, overflow = _collect(
        proc, status_r, start + timeout_s, limits.output_bytes)
  finally:
    if proc is not None:
      _reap(proc)
    if mode == "uid":
      _kill_uid(uid)
    for fd in (status_r, status_w):
      if fd >= 0:
        os.close(fd)
    shutil.rmtree(staging, ignore_errors=True)
    _UIDS.release(uid)
  wall_s = time.monotonic() - start
  report = _parse_status(status)
  setup_error = report.get("setup_error")
  if not report and not (timed_out or overflow):
    setup_error = f"jail exited {proc.returncode} without a status: {err[-300:]!r}"
  return Run(exit_code=report.get("exit"), signal=report.get("signal"),
             stdout=bytes(out), stderr=bytes(err[-_STDERR_TAIL:]),
             timed_out=timed_out, output_overflow=overflow,
             setup_error=setup_error, wall_s=wall_s,
             cpu_s=float(report.get("cpu_s", 0.0)),
             maxrss_kb=int(report.get("maxrss_kb", 0)))


def _parse_status(line: str) -> dict:
  """Inverse of `_write_status`: {"exit"|"signal": int, "cpu_s", "maxrss_kb"} or {"setup_error"}."""
  line = line.strip()
  if not line:
    return {}
  if line.startswith("setup_error="):
    return {"setup_error": line[len("setup_error="):]}
  try:
    pairs = dict(item.split("=", 1) for item in line.split())
    report = {k: int(v) for k, v in pairs.items() if k in ("exit", "signal", "maxrss_kb")}
    report["cpu_s"] = float(pairs.get("cpu_s", 0.0))
    return report
  except ValueError:
    return {"setup_error": f"bad status {line[:200]!r}"}


def _collect(proc, status_r: int, deadline: float, cap: int):
  """Reads stdout/stderr/status until the jail is done, the deadline, or the cap.

  The jail is done when its status pipe closes (J0 and J1 have exited); what
  the program wrote is in the pipes by then, so we drain them without
  waiting for an end-of-file a daemonised straggler could hold back.
  """
  out, err, status = bytearray(), bytearray(), bytearray()
  timed_out = overflow = jail_done = False
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
        if key.data is err:  # keep only the tail, but a flood still counts
          err_total += len(chunk)
          del err[:-_STDERR_TAIL]
        if len(out) > cap or err_total > cap:
          overflow = True
          break
  finally:
    sel.close()
  if timed_out or overflow:
    _killpg(proc)
  return out, err, bytes(status).decode("utf-8", "replace"), timed_out, overflow


def _killpg(proc) -> None:
  try:
    os.killpg(proc.pid, signal.SIGKILL)  # J0, J1 and the program share the group
  except OSError:
    pass


def _reap(proc) -> None:
  """Kills what is left of the group, then reaps J0.

  J0 is not reaped before the kill, so its pid (the group id) cannot have
  been reused by an unrelated process group in between.
  """
  _killpg(proc)
  proc.wait()
  proc.stdout.close()
  proc.stderr.close()


def _probe(candidate: str, python: str) -> Optional[bool]:
  """True: works; False: this interpreter can't run there; None: the mode fails."""
  run = _run(candidate, {"main.py": b"print('ok')\n"}, ["python", "main.py"], b"",
             30.0, Limits(), python)
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
  Never raises because of the program; a jail failure is `Run.setup_error`.
  """
  jail_mode, python = _chosen()
  return _run(jail_mode, files, argv, stdin, timeout_s, limits, python)

