"""long2short: pair rule, shortest rejection sampling, merging, DPO loss and step, sample files."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kimi_jax import parallel
from kimi_jax.data.prompts import PromptFileError
from kimi_jax.long2short import dpo, merge, rejection, report
from kimi_jax.long2short import samples as samples_lib
from kimi_jax.models import hf, params_io
from kimi_jax.models.transformer import ModelConfig, Transformer, init_params
from kimi_jax.rl import losses
from kimi_jax.rl.update import TrainState
from launch import convert

CFG = ModelConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_layers=2,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=64, eos_id=1)


def _params(seed, cfg=CFG):
  """Random params in init_params' shapes, drawn in numpy (no init compile)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype), shapes)


# ---------------------------------------------------------------- make_pairs

def test_make_pairs_rule():
  # chosen = 2 (shortest correct, length 4); 0 wrong and longer; 1 wrong and
  # shorter (kept out); 3 correct at 6 = 1.5 x 4 (rejected, the bound is >=);
  # 4 correct at 5 < 6 (kept out); 5 wrong at 4, a tie with the chosen (kept out).
  assert dpo.make_pairs([9, 3, 4, 6, 5, 4], [False, False, True, True, True, False]) == [
      (2, 0), (2, 3)]
  # Tied shortest correct samples: the first is chosen, the other is no
  # rejection (1.0 x its length < 1.5 x).
  assert dpo.make_pairs([5, 5, 8, 7], [False, True, True, True]) == [(1, 2)]
  assert dpo.make_pairs([5, 5, 7], [False, True, True], ratio=1.0) == [(1, 2)]
  assert dpo.make_pairs([4, 4], [True, True], ratio=1.0) == [(0, 1)]


def test_make_pairs_no_correct_and_all_correct():
  assert dpo.make_pairs([3, 9, 12], [False, False, False]) == []
  # All correct: only the ones >= ratio x the shortest are rejected.
  assert dpo.make_pairs([10, 14, 15, 30, 10], [True] * 5) == [(0, 2), (0, 3)]
  assert dpo.make_pairs([10, 14], [True, True], ratio=2.0) == []
  assert dpo.make_pairs([], []) == []
  with pytest.raises(ValueError, match="equal-length"):
    dpo.make_pairs([1, 2], [True])


# ---------------------------------------------------------------- rejection sampling

def _prompt_samples(prompt, lengths, correct, extra=None):
  responses = tuple(tuple(range(3, 3 + n)) for n in lengths)
  texts = tuple(f"{prompt}-r{i}" for i in range(len(lengths)))
  return samples_lib.PromptSamples(dict(extra or {}, prompt=prompt), responses, texts,
                                   tuple(correct))


def test_rejection_keeps_the_shortest_correct_and_drops_prompts_without_one(tmp_path):
  drawn = [_prompt_samples("p0", [7, 3, 5, 3], [True, False, True, True], {"id": "a"}),
           _prompt_samples("p1", [2, 4], [False, False], {"id": "b"}),
           _prompt_samples("p2", [6, 6], [True, True], {"id": "c", "answer": "12"})]
  assert rejection.shortest_correct([7, 3, 5, 3], [True, False, True, True]) == 3
  assert rejection.shortest_correct([2, 4], [False, False]) is None
  path = str(tmp_path / "rs.jsonl")
  stats = rejection.write_set(drawn, path)
  rows = [json.loads(line) for line in open(path)]
  assert rows == [{"id": "a", "prompt": "p0", "response": "p0-r3"},
                  {"id": "c", "answer": "12", "prompt": "p2", "response": "p2-r0"}]
  assert stats["kept"] == 2 and stats["prompts"] == 3 and stats["kept_tokens_mean"] == 4.5
  from kimi_jax.sft import data
  assert data.read_responses(path) == rows  # launch.sft reads what it writes


def test_rejection_with_no_correct_sample_writes_nothing(tmp_path):
  path = tmp_path / "rs.jsonl"
  path.write_text("kept\n")
  with pytest.raises(ValueError, match="none of 1 prompts has a correct sample"):
    rejection.write_set([_prompt_samples("p", [2, 3], [False, False])], str(path))
  assert path.read_text() == "kept\n"


# ---------------------------------------------------------------- merge

