"""Counting XLA compilations, to prove that hot loops do not recompile.

Every backend compilation emits jax's monitoring event
`/jax/core/compile/backend_compile_duration`; we count those events. jax
times the compile-or-load-from-the-persistent-cache step under that event,
so a program loaded from a warm persistent cache counts too: a recompile
cannot hide behind a cache (tests/test_compile_count.py).
"""
from __future__ import annotations

import threading

import jax

_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_lock = threading.Lock()
_total = 0
_registered = False


def _listener(event: str, duration_secs: float, **kwargs) -> None:
  del duration_secs, kwargs
  global _total
  if event == _BACKEND_COMPILE_EVENT:
    with _lock:
      _total += 1


def _ensure_registered() -> None:
  global _registered
  with _lock:
    if not _registered:
      jax.monitoring.register_event_duration_secs_listener(_listener)
      _registered = True


def total_compiles() -> int:
  """Backend compilations seen since counting started in this process."""
  _ensure_registered()
  return _total


class CompileCounter:
  """`with CompileCounter() as c: ...; c.count` = compilations inside the block."""

  def __enter__(self) -> "CompileCounter":
    self._start = total_compiles()
    self.count = 0
    return self

  def __exit__(self, *exc) -> None:
    self.count = total_compiles() - self._start

