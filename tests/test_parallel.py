"""Mesh, layouts, sharded train step and sampler, reshard: on 8 fake CPU devices.

Equivalence tolerances (one device vs a mesh; only the reduction order of
float32 sums changes): loss rtol 1e-5, grad norm rtol 1e-4, updated params
atol 5e-5 after one AdamW step at lr 1e-2 (0.5% of the step; AdamW's
g / (|g| + eps) magnifies the rounding of near-zero gradient entries),
reference log-probs atol 1e-5, greedy tokens exactly equal.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from kimi_jax import parallel
from kimi_jax.models.transformer import ModelConfig, Transformer, init_params
from kimi_jax.rl import losses
from kimi_jax.rl.batch import Batch
from kimi_jax.rl.update import (TrainState, UpdateConfig, make_optimizer, make_ref_logprobs,
                                make_train_step, set_learning_rate)
from kimi_jax.sampling import generate
from kimi_jax.sampling.sampler import decode, SamplingConfig

# One layer keeps compiles short; every code path is per layer anyway.
CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=64)
N, T, MICRO = 16, 12, 8
MESHES = [(8, 1, 1), (2, 2, 2), (1, 4, 2)]


def mesh_of(shape):
  return parallel.make_mesh(parallel.MeshConfig(*shape))


@pytest.fixture(scope="module")
def params():
  return init_params(CFG, jax.random.PRNGKey(0))


def make_batch(seed=0):
  """Host (numpy) minibatch of N samples, two with sample_mask 0."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, CFG.vocab_size, (N, T)).astype(np.int32)
  mask = np.zeros((N, T), np.float32)
  mask[:, 4:] = 1.0
  rewards = rng.integers(0, 2, N).astype(np.float32)
  advantages = losses.group_advantages(rewards.reshape(4, 4)).reshape(-1)
  sample_mask = np.ones(N, np.float32)
  sample_mask[-2:] = 0.0
  return dict(tokens_NT=tokens, positions_NT=np.tile(np.arange(T, dtype=np.int32), (N, 1)),
              segment_ids_NT=np.ones((N, T), np.int32), mask_NT=mask,
              behaviour_logp_NT=np.zeros((N, T), np.float32), rewards_NS=rewards[:, None],
              advantages_NS=advantages[:, None], sample_mask_NS=sample_mask[:, None])


def test_mesh_config_resolves_and_names_both_numbers():
  assert parallel.MeshConfig(data=-1, fsdp=2, tensor=2).resolve(8) == (2, 2, 2)
  assert parallel.MeshConfig().resolve(8) == (8, 1, 1)
  with pytest.raises(ValueError, match=r"has 12 devices, but there are 8 devices"):
    parallel.make_mesh(parallel.MeshConfig(data=3, fsdp=2, tensor=2))
  with pytest.raises(ValueError, match=r"needs a multiple of 3 devices, but there are 8"):
    parallel.make_mesh(parallel.MeshConfig(data=-1, fsdp=3, tensor=1))
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    parallel.MeshConfig(data=-1, fsdp=-1)
  with pytest.raises(ValueError, match="MeshConfig.tensor"):
    parallel.MeshConfig(tensor=0)
  mesh = mesh_of((2, 2, 2))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}


@dataclasses.dataclass(frozen=True)
class FakeDevice:
  id: int
  slice_index: int
  platform: str = "cpu"
  device_kind: str = "cpu"


