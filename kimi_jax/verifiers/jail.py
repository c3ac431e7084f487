"""The jail: runs one untrusted program under the limits sandbox.py asks for.

`sandbox.run_program` starts this file as a script (`python -I -S jail.py
CONFIG`) for every run; it imports only the standard library and is not
meant to be imported. See sandbox.py for the mechanisms of each mode.

Process tree, "namespaces" mode:

  caller -> J0 (this script, root, the host's PID and mount namespaces)
              -> J1 (pid 1 of new PID/mount/net/IPC/UTS namespaces, root)
                   -> the program (private uid, rlimits, execve)

  J0 opens the run's cgroups (when the caller made some), unshares all but
  the mount namespace (J1 takes a mount namespace of its own, so J0 keeps
  the host's view to tidy up), forks J1 and waits for it. J0 exits only after J1 is reaped, and the kernel
  reports an exiting namespace init to its parent only after it has killed
  and reaped every other process of the namespace (zap_pid_ns_processes).
  So J0's exit means: no process of the run is left, however it forked,
  setsid()-ed or daemonised. The caller waits for J0 before it returns.
  J1 mounts the private filesystem, forks the program (which alone joins
  the cgroups, so the jail keeps its CPU), writes "started" on
  the status pipe (the caller's wall clock starts there), reaps, and
  writes the program's exit status on that pipe, so that a program's own
  exit code can never be mistaken for a jail failure.

Other modes: no J1. J0 forks the program itself as a child subreaper
(orphans are reparented to it and killed when the program ends).

Stopping: SIGTERM to J0 (the caller's timeout or output cap, or the
caller's death through PR_SET_PDEATHSIG) kills the program side with
SIGKILL; J0 still waits for it before exiting. A wall-clock backstop
(`backstop_s`) in the process that waits for the program kills it even
when the caller is alive but not acting (e.g. starved of the GIL).
"""
import ctypes
import marshal  # built in: the config crosses argv without importing json (and re)
import os
import resource
import signal
import sys

_CLONE_NEWNS, _CLONE_NEWUTS, _CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
_CLONE_NEWPID, _CLONE_NEWNET = 0x20000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_NOATIME, _MS_NODIRATIME, _MS_BIND = 32, 1024, 2048, 4096
_MS_REC, _MS_PRIVATE, _MS_RELATIME = 0x4000, 0x40000, 1 << 21
_KEPT_FLAGS = {"nosuid": _MS_NOSUID, "nodev": _MS_NODEV, "noexec": _MS_NOEXEC,
               "noatime": _MS_NOATIME, "nodiratime": _MS_NODIRATIME,
               "relatime": _MS_RELATIME}
_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER, _PR_SET_NO_NEW_PRIVS = 1, 36, 38
# Host dirs hidden behind an empty read-only tmpfs: read-only already (below),
# but their files (other users' temp and shared-memory files) are not ours to read.
_HIDDEN = ("/var/tmp", "/dev/shm", "/run/lock", "/dev/mqueue")

# What a stop (SIGTERM) or the backstop (SIGALRM) kills: J1 (from J0),
# everyone else in the namespace (from J1), or the program's process group.
_child = 0
_child_is_group = False
_in_namespace_init = False
_backstop_fired = [False]


def _libc():
  return ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
  if ret != 0:
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(libc, source, target, fstype, flags, data=None) -> None:
  enc = lambda s: s if s is None or isinstance(s, bytes) else s.encode()
  _check(libc.mount(enc(source), enc(target), enc(fstype),
                    ctypes.c_ulong(flags), enc(data)), f"mount {target!r}")


def _unescape(path: bytes) -> bytes:
  """mountinfo writes space, tab, newline and backslash in paths as \\ooo."""
  out, i = bytearray(), 0
  while i < len(path):
    if path[i] == 0x5C and path[i + 1:i + 4].isdigit():
      out.append(int(path[i + 1:i + 4], 8))
      i += 4
    else:
      out.append(path[i])
      i += 1
  return bytes(out)


