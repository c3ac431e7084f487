"""launch.sft with images: response files whose records show images, and the
synthetic visual tasks (config.data.kind = "visual")."""
import base64
import json
import pathlib
import shutil

import numpy as np
import pytest

from configs import visual_tiny
from kimi_jax import sft
from kimi_jax.data import images
from kimi_jax.data import visual
from kimi_jax.data.prompts import PromptFileError
from kimi_jax.models import params_io
from kimi_jax.rl import visual_task

PICTURES = pathlib.Path(__file__).parent / "data" / "llava_images"
MODEL = dict(vocab_size=visual.VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_layers=1,
             num_heads=2, num_kv_heads=1, max_position_embeddings=128,
             image_token_id=visual.IMAGE_TOKEN_ID,
             vision=dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32,
                         num_layers=1, num_heads=2))


def _rows(tmp_path):
  """Four records: images by relative path, by data URI, and without a marker."""
  (tmp_path / "img").mkdir(exist_ok=True)
  for name in ("a_rgb_40x24.png", "e_rgb_32x32.png"):
    shutil.copy(PICTURES / name, tmp_path / "img" / name)
  uri = "data:image/png;base64," + base64.b64encode(
      (PICTURES / "b_rgba_20x20.png").read_bytes()).decode()
  return [
      {"prompt": "<image>Q:shape?=", "response": "A:square", "images": ["img/a_rgb_40x24.png"]},
      {"prompt": "Q:which is bigger, <image> or <image>?=", "response": "A:first",
       "images": ["img/e_rgb_32x32.png", uri]},
      {"prompt": "Q:colour?=", "response": "A:red", "images": ["img/e_rgb_32x32.png"]},
      {"prompt": "Q:text only=", "response": "A:yes"},
  ]


