"""Repeat detection that runs inside the jitted decode loop.

Axis legend: B rows, H history length, L max total length.

A row is "repeating" when its last `w_p` response tokens are periodic with
some period p in 1..max_period, i.e. the same p-gram occurs
`r_p = max(min_repeats, ceil(min_span / p))` times back to back. The span
floor keeps legitimate short runs ("1000", "...") from tripping the
detector: a period-1 repeat needs `min_span` identical tokens.

The detector keeps a right-aligned history of the last H response tokens
(H = the longest window), pushed one token per step; checking costs
O(max_period * H) comparisons per row per step.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

_EMPTY = -1  # history filler; never equal to a token id


@dataclasses.dataclass(frozen=True)
class RepeatConfig:
  """max_period: longest repeating unit checked (0 disables detection).
  min_repeats: back-to-back copies needed (r).
  min_span: minimum number of tokens the repeated region must cover.
  """
  max_period: int = 0
  min_repeats: int = 4
  min_span: int = 16

  def __post_init__(self):
    if self.max_period < 0:
      raise ValueError(f"RepeatConfig.max_period must be >= 0, got {self.max_period}")
    if self.min_repeats < 2:
      raise ValueError(f"RepeatConfig.min_repeats must be >= 2, got {self.min_repeats}")
    if self.min_span < 2:
      raise ValueError(f"RepeatConfig.min_span must be >= 2, got {self.min_span}")

  @property
  def enabled(self) -> bool:
    return self.max_period > 0

  def window(self, period: int) -> int:
    """Tokens that must be periodic for a repeat of this period."""
    return period * max(self.min_repeats, math.ceil(self.min_span / period))

  @property
  def history(self) -> int:
    return max((self.window(p) for p in range(1, self.max_period + 1)), default=1)


def init_history(tokens_BL: jax.Array, length_B: jax.Array, prompt_len_B: jax.Array,
                 cfg: RepeatConfig) -> jax.Array:
  """int32 `[B, H]`: the last H response tokens, right-aligned, `_EMPTY` before.

  Only response tokens count: a prompt that happens to be periodic must not
  stop its response.
  """
  H, L = cfg.history, tokens_BL.shape[1]
  pos_BH = length_B[:, None] - H + jnp.arange(H, dtype=jnp.int32)[None, :]
  toks = jnp.take_along_axis(tokens_BL, jnp.clip(pos_BH, 0, L - 1), axis=1)
  return jnp.where(pos_BH >= prompt_len_B[:, None], toks, _EMPTY)


def push(history_BH: jax.Array, token_B: jax.Array) -> jax.Array:
  """Append one token per row, dropping the oldest."""
  return jnp.concatenate([history_BH[:, 1:], token_B[:, None]], axis=1)


def is_repeating(history_BH: jax.Array, cfg: RepeatConfig) -> jax.Array:
  """bool `[B]`: the end of the history is a repeat (see module docstring)."""
  B, H = history_BH.shape
  found = jnp.zeros((B,), jnp.bool_)
  if not cfg.enabled:
    return found
  for p in range(1, cfg.max_period + 1):
    w = cfg.window(p)
    tail = history_BH[:, H - w:]
    periodic = jnp.all(tail[:, p:] == tail[:, :-p], axis=1) & (tail[:, 0] != _EMPTY)
    found = found | periodic
  return found
