"""SFT warm-up: packing and its loss mask, the loss, learning, determinism, config."""
import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax import sft
from kimi_jax.models import params_io
from kimi_jax.models.transformer import ModelConfig, Transformer, init_params
from kimi_jax.sampling import generate

EOS = sft.BYTE_EOS_ID
CFG = ModelConfig(vocab_size=264, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=256, eos_id=EOS)


@pytest.fixture(scope="module")
def params():
  # Numpy init in init_params' shapes: compiling its initialisers would take
  # longer than all of these tests.
  rng = np.random.default_rng(0)

  def leaf(path, x):
    if jax.tree_util.keystr(path).endswith("['scale']"):
      return jnp.ones(x.shape, x.dtype)
    return jnp.asarray(rng.normal(0.0, 0.02, x.shape), x.dtype)

  return jax.tree_util.tree_map_with_path(
      leaf, jax.eval_shape(lambda: init_params(CFG, jax.random.PRNGKey(0))))


def test_pack_hand_built():
  examples = [([5, 6], [7, 8, 9]),           # 6 tokens with eos -> row 0
              ([10, 11, 12, 14], [15, 16]),  # 7: no room in row 0 -> row 1
              ([20], [21]),                  # 3: first fit is row 0 again
              ([4] * 8, [4])]                # 10 > seq_len: skipped
  batch, skipped = sft.pack(examples, seq_len=9, eos_id=EOS)
  assert skipped == 1
  np.testing.assert_array_equal(batch.tokens_NT, [[5, 6, 7, 8, 9, EOS, 20, 21, EOS],
                                                  [10, 11, 12, 14, 15, 16, EOS, 0, 0]])
  np.testing.assert_array_equal(batch.segment_ids_NT, [[1, 1, 1, 1, 1, 1, 2, 2, 2],
                                                       [1, 1, 1, 1, 1, 1, 1, 0, 0]])
  np.testing.assert_array_equal(batch.positions_NT, [[0, 1, 2, 3, 4, 5, 0, 1, 2],
                                                     [0, 1, 2, 3, 4, 5, 6, 0, 0]])
  # Position t is in the loss iff token t+1 is a response token or eos:
  # row 0 predicts 7 8 9 eos from 6 7 8 9, and 21 eos from 20 21.
  np.testing.assert_array_equal(batch.loss_mask_NT, [[0, 1, 1, 1, 1, 0, 1, 1, 0],
                                                     [0, 0, 0, 1, 1, 1, 0, 0, 0]])
  assert batch.tokens_NT.dtype == np.int32 and batch.loss_mask_NT.dtype == np.float32


def test_pack_random_examples_round_trip_and_never_cross_segments():
  rng = np.random.default_rng(0)
  examples = [(rng.integers(3, 50, rng.integers(1, 8)).tolist(),
               rng.integers(3, 50, rng.integers(0, 12)).tolist()) for _ in range(60)]
  batch, skipped = sft.pack(examples, seq_len=24, eos_id=EOS)
  assert skipped == 0
  found = []
  for r in range(batch.tokens_NT.shape[0]):
    seg, tok, pos, mask = (np.asarray(x[r]) for x in (batch.segment_ids_NT, batch.tokens_NT,
                                                       batch.positions_NT, batch.loss_mask_NT))
    ids = [s for s in np.unique(seg) if s]
    assert ids == list(range(1, len(ids) + 1))
    for s in ids:
      where = np.flatnonzero(seg == s)
      assert np.all(np.diff(where) == 1)  # contiguous
      np.testing.assert_array_equal(pos[where], np.arange(len(where)))
      found.append((tok[where].tolist(), mask[where].tolist()))
    # A masked position's target (t+1) is in the same, non-padding segment.
    t = np.flatnonzero(mask)
    assert np.all(t + 1 < len(seg)) and np.all(seg[t + 1] == seg[t]) and np.all(seg[t] > 0)
    assert np.all(tok[seg == 0] == 0)
  assert len(found) == len(examples)
  for prompt, response in examples:
    seq = prompt + response + [EOS]
    want_mask = [0.0] * (len(prompt) - 1) + [1.0] * (len(response) + 1) + [0.0]
    assert (seq, want_mask) in found


