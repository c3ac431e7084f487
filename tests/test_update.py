"""RL update tests: microbatch accumulation, reference log-probs, non-finite guard."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kimi_jax.models.transformer import ModelConfig, init_params
from kimi_jax.rl import losses
from kimi_jax.rl.batch import Batch
from kimi_jax.rl.update import (TrainState, UpdateConfig, make_optimizer, make_ref_logprobs,
                                make_train_step, set_learning_rate, token_logprobs)

CFG = ModelConfig(vocab_size=37, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=64)
N, T = 8, 12


def make_batch(params, seed=0):
  """N one-sample rows of T tokens (segment 1 everywhere); the last sample
  has sample_mask 0."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, CFG.vocab_size, (N, T)).astype(np.int32)
  mask = np.zeros((N, T), np.float32)
  mask[:, 4:] = 1.0
  mask[1, 9:] = 0.0
  rewards = rng.integers(0, 2, N).astype(np.float32)
  advantages = losses.group_advantages(rewards.reshape(2, 4)).reshape(-1)
  ref = make_ref_logprobs(CFG, 4)(params, jnp.asarray(tokens))
  sample_mask = np.ones(N, np.float32)
  sample_mask[-1] = 0.0
  # On-policy: the sampler drew the tokens under the iteration-start params.
  return Batch(tokens_NT=jnp.asarray(tokens),
               positions_NT=jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (N, T)),
               segment_ids_NT=jnp.ones((N, T), jnp.int32), mask_NT=jnp.asarray(mask),
               ref_logp_NT=ref, behaviour_logp_NT=ref, rewards_NS=jnp.asarray(rewards)[:, None],
               advantages_NS=jnp.asarray(advantages)[:, None],
               sample_mask_NS=jnp.asarray(sample_mask)[:, None])


def fresh_state(params, opt):
  return TrainState(params=params, opt_state=opt.init(params), step=jnp.zeros((), jnp.int32),
                    skipped=jnp.zeros((), jnp.int32))


@pytest.fixture(scope="module")
def params():
  return init_params(CFG, jax.random.PRNGKey(0))


def test_token_logprobs_alignment(params):
  tokens = jnp.asarray([[3, 5, 7, 9]])
  logp = token_logprobs(CFG, params, tokens)
  from kimi_jax.models.transformer import Transformer
  logits = Transformer(CFG).apply({"params": params}, tokens)
  ref = jax.nn.log_softmax(logits, -1)[0, jnp.arange(3), tokens[0, 1:]]
  assert float(logp[0, 0]) == 0.0
  np.testing.assert_allclose(logp[0, 1:], ref, atol=1e-6)


def sgd():
  """Plain SGD at lr 1 behind the train step's non-finite guard: the update
  is minus the accumulated gradient (AdamW's g / (|g| + eps) would magnify
  the float rounding of near-zero entries)."""
  return optax.apply_if_finite(optax.sgd(1.0), max_consecutive_errors=1_000_000)


def step_gradient(step, params, batch, **kw):
  state, metrics = step(TrainState(params=jax.tree.map(jnp.copy, params),
                                   opt_state=sgd().init(params), step=jnp.zeros((), jnp.int32),
                                   skipped=jnp.zeros((), jnp.int32)), batch, **kw)
  return jax.tree.map(lambda a, b: np.asarray(b, np.float64) - np.asarray(a, np.float64),
                      state.params, params), metrics


@pytest.mark.parametrize("algorithm", ["k15", "rest", "ppo"])
def test_microbatch_accumulation_equals_full_batch(params, algorithm):
  """4 microbatches of 2 vs one of 8 give the same gradient.

  Tolerance: the two differ only in the order of float32 sums. A reordered
  sum of n terms moves by at most ~n * eps (eps = 1.2e-7) relative to its
  terms; the longest reductions here run over the N * T = 96 token rows and
  the 64-wide MLP, so 1e-3 of each leaf's norm bounds the rounding with a wide
  margin (seen: <= 2e-5 with 1 or 2 XLA threads), while any error in the
  microbatch weighting moves the gradient by >= 1/8 of its norm. Entrywise
  tolerances are not used: entries that nearly cancel have no relative bound.
  """
  batch = make_batch(params)
  loss_cfg = losses.LossConfig(algorithm=algorithm, tau=0.5)
  (g2, m2), (g8, m8) = (
      step_gradient(make_train_step(CFG, loss_cfg, UpdateConfig(microbatch_size=micro), sgd()),
                    params, batch) for micro in (2, 8))
  np.testing.assert_allclose(m2["train/loss"], m8["train/loss"], rtol=1e-4)
  np.testing.assert_allclose(m2["train/grad_norm"], m8["train/grad_norm"], rtol=1e-4)
  assert float(m8["train/grad_norm"]) > 0
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g2), jax.tree.leaves(g8)):
    assert np.linalg.norm(a - b) <= 1e-3 * np.linalg.norm(b), jax.tree_util.keystr(path)


