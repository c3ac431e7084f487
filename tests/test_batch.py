"""Tests for kimi_jax/rl/batch.py: finished groups -> training minibatches.

Axis legend: G groups, K samples per group, N samples per minibatch, T tokens.
"""
import numpy as np
import pytest

from kimi_jax.rl import batch as batch_lib
from kimi_jax.rl import losses
from kimi_jax.sampling.finish import FinishReason
from kimi_jax.sampling.partial import Group, Trajectory


def traj(prompt, response, token_iter, *, sample_idx=0, group_id=0, logp=None):
  """A finished trajectory; `token_iter` gives each response token's iteration."""
  tokens = np.asarray(list(prompt) + list(response), np.int32)
  token_iter = np.asarray(token_iter, np.int32)
  assert len(token_iter) == len(response)
  logp = np.full(len(response), -1.0, np.float32) if logp is None else np.asarray(logp, np.float32)
  return Trajectory(prompt_idx=group_id, sample_idx=sample_idx, group_id=group_id,
                    tokens=tokens, prompt_len=len(prompt), logp=logp, token_iter=token_iter,
                    finish=FinishReason.EOS, age=int(token_iter.max() - token_iter.min()),
                    first_iteration=int(token_iter.min()), last_iteration=int(token_iter.max()))


def group(group_id, responses, iters):
  return Group(group_id, group_id, [traj([5, 6], r, it, sample_idx=k, group_id=group_id)
                                    for k, (r, it) in enumerate(zip(responses, iters))])


def test_advantages_are_group_advantages_std_normalised_on_request():
  groups = [group(0, [[7], [8], [9], [10]], [[1]] * 4), group(1, [[7]] * 4, [[1]] * 4)]
  rewards_GK = np.array([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]], np.float32)
  plain, = batch_lib.make_minibatches(groups, rewards_GK, minibatch_size=8, length=4,
                                      loss_segments="all", iteration=1)
  np.testing.assert_allclose(plain["advantages_NS"][:, 0], [0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0])
  normed, = batch_lib.make_minibatches(groups, rewards_GK, minibatch_size=8, length=4,
                                       loss_segments="all", iteration=1,
                                       advantage_std_norm=True)
  np.testing.assert_allclose(normed["advantages_NS"][:, 0],
                             losses.group_advantages(rewards_GK, std_normalise=True).reshape(-1))
  np.testing.assert_allclose(normed["advantages_NS"][:4, 0],
                             np.array([0.75, -0.25, -0.25, -0.25]) / np.sqrt(0.1875), rtol=1e-5)
  np.testing.assert_allclose(normed["rewards_NS"][:, 0], rewards_GK.reshape(-1))


def test_behaviour_logprobs_are_the_samplers_at_the_response_tokens():
  t = traj([5, 6, 7], [8, 9, 10], [2, 2, 4], logp=[-0.5, -1.5, -2.5])
  mb, = batch_lib.make_minibatches([Group(0, 0, [t])], np.zeros((1, 1)), minibatch_size=2,
                                   length=8, loss_segments="all", iteration=4)
  np.testing.assert_array_equal(mb["behaviour_logp_NT"],
                                [[0, 0, 0, -0.5, -1.5, -2.5, 0, 0], [0] * 8])


def test_loss_segments_rule_for_a_group_that_waited():
  """Training at iteration 5 a group whose sample 0 finished at iteration 3
  (one segment drawn at 3) and whose sample 1 spans iterations 3 and 5: only
  the iteration-5 tokens were drawn by the policy being trained from."""
  grp = Group(0, 0, [traj([5, 6], [7, 8, 9], [3, 3, 3], sample_idx=0),
                     traj([5, 6], [7, 8, 9, 10], [3, 3, 5, 5], sample_idx=1)])
  want = {"all": [[0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]],
          "current_iteration": [[0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1]],
          "last_segment": [[0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 1, 1]]}
  for rule, mask in want.items():
    mb, = batch_lib.make_minibatches([grp], np.array([[1.0, 0.0]]), minibatch_size=2, length=6,
                                     loss_segments=rule, iteration=5)
    np.testing.assert_array_equal(mb["mask_NT"], mask, err_msg=rule)
    # Sample 0 still counts: it sets the baseline and the mean's denominator.
    np.testing.assert_array_equal(mb["sample_mask_NS"], [[1], [1]])
  with pytest.raises(ValueError, match="loss_segments must be one of"):
    batch_lib.make_minibatches([grp], np.zeros((1, 2)), minibatch_size=2, length=6,
                               loss_segments="current", iteration=5)


def test_loss_segments_setting_default_and_old_key():
  from configs import arith_tiny
  from kimi_jax.rl import settings
  config = arith_tiny.get_config()
  assert settings.from_config(config).rl.loss_segments == "all"
  del config.rl["loss_segments"]
  assert settings.from_config(config).rl.loss_segments == "current_iteration"
  config.rl.train_old_segments = True
  with pytest.raises(settings.ConfigError, match="train_old_segments was replaced by "
                     "config.rl.loss_segments: 'all' for train_old_segments=True"):
    settings.from_config(config)
  config = arith_tiny.get_config()
  config.rl.loss_segments = "newest"
  with pytest.raises(settings.ConfigError, match="config.rl: loss_segments must be one of"):
    settings.from_config(config)