def test_multi_slice_puts_data_across_slices():
  devices = [FakeDevice(i, i // 4) for i in range(8)]
  grid = parallel.device_grid(parallel.MeshConfig(data=2, fsdp=2, tensor=2), devices)
  assert grid.shape == (2, 2, 2)
  assert {d.slice_index for d in grid[0].ravel()} == {0}
  assert {d.slice_index for d in grid[1].ravel()} == {1}
  with pytest.raises(ValueError, match="data=1 must be a multiple of the 2 slices"):
    parallel.device_grid(parallel.MeshConfig(data=1, fsdp=4, tensor=2), devices)


def test_rule_tables_give_fsdp_plus_tp_and_tp_only():
  mesh = mesh_of((1, 4, 2))
  train = parallel.Layout.train(mesh, CFG).params()
  sample = parallel.Layout.sample(mesh, CFG).params()
  spec = lambda tree, *path: tree[path[0]] if len(path) == 1 else spec(tree[path[0]], *path[1:])  # noqa: E731
  assert spec(train, "layers_0", "attn", "q").spec == P("fsdp", "tensor", None)
  assert spec(sample, "layers_0", "attn", "q").spec == P(None, "tensor", None)
  assert spec(train, "layers_0", "mlp", "down").spec == P("tensor", "fsdp")
  assert spec(sample, "layers_0", "mlp", "down").spec == P("tensor", None)
  assert train["lm_head"].spec == P("fsdp", "tensor")
  assert sample["embed"].spec == P("tensor", None)
  # A mesh axis that does not divide a dimension is dropped for it.
  odd = parallel.Layout.train(mesh, CFG.replace(vocab_size=37, num_kv_heads=1)).params()
  assert odd["lm_head"].spec == P("fsdp", None)
  assert odd["layers_0"]["attn"]["k"].spec == P("fsdp", None, None)
  cache = parallel.Layout.sample(mesh, CFG).kv_cache(8, 16)
  assert cache.k[0].spec == P(("data", "fsdp"), "tensor", None, None)
  assert cache.start.spec == P(("data", "fsdp"))


def test_sharded_init_equals_single_device_init(params):
  layout = parallel.Layout.train(mesh_of((2, 2, 2)), CFG)
  sharded = parallel.init_params(CFG, jax.random.PRNGKey(0), layout)
  for a, b, s in zip(jax.tree.leaves(sharded), jax.tree.leaves(params),
                     jax.tree.leaves(layout.params())):
    assert a.sharding == s
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def one_step(params, layout, ref_logp):
  """One k1.5 train step from `params`, as the trainer runs it (eager
  `optimizer.init` + `set_learning_rate`, host numpy batch)."""
  ucfg = UpdateConfig(learning_rate=1e-2, microbatch_size=MICRO, clip_norm=1e6)
  opt = make_optimizer(ucfg)
  step = make_train_step(CFG, losses.LossConfig(tau=0.5), ucfg, opt, layout=layout)
  state = TrainState(params=params, opt_state=set_learning_rate(opt.init(params), 1e-2),
                     step=jnp.zeros((), jnp.int32), skipped=jnp.zeros((), jnp.int32))
  return step(state, Batch(ref_logp_NT=ref_logp, **make_batch()))


@pytest.fixture(scope="module")
def single_device_step(params):
  """Reference log-probs and one step on one device (no layout)."""
  ref = make_ref_logprobs(CFG, MICRO)(params, make_batch()["tokens_NT"])
  # A perturbed reference makes the k1.5 loss depend on more than rewards.
  state, metrics = one_step(jax.tree.map(jnp.copy, params), None, ref + 0.01)
  return np.asarray(ref), jax.device_get(state.params), jax.device_get(metrics)


@pytest.mark.parametrize("shape", MESHES)
def test_train_step_under_mesh_matches_one_device(params, single_device_step, shape):
  ref1, params1, metrics1 = single_device_step
  layout = parallel.Layout.train(mesh_of(shape), CFG)
  # A copy: device_put may reuse the device-0 buffer, and the step donates.
  sharded = jax.device_put(jax.tree.map(jnp.copy, params), layout.params())
  state, metrics = one_step(sharded, layout, ref1 + 0.01)  # host batch, placed by the step
  assert float(metrics["train/loss"]) > 0
  np.testing.assert_allclose(metrics["train/loss"], metrics1["train/loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics["train/grad_norm"], metrics1["train/grad_norm"], rtol=1e-4)
  for a, b, s in zip(jax.tree.leaves(state.params), jax.tree.leaves(params1),
                     jax.tree.leaves(layout.params())):
    assert a.sharding == s
    np.testing.assert_allclose(np.asarray(a), b, atol=5e-5)
  assert not np.allclose(params1["lm_head"], np.asarray(params["lm_head"]))
  mu = state.opt_state.inner_state[1].inner_state[0].mu
  assert mu["layers_0"]["mlp"]["up"].sharding == layout.params()["layers_0"]["mlp"]["up"]


def test_ref_logprobs_under_mesh_match_one_device(params, single_device_step):
  layout = parallel.Layout.train(mesh_of((2, 2, 2)), CFG)
  ref = make_ref_logprobs(CFG, MICRO, layout)(jax.device_put(params, layout.params()),
                                              make_batch()["tokens_NT"])
  assert ref.sharding == layout.batch()
  np.testing.assert_allclose(np.asarray(ref), single_device_step[0], atol=1e-5)


def test_batch_that_does_not_divide_the_data_axes_is_a_clear_error(params):
  layout = parallel.Layout.train(mesh_of((8, 1, 1)), CFG)
  ucfg = UpdateConfig(microbatch_size=4)
  opt = make_optimizer(ucfg)
  step = make_train_step(CFG, losses.LossConfig(), ucfg, opt, layout=layout)
  b = {k: v[:12] for k, v in make_batch().items()}
  with pytest.raises(ValueError, match=r"minibatch of 12 rows does not divide over the 8 "):
    step(None, Batch(ref_logp_NT=np.zeros((12, T), np.float32), **b))  # checked before the state
  with pytest.raises(ValueError, match=r"microbatch of 4 rows does not divide over the 8 "):
    make_ref_logprobs(CFG, 4, layout)(params, b["tokens_NT"][:8])
  sample = parallel.Layout.sample(mesh_of((2, 2, 2)), CFG)
  with pytest.raises(ValueError, match=r"of 6 rows does not divide over the 4 data-parallel"):
    decode(params, np.ones((6, 8), np.int32), np.zeros(6, np.int32), np.int32(4), np.int32(-1),
           jax.random.PRNGKey(0), cfg=CFG, sampling=SamplingConfig(), new_slots=8, layout=sample)
  with pytest.raises(ValueError, match=r"RolloutState of 6 rows does not divide over the 4"):
    sample.rollout_state(6)


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 4, 2)])
def test_greedy_sampling_under_sample_layout_matches_one_device(params, shape):
  prompts = [[5, 7, 9], [1], [3, 4, 5, 6, 7, 8, 9, 10, 11], [2, 2], [8, 1, 6]]
  want, want_logp = generate(CFG, params, prompts, 10, return_logprobs=True)
  layout = parallel.Layout.sample(mesh_of(shape), CFG)
  sharded = parallel.reshard(params, layout)
  got, got_logp = generate(CFG, sharded, prompts, 10, return_logprobs=True, layout=layout)
  assert got == want
  for a, b in zip(got_logp, want_logp):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_reshard_round_trip_is_value_identical_with_expected_shardings(params):
  mesh = mesh_of((1, 4, 2))
  train, sample = parallel.Layout.train(mesh, CFG), parallel.Layout.sample(mesh, CFG)
  p_train = jax.device_put(jax.tree.map(jnp.copy, params), train.params())
  p_sample = parallel.reshard(p_train, sample)
  back = parallel.reshard(p_sample, train, donate=True)
  assert all(x.is_deleted() for x in jax.tree.leaves(p_sample))
  for layout, tree in ((sample, p_sample), (train, back)):
    for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(layout.params())):
      assert x.sharding == s
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert parallel.reshard_bytes(p_train, sample) > 0
  assert parallel.reshard_bytes(parallel.reshard(p_train, sample), train) == 0


