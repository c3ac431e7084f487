"""Image loading and preprocessing (data/images.py): equal to HF's image
processors, clear errors, placeholder expansion.

The reference pixel values come from transformers' SiglipImageProcessor and
LlavaOnevisionImageProcessor (PIL backend) via
tests/data/make_llava_reference.py; the same PIL and numpy operations run
here, so the comparison is exact. `live_` tests run transformers itself on
other images when it is installed.
"""
import base64
import io
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from kimi_jax.data import images

DATA = pathlib.Path(__file__).parent / "data"
REF = dict(np.load(DATA / "llava_reference.npz"))
FILES = [DATA / "llava_images" / f for f in REF["image_files"]]
MODELS = ("llava_tiny_llama", "llava_tiny_qwen2")


@pytest.mark.parametrize("name", MODELS)
def test_preprocessing_equals_the_hf_processor(name):
  proc = images.load_processor(DATA / name)
  for i, f in enumerate(FILES):
    got = images.preprocess(images.load_image(str(f)), proc)
    assert got.dtype == np.float32 and got.shape == (32, 32, 3)
    np.testing.assert_array_equal(got, REF[f"{name}_pixel_values"][i].transpose(1, 2, 0),
                                  err_msg=f"{name} {f.name}")


def test_processor_fields_are_read():
  siglip = images.load_processor(DATA / "llava_tiny_llama" / "preprocessor_config.json")
  assert siglip.image_mean == (0.48145466, 0.4578275, 0.40821073) and siglip.resample == 3
  onevision = images.load_processor(DATA / "llava_tiny_qwen2")  # ignores anyres tiles
  assert onevision.image_std == (0.5, 0.5, 0.5) and (onevision.height, onevision.width) == (32, 32)
  assert images.processor_from_hf(images.processor_to_hf(siglip)) == siglip


def test_transparency_goes_on_white_and_grey_to_rgb():
  rgba = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
  rgba.putpixel((1, 0), (10, 20, 30, 255))
  np.testing.assert_array_equal(images.to_rgb(rgba), [[[255, 255, 255], [10, 20, 30]]])
  np.testing.assert_array_equal(images.to_rgb(Image.new("L", (1, 1), 7)), [[[7, 7, 7]]])


def test_arrays_and_slots():
  proc = images.ProcessorConfig(height=4, width=4, do_resize=False)
  arr = np.full((4, 4, 3), 255, np.uint8)
  np.testing.assert_array_equal(images.preprocess(arr, proc), 1.0)  # (1 - 0.5) / 0.5
  batch = images.preprocess_batch([arr], proc, slots=3)
  assert batch.shape == (3, 4, 4, 3) and (batch[1:] == 0).all()
  with pytest.raises(images.ImageError, match="2 images do not fit in 1 image slots"):
    images.preprocess_batch([arr, arr], proc, slots=1)
  with pytest.raises(images.ImageError, match="image is 5x4 but do_resize is false"):
    images.preprocess(np.zeros((4, 5, 3), np.uint8), proc)
  with pytest.raises(images.ImageError, match=r"uint8 \[height, width, 3\]"):
    images.preprocess(np.zeros((4, 4), np.float32), proc)


def _png() -> bytes:
  buf = io.BytesIO()
  noise = np.random.default_rng(0).integers(0, 256, (2, 3, 3), dtype=np.uint8)
  Image.fromarray(noise).save(buf, format="PNG")
  return buf.getvalue()


def test_data_uris_round_trip_and_bad_ones_are_named(tmp_path):
  uri = images.to_data_uri(_png())
  assert uri.startswith("data:image/png;base64,")
  assert images.load_image(uri).size == (3, 2)
  with pytest.raises(images.ImageError, match="not valid base64"):
    images.load_image("data:image/png;base64,@@@")
  with pytest.raises(images.ImageError, match="not a base64 image data URI"):
    images.load_image("data:image/png,rawbytes")
  truncated = "data:image/png;base64," + base64.b64encode(_png()[:len(_png()) // 2]).decode()
  with pytest.raises(images.ImageError, match="cannot decode image"):
    images.load_image(truncated)
  (tmp_path / "x.png").write_bytes(b"not an image")
  with pytest.raises(images.ImageError, match="cannot decode image"):
    images.load_image(str(tmp_path / "x.png"))
  with pytest.raises(FileNotFoundError, match="image file .*nope.png does not exist"):
    images.load_image(str(tmp_path / "nope.png"))


@pytest.mark.parametrize("edit,message", [
    ({"do_center_crop": True}, "field 'do_center_crop': center cropping"),
    ({"size": {"shortest_edge": 336}}, "field 'size': expected"),
    ({"resample": 9}, "resample must be a PIL code"),
    ({"image_std": [0.5, 0.0, 0.5]}, "must not contain 0"),
    ({"image_mean": [0.5, 0.5]}, "needs 3 values"),
    ({"do_rescal": True}, "field 'do_rescal': unknown image processor field"),
])
def test_unsupported_processor_configs_are_named(tmp_path, edit, message):
  config = json.loads((DATA / "llava_tiny_llama" / "preprocessor_config.json").read_text())
  config.update(edit)
  path = tmp_path / "preprocessor_config.json"
  path.write_text(json.dumps(config))
  with pytest.raises(images.ImageError, match=f"{path}: .*{message}"):
    images.load_processor(tmp_path)
  with pytest.raises(FileNotFoundError, match="image processor config"):
    images.load_processor(tmp_path / "missing")


def test_markers_expand_to_placeholder_ids():
  encode = lambda s: [ord(c) for c in s]  # noqa: E731
  assert images.encode_with_images(encode, "a<image>b<image>", 2, 3, 0) == [
      97, 0, 0, 0, 98, 0, 0, 0]
  assert images.encode_with_images(encode, "ab", 2, 1, 0) == [0, 0, 97, 98]  # images first
  assert images.encode_with_images(encode, "ab", 0, 1, 0) == [97, 98]
  with pytest.raises(ValueError, match="1 '<image>' markers but there are 2 images"):
    images.encode_with_images(encode, "<image>ab", 2, 1, 0)
  with pytest.raises(ValueError, match="encodes to the image token id 98"):
    images.encode_with_images(encode, "ab", 1, 1, 98)


# ------------------------------------------------- live (needs transformers)


@pytest.mark.parametrize("kind", ["siglip", "onevision"])
def test_live_random_images_equal_hf(kind):
  transformers = pytest.importorskip("transformers")
  kw = dict(size={"height": 24, "width": 40}, image_mean=[0.3, 0.4, 0.5],
            image_std=[0.2, 0.25, 0.3], resample=3)
  if kind == "siglip":
    hf_proc = transformers.SiglipImageProcessorPil(**kw)
  else:
    hf_proc = transformers.LlavaOnevisionImageProcessorPil(
        image_grid_pinpoints=[[24, 40], [48, 40]], **kw)
  ours = images.processor_from_hf(hf_proc.to_dict())
  rng = np.random.default_rng(0)
  for mode, shape in (("RGB", (17, 61, 3)), ("RGBA", (50, 9, 4)), ("L", (24, 40))):
    image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
    want = hf_proc(images=[image], return_tensors="np")["pixel_values"][0]
    want = want[0] if want.ndim == 4 else want  # LLaVA-OneVision: the first tile
    np.testing.assert_array_equal(images.preprocess(image, ours), want.transpose(1, 2, 0))
