"""Settings of the partial-rollout scheduler (`partial.RolloutScheduler`)."""
from __future__ import annotations

import dataclasses
import numbers
from typing import Callable, Sequence

import numpy as np

OVERLONG = ("reject", "truncate_left", "truncate_right")

# (n_prompts, iteration) -> [(prompt_idx, token ids), ...] with at most n items.
PromptSource = Callable[[int, int], Sequence[tuple[int, Sequence[int]]]]


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
  """Settings of `RolloutScheduler`.

  num_slots: B, rows decoded together.
  samples_per_prompt: k, samples of one prompt (one group); <= num_slots.
  max_length: L, max total tokens of a row (prompt + response).
  max_prompt_length: prompt budget, < max_length (room for a response).
  segment_budget: new tokens per row per iteration in partial mode.
  partial: True = partial rollouts; False = synchronous (run to the end).
  max_age: M, how many times a trajectory may be carried over; a BUDGET row
    already carried M times is finished as MAX_AGE. 0 = never carry.
  overlong_prompt: 'reject' | 'truncate_left' (keep the last
    max_prompt_length tokens) | 'truncate_right' (keep the first ones).
  max_prompt_retries: extra prompt-source calls per iteration to replace
    rejected prompts.
  """
  num_slots: int
  samples_per_prompt: int
  max_length: int
  max_prompt_length: int
  segment_budget: int = 256
  partial: bool = True
  max_age: int = 4
  overlong_prompt: str = "reject"
  max_prompt_retries: int = 4

  def __post_init__(self):
    for name, lo in (("num_slots", 1), ("samples_per_prompt", 1),
                     ("max_length", 2), ("max_prompt_length", 1),
                     ("segment_budget", 1), ("max_age", 0),
                     ("max_prompt_retries", 0)):
      v = getattr(self, name)
      if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < lo:
        raise ValueError(f"SchedulerConfig.{name} must be an int >= {lo}, "
                         f"got {v!r}")
    if self.samples_per_prompt > self.num_slots:
      raise ValueError(f"SchedulerConfig.samples_per_prompt must be <= "
                       f"num_slots ({self.num_slots}), got "
                       f"{self.samples_per_prompt!r}")
    if self.max_prompt_length >= self.max_length:
      raise ValueError(f"SchedulerConfig.max_prompt_length must be < "
                       f"max_length ({self.max_length}), got "
                       f"{self.max_prompt_length!r}")
    if not isinstance(self.partial, (bool, np.bool_)):
      raise ValueError(f"SchedulerConfig.partial must be a bool, got "
                       f"{self.partial!r}")
    if self.overlong_prompt not in OVERLONG:
      raise ValueError(f"SchedulerConfig.overlong_prompt must be one of "
                       f"{OVERLONG}, got {self.overlong_prompt!r}")
