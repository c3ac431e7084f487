"""The feature-major decode step (generate's CPU path) against the model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax.models import attention, feature_major
from kimi_jax.models.transformer import (ModelConfig, RopeScaling, Transformer, init_cache,
                                         init_params)
from kimi_jax.sampling import SamplingConfig, sample_token

TINY = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2,
                   num_heads=4, num_kv_heads=2, max_position_embeddings=128)


def _perturbed_params(cfg, seed):
  # Norm scales and biases start at 1 and 0; perturb every leaf so that a
  # mix-up of any two weights (or a missed bias) changes the logits.
  params = init_params(cfg, jax.random.PRNGKey(seed))
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  return jax.tree_util.tree_unflatten(
      tree, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("cfg", [
    TINY,
    TINY.replace(qkv_bias=True, tie_embeddings=True, family="qwen2", num_kv_heads=1),
    TINY.replace(rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=16)),
], ids=["llama_gqa", "qwen2_tied_bias_mqa", "llama3_rope"])
@pytest.mark.parametrize("cpu_program", [False, True], ids=["einsum", "chunked"])
def test_decode_step_equals_the_model(cfg, cpu_program):
  # Several steps over a left-padded cache of 72 slots (long enough for the
  # chunked p.v of cpu_decode_program): logits and the updated cache.
  params = _perturbed_params(cfg, 3)
  model = Transformer(cfg)
  rng = np.random.default_rng(0)
  B, P, S = 3, 8, 72
  start = jnp.asarray([0, 3, 7], jnp.int32)
  prompt = jnp.asarray(rng.integers(1, cfg.vocab_size, (B, P)), jnp.int32)
  _, cache = model.apply({"params": params}, prompt, cache=init_cache(cfg, B, S, start=start))

  def step(fm, tokens, c):
    if cpu_program:
      with attention.cpu_decode_program():
        return feature_major.decode_step(cfg, fm, tokens, c)
    return feature_major.decode_step(cfg, fm, tokens, c)

  model_step = jax.jit(lambda c, t: model.apply({"params": params}, t[:, None], cache=c))
  fm_step = jax.jit(step)
  fm = jax.jit(feature_major.to_feature_major, static_argnums=0)(cfg, params)
  want_cache = got_cache = cache
  for i in range(4):
    tokens = jnp.asarray(rng.integers(1, cfg.vocab_size, B), jnp.int32)
    want, want_cache = model_step(want_cache, tokens)
    got, got_cache = fm_step(fm, tokens, got_cache)
    assert got.shape == (cfg.vocab_size, B) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got).T, np.asarray(want[:, 0]), atol=1e-5, rtol=0)
    for a, b in zip(jax.tree_util.tree_leaves(got_cache), jax.tree_util.tree_leaves(want_cache)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
  assert int(got_cache.index) == P + 4


def test_weight_layout_is_out_by_in_in_the_compute_dtype():
  cfg = TINY.replace(qkv_bias=True, dtype="bfloat16")
  params = init_params(cfg, jax.random.PRNGKey(0))
  fm = feature_major.to_feature_major(cfg, params)
  layer = fm["layers"][1]
  D, F, E = cfg.hidden_size, cfg.intermediate_size, cfg.head_size
  assert layer["q"].shape == (cfg.num_heads * E, D)
  assert layer["k"].shape == layer["v"].shape == (cfg.num_kv_heads * E, D)
  assert layer["k_bias"].shape == (cfg.num_kv_heads * E, 1)
  assert layer["o"].shape == (D, cfg.num_heads * E)
  assert layer["gate"].shape == layer["up"].shape == (F, D) and layer["down"].shape == (D, F)
  assert fm["head"].shape == (cfg.vocab_size, D)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(fm))
  np.testing.assert_array_equal(
      np.asarray(layer["gate"], np.float32),
      np.asarray(params["layers_1"]["mlp"]["gate"].astype(jnp.bfloat16), np.float32).T)


@pytest.mark.parametrize("sampling", [
    SamplingConfig(), SamplingConfig(temperature=0.7), SamplingConfig(temperature=1.0, top_k=5),
    SamplingConfig(temperature=1.0, top_p=0.8)], ids=["greedy", "temp", "top_k", "top_p"])
def test_sampling_vocab_first_logits_draws_the_same_tokens(sampling):
  logits_BV = jnp.asarray(np.random.default_rng(0).standard_normal((6, 50)) * 3, jnp.float32)
  key = jax.random.PRNGKey(4)
  want = sample_token(logits_BV, key, sampling)
  got = jax.jit(lambda x, k: sample_token(x, k, sampling, vocab_first=True))(logits_BV.T, key)
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_allclose(got[1], want[1], rtol=1e-6)
