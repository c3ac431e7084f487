"""Code verifier: grading, and the sandbox holding against hostile programs.

Every hostile program must come back as a failing test with a reason, fast,
with no process of it left behind and nothing written on the host.
"""
import os
import pathlib
import time
import uuid

import pytest

from kimi_jax.verifiers import code, sandbox

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


def stray_processes():
  """Pids of processes still running under a sandbox uid."""
  pids = []
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        if os.stat(f"/proc/{entry}").st_uid >= sandbox._UID_BASE:
          pids.append(int(entry))
      except OSError:
        pass
  return pids


def assert_no_strays(grace_s=2.0):
  deadline = time.monotonic() + grace_s  # a namespace's teardown is asynchronous
  while stray_processes() and time.monotonic() < deadline:
    time.sleep(0.05)
  assert stray_processes() == []


def run_one(source, timeout_s=1.0, **kw):
  start = time.monotonic()
  result = code.run_tests(source, [{"input": "", "output": "ok"}], timeout_s, **kw)
  elapsed = time.monotonic() - start
  assert_no_strays()
  assert (result.passed, result.total) == (0, 1)
  return result.reasons[0], elapsed


# ------------------------------------------------------------------ grading

def test_correct_solution_passes():
  result = code.run_tests(ADD, ADD_TESTS, timeout_s=2.0)
  assert (result.passed, result.total, result.reasons) == (3, 3, [])
  assert result.all_passed


def test_trailing_whitespace_is_normalised_but_nothing_else():
  src = "print('1 2   ')\nprint('3')\nprint()\n"
  ok = code.run_tests(src, [{"input": "", "output": "1 2\n3"}])
  assert ok.all_passed
  bad = code.run_tests(src, [{"input": "", "output": " 1 2\n3"},
                             {"input": "", "output": "1  2\n3"}])
  assert bad.reasons == ["wrong_answer", "wrong_answer"]


def test_wrong_answer_is_counted_per_test():
  src = "a, b = map(int, input().split())\nprint(a + b if a else 99)\n"
  result = code.run_tests(src, ADD_TESTS)
  assert (result.passed, result.total, result.reasons) == (2, 3, ["wrong_answer"])


def test_call_tests():
  src = ("def f(a, b):\n  return a + b\n"
         "def pair(x):\n  return (x, [x * 0.1])\n"
         "def name():\n  return 'abc'\n"
         "class Solution:\n  def twice(self, x):\n    return 2 * x\n"
         "if __name__ == '__main__':\n  print(input())\n")  # must not run
  tests = [{"call": "f(1, 2)", "output": "3"},
           {"call": "f(1, 2)", "output": 3},
           {"call": "f([1], [2])", "output": "[1, 2]"},
           {"call": "pair(3)", "output": "[3, [0.30000001]]"},  # tuple == list, float tol
           {"call": "name()", "output": "'abc'"},
           {"call": "name()", "output": "abc"},
           {"call": "Solution().twice(21)", "output": "42"},
           {"call": "f(1, 2)", "output": "4"},
           {"call": "f(1)", "output": "1"}]
  result = code.run_tests(src, tests)
  assert result.passed == 7
  assert result.reasons[0] == "wrong_answer"
  assert result.reasons[1].startswith("runtime_error: TypeError")


def test_call_result_cannot_fake_equality():
  src = ("class Liar:\n  def __eq__(self, other):\n    return True\n"
         "  def __repr__(self):\n    return 'Liar()'\n"
         "def f():\n  return Liar()\n")
  result = code.run_tests(src, [{"call": "f()", "output": "5"}])
  assert result.reasons == ["wrong_answer"]


def test_fail_fast_skips_the_rest():
  result = code.run_tests("print(0)", ADD_TESTS, fail_fast=True)
  assert result.reasons == ["wrong_answer", "skipped", "skipped"]


def test_malformed_tests_are_the_callers_error():
  with pytest.raises(ValueError, match=r"tests\[1\]"):
    code.run_tests(ADD, [{"input": "", "output": ""}, {"input": "1"}])
  with pytest.raises(ValueError, match="programs"):
    code.run_batch([(ADD, "not a list")])


def test_batch_keeps_order_and_runs_in_parallel():
  sleepy = "import time\ntime.sleep(1.0)\nprint(input())\n"
  programs = [(sleepy, [{"input": str(i), "output": str(i)}]) for i in range(4)]
  programs.append(("print(1/0)", [{"input": "", "output": ""}]))
  start = time.monotonic()
  results = code.run_batch(programs, timeout_s=5.0, max_workers=4)
  assert time.monotonic() - start < 3.0  # 4 x 1 s of sleep, overlapped
  assert [r.passed for r in results] == [1, 1, 1, 1, 0]
  assert results[-1].reasons == ["runtime_error: ZeroDivisionError: division by zero"]


# ------------------------------------------------- acceptance: hostile programs

def test_infinite_loop_times_out():
  reason, elapsed = run_one("while True:\n  pass\n", timeout_s=1.0)
  assert reason == "timeout"
  assert elapsed < 2.0


@pytest.mark.skipif(sandbox.mode() == "rlimits" and os.geteuid() == 0,
                    reason="RLIMIT_NPROC is not enforced for root")
def test_fork_bomb_is_contained():
  bomb = ("import os\nwhile True:\n  try:\n    os.fork()\n"
          "  except OSError:\n    pass\n")
  reason, elapsed = run_one(bomb, timeout_s=1.0)
  assert reason == "timeout"
  assert elapsed < 2.5


