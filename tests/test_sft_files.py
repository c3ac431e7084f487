"""launch.sft on a prompt/response JSONL with a HF tokenizer.json, from a tiny HF checkpoint.

The tokenizer (byte-level BPE) and the random 2-layer Llama are made here,
as in tests/test_recipes.py; nothing is downloaded.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from configs import arith_tiny
from kimi_jax import sft
from kimi_jax.data.prompts import PromptFileError
from kimi_jax.models import hf, params_io
from kimi_jax.models.transformer import ModelConfig, init_params
from kimi_jax.rl import settings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = [{"id": f"m{i}", "type": "math", "prompt": f"What is {i} plus {i}?",
         "response": f"Twice {i} is {2 * i}. The answer is {2 * i}.", "answer": str(2 * i),
         "difficulty": 0.5} for i in range(6)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A HF directory: tokenizer.json (+ tokenizer_config.json) and random weights."""
  d = tmp_path_factory.mktemp("hf")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator([r["prompt"] + " " + r["response"] for r in ROWS] * 4,
                          trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                              show_progress=False,
                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(str(d / "tokenizer.json"))
  (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
  cfg = ModelConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2, max_position_embeddings=128,
                    eos_id=tok.token_to_id("<|endoftext|>"))
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
  params = jax.tree.map(lambda x: rng.normal(0, 0.05, x.shape).astype(x.dtype), shapes)
  hf.save_pretrained(cfg, params, str(d / "model"))
  for name in os.listdir(d / "model"):  # one directory, as downloaded checkpoints are
    os.rename(d / "model" / name, d / name)
  return d, tok


def _config(checkpoint, train_file, steps=80):
  c = sft.default_config()
  c.init_from = str(checkpoint)
  c.model = {}
  c.data.update(train_file=str(train_file), tokenizer=str(checkpoint))
  c.sft.update(steps=steps, batch_size=2, seq_len=64, learning_rate=1e-2, warmup_steps=2,
               weight_decay=0.0, log_every=10)
  return c


def _write(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def test_sft_on_jsonl_with_a_hf_tokenizer_from_a_hf_checkpoint(checkpoint, tmp_path):
  ckpt, tok = checkpoint
  c = _config(ckpt, _write(tmp_path / "train.jsonl", ROWS))
  assert sft.run_from_config(c, str(tmp_path / "run"), progress=False) == {}  # no held-out set
  rows = [json.loads(l) for l in open(tmp_path / "run" / "sft_metrics.jsonl")]
  assert len(rows) == 80
  # Examples in the tokenizer's ids (prompt and response encoded apart, as
  # the trainer encodes prompts); the response-only loss learns them.
  examples = sft.response_examples(ROWS, sft.make_codec(str(ckpt)))
  assert examples[1] == (tok.encode(ROWS[1]["prompt"]).ids, tok.encode(ROWS[1]["response"]).ids)
  last = np.mean([r["loss"] for r in rows[-5:]])
  assert last < 0.3 * rows[0]["loss"], (rows[0]["loss"], last)
  # The run directory carries its model config: the trainer starts from it.
  cfg, _ = params_io.load_params(str(tmp_path / "run"))
  assert cfg == hf.load_pretrained(str(ckpt))[0].replace(dtype="float32")
  rl = arith_tiny.get_config("smoke")
  rl.init_from, rl.model, rl.sft.steps = str(tmp_path / "run"), {}, 0
  rl.rollout.max_length = 96  # the checkpoint holds 128 positions
  rl.data = dict(train_file=str(tmp_path / "p.jsonl"), heldout_file=str(tmp_path / "h.jsonl"),
                 tokenizer=str(ckpt))
  assert settings.from_config(rl).model == cfg


@pytest.mark.parametrize("line,match", [
    ({"prompt": "What is 1 plus 1?"}, r"train\.jsonl:3: field 'response': missing"),
    ({"prompt": "q", "respones": "a"}, r"train\.jsonl:3: field 'response': missing \(found "
                                       r"'respones': a typo\?\)"),
    ({"prompt": "", "response": "a"}, r"train\.jsonl:3: field 'prompt': must not be empty"),
    ({"prompt": "q", "response": 7}, r"train\.jsonl:3: field 'response': expected a string"),
])
def test_a_bad_line_names_file_line_field_and_writes_nothing(checkpoint, tmp_path, line, match):
  ckpt, _ = checkpoint
  path = tmp_path / "train.jsonl"
  path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(line) + "\n")
  with pytest.raises(PromptFileError, match=match):
    sft.run_from_config(_config(ckpt, path), str(tmp_path / "run"), progress=False)
  assert not (tmp_path / "run").exists()


def test_tokenizer_larger_than_the_model_is_a_config_error(tmp_path, checkpoint):
  _, tok = checkpoint
  c = sft.default_config()  # random init of a model too small for the tokenizer's 301 ids
  c.model.update(vocab_size=64)
  c.data.update(train_file=str(_write(tmp_path / "t.jsonl", ROWS)),
                tokenizer=str(tmp_path / "tok.json"))
  tok.save(str(tmp_path / "tok.json"))
  with pytest.raises(ValueError, match=r"config\.data\.tokenizer: .*vocab_size 64 is smaller"):
    sft.run_from_config(c, str(tmp_path / "run"), progress=False)


def test_launcher_reports_bad_input_in_one_line(tmp_path):
  (tmp_path / "t.jsonl").write_text('{"prompt": "q"}\n')
  proc = subprocess.run(
      [sys.executable, "-m", "launch.sft", "--config=configs/sft_files.py",
       f"--workdir={tmp_path / 'run'}", f"--config.init_from={tmp_path / 'missing'}",
       f"--config.data.train_file={tmp_path / 't.jsonl'}"],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, PYTHONPATH=REPO))
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "error: config.init_from: checkpoint" in proc.stderr
  assert "Traceback" not in proc.stderr
