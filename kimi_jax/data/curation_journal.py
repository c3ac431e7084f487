"""Resumable curation: a journal of the model's work, one line per chunk.

The two model stages of curation (guess, pass rate) run in chunks of
`prompts_per_call` prompts, each sampled with a seed of its own (config
seed, stage, chunk start). After each chunk, OUT/progress.jsonl gets one
line with the correct-answer counts of its prompts, flushed and fsync'ed.
A rerun of the same command reads the journal and samples only the chunks
not in it; as a chunk's prompts and seed do not depend on which run
computes it, the result is the one an uninterrupted run writes.

  line 1   {"fingerprint": "<sha256 of config, prompt file, model id>"}
  then     {"stage": "guess", "lo": 0, "ids": "<sha256 of the chunk's ids>",
            "counts": {"id": 3, ...}, "responses": 640, "check_errors": 0}

A journal written for other settings (a different config, prompt file or
model) is not used: `open_journal` raises `CurationError` naming it, unless
told to start over. A torn last line (a kill mid-write) is ignored.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional, Sequence

from absl import logging

from kimi_jax import faults
from kimi_jax.data.curation_model import CurationError

JOURNAL_FILE = "progress.jsonl"


def fingerprint(config_fields: dict, prompts_path: str, model_id: str) -> str:
  """What a journal's counts depend on: every setting, the input bytes, the model."""
  h = hashlib.sha256(json.dumps(config_fields, sort_keys=True, default=str).encode())
  with open(prompts_path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  h.update(model_id.encode())
  return h.hexdigest()


def _ids_key(ids: Sequence[str]) -> str:
  return hashlib.sha256("\n".join(ids).encode()).hexdigest()


class Journal:
  """Counts per (stage, chunk start), loaded from and appended to a file."""

  def __init__(self, path: Optional[str], done: dict):
    self.path = path
    self._done = done
    self.chunks_written = 0
    self.reused = 0

  def get(self, stage: str, lo: int, ids: Sequence[str]) -> Optional[dict]:
    """The journaled entry of this chunk, if its prompts are the same."""
    entry = self._done.get((stage, lo))
    if entry is not None and entry["ids"] == _ids_key(ids):
      self.reused += 1
      return entry
    return None

  def put(self, stage: str, lo: int, ids: Sequence[str], counts: dict[str, int],
          responses: int, check_errors: int) -> None:
    entry = {"stage": stage, "lo": lo, "ids": _ids_key(ids), "counts": counts,
             "responses": responses, "check_errors": check_errors}
    self._done[(stage, lo)] = entry
    if self.path is None:
      return
    _append(self.path, entry)
    self.chunks_written += 1
    # Fault point "curation": after the chunk-th chunk of this process is in
    # the journal (tests kill here and rerun the same command).
    faults.reached("curation", self.chunks_written)


def _append(path: str, entry: dict[str, Any]) -> None:
  with open(path, "a", encoding="utf-8") as f:
    f.write(json.dumps(entry, separators=(",", ":")) + "\n")
    f.flush()
    os.fsync(f.fileno())


def _cut_torn_tail(path: str) -> None:
  """A kill mid-write leaves an unfinished last line: cut it, so the next
  line starts on a line of its own (that chunk is simply computed again)."""
  with open(path, "rb") as f:
    data = f.read()
  if data and not data.endswith(b"\n"):
    with open(path, "r+b") as f:
      f.truncate(data.rfind(b"\n") + 1)
      os.fsync(f.fileno())
    logging.warning("%s: cut an unfinished last line (a run killed mid-write)", path)


def open_journal(out_dir: Optional[str], fp: str, *, start_over: bool) -> Journal:
  """The journal of OUT (created if missing); None out_dir: in memory only."""
  if out_dir is None:
    return Journal(None, {})
  path = os.path.join(out_dir, JOURNAL_FILE)
  done: dict = {}
  if os.path.exists(path) and start_over:
    os.unlink(path)
  if os.path.exists(path):
    _cut_torn_tail(path)
    with open(path, encoding="utf-8") as f:
      lines = f.read().split("\n")
    try:
      header = json.loads(lines[0])["fingerprint"]
    except (ValueError, KeyError, TypeError, IndexError):
      header = None
    if header != fp:
      raise CurationError(f"{path} was written for other settings (config, prompt file or "
                          "model differ); pass overwrite (--overwrite_out) to start over")
    for n, line in enumerate(lines[1:], 2):
      if not line.strip():
        continue
      try:
        entry = json.loads(line)
        done[(entry["stage"], entry["lo"])] = entry
      except (ValueError, KeyError, TypeError):
        raise CurationError(f"{path}:{n}: not a journal line; pass overwrite "
                            "(--overwrite_out) to start over") from None
    logging.info("curation: resuming, %d chunks already in %s", len(done), path)
  else:
    _append(path, {"fingerprint": fp})
  return Journal(path, done)