@PRIVATE_UID
def test_fork_bomb_does_not_starve_a_concurrent_run():
  bomb = "import os\nwhile True:\n  try:\n    os.fork()\n  except OSError:\n    pass\n"
  results = code.run_batch([(bomb, [{"input": "", "output": ""}]), (ADD, ADD_TESTS)],
                           timeout_s=2.0, max_workers=2)
  assert results[0].reasons == ["timeout"]
  assert results[1].all_passed  # its own uid, its own process budget
  assert_no_strays()


def test_daemonised_child_is_killed_with_the_run():
  src = ("import os, time\nif os.fork() == 0:\n  os.setsid()\n"
         "  if os.fork() == 0:\n    time.sleep(30)\n  os._exit(0)\n"
         "print('ok')\n")
  start = time.monotonic()
  result = code.run_tests(src, [{"input": "", "output": "ok"}], timeout_s=5.0)
  assert result.all_passed
  assert time.monotonic() - start < 2.0  # not held until the timeout
  assert_no_strays()


def test_huge_allocation_hits_the_memory_limit():
  reason, elapsed = run_one("x = bytearray(8 * 1024 ** 3)\nprint('ok')\n")
  assert reason == "memory_limit"
  assert elapsed < 2.0


def test_printing_a_gigabyte_is_cut_short():
  # In 1 MB chunks: a single 1 GB string would already fail on RLIMIT_AS.
  reason, elapsed = run_one("chunk = 'x' * 10 ** 6\nfor _ in range(1000):\n"
                            "  print(chunk, end='')\n", timeout_s=10.0)
  assert reason == "output_limit"
  assert elapsed < 3.0


def test_stderr_flood_is_cut_short():
  reason, elapsed = run_one("import sys\nwhile True:\n  sys.stderr.write('e' * 4096)\n",
                            timeout_s=10.0)
  assert reason == "output_limit"
  assert elapsed < 3.0


@PRIVATE_UID
def test_writing_outside_the_temp_dir_fails():
  target = pathlib.Path(__file__).resolve().parent / f"escape_{uuid.uuid4().hex}.txt"
  try:
    reason, _ = run_one(f"open({str(target)!r}, 'w').write('pwned')\nprint('ok')\n")
    # PermissionError for a checkout the sandbox can see but not write;
    # FileNotFoundError when the checkout lies under /tmp, which the sandbox
    # replaces with its private tmpfs (as in CI clones under /tmp).
    assert reason.startswith(("runtime_error: PermissionError",
                              "runtime_error: FileNotFoundError")), reason
    assert not target.exists()
  finally:
    target.unlink(missing_ok=True)


@STRONG
def test_only_the_private_temp_dir_is_writable():
  probe = ("import os\n"
           "for path in ['/etc/kimi_x', '/var/tmp/kimi_x', '/dev/shm/kimi_x',\n"
           "             '/run/lock/kimi_x', os.path.expanduser('~root/kimi_x')]:\n"
           "  try:\n    open(path, 'w').write('x')\n    print('WROTE', path)\n"
           "  except OSError:\n    print('denied')\n"
           "open('mine.txt', 'w').write('fine')\n"
           "print(open('/tmp/mine.txt').read(), os.getcwd())\n")
  result = code.run_tests(probe, [{"input": "", "output": "denied\n" * 5 + "fine /tmp"}])
  assert result.all_passed, result
  for path in ("/etc/kimi_x", "/var/tmp/kimi_x", "/dev/shm/kimi_x"):
    assert not os.path.exists(path)


@STRONG
def test_network_is_unreachable():
  src = ("import socket\n"
         "socket.create_connection(('1.1.1.1', 80), timeout=2)\nprint('ok')\n")
  reason, elapsed = run_one(src, timeout_s=5.0)
  assert reason.startswith("runtime_error: OSError"), reason
  assert "unreachable" in reason
  assert elapsed < 2.0


@STRONG
def test_cannot_read_another_tests_files():
  writer = ("import time\nopen('secret.txt', 'w').write('s3cret')\n"
            "time.sleep(1.5)\nprint('written')\n")
  reader = ("import glob, os, time\ntime.sleep(0.5)\n"
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
       (reader, [{"input": "", "output": "s3cret"}])], timeout_s=5.0, max_workers=2)
  assert results[0].all_passed
  assert results[1].reasons == ["wrong_answer"]  # it printed 'nothing'
  # And after the writer is gone, its file is gone too.
  later = code.run_tests("print(open('/tmp/secret.txt').read())",
                         [{"input": "", "output": "s3cret"}])
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
  reason, elapsed = run_one(src)
  assert reason == f"runtime_error: {signal_name}"
  assert elapsed < 2.0


def test_exit_code_and_exceptions_are_runtime_errors():
  assert run_one("import sys\nprint('ok')\nsys.exit(3)\n")[0] == "runtime_error: exit code 3"
  assert run_one("raise ValueError('bad input')\n")[0] == "runtime_error: ValueError: bad input"


@PRIVATE_UID
def test_sandbox_runs_as_an_unprivileged_uid():
  result = code.run_tests("import os\nprint(os.getuid(), os.getgid(), os.getgroups())",
                          [{"input": "", "output": "0 0 []"}])
  assert result.reasons == ["wrong_answer"]
  run = sandbox.run_program({"main.py": b"import os\nprint(os.getuid())"},
                            ["python", "main.py"])
  assert int(run.stdout) >= sandbox._UID_BASE
