"""Tests for kimi_jax/rl/rewards.py and kimi_jax/sampling/finish.py.

Axis legend: G groups, K samples per group, B flat batch.
"""
import logging
import sys

import numpy as np
import pytest

from kimi_jax.rl import rewards
from kimi_jax.sampling.finish import FinishReason, as_finish_codes

EOS = int(FinishReason.EOS)


def test_length_penalty_hand_built_group():
  lengths_GK = np.array([[100, 200, 300, 500]])
  correct_GK = np.array([[True, True, False, False]])
  # lambda = 0.5 - (len - 100) / 400 = [0.5, 0.25, 0.0, -0.5]
  np.testing.assert_allclose(rewards.length_penalty(lengths_GK, correct_GK),
                             [[0.5, 0.25, 0.0, -0.5]])
  # Short wrong answers are not rewarded: wrong -> min(0, lambda).
  wrong_short = rewards.length_penalty([[100, 500]], [[False, True]])
  np.testing.assert_allclose(wrong_short, [[0.0, -0.5]])


def test_length_penalty_equal_lengths_give_zero():
  out = rewards.length_penalty([[50, 50, 50], [10, 30, 20]],
                               [[True, False, True], [True, True, True]])
  np.testing.assert_allclose(out, [[0, 0, 0], [0.5, -0.5, 0.0]])
  assert out.dtype == np.float32
  single = rewards.length_penalty([[7]], [[True]])
  np.testing.assert_array_equal(single, [[0.0]])


def test_length_penalty_bad_shapes():
  with pytest.raises(ValueError, match="correct_GK"):
    rewards.length_penalty([[1, 2]], [[True]])
  with pytest.raises(ValueError, match=r"\[G, K\]"):
    rewards.length_penalty([1, 2], [True, False])


def test_warmup_schedule():
  cfg = rewards.RewardConfig(length_penalty_weight=0.2, length_penalty_start=10)
  assert [rewards.length_penalty_weight(i, cfg) for i in (0, 9, 10, 11, 500)
         ] == [0.0, 0.0, 0.2, 0.2, 0.2]
  on_from_start = rewards.RewardConfig(length_penalty_weight=0.3)
  assert rewards.length_penalty_weight(0, on_from_start) == 0.3


def test_total_reward_combination():
  cfg = rewards.RewardConfig(length_penalty_weight=0.2, length_penalty_start=5,
                             repeat_penalty=0.5, truncated_reward=0.0)
  task_GK = np.array([[1.0, 1.0, 1.0, 0.0]])
  lengths_GK = np.array([[100, 300, 200, 500]])
  finish_GK = [["eos", "eos", "repeat", "max_length"]]
  # Before warm-up ends: the repeat response loses its task reward (cut) and
  # pays the penalty; the truncated one gets truncated_reward = 0.
  np.testing.assert_allclose(
      rewards.total_reward(task_GK, lengths_GK, finish_GK, 4, cfg),
      [[1.0, 1.0, -0.5, 0.0]])
  # After: lambda = [0.5, 0.0, 0.25, -0.5]; the repeat one is now "wrong" so
  # it gets min(0, 0.25) = 0.
  total, parts = rewards.total_reward(task_GK, lengths_GK, finish_GK, 5, cfg,
                                      return_parts=True)
  np.testing.assert_allclose(total, [[1.1, 1.0, -0.5, -0.1]], rtol=1e-6)
  np.testing.assert_allclose(parts["length"], [[0.5, 0.0, 0.0, -0.5]])
  assert parts["length_weight"] == 0.2
  assert total.dtype == np.float32


def test_total_reward_truncated_keeps_verifier_when_none():
  cfg = rewards.RewardConfig(truncated_reward=None)
  out = rewards.total_reward([[1.0, 0.0]], [[5, 5]],
                             [[FinishReason.MAX_LENGTH, FinishReason.EOS]], 0,
                             cfg)
  np.testing.assert_allclose(out, [[1.0, 0.0]])
  cfg = rewards.RewardConfig(truncated_reward=-0.25)
  out = rewards.total_reward([[1.0, 1.0]], [[5, 5]],
                             np.array([[int(FinishReason.BUDGET), EOS]]), 0, cfg)
  np.testing.assert_allclose(out, [[-0.25, 1.0]])


def test_correctness_is_one_definition_binary_by_default():
  """Code scores are pass fractions; the reward is binary unless
  task_reward='fraction', and correctness (full marks, not cut) is the same
  either way and drives the length penalty."""
  scores_GK = np.array([[1.0, 0.6, 0.0, 1.0]])  # the last one is cut by max_length
  lengths_GK = np.array([[50, 10, 30, 90]])
  finish_GK = [["eos", "eos", "eos", "max_length"]]
  binary = rewards.total_reward(scores_GK, lengths_GK, finish_GK, 0, rewards.RewardConfig())
  np.testing.assert_allclose(binary, [[1.0, 0.0, 0.0, 0.0]])
  np.testing.assert_array_equal(rewards.is_correct(scores_GK), [[True, False, False, True]])
  cfg = rewards.RewardConfig(task_reward="fraction", length_penalty_weight=1.0)
  total, parts = rewards.total_reward(scores_GK, lengths_GK, finish_GK, 0, cfg,
                                      return_parts=True)
  np.testing.assert_array_equal(parts["correct"], [[True, False, False, False]])
  np.testing.assert_allclose(parts["task"], [[1.0, 0.6, 0.0, 0.0]])
  # lambda = 0.5 - (len - 10) / 80 = [0, 0.5, 0.25, -0.5]: the short 0.6 one
  # is not correct, so it gets min(0, 0.5) = 0, not a length bonus.
  np.testing.assert_allclose(parts["length"], [[0.0, 0.0, 0.0, -0.5]])
  np.testing.assert_allclose(total, [[1.0, 0.6, 0.0, -0.5]])
  with pytest.raises(ValueError, match="task_reward"):
    rewards.RewardConfig(task_reward="partial")


