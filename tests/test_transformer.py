"""Model tests: cached decode == full forward, logical axes, dtypes, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax.models.transformer import (ModelConfig, RopeScaling, Transformer, init_cache,
                                         init_params, param_logical_axes)

TINY = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=2,
                   num_heads=4, num_kv_heads=2, max_position_embeddings=64)


@pytest.mark.parametrize("cfg", [
    TINY,
    TINY.replace(qkv_bias=True, tie_embeddings=True, family="qwen2", rope_theta=1e6),
    TINY.replace(rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=16)),
], ids=["llama_gqa", "qwen2_tied_bias", "llama3_rope"])
def test_incremental_decode_matches_full_forward(cfg):
  params = init_params(cfg, jax.random.PRNGKey(1))
  model = Transformer(cfg)
  rng = np.random.default_rng(0)
  lens, P, N = [5, 9, 2], 9, 6
  seqs = [rng.integers(0, cfg.vocab_size, n + N) for n in lens]
  padded = np.zeros((3, max(lens) + N), np.int32)  # right padding: causal, harmless
  for b, s in enumerate(seqs):
    padded[b, :len(s)] = s
  full = jax.jit(model.apply)({"params": params}, jnp.asarray(padded))

  tokens = np.zeros((3, P), np.int32)
  for b, n in enumerate(lens):
    tokens[b, P - n:] = seqs[b][:n]
  cache = init_cache(cfg, 3, P + N, start=jnp.asarray([P - n for n in lens]))
  step_fn = jax.jit(lambda p, t, c: model.apply({"params": p}, t, cache=c))
  logits, cache = step_fn(params, jnp.asarray(tokens), cache)
  for b, n in enumerate(lens):
    np.testing.assert_allclose(logits[b, P - 1], full[b][n - 1], atol=1e-5, rtol=0)
  for i in range(N - 1):
    step = jnp.asarray([[seqs[b][n + i]] for b, n in enumerate(lens)], jnp.int32)
    logits, cache = step_fn(params, step, cache)
    for b, n in enumerate(lens):
      np.testing.assert_allclose(logits[b, 0], full[b][n + i], atol=1e-5, rtol=0)
  np.testing.assert_array_equal(cache.lengths, [n + N - 1 for n in lens])
  # The comparison is not vacuous: logits change from step to step.
  assert float(jnp.abs(full[0][1] - full[0][2]).max()) > 1e-3


def test_packed_segments_match_separate_sequences():
  params = init_params(TINY, jax.random.PRNGKey(2))
  model = Transformer(TINY)
  a, b = np.arange(1, 6), np.arange(10, 17)
  packed = np.concatenate([a, b, [0, 0]])[None]
  seg = np.array([[1] * 5 + [2] * 7 + [0, 0]])
  pos = np.array([list(range(5)) + list(range(7)) + [0, 0]])
  fwd = jax.jit(model.apply)
  out = fwd({"params": params}, jnp.asarray(packed), positions_BT=jnp.asarray(pos),
            segment_ids_BT=jnp.asarray(seg))
  out_a = fwd({"params": params}, jnp.asarray(a)[None])
  out_b = fwd({"params": params}, jnp.asarray(b)[None])
  np.testing.assert_allclose(out[0, :5], out_a[0], atol=1e-5)
  np.testing.assert_allclose(out[0, 5:12], out_b[0], atol=1e-5)
  assert np.isfinite(np.asarray(out)).all()


def test_every_param_has_logical_axes():
  axes = param_logical_axes(TINY.replace(qkv_bias=True))
  params = init_params(TINY.replace(qkv_bias=True), jax.random.PRNGKey(0))
  flat_axes = jax.tree_util.tree_leaves_with_path(
      axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  flat_params = jax.tree_util.tree_leaves_with_path(params)
  assert len(flat_axes) == len(flat_params)
  for (path, spec), (_, p) in zip(flat_axes, flat_params):
    assert isinstance(spec, jax.sharding.PartitionSpec), path
    assert len(spec) == p.ndim and all(isinstance(n, str) for n in spec), (path, spec)


def test_num_params_matches_init():
  for cfg in (TINY, TINY.replace(qkv_bias=True, tie_embeddings=True)):
    params = init_params(cfg, jax.random.PRNGKey(0))
    assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params()


def test_bf16_compute_runs_and_is_close_to_fp32():
  params = init_params(TINY, jax.random.PRNGKey(3))
  tokens = jnp.arange(12, dtype=jnp.int32)[None]
  ref = jax.jit(Transformer(TINY).apply)({"params": params}, tokens)
  bf = jax.jit(Transformer(TINY.replace(dtype="bfloat16")).apply)({"params": params}, tokens)
  assert bf.dtype == jnp.float32  # logits always come back in fp32
  assert float(jnp.abs(bf - ref).max()) < 5e-2
  p16 = init_params(TINY.replace(param_dtype="bfloat16"), jax.random.PRNGKey(3))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p16))


def test_too_many_tokens_for_cache_is_a_clear_error():
  params = init_params(TINY, jax.random.PRNGKey(0))
  cache = init_cache(TINY, 1, 4)
  with pytest.raises(ValueError, match="do not fit in a KV cache of 4 slots"):
    Transformer(TINY).apply({"params": params}, jnp.zeros((1, 6), jnp.int32), cache=cache)


@pytest.mark.parametrize("field,value,msg", [
    ("num_kv_heads", 3, "multiple of num_kv_heads"),
    ("hidden_size", 0, "hidden_size must be a positive int"),
    ("family", "gpt2", "family must be one of"),
    ("dtype", "float77", "unknown dtype"),
])
def test_config_validation(field, value, msg):
  with pytest.raises(ValueError, match=msg):
    TINY.replace(**{field: value})


@pytest.mark.parametrize("E,S", [(16, 40), (24, 37), (16, 72), (64, 384)])
def test_decode_step_products_equal_the_einsums(E, S):
  # The CPU decode path's chunked q.k and p.v (attention.decode_scores /
  # decode_values) against the einsums: q.k chunks 16 and 12 (E=24), p.v
  # chunks 2 (S=72) and 8 (S=384), and the einsum fallback (S=40, S=37).
  from kimi_jax.models.attention import decode_scores, decode_values
  rng = np.random.default_rng(0)
  q = rng.standard_normal((3, 2, 4, E)).astype(np.float32)
  k = rng.standard_normal((3, 2, E, S)).astype(np.float32)
  p = rng.random((3, 2, 4, S)).astype(np.float32)
  v = rng.standard_normal((3, 2, S, E)).astype(np.float32)
  got = decode_scores(jnp.asarray(q), jnp.asarray(k))
  want = np.einsum("bkge,bkes->bkgs", q.astype(np.float64), k.astype(np.float64))
  assert got.shape == (3, 2, 4, S) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  got = decode_values(jnp.asarray(p), jnp.asarray(v))
  want = np.einsum("bkgs,bkse->bkge", p.astype(np.float64), v.astype(np.float64))
  assert got.shape == (3, 2, 4, E)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  # The feature-major decode step's form: batch last, same values.
  got = decode_values(jnp.asarray(p), jnp.asarray(v), batch_last=True)
  assert got.shape == (2, 4, E, 3)
  np.testing.assert_allclose(np.asarray(got), want.transpose(1, 2, 3, 0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunked", [False, True])
def test_cpu_decode_step_equals_attend(chunked):
  # One query per row over a left-padded cache: both CPU forms (the chunked
  # one is what decode_jit programs trace) against the general einsum path,
  # including a row whose only visible slot is its own.
  import contextlib

  from kimi_jax.models.attention import attend, cpu_decode_program, decode_step_cpu
  rng = np.random.default_rng(1)
  B, K, G, E, S = 3, 2, 4, 16, 24
  q = jnp.asarray(rng.standard_normal((B, K, G, E)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((B, K, E, S)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((B, K, S, E)), jnp.float32)
  start = np.array([0, 5, S - 1])
  mask = jnp.asarray(np.arange(S)[None, :] >= start[:, None])
  with cpu_decode_program() if chunked else contextlib.nullcontext():
    got = decode_step_cpu(q, k, v, mask)
  want = attend(q[:, :, :, None, :], k, v, mask[:, None, :])[:, :, :, 0, :]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(got[2]), np.asarray(v[2, :, None, S - 1, :]).repeat(G, 1),
                             rtol=1e-6)


def test_rope_tables_are_exact_and_computed_once_per_forward():
  from kimi_jax.models.transformer import rope_inv_freq, rope_tables
  positions = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 7)), jnp.int32)
  inv_freq = rope_inv_freq(TINY)
  cos, sin = jax.jit(rope_tables)(positions, inv_freq)
  angles = jax.jit(lambda p, f: p.astype(jnp.float32)[..., None] * f[None, None])(positions, inv_freq)
  np.testing.assert_array_equal(cos, jnp.cos(angles))
  np.testing.assert_array_equal(sin, jnp.sin(angles))
  # Shared by all layers, not re-evaluated inside each layer's q/k fusions.
  cfg = TINY.replace(num_layers=4)
  params = init_params(cfg, jax.random.PRNGKey(0))
  hlo = jax.jit(Transformer(cfg).apply).lower({"params": params}, jnp.zeros((2, 8), jnp.int32)
                                              ).compile().as_text()
  assert hlo.count(" cosine(") == 1, hlo.count(" cosine(")
