"""Tests for kimi_jax/rl/losses.py against numpy and hand-computed values.

Axis legend: N samples, T tokens, G groups, K samples per group, P pairs.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax.rl import losses


def _random_batch(seed=0, g=3, k=4, t=7):
  rng = np.random.default_rng(seed)
  n = g * k
  logp_NT = np.log(rng.uniform(0.05, 1.0, (n, t))).astype(np.float32)
  ref_logp_NT = (logp_NT + rng.normal(0, 0.1, (n, t))).astype(np.float32)
  mask_NT = rng.uniform(size=(n, t)) < 0.7
  mask_NT[:, 0] = True
  rewards_GK = rng.integers(0, 2, (g, k)).astype(np.float32)
  baseline_GK = np.repeat(rewards_GK.mean(1, keepdims=True), k, axis=1)
  return (logp_NT, ref_logp_NT, mask_NT, rewards_GK.reshape(-1),
          baseline_GK.reshape(-1).astype(np.float32))


def _np_k15(logp, ref, mask, r, b, tau):
  """Direct numpy formula and its analytic gradient w.r.t. logp."""
  m = mask.astype(np.float64)
  l = (m * (logp.astype(np.float64) - ref)).sum(1)
  resid = (r - b) - tau * l
  loss = np.mean(resid**2)
  grad = (2.0 * resid * -tau / len(r))[:, None] * m
  return loss, grad


@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_k15_value_and_grad_match_numpy(tau):
  logp, ref, mask, r, b = _random_batch()
  loss, grad = jax.value_and_grad(losses.k15_loss)(logp, ref, mask, r, b, tau)
  np_loss, np_grad = _np_k15(logp, ref, mask, r, b, tau)
  np.testing.assert_allclose(loss, np_loss, rtol=1e-5)
  np.testing.assert_allclose(grad, np_grad, rtol=1e-4, atol=1e-7)


def test_k15_contract_keywords_and_jit():
  logp, ref, mask, r, b = _random_batch(1)
  direct = losses.k15_loss(logp=logp, ref_logp=ref, mask=mask, rewards=r,
                           baseline=b, tau=0.1)
  jitted = jax.jit(losses.k15_loss)(logp, ref, mask, r, b, 0.1)
  np.testing.assert_allclose(direct, jitted, rtol=1e-6)
  assert jnp.shape(direct) == ()


def test_rewards_minus_baseline_is_constant():
  logp, ref, mask, r, b = _random_batch(2)
  g_r, g_b = jax.grad(losses.k15_loss, argnums=(3, 4))(logp, ref, mask, r, b,
                                                      0.1)
  np.testing.assert_array_equal(g_r, 0.0)
  np.testing.assert_array_equal(g_b, 0.0)
  g_ref = jax.grad(losses.k15_loss, argnums=1)(logp, ref, mask, r, b, 0.1)
  np.testing.assert_array_equal(g_ref, 0.0)


@pytest.mark.parametrize("normalisation", losses.NORMALISATIONS)
@pytest.mark.parametrize("tau", [0.05, 0.5])
def test_squared_and_gradient_forms_agree_up_to_2tau(normalisation, tau):
  # Spec implementation note 2: grads of the two forms agree up to 2 tau.
  logp, ref, mask, r, b = _random_batch(3)
  g_sq = jax.grad(losses.k15_loss)(logp, ref, mask, r, b, tau,
                                   normalisation=normalisation)
  g_pg = jax.grad(losses.k15_loss)(logp, ref, mask, r, b, tau, form="gradient",
                                   normalisation=normalisation)
  np.testing.assert_allclose(g_sq, 2 * tau * g_pg, rtol=1e-4, atol=1e-7)


def test_first_step_is_reinforce_with_group_mean_baseline():
  # At l = 0 (logp == ref_logp): grad of the squared loss w.r.t. logp[n, t]
  # is -2 tau (r_n - b_n) mask[n, t] / N: REINFORCE with a group-mean baseline.
  logp_NT = np.array([[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0],
                      [-1.5, -0.1, -0.2], [-0.4, -0.4, -0.4]], np.float32)
  mask_NT = np.array([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]], bool)
  rewards_GK = np.array([[1.0, 0.0], [1.0, 1.0]], np.float32)
  baseline_N = np.asarray(losses.group_baseline(rewards_GK)).reshape(-1)
  np.testing.assert_allclose(baseline_N, [0.5, 0.5, 1.0, 1.0])
  tau = 0.2
  loss, grad = jax.value_and_grad(losses.k15_loss)(
      logp_NT, logp_NT, mask_NT, rewards_GK.reshape(-1), baseline_N, tau)
  # (0.5^2 + 0.5^2 + 0 + 0) / 4
  np.testing.assert_allclose(loss, 0.125, rtol=1e-6)
  expected = np.array([[-0.05, -0.05, 0.0], [0.05, 0.05, 0.05],
                       [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-8)


def test_hand_computed_log_ratio_term():
  # One sample, A = 0: loss = tau^2 l^2, dloss/dlogp_t = 2 tau^2 l mask_t.
  logp = np.array([[-1.0, -2.0, -3.0]], np.float32)
  ref = np.array([[-1.5, -2.0, -1.0]], np.float32)
  mask = np.array([[1.0, 1.0, 0.0]], np.float32)
  r = b = np.array([0.7], np.float32)
  loss, grad = jax.value_and_grad(losses.k15_loss)(logp, ref, mask, r, b, 0.5)
  # l = 0.5 + 0 = 0.5 (third token masked) -> loss = (0.5 * 0.5)^2
  np.testing.assert_allclose(loss, 0.0625, rtol=1e-6)
  np.testing.assert_allclose(grad, [[0.25, 0.25, 0.0]], rtol=1e-6)


def test_masked_tokens_get_zero_gradient_and_do_not_change_loss():
  logp, ref, mask, r, b = _random_batch(4)
  for form in losses.FORMS:
    loss_fn = lambda lp: losses.k15_loss(lp, ref, mask, r, b, 0.3, form=form)
    grad = jax.grad(loss_fn)(logp)
    assert np.all(np.asarray(grad)[~mask] == 0.0)
    assert np.any(np.asarray(grad)[mask] != 0.0)
    perturbed = np.where(mask, logp, logp - 5.0).astype(np.float32)
    np.testing.assert_allclose(loss_fn(perturbed), loss_fn(logp), rtol=1e-6)


def test_equal_rewards_give_zero_advantage():
  rewards_GK = np.array([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.3, 0.3, 0.3]])
  adv = losses.group_advantages(rewards_GK)
  np.testing.assert_array_equal(adv, 0.0)
  # With l = 0 as well, the loss and its gradient vanish.
  logp = np.full((9, 4), -1.0, np.float32)
  mask = np.ones((9, 4), bool)
  r = rewards_GK.reshape(-1).astype(np.float32)
  b = np.asarray(losses.group_baseline(rewards_GK)).reshape(-1)
  loss, grad = jax.value_and_grad(losses.k15_loss)(logp, logp, mask, r, b, 0.1)
  assert float(loss) == 0.0
  np.testing.assert_array_equal(grad, 0.0)


def test_group_baseline_shapes_and_leave_one_out():
  rewards_GK = np.array([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
  np.testing.assert_allclose(losses.group_baseline(rewards_GK),
                             [[0.5] * 4, [0.25] * 4])
  np.testing.assert_allclose(
      losses.group_baseline(rewards_GK, leave_one_out=True),
      [[1 / 3, 2 / 3, 2 / 3, 1 / 3], [1 / 3, 1 / 3, 1 / 3, 0.0]], rtol=1e-6)
  std = losses.group_advantages(rewards_GK, std_normalise=True)
  np.testing.assert_allclose(std[0], [1, -1, -1, 1], rtol=1e-4)


def test_token_normalisation_and_aux():
  logp, ref, mask, r, b = _random_batch(5)
  tau = 0.2
  loss, aux = losses.k15_loss(logp, ref, mask, r, b, tau, normalisation="token",
                              return_aux=True)
  m = mask.astype(np.float64)
  l = (m * (logp - ref)).sum(1) / m.sum(1)
  np.testing.assert_allclose(loss, np.mean((r - b - tau * l)**2), rtol=1e-5)
  np.testing.assert_allclose(aux["log_ratio_mean"], l.mean(), rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_allclose(aux["advantage_abs_mean"], np.abs(r - b).mean(),
                             rtol=1e-6)
  assert float(aux["tokens"]) == mask.sum()
  fixed = losses.k15_loss(logp, ref, mask, r, b, tau, normalisation="fixed")
  l_fixed = (m * (logp - ref)).sum(1) / logp.shape[1]
  np.testing.assert_allclose(fixed, np.mean((r - b - tau * l_fixed)**2),
                             rtol=1e-5)


def test_sample_mask_drops_padding_slots():
  logp, ref, mask, r, b = _random_batch(6)
  sample_mask = np.arange(len(r)) < 5
  masked = losses.k15_loss(logp, ref, mask, r, b, 0.1, sample_mask=sample_mask)
  sliced = losses.k15_loss(logp[:5], ref[:5], mask[:5], r[:5], b[:5], 0.1)
  np.testing.assert_allclose(masked, sliced, rtol=1e-6)


def test_bad_options_raise():
  logp, ref, mask, r, b = _random_batch(7)
  with pytest.raises(ValueError, match="form"):
    losses.k15_loss(logp, ref, mask, r, b, 0.1, form="cubic")
  with pytest.raises(ValueError, match="normalisation"):
    losses.k15_loss(logp, ref, mask, r, b, 0.1, normalisation="per_word")
  with pytest.raises(ValueError, match="tau"):
    losses.k15_loss(logp, ref, mask, r, b, -1.0)
  with pytest.raises(ValueError, match="shape"):
    losses.k15_loss(logp, ref[:, :3], mask, r, b, 0.1)
  with pytest.raises(ValueError, match="tau"):
    losses.LossConfig(tau=0.0)
  with pytest.raises(ValueError, match="algorithm.*'a2c'"):
    losses.LossConfig(algorithm="a2c")


def test_rest_loss_positive_only():
  logp = np.array([[-1.0, -2.0], [-3.0, -4.0], [-0.5, -0.5]], np.float32)
  mask = np.array([[1, 1], [1, 1], [1, 0]], bool)
  r = np.array([1.0, 0.0, 0.9], np.float32)
  loss, grad = jax.value_and_grad(losses.rest_loss)(logp, mask, r)
  np.testing.assert_allclose(loss, (3.0 + 0.5) / 2, rtol=1e-6)
  np.testing.assert_allclose(grad, [[-0.5, -0.5], [0, 0], [-0.5, 0]])
  # Nobody above threshold: zero loss, no NaN.
  assert float(losses.rest_loss(logp, mask, r, threshold=2.0)) == 0.0


def test_ppo_clip_loss_hand_values():
  # Two samples, one token each; behaviour logp 0 so ratio = exp(logp).
  logp = np.log(np.array([[1.5], [0.5]], np.float32))
  beh = np.zeros((2, 1), np.float32)
  mask = np.ones((2, 1), bool)
  adv = np.array([1.0, -1.0], np.float32)
  loss, aux = losses.ppo_clip_loss(logp, beh, mask, adv, clip_eps=0.2,
                                   return_aux=True)
  # A>0, ratio 1.5 -> clipped 1.2; A<0, ratio 0.5 -> min(-0.5, -0.8) = -0.8
  np.testing.assert_allclose(loss, -(1.2 - 0.8) / 2, rtol=1e-6)
  np.testing.assert_allclose(aux["clip_fraction"], 1.0)
  # On-policy (ratio 1): gradient is plain policy gradient -A / N.
  g = jax.grad(losses.ppo_clip_loss)(beh, beh, mask, adv)
  np.testing.assert_allclose(g, [[-0.5], [0.5]], rtol=1e-6)


def test_ppo_kl_needs_ref():
  logp, ref, mask, r, b = _random_batch(8)
  with pytest.raises(ValueError, match="ref_logp"):
    losses.ppo_clip_loss(logp, ref, mask, r - b, kl_coef=0.1)
  out = losses.ppo_clip_loss(logp, ref, mask, r - b, kl_coef=0.1, ref_logp=ref)
  assert np.isfinite(float(out))


def test_dpo_loss_hand_values():
  pc = np.array([-10.0, -5.0], np.float32)
  pr = np.array([-12.0, -4.0], np.float32)
  rc = np.array([-11.0, -5.0], np.float32)
  rr = np.array([-11.0, -5.0], np.float32)
  beta = 0.5
  loss, aux = losses.dpo_loss(pc, pr, rc, rr, beta, return_aux=True)
  margins = beta * np.array([(1.0) - (-1.0), 0.0 - 1.0])
  expected = np.mean(np.log1p(np.exp(-margins)))
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  np.testing.assert_allclose(aux["accuracy"], 0.5)
  g_ref = jax.grad(losses.dpo_loss, argnums=2)(pc, pr, rc, rr, beta)
  np.testing.assert_array_equal(g_ref, 0.0)


def _as_batch(logp, ref, mask, r, adv, behaviour=None):
  """One sample per row (segment 1 on every token), per-sample fields [N, 1]."""
  from kimi_jax.rl.batch import Batch
  n, t = logp.shape
  return Batch(tokens_NT=np.zeros((n, t), np.int32),
               positions_NT=np.tile(np.arange(t, dtype=np.int32), (n, 1)),
               segment_ids_NT=np.ones((n, t), np.int32), mask_NT=mask.astype(np.float32),
               ref_logp_NT=ref, behaviour_logp_NT=ref if behaviour is None else behaviour,
               rewards_NS=r[:, None], advantages_NS=adv[:, None],
               sample_mask_NS=np.ones((n, 1), np.float32))


@pytest.mark.parametrize("algorithm", losses.ALGORITHMS)
def test_policy_loss_dispatch(algorithm):
  """The one dispatcher picks the loss and feeds it the batch's fields."""
  logp, ref, mask, r, b = _random_batch(9)
  adv = losses.group_advantages(r.reshape(3, 4)).reshape(-1)
  cfg = losses.LossConfig(algorithm=algorithm, tau=0.3)
  batch = _as_batch(logp, ref, mask, r, adv)
  loss, aux = jax.jit(lambda lp, bt: losses.policy_loss(cfg, lp, bt, return_aux=True))(logp, batch)
  assert np.isfinite(float(loss)) and float(aux["loss"]) == float(loss)
  want = {"k15": lambda: losses.k15_loss(logp, ref, mask, r, b, 0.3),
          "rest": lambda: losses.rest_loss(logp, mask, r),
          "ppo": lambda: losses.ppo_clip_loss(logp, ref, mask, adv, normalisation="sequence")}
  np.testing.assert_allclose(loss, want[algorithm](), rtol=1e-6)


