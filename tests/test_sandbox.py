"""The code sandbox holding against hostile programs (the acceptance check).

Every hostile program must come back as a failing test with a reason, with
no process of it left when the call returns and nothing written on the
host. Time bounds are generous (a loaded machine starts the jail slowly):
they tell "stopped at its limit" from "ran for the hour it asked for".
"""
import concurrent.futures
import os
import pathlib
import subprocess
import sys
import time
import uuid

import pytest

from kimi_jax.verifiers import cgroup, code, sandbox, stress

ADD = "a, b = map(int, input().split())\nprint(a + b)\n"
ADD_TESTS = [{"input": "1 2\n", "output": "3\n"},
             {"input": "10 -4\n", "output": "6"},
             {"input": "0 0", "output": "0\n\n"}]
STRONG = pytest.mark.skipif(
    sandbox.mode() != "namespaces",
    reason=f"sandbox mode {sandbox.mode()!r}: no namespaces here")
PRIVATE_UID = pytest.mark.skipif(
    sandbox.mode() == "rlimits",
    reason="sandbox mode 'rlimits': programs run as the caller's user")
CGROUPS = pytest.mark.skipif(not cgroup.available(), reason="no writable cgroups here")
# Stopped at its limit, not left to run: jail start-up under load, plus room.
SLACK_S = 15.0
# The limit of runs that are not about time: a slow start on a loaded
# machine must not turn into a "timeout" grade.
ROOMY = 30.0
FOREVER = "import time\ntime.sleep(3600)\n"


def run_one(source, timeout_s, **kw):
  start = time.monotonic()
  result = code.run_tests(source, [{"input": "", "output": "ok"}], timeout_s, **kw)
  elapsed = time.monotonic() - start
  assert stress.sandbox_processes() == []  # at once: nothing outlives the call
  assert (result.passed, result.total) == (0, 1)
  assert elapsed < timeout_s + SLACK_S
  return result.reasons[0]


def test_infinite_loop_times_out():
  assert run_one("while True:\n  pass\n", timeout_s=1.0) == "timeout"


def test_sleeping_program_is_stopped_at_its_timeout():
  assert run_one(FOREVER, timeout_s=1.0) == "timeout"


@pytest.mark.skipif(sandbox.mode() == "rlimits" and os.geteuid() == 0,
                    reason="RLIMIT_NPROC is not enforced for root")
@pytest.mark.parametrize("setsid", [False, True], ids=["plain", "setsid"])
def test_fork_bomb_is_contained(setsid):
  child = "    os.setsid()\n" if setsid else "    pass\n"
  bomb = ("import os\nwhile True:\n  try:\n    if os.fork() == 0:\n  " + child +
          "  except OSError:\n    pass\n")
  assert run_one(bomb, timeout_s=1.0) == "timeout"


@PRIVATE_UID
def test_fork_bomb_does_not_starve_a_concurrent_run():
  # The bomb exhausts RLIMIT_NPROC of its own uid; the other run, under
  # another uid, still starts its processes.
  bomb = "import os\nwhile True:\n  try:\n    os.fork()\n  except OSError:\n    pass\n"
  results = code.run_batch([(bomb, [{"input": "", "output": ""}]), (ADD, ADD_TESTS)],
                           timeout_s=10.0, max_workers=2)
  assert results[0].reasons == ["timeout"]
  assert results[1].all_passed, results[1]
  assert stress.sandbox_processes() == []


_CGROUP_PROBE = """\
import os, time
own = {}
for line in open('/proc/self/cgroup'):
  _, keys, path = line.strip().split(':', 2)
  for key in keys.split(',') or ['']:
    own[key] = path
def read(*names):
  for name in names:
    if os.path.exists(name):
      return open(name).read().split()[0]
if own.get('cpu'):  # cgroup v1: one hierarchy per controller
  quota = read(f"/sys/fs/cgroup/cpu{own['cpu']}/cpu.cfs_quota_us")
  cap = read(f"/sys/fs/cgroup/pids{own['pids']}/pids.max")
else:  # v2
  quota = read(f"/sys/fs/cgroup{own['']}/cpu.max")
  cap = read(f"/sys/fs/cgroup{own['']}/pids.max")
time.sleep(1.0)  # the two runs overlap
print(own.get('cpu', own.get('')), quota, cap)
"""


@CGROUPS
def test_each_run_has_a_cgroup_of_its_own_with_one_cpu():
  # Why: a swarm of setsid() children gets a scheduler autogroup each, and
  # took that many shares of the machine from the runs beside it. In a
  # cgroup the whole run counts as one task, capped at one CPU and nproc tasks.
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    runs = list(pool.map(lambda _: sandbox.run_program(
        {"main.py": _CGROUP_PROBE.encode()}, ["python", "main.py"], timeout_s=30.0), range(2)))
  seen = []
  for run in runs:
    assert run.exit_code == 0, run.stderr
    path, quota, cap = run.stdout.decode().split()
    assert os.path.basename(path).startswith("kimi_sandbox.run")
    assert (int(quota), int(cap)) == (100000, sandbox.Limits().nproc)
    seen.append(path)
  assert seen[0] != seen[1]


