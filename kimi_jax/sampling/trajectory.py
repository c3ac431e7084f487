"""Trajectories and groups: what the rollout scheduler hands to the RL update.

Axis legend: one trajectory's tokens are prompt + response; `logp` and
`token_iter` cover the response only. Both round-trip through JSON for the
scheduler's replay buffer in checkpoints (`partial.RolloutScheduler`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from kimi_jax.sampling.finish import FinishReason


@dataclasses.dataclass(frozen=True, eq=False)
class Trajectory:
  """One sample: prompt + response so far.

  tokens: int32 [prompt_len + response_len].
  logp, token_iter: float32 / int32 [response_len], behaviour log-prob and
    generating iteration of each response token.
  finish: final reason, or BUDGET while it waits in the replay buffer.
  age: times carried over (segments spanned - 1).
  first_iteration / last_iteration: iterations of its first / latest segment.
  """
  prompt_idx: int
  sample_idx: int
  group_id: int
  tokens: np.ndarray
  prompt_len: int
  logp: np.ndarray
  token_iter: np.ndarray
  finish: FinishReason
  age: int
  first_iteration: int
  last_iteration: int

  @property
  def response(self) -> np.ndarray:
    return self.tokens[self.prompt_len:]

  @property
  def response_len(self) -> int:
    return len(self.tokens) - self.prompt_len

  def to_json(self) -> dict:
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    for key in ("tokens", "logp", "token_iter"):
      d[key] = d[key].tolist()
    d["finish"] = int(self.finish)
    return d

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> "Trajectory":
    t = cls(prompt_idx=int(d["prompt_idx"]), sample_idx=int(d["sample_idx"]),
            group_id=int(d["group_id"]),
            tokens=np.asarray(d["tokens"], np.int32).reshape(-1),
            prompt_len=int(d["prompt_len"]),
            logp=np.asarray(d["logp"], np.float32).reshape(-1),
            token_iter=np.asarray(d["token_iter"], np.int32).reshape(-1),
            finish=FinishReason(int(d["finish"])), age=int(d["age"]),
            first_iteration=int(d["first_iteration"]),
            last_iteration=int(d["last_iteration"]))
    if not (0 < t.prompt_len <= len(t.tokens)
            and len(t.logp) == len(t.token_iter) == t.response_len):
      raise ValueError(f"inconsistent trajectory record (group {t.group_id}, "
                       f"sample {t.sample_idx}): {len(t.tokens)} tokens, "
                       f"prompt_len {t.prompt_len}, {len(t.logp)} logp, "
                       f"{len(t.token_iter)} token_iter")
    return t


@dataclasses.dataclass(frozen=True, eq=False)
class Group:
  """The k final samples of one prompt, sorted by sample_idx."""
  prompt_idx: int
  group_id: int
  trajectories: list[Trajectory]
