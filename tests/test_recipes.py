"""Real-model recipes and the trainer's prompt-file path.

The full recipes are validated against the real checkpoints' config.json
(written here, no weights); their `:smoke` variants run end to end on a tiny
random checkpoint saved here with `hf.save_pretrained`, a byte-level BPE
tokenizer.json trained here, and a small prompt JSONL with one broken line.
"""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from configs import arith_tiny, llama3_8b_pod, qwen2_5_math_1_5b
from kimi_jax.data.prompts import PromptFileError
from kimi_jax.models import hf
from kimi_jax.models.transformer import ModelConfig, init_params
from kimi_jax.rl import settings, trainer
from kimi_jax.rl.evaluation import difficulty_bucket
from kimi_jax.sampling.finish import FinishReason
from kimi_jax.sampling.partial import Group, Trajectory

RECIPES = {"qwen2": qwen2_5_math_1_5b, "llama": llama3_8b_pod}
# The published config.json of each recipe's model (fields the loader reads).
REAL_CONFIGS = {
    "qwen2": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536,
                  intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False,
                  hidden_act="silu", bos_token_id=151643, eos_token_id=151643),
    "llama": dict(model_type="llama", vocab_size=128256, hidden_size=4096,
                  intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu",
                  bos_token_id=128000, eos_token_id=128001),
}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIALS = {"qwen2": ["<|endoftext|>"], "llama": ["<|begin_of_text|>", "<|end_of_text|>"]}

PROMPTS = [
    dict(id="m1", type="math", prompt="What is 2+3? Answer in \\boxed{}.", answer="5",
         difficulty=0.2),
    dict(id="m2", type="math", prompt="Simplify 6/8.", answer="\\frac{3}{4}", difficulty=0.7),
    dict(id="c1", type="code", prompt="Read two ints and print their sum.",
         tests=[{"input": "1 2\n", "output": "3\n"}], difficulty=0.9),
    dict(id="q1", type="multiple_choice", prompt="Which is prime? (A) 4 (B) 7", answer="B",
         difficulty=0.6),
    dict(id="t1", type="true_false", prompt="True or false: 9 is odd.", answer="true",
         difficulty=0.3),
]
HELDOUT = [
    dict(id="h1", type="math", prompt="What is 4*5?", answer="20", difficulty=0.4),
    dict(id="h2", type="true_false", prompt="True or false: 2 > 3.", answer="false",
         difficulty=0.8),
]
BROKEN = '{"id": "bad", "type": "math", "prompt": "no answer given"}'


def _write_jsonl(path, rows, broken_at=None):
  lines = [json.dumps(r) for r in rows]
  if broken_at is not None:
    lines.insert(broken_at, BROKEN)
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def _random_params(cfg):
  """Random weights in numpy: compiling `init_params` costs more than this test."""
  rng = np.random.default_rng(1)

  def draw(path, x):
    if "norm" in jax.tree_util.keystr(path):
      return np.ones(x.shape, x.dtype)
    return (0.1 * rng.standard_normal(x.shape)).astype(x.dtype)

  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
  return jax.tree_util.tree_map_with_path(draw, shapes)