def _write(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def _config(train_file, steps=30):
  c = sft.default_config()
  c.model = dict(MODEL)
  c.data.update(train_file=str(train_file), tokenizer="bytes")
  c.sft.update(steps=steps, batch_size=2, seq_len=96, learning_rate=1e-2, warmup_steps=2,
               weight_decay=0.0, log_every=10)
  return c


def test_records_with_images_become_examples_with_their_pixels(tmp_path):
  path = _write(tmp_path / "train.jsonl", _rows(tmp_path))
  records = sft.read_responses(path)
  assert records[0]["images"] == [str(tmp_path / "img" / "a_rgb_40x24.png")]  # resolved
  proc = images.ProcessorConfig(height=32, width=32)
  enc = sft.data.ImageEncoding(proc, tokens_per_image=16, image_token_id=visual.IMAGE_TOKEN_ID)
  examples = sft.response_examples(records, sft.make_codec("bytes"), enc)
  P = [visual.IMAGE_TOKEN_ID] * 16
  b = lambda s: sft.byte_encode(s)  # noqa: E731
  assert list(examples[0].prompt) == P + b("Q:shape?=")
  assert list(examples[1].prompt) == b("Q:which is bigger, ") + P + b(" or ") + P + b("?=")
  assert list(examples[2].prompt) == P + b("Q:colour?=")  # no marker: the image first
  assert list(examples[0].response) == b("A:square")
  np.testing.assert_array_equal(examples[1].images, images.preprocess_batch(
      [str(PICTURES / "e_rgb_32x32.png"), str(PICTURES / "b_rgba_20x20.png")], proc))
  assert len(examples[3]) == 2  # text only
  with pytest.raises(ValueError, match="record 0 .* has images but the model has no image"):
    sft.response_examples(records, sft.make_codec("bytes"))


def test_sft_on_a_response_file_with_images_learns_and_keeps_the_processor(tmp_path):
  c = _config(_write(tmp_path / "train.jsonl", _rows(tmp_path)))
  assert sft.run_from_config(c, str(tmp_path / "run"), progress=False) == {}
  rows = [json.loads(l) for l in open(tmp_path / "run" / "sft_metrics.jsonl")]
  assert len(rows) == 30 and np.mean([r["loss"] for r in rows[-5:]]) < 0.5 * rows[0]["loss"]
  assert images.load_processor(tmp_path / "run") == images.ProcessorConfig(height=32, width=32)
  # A later SFT from this run preprocesses with the run's processor.
  odd = images.ProcessorConfig(height=32, width=32, resample=2, image_mean=(0.4, 0.4, 0.4))
  images.save_processor(odd, tmp_path / "run")
  c2 = _config(tmp_path / "train.jsonl", steps=2)
  c2.init_from, c2.model = str(tmp_path / "run"), {}
  sft.run_from_config(c2, str(tmp_path / "run2"), progress=False)
  assert images.load_processor(tmp_path / "run2") == odd
  assert params_io.load_params(str(tmp_path / "run2"))[0].vision is not None


@pytest.mark.parametrize("edit,match", [
    (lambda r: r.update(images=["img/missing.png"]),
     r"train\.jsonl:1: field 'images\[0\]': image file .*missing\.png does not exist"),
    (lambda r: r.update(images=["data:image/png;base64,AAAA"]),
     r"train\.jsonl:1: field 'images\[0\]'"),
    (lambda r: r.update(prompt="<image><image>Q:=", images=["img/a_rgb_40x24.png"]),
     r"train\.jsonl:1: field 'images': 1 images but the prompt has 2 '<image>' markers"),
    (lambda r: r.update(images="img/a_rgb_40x24.png"),
     r"train\.jsonl:1: field 'images': expected a list"),
])
def test_bad_images_name_file_line_field_and_write_nothing(tmp_path, edit, match):
  rows = _rows(tmp_path)
  edit(rows[0])
  with pytest.raises(PromptFileError, match=match):
    sft.run_from_config(_config(_write(tmp_path / "train.jsonl", rows)), str(tmp_path / "run"),
                        progress=False)
  assert not (tmp_path / "run").exists()


def test_images_for_a_text_model_or_a_wrong_processor_are_config_errors(tmp_path):
  path = _write(tmp_path / "train.jsonl", _rows(tmp_path))
  c = _config(path)
  c.model = {k: v for k, v in MODEL.items() if k not in ("vision", "image_token_id")}
  with pytest.raises(ValueError, match=r"train\.jsonl: record 1 has images but the model has no "
                                       "image encoder"):
    sft.run_from_config(c, str(tmp_path / "run"), progress=False)
  images.save_processor(images.ProcessorConfig(height=64, width=64), tmp_path)
  c = _config(path)
  c.data.image_processor = str(tmp_path)
  with pytest.raises(ValueError, match="image_processor: .*: resizes to 64x64 but the model's "
                                       "tower takes 32 px"):
    sft.run_from_config(c, str(tmp_path / "run"), progress=False)
  assert not (tmp_path / "run").exists()


def test_the_visual_tasks_train_and_evaluate_per_task(tmp_path, capsys):
  """launch.sft --config=configs/visual_tiny.py:smoke: the RL config's visual
  data, SFT with images, greedy held-out accuracy per task and level; a
  progress line per log_every steps (the bar is off in a log file)."""
  c = visual_tiny.get_config("smoke")
  c.sft.log_every = 5
  acc = sft.run_from_config(c, str(tmp_path / "run"), num_samples=1)
  out = capsys.readouterr().out
  assert "sft step 5/10 | loss " in out and "sft step 10/10 | loss " in out, out
  tasks = {k.split("/")[0] for k in acc if k != "all"}
  assert tasks == set(c.data.tasks) and 0.0 <= acc["all"] <= 1.0
  assert json.loads((tmp_path / "run" / sft.job.EVAL_FILE).read_text()) == acc
  assert images.load_processor(tmp_path / "run") == visual_task.PROCESSOR
