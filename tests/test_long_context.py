"""The long-context settings change memory, never values: chunked logits,
remat, scanned layers, chunked prefill, and `ModelConfig` validation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax.models import logits as logits_lib
from kimi_jax.models.transformer import ModelConfig, Transformer, init_cache, init_params
from kimi_jax.rl import update
from kimi_jax.sampling import sampler
from kimi_jax.sft.packing import PackedBatch
from kimi_jax.sft.train import sft_loss

CFG = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=128)


def _packed(rng, N=2, T=40):
  """Rows of two samples each plus a padding tail: tokens, positions, segment ids."""
  tokens = rng.integers(1, CFG.vocab_size, (N, T)).astype(np.int32)
  seg = np.zeros((N, T), np.int32)
  pos = np.zeros((N, T), np.int32)
  for n in range(N):
    a, b = 13 + n, 31 + n
    seg[n, :a], seg[n, a:b] = 1, 2
    pos[n, :a], pos[n, a:b] = np.arange(a), np.arange(b - a)
  return tokens, pos, seg


def _logp_and_grad(cfg, params, tokens, pos, seg):
  def f(p):
    lp = update.token_logprobs(cfg, p, tokens, positions_NT=pos, segment_ids_NT=seg)
    return jnp.sum(lp * (seg > 0) * jnp.linspace(0.5, 1.5, lp.shape[1])[None, :]), lp
  (_, lp), g = jax.value_and_grad(f, has_aux=True)(params)
  return lp, g


def _close(a, b, atol=1e-5):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y),
                                                       atol=atol, rtol=1e-5), a, b)


@pytest.mark.parametrize("chunk", [7, 40])
def test_chunked_logits_give_the_same_logprobs_and_gradients(chunk):
  params = init_params(CFG, jax.random.PRNGKey(0))
  tokens, pos, seg = _packed(np.random.default_rng(0))
  ref_lp, ref_g = _logp_and_grad(CFG, params, tokens, pos, seg)
  lp, g = _logp_and_grad(CFG.replace(logits_chunk=chunk), params, tokens, pos, seg)
  _close(lp, ref_lp)
  _close(g, ref_g)


def test_chunked_logits_never_build_the_whole_logits():
  """At T = 2048 and V = 4096, float32 logits of one row are 32 MiB; with
  256-token chunks the compiled backward holds about one chunk's."""
  cfg = CFG.replace(vocab_size=4096, max_position_embeddings=4096)
  params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
  tokens = jax.ShapeDtypeStruct((1, 2048), jnp.int32)

  def temp(c):
    f = jax.jit(jax.grad(lambda p, t: jnp.sum(update.token_logprobs(c, p, t))))
    return f.lower(params, tokens).compile().memory_analysis().temp_size_in_bytes

  whole, chunked = temp(cfg), temp(cfg.replace(logits_chunk=256))
  logits_bytes = 2048 * 4096 * 4
  assert whole > logits_bytes
  assert chunked < whole - logits_bytes // 2, (whole, chunked)


def test_sft_loss_and_accuracy_are_the_same_chunked():
  params = init_params(CFG, jax.random.PRNGKey(1))
  tokens, pos, seg = _packed(np.random.default_rng(1))
  batch = PackedBatch(tokens_NT=tokens, positions_NT=pos, segment_ids_NT=seg,
                      loss_mask_NT=(seg == 2).astype(np.int32))
  (ref, ref_m), ref_g = jax.value_and_grad(sft_loss, has_aux=True)(params, CFG, batch)
  (out, m), g = jax.value_and_grad(sft_loss, has_aux=True)(
      params, CFG.replace(logits_chunk=9), batch)
  _close(out, ref)
  _close(g, ref_g)
  assert float(m["accuracy"]) == float(ref_m["accuracy"])


def test_next_token_logprobs_reports_argmax_hits_per_chunk():
  params = init_params(CFG, jax.random.PRNGKey(2))
  hidden = jax.random.normal(jax.random.PRNGKey(3), (2, 23, CFG.hidden_size))
  full = hidden @ params["lm_head"]
  targets = jnp.argmax(full, axis=-1).at[:, ::2].set(0)
  lp, hit = logits_lib.next_token_logprobs(CFG, params, hidden, targets, with_argmax=True,
                                           chunk=5)
  want = jnp.take_along_axis(jax.nn.log_softmax(full), targets[..., None], -1)[..., 0]
  _close(lp, want)
  np.testing.assert_array_equal(np.asarray(hit), np.asarray(targets == jnp.argmax(full, -1)))


