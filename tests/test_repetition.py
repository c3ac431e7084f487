"""Repeat detector on hand-built histories."""
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax.sampling import repetition
from kimi_jax.sampling.repetition import RepeatConfig


def check(cfg, response):
  tokens = np.array([[5, 6] + response], np.int32)  # 2 prompt tokens
  hist = repetition.init_history(jnp.asarray(tokens), jnp.asarray([tokens.shape[1]]),
                                 jnp.asarray([2]), cfg)
  return bool(repetition.is_repeating(hist, cfg)[0])


CFG = RepeatConfig(max_period=4, min_repeats=3, min_span=6)


@pytest.mark.parametrize("response,expected", [
    ([1, 2, 1, 2, 1, 2], True),            # period 2 x 3 = 6 tokens
    ([9, 1, 2, 1, 2, 1, 2], True),          # preceded by other text
    ([1, 2, 1, 2, 1], False),               # 5 tokens only
    ([3, 3, 3, 3, 3], False),               # period 1 needs the 6-token span
    ([3, 3, 3, 3, 3, 3], True),
    ([1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4], True),   # period 4 x 3
    ([1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2, 3, 4, 5], False),  # period 5 > max_period
    ([1, 2, 1, 2, 1, 3], False),            # broken at the end
    (list(range(1, 20)), False),
])
def test_hand_built(response, expected):
  assert check(CFG, response) is expected


def test_prompt_tokens_do_not_count():
  cfg = RepeatConfig(max_period=2, min_repeats=2, min_span=4)
  tokens = np.array([[7, 7, 7, 7, 7]], np.int32)
  hist = repetition.init_history(jnp.asarray(tokens), jnp.asarray([5]), jnp.asarray([4]), cfg)
  assert not bool(repetition.is_repeating(hist, cfg)[0])


def test_disabled_and_validation():
  assert not check(RepeatConfig(max_period=0), [1] * 40)
  assert RepeatConfig(max_period=3, min_repeats=2, min_span=4).window(1) == 4
  with pytest.raises(ValueError, match="min_repeats"):
    RepeatConfig(max_period=2, min_repeats=1)
