"""Why a trajectory stopped: one integer code shared by sampling and RL.

The jitted sampler stores these codes in an int32 array (`finish_B`); the
host-side reward code reads them. Strings are accepted on the host side only
(`as_finish_codes`), for hand-written batches and tests.
"""
from __future__ import annotations

import enum
from typing import Any

import numpy as np


class FinishReason(enum.IntEnum):
  """Finish reason of one trajectory (Fig. 3b of the report).

  RUNNING:    still generating (inside the decode loop).
  EOS:        normal stop: the model emitted end-of-sequence.
  BUDGET:     this iteration's segment token budget was used up; the
              trajectory goes to the replay buffer and continues next
              iteration (partial rollouts). If it is scored anyway, it is
              scored as truncated.
  MAX_LENGTH: hit the hard cap on total response length: cut, no answer.
  REPEAT:     the repeat detector stopped it early.
  MAX_AGE:    carried over too many iterations and dropped: cut, no answer.
  """
  RUNNING = 0
  EOS = 1
  BUDGET = 2
  MAX_LENGTH = 3
  REPEAT = 4
  MAX_AGE = 5


# Trajectories that were cut before a natural stop (scored as "no answer" by
# rl/rewards.py unless configured otherwise). REPEAT is listed separately
# because it may carry an extra penalty.
TRUNCATED = (FinishReason.BUDGET, FinishReason.MAX_LENGTH, FinishReason.MAX_AGE)
# Reasons that end a trajectory for good (it can be scored and trained on).
FINAL = (FinishReason.EOS, FinishReason.MAX_LENGTH, FinishReason.REPEAT,
         FinishReason.MAX_AGE)


def as_finish_codes(finish_reason: Any) -> np.ndarray:
  """Finish reasons (ints, FinishReason members or names such as 'eos' /
  'max_length', any nesting) -> int32 numpy array of the same shape.

  Raises ValueError on an unknown name or code.
  """
  arr = np.asarray(finish_reason)
  if arr.dtype.kind in "US":
    flat = []
    for name in arr.reshape(-1).tolist():
      key = str(name).upper()
      if key not in FinishReason.__members__:
        raise ValueError(
            f"unknown finish reason {name!r}; expected one of "
            f"{[m.name.lower() for m in FinishReason]}")
      flat.append(int(FinishReason[key]))
    return np.asarray(flat, np.int32).reshape(arr.shape)
  if arr.dtype.kind not in "iub":
    raise ValueError(
        f"finish reasons must be integer codes or names, got dtype {arr.dtype}")
  codes = arr.astype(np.int32)
  valid = np.isin(codes, [int(m) for m in FinishReason])
  if not valid.all():
    bad = sorted(set(codes[~valid].tolist()))
    raise ValueError(f"unknown finish reason code(s) {bad}; valid codes are "
                     f"{ {m.name: int(m) for m in FinishReason} }")
  return codes