@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
  root = tmp_path_factory.mktemp("models")
  a, b = _params(0), _params(1)
  params_io.save_orbax(CFG, a, root / "a")
  hf.save_pretrained(CFG, b, str(root / "b_hf"))  # merging takes either format
  return root, a, b


def _load(path):
  return params_io.load_params(str(path))[1]


def test_merge_of_identical_checkpoints_is_the_identity(two_models, tmp_path):
  root, a, _ = two_models
  merge.merge(str(root / "a"), str(root / "a"), str(tmp_path / "m"), weight=0.3)
  jax.tree.map(np.testing.assert_array_equal, _load(tmp_path / "m"), a)


def test_merge_weights_zero_and_one_return_the_inputs(two_models, tmp_path):
  root, a, b = two_models
  for weight, want in ((0.0, a), (1.0, b)):
    out = tmp_path / f"m{weight}"
    merge.merge(str(root / "a"), str(root / "b_hf"), str(out), weight=weight)
    jax.tree.map(np.testing.assert_array_equal, _load(out), want)
  merge.merge(str(root / "a"), str(root / "b_hf"), str(tmp_path / "half"), weight=0.5)
  jax.tree.map(lambda m, x, y: np.testing.assert_allclose(m, (x + y) / 2, rtol=1e-6, atol=1e-7),
               _load(tmp_path / "half"), a, b)


def test_merged_checkpoint_is_read_by_init_from_and_convert(two_models, tmp_path):
  root, a, b = two_models
  out = tmp_path / "m"
  merge.merge(str(root / "a"), str(root / "b_hf"), str(out), weight=0.25)
  src = params_io.resolve(str(out))
  assert src.kind == "orbax" and params_io.config_for(src) == CFG
  convert.convert("orbax_to_hf", str(tmp_path / "hf"), str(out))
  _, exported = hf.load_pretrained(str(tmp_path / "hf"))
  jax.tree.map(np.testing.assert_array_equal, exported, _load(out))


def test_merge_refuses_mismatched_architectures_before_writing(two_models, tmp_path):
  root, _, _ = two_models
  other = CFG.replace(num_layers=1)
  shapes = jax.eval_shape(lambda: init_params(other, jax.random.PRNGKey(0)))
  params_io.save_orbax(other, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes),
                       tmp_path / "other")
  out = tmp_path / "m"
  with pytest.raises(ValueError, match=r"cannot merge orbax .*a with orbax .*other: different "
                     r"architectures \(num_layers: 2 vs 1\)"):
    merge.merge(str(root / "a"), str(tmp_path / "other"), str(out))
  assert not out.exists()
  out.mkdir()
  (out / "keep").write_text("x")
  with pytest.raises(FileExistsError, match="not empty"):
    merge.merge(str(root / "a"), str(root / "a"), str(out))
  assert os.listdir(out) == ["keep"]


# ---------------------------------------------------------------- DPO

def test_dpo_loss_and_gradient_by_hand():
  beta = 0.5
  pc, pr = jnp.array([-1.0, -4.0]), jnp.array([-3.0, -1.0])
  rc, rr = jnp.array([-2.0, -3.0]), jnp.array([-2.0, -2.0])
  # margins: 0.5 * ((-1 + 2) - (-3 + 2)) = 1 and 0.5 * ((-4 + 3) - (-1 + 2)) = -1
  loss, aux = losses.dpo_loss(pc, pr, rc, rr, beta, return_aux=True)
  want = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0))) / 2
  np.testing.assert_allclose(float(loss), want, rtol=1e-6)
  assert float(aux["accuracy"]) == 0.5 and abs(float(aux["margin"])) < 1e-7
  # d loss / d pc_p = -beta * sigmoid(-margin_p) / P; d / d pr_p is its negative.
  sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
  g_pc, g_pr = jax.grad(lambda c, r: losses.dpo_loss(c, r, rc, rr, beta), (0, 1))(pc, pr)
  want_pc = [-beta * sig(-1.0) / 2, -beta * sig(1.0) / 2]
  np.testing.assert_allclose(g_pc, want_pc, rtol=1e-6)
  np.testing.assert_allclose(g_pr, [-g for g in want_pc], rtol=1e-6)
  g_ref = jax.grad(lambda c: losses.dpo_loss(pc, pr, c, rr, beta))(rc)
  np.testing.assert_array_equal(g_ref, [0.0, 0.0])  # the reference is frozen


