"""Metrics: `metrics.jsonl` (source of truth), TensorBoard, one log line.

`metrics.jsonl` holds one JSON object per iteration, e.g.
  {"iteration": 3, "train/loss": 0.12, "rollout/reward_mean": 0.5, ...}
Each line is flushed and fsync'ed when written, so a killed run loses at most
the line being written; that torn tail is skipped by `read_metrics` and moved
aside when a `MetricsWriter` reopens the file.

Values are stored as plain JSON: numpy / jax scalars and 0-d arrays become
int / float, bigger arrays lists. Non-finite floats (NaN, +-inf) are written
as `null`, so the file stays strict JSON that any reader (jq, pandas) parses;
the log line still shows the real value.

Resume: a run restarted from a checkpoint at iteration i calls
`truncate_after(i)`; rows of later iterations (logged by the killed run after
its last checkpoint) move to `metrics.jsonl.orphaned` instead of being
duplicated by the rerun. TensorBoard events are append-only and keep them.

Create the writer on one process only (process 0) in multi-host runs.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import socket
import time
from typing import Any, Callable, Iterable, Mapping, Optional

from absl import logging
import numpy as np

from kimi_jax import faults

METRICS_FILE = "metrics.jsonl"
ORPHANED_SUFFIX = ".orphaned"
TB_SUBDIR = "tb"
# Keys shown, when present, in the one-line absl log summary.
LOG_KEYS = ("train/loss", "rollout/reward_mean", "rollout/response_tokens_mean",
            "eval/accuracy", "time/iteration_s")


class MetricsWriter:
  """Appends metric rows to `workdir/metrics.jsonl`, TensorBoard and the log.

  Args:
    workdir: run directory (created if missing).
    tensorboard: also write TensorBoard events under `workdir/tb/` (with
      tensorboard's pure-Python record writer: no TensorFlow import, so no TF
      start-up lines on the console and no GPU memory taken).
    log_keys: keys shown in the absl log line (finite values only).
    log_line: `(iteration, metrics) -> str` for that line instead (the
      trainer's own summary); returning "" logs nothing.
  """

  def __init__(self, workdir: str | os.PathLike, *, tensorboard: bool = True,
               log_keys: Iterable[str] = LOG_KEYS,
               log_line: Optional[Callable[[int, Mapping[str, Any]], str]] = None):
    self.workdir = os.fspath(workdir)
    os.makedirs(self.workdir, exist_ok=True)
    self.path = metrics_path(self.workdir)
    self.log_keys = tuple(log_keys)
    self._log_line = log_line or self._summary
    self._tb = None
    if tensorboard:
      self._tb = _EventFile(os.path.join(self.workdir, TB_SUBDIR))
    _move_torn_tail(self.path)
    self._file = open(self.path, "a", encoding="utf-8")

  def write(self, iteration: int, metrics: Mapping[str, Any]) -> dict:
    """Writes one row `{"iteration": iteration, **metrics}`; returns it."""
    if "iteration" in metrics:
      raise ValueError("MetricsWriter.write: pass the iteration as the first "
                       "argument, not as a metrics key")
    row = {"iteration": int(iteration)}
    for key, value in metrics.items():
      if not isinstance(key, str):
        raise TypeError(f"metric keys must be str, got {key!r}")
      row[key] = _plain(value, key)
    line = json.dumps(row, allow_nan=False, separators=(",", ":")) + "\n"
    try:
      if faults.armed("metrics_write", row["iteration"]):
        # Fault point "metrics_write": killed with half the row on disk.
        self._file.write(line[:len(line) // 2])
        self._file.flush()
        os.fsync(self._file.fileno())
        faults.reached("metrics_write", row["iteration"])
      self._file.write(line)
      self._file.flush()
      os.fsync(self._file.fileno())  # a SIGKILL right after loses nothing
    except OSError as e:  # a full disk: say which file (a torn row is set aside on reopen)
      raise OSError(e.errno, f"cannot write metrics row {row['iteration']}: {e.strerror}",
                    self.path) from e
    if self._tb is not None:
      # TensorBoard gets the real value, NaN / inf included.
      scalars = {k: float(v) for k, v in
                 ((k, _plain_number(v)) for k, v in metrics.items())
                 if isinstance(v, numbers.Real) and not isinstance(v, bool)}
      if scalars:
        self._tb.write_scalars(row["iteration"], scalars)
    line = self._log_line(row["iteration"], metrics)
    if line:
      logging.info("%s", line)
    return row

  def truncate_after(self, iteration: int) -> int:
    """Moves rows with `iteration` > `iteration` to the `.orphaned` file.

    Use `iteration=-1` when a run restarts with no checkpoint. Rows without
    an integer `iteration` stay. Returns the number of rows moved.
    """
    self._file.close()
    _move_torn_tail(self.path)
    with open(self.path, encoding="utf-8") as f:
      lines = f.readlines()
    keep, moved = [], []
    for n, line in enumerate(lines, 1):
      if not line.strip():
        continue
      row = _parse(line, self.path, n)
      it = row.get("iteration")
      late = isinstance(it, int) and it > iteration
      (moved if late else keep).append(line)
    if moved:
      # Orphans first: a crash between the two steps duplicates, never loses.
      _append_synced(self.path + ORPHANED_SUFFIX, moved)
      _replace_atomically(self.path, keep)
      logging.warning("moved %d metric rows after iteration %d from %s to %s",
                      len(moved), iteration, self.path,
                      self.path + ORPHANED_SUFFIX)
    self._file = open(self.path, "a", encoding="utf-8")
    return len(moved)

  def close(self) -> None:
    self._file.close()
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _summary(self, iteration: int, metrics: Mapping[str, Any]) -> str:
    parts = [f"iter {iteration}"]
    for key in self.log_keys:
      value = _plain_number(metrics.get(key))
      # A NaN in the log reads like divergence; it only means "not measured".
      if value is not None and not (isinstance(value, float) and not math.isfinite(value)):
        parts.append(f"{key} {_fmt(value)}")
    return " | ".join(parts)


def read_metrics(path: str | os.PathLike) -> list[dict]:
  """Rows of a metrics.jsonl; a torn last line is skipped with a warning."""
  rows, torn = read_metrics_counted(path)
  if torn:
    logging.warning("%s: skipped a torn last line", os.fspath(path))
  return rows


def read_metrics_counted(path: str | os.PathLike) -> tuple[list[dict], int]:
  """(rows, number of skipped torn last lines: 0 or 1).

  Only the last line may be torn (a write cut short by a kill); a broken
  line anywhere else raises ValueError naming the file and line.
  """
  path = os.fspath(path)
  with open(path, encoding="utf-8", errors="replace") as f:
    lines = f.read().split("\n")
  # split() leaves "" after a final "\n"; anything else is an unfinished line.
  tail = lines.pop()
  rows = [_parse(line, path, n) for n, line in enumerate(lines, 1)
          if line.strip()]
  if not tail.strip():
    return rows, 0
  try:
    rows.append(_parse(tail, path, len(lines) + 1))
    return rows, 0  # complete object, only its newline was lost
  except ValueError:
    return rows, 1


# ------------------------------------------------------------------ helpers


def _parse(line: str, path: str, lineno: int) -> dict:
  try:
    row = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}): "
                     f"{line[:80]!r}") from None
  if not isinstance(row, dict):
    raise ValueError(f"{path}:{lineno}: expected a JSON object, got "
                     f"{type(row).__name__}")
  return row


def _move_torn_tail(path: str) -> None:
  """Cuts an unfinished last line off `path`, keeping it in `.orphaned`."""
  if not os.path.exists(path):
    return
  with open(path, "rb") as f:
    data = f.read()
  if not data or data.endswith(b"\n"):
    return
  cut = data.rfind(b"\n") + 1
  tail = data[cut:].decode("utf-8", errors="replace")
  try:
    _parse(tail, path, data.count(b"\n") + 1)
    complete = True
  except ValueError:
    complete = False
  if complete:  # only the newline was lost
    with open(path, "ab") as f:
      f.write(b"\n")
      os.fsync(f.fileno())
    return
  record = json.dumps({"torn_line": tail}) + "\n"
  _append_synced(path + ORPHANED_SUFFIX, [record])
  with open(path, "r+b") as f:
    f.truncate(cut)
    os.fsync(f.fileno())
  logging.warning("%s: moved a torn last line (%d bytes) to %s", path,
                  len(data) - cut, path + ORPHANED_SUFFIX)


def _append_synced(path: str, lines: list[str]) -> None:
  with open(path, "a", encoding="utf-8") as f:
    f.writelines(lines)
    f.flush()
    os.fsync(f.fileno())


def _replace_atomically(path: str, lines: list[str]) -> None:
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(lines)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
  try:
    os.fsync(dir_fd)  # make the rename itself durable
  finally:
    os.close(dir_fd)


class _EventFile:
  """A TensorBoard event file: TFRecords of Event protos, simple_value scalars
  (what the scalar dashboard reads). tensorboard's own EventFileWriter would
  import TensorFlow for its file I/O when TensorFlow is installed."""

  def __init__(self, logdir: str):
    # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter
    self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
    os.makedirs(logdir, exist_ok=True)
    # The name TensorBoard looks for; pid: two writers never share a file.
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.v2"
    self._records = RecordWriter(open(os.path.join(logdir, name), "ab"))
    self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def _write(self, event) -> None:
    self._records.write(event.SerializeToString())
    self._records.flush()

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    values = [self._summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in scalars.items()]
    self._write(self._event_pb2.Event(wall_time=time.time(), step=step,
                                      summary=self._summary_pb2.Summary(value=values)))

  def close(self) -> None:
    self._records.close()


def _plain_number(value: Any) -> Any:
  """Python int/float/bool for numpy and jax scalars (0-d arrays)."""
  if hasattr(value, "shape") and hasattr(value, "dtype") and value.shape == ():
    return np.asarray(value).item()
  if isinstance(value, np.generic):
    return value.item()
  return value


def _plain(value: Any, key: str) -> Any:
  """A JSON value for `value`; non-finite floats become None."""
  value = _plain_number(value)
  if value is None or isinstance(value, (bool, str)):
    return value
  if isinstance(value, numbers.Integral):
    return int(value)
  if isinstance(value, numbers.Real):
    value = float(value)
    return value if math.isfinite(value) else None
  if hasattr(value, "shape") and hasattr(value, "dtype"):
    value = np.asarray(value).tolist()
  if isinstance(value, (list, tuple)):
    return [_plain(v, key) for v in value]
  if isinstance(value, Mapping):
    return {str(k): _plain(v, key) for k, v in value.items()}
  raise TypeError(f"metric {key!r}: {type(value).__name__} is not a number, "
                  "string or list")


def _fmt(value: Any) -> str:
  value = _plain_number(value)
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)


def metrics_path(workdir: str | os.PathLike) -> str:
  return os.path.join(os.fspath(workdir), METRICS_FILE)
