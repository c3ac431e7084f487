"""Prompt files with images: a tiny random LLaVA directory, PNG prompts, the recipe's smoke run."""
import dataclasses
import json
import os

import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import jax

from configs import llava_qwen2_images
from kimi_jax.data import images as images_lib
from kimi_jax.models import hf_llava
from kimi_jax.models.transformer import init_params
from kimi_jax.rl import settings, tasks, trainer
from kimi_jax.rl.config_check import ConfigError
from multimodal_models import tiny_config

EOS, IMAGE = "<|endoftext|>", "<image>"
TRAIN = [
    dict(id="v1", type="math", prompt="<image>How many red dots? Answer in \\boxed{}.",
         answer="2", images=["img/a.png"], difficulty=0.3),
    dict(id="v2", type="true_false", prompt="True or false: the image is dark.", answer="true",
         images=["img/b.png"], difficulty=0.6),  # no marker: the image comes first
    dict(id="t1", type="math", prompt="What is 2+3? Answer in \\boxed{}.", answer="5",
         difficulty=0.2),  # text only, in the same set
]
HELDOUT = [dict(id="h1", type="math", prompt="<image>Count the dots.", answer="1",
                images=["img/a.png"], difficulty=0.4)]


def _tiny_llava(directory):
  """A random LLaVA (SigLIP 16 px tower + Qwen2 LM) with a tokenizer whose
  `<image>` special token is the placeholder id, and a 16 px processor."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator([r["prompt"] for r in TRAIN + HELDOUT] * 4, trainers.BpeTrainer(
      vocab_size=300, special_tokens=[EOS, IMAGE],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  directory.mkdir()
  tok.save(str(directory / "tokenizer.json"))
  (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS}))
  cfg = tiny_config(vocab_size=320, family="qwen2", qkv_bias=True, tie_embeddings=True,
                    eos_id=tok.token_to_id(EOS), image_token_id=tok.token_to_id(IMAGE))
  params = init_params(cfg, jax.random.PRNGKey(0))
  hf_llava.save_pretrained(cfg, params, directory / "model",
                           processor=images_lib.ProcessorConfig(height=16, width=16))
  for name in os.listdir(directory / "model"):
    os.rename(directory / "model" / name, directory / name)
  os.rmdir(directory / "model")
  return cfg


def _prompt_files(tmp_path):
  (tmp_path / "img").mkdir()
  rng = np.random.default_rng(0)
  for name in ("a", "b"):
    Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(
        tmp_path / "img" / f"{name}.png")
  for name, rows in (("train", TRAIN), ("heldout", HELDOUT)):
    (tmp_path / f"{name}.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\n")


def _config(tmp_path):
  cfg = _tiny_llava(tmp_path / "llava")
  _prompt_files(tmp_path)
  c = llava_qwen2_images.get_config("smoke")
  c.model.hf_path = str(tmp_path / "llava")
  c.data.train_file = str(tmp_path / "train.jsonl")
  c.data.heldout_file = str(tmp_path / "heldout.jsonl")
  return c, cfg


def test_prompt_file_task_encodes_markers_and_reads_pixels(tmp_path):
  c, cfg = _config(tmp_path)
  s = settings.from_config(c)
  # The tower computes in the recipe's dtype, like the LM.
  assert s.model.vision == cfg.vision.replace(dtype="bfloat16")
  assert s.model.image_token_id == cfg.image_token_id
  task = tasks.make_task(s)
  by_id = {p.id: p for p in task.train}
  assert task.image_slots == 1 and task.category(by_id["v2"]) == "true_false"
  ids = task.encode(by_id["v2"].prompt)  # no marker in the file: the image first
  assert ids[:4] == [cfg.image_token_id] * 4 and cfg.image_token_id not in ids[4:]
  assert task.encode(by_id["t1"].prompt).count(cfg.image_token_id) == 0
  pixels = task.images(by_id["v1"])
  want = images_lib.preprocess(images_lib.load_image(str(tmp_path / "img" / "a.png")),
                               images_lib.ProcessorConfig(height=16, width=16))
  np.testing.assert_array_equal(pixels[0], want)
  assert task.images(by_id["t1"]).shape == (0, 16, 16, 3)


def test_images_with_a_text_only_model_are_a_config_error(tmp_path):
  c, _ = _config(tmp_path)
  c.data.image_processor = str(tmp_path / "llava")
  s = settings.from_config(c)
  s = dataclasses.replace(s, model=s.model.language_model)
  with pytest.raises(ConfigError, match="has images but the model has no image encoder"):
    tasks.make_task(s)


@pytest.mark.slow
def test_llava_recipe_smoke_runs_on_image_prompts(tmp_path):
  c, _ = _config(tmp_path)
  rows = trainer.run(c, str(tmp_path / "run"))
  assert [r["iteration"] for r in rows] == [0, 1, 2]
  assert "eval/accuracy_task/math" in rows[0]
  trained = [r for r in rows[1:] if r.get("train/steps", 0) > 0]
  assert trained, "no group finished within the smoke run"
  assert all(np.isfinite(r["train/loss"]) for r in trained)
