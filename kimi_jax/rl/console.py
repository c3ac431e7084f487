"""The trainer's console: one line per iteration, and quiet library logs.

Kept out of trainer.py so the loop stays about training.
"""
from __future__ import annotations

import logging as std_logging
import math


class _DropLibraryInfo(std_logging.Filter):
  """Keep orbax's per-save INFO chatter out of the run log (warnings pass)."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def quiet_library_logs():
  for handler in std_logging.getLogger().handlers + std_logging.getLogger("absl").handlers:
    handler.addFilter(_DropLibraryInfo())
  std_logging.getLogger("absl").addFilter(_DropLibraryInfo())


def finite(row, key):
  """row[key] when it is a finite number, else None."""
  value = row.get(key)
  return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def console_line(iteration: int, total: int, row) -> str:
  """The one log line of an iteration: what a researcher watches.

    iter 12/160 | reward 0.42 (correct 0.47) | loss 0.0123 | 31.6 tokens | 12 groups | 2.1 s
    iter 13/160 | no finished groups (2 pending) | 1.1 s
    iter 20/160 | ... | eval pass@1 0.47, greedy 0.52

  No "nan": an iteration where no group of k samples finished has no
  reward and no update, and says so.
  """
  parts = [f"iter {iteration}/{total}"]
  groups = finite(row, "rollout/groups_completed")
  reward = finite(row, "rollout/reward_mean")
  if iteration == 0:
    parts.append("before RL")
  elif not groups or reward is None:
    pending = finite(row, "rollout/groups_pending")
    parts.append("no finished groups" + (f" ({pending:.0f} pending)" if pending else ""))
  else:
    correct = finite(row, "rollout/task_reward_mean")
    parts.append(f"reward {reward:.3f}" + (f" (correct {correct:.2f})"
                                           if correct is not None and correct != reward else ""))
    loss = finite(row, "train/loss")
    if loss is not None:
      parts.append(f"loss {loss:.4g}")
    tokens = finite(row, "rollout/response_tokens_mean")
    if tokens is not None:
      parts.append(f"{tokens:.1f} tokens")
    parts.append(f"{groups:.0f} group{'s' if groups != 1 else ''}")
  if finite(row, "train/update_finite") == 0:
    parts.append("update skipped (non-finite)")
  seconds = sum(finite(row, k) or 0.0 for k in ("time/rollout_s", "time/reward_s",
                                                  "time/update_s"))
  if seconds:
    parts.append(f"{seconds:.1f} s")
  acc = finite(row, "eval/accuracy")
  if acc is not None:
    greedy = finite(row, "eval/greedy_accuracy")
    parts.append(f"eval pass@1 {acc:.3f}" + (f", greedy {greedy:.3f}" if greedy is not None
                                             else ""))
  return " | ".join(parts)
