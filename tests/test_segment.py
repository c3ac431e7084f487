"""Rollout segment tests: carry-over equivalence, finish reasons, repeat stop."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax.compile_count import CompileCounter
from kimi_jax.models.transformer import ModelConfig, init_params
from kimi_jax.sampling.finish import FinishReason
from kimi_jax.sampling.repetition import RepeatConfig
from kimi_jax.sampling.sampler import SamplingConfig, generate
from kimi_jax.sampling.phases import phase_slots
from kimi_jax.sampling.segment import SegmentSampler, chunk_widths
from rollout_states import BUDGET, RUNNING, make_state, resume

CFG = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=128)
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11]]


def in_segments(engine, params, state, *, budget, segments):
  """`segments` calls of `budget` tokens each (same key), carried rows resumed between."""
  for it in range(segments):
    state, steps = engine(params, state, budget, it, jax.random.PRNGKey(1))
    assert steps == budget
    state = resume(state)
  return state


@pytest.fixture(scope="module")
def params():
  return init_params(CFG, jax.random.PRNGKey(0))


def test_three_segments_equal_one_long_segment(params):
  engine = SegmentSampler(CFG, SamplingConfig(), RepeatConfig(), eos_id=None, budget_slots=32)
  state = make_state(PROMPTS)
  one, steps = engine(params, state, 24, 0, jax.random.PRNGKey(1))
  assert steps == 24 and (one.finish_B == BUDGET).all()
  three = in_segments(engine, params, state, budget=8, segments=3)
  np.testing.assert_array_equal(one.tokens_BL, three.tokens_BL)
  np.testing.assert_allclose(one.logp_BL, three.logp_BL, atol=1e-5)
  # Same tokens as the plain sampler, and each token knows its iteration.
  for b, (p, g) in enumerate(zip(PROMPTS, generate(CFG, params, PROMPTS, 24))):
    assert one.tokens_BL[b, len(p):len(p) + 24].tolist() == g
    assert three.token_iter_BL[b, :len(p)].tolist() == [-1] * len(p)
    assert three.token_iter_BL[b, len(p):len(p) + 24].tolist() == [0] * 8 + [1] * 8 + [2] * 8


def test_finish_reasons_eos_max_length_and_untouched_rows(params):
  free = generate(CFG, params, PROMPTS, 10)
  eos = free[0][4]
  engine = SegmentSampler(CFG, SamplingConfig(), RepeatConfig(), eos_id=eos, budget_slots=16)
  state = make_state(PROMPTS, max_length=12)
  state = state.replace(active_B=np.array([True, True, True, False]))
  out, _ = engine(params, state, 16, 3, jax.random.PRNGKey(0))
  assert out.finish_B[0] == int(FinishReason.EOS)
  assert out.tokens_BL[0, 3:out.length_B[0]].tolist() == free[0][:5]
  assert out.finish_B[1] in (int(FinishReason.EOS), int(FinishReason.MAX_LENGTH))
  if out.finish_B[1] == int(FinishReason.MAX_LENGTH):
    assert out.length_B[1] == 12
  assert out.finish_B[3] == RUNNING and out.length_B[3] == 2  # inactive: untouched
  np.testing.assert_array_equal(out.tokens_BL[3], state.tokens_BL[3])


def cycling_params(period, vocab=64):
  """A model whose greedy next token is (token + 1) % period, whatever the context.

  Attention and MLP outputs are zeroed, so the residual stream is the token
  embedding; a one-hot embedding and a shifted-identity head make the cycle.
  """
  cfg = ModelConfig(vocab_size=vocab, hidden_size=vocab, intermediate_size=8, num_layers=1,
                    num_heads=2, num_kv_heads=1, max_position_embeddings=256)
  p = jax.tree.map(np.asarray, init_params(cfg, jax.random.PRNGKey(0)))
  p["layers_0"]["attn"]["o"] = np.zeros_like(p["layers_0"]["attn"]["o"])
  p["layers_0"]["mlp"]["down"] = np.zeros_like(p["layers_0"]["mlp"]["down"])
  p["embed"] = np.eye(vocab, dtype=np.float32)
  head = np.zeros((vocab, vocab), np.float32)
  for t in range(vocab):
    head[t, (t + 1) % period] = 10.0
  p["lm_head"] = head
  return cfg, p


def test_repeat_detector_stops_a_looping_model_within_its_window():
  cfg, p = cycling_params(period=3)
  repeat = RepeatConfig(max_period=8, min_repeats=4, min_span=12)
  engine = SegmentSampler(cfg, SamplingConfig(), repeat, eos_id=None, budget_slots=64)
  state = make_state([[0], [1, 2]], max_length=128)
  out, _ = engine(p, state, 64, 0, jax.random.PRNGKey(0))
  assert (out.finish_B == int(FinishReason.REPEAT)).all()
  # The response is periodic from its first token: it stops exactly when the
  # window (period 3 * 4 repeats = 12 tokens) is filled.
  np.testing.assert_array_equal(out.length_B - out.prompt_len_B, [12, 12])
  assert out.tokens_BL[0, 1:13].tolist() == [1, 2, 0] * 4


def test_repeat_detector_leaves_non_repeating_output_alone():
  cfg, p = cycling_params(period=50)  # 40 tokens of a period-50 cycle never repeat
  engine = SegmentSampler(cfg, SamplingConfig(), RepeatConfig(max_period=16, min_repeats=2,
                                                              min_span=4),
                          eos_id=None, budget_slots=64)
  out, _ = engine(p, make_state([[0]], max_length=128), 40, 0, jax.random.PRNGKey(0))
  assert out.finish_B[0] == BUDGET and out.length_B[0] == 41


def test_repeat_detector_ignores_periodic_prompts():
  cfg, p = cycling_params(period=50)
  engine = SegmentSampler(cfg, SamplingConfig(), RepeatConfig(max_period=4, min_repeats=2,
                                                              min_span=4),
                          eos_id=None, budget_slots=8)
  out, _ = engine(p, make_state([[7, 7, 7, 7, 7, 7, 7, 7, 0]], max_length=64), 3, 0,
                  jax.random.PRNGKey(0))
  assert out.finish_B[0] == BUDGET


def test_budget_is_validated(params):
  engine = SegmentSampler(CFG, SamplingConfig(), RepeatConfig(), eos_id=None, budget_slots=8)
  with pytest.raises(ValueError, match="budget 9 outside"):
    engine(params, make_state(PROMPTS), 9, 0, jax.random.PRNGKey(0))


# ---------------------------------------------------------------- grouped prefill

def test_chunk_widths_halve_down_to_the_minimum():
  assert chunk_widths(128, 16) == (128, 64, 32, 16)
  assert chunk_widths(16, 16) == (16,)
  assert chunk_widths(8, 16) == (8,)
  assert chunk_widths(48, 8) == (48, 24, 12)


def mixed_state(max_length=64):
  """Rows of very different lengths: one long carried row, short ones, an
  inactive row and a finished row (B=7: not a multiple of the group size)."""
  rng = np.random.default_rng(3)
  lens = [40, 3, 9, 1, 17, 30, 5]
  rows = [rng.integers(1, 60, size=n).tolist() for n in lens]
  st = make_state(rows, max_length)
  prompt = np.minimum(st.length_B, 2).astype(np.int32)
  active = np.ones(len(rows), bool)
  active[3] = False
  finish = np.full(len(rows), RUNNING, np.int32)
  finish[6] = int(FinishReason.EOS)
  return st.replace(prompt_len_B=prompt, active_B=active, finish_B=finish)


# One setting for all grouped-prefill tests, so they share compiled programs.
GROUPED = dict(sampling=SamplingConfig(), repeat=RepeatConfig(), eos_id=None, budget_slots=24,
               min_width=4)


def test_grouped_prefill_matches_one_whole_prefill(params):
  # A random model: every token depends on the whole context, so a key/value
  # placed in the wrong slot (or row) would change the continuation.
  state = mixed_state()
  whole = SegmentSampler(CFG, prefill_rows=0, **GROUPED)
  grouped = SegmentSampler(CFG, prefill_rows=2, **GROUPED)
  assert whole.width_for(state) == 64  # groups of 2 rows use widths 64, 32, 4
  a, steps_a = whole(params, state, 12, 5, jax.random.PRNGKey(2))
  b, steps_b = grouped(params, state, 12, 5, jax.random.PRNGKey(2))
  assert steps_a == steps_b == 12
  np.testing.assert_array_equal(a.tokens_BL, b.tokens_BL)
  np.testing.assert_array_equal(a.length_B, b.length_B)
  np.testing.assert_array_equal(a.finish_B, b.finish_B)
  np.testing.assert_array_equal(a.token_iter_BL, b.token_iter_BL)
  np.testing.assert_allclose(a.logp_BL, b.logp_BL, atol=1e-5)
  # Rows that are not running stay untouched; running rows got 12 tokens each...
  np.testing.assert_array_equal(b.tokens_BL[[3, 6]], state.tokens_BL[[3, 6]])
  np.testing.assert_array_equal(b.length_B - state.length_B, [12, 12, 12, 0, 12, 12, 0])
  # ...which are the plain sampler's continuations of each row.
  rows = [state.tokens_BL[r, :state.length_B[r]].tolist() for r in (0, 1, 2, 4, 5)]
  for r, row, g in zip((0, 1, 2, 4, 5), rows, generate(CFG, params, rows, 12)):
    assert b.tokens_BL[r, len(row):len(row) + 12].tolist() == g


def test_grouped_prefill_three_segments_equal_one_long_segment(params):
  engine = SegmentSampler(CFG, prefill_rows=2, **GROUPED)
  state = mixed_state()
  one, _ = engine(params, state, 24, 0, jax.random.PRNGKey(1))
  three = in_segments(engine, params, state, budget=8, segments=3)
  np.testing.assert_array_equal(one.tokens_BL, three.tokens_BL)
  np.testing.assert_array_equal(one.length_B, three.length_B)
  np.testing.assert_array_equal(resume(one).finish_B, three.finish_B)
  np.testing.assert_allclose(one.logp_BL, three.logp_BL, atol=1e-5)
  # Row 0 (40 tokens) hits max_length 64; the other running rows run the budget.
  assert one.finish_B.tolist() == [int(FinishReason.MAX_LENGTH), BUDGET, BUDGET, RUNNING,
                                   BUDGET, BUDGET, int(FinishReason.EOS)]


def test_grouped_prefill_compiles_nothing_after_warmup(params):
  engine = SegmentSampler(CFG, prefill_rows=2, **GROUPED)
  engine.warmup(params, 7, 64)
  state = mixed_state()
  with CompileCounter() as cc:
    for it in range(3):
      state, _ = engine(params, state, 8, it, jax.random.PRNGKey(it))
      state = resume(state)
  assert cc.count == 0
  assert state.length_B.tolist() == [64, 27, 33, 1, 41, 54, 5]


def test_prefill_rows_is_validated():
  with pytest.raises(ValueError, match="prefill_rows"):
    SegmentSampler(CFG, SamplingConfig(), RepeatConfig(), eos_id=None, budget_slots=8,
                   prefill_rows=-1)


# ---------------------------------------------------------------- sampling layout

def _sample_layout(shape):
  from kimi_jax import parallel
  return parallel.Layout.sample(parallel.make_mesh(parallel.MeshConfig(*shape)), CFG)


def eight_rows():
  """8 rows (2 per data shard of a 2x2 batch split) of mixed lengths, one
  inactive and one finished: grouped prefill uses several widths."""
  rng = np.random.default_rng(4)
  rows = [rng.integers(1, 60, size=n).tolist() for n in (40, 3, 9, 1, 17, 30, 5, 12)]
  st = make_state(rows)
  active, finish = np.ones(8, bool), np.full(8, RUNNING, np.int32)
  active[3], finish[6] = False, int(FinishReason.EOS)
  return st.replace(prompt_len_B=np.minimum(st.length_B, 2).astype(np.int32), active_B=active,
                    finish_B=finish)


@pytest.mark.parametrize("shape,temperature", [((2, 2, 2), 0.0), ((1, 4, 2), 1.0)])
def test_segments_under_sample_layout_match_one_device(params, shape, temperature):
  """Greedy and sampled (threefry draws do not depend on the sharding) tokens
  are equal, log-probs to 1e-5; prefill groups of 2 rows become groups of 4
  (the data-parallel size), as the plain sampler with 4 does."""
  from kimi_jax import parallel
  layout = _sample_layout(shape)
  kw = dict(sampling=SamplingConfig(temperature=temperature), repeat=RepeatConfig(), eos_id=None,
            budget_slots=8, min_width=4)
  plain = SegmentSampler(CFG, prefill_rows=4, **kw)
  sharded = SegmentSampler(CFG, prefill_rows=2, layout=layout, **kw)
  p_sample = parallel.reshard(params, layout)
  a = b = eight_rows()
  for it in range(3):
    a, steps_a = plain(params, a, 8, it, jax.random.PRNGKey(it))
    b, steps_b = sharded(p_sample, b, 8, it, jax.random.PRNGKey(it))
    assert isinstance(b.tokens_BL, np.ndarray) and steps_a == steps_b == 8
    np.testing.assert_array_equal(a.tokens_BL, b.tokens_BL)
    np.testing.assert_array_equal(a.finish_B, b.finish_B)
    np.testing.assert_array_equal(a.token_iter_BL, b.token_iter_BL)
    np.testing.assert_allclose(a.logp_BL, b.logp_BL, atol=1e-5)
    a, b = resume(a), resume(b)
  assert b.length_B.tolist() == [64, 27, 33, 1, 41, 54, 5, 36]


def test_segment_layout_checks_rows_and_model(params):
  from kimi_jax.sampling.segment import sample_segment
  layout = _sample_layout((2, 2, 2))
  engine = SegmentSampler(CFG, SamplingConfig(), RepeatConfig(), eos_id=None, budget_slots=8,
                          layout=layout)
  with pytest.raises(ValueError, match=r"RolloutState of 6 rows does not divide over the 4"):
    engine(params, make_state(PROMPTS + PROMPTS[:2]), 8, 0, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="layout.cfg differs"):
    sample_segment(params, eight_rows(), np.int32(4), np.int32(0), jax.random.PRNGKey(0),
                   np.int32(-1), cfg=CFG.replace(num_layers=1), sampling=SamplingConfig(),
                   repeat=RepeatConfig(), width=64, budget_slots=8, layout=layout)


def test_phase_slots_grow_to_the_whole_cache():
  assert phase_slots(8, 128, 4) == (40, 72, 104, 136)
  assert phase_slots(16, 5, 4) == (18, 19, 20, 21)
  assert phase_slots(16, 2, 4) == (17, 18)  # no empty phases
  assert phase_slots(16, 24, 1) == (40,)
  with pytest.raises(ValueError, match="decode_phases"):
    SegmentSampler(CFG, decode_phases=0, **GROUPED)


def test_phased_decode_matches_one_phase(params):
  # Rows finish at different steps (eos, max length, budget) across phase
  # boundaries; carried rows of different lengths set the width.
  state = mixed_state(max_length=48)
  free = generate(CFG, params, [state.tokens_BL[1, :state.length_B[1]].tolist()], 12)[0]
  one = SegmentSampler(CFG, prefill_rows=2, **dict(GROUPED, eos_id=free[9]))
  four = SegmentSampler(CFG, prefill_rows=2, decode_phases=4, **dict(GROUPED, eos_id=free[9]))
  a, steps_a = one(params, state, 20, 3, jax.random.PRNGKey(2))
  b, steps_b = four(params, state, 20, 3, jax.random.PRNGKey(2))
  assert steps_a == steps_b == 20
  assert {int(FinishReason.EOS), int(FinishReason.MAX_LENGTH), int(FinishReason.BUDGET)} <= set(
      a.finish_B.tolist()), a.finish_B
  np.testing.assert_array_equal(a.tokens_BL, b.tokens_BL)
  np.testing.assert_array_equal(a.length_B, b.length_B)
  np.testing.assert_array_equal(a.finish_B, b.finish_B)
  np.testing.assert_allclose(a.logp_BL, b.logp_BL, atol=1e-5)
