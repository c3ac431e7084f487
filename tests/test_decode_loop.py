"""One decode loop for generate and rollouts; the accelerator forms traced on CPU.

`backend.accelerator_forms()` makes the model and samplers take the TPU / GPU
forms (KV cache `[B, S, K, E]`, no feature-major step, no chunked CPU q.k),
so these tests check them against the CPU forms on the same inputs.
"""
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from kimi_jax import backend, parallel
from kimi_jax.models.transformer import ModelConfig, Transformer, init_cache, init_params
from kimi_jax.sampling import decode_loop, generate
from kimi_jax.sampling.repetition import RepeatConfig
from kimi_jax.sampling.sampler import SamplingConfig
from kimi_jax.sampling.segment import SegmentSampler
from rollout_states import make_state, resume

# GQA (4 query heads over 2 kv heads), Qwen2-style biases and a tied head.
CFG = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=128, qkv_bias=True,
                  tie_embeddings=True, attention="xla")
PROMPTS = [[5, 7, 9], [1], [3, 4, 5, 6, 7, 8, 9, 10, 11], [2, 2]]


@pytest.fixture(scope="module")
def params():
  return init_params(CFG, jax.random.PRNGKey(0))


@contextlib.contextmanager
def accelerator_forms():
  """The accelerator forms, with jit caches cleared on the way in and out
  (the caches do not key on the forms)."""
  jax.clear_caches()
  try:
    with backend.accelerator_forms():
      yield
  finally:
    jax.clear_caches()


def test_accelerator_forms_switch_only_the_forms():
  assert backend.is_cpu()
  with backend.accelerator_forms():
    assert not backend.is_cpu() and backend.platform() == "cpu"
    assert not init_cache(CFG, 2, 8).cpu_layout
  assert init_cache(CFG, 2, 8).cpu_layout


def test_cache_layouts_shapes_and_slot_axes():
  cpu = init_cache(CFG, 3, 10)
  assert cpu.k[0].shape == (3, 2, 8, 10) and cpu.v[0].shape == (3, 2, 10, 8)
  with backend.accelerator_forms():
    acc = init_cache(CFG, 3, 10)
  assert acc.k[0].shape == acc.v[0].shape == (3, 10, 2, 8)
  for cache in (cpu, acc):
    assert cache.length == 10 and cache.resize(16).length == 16
    assert cache.resize(4).k[0].shape[cache.k_slot_axis] == 4


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generate_takes_the_same_tokens_in_both_forms(params, temperature):
  kw = dict(max_new_tokens=12, temperature=temperature, seed=3, return_logprobs=True, eos_id=4)
  want, want_logp = generate(CFG, params, PROMPTS, **kw)
  with accelerator_forms():
    got, got_logp = generate(CFG, params, PROMPTS, **kw)
  assert got == want
  for g, w in zip(got_logp, want_logp):
    np.testing.assert_allclose(g, w, atol=1e-5)


def test_cache_forward_matches_the_full_forward_in_the_accelerator_form(params):
  """Prefill of 5 tokens then 3 one-token steps, left-padded rows, against
  the cache-free forward (logits within 1e-5)."""
  tokens = jnp.asarray([[0, 0, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8]], jnp.int32)
  start = jnp.asarray([2, 0], jnp.int32)
  model = Transformer(CFG)
  with accelerator_forms():
    cache = init_cache(CFG, 2, 8, start=start)
    logits_p, cache = model.apply({"params": params}, tokens[:, :5], cache=cache)
    steps = [logits_p]
    for t in range(5, 8):
      logits_t, cache = model.apply({"params": params}, tokens[:, t:t + 1], cache=cache)
      steps.append(logits_t)
  got = jnp.concatenate(steps, axis=1)
  for b in range(2):
    s = int(start[b])
    want = model.apply({"params": params}, tokens[b:b + 1, s:])[0]
    np.testing.assert_allclose(got[b, s:], want, atol=1e-5)


def test_a_cache_of_the_other_layout_is_refused(params):
  cache = init_cache(CFG, 1, 8)  # the CPU layout
  with backend.accelerator_forms(), pytest.raises(ValueError, match="CPU layout"):
    Transformer(CFG).apply({"params": params}, jnp.ones((1, 2), jnp.int32), cache=cache)


def test_rollout_segments_equal_in_both_forms(params):
  """Carried rows and grouped re-prefill: 3 segments of 6 tokens each, with
  the repeat detector on, give the same rollouts in both forms."""
  engine = SegmentSampler(CFG, SamplingConfig(temperature=1.0),
                          RepeatConfig(max_period=2, min_repeats=3, min_span=4), eos_id=4,
                          budget_slots=8, min_width=4, prefill_rows=2)

  def run():
    state = make_state(PROMPTS, max_length=48)
    for it in range(3):
      state, _ = engine(params, state, 6, it, jax.random.PRNGKey(it))
      state = resume(state)
    return state

  want = run()
  with accelerator_forms():
    got = run()
  np.testing.assert_array_equal(got.tokens_BL, want.tokens_BL)
  np.testing.assert_array_equal(got.finish_B, want.finish_B)
  np.testing.assert_allclose(got.logp_BL, want.logp_BL, atol=1e-5)


def test_sample_layout_pins_the_accelerator_cache_by_kv_heads():
  layout = parallel.Layout.sample(parallel.make_mesh(parallel.MeshConfig(2, 2, 2)), CFG)
  assert layout.kv_cache(4, 16).k[0].spec == P(("data", "fsdp"), "tensor", None, None)
  with backend.accelerator_forms():
    cache = layout.kv_cache(4, 16)
  assert not cache.cpu_layout
  assert cache.k[0].spec == cache.v[0].spec == P(("data", "fsdp"), None, "tensor", None)


def test_generate_and_rollouts_run_the_one_decode_loop(params, monkeypatch):
  calls = []
  real = decode_loop.decode_tokens

  def counted(*args, **kwargs):
    calls.append(kwargs.get("room_B") is not None)  # rollouts pass the room
    return real(*args, **kwargs)

  monkeypatch.setattr(decode_loop, "decode_tokens", counted)
  jax.clear_caches()
  try:
    generate(CFG, params, PROMPTS[:2], max_new_tokens=4)
    engine = SegmentSampler(CFG, SamplingConfig(), RepeatConfig(), eos_id=None, budget_slots=4)
    engine(params, make_state(PROMPTS[:2], max_length=48), 4, 0, jax.random.PRNGKey(0))
  finally:
    jax.clear_caches()
  assert calls == [False, True]
