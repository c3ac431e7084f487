"""`scan_layers`: the two param forms convert (`layer_stack`), the model
inits, names axes, scores and decodes the same in both, and checkpoints of
one form restore into the other (params_io and the trainer's Checkpointer)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from kimi_jax.checkpointing import Checkpointer
from kimi_jax.models import layer_stack, params_io
from kimi_jax.models.transformer import (ModelConfig, Transformer, init_cache, init_params,
                                         param_logical_axes)
from kimi_jax.rl.update import UpdateConfig, make_optimizer

CFG = ModelConfig(vocab_size=61, hidden_size=16, intermediate_size=32, num_layers=3,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=64, qkv_bias=True)
SCAN = CFG.replace(scan_layers=True)


@pytest.fixture(scope="module")
def params():
  return init_params(CFG, jax.random.PRNGKey(0))


def _equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.shape == y.shape and x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------------ layer_stack


def test_stack_round_trip_on_jax_numpy_and_structs(params):
  stacked = layer_stack.stack_layers(params, 3)
  assert set(stacked) == {"embed", "final_norm", "lm_head", "layers"}
  assert stacked["layers"]["attn"]["q"].shape == (3, 16, 4, 4)
  np.testing.assert_array_equal(stacked["layers"]["mlp"]["up"][2], params["layers_2"]["mlp"]["up"])
  _equal(layer_stack.unstack_layers(stacked), params)
  host = jax.tree.map(np.asarray, params)
  host_stacked = layer_stack.stack_layers(host, 3)
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(host_stacked))
  _equal(layer_stack.unstack_layers(host_stacked), host)
  shapes = jax.eval_shape(lambda: params)
  assert layer_stack.stack_layers(shapes, 3) == jax.eval_shape(lambda: stacked)
  assert layer_stack.unstack_layers(jax.eval_shape(lambda: stacked)) == shapes


def test_struct_shardings_gain_and_lose_a_replicated_layers_dim():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("fsdp",))
  x = jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=NamedSharding(mesh, P("fsdp", None)))
  p = {"embed": x, "layers_0": {"w": x}, "layers_1": {"w": x}}
  stacked = layer_stack.stack_layers(p, 2)
  assert stacked["layers"]["w"].shape == (2, 8, 4)
  assert stacked["layers"]["w"].sharding.spec == P(None, "fsdp", None)
  assert layer_stack.unstack_layers(stacked)["layers_1"]["w"].sharding.spec == P("fsdp", None)


def test_conversions_are_checked(params):
  stacked = layer_stack.stack_layers(params, 3)
  with pytest.raises(ValueError, match="already stacked"):
    layer_stack.stack_layers(stacked, 3)
  with pytest.raises(ValueError, match="no stacked 'layers' subtree"):
    layer_stack.unstack_layers(params)
  with pytest.raises(ValueError, match=r"missing \['layers_3'\]"):
    layer_stack.stack_layers(params, 4)
  with pytest.raises(ValueError, match=r"unexpected \['layers_2'\]"):
    layer_stack.stack_layers(params, 2)
  with pytest.raises(ValueError, match="hold 3 stacked layers, expected 2"):
    layer_stack.unstack_layers(stacked, 2)
  with pytest.raises(ValueError, match="params hold 3 layers, the config 2"):
    layer_stack.to_layer_form(False, 2, params)


def test_to_layer_form_detects_the_form(params):
  stacked = layer_stack.stack_layers(params, 3)
  assert layer_stack.to_layer_form(False, 3, params) is params
  assert layer_stack.to_layer_form(True, 3, stacked) is stacked
  _equal(layer_stack.to_layer_form(True, 3, params), stacked)
  _equal(layer_stack.to_layer_form(False, 3, stacked), params)
  # Every params tree inside a bigger one: an optimizer state's moments.
  opt = make_optimizer(UpdateConfig())
  state = opt.init(params)
  converted = layer_stack.convert_tree(state, True, 3)
  _equal(converted, opt.init(stacked))
  assert layer_stack.form_of(converted) == (True, 3) and layer_stack.form_of([1]) is None


# ---------------------------------------------------------------------- model


def test_init_and_logical_axes_in_the_scanned_form(params):
  got = jax.eval_shape(lambda: init_params(SCAN, jax.random.PRNGKey(0)))
  assert got == layer_stack.stack_layers(jax.eval_shape(lambda: params), 3)
  axes, axes_scan = param_logical_axes(CFG), param_logical_axes(SCAN)
  assert axes_scan["embed"] == axes["embed"]
  for name in ("q", "q_bias", "o"):
    assert tuple(axes_scan["layers"]["attn"][name]) == ("layers",) + tuple(
        axes["layers_0"]["attn"][name])
  assert tuple(axes_scan["layers"]["mlp_norm"]["scale"]) == ("layers", "norm")


def test_scanned_model_scores_and_decodes_like_the_unrolled_one(params):
  """Forward logits, and greedy decoding through the KV cache (prefill then
  one token per call), on the scan path itself (generate() unrolls)."""
  stacked = layer_stack.stack_layers(params, 3)
  tokens = np.random.default_rng(0).integers(1, CFG.vocab_size, (2, 9)).astype(np.int32)

  def greedy(cfg, p, steps=5):
    model = Transformer(cfg)
    apply = jax.jit(lambda p, t, c: model.apply({"params": p}, t, cache=c))
    logits, cache = apply(p, tokens, init_cache(cfg, 2, 16))
    out, all_logits = [], [logits[:, -1]]
    for _ in range(steps):
      nxt = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)[:, None]
      out.append(np.asarray(nxt[:, 0]))
      logits, cache = apply(p, nxt, cache)
      all_logits.append(logits[:, -1])
    return np.stack(out, 1), np.stack(all_logits), cache

  full = jax.jit(lambda p: Transformer(CFG).apply({"params": p}, tokens))(params)
  full_scan = jax.jit(lambda p: Transformer(SCAN).apply({"params": p}, tokens))(stacked)
  np.testing.assert_allclose(full_scan, full, atol=1e-5)
  want, want_logits, want_cache = greedy(CFG, params)
  got, got_logits, got_cache = greedy(SCAN, stacked)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_allclose(got_logits, want_logits, atol=1e-5)
  assert len(got_cache.k) == 3 and int(got_cache.index) == int(want_cache.index) == 14
  for a, b in zip(got_cache.k + got_cache.v, want_cache.k + want_cache.v):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_generate_gives_the_same_tokens_in_both_forms(params):
  from kimi_jax.sampling import generate  # pylint: disable=import-outside-toplevel
  prompts = [[5, 6, 7, 8, 9, 10], [3], [4, 4, 4]]
  want = generate(CFG, params, prompts, 7)
  assert generate(SCAN, layer_stack.stack_layers(params, 3), prompts, 7) == want


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("write_scanned", [False, True], ids=["unrolled_disk", "scanned_disk"])
def test_orbax_model_restores_into_either_form(tmp_path, params, write_scanned):
  stacked = layer_stack.stack_layers(params, 3)
  params_io.save_orbax(SCAN if write_scanned else CFG, stacked if write_scanned else params,
                       tmp_path / "m")
  src = params_io.resolve(tmp_path / "m")
  for cfg, want in ((SCAN, stacked), (CFG, params)):
    got_cfg, got = params_io.load_params(src, cfg)
    assert got_cfg == cfg
    _equal(got, want)
    like = jax.eval_shape(lambda c=cfg: init_params(c, jax.random.PRNGKey(0)))
    _equal(params_io.restore_params(tmp_path / "m" / params_io.PARAMS_NAME, like), want)
  # load_orbax: the form of the config it was written with.
  _equal(params_io.load_orbax(tmp_path / "m")[1], stacked if write_scanned else params)


def test_checkpointer_step_restores_params_and_moments_into_the_other_form(tmp_path, params):
  opt = make_optimizer(UpdateConfig())
  opt_state = opt.init(params)
  opt_state = jax.tree.map(lambda x: x + 0.5 if x.dtype == jnp.float32 else x, opt_state)
  with Checkpointer(tmp_path / "ckpt") as ckpt:
    ckpt.save(1, params=params, opt_state=opt_state, host_state={"it": 1})
  stacked = layer_stack.stack_layers(params, 3)
  with Checkpointer(tmp_path / "ckpt") as ckpt:
    got = ckpt.restore_or_none(params_like=stacked, opt_state_like=opt.init(stacked))
    _equal(got.params, stacked)
    _equal(got.opt_state, layer_stack.convert_tree(opt_state, True, 3))
    assert got.host_state["it"] == 1
    # And back: a scanned step written, an unrolled run resuming from it.
    ckpt.save(2, params=got.params, opt_state=got.opt_state, host_state={"it": 2})
    back = ckpt.restore(2, params_like=params, opt_state_like=opt.init(params))
  _equal(back.params, params)
  _equal(back.opt_state, opt_state)


def test_sharded_restore_into_the_other_form_lands_in_the_layout(tmp_path, params):
  """As the trainer's init_from: targets with the train layout's shardings."""
  from kimi_jax import parallel  # pylint: disable=import-outside-toplevel
  params_io.save_orbax(CFG, params, tmp_path / "m")
  layout = parallel.Layout.train(parallel.make_mesh(parallel.MeshConfig(2, 2, 2)), SCAN)
  like = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      parallel.param_shapes(SCAN), layout.params())
  _, got = params_io.load_params(params_io.resolve(tmp_path / "m"), SCAN, params_like=like)
  for x, s in zip(jax.tree.leaves(got), jax.tree.leaves(layout.params())):
    assert x.sharding == s
  _equal(got, layer_stack.stack_layers(params, 3))
