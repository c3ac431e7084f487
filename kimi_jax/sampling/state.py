"""RolloutState: B fixed decode slots with their trajectories so far.

Axis legend: B slots, L max total length (prompt + response).

Rows are RIGHT-aligned in storage (row b's tokens are `tokens_BL[b, :length_B[b]]`,
the prompt first), which is the natural layout for the host and the loss.
`sample_segment` re-packs rows left-padded for its own prefill.

The same structure holds numpy arrays on the host (scheduler, checkpoints)
and jax arrays inside `sample_segment`; every field has a fixed shape.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import flax.struct
import jax
import numpy as np

from kimi_jax.sampling.finish import FinishReason

PROMPT_TOKEN_ITERATION = -1  # token_iter value of prompt tokens


@flax.struct.dataclass
class RolloutState:
  """Attributes:
    tokens_BL: int32, prompt + response so far, then zeros.
    length_B: int32, valid tokens per row (prompt + response).
    prompt_len_B: int32, prompt tokens per row.
    active_B: bool, the slot holds a trajectory that should be continued.
    finish_B: int32 `FinishReason` (RUNNING while unfinished; BUDGET after a
      segment that ran out of its per-iteration budget).
    logp_BL: float32 behaviour log-prob of each response token (0 elsewhere).
    token_iter_BL: int32 iteration that generated each token (-1 for prompt,
      and for unused positions).
    prompt_idx_B: int32 prompt index in the prompt source (-1 for empty slots).
    sample_idx_B: int32 which of the k samples of its prompt this row is.
    pixels_BSYXC: float32 `[B, S, Y, X, C]`, each row's prompt images in S
      static slots (zeros after the last; never read), or None (text only).
      A function of the row's prompt: the trainer fills them from
      `prompt_idx_B` for fresh and carried rows alike (`sampling.images`),
      so the replay buffer and checkpoints need no pixels.
  """
  tokens_BL: np.ndarray
  length_B: np.ndarray
  prompt_len_B: np.ndarray
  active_B: np.ndarray
  finish_B: np.ndarray
  logp_BL: np.ndarray
  token_iter_BL: np.ndarray
  prompt_idx_B: np.ndarray
  sample_idx_B: np.ndarray
  pixels_BSYXC: Optional[np.ndarray] = None

  @classmethod
  def empty(cls, num_slots: int, max_length: int) -> "RolloutState":
    """All slots inactive."""
    B, L = num_slots, max_length
    return cls(tokens_BL=np.zeros((B, L), np.int32),
               length_B=np.zeros((B,), np.int32),
               prompt_len_B=np.zeros((B,), np.int32),
               active_B=np.zeros((B,), bool),
               finish_B=np.full((B,), int(FinishReason.RUNNING), np.int32),
               logp_BL=np.zeros((B, L), np.float32),
               token_iter_BL=np.full((B, L), PROMPT_TOKEN_ITERATION, np.int32),
               prompt_idx_B=np.full((B,), -1, np.int32),
               sample_idx_B=np.zeros((B,), np.int32))

  @property
  def num_slots(self) -> int:
    return self.tokens_BL.shape[0]

  @property
  def max_length(self) -> int:
    return self.tokens_BL.shape[1]

  def to_numpy(self) -> "RolloutState":
    """A host copy (device arrays fetched)."""
    fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    return RolloutState(**{k: None if v is None else np.asarray(v)
                           for k, v in jax.device_get(fields).items()})