def test_moved_bytes_by_hand():
  mesh = mesh_of((1, 4, 2))
  src, dst = NamedSharding(mesh, P("fsdp", "tensor")), NamedSharding(mesh, P(None, "tensor"))
  # [8, 4] float32: each device wants an [8, 2] block (16 values) and holds
  # the [2, 2] part of it (4 values): 12 values x 4 bytes x 8 devices.
  assert parallel.moved_bytes((8, 4), np.float32, src, dst) == 12 * 4 * 8
  assert parallel.moved_bytes((8, 4), np.float32, dst, src) == 0
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  assert parallel.moved_bytes((8, 4), np.float32, one, dst) == 7 * 16 * 4


def test_without_a_layout_nothing_is_constrained(params):
  ucfg = UpdateConfig(microbatch_size=MICRO)
  opt = make_optimizer(ucfg)
  step = make_train_step(CFG, losses.LossConfig(), ucfg, opt)
  state = TrainState(params=params, opt_state=opt.init(params), step=jnp.zeros((), jnp.int32),
                     skipped=jnp.zeros((), jnp.int32))
  batch = Batch(ref_logp_NT=np.zeros((N, T), np.float32), **make_batch())
  assert "sharding" not in step.lower(state, batch).as_text()
  layout = parallel.Layout.train(mesh_of((2, 2, 2)), CFG)
  text = jax.jit(lambda p, t: _forward_under(layout, p, t)).lower(params, batch.tokens_NT).as_text()
  assert "sharding_constraint" in text


def _forward_under(layout, params, tokens):
  with layout.activate():
    return Transformer(CFG).apply({"params": params}, tokens)


