"""What a failed checkpoint save leaves behind, and how it is reported.

A full disk makes one orbax write fail while tensorstore completes (or
abandons) the others: `no_space` recognises the error however orbax wraps
it, `short` trims tensorstore's long messages for the one-line report, and
`quiet_abandoned_writes` keeps the abandoned writes' late callbacks and
futures from printing tracebacks around (or after) that line.
"""
from __future__ import annotations

import errno
import logging as std_logging
import sys

from absl import logging

_MAX_ERR_CHARS = 400  # tensorstore errors embed whole JSON specs


def quiet_abandoned_writes() -> None:
  """When one write of a save fails (a full disk), orbax closes its event loop
  while tensorstore still completes the other writes; their callbacks then
  raise RuntimeError('Event loop is closed') into sys.unraisablehook, which
  prints a traceback per array around our one-line error. They are harmless
  (the save is reported and its partial step removed), so only those are
  dropped, logged at debug level; every other unraisable is printed as before."""
  previous = sys.unraisablehook
  if getattr(previous, "_kimi_jax_closed_loop", False):
    return

  def hook(unraisable):
    e = unraisable.exc_value
    if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
      logging.debug("ignored a write callback after a failed checkpoint save: %s", e)
      return
    previous(unraisable)

  hook._kimi_jax_closed_loop = True  # pylint: disable=protected-access
  sys.unraisablehook = hook
  asyncio_logger = std_logging.getLogger("asyncio")
  if not any(isinstance(f, _AbandonedWriteFilter) for f in asyncio_logger.filters):
    asyncio_logger.addFilter(_AbandonedWriteFilter())


class _AbandonedWriteFilter(std_logging.Filter):
  """Drops asyncio's "Future/Task exception was never retrieved" records whose
  exception is a full disk or the closed loop: the futures of the writes a
  failed save abandoned, garbage-collected at an arbitrary later moment (in
  CI one was logged after our one-line error, as the last line of the run).
  Every other asyncio record passes."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if "exception was never retrieved" not in str(record.msg):
      return True
    e = record.exc_info[1] if record.exc_info else None
    if e is None:
      return True
    closed = isinstance(e, RuntimeError) and str(e) == "Event loop is closed"
    if closed or no_space(e):
      logging.debug("ignored an abandoned checkpoint write: %s", e)
      return False
    return True


def no_space(e: BaseException) -> bool:
  """Whether `e` (or what caused it) is a full disk or quota. Orbax reports
  tensorstore's ENOSPC as a ValueError "RESOURCE_EXHAUSTED ... [os_error_code='28']"."""
  while e is not None:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    text = str(e)
    if "No space left on device" in text or "Disk quota exceeded" in text:
      return True
    e = e.__cause__ or e.__context__
  return False


def short(e: BaseException) -> str:
  text = f"{type(e).__name__}: {e}"
  if len(text) > _MAX_ERR_CHARS:
    text = text[:_MAX_ERR_CHARS] + "..."
  return text
