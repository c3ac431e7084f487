"""Tests for kimi_jax/rl/prompt_sampler.py.

Axis legend: P prompts, K samples per prompt.
"""
import json

import numpy as np
import pytest

from kimi_jax.rl.prompt_sampler import PromptSampler, PromptSamplerConfig


def _meta(num, difficulty=None):
  if difficulty is None:
    difficulty = np.linspace(0.0, 1.0, num)
  return [{"id": f"p{i}", "difficulty": float(d)}
          for i, d in enumerate(difficulty)]


def test_prioritized_frequencies_follow_one_minus_s_plus_eps():
  eps = 0.1
  cfg = PromptSamplerConfig(mode="prioritized", eps=eps, replace=True,
                            stat="mean")
  sampler = PromptSampler(_meta(4), cfg, seed=123)
  # success rates 1, 0.75, 0.25, 0 from one group of 4 each
  for i, rewards_K in enumerate([[1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0],
                                 [0, 0, 0, 0]]):
    sampler.update(i, rewards_K)
  np.testing.assert_allclose(sampler.success_rate, [1, 0.75, 0.25, 0])
  n = 200_000
  counts_P = np.bincount(sampler.sample(n, iteration=0), minlength=4)
  w_P = np.array([0.0, 0.25, 0.75, 1.0]) + eps
  p_P = w_P / w_P.sum()
  # 6 sigma of the binomial: with a fixed seed this cannot flake, and it
  # is tight enough (~0.5% absolute) to catch a wrong weighting.
  sigma_P = np.sqrt(n * p_P * (1 - p_P))
  assert np.all(np.abs(counts_P - n * p_P) < 6 * sigma_P), (counts_P, n * p_P)


def test_without_replacement_no_duplicates_and_fill():
  cfg = PromptSamplerConfig(mode="prioritized", eps=0.05)
  sampler = PromptSampler(_meta(10), cfg, seed=0)
  batch = sampler.sample(7, iteration=0)
  assert len(set(batch)) == 7
  batch = sampler.sample(23, iteration=0)  # > 10 prompts: 2 full rounds + 3
  counts = np.bincount(batch, minlength=10)
  assert len(batch) == 23 and counts.min() >= 2 and counts.max() <= 3
  assert sampler.sample(0, iteration=0) == []


def test_unseen_prompts_get_init_value_and_ema_updates():
  cfg = PromptSamplerConfig(init_success=0.3, stat="ema", ema_rate=0.5)
  sampler = PromptSampler(_meta(3), cfg)
  np.testing.assert_allclose(sampler.success_rate, [0.3, 0.3, 0.3])
  sampler.update(1, [1.0, 0.0, 0.0, 0.0])  # first group replaces init
  sampler.update(1, [1.0, 1.0, 1.0, 1.0])  # EMA: 0.5 * 0.25 + 0.5 * 1
  sampler.update_groups([2], [[True, False]])
  np.testing.assert_allclose(sampler.success_rate, [0.3, 0.625, 0.5])


def test_success_is_correctness_not_a_reward_threshold():
  """The sampler takes `rewards.is_correct` of each sample: a verifier score
  of 0.9 (e.g. 9 of 10 code tests) is a failure for the reward, so it must
  not count as a success here (it did with the old 0.5 threshold)."""
  from kimi_jax.rl import rewards
  sampler = PromptSampler(_meta(2))
  scores_K = np.array([0.9, 0.6, 1.0, 0.0])
  with pytest.raises(ValueError, match="correct_k must be booleans"):
    sampler.update(0, scores_K)
  sampler.update(1, rewards.is_correct(scores_K))
  np.testing.assert_allclose(sampler.success_rate[1], 0.25)


def test_uniform_mode_ignores_stats():
  cfg = PromptSamplerConfig(mode="uniform", replace=True)
  sampler = PromptSampler(_meta(4), cfg, seed=7)
  sampler.update(0, [1, 1, 1, 1])
  n = 40_000
  counts_P = np.bincount(sampler.sample(n, 0), minlength=4)
  sigma = np.sqrt(n * 0.25 * 0.75)
  assert np.all(np.abs(counts_P - n / 4) < 6 * sigma), counts_P


