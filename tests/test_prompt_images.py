"""Prompts with images: the `images` field of the JSONL schema, its errors,
and its way through the TFDS builder and seqio tasks."""
import base64
import io
import json
import os
import pathlib
import shutil

import numpy as np
import pytest
from PIL import Image

from kimi_jax.data import images
from kimi_jax.data import prompts
from kimi_jax.data.prompts import Prompt, PromptFileError

DATA = pathlib.Path(__file__).parent / "data"


def _png_bytes(seed=0, size=(5, 4)) -> bytes:
  buf = io.BytesIO()
  pixels = np.random.default_rng(seed).integers(0, 256, size[::-1] + (3,), dtype=np.uint8)
  Image.fromarray(pixels).save(buf, format="PNG")
  return buf.getvalue()


def _uri(seed=0) -> str:
  return "data:image/png;base64," + base64.b64encode(_png_bytes(seed)).decode()


@pytest.fixture()
def image_set(tmp_path):
  """A prompt file in tmp/set/ with images in tmp/set/img/ and one inline."""
  root = tmp_path / "set"
  (root / "img").mkdir(parents=True)
  (root / "img" / "a.png").write_bytes(_png_bytes(1))
  (root / "img" / "b.png").write_bytes(_png_bytes(2, (7, 3)))
  lines = [
      {"id": "one", "type": "math", "prompt": "How many dots?", "answer": "3",
       "images": ["img/a.png"]},
      {"id": "two", "type": "math", "prompt": "Left <image> or right <image>?",
       "answer": "left", "images": ["img/b.png", _uri(3)]},
      {"id": "none", "type": "math", "prompt": "1+1=", "answer": "2"},
  ]
  path = root / "prompts.jsonl"
  path.write_text("".join(json.dumps(x) + "\n" for x in lines))
  return path


def test_images_are_read_and_resolved(image_set):
  read = prompts.read_jsonl(image_set).prompts
  root = image_set.parent
  assert read[0].images == (str(root / "img" / "a.png"),)
  assert read[1].images[0] == str(root / "img" / "b.png") and read[1].images[1] == _uri(3)
  assert read[2].images == ()
  assert images.load_image(read[1].images[1]).size == (5, 4)
  assert "images" not in read[2].to_json()
  hash(read[1])  # images are left out of the hash (inline data can be large)


def test_write_read_round_trip_survives_moving_the_set(image_set, tmp_path):
  read = prompts.read_jsonl(image_set).prompts
  prompts.write_jsonl(read, image_set.parent / "copy.jsonl")
  written = [json.loads(line) for line in (image_set.parent / "copy.jsonl").read_text().splitlines()]
  assert written[0]["images"] == ["img/a.png"]  # relative to the file again
  moved = pathlib.Path(shutil.copytree(image_set.parent, tmp_path / "moved"))
  again = prompts.read_jsonl(moved / "copy.jsonl").prompts
  assert again[0].images == (str(moved / "img" / "a.png"),)
  assert [p.id for p in again] == [p.id for p in read] and again[1].images[1] == _uri(3)


def _bad_line(tmp_path, **fields):
  (tmp_path / "ok.png").write_bytes(_png_bytes())
  (tmp_path / "broken.png").write_bytes(_png_bytes()[:30])
  obj = {"id": "x", "type": "math", "prompt": "q", "answer": "1", **fields}
  path = tmp_path / "p.jsonl"
  path.write_text(json.dumps({"id": "fine", "type": "math", "prompt": "q", "answer": "1"})
                  + "\n" + json.dumps(obj) + "\n")
  return path


@pytest.mark.parametrize("fields,message", [
    (dict(images="ok.png"), r"field 'images': expected a list of image paths"),
    (dict(images=["ok.png", 3]), r"field 'images\[1\]': expected a path or data URI, got 3"),
    (dict(images=["ok.png", ""]), r"field 'images\[1\]': expected a path or data URI"),
    (dict(images=["ok.png", "missing.png"]), r"field 'images\[1\]': image file .*missing.png "
     "does not exist"),
    (dict(images=["broken.png"]), r"field 'images\[0\]': .*broken.png: cannot decode image"),
    (dict(images=["data:image/png;base64,AAAA"]), r"field 'images\[0\]': data:image.*cannot "
     "decode"),
    (dict(images=["data:image/png;base64,%%"]), r"field 'images\[0\]': .*not valid base64"),
    (dict(images=["ok.png"], prompt="<image> vs <image>"),
     r"field 'images': 1 images but the prompt has 2 '<image>' markers"),
    (dict(prompt="what is <image>?"), r"field 'images': 0 images but the prompt has 1"),
    (dict(image=["ok.png"]), r"field 'image': unknown field; did you mean 'images'\?"),
])
def test_bad_images_name_file_line_and_field(tmp_path, fields, message):
  path = _bad_line(tmp_path, **fields)
  with pytest.raises(PromptFileError, match=f"{path}:2: {message}"):
    prompts.read_jsonl(path)
  assert len(prompts.read_jsonl(path, skip_invalid=True)) == 1


def test_prompt_built_in_code_checks_structure_not_files():
  p = Prompt(id="a", type="math", prompt="<image>?", answer="1", images=["not/opened.png"])
  assert p.images == ("not/opened.png",)
  with pytest.raises(PromptFileError, match=r"Prompt 'a': field 'images': 2 images"):
    Prompt(id="a", type="math", prompt="<image>?", answer="1", images=["x.png", "y.png"])


def test_text_prompts_do_not_import_pil():
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  code = ("import sys; from kimi_jax.data import prompts; "
          "prompts.Prompt(id='a', type='math', prompt='q', answer='1'); "
          "assert 'PIL' not in sys.modules")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=DATA.parent.parent,
                 env={**os.environ, "PYTHONPATH": str(DATA.parent.parent)})


# ------------------------------------------------------------ TFDS / seqio


@pytest.fixture(scope="module")
def pipelines():
  from kimi_jax.data import prompt_pipelines  # pylint: disable=g-import-not-at-top
  return prompt_pipelines


def _numpy_examples(ds):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return list(tfds.as_numpy(ds))


def test_tfds_and_seqio_carry_the_image_bytes(pipelines, image_set, tmp_path):
  expected = prompts.read_jsonl(image_set).prompts
  task = pipelines.register_task("test_image_prompts", image_set, "bytes",
                                 max_prompt_length=1000, data_dir=str(tmp_path / "tfds"))
  examples = _numpy_examples(task.get_dataset(split="train", shuffle=False))
  assert [len(e["images"]) for e in examples] == [1, 2, 0]
  assert examples[0]["images"][0] == (image_set.parent / "img" / "a.png").read_bytes()
  back = [pipelines.prompt_from_example(e) for e in examples]
  for got, want in zip(back, expected):
    assert got.to_json() | {"images": None} == want.to_json() | {"images": None}
    assert [images.image_bytes(r) for r in got.images] == [images.image_bytes(r)
                                                           for r in want.images]
  assert back[0].images[0].startswith("data:image/png;base64,")


def test_editing_an_image_gives_a_fresh_config(pipelines, image_set):
  before = pipelines.prompt_set_config(image_set).name
  assert pipelines.prompt_set_config(image_set).name == before
  (image_set.parent / "img" / "a.png").write_bytes(_png_bytes(9, (6, 6)))
  assert pipelines.prompt_set_config(image_set).name != before
