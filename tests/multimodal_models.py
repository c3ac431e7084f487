"""A tiny image + text model for the multimodal tests (byte-sized vocab)."""
import jax
import numpy as np

from kimi_jax.models.transformer import ModelConfig, init_params
from kimi_jax.models.vision import VisionConfig

IMAGE_ID = 7


def tiny_config(**changes) -> ModelConfig:
  """2-layer LM of width 32 with a 2-block 16px / 8px-patch tower: 4
  placeholders per image."""
  vision = VisionConfig(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32,
                        num_layers=2, num_heads=2)
  base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
              num_kv_heads=2, max_position_embeddings=256, vision=vision, image_token_id=IMAGE_ID)
  return ModelConfig(**{**base, **changes})


def tiny_model(seed: int = 0, **changes):
  cfg = tiny_config(**changes)
  return cfg, init_params(cfg, jax.random.PRNGKey(seed))


def pixels(n: int, seed: int = 0, size: int = 16) -> np.ndarray:
  """float32 `[n, size, size, 3]` normalised-looking pixels."""
  return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def prompt(text_ids, images: int, per_image: int = 4) -> list[int]:
  """Token ids: `images` placeholder runs, then `text_ids`."""
  return [IMAGE_ID] * (per_image * images) + list(text_ids)