def test_ppo_ratio_is_to_the_behaviour_policy_and_kl_to_the_reference():
  """A segment carried over from an older iteration was drawn by an older
  policy: its recorded behaviour log-probs, not the iteration-start policy,
  are the denominator of PPO's ratio; the KL term still anchors to the
  iteration-start policy (the reference)."""
  logp, _, mask, r, _ = _random_batch(11)
  adv = losses.group_advantages(r.reshape(3, 4)).reshape(-1)
  ref = logp  # the first step of an iteration: theta = theta_i
  behaviour = (logp - 0.3).astype(np.float32)  # the old policy found these tokens less likely
  cfg = losses.LossConfig(algorithm="ppo", kl_coef=0.5)
  loss, aux = losses.policy_loss(cfg, logp, _as_batch(logp, ref, mask, r, adv, behaviour),
                                 return_aux=True)
  want = losses.ppo_clip_loss(logp, behaviour, mask, adv, normalisation="sequence")
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  np.testing.assert_allclose(aux["ratio_mean"], np.exp(0.3), rtol=1e-5)
  assert float(aux["kl"]) == 0.0  # theta == theta_i: no KL to the reference


def test_advantage_std_norm_reaches_the_k15_loss():
  """With advantage_std_norm the loss sees (r - r_bar) / std: at l = 0 the
  k1.5 loss is mean A^2, i.e. 1 per sample of a group with mixed rewards."""
  logp, _, mask, _, _ = _random_batch(10, g=2, k=4)
  rewards_GK = np.array([[1.0, 0.0, 0.0, 0.0], [0.2, 0.2, 0.2, 0.2]], np.float32)
  adv_GK = losses.group_advantages(rewards_GK, std_normalise=True)
  np.testing.assert_allclose(adv_GK[0], np.array([0.75, -0.25, -0.25, -0.25]) / np.sqrt(0.1875),
                             rtol=1e-5)
  np.testing.assert_array_equal(adv_GK[1], 0.0)
  batch = _as_batch(logp, logp, mask, rewards_GK.reshape(-1), adv_GK.reshape(-1))
  loss = losses.policy_loss(losses.LossConfig(advantage_std_norm=True), logp, batch)
  np.testing.assert_allclose(loss, 4 * 1.0 / 8, rtol=1e-4)


def test_options_an_algorithm_would_ignore_are_errors():
  with pytest.raises(ValueError, match="advantage_std_norm has no effect with algorithm='rest'"):
    losses.LossConfig(algorithm="rest", advantage_std_norm=True)
  with pytest.raises(ValueError, match="kl_coef applies to algorithm='ppo' only"):
    losses.LossConfig(algorithm="k15", kl_coef=0.1)
  assert losses.LossConfig(algorithm="ppo", kl_coef=0.1, advantage_std_norm=True).kl_coef == 0.1