def test_total_reward_rejects_running_and_bad_codes():
  cfg = rewards.RewardConfig()
  with pytest.raises(ValueError, match="RUNNING"):
    rewards.total_reward([[1.0]], [[3]], [[0]], 0, cfg)
  with pytest.raises(ValueError, match="unknown finish reason"):
    rewards.total_reward([[1.0]], [[3]], [[17]], 0, cfg)
  with pytest.raises(ValueError, match="unknown finish reason"):
    rewards.total_reward([[1.0]], [[3]], [["stopped"]], 0, cfg)


def test_reward_config_validation():
  with pytest.raises(ValueError, match="length_penalty_weight.*-0.1"):
    rewards.RewardConfig(length_penalty_weight=-0.1)
  with pytest.raises(ValueError, match="length_penalty_start"):
    rewards.RewardConfig(length_penalty_start=-1)
  with pytest.raises(ValueError, match="repeat_penalty"):
    rewards.RewardConfig(repeat_penalty=float("nan"))


def test_finish_codes():
  assert as_finish_codes("eos") == EOS
  np.testing.assert_array_equal(as_finish_codes([["budget", "MAX_AGE"]]),
                                [[2, 5]])
  assert [m.name for m in FinishReason] == [
      "RUNNING", "EOS", "BUDGET", "MAX_LENGTH", "REPEAT", "MAX_AGE"]


def test_apply_verifier_never_raises_and_counts(caplog):
  def verifier(record, response):
    if response == "boom":
      raise RuntimeError("verifier bug")
    if response == "exit":
      sys.exit(3)
    if response == "str":
      return "1.0"
    if response == "nan":
      return float("nan")
    if response == "bool":
      return True
    return float(response == record["answer"])

  records = [{"id": i, "answer": "4"} for i in range(8)]
  responses = ["4", "5", "boom", "boom", "exit", "str", "nan", "bool"]
  with caplog.at_level(logging.WARNING):
    out = rewards.apply_verifier(verifier, records, responses,
                                 max_logged_per_reason=1)
  np.testing.assert_array_equal(out.rewards, [1, 0, 0, 0, 0, 0, 0, 1])
  assert out.errors == {"exception:RuntimeError": 2, "exception:SystemExit": 1,
                        "non_numeric": 1, "non_finite": 1}
  # One log line per reason (max_logged_per_reason=1), naming the sample.
  assert sum("verifier failed" in r.message for r in caplog.records) == 4
  rewards_B, errors = out  # a plain tuple too
  assert rewards_B.dtype == np.float32 and isinstance(errors, dict)


def test_apply_verifier_length_mismatch_is_caller_error():
  with pytest.raises(ValueError, match="2 prompt records but 1 responses"):
    rewards.apply_verifier(lambda r, s: 1.0, [{}, {}], ["a"])


def test_apply_verifier_threads_match_sequential():
  def verifier(record, response):
    if response == "boom":
      raise ValueError("bad")
    return float(len(response)) / 10

  records = [{"id": i} for i in range(7)]
  responses = ["a", "boom", "abc", "", "boom", "abcdefgh", "ab"]
  seq = rewards.apply_verifier(verifier, records, responses)
  par = rewards.apply_verifier(verifier, records, responses, max_workers=3)
  np.testing.assert_array_equal(seq.rewards, par.rewards)
  assert seq.errors == par.errors == {"exception:ValueError": 2}


def test_extract_code_prefers_the_last_python_block():
  text = "Plan.\n```python\nprint(1)\n```\nBetter:\n```py\nprint(2)\n```\n```text\nout\n```"
  assert rewards.extract_code(text) == "print(2)\n"
  assert rewards.extract_code("```\nx = 1\n```") == "x = 1\n"
  assert rewards.extract_code("print(3)") == "print(3)"


def test_prompt_verifier_by_type(caplog):
  from kimi_jax.data.prompts import Prompt
  verify = rewards.PromptVerifier(math_timeout_s=10.0, code_timeout_s=5.0)
  math_p = Prompt(id="m", prompt="6/8?", type="math", answer="\\frac{3}{4}")
  assert verify(math_p, "so the answer is $0.75$.") == 1.0
  assert verify(math_p, "\\boxed{3/5}") == 0.0
  mc = Prompt(id="q", prompt="?", type="multiple_choice", answer="(B)")
  assert verify(mc, "The answer is b.") == 1.0 and verify(mc, "\\boxed{C}") == 0.0
  tf = Prompt(id="t", prompt="?", type="true_false", answer="False")
  assert verify(tf, "The answer is **false**") == 1.0 and verify(tf, "no answer") == 0.0
  code_p = Prompt(id="c", prompt="sum", type="code", tests=(
      {"input": "1 2\n", "output": "3\n"}, {"input": "-1 -2\n", "output": "-3\n"}))
  # Passes the first test only: the reward is the pass fraction.
  program = "```python\na, b = map(int, input().split())\nprint(abs(a) + abs(b))\n```"
  assert verify(code_p, program) == 0.5
  proof = Prompt(id="p", prompt="Prove it.", type="proof")
  with caplog.at_level(logging.WARNING):
    out = rewards.apply_verifier(verify, [proof, mc], ["QED", "answer is B"])
  np.testing.assert_array_equal(out.rewards, [0.0, 1.0])
  assert out.errors == {"exception:ValueError": 1}
  assert "prompt id 'p'" in caplog.text