def test_daemonised_child_is_killed_with_the_run():
  src = ("import os, time\nif os.fork() == 0:\n  os.setsid()\n"
         "  if os.fork() == 0:\n    time.sleep(3600)\n  os._exit(0)\n"
         "print('ok')\n")
  result = code.run_tests(src, [{"input": "", "output": "ok"}], timeout_s=3600.0)
  assert result.all_passed  # came back when the program ended, not after the hour
  assert stress.sandbox_processes() == []


def _with_marker(marker):
  pids = []
  for entry in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{entry}/cmdline", "rb") as f:
        if marker.encode() in f.read():
          pids.append(int(entry))
    except OSError:
      pass
  return pids


def test_program_does_not_outlive_a_killed_caller():
  repo = pathlib.Path(__file__).resolve().parents[1]
  marker = f"kimi_marker_{uuid.uuid4().hex}"  # in the program's argv, to find it
  caller = subprocess.Popen(
      [sys.executable, "-c", "from kimi_jax.verifiers import sandbox\n"
       f"sandbox.run_program({{'main.py': {FOREVER.encode()!r}}}, "
       f"['python', '-I', 'main.py', {marker!r}], timeout_s=3600.0)"],
      env={**os.environ, "PYTHONPATH": str(repo)}, cwd=repo)
  try:
    deadline = time.monotonic() + 60
    while not _with_marker(marker):
      assert time.monotonic() < deadline and caller.poll() is None, "the program never started"
      time.sleep(0.05)
  finally:
    caller.kill()  # SIGKILL: no finally, no atexit in the caller
    caller.wait()
  deadline = time.monotonic() + 30  # vs the hour the program asked for
  left = lambda: _with_marker(marker) + stress.sandbox_processes(caller.pid)
  while left() and time.monotonic() < deadline:
    time.sleep(0.05)
  assert left() == []


def test_huge_allocation_hits_the_memory_limit():
  assert run_one("x = bytearray(8 * 1024 ** 3)\nprint('ok')\n", ROOMY) == "memory_limit"


def test_printing_a_gigabyte_is_cut_short():
  # In 1 MB chunks: a single 1 GB string would already fail on RLIMIT_AS.
  assert run_one("chunk = 'x' * 10 ** 6\nfor _ in range(1000):\n"
                 "  print(chunk, end='')\n", timeout_s=60.0) == "output_limit"


def test_stderr_flood_is_cut_short():
  assert run_one("import sys\nwhile True:\n  sys.stderr.write('e' * 4096)\n",
                 timeout_s=60.0) == "output_limit"


@PRIVATE_UID
@pytest.mark.parametrize("world_writable", [False, True])
def test_writing_outside_the_temp_dir_fails(world_writable):
  if world_writable and sandbox.mode() == "uid":
    pytest.skip("sandbox mode 'uid': world-writable host dirs are writable (its weakness)")
  where = pathlib.Path(__file__).resolve().parent / f".escape_{uuid.uuid4().hex}"
  where.mkdir()
  target = where / "pwned.txt"
  try:
    if world_writable:  # a shared data dir, say: anyone on the host may write there
      where.chmod(0o777)
    reason = run_one(f"open({str(target)!r}, 'w').write('pwned')\nprint('ok')\n", ROOMY)
    # Read-only file system (namespaces: every host mount is read-only in
    # the jail) or PermissionError (uid mode); FileNotFoundError when the
    # checkout lies under /tmp, which the sandbox replaces with its private
    # tmpfs (as in CI clones under /tmp).
    assert reason.startswith(("runtime_error: PermissionError",
                              "runtime_error: OSError: [Errno 30] Read-only file system",
                              "runtime_error: FileNotFoundError")), reason
    assert not target.exists()
  finally:
    target.unlink(missing_ok=True)
    where.rmdir()


@STRONG
def test_only_the_private_temp_dir_is_writable():
  probe = ("import os\n"
           "for path in ['/etc/kimi_x', '/var/tmp/kimi_x', '/dev/shm/kimi_x',\n"
           "             '/run/lock/kimi_x', os.path.expanduser('~root/kimi_x')]:\n"
           "  try:\n    open(path, 'w').write('x')\n    print('WROTE', path)\n"
           "  except OSError:\n    print('denied')\n"
           "open('mine.txt', 'w').write('fine')\n"
           "print(open('/tmp/mine.txt').read(), os.getcwd())\n")
  result = code.run_tests(probe, [{"input": "", "output": "denied\n" * 5 + "fine /tmp"}],
                          ROOMY)
  assert result.all_passed, result
  for path in ("/etc/kimi_x", "/var/tmp/kimi_x", "/dev/shm/kimi_x"):
    assert not os.path.exists(path)