def test_all_solved_with_zero_eps_falls_back_to_uniform():
  cfg = PromptSamplerConfig(eps=0.0)
  sampler = PromptSampler(_meta(3), cfg)
  for i in range(3):
    sampler.update(i, [1, 1])
  assert sorted(sampler.sample(3, 0)) == [0, 1, 2]


def test_two_phase_curriculum():
  difficulty = [0.1, 0.2, 0.8, 0.9, 0.95]
  cfg = PromptSamplerConfig(curriculum="two_phase", hard_from_iteration=24,
                            hard_min_difficulty=0.8, replace=True)
  sampler = PromptSampler(_meta(5, difficulty), cfg, seed=1)
  early = sampler.sample(500, iteration=23)
  late = sampler.sample(500, iteration=24)
  assert set(early) == {0, 1, 2, 3, 4}
  assert set(late) == {2, 3, 4}


def test_linear_curriculum_raises_max_difficulty():
  difficulty = np.linspace(0.0, 1.0, 11)
  cfg = PromptSamplerConfig(curriculum="linear", start_max_difficulty=0.2,
                            end_max_difficulty=1.0, ramp_iterations=8,
                            mode="uniform")
  sampler = PromptSampler(_meta(11, difficulty), cfg, seed=2)
  for it, max_d in [(0, 0.2), (4, 0.6), (8, 1.0), (100, 1.0)]:
    drawn = sampler.sample(30, iteration=it)
    assert max(difficulty[drawn]) <= max_d + 1e-9
    allowed = np.flatnonzero(difficulty <= max_d + 1e-9)
    assert set(drawn) == set(allowed.tolist())  # 30 >= allowed: all appear


def test_state_dict_round_trip_gives_identical_next_samples():
  cfg = PromptSamplerConfig(curriculum="two_phase", hard_from_iteration=3)
  a = PromptSampler(_meta(20), cfg, seed=42)
  for it in range(3):
    batch = a.sample(6, it)
    for i in batch:
      a.update(i, np.random.default_rng(i + it).integers(0, 2, 8))
  state = json.loads(json.dumps(a.state_dict()))
  b = PromptSampler(_meta(20), cfg, seed=999)
  b.load_state_dict(state)
  np.testing.assert_array_equal(a.success_rate, b.success_rate)
  for it in range(3, 6):
    assert a.sample(9, it) == b.sample(9, it)
    a.update(5, [1, 0])
    b.update(5, [1, 0])
  np.testing.assert_array_equal(a.success_rate, b.success_rate)


def test_load_state_dict_rejects_other_prompt_set():
  a = PromptSampler(_meta(5), PromptSamplerConfig())
  b = PromptSampler(_meta(6), PromptSamplerConfig())
  with pytest.raises(ValueError, match="prompts"):
    b.load_state_dict(a.state_dict())


@pytest.mark.parametrize("kwargs, field", [
    ({"eps": -0.1}, "eps"),
    ({"mode": "greedy"}, "mode"),
    ({"curriculum": "hard_first"}, "curriculum"),
    ({"init_success": 1.5}, "init_success"),
    ({"ema_rate": 0.0}, "ema_rate"),
    ({"ramp_iterations": 0}, "ramp_iterations"),
    ({"start_max_difficulty": 0.5, "end_max_difficulty": 0.1},
     "end_max_difficulty"),
])
def test_bad_config_values_raise(kwargs, field):
  with pytest.raises(ValueError, match=f"PromptSamplerConfig.{field}"):
    PromptSamplerConfig(**kwargs)


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="no prompt has difficulty"):
    PromptSampler(_meta(3, [0.1, 0.2, 0.3]),
                  PromptSamplerConfig(curriculum="two_phase",
                                      hard_min_difficulty=0.9))
  with pytest.raises(ValueError, match="difficulty"):
    PromptSampler([{"id": "a"}], PromptSamplerConfig(curriculum="linear"))
  with pytest.raises(ValueError, match="duplicate prompt id 'a'"):
    PromptSampler([{"id": "a"}, {"id": "a"}])
  sampler = PromptSampler([{"id": "a"}])  # no difficulty needed
  with pytest.raises(ValueError, match="prompt_idx"):
    sampler.update(3, [1.0])
  with pytest.raises(ValueError, match="n must be"):
    sampler.sample(-1, 0)