# ------------------------------------------------ scan_layers: params stacked [L, ...]

SCAN_CFG = CFG.replace(scan_layers=True)


def test_a_sample_layout_holds_the_model_unrolled():
  from kimi_jax.models import layer_stack  # pylint: disable=import-outside-toplevel
  mesh = mesh_of((1, 4, 2))
  cfg = CFG.replace(num_layers=2, scan_layers=True)
  sample = parallel.Layout.sample(mesh, cfg)
  assert sample.cfg == cfg.replace(scan_layers=False)
  assert parallel.Layout("sample", mesh, cfg) == sample
  train = parallel.Layout.train(mesh, cfg)
  params = parallel.init_params(cfg, jax.random.PRNGKey(0), train)
  there = parallel.reshard(params, sample)
  assert "layers_1" in there and "layers" not in there
  back = parallel.reshard(there, train, donate=True)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert layer_stack.is_scanned(back)


def test_scanned_params_shard_like_unrolled_ones_with_layers_replicated():
  from kimi_jax.models import layer_stack  # pylint: disable=import-outside-toplevel
  mesh = mesh_of((1, 4, 2))
  cfg = CFG.replace(num_layers=2)
  unrolled = parallel.Layout.train(mesh, cfg).params()
  scanned = parallel.Layout.train(mesh, cfg.replace(scan_layers=True)).params()
  assert jax.tree.structure(scanned) == jax.tree.structure(
      layer_stack.stack_layers(parallel.param_shapes(cfg), 2))
  for name in ("embed", "lm_head"):
    assert scanned[name] == unrolled[name]
  for path, s in jax.tree_util.tree_leaves_with_path(scanned["layers"]):
    one = unrolled["layers_1"]
    for key in path:
      one = one[key.key]
    assert s.spec == P(None, *one.spec), path


def test_scanned_sharded_init_and_train_step_match_one_device(params, single_device_step):
  from kimi_jax.models import layer_stack  # pylint: disable=import-outside-toplevel
  layout = parallel.Layout.train(mesh_of((2, 2, 2)), SCAN_CFG)
  sharded = parallel.init_params(SCAN_CFG, jax.random.PRNGKey(0), layout)
  for a, b, s in zip(jax.tree.leaves(sharded), jax.tree.leaves(init_params(
      SCAN_CFG, jax.random.PRNGKey(0))), jax.tree.leaves(layout.params())):
    assert a.sharding == s
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # One step from the unrolled test's weights, stacked: the same update.
  ref1, params1, metrics1 = single_device_step
  ucfg = UpdateConfig(learning_rate=1e-2, microbatch_size=MICRO, clip_norm=1e6)
  opt = make_optimizer(ucfg)
  step = make_train_step(SCAN_CFG, losses.LossConfig(tau=0.5), ucfg, opt, layout=layout)
  # A copy: the unstacked leaves are the fixture's own arrays, and the step donates.
  stacked = jax.device_put(layer_stack.stack_layers(jax.tree.map(jnp.copy, params), 1),
                           layout.params())
  state = TrainState(params=stacked, opt_state=set_learning_rate(opt.init(stacked), 1e-2),
                     step=jnp.zeros((), jnp.int32), skipped=jnp.zeros((), jnp.int32))
  state, metrics = step(state, Batch(ref_logp_NT=ref1 + 0.01, **make_batch()))
  np.testing.assert_allclose(metrics["train/loss"], metrics1["train/loss"], rtol=1e-5)
  for a, s in zip(jax.tree.leaves(state.params), jax.tree.leaves(layout.params())):
    assert a.sharding == s
  got = layer_stack.unstack_layers(jax.device_get(state.params))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params1)):
    np.testing.assert_allclose(np.asarray(a), b, atol=5e-5)


def test_scanned_greedy_sampling_under_sample_layout_matches_one_device(params):
  from kimi_jax.models import layer_stack  # pylint: disable=import-outside-toplevel
  prompts = [[5, 7, 9], [1], [3, 4, 5, 6, 7, 8, 9, 10, 11], [2, 2]]
  want = generate(CFG, params, prompts, 6)
  layout = parallel.Layout.sample(mesh_of((2, 2, 2)), SCAN_CFG)
  sharded = parallel.reshard(layer_stack.stack_layers(params, 1), layout)
  assert generate(SCAN_CFG, sharded, prompts, 6, layout=layout) == want