def test_k15_step_gradient_is_reinforce_at_the_reference(params):
  """At the iteration's first step l = 0: loss = mean A^2, the update follows A * grad logp."""
  batch = make_batch(params)
  ucfg = UpdateConfig(microbatch_size=8)
  opt = make_optimizer(ucfg)
  step = make_train_step(CFG, losses.LossConfig(tau=0.5), ucfg, opt)
  _, metrics = step(fresh_state(jax.tree.map(jnp.copy, params), opt), batch)
  a = np.asarray(batch.advantages_NS)[:7]
  np.testing.assert_allclose(metrics["train/loss"], np.mean(a ** 2), rtol=1e-5)


def test_training_reduces_the_loss_and_lr_is_settable(params):
  batch = make_batch(params)
  ucfg = UpdateConfig(learning_rate=3e-3, microbatch_size=4)
  opt = make_optimizer(ucfg)
  step = make_train_step(CFG, losses.LossConfig(algorithm="rest"), ucfg, opt)
  state = fresh_state(jax.tree.map(jnp.copy, params), opt)
  state = state.replace(opt_state=set_learning_rate(state.opt_state, 1e-2))
  first = None
  for _ in range(15):
    state, metrics = step(state, batch)
    first = first if first is not None else float(metrics["train/loss"])
  assert float(metrics["train/loss"]) < 0.5 * first
  assert int(state.step) == 15 and int(state.skipped) == 0


def test_non_finite_update_is_skipped_and_counted(params):
  batch = make_batch(params)
  bad = batch.replace(advantages_NS=batch.advantages_NS.at[0].set(jnp.nan))
  ucfg = UpdateConfig(microbatch_size=4)
  opt = make_optimizer(ucfg)
  step = make_train_step(CFG, losses.LossConfig(), ucfg, opt)
  before = jax.tree.map(np.asarray, params)
  state, metrics = step(fresh_state(jax.tree.map(jnp.copy, params), opt), bad)
  assert int(state.skipped) == 1 and float(metrics["train/update_finite"]) == 0.0
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(before)):
    np.testing.assert_array_equal(a, b)
  state, _ = step(state, batch)  # a later finite batch updates again
  assert int(state.skipped) == 1
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params),
                                                      jax.tree.leaves(before)))


def test_bad_config_values():
  with pytest.raises(ValueError, match="microbatch_size"):
    UpdateConfig(microbatch_size=0)
  with pytest.raises(ValueError, match="learning_rate"):
    UpdateConfig(learning_rate=-1.0)


def test_first_step_reference_from_current_params_matches_explicit_reference(params):
  batch = make_batch(params)
  ucfg = UpdateConfig(microbatch_size=4)
  opt = make_optimizer(ucfg)
  step = make_train_step(CFG, losses.LossConfig(tau=0.5), ucfg, opt)
  explicit, m1 = step(fresh_state(jax.tree.map(jnp.copy, params), opt), batch)
  fused, m2 = step(fresh_state(jax.tree.map(jnp.copy, params), opt),
                   batch.replace(ref_logp_NT=jnp.zeros_like(batch.ref_logp_NT)),
                   ref_is_current=True)
  np.testing.assert_allclose(m1["train/loss"], m2["train/loss"], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(explicit.params), jax.tree.leaves(fused.params)):
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("algorithm", ["k15", "ppo"])
def test_update_raises_logp_of_above_baseline_samples(params, algorithm):
  """The direction check end to end: a few small steps move each sample's
  response log-prob the way the sign of its advantage says."""
  batch = make_batch(params, seed=3)
  ucfg = UpdateConfig(learning_rate=1e-3, microbatch_size=8)
  opt = make_optimizer(ucfg)
  step = make_train_step(CFG, losses.LossConfig(algorithm=algorithm, tau=0.1), ucfg, opt)
  state = fresh_state(jax.tree.map(jnp.copy, params), opt)
  for _ in range(3):
    state, _ = step(state, batch)
  seq = lambda p: np.asarray(jnp.sum(token_logprobs(CFG, p, batch.tokens_NT) * batch.mask_NT, 1))  # noqa: E731
  moved = seq(state.params) - seq(params)
  adv = np.asarray(batch.advantages_NS)[:, 0]
  live = (np.asarray(batch.sample_mask_NS)[:, 0] > 0) & (adv != 0)
  assert live.sum() >= 4
  assert np.all(np.sign(moved[live]) == np.sign(adv[live])), (moved, adv)
