"""launch.convert on image + text models: the image processor travels with the weights."""
import json
import pathlib

import jax
import numpy as np
import pytest

from kimi_jax.data import images
from kimi_jax.models import hf, hf_llava, params_io
from launch import convert

DATA = pathlib.Path(__file__).parent / "data"
QWEN2 = "llava_tiny_qwen2"


def _odd_processor(size):
  """A processor unlike the default, so that a silent fallback would show."""
  return images.ProcessorConfig(height=size, width=size, resample=2,
                                image_mean=(0.48, 0.46, 0.41), image_std=(0.27, 0.26, 0.28))


def test_hf_to_orbax_to_hf_keeps_the_processor(tmp_path):
  want = images.load_processor(DATA / QWEN2)
  orbax_dir, hf_dir = tmp_path / "orbax", tmp_path / "hf"
  convert.convert("hf_to_orbax", str(DATA / QWEN2), str(orbax_dir))
  assert images.load_processor(orbax_dir) == want
  convert.convert("orbax_to_hf", str(hf_dir), str(orbax_dir))
  assert images.load_processor(hf_dir) == want
  cfg, params = hf_llava.load_pretrained(DATA / QWEN2)
  cfg2, params2 = hf_llava.load_pretrained(hf_dir)
  assert cfg2 == cfg
  assert jax.tree.structure(params2) == jax.tree.structure(params)
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_run_directory_exports_with_its_processor_or_a_named_one(tmp_path):
  """A run (RUN/checkpoints/<step> + model_config.json + the processor the
  trainer wrote) converts from the run directory; --image_processor wins."""
  cfg, params = hf_llava.load_pretrained(DATA / QWEN2)
  run = tmp_path / "run"
  params_io.save_orbax(cfg, params, run / params_io.CHECKPOINTS_NAME / "7")
  params_io.write_config(cfg, run)
  size = cfg.vision.image_size
  images.save_processor(_odd_processor(size), run)
  convert.convert("orbax_to_hf", str(tmp_path / "hf"), str(run))
  assert images.load_processor(tmp_path / "hf") == _odd_processor(size)
  named = tmp_path / "named"
  named.mkdir()
  images.save_processor(images.ProcessorConfig(height=size, width=size, resample=0), named)
  convert.convert("orbax_to_hf", str(tmp_path / "hf2"), str(run / "checkpoints" / "7"),
                  image_processor=str(named))
  assert images.load_processor(tmp_path / "hf2").resample == 0


def test_without_a_processor_the_default_is_written_with_a_warning(tmp_path, caplog):
  cfg, params = hf_llava.load_pretrained(DATA / QWEN2)
  params_io.save_orbax(cfg, params, tmp_path / "orbax")
  with caplog.at_level("WARNING"):
    convert.convert("orbax_to_hf", str(tmp_path / "hf"), str(tmp_path / "orbax"))
  size = cfg.vision.image_size
  assert images.load_processor(tmp_path / "hf") == images.ProcessorConfig(height=size,
                                                                          width=size)
  assert "no preprocessor_config.json" in caplog.text


def test_processor_mistakes_are_named(tmp_path):
  cfg, params = hf_llava.load_pretrained(DATA / QWEN2)
  params_io.save_orbax(cfg, params, tmp_path / "orbax")
  wrong = tmp_path / "wrong"
  wrong.mkdir()
  images.save_processor(images.ProcessorConfig(height=64, width=64), wrong)
  with pytest.raises(ValueError, match="resizes to 64x64 but the model's tower takes"):
    convert.convert("orbax_to_hf", str(tmp_path / "hf"), str(tmp_path / "orbax"),
                    image_processor=str(wrong))
  assert not (tmp_path / "hf").exists()
  with pytest.raises(FileNotFoundError, match="missing.json"):
    convert.convert("orbax_to_hf", str(tmp_path / "hf"), str(tmp_path / "orbax"),
                    image_processor=str(tmp_path / "missing.json"))
  convert.convert("hf_to_orbax", str(DATA / "hf_tiny_llama"), str(tmp_path / "text_orbax"))
  assert not (tmp_path / "text_orbax" / images.PROCESSOR_CONFIG_NAME).exists()
  with pytest.raises(ValueError, match="text-only model"):
    convert.convert("orbax_to_hf", str(tmp_path / "hf3"), str(tmp_path / "text_orbax"),
                    image_processor=str(wrong))


def test_save_pretrained_refuses_a_processor_for_a_text_model(tmp_path):
  cfg, params = hf_llava.load_pretrained(DATA / QWEN2)
  with pytest.raises(ValueError, match="text-only"):
    hf.save_pretrained(cfg.language_model, {k: v for k, v in params.items() if k != "vision"},
                       tmp_path / "out", processor=images.ProcessorConfig())
  assert json.dumps(images.processor_to_hf(images.ProcessorConfig()))  # serialisable