def test_pack_rejects_empty_prompt():
  with pytest.raises(ValueError, match="example 1"):
    sft.pack([([3], [4]), ([], [5])], seq_len=8, eos_id=EOS)


def test_loss_matches_numpy_and_packing_does_not_leak(params):
  examples = [([10, 11, 12], [13, 14]), ([20, 21], [22, 23, 24, 25]), ([30], [31]),
              ([40, 41, 42, 43], [44])]
  batch, _ = sft.pack(examples, seq_len=12, eos_id=EOS)
  assert batch.tokens_NT.shape == (3, 12)
  loss, metrics = jax.jit(sft.sft_loss, static_argnums=1)(params, CFG, batch)

  @jax.jit
  def log_softmax(tokens, positions, segments):
    logits = Transformer(CFG).apply({"params": params}, tokens, positions_BT=positions,
                                    segment_ids_BT=segments)
    return jax.nn.log_softmax(logits, -1)

  # Reference: the packed rows (plus an all-padding row) and, in the same
  # shapes, each example alone in its own row.
  def rows(x):
    return np.concatenate([x, np.zeros((1, 12), x.dtype)])
  logp = np.asarray(log_softmax(rows(batch.tokens_NT), rows(batch.positions_NT),
                                rows(batch.segment_ids_NT)))[:3]
  nll, correct, packed = [], [], {}
  for n, t in zip(*np.nonzero(batch.loss_mask_NT)):
    target = batch.tokens_NT[n, t + 1]
    nll.append(-logp[n, t, target])
    correct.append(logp[n, t].argmax() == target)
    packed.setdefault((n, batch.segment_ids_NT[n, t]), []).append(logp[n, t, target])
  np.testing.assert_allclose(float(loss), np.mean(nll), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["accuracy"]), np.mean(correct))
  assert float(metrics["tokens"]) == sum(len(r) + 1 for _, r in examples)

  alone_tokens = np.zeros((4, 12), np.int32)
  alone_segments = np.zeros((4, 12), np.int32)
  for i, (prompt, response) in enumerate(examples):
    seq = prompt + response + [EOS]
    alone_tokens[i, :len(seq)] = seq
    alone_segments[i, :len(seq)] = 1
  alone_logp = np.asarray(log_softmax(alone_tokens, np.tile(np.arange(12, dtype=np.int32), (4, 1)),
                                      alone_segments))
  alone = []
  for i, (prompt, response) in enumerate(examples):
    ts = range(len(prompt) - 1, len(prompt) + len(response))
    alone.append([alone_logp[i, t, alone_tokens[i, t + 1]] for t in ts])
  # Each example's response log-probs are the same packed as alone.
  assert sorted(map(len, packed.values())) == sorted(map(len, alone))
  for got in packed.values():
    assert any(len(a) == len(got) and np.allclose(a, got, atol=1e-5) for a in alone)


# A trivially learnable task: "Q:<d>+<d>=" -> "A:<2d>\n".
TOY = [(f"Q:{d}+{d}=", f"A:{2 * d}\n") for d in range(10)]
TOY_EXAMPLES = [(sft.byte_encode(p), sft.byte_encode(r)) for p, r in TOY]
TOY_SFT = sft.SFTConfig(steps=60, batch_size=4, seq_len=48, learning_rate=1e-2, warmup_steps=5,
                        weight_decay=0.0, log_every=10)


@pytest.fixture(scope="module")
def toy_run(params):
  logged = []
  trained, history = sft.run_sft(CFG, params, TOY_EXAMPLES, TOY_SFT, progress=False,
                                 log_fn=lambda step, m: logged.append(step))
  return trained, history, logged