def _tiny_checkpoint(directory, family):
  """A random 2-layer model of `family` saved as a HF checkpoint, with a
  tokenizer.json (byte-level BPE, ~300 ids) and tokenizer_config.json."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer_ = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS[family],
                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([r["prompt"] for r in PROMPTS + HELDOUT] * 4, trainer_)
  directory.mkdir()
  tok.save(str(directory / "tokenizer.json"))
  eos = SPECIALS[family][-1]
  (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos}))
  cfg = ModelConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2, qkv_bias=family == "qwen2",
                    tie_embeddings=family == "qwen2", max_position_embeddings=128,
                    family=family, eos_id=tok.token_to_id(eos),
                    bos_id=tok.token_to_id(SPECIALS[family][0]) if family == "llama" else None)
  hf.save_pretrained(cfg, _random_params(cfg), str(directory / "model"))
  for name in os.listdir(directory / "model"):  # one directory, as downloaded checkpoints are
    os.rename(directory / "model" / name, directory / name)
  os.rmdir(directory / "model")
  return str(directory)


def _smoke_config(tmp_path, family, *, broken_at=None, skip_invalid=True):
  ckpt = _tiny_checkpoint(tmp_path / f"hf_{family}", family)
  c = RECIPES[family].get_config("smoke")
  c.model.hf_path = ckpt  # the tokenizer follows (a reference to this field)
  c.data.train_file = _write_jsonl(tmp_path / "train.jsonl", PROMPTS, broken_at)
  c.data.heldout_file = _write_jsonl(tmp_path / "heldout.jsonl", HELDOUT)
  c.data.skip_invalid = skip_invalid
  return c


def test_llama_32k_variant_trains_32k_rows(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(REAL_CONFIGS["llama"]))
  c = llama3_8b_pod.get_config("32k")
  c.model.hf_path = str(tmp_path)
  s = settings.from_config(c)
  assert s.scheduler.max_length == s.model.max_position_embeddings == 32768
  assert s.model.scan_layers and s.model.remat == "full" and s.model.logits_chunk > 0


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_full_recipe_validates_against_the_real_config_json(tmp_path, family):
  (tmp_path / "config.json").write_text(json.dumps(REAL_CONFIGS[family]))
  c = RECIPES[family].get_config()
  c.model.hf_path = str(tmp_path)
  s = settings.from_config(c)
  real = REAL_CONFIGS[family]
  assert (s.model.num_layers, s.model.hidden_size, s.model.vocab_size) == (
      real["num_hidden_layers"], real["hidden_size"], real["vocab_size"])
  assert (s.model.param_dtype, s.model.dtype) == ("float32", "bfloat16")
  assert s.hf_path == str(tmp_path) and s.data.tokenizer == str(tmp_path)
  assert s.data.train_file.startswith(os.path.expanduser("~/data/k15/"))
  # The model's context, raised past the checkpoint's for the 16k-response recipe.
  assert s.scheduler.max_length == s.model.max_position_embeddings >= real[
      "max_position_embeddings"]
  assert (s.model.attention, s.model.remat, s.model.scan_layers) == ("auto", "full", True)
  assert s.model.logits_chunk > 0 and s.model.prefill_chunk > 0
  assert s.scheduler.num_slots == 8 * s.scheduler.samples_per_prompt * (8 if family == "qwen2" else 16)
  # 1-4 optimizer steps per iteration (method spec, impl. note 5).
  assert 1 <= s.scheduler.num_slots // s.rl.minibatch_size <= 4
  assert s.loss.tau == 0.1 and s.sampling.temperature == 1.0 and s.sft is None
  assert s.data.add_bos == (family == "llama")
  assert 0 < s.reward.length_penalty_start < s.prompts.hard_from_iteration < s.total_iterations


def test_hf_path_errors_name_the_key(tmp_path):
  c = qwen2_5_math_1_5b.get_config()
  c.model.hf_path = str(tmp_path / "missing")
  with pytest.raises(settings.ConfigError, match="config.model.hf_path: .*missing/config.json"):
    settings.from_config(c)
  (tmp_path / "config.json").write_text(json.dumps(REAL_CONFIGS["qwen2"]))
  c.model.hf_path = str(tmp_path)
  c.model.num_layers = 2  # an architecture key must agree with the checkpoint
  with pytest.raises(settings.ConfigError, match="config.model.num_layers=2 but .* says 28"):
    settings.from_config(c)
  c = qwen2_5_math_1_5b.get_config()
  c.model.hf_path = str(tmp_path)
  c.sft.steps = 10
  with pytest.raises(settings.ConfigError, match="config.sft.steps=10"):
    settings.from_config(c)
  c = qwen2_5_math_1_5b.get_config()
  c.model.hf_path = str(tmp_path)
  c.data.verifier_workers = 0
  with pytest.raises(settings.ConfigError, match="config.data: verifier_workers"):
    settings.from_config(c)


def test_broken_prompt_line_stops_the_run_before_any_work(tmp_path):
  c = _smoke_config(tmp_path, "qwen2", broken_at=2, skip_invalid=False)
  workdir = tmp_path / "run"
  workdir.mkdir()
  earlier = '{"iteration": 0, "eval/accuracy": 0.5}\n'
  (workdir / "metrics.jsonl").write_text(earlier)  # a resumed run's rows must survive
  with pytest.raises(PromptFileError, match=r"train.jsonl:3: field 'answer': missing"):
    trainer.run(c, str(workdir))
  assert (workdir / "metrics.jsonl").read_text() == earlier
  assert sorted(os.listdir(workdir)) == ["metrics.jsonl"]


def test_launcher_reports_a_broken_prompt_line_cleanly(tmp_path):
  c = _smoke_config(tmp_path, "qwen2", broken_at=0, skip_invalid=False)
  cmd = [sys.executable, "-m", "launch.train", "--config=configs/qwen2_5_math_1_5b.py:smoke",
         f"--workdir={tmp_path / 'run'}", f"--config.model.hf_path={c.model.hf_path}",
         f"--config.data.train_file={c.data.train_file}",
         f"--config.data.heldout_file={c.data.heldout_file}"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "error: " + c.data.train_file + ":1: field 'answer': missing" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "run" / "metrics.jsonl").exists()


def _group(prompt_idx, responses, task):
  trajs = []
  for j, text in enumerate(responses):
    prompt, response = task.encode("Q"), task.encode(text)
    tokens = np.asarray(prompt + response + [task.eos_id], np.int32)
    n = len(tokens) - len(prompt)
    trajs.append(Trajectory(prompt_idx, j, prompt_idx, tokens, len(prompt),
                            np.zeros(n, np.float32), np.zeros(n, np.int32), FinishReason.EOS,
                            0, 1, 1))
  return Group(prompt_idx, prompt_idx, trajs)


def test_verifier_that_raises_gives_zero_and_a_counted_reason():
  tr = trainer.Trainer(settings.from_config(arith_tiny.get_config("smoke")), "/unused")
  problem = tr.train[0]
  right = f"A:{problem.answer}\n"
  exact = tr.task.score

  def score(record, response):
    if response.startswith("boom"):
      raise RuntimeError("verifier bug")
    return exact(record, response)

  tr.task = dataclasses.replace(tr.task, score=score)
  groups = [_group(0, [right, "boom", right, "boom"], tr.task)]
  task_GK, total_GK, m = tr.rewards(groups, iteration=1)
  np.testing.assert_array_equal(task_GK, [[1, 0, 1, 0]])
  assert m["rollout/verifier_errors"] == 2
  assert m["rollout/verifier_errors/exception:RuntimeError"] == 2
  assert np.all(np.isfinite(total_GK))


def test_prompt_file_rewards_per_type(tmp_path):
  tr = trainer.Trainer(settings.from_config(_smoke_config(tmp_path, "llama", broken_at=1)),
                       str(tmp_path / "run"))
  assert tr.task.skipped_prompts == 1 and tr.task.metrics()["data/skipped_prompts"] == 1
  assert [p.id for p in tr.train] == ["m1", "m2", "c1", "q1", "t1"]
  # Llama prompts start with BOS; responses end at the tokenizer's EOS.
  assert tr.task.encode("hi")[0] == tr.s.model.bos_id
  assert tr.task.eos_id == tr.s.model.eos_id
  groups = [_group(0, ["so \\boxed{5}", "it is 6"], tr.task),
            _group(1, ["The answer is $\\frac{6}{8}$.", "0.75", ], tr.task),
            _group(2, ["```python\nprint(sum(map(int, input().split())))\n```", "print(("],
                   tr.task),
            _group(3, ["The answer is (B).", "\\boxed{A}"], tr.task),
            _group(4, ["The answer is True.", "The answer is false"], tr.task)]
  task_GK, _, m = tr.rewards(groups, iteration=1)
  np.testing.assert_array_equal(task_GK, [[1, 0], [1, 1], [1, 0], [1, 0], [1, 0]])
  assert m["rollout/verifier_errors"] == 0
  assert sorted(k for k in m if "_d" in k) == [f"rollout/response_tokens_d{d}"
                                               for d in (0.2, 0.3, 0.6, 0.7, 0.9)]


def test_difficulty_buckets():
  assert [difficulty_bucket(d) for d in (None, 3, 0.349, 0.35001, 2.0, 0.96)] == [
      None, 3, 0.3, 0.4, 2, 1]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_recipe_smoke_runs_on_a_tiny_checkpoint(tmp_path, family):
  c = _smoke_config(tmp_path, family, broken_at=3)
  rows = trainer.run(c, str(tmp_path / "run"))
  assert [r["iteration"] for r in rows] == [0, 1, 2]
  for r in rows:
    assert r["data/skipped_prompts"] == 1 and r["data/train_prompts"] == 5
    assert 0.0 <= r["eval/accuracy"] <= 1.0
  trained = [r for r in rows[1:] if r.get("train/steps", 0) > 0]
  assert trained, "no group finished within the smoke run"
  for r in trained:
    assert np.isfinite(r["train/loss"]) and -1.0 <= r["rollout/reward_mean"] <= 1.5
    assert r["rollout/verifier_errors"] == 0
  assert (tmp_path / "run" / "checkpoints" / "2").is_dir()
