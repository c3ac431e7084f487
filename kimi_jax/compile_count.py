"""Counting XLA compilations, to prove that hot loops do not recompile.

Every backend compilation emits jax's monitoring event
`/jax/core/compile/backend_compile_duration`, and every program loaded from
jax's persistent compilation cache instead emits
`/jax/compilation_cache/cache_hits`; we count both. A cache hit is a program
jax had to produce again (a jit cache miss), just cheaply: counting only
backend compiles would let a recompile hide behind a warm persistent cache
(the test suite and `launch.reproduce` run with one).
"""
from __future__ import annotations

import threading

import jax

_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_lock = threading.Lock()
_total = 0
_registered = False


def _count() -> None:
  global _total
  with _lock:
    _total += 1


def _duration_listener(event: str, duration_secs: float, **kwargs) -> None:
  del duration_secs, kwargs
  if event == _BACKEND_COMPILE_EVENT:
    _count()


def _event_listener(event: str, **kwargs) -> None:
  del kwargs
  if event == _CACHE_HIT_EVENT:
    _count()


def _ensure_registered() -> None:
  global _registered
  with _lock:
    if not _registered:
      jax.monitoring.register_event_duration_secs_listener(_duration_listener)
      jax.monitoring.register_event_listener(_event_listener)
      _registered = True


def total_compiles() -> int:
  """Programs compiled or loaded from the persistent cache since counting started."""
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