@pytest.mark.parametrize("remat,scan", [("full", False), ("full", True), ("dots", True),
                                        ("offload", True)])
def test_remat_and_scan_change_no_value_or_gradient(remat, scan):
  from kimi_jax.models import layer_stack  # pylint: disable=import-outside-toplevel
  params = init_params(CFG, jax.random.PRNGKey(4))
  tokens, pos, seg = _packed(np.random.default_rng(4))
  ref_lp, ref_g = _logp_and_grad(CFG, params, tokens, pos, seg)
  cfg = CFG.replace(remat=remat, scan_layers=scan)
  p = layer_stack.stack_layers(params, CFG.num_layers) if scan else params
  lp, g = _logp_and_grad(cfg, p, tokens, pos, seg)
  _close(lp, ref_lp)
  _close(layer_stack.unstack_layers(g) if scan else g, ref_g)


@pytest.mark.parametrize("P,chunk", [(27, 8), (27, 30)])
def test_chunked_prefill_fills_the_same_cache(P, chunk):
  """Left-padded prompts, P tokens in chunks of C (a remainder first when C
  does not divide P): same cache and last logits as one call."""
  params = init_params(CFG, jax.random.PRNGKey(5))
  rng = np.random.default_rng(5)
  tokens = rng.integers(1, CFG.vocab_size, (3, P)).astype(np.int32)
  start = np.array([0, 5, P - 3], np.int32)

  def run(cfg):
    cache = init_cache(cfg, 3, 40, start=start)
    return jax.jit(lambda p, t, c: sampler.prefill(Transformer(cfg), p, t, c))(
        params, tokens, cache)

  ref_logits, ref_cache = run(CFG)
  out_logits, out_cache = run(CFG.replace(prefill_chunk=chunk))
  _close(out_logits, ref_logits, atol=2e-5)
  assert int(out_cache.index) == int(ref_cache.index) == P
  for a, b, s in zip(out_cache.k + out_cache.v, ref_cache.k + ref_cache.v,
                     ["k"] * 2 + ["v"] * 2):
    axis = 3 if s == "k" else 2
    for row in range(3):  # only each row's valid slots are ever read
      keep = np.arange(40)[(np.arange(40) >= start[row]) & (np.arange(40) < P)]
      np.testing.assert_allclose(np.take(np.asarray(a)[row], keep, axis - 1),
                                 np.take(np.asarray(b)[row], keep, axis - 1), atol=2e-5)


def test_generate_is_the_same_with_chunked_prefill():
  from kimi_jax.sampling import generate  # pylint: disable=import-outside-toplevel
  params = init_params(CFG, jax.random.PRNGKey(6))
  prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [3, 4], [9] * 19]
  want = generate(CFG, params, prompts, 6)
  assert generate(CFG.replace(prefill_chunk=4), params, prompts, 6) == want


@pytest.mark.parametrize("field,value,match", [
    ("attention", "flash", "ModelConfig.attention must be one of"),
    ("remat", "some", "ModelConfig.remat must be one of"),
    ("scan_layers", 1, "ModelConfig.scan_layers must be a bool"),
    ("logits_chunk", -1, "ModelConfig.logits_chunk must be an int >= 0"),
    ("prefill_chunk", 2.5, "ModelConfig.prefill_chunk must be an int >= 0"),
])
def test_broken_long_context_settings_name_the_field(field, value, match):
  with pytest.raises(ValueError, match=match):
    CFG.replace(**{field: value})


def test_generate_with_scanned_layers_gives_the_same_tokens():
  """The decode path of a scanned model (its per-layer cache stacked for
  the scan on each call) samples what the unrolled model does."""
  from kimi_jax.models import layer_stack  # pylint: disable=import-outside-toplevel
  from kimi_jax.sampling import generate  # pylint: disable=import-outside-toplevel
  params = init_params(CFG, jax.random.PRNGKey(7))
  prompts = [[5, 6, 7, 8, 9], [3, 4]]
  want = generate(CFG, params, prompts, 6)
  got = generate(CFG.replace(scan_layers=True), layer_stack.stack_layers(params, 2), prompts, 6)
  assert got == want