def _pair_set():
  rng = np.random.default_rng(0)
  drawn = []
  for p in range(6):
    lengths = rng.integers(2, 9, 4)
    responses = tuple(tuple(rng.integers(3, CFG.vocab_size, n).tolist()) + (1,) for n in lengths)
    correct = (True, False, bool(p % 2), False)
    drawn.append(samples_lib.PromptSamples({"prompt": f"q{p}"}, responses,
                                           ("",) * 4, correct))
  encode = lambda text: [5 + len(text), 7, 9]  # noqa: E731
  return dpo.build_pairs(drawn, encode, ratio=1.2)


def test_build_pairs_rows_and_masks():
  ps = _pair_set()
  S, T = ps.tokens_ST.shape
  assert T % 16 == 0 and ps.pairs_P2.max() < S and ps.prompts >= 1
  for n in range(S):  # the mask covers exactly the response after the 3 prompt tokens
    on = np.flatnonzero(ps.mask_ST[n])
    assert on[0] == 3 and ps.tokens_ST[n, on[-1]] == 1 and np.all(np.diff(on) == 1)


def test_dpo_step_on_a_mesh_matches_a_direct_computation():
  """One SGD step of the microbatched, sharded DPO step moves the params by
  exactly -lr * the gradient of mean_p dpo_loss, computed here without
  microbatches, sharding or kimi_jax's log-prob helper."""
  cfg_1 = CFG.replace(num_layers=1)  # one layer: compiling the sharded step costs less
  ps = _pair_set()
  params = _params(3, cfg_1)
  P = 8
  idx = np.arange(P) % len(ps.pairs_P2)
  ref_S = dpo.reference_logprobs(cfg_1, params, ps, rows_per_call=4)
  batch = dpo.pair_batch(ps, ref_S, idx)
  beta, lr = 0.3, 0.5

  def seq_logp(p, tokens, mask):
    logp = jax.nn.log_softmax(Transformer(cfg_1).apply({"params": p}, tokens), -1)
    picked = jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)[..., 0]
    return jnp.sum(picked * mask[:, 1:], -1)

  def direct(p):
    return losses.dpo_loss(seq_logp(p, batch.chosen_tokens_PT, batch.chosen_mask_PT),
                           seq_logp(p, batch.rejected_tokens_PT, batch.rejected_mask_PT),
                           batch.ref_chosen_P, batch.ref_rejected_P, beta)

  np.testing.assert_allclose(ref_S, [float(x) for x in seq_logp(params, ps.tokens_ST,
                                                                ps.mask_ST)], rtol=1e-5)
  want_loss, want_grads = jax.value_and_grad(direct)(params)
  cfg = dpo.DPOConfig(beta=beta, batch_size=P, microbatch_size=4)
  opt = optax.apply_if_finite(optax.sgd(lr), 10)
  layout = parallel.Layout.train(parallel.make_mesh(parallel.MeshConfig(2, 2, 2)), cfg_1)
  step = dpo.make_dpo_step(cfg_1, cfg, opt, layout)
  placed = parallel.reshard(params, layout)
  state = TrainState(params=placed, opt_state=jax.jit(
      opt.init, out_shardings=layout.opt_state(opt))(placed),
      step=jax.device_put(np.int32(0), layout.replicated),
      skipped=jax.device_put(np.int32(0), layout.replicated))
  state, metrics = step(state, jax.device_put(batch, layout.batch()))
  np.testing.assert_allclose(float(metrics["dpo/loss"]), float(want_loss), rtol=1e-5)
  # Float sums in another order: compare updates to the gradient's scale.
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(want_grads))
  jax.tree.map(lambda new, old, g: np.testing.assert_allclose(
      (np.asarray(old) - np.asarray(new)) / lr, g, atol=1e-4 * scale), state.params, params,
      want_grads)
  assert int(state.step) == 1 and 0.0 <= float(metrics["dpo/accuracy"]) <= 1.0


def test_dpo_set_without_pairs_is_a_clear_error():
  drawn = [_prompt_samples("p0", [3, 4], [False, False]),
           _prompt_samples("p1", [5, 3], [True, False])]  # the wrong one is shorter
  with pytest.raises(ValueError, match=r"DPO set s\.jsonl: no \(chosen, rejected\) pair in 2 "
                     r"prompts \(1 with a correct sample"):
    dpo.build_pairs(drawn, lambda t: [3], source="s.jsonl")


