"""Sampler tests: greedy against a full-forward reference, eos, sampling rules, recompiles."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax.compile_count import CompileCounter
from kimi_jax.models.transformer import ModelConfig, Transformer, init_params
from kimi_jax.sampling import SamplingConfig, generate, sample_token

CFG = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="module")
def params():
  return init_params(CFG, jax.random.PRNGKey(0))


@jax.jit
def forward(params, tokens_BT):
  return Transformer(CFG).apply({"params": params}, tokens_BT)


def greedy_reference(params, prompt, n, width=32):
  """Greedy decoding by re-running the full, cache-free forward pass.

  The sequence is right-padded to a fixed width (one compilation): under a
  causal mask trailing padding does not change earlier logits.
  """
  seq = list(prompt)
  for _ in range(n):
    logits = forward(params, jnp.asarray(seq + [0] * (width - len(seq)))[None])
    seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
  return seq[len(prompt):]


def test_greedy_matches_full_forward_for_mixed_lengths(params):
  prompts = [[5, 7, 9], [1], [3, 4, 5, 6, 7, 8, 9, 10, 11]]
  out = generate(CFG, params, prompts, max_new_tokens=10)
  for p, o in zip(prompts, out):
    assert o == greedy_reference(params, p, 10)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_decode_phases_do_not_change_the_tokens(params, temperature):
  # The cache grows in phases (default 4); 1 phase decodes over the whole
  # cache, 3 phases over sizes that are no power of two. Same draws, eos too.
  prompts = [[5, 7, 9], [1], [3, 4, 5, 6, 7, 8, 9, 10, 11]]
  kw = dict(max_new_tokens=13, temperature=temperature, seed=2, return_logprobs=True)
  want, want_logp = generate(CFG, params, prompts, decode_phases=1, **kw)
  eos = want[1][6]
  for phases in (3, 4):
    got, got_logp = generate(CFG, params, prompts, decode_phases=phases, **kw)
    assert got == want
    for g, w in zip(got_logp, want_logp):
      np.testing.assert_allclose(g, w, atol=1e-5)
    assert (generate(CFG, params, prompts, 13, temperature=temperature, seed=2, eos_id=eos,
                     decode_phases=phases)
            == generate(CFG, params, prompts, 13, temperature=temperature, seed=2, eos_id=eos,
                        decode_phases=1))
  with pytest.raises(ValueError, match="decode_phases must be >= 1"):
    generate(CFG, params, prompts, 4, decode_phases=0)


def test_logprobs_are_those_of_the_model(params):
  prompt = [2, 3, 4]
  out, logps = generate(CFG, params, [prompt], 5, return_logprobs=True)
  seq = prompt + out[0]
  logits = forward(params, jnp.asarray(seq)[None])[0]
  ref = jax.nn.log_softmax(logits, -1)[np.arange(2, 7), np.asarray(seq[3:])]
  np.testing.assert_allclose(logps[0], ref, atol=1e-5)


def test_eos_stops_each_row_and_is_returned(params):
  prompts = [[5, 7, 9], [1, 2]]
  free = generate(CFG, params, prompts, max_new_tokens=8)
  eos = free[0][3]
  out = generate(CFG, params, prompts, max_new_tokens=8, eos_id=eos)
  first = free[0].index(eos)
  assert out[0] == free[0][:first + 1]
  cut = free[1].index(eos) + 1 if eos in free[1] else 8
  assert out[1] == free[1][:cut]


def test_sampling_is_seeded_and_varies(params):
  prompts = [[1, 2, 3]] * 4
  a = generate(CFG, params, prompts, 12, temperature=1.0, seed=3)
  b = generate(CFG, params, prompts, 12, temperature=1.0, seed=3)
  c = generate(CFG, params, prompts, 12, temperature=1.0, seed=4)
  assert a == b and a != c
  assert len({tuple(x) for x in a}) > 1  # rows draw different samples


def test_top_k_1_and_tiny_top_p_are_greedy(params):
  prompts = [[5, 6], [7, 8, 9]]
  greedy = generate(CFG, params, prompts, 6)
  assert generate(CFG, params, prompts, 6, temperature=1.0, top_k=1, seed=1) == greedy
  assert generate(CFG, params, prompts, 6, temperature=1.0, top_p=1e-6, seed=1) == greedy


def test_top_k_and_top_p_restrict_support():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 2000))
  keys = jax.random.split(jax.random.PRNGKey(0), 1)[0]
  tok_k, _ = sample_token(logits, keys, SamplingConfig(temperature=1.0, top_k=2))
  assert set(np.asarray(tok_k).tolist()) == {0, 1}
  tok_p, _ = sample_token(logits, keys, SamplingConfig(temperature=1.0, top_p=0.7))
  assert set(np.asarray(tok_p).tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.8
  tok, _ = sample_token(logits, keys, SamplingConfig(temperature=1.0))
  freq = np.bincount(np.asarray(tok), minlength=4) / 2000
  np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.04)


def test_no_recompile_within_buckets(params):
  generate(CFG, params, [[1, 2, 3], [4, 5]], 10)
  with CompileCounter() as counter:
    generate(CFG, params, [[9, 8, 7, 6], [1]], 10)
    generate(CFG, params, [[3, 3], [2]], 14, eos_id=7)  # same buckets: 2 rows, 8, 16
  assert counter.count == 0


def test_bad_requests_are_clear_errors(params):
  with pytest.raises(ValueError, match="prompt 1 has 70 tokens.*maximum length 64"):
    generate(CFG, params, [[1], [1] * 70], 4)
  with pytest.raises(ValueError, match="prompt 0 is empty"):
    generate(CFG, params, [[]], 4)
  with pytest.raises(ValueError, match="max_new_tokens"):
    generate(CFG, params, [[1]], 0)
  with pytest.raises(ValueError, match="top_p"):
    generate(CFG, params, [[1]], 2, temperature=1.0, top_p=0.0)


def test_decode_program_keeps_matmuls_out_of_ynnpack_on_cpu(params):
  # kimi_jax/decode_jit.py: the decode loop compiles with Eigen matmuls on CPU;
  # other programs keep XLA's default (YNNPACK) fusions.
  from kimi_jax import decode_jit
  from kimi_jax.sampling import sampler
  assert decode_jit.compiler_options("cpu") == decode_jit.CPU_DECODE_OPTIONS
  assert decode_jit.compiler_options("tpu") is None
  tokens = np.ones((2, 8), np.int32)
  start = np.zeros((2,), np.int32)
  hlo = sampler.decode.lower(params, tokens, start, np.int32(4), np.int32(-1),
                             jax.random.PRNGKey(0), cfg=CFG, sampling=SamplingConfig(),
                             new_slots=8).compile().as_text()
  assert " dot(" in hlo and "__ynn_fusion" not in hlo
  big = jnp.ones((64, 64))
  default_hlo = jax.jit(lambda a: a @ a).lower(big).compile().as_text()
  assert "__ynn_fusion" in default_hlo