def test_training_learns_toy_task_then_greedy_generates_response(params, toy_run):
  trained, history, logged = toy_run
  assert [h["step"] for h in history] == list(range(1, 61))
  assert logged == [10, 20, 30, 40, 50, 60]
  first, last = history[0]["loss"], np.mean([h["loss"] for h in history[-5:]])
  assert first > 4.0 and last < 0.2, (first, last)
  assert history[-1]["accuracy"] > 0.95
  outs = generate(CFG, trained, [e[0] for e in TOY_EXAMPLES], max_new_tokens=8, eos_id=EOS)
  assert all(o[-1] == EOS for o in outs)
  assert [sft.byte_decode(o) for o in outs] == [r for _, r in TOY]
  # The caller's params were not donated away.
  assert np.isfinite(np.asarray(params["embed"])).all()


def test_deterministic_for_a_seed(params, toy_run):
  trained, history, _ = toy_run
  again, history_again = sft.run_sft(CFG, params, TOY_EXAMPLES, TOY_SFT, progress=False)
  assert history_again == history
  jax.tree.map(np.testing.assert_array_equal, again, trained)
  _, other = sft.run_sft(CFG, params, TOY_EXAMPLES, dataclasses.replace(TOY_SFT, seed=1),
                         progress=False)
  assert [h["loss"] for h in other] != [h["loss"] for h in history]
  streams = [[b.tokens_NT for _, (_, b) in zip(range(6), sft.batches(TOY_EXAMPLES, TOY_SFT, EOS))]
             for _ in range(2)]
  np.testing.assert_array_equal(*streams)


@pytest.mark.parametrize("field,value", [("steps", 0), ("batch_size", -1), ("seq_len", 1),
                                         ("learning_rate", 0.0), ("warmup_steps", -2),
                                         ("clip_norm", 0.0), ("weight_decay", -0.1),
                                         ("log_every", 0), ("end_lr_frac", 1.5), ("b2", 1.0)])
def test_bad_config_names_the_field(field, value):
  with pytest.raises(ValueError, match=f"SFTConfig.{field}"):
    sft.SFTConfig(**{field: value})


def test_lr_schedule_warms_up_then_decays():
  cfg = sft.SFTConfig(steps=100, learning_rate=1e-3, warmup_steps=10, end_lr_frac=0.1)
  lr = sft.lr_schedule(cfg)
  assert 0 < float(lr(0)) < 1e-3
  np.testing.assert_allclose(float(lr(10)), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(float(lr(100)), 1e-4, rtol=1e-5)


def test_run_from_config_writes_a_run_directory_and_resumes_exactly(tmp_path, monkeypatch,
                                                                    params):
  monkeypatch.setattr(sft.job, "init_params", lambda cfg, rng: params)  # skip a re-compile
  config = sft.default_config()
  config.model = dataclasses.asdict(CFG)
  config.sft.update({k: v for k, v in dataclasses.asdict(TOY_SFT).items()})
  config.sft.update(n_examples=8, log_every=1, checkpoint_every=20)
  config.data.update(tasks=("add",), difficulties=(1, 2), n_train=8, n_heldout=10)
  # Same settings and decode shapes as the toy run: nothing new to compile.
  run = tmp_path / "run"
  acc = sft.run_from_config(config, str(run), max_new_tokens=8, progress=False)
  assert set(acc) == {"add/1", "add/2", "all"} and 0.0 <= acc["all"] <= 1.0
  rows = (run / "sft_metrics.jsonl").read_text().splitlines()
  assert [json.loads(r)["step"] for r in rows] == list(range(1, TOY_SFT.steps + 1))
  assert json.loads((run / "sft_eval.json").read_text()) == acc
  assert params_io.run_steps(run) == [20, 40, 60]
  cfg, trained = params_io.load_params(str(run))  # the trainer's init_from reads it so
  assert cfg == CFG

  # A run killed after step 40 (its later checkpoint and rows gone) continues
  # on the same batches: the same rows and weights as the uninterrupted run.
  shutil.rmtree(run / "checkpoints" / "60")
  (run / "sft_metrics.jsonl").write_text("\n".join(rows[:45]) + "\n")
  assert sft.run_from_config(config, str(run), max_new_tokens=8, progress=False) == acc
  assert (run / "sft_metrics.jsonl").read_text().splitlines() == rows
  _, again = params_io.load_params(str(run / "checkpoints" / "60"))
  jax.tree.map(np.testing.assert_array_equal, again, trained)
