"""Packed RL update (rl.samples_per_row > 1): the same loss and gradients as
one padded sample per row, for every loss, from the reductions to a full
train step through the model.

Axis legend: G groups, K samples per group, N rows, T tokens per row, S
sample slots per row.

Tolerances: the loss-level tests compare the same float32 terms summed in
another order (rtol 1e-6). Through the model, a packed row's attention also
sums exact zeros for the other samples' keys and its matmuls see other
shapes: loss rtol 1e-5, gradients rtol 1e-4 with atol 1e-6 of entries near 0.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kimi_jax.compile_count import total_compiles
from kimi_jax.models.transformer import ModelConfig, init_params
from kimi_jax.rl import batch as batch_lib
from kimi_jax.rl import losses
from kimi_jax.rl.update import (TrainState, UpdateConfig, make_ref_logprobs, make_train_step,
                                token_logprobs)
from kimi_jax.sampling.finish import FinishReason
from kimi_jax.sampling.partial import Group, Trajectory

CFG = ModelConfig(vocab_size=37, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=64)
G, K, T, S = 3, 4, 16, 4
ROWS, MICRO = G * K, 4


def make_groups(seed):
  """G groups of K samples: prompts of 2-4 tokens, responses of 1-9 whose
  tokens come from iterations 6 and 7 (some carried over)."""
  rng = np.random.default_rng(seed)
  groups = []
  for g in range(G):
    prompt = rng.integers(3, CFG.vocab_size, rng.integers(2, 5)).tolist()
    trajs = []
    for k in range(K):
      n = int(rng.integers(1, 10))
      tokens = np.asarray(prompt + rng.integers(3, CFG.vocab_size, n).tolist(), np.int32)
      token_iter = np.where(np.arange(n) < n // 2, 6, 7).astype(np.int32)
      trajs.append(Trajectory(prompt_idx=g, sample_idx=k, group_id=g, tokens=tokens,
                              prompt_len=len(prompt), logp=-rng.uniform(0.1, 3, n).astype(np.float32),
                              token_iter=token_iter, finish=FinishReason.EOS, age=1,
                              first_iteration=6, last_iteration=7))
    groups.append(Group(g, g, trajs))
  return groups, rng.normal(size=(G, K)).astype(np.float32)


def layouts(groups, rewards_GK, loss_segments="current_iteration"):
  """(one sample per row, packed) minibatches of the same samples."""
  kw = dict(minibatch_size=ROWS, loss_segments=loss_segments, iteration=7, length=T,
            advantage_std_norm=True)
  one, = batch_lib.make_minibatches(groups, rewards_GK, samples_per_row=1, **kw)
  packed, = batch_lib.make_minibatches(groups, rewards_GK, samples_per_row=S, **kw)
  return one, packed


def where_packed(groups):
  """(row, start, slot) of each sample in the packed layout, as make_minibatches packs."""
  lengths = [len(t.tokens) for g in groups for t in g.trajectories]
  return batch_lib.pack(lengths, ROWS, T, S), lengths


def to_packed(x_NT, groups):
  """Values of one-sample rows [N, T] moved to where the packed layout has those tokens."""
  out = np.zeros((ROWS, T), np.float32)
  where, lengths = where_packed(groups)
  for i, ((row, start, _), n) in enumerate(zip(where, lengths)):
    out[row, start:start + n] = x_NT[i, :n]
  return out


def as_batch(mb, ref_logp_NT):
  return batch_lib.to_batch({k: jnp.asarray(v) for k, v in mb.items()}, jnp.asarray(ref_logp_NT))


def test_pack_fills_rows_from_the_front_longest_first():
  where = batch_lib.pack([3, 9, 4, 2, 8], rows=5, length=12, samples_per_row=2)
  # Longest first: 9 -> row 0; 8 -> row 1 (row 0 has 3 left); 4 -> row 1 (4 left);
  # 3 -> row 0; 2 -> row 2 (rows 0 and 1 hold 2 samples each).
  assert where == [(0, 9, 1), (0, 0, 0), (1, 8, 1), (2, 0, 0), (1, 0, 0)]
  assert batch_lib.pack([3, 9], rows=2, length=12, samples_per_row=1) == [(0, 0, 0), (1, 0, 0)]
  with pytest.raises(ValueError, match="does not fit the training length 12"):
    batch_lib.pack([13], rows=2, length=12, samples_per_row=2)
  with pytest.raises(ValueError, match="3 samples do not fit 1 rows of 2 samples"):
    batch_lib.pack([1, 1, 1], rows=1, length=12, samples_per_row=2)


def test_packed_minibatch_holds_each_sample_once_with_its_positions():
  groups, rewards_GK = make_groups(0)
  one, packed = layouts(groups, rewards_GK)
  where, lengths = where_packed(groups)
  samples = [t for g in groups for t in g.trajectories]
  for i, ((row, start, slot), n, t) in enumerate(zip(where, lengths, samples)):
    span = slice(start, start + n)
    np.testing.assert_array_equal(packed["tokens_NT"][row, span], t.tokens)
    np.testing.assert_array_equal(packed["positions_NT"][row, span], np.arange(n))
    np.testing.assert_array_equal(packed["segment_ids_NT"][row, span], slot + 1)
    for key in ("mask_NT", "behaviour_logp_NT"):
      np.testing.assert_array_equal(packed[key][row, span], one[key][i, :n])
    for key in ("rewards_NS", "advantages_NS", "sample_mask_NS"):
      assert packed[key][row, slot] == one[key][i, 0]
  assert packed["sample_mask_NS"].sum() == one["sample_mask_NS"].sum() == G * K
  assert (packed["segment_ids_NT"] > 0).sum() == sum(lengths)
  used_rows = (packed["segment_ids_NT"] > 0).any(axis=1)
  assert used_rows.sum() < ROWS and not used_rows[used_rows.argmin():].any()  # a front block


@pytest.mark.parametrize("cfg", [
    losses.LossConfig(),
    losses.LossConfig(form="gradient", normalisation="token", tau=0.3),
    losses.LossConfig(normalisation="fixed"),
    losses.LossConfig(algorithm="rest"),
    losses.LossConfig(algorithm="ppo", normalisation="token", kl_coef=0.1),
], ids=["k15", "k15-gradient-token", "k15-fixed", "rest", "ppo-kl"])
def test_losses_reduce_per_sample_over_packed_rows(cfg):
  """Same token log-probs, placed unpacked or packed: same loss, same
  gradient for every token, same diagnostics."""
  groups, rewards_GK = make_groups(1)
  one, packed = layouts(groups, rewards_GK, loss_segments="all")
  rng = np.random.default_rng(2)
  logp_NT = -rng.uniform(0.1, 3, (ROWS, T)).astype(np.float32)
  ref_NT = (logp_NT + rng.normal(0, 0.2, (ROWS, T))).astype(np.float32)
  one_b = as_batch(one, ref_NT)
  packed_b = as_batch(packed, to_packed(ref_NT, groups))

  def loss(lp, b):
    return losses.policy_loss(cfg, lp, b, return_aux=True)

  (l1, aux1), g1 = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(logp_NT), one_b)
  (l2, aux2), g2 = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(to_packed(logp_NT, groups)),
                                                          packed_b)
  assert float(l1) != 0.0
  np.testing.assert_allclose(l2, l1, rtol=1e-6)
  np.testing.assert_allclose(g2, to_packed(np.asarray(g1), groups), rtol=1e-6, atol=1e-9)
  for key in aux1:
    np.testing.assert_allclose(aux2[key], aux1[key], rtol=1e-5, atol=1e-7, err_msg=key)


@pytest.fixture(scope="module")
def params():
  return init_params(CFG, jax.random.PRNGKey(0))


def sgd():
  return optax.apply_if_finite(optax.sgd(1.0), max_consecutive_errors=1_000_000)


def step_once(step, params, batch, ref_is_current=False):
  """One step at SGD lr 1: returns (metrics, params delta = -gradient)."""
  state = TrainState(params=jax.tree.map(jnp.copy, params), opt_state=sgd().init(params),
                     step=jnp.zeros((), jnp.int32), skipped=jnp.zeros((), jnp.int32))
  state, metrics = step(state, batch, ref_is_current=ref_is_current)
  return metrics, jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), state.params, params)


@pytest.mark.parametrize("algorithm", ["k15", "ppo"])
def test_train_step_packed_equals_unpacked(params, algorithm):
  """Through the model: token log-probs of packed rows (positions, segment
  ids) equal the unpacked ones, and so do the reference pass, the loss, the
  gradient and its norm; the packed step computes fewer microbatches."""
  groups, rewards_GK = make_groups(3)
  one, packed = layouts(groups, rewards_GK)
  ref = make_ref_logprobs(CFG, MICRO)
  ref_one = ref(params, one["tokens_NT"], one["positions_NT"], one["segment_ids_NT"])
  ref_packed = ref(params, packed["tokens_NT"], packed["positions_NT"], packed["segment_ids_NT"])
  response = lambda mb: mb["mask_NT"] > 0  # noqa: E731  # scored tokens, not prompt starts
  np.testing.assert_allclose(np.asarray(ref_packed)[response(packed)],
                             to_packed(np.asarray(ref_one), groups)[response(packed)],
                             rtol=1e-5, atol=1e-6)
  cfg = losses.LossConfig(algorithm=algorithm, tau=0.5)
  step = make_train_step(CFG, cfg, UpdateConfig(microbatch_size=MICRO, clip_norm=1e6), sgd())
  # Perturbed reference / behaviour: the loss depends on more than the advantages.
  m1, d1 = step_once(step, params, as_batch(one, ref_one - 0.05))
  m2, d2 = step_once(step, params, as_batch(packed, to_packed(np.asarray(ref_one) - 0.05, groups)))
  assert float(m1["train/grad_norm"]) > 0
  np.testing.assert_allclose(m2["train/loss"], m1["train/loss"], rtol=1e-5)
  np.testing.assert_allclose(m2["train/grad_norm"], m1["train/grad_norm"], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(d2), jax.tree.leaves(d1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  tokens = sum(len(t.tokens) for g in groups for t in g.trajectories)
  assert float(m1["train/tokens_in_samples"]) == float(m2["train/tokens_in_samples"]) == tokens
  live = (packed["segment_ids_NT"] > 0).reshape(-1, MICRO, T).any(axis=(1, 2)).sum()
  assert float(m2["train/tokens_computed"]) == live * MICRO * T < float(m1["train/tokens_computed"])


def test_first_step_reference_and_no_recompile_across_packings(params):
  """The iteration's first step (reference = own forward) on packed rows, and
  a second minibatch packed differently: same shapes, no new compilation."""
  step = make_train_step(CFG, losses.LossConfig(), UpdateConfig(microbatch_size=MICRO), sgd())
  batches = []
  for seed in (4, 5):
    _, packed = layouts(*make_groups(seed))
    batches.append(as_batch(packed, np.zeros((ROWS, T), np.float32)))
  assert not np.array_equal(batches[0].segment_ids_NT, batches[1].segment_ids_NT)
  m, _ = step_once(step, params, batches[0], ref_is_current=True)
  np.testing.assert_allclose(m["train/log_ratio_abs_mean"], 0.0, atol=1e-6)  # l = 0 at theta_i
  before = total_compiles()
  step_once(step, params, batches[1], ref_is_current=True)
  assert total_compiles() == before


def test_dpo_loss_over_packed_rows(params):
  """DPO's sequence log-probs from packed rows (chosen and rejected responses
  sharing rows) give the unpacked loss and parameter gradients."""
  groups, _ = make_groups(6)
  one, packed = layouts(groups, np.zeros((G, K), np.float32), loss_segments="all")
  pairs = np.array([[0, 1], [4, 6], [9, 11]])  # (chosen, rejected) sample indices
  where, _ = where_packed(groups)

  def dpo(p, mb, index):
    logp_NT = token_logprobs(CFG, p, jnp.asarray(mb["tokens_NT"]),
                             positions_NT=jnp.asarray(mb["positions_NT"]),
                             segment_ids_NT=jnp.asarray(mb["segment_ids_NT"]))
    seq = losses.reduce_tokens(logp_NT, jnp.asarray(mb["mask_NT"]),
                               segment_ids=jnp.asarray(mb["segment_ids_NT"]),
                               num_samples=mb["sample_mask_NS"].shape[1])
    seq_P2 = seq[index[..., 0], index[..., 1]]
    ref_P2 = jax.lax.stop_gradient(seq_P2) + 0.3 * jnp.asarray([[1.0, -1.0]])
    return losses.dpo_loss(seq_P2[:, 0], seq_P2[:, 1], ref_P2[:, 0], ref_P2[:, 1], 0.5)

  index_one = np.stack([pairs, np.zeros_like(pairs)], axis=-1)
  index_packed = np.array([[[where[i][0], where[i][2]] for i in pair] for pair in pairs])
  l1, g1 = jax.value_and_grad(dpo)(params, one, index_one)
  l2, g2 = jax.value_and_grad(dpo)(params, packed, index_packed)
  np.testing.assert_allclose(l2, l1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