def _mount_points() -> list:
  """(path, per-mount flags) of this mount namespace, from /proc/self/mountinfo."""
  points = []
  with open("/proc/self/mountinfo", "rb") as f:
    for line in f.read().splitlines():
      fields = line.split()
      flags = 0
      for opt in fields[5].split(b","):
        flags |= _KEPT_FLAGS.get(opt.decode(), 0)
      points.append((_unescape(fields[4]), flags))
  return points


def _private_filesystem(libc, cfg: dict) -> str:
  """In the new mount namespace: every host mount read-only, a private /tmp
  holding only this run's files (the working directory), a fresh /proc."""
  _mount(libc, None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing leaks to the host
  # Read the staged files before the tmpfs hides the host /tmp they live in.
  files = {}
  for name in cfg["files"]:
    with open(os.path.join(cfg["staging"], name), "rb") as f:
      files[name] = f.read()
  # Bind-remounting a mount read-only changes this namespace's copy only.
  # Without it, any world-writable directory of the host (a shared data
  # dir, a 0777 checkout) would be writable by the program.
  for path, flags in _mount_points():
    _mount(libc, None, path, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | flags)
  uid, lim = cfg["uid"], cfg["limits"]
  _mount(libc, "tmpfs", "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV,
         f"size={lim['tmpfs_mb']}m,nr_inodes=4096,mode=0700,uid={uid},gid={uid}")
  for name, data in files.items():
    with open(os.path.join("/tmp", name), "wb") as f:
      f.write(data)
  for path in _HIDDEN:
    if os.path.isdir(path):
      _mount(libc, "tmpfs", path, "tmpfs",
             _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "size=4k,mode=0755")
  _mount(libc, "proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
  return "/tmp"


def _exec_program(libc, cfg: dict, workdir: str) -> None:
  """In the forked program process: limits, drop root, exec. Never returns."""
  try:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    os.setpgid(0, 0)  # its own group, so a stop kills it and its children at once
    for fd in cfg["cgroup_fds"]:  # opened before the host mounts went read-only
      os.write(fd, b"0")  # "0": the writer itself; the jail stays outside
      os.close(fd)
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
  try:
    os.write(fd, (" ".join(f"{k}={v}" for k, v in status.items()) + "\n").encode())
  except BrokenPipeError:
    pass  # the caller is gone: there is still the run to end and tidy


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


def _kill_child(signum, frame) -> None:
  """SIGTERM (stop) and SIGALRM (backstop): kill what we started, keep waiting."""
  del frame
  if signum == signal.SIGALRM:
    _backstop_fired[0] = True
  if _child > 0:
    try:
      if _in_namespace_init:
        os.kill(-1, signal.SIGKILL)  # pid 1 of the namespace: everyone else in it
      elif _child_is_group:
        os.killpg(_child, signal.SIGKILL)
      else:
        os.kill(_child, signal.SIGKILL)
    except OSError:
      pass


def _fork(group: bool = False, sigs=(signal.SIGTERM, signal.SIGALRM)) -> int:
  """fork() with the stop signals held, so a stop that arrives meanwhile
  finds `_child` set. group: the child leads a new process group (set on
  both sides, so it holds before either side runs on)."""
  global _child, _child_is_group
  signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
  pid = os.fork()
  if pid:
    if group:
      try:
        os.setpgid(pid, pid)
      except OSError:
        pass  # the child got there first (and may have exec-ed)
    _child, _child_is_group = pid, group
    signal.pthread_sigmask(signal.SIG_UNBLOCK, sigs)
  return pid


def _run_and_report(libc, cfg: dict, workdir: str) -> None:
  """Forks the program, reaps until it exits, reports its status on the status fd."""
  if cfg["mode"] != "namespaces":
    _check(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "subreaper")
  signal.signal(signal.SIGALRM, _kill_child)
  pid = _fork(group=True)
  if pid == 0:
    _exec_program(libc, cfg, workdir)
  _write_status(cfg["status_fd"], {"started": 1})
  signal.setitimer(signal.ITIMER_REAL, cfg["backstop_s"])
  while True:  # as a namespace init we also reap orphans, so they don't pile up
    got, status, usage = os.wait4(-1, 0)
    if got == pid:
      break
  signal.setitimer(signal.ITIMER_REAL, 0)
  if os.WIFSIGNALED(status):
    report = {"signal": os.WTERMSIG(status)}
  else:
    report = {"exit": os.WEXITSTATUS(status)}
  report.update(cpu_s=usage.ru_utime + usage.ru_stime, maxrss_kb=usage.ru_maxrss,
                backstop=int(_backstop_fired[0]))
  if cfg["mode"] != "namespaces":  # (in a namespace, our exit kills them all)
    _kill_orphans()
  _write_status(cfg["status_fd"], report)


def _tidy(cfg: dict) -> None:
  """J0, after the run: remove its cgroups (the kernel allows it only when
  they are empty, so the caller's check still holds), and when the caller
  is gone, the staged files it would have removed."""
  for fd in cfg.get("cgroup_fds", ()):
    os.close(fd)
  for d in cfg["cgroups"]:
    try:
      os.rmdir(d)
    except OSError:
      pass  # not empty (the caller kills what is left) or already gone
  if os.getppid() != cfg["caller_pid"]:
    for root, dirs, files in os.walk(cfg["staging"], topdown=False):
      for name in files:
        os.unlink(os.path.join(root, name))
      for name in dirs:
        os.rmdir(os.path.join(root, name))
    os.rmdir(cfg["staging"])


def main(cfg: dict) -> None:
  """J0. Never returns."""
  global _in_namespace_init
  libc = _libc()
  signal.signal(signal.SIGTERM, _kill_child)
  try:
    # Die with the caller: a caller killed mid-run (OOM, SIGKILL) must not
    # leave the program running with nobody to enforce its wall clock.
    _check(libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0), "pdeathsig")
    if os.getppid() != cfg["caller_pid"]:
      os._exit(1)  # the caller died before the line above
    # Only the program enters the run's cgroup: the jail must keep its CPU
    # to stop and reap a swarm that saturates it.
    cfg["cgroup_fds"] = [os.open(os.path.join(d, "cgroup.procs"), os.O_WRONLY)
                         for d in cfg["cgroups"]]
    if cfg["mode"] == "namespaces":
      # The mount namespace is J1's alone: J0 keeps the host's view, to
      # remove the cgroups and staged files after the run.
      _check(libc.unshare(_CLONE_NEWPID | _CLONE_NEWNET | _CLONE_NEWIPC | _CLONE_NEWUTS),
             "unshare")
      if _fork():  # only children enter the new PID namespace
        os.waitpid(_child, 0)  # J1 reports; its reaping means the namespace is empty
        _tidy(cfg)
        os._exit(0)
      # J1: if J0 is killed, die too (and with us the whole namespace).
      _check(libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
      signal.signal(signal.SIGTERM, signal.SIG_DFL)
      _in_namespace_init = True
      _check(libc.unshare(_CLONE_NEWNS), "unshare mount namespace")
      workdir = _private_filesystem(libc, cfg)
    else:
      workdir = cfg["staging"]
    _run_and_report(libc, cfg, workdir)
    if not _in_namespace_init:
      _tidy(cfg)
  except BaseException as e:  # pylint: disable=broad-except
    _write_status(cfg["status_fd"], {"setup_error": f"{type(e).__name__}: {e}"})
    os._exit(1)
  os._exit(0)


if __name__ == "__main__":
  main(marshal.loads(bytes.fromhex(sys.argv[1])))
