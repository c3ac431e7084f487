"""Math answers: final-answer extraction and equivalence through math-verify.

  from kimi_jax.verifiers import math
  math.verify(response, "\\frac{1}{2}")            # -> bool, never raises
  math.check(response, "1/2", timeout_s=2.0)       # -> Verdict(correct, reason, extracted)
  math.check_batch(responses, answers, max_workers=2)

Extraction (in this process, plain string scanning): the last `\\boxed{...}`
(nested and escaped braces handled), else the last "answer is ..." /
"Answer: ...", else the last number in the text.

Equivalence (fractions, decimals, LaTeX, sets, intervals, symbolic forms,
percentages) is decided by `math_verify` in a persistent worker subprocess,
never in the caller's process. Why: math_verify's own timeout is
`signal.alarm`, which only works in the main thread and cannot interrupt
sympy while it sits inside one long C call (a huge integer power). The
worker runs each check under its own `setitimer` deadline (a soft stop that
keeps the worker warm); if that does not return in time the caller kills
the worker (a hard stop) and a fresh one is started on the next check. So
the timeout holds from any thread and for any expression, and a sympy blow-up
(memory, recursion) cannot take the trainer down with it.

This module imports only the standard library; math_verify is imported in
the worker, so `import kimi_jax.verifiers.math` stays cheap.
"""
from __future__ import annotations

import atexit
import concurrent.futures
import dataclasses
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Optional, Sequence

# Answers longer than this are not an answer but a runaway generation; they
# are rejected before any parsing (sympy cost grows fast with length).
MAX_ANSWER_CHARS = 1000
# Extra time the caller waits past the worker's own deadline before killing it.
_HARD_GRACE_S = 0.5
# Starting a worker imports sympy (~1 s); this is not charged to a check.
_STARTUP_TIMEOUT_S = 120.0
_MAX_IDLE_WORKERS = 8
# Address-space cap for a worker: a runaway sympy number fails with
# MemoryError instead of eating the host's memory.
_WORKER_MEMORY_BYTES = 4 << 30


@dataclasses.dataclass(frozen=True)
class Verdict:
  """Outcome of one check.

  correct: the response's final answer is equivalent to the reference.
  reason: 'exact_match' or 'equivalent' when correct; otherwise one of
    'no_answer', 'answer_too_long', 'not_equivalent', 'unparsable_answer',
    'unparsable_reference', 'timeout', 'error: <detail>'.
  extracted: the final answer found in the response (None if none).
  """
  correct: bool
  reason: str
  extracted: Optional[str] = None


# ----------------------------------------------------------------- extraction

_BOXED = re.compile(r"\\(?:boxed|fbox)\b\s*")
_ANSWER_IS = re.compile(
    r"(?:final\s+answer|answer)\s*(?:is|:|=)\s*[:=]?\s*", re.IGNORECASE)
