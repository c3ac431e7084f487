"""Verdicts: one rule for every measured effect, fixed before any run.

An effect is one number per seed (a difference between arms, or between the
end and the start of a run). With n seeds, m their mean and se = sd / sqrt(n):

  "greater" (the claim says the effect is positive)
    reproduced       every seed > 0 and m > 2 se
    not reproduced   m <= 0
    inconclusive     otherwise (positive on average, within the seed spread)
  "equal" (the claim says |effect| is at most `tolerance`)
    reproduced       |m| + se <= tolerance
    not reproduced   |m| - se > tolerance
    inconclusive     otherwise

The tolerance for "equal accuracy" is 3 points: the evaluation noise of the
toy task. A claim that does not reproduce is reported with its numbers; the
rule is not to be tuned to a run.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE, PENDING = (
    "reproduced", "not reproduced", "inconclusive", "pending")
ACCURACY_TOLERANCE = 0.03


@dataclasses.dataclass(frozen=True)
class Effect:
  """claim: the finding in words; per_seed: the effect of each seed (in
  `unit`s after `scale`); kind: 'greater' | 'equal'."""
  claim: str
  per_seed: tuple[float, ...]
  kind: str = "greater"
  tolerance: float = 0.0
  unit: str = "points"
  scale: float = 100.0  # fractions are shown as points

  @property
  def mean(self) -> float:
    return float(np.mean(self.per_seed))

  @property
  def se(self) -> float:
    n = len(self.per_seed)
    return float(np.std(self.per_seed, ddof=1) / math.sqrt(n)) if n > 1 else math.inf

  @property
  def verdict(self) -> str:
    values = np.array(self.per_seed)
    if not len(values) or not np.all(np.isfinite(values)):
      return INCONCLUSIVE
    m, se = self.mean, self.se
    if self.kind == "greater":
      if m <= 0:
        return NOT_REPRODUCED
      return REPRODUCED if np.all(values > 0) and m > 2 * se else INCONCLUSIVE
    if self.kind == "equal":
      if abs(m) + se <= self.tolerance:
        return REPRODUCED
      return NOT_REPRODUCED if abs(m) - se > self.tolerance else INCONCLUSIVE
    raise ValueError(f"Effect.kind must be 'greater' or 'equal', got {self.kind!r}")

  def numbers(self) -> str:
    """'+4.1 +- 1.2 points (seeds: +3.0, +5.2, +4.1)' in the effect's unit."""
    s = self.scale
    seeds = ", ".join(f"{s * v:+.1f}" for v in self.per_seed)
    se = f" +- {s * self.se:.1f}" if math.isfinite(self.se) else ""
    bound = (f"; tolerance {s * self.tolerance:.1f}" if self.kind == "equal" else "")
    return f"{s * self.mean:+.1f}{se} {self.unit} (seeds: {seeds}{bound})"


def overall(effects: Sequence[Effect]) -> str:
  """A claim's verdict from its effects: reproduced when all are, not
  reproduced when any is not, else inconclusive."""
  verdicts = [e.verdict for e in effects]
  if not verdicts:
    return PENDING
  if all(v == REPRODUCED for v in verdicts):
    return REPRODUCED
  if any(v == NOT_REPRODUCED for v in verdicts):
    return NOT_REPRODUCED
  return INCONCLUSIVE