# ---------------------------------------------------------------- samples files

def test_samples_file_round_trip_and_errors(tmp_path):
  drawn = [_prompt_samples("p0", [2, 3], [True, False], {"id": "x", "difficulty": 2})]
  path = str(tmp_path / "s.jsonl")
  samples_lib.write(drawn, path)
  assert samples_lib.read(path) == drawn
  line = json.loads(open(path).read())
  del line["correct"]
  (tmp_path / "bad.jsonl").write_text("\n" + json.dumps(line) + "\n")
  with pytest.raises(PromptFileError, match=r"bad\.jsonl:2: field 'correct': missing"):
    samples_lib.read(str(tmp_path / "bad.jsonl"))


def test_draw_verifies_every_sample_and_counts_unfinished_ones_wrong():
  """A verifier that accepts everything: a sample is correct iff it ended in EOS."""
  from kimi_jax.rl.tasks import Task

  class Record:
    def __init__(self, i):
      self.id, self.prompt, self.difficulty = f"r{i}", f"q{i}", 1

    def to_json(self):
      return {"id": self.id, "prompt": self.prompt, "difficulty": self.difficulty}

  encode = lambda text: [3 + ord(ch) % 30 for ch in text]  # noqa: E731
  task = Task([], [], encode, lambda ids: " ".join(map(str, ids)), eos_id=1, vocab_size=40,
              score=lambda record, text: 1.0)
  drawn = samples_lib.draw(CFG, _params(5), task, [Record(i) for i in range(3)], 4,
                           max_new_tokens=5, seed=0, batch_size=8)
  assert [d.record for d in drawn] == [Record(i).to_json() for i in range(3)]
  for d in drawn:
    assert len(d.responses) == len(d.correct) == 4
    assert all(1 <= len(r) <= 5 for r in d.responses)
    assert list(d.correct) == [r[-1] == 1 for r in d.responses]


@pytest.mark.parametrize("override,match", [
    ("--config.long_from=/nonexistent/run", "error: checkpoint /nonexistent/run does not exist"),
    ("--config.dpo.batch_size=3", r"error: config\.dpo: DPOConfig\.batch_size \(3\) must be a "
                                  r"multiple of microbatch_size \(2\)"),
    ("--config.l2s_rl.rollout.max_length=999", r"error: config\.l2s_rl: config\.rollout\."
                                                r"max_length \(999\) exceeds"),
])
def test_comparison_launcher_bad_config_is_one_line_before_any_work(tmp_path, override, match):
  import re
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
      [sys.executable, "-m", "launch.long2short", "--config=configs/long2short_tiny.py:smoke",
       f"--workdir={tmp_path / 'l2s'}", override], cwd=repo, capture_output=True, text=True,
      timeout=300, env=dict(os.environ, PYTHONPATH=repo))
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert re.search(match, proc.stderr) and "Traceback" not in proc.stderr
  assert not os.path.exists(tmp_path / "l2s" / "long")  # no stage ran


def test_verdict_against_the_target_and_the_control():
  def ev(acc, tokens):
    return {"eval/accuracy": acc, "eval/response_tokens_mean": tokens,
            "eval/accuracy_d1": acc, "eval/response_tokens_d1": tokens}
  evals = {"long": ev(0.50, 60.0), "short": ev(0.20, 6.0), "rs": ev(0.49, 50.0),
           "l2s_rl": ev(0.49, 36.0), "more_rl": ev(0.52, 40.0)}
  v = report.summarize(evals)["verdict"]
  # -1 point at exactly 60% of the tokens meets the target (both bounds inclusive).
  assert v["target_met"] and v["token_share_vs_long"] == pytest.approx(0.6)
  assert v["rl_best_accuracy_per_token"]  # 1.36 / 100 tokens against rs's 0.98
  assert v["vs_control"]["accuracy_points"] == pytest.approx(-3.0)
  assert v["vs_control"]["token_share"] == pytest.approx(0.9)
  assert not v["vs_control"]["control_meets_target"]  # 40 tokens is 67%
  evals["l2s_rl"] = ev(0.47, 36.0)  # -3 points: missed
  assert not report.summarize(evals)["verdict"]["target_met"]
  del evals["more_rl"]
  assert "vs_control" not in report.summarize(evals)["verdict"]