_NUMBER = re.compile(
    r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?|[-+]?\.\d+")
_MATH_DELIMS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def _braced(text: str, start: int) -> Optional[str]:
  """Content of the brace group opening at text[start] ('{'), or None if unclosed."""
  depth, i = 0, start
  while i < len(text):
    c = text[i]
    if c == "\\":
      i += 2  # an escaped char (e.g. the set braces in \{1,2\}) never counts
      continue
    if c == "{":
      depth += 1
    elif c == "}":
      depth -= 1
      if depth == 0:
        return text[start + 1:i]
    i += 1
  return None


def _last_boxed(text: str) -> Optional[str]:
  for m in reversed(list(_BOXED.finditer(text))):
    i = m.end()
    if i < len(text) and text[i] == "{":
      content = _braced(text, i)
      if content is not None:  # an unclosed (truncated) box falls back to an earlier one
        return content.strip()
    else:  # "\boxed 5": the token after the command
      token = re.match(r"[^\s$]+", text[i:])
      if token:
        return token.group(0)
  return None


def _after_answer_is(text: str) -> Optional[str]:
  matches = list(_ANSWER_IS.finditer(text))
  if not matches:
    return None
  rest = text[matches[-1].end():].lstrip()
  for open_, close in _MATH_DELIMS:
    if rest.startswith(open_):
      end = rest.find(close, len(open_))
      if end > 0:
        return rest[len(open_):end].strip() or None
  line = rest.split("\n", 1)[0]
  # The sentence ends at ". " or a final "."; a decimal point is not followed by a space.
  line = re.split(r"\.\s|\.$|;\s|,\s(?=[A-Za-z])", line, maxsplit=1)[0]
  line = line.strip().strip("*").strip()
  return line or None


def _last_number(text: str) -> Optional[str]:
  numbers = _NUMBER.findall(text)
  if not numbers:
    return None
  return re.sub(r"[\s,]", "", numbers[-1])


def extract_answer(text: str) -> Optional[str]:
  """The response's final answer as a string: last \\boxed{}, "answer is", last number."""
  if not isinstance(text, str):
    return None
  for extractor in (_last_boxed, _after_answer_is, _last_number):
    answer = extractor(text)
    if answer:
      return answer
  return None


def normalize_reference(answer: str) -> str:
  """A reference answer without surrounding $...$, \\(...\\) or \\boxed{}."""
  s = answer.strip()
  for open_, close in _MATH_DELIMS:
    if len(s) >= len(open_) + len(close) and s.startswith(open_) and s.endswith(close):
      s = s[len(open_):len(s) - len(close)].strip()
      break
  boxed = _BOXED.match(s)
  if boxed and s[boxed.end():boxed.end() + 1] == "{" and _braced(s, boxed.end()) is not None:
    inner = _braced(s, boxed.end())
    if boxed.end() + len(inner) + 2 == len(s):  # the whole string is one box
      s = inner.strip()
  return s


def _squash(s: str) -> str:
  return "".join(s.split())


# ------------------------------------------------------------- worker process

class _Deadline(BaseException):
  """Raised by the worker's timer; BaseException so sympy's `except Exception` can't eat it."""


def _worker_main() -> None:
  """Worker loop: one JSON request per stdin line, one JSON reply per stdout line."""
  import resource  # pylint: disable=import-outside-toplevel
  import logging  # pylint: disable=import-outside-toplevel
  _, hard = resource.getrlimit(resource.RLIMIT_AS)
  if hard == resource.RLIM_INFINITY or hard > _WORKER_MEMORY_BYTES:
    resource.setrlimit(resource.RLIMIT_AS, (_WORKER_MEMORY_BYTES, hard))
  import math_verify  # pylint: disable=import-outside-toplevel
  from math_verify import grader, parser  # pylint: disable=import-outside-toplevel
  # We pass timeout None (our timer replaces math_verify's signal.alarm);
  # silence its one-time "timeout disabled" warning and per-item logs.
  grader.TIMEOUT_WARNING_SHOWN = parser.TIMEOUT_WARNING_SHOWN = True
  logging.getLogger("math_verify").setLevel(logging.CRITICAL)
  logging.getLogger("latex2sympy2_extended").setLevel(logging.CRITICAL)

  def on_alarm(signum, frame):
    raise _Deadline()

  signal.signal(signal.SIGALRM, on_alarm)

  def parse(s: str):
    s = re.sub(r"(?<!\\)%", r"\\%", s)  # a bare % would be a LaTeX comment
    parsed = math_verify.parse(
        "$" + s + "$", extraction_config=[math_verify.LatexExtractionConfig()],
        parsing_timeout=None)
    if not parsed:
      parsed = math_verify.parse(
          s, extraction_config=[math_verify.ExprExtractionConfig()],
          parsing_timeout=None)
    return parsed

  def compare(pred: str, gold: str) -> tuple[bool, str]:
    gold_parsed = parse(gold)
    if not gold_parsed:
      return False, "unparsable_reference"
    pred_parsed = parse(pred)
    if not pred_parsed:
      return False, "unparsable_answer"
    ok = math_verify.verify(gold_parsed, pred_parsed, timeout_seconds=None)
    return bool(ok), ("equivalent" if ok else "not_equivalent")

  compare("\\frac{1}{2}", "0.5")  # warm the lazy imports before saying ready
  out = sys.stdout
  out.write(json.dumps({"ready": True}) + "\n")
  out.flush()
  for line in sys.stdin:
    request = json.loads(line)
    try:
      signal.setitimer(signal.ITIMER_REAL, max(request["timeout_s"], 1e-3))
      try:
        ok, reason = compare(request["pred"], request["gold"])
      finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    except _Deadline:
      ok, reason = False, "timeout"
    except BaseException as e:  # pylint: disable=broad-except
      # RecursionError, MemoryError, sympy bugs, and a late _Deadline: the
      # check fails, the worker lives on.
      ok, reason = False, f"error: {type(e).__name__}"
    out.write(json.dumps({"correct": ok, "reason": reason}) + "\n")
    out.flush()


# The worker loads this file by path under a private name: it does not import
# the kimi_jax package (whose __init__ may pull in jax).
_BOOT = (
    "import importlib.util, sys\n"
    "spec = importlib.util.spec_from_file_location('_kimi_math_worker', sys.argv[1])\n"
    "mod = sys.modules['_kimi_math_worker'] = importlib.util.module_from_spec(spec)\n"
    "spec.loader.exec_module(mod)\n"
    "mod._worker_main()\n")


class _Worker:
  """One math_verify subprocess, used by one thread at a time."""

  def __init__(self):
    self.proc = subprocess.Popen(
        [sys.executable, "-c", _BOOT, os.path.abspath(__file__)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, cwd="/", start_new_session=True)
    self._buf = b""
    if self._read(time.monotonic() + _STARTUP_TIMEOUT_S) is None:
      self.kill()
      raise RuntimeError("math_verify worker failed to start "
                         "(is math-verify installed for this interpreter?)")

  def _read(self, deadline: float) -> Optional[dict]:
    """The next reply line, or None on deadline or worker death."""
    poller = select.poll()  # poll, not select: the trainer may hold fds > 1024
    poller.register(self.proc.stdout.fileno(), select.POLLIN)
    while b"\n" not in self._buf:
      remaining = deadline - time.monotonic()
      if remaining <= 0 or not poller.poll(remaining * 1000):
        return None
      chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
      if not chunk:
        return None
      self._buf += chunk
    line, _, self._buf = self._buf.partition(b"\n")
    return json.loads(line)

  def ask(self, pred: str, gold: str, timeout_s: float) -> Optional[dict]:
    try:
      request = {"pred": pred, "gold": gold, "timeout_s": timeout_s}
      self.proc.stdin.write((json.dumps(request) + "\n").encode())
      self.proc.stdin.flush()
    except OSError:
      return None
    return self._read(time.monotonic() + timeout_s + _HARD_GRACE_S)

  def kill(self) -> None:
    try:
      os.killpg(self.proc.pid, signal.SIGKILL)
    except OSError:
      pass
    self.proc.wait()
    for f in (self.proc.stdin, self.proc.stdout):
      try:
        f.close()
      except OSError:
        pass


class _Pool:
  """Idle workers; each check borrows one, so concurrent threads never share."""

  def __init__(self):
    self._lock = threading.Lock()
    self._idle: list[_Worker] = []
    self._pid = os.getpid()

  def acquire(self) -> _Worker:
    with self._lock:
      if self._pid != os.getpid():  # forked: the parent's workers are not ours
        self._idle, self._pid = [], os.getpid()
      if self._idle:
        return self._idle.pop()
    return _Worker()

  def release(self, worker: _Worker) -> None:
    with self._lock:
      if worker.proc.poll() is None and len(self._idle) < _MAX_IDLE_WORKERS:
        self._idle.append(worker)
        return
    worker.kill()

  def shutdown(self) -> None:
    with self._lock:
      idle, self._idle = self._idle, []
    for worker in idle:
      worker.kill()


_POOL = _Pool()
atexit.register(_POOL.shutdown)


def shutdown() -> None:
  """Stops the idle worker processes (they are restarted on demand)."""
  _POOL.shutdown()


# ----------------------------------------------------------------- public API

def check(response: str, answer: str, timeout_s: float = 5.0) -> Verdict:
  """Is the final answer of `response` equivalent to the reference `answer`?

  Never raises: errors and timeouts give correct=False with the reason.
  `timeout_s` bounds the equivalence check (worker start-up is not counted).
  """
  try:
    extracted = extract_answer(response)
    if extracted is None:
      return Verdict(False, "no_answer")
    if len(extracted) > MAX_ANSWER_CHARS:
      return Verdict(False, "answer_too_long", extracted[:MAX_ANSWER_CHARS])
    gold = normalize_reference(str(answer))
    if _squash(extracted) == _squash(gold):  # skip sympy for the common case
      return Verdict(True, "exact_match", extracted)
    if len(gold) > MAX_ANSWER_CHARS:
      return Verdict(False, "unparsable_reference", extracted)
    worker = _POOL.acquire()
    reply = worker.ask(extracted, gold, timeout_s)
    if reply is None:  # hard stop: the worker is wedged (or died)
      died = worker.proc.poll() is not None
      worker.kill()
      return Verdict(False, "error: worker died" if died else "timeout", extracted)
    _POOL.release(worker)
    return Verdict(bool(reply["correct"]), str(reply["reason"]), extracted)
  except Exception as e:  # pylint: disable=broad-except
    return Verdict(False, f"error: {type(e).__name__}: {e}"[:300])


def verify(response: str, answer: str, timeout_s: float = 5.0) -> bool:
  """True when the response's final answer is equivalent to `answer`; never raises."""
  return check(response, answer, timeout_s).correct


def check_batch(responses: Sequence[str], answers: Sequence[str],
                timeout_s: float = 5.0, max_workers: int = 2) -> list[Verdict]:
  """`check` over pairs, with up to `max_workers` worker processes in parallel."""
  if len(responses) != len(answers):
    raise ValueError(f"check_batch: {len(responses)} responses but "
                     f"{len(answers)} answers")
  with concurrent.futures.ThreadPoolExecutor(max(1, max_workers)) as pool:
    return list(pool.map(lambda ra: check(ra[0], ra[1], timeout_s),
                         zip(responses, answers)))