@STRONG
@pytest.mark.parametrize("host", ["1.1.1.1", "127.0.0.1"])
def test_network_is_unreachable(host):
  import socket  # pylint: disable=import-outside-toplevel
  with socket.socket() as listener:  # a service of the host on its loopback
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.setblocking(False)
    port = 80 if host == "1.1.1.1" else listener.getsockname()[1]
    src = ("import socket\n"
           f"socket.create_connection(({host!r}, {port}), timeout=2)\nprint('ok')\n")
    reason = run_one(src, ROOMY)
    assert reason.startswith("runtime_error: OSError"), reason
    assert "unreachable" in reason
    with pytest.raises(BlockingIOError):
      listener.accept()


@STRONG
def test_cannot_read_another_tests_files():
  writer = ("import time\nopen('secret.txt', 'w').write('s3cret')\n"
            "time.sleep(3.0)\nprint('written')\n")
  # Looks until the writer has surely written (it starts first: one worker
  # each, and the writer is submitted first).
  reader = ("import glob, os, time\ntime.sleep(1.5)\n"
            "found = []\n"
            "for pattern in ['/tmp/**/secret.txt', '/var/tmp/**/secret.txt',\n"
            "                '/dev/shm/**/secret.txt', '/proc/*/cwd/secret.txt',\n"
            "                '/proc/*/root/tmp/**/secret.txt']:\n"
            "  for path in glob.glob(pattern, recursive=True):\n"
            "    try:\n      found.append(open(path).read())\n"
            "    except OSError:\n      pass\n"
            "print(found[0] if found else 'nothing')\n")
  results = code.run_batch(
      [(writer, [{"input": "", "output": "written"}]),
       (reader, [{"input": "", "output": "s3cret"}])], timeout_s=30.0, max_workers=2)
  assert results[0].all_passed
  assert results[1].reasons == ["wrong_answer"]  # it printed 'nothing'
  # And after the writer is gone, its file is gone too.
  later = code.run_tests("print(open('/tmp/secret.txt').read())",
                         [{"input": "", "output": "s3cret"}], ROOMY)
  assert later.reasons[0].startswith("runtime_error: FileNotFoundError")


def test_syntax_error_is_reported_without_running():
  result = code.run_tests("def f(:\n  pass\n", ADD_TESTS)
  assert result.passed == 0
  assert all(r.startswith("syntax_error") for r in result.reasons)
  assert "line 1" in result.reasons[0]
  assert code.run_tests("print(1)\x00", ADD_TESTS).reasons[0].startswith("syntax_error")


@pytest.mark.parametrize("src,signal_name", [
    ("import os\nos.abort()\n", "SIGABRT"),
    ("import ctypes\nctypes.string_at(0)\n", "SIGSEGV"),
])
def test_crash_is_a_runtime_error(src, signal_name):
  # The crash, not the clock, must end it however slow the start.
  assert run_one(src, ROOMY) == f"runtime_error: {signal_name}"


def test_exit_code_and_exceptions_are_runtime_errors():
  assert run_one("import sys\nprint('ok')\nsys.exit(3)\n", ROOMY) == "runtime_error: exit code 3"
  assert run_one("raise ValueError('bad input')\n", ROOMY) == "runtime_error: ValueError: bad input"


@PRIVATE_UID
def test_sandbox_runs_as_an_unprivileged_uid():
  result = code.run_tests("import os\nprint(os.getuid(), os.getgid(), os.getgroups())",
                          [{"input": "", "output": "0 0 []"}], ROOMY)
  assert result.reasons == ["wrong_answer"]
  run = sandbox.run_program({"main.py": b"import os\nprint(os.getuid())"},
                            ["python", "main.py"], timeout_s=ROOMY)
  assert int(run.stdout) >= sandbox.UID_BASE


@pytest.mark.slow
def test_stress_hostile_programs_under_load():
  """Ten hostile programs and four correct ones per round, four at a time,
  beside two busy processes: every hostile run contained, every correct one
  passing, nothing left, the caller's memory flat."""
  load = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
  try:
    # A 10 s limit and 15 s of slack: room for a loaded machine's slow
    # starts; what is checked is containment, not speed.
    report = stress.run(rounds=3, timeout_s=10.0, workers=4, innocents=4, slack_s=15.0)
  finally:
    for p in load:
      p.kill()
      p.wait()
  assert report["hostile_runs"] == 30
  assert report["containment_failures"] == 0, report["failures"]
  assert report["innocent_failures"] == 0, report["innocent_failure_reasons"]
  assert report["rss_growth_mb"] < 50, report
