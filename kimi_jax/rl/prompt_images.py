"""Prompt files with images (README "Images"): a prompt-file task made image + text.

A prompt's `images` (data/prompts.py: paths or data URIs, checked when the
file was read) become float32 `[n, H, W, 3]` pixels through the
checkpoint's image processor (`data.images.preprocess`, equal to HF's), and
each `<image>` marker of its text `cfg.vision.tokens_per_image` placeholder
ids (`cfg.image_token_id`); a prompt with images but no markers shows them
first, as the prompt schema says. Pixels are a function of the record, so
rollouts, carried rows, the update and resume all read them from it.
"""
from __future__ import annotations

import dataclasses
import functools
import os

from kimi_jax.data import images as images_lib
from kimi_jax.models.model_config import ModelConfig
from kimi_jax.rl.config_check import ConfigError

# Decoded prompts kept in memory: a real processor's pixels are ~1.7 MB each
# (384 x 384 x 3 float32); a group's k samples and its update reuse them.
CACHED_PROMPTS = 256


def _processor(data, model: ModelConfig) -> images_lib.ProcessorConfig:
  path = data.image_processor
  if not path:
    tokenizer_dir = data.tokenizer if os.path.isdir(data.tokenizer) else os.path.dirname(
        data.tokenizer)
    if os.path.isfile(os.path.join(tokenizer_dir, images_lib.PROCESSOR_CONFIG_NAME)):
      path = tokenizer_dir
  try:
    return images_lib.processor_for_tower(path, model.vision.image_size)
  except (OSError, ValueError) as e:
    raise ConfigError(f"config.data.image_processor: {e}") from None


def with_images(task, data, model: ModelConfig, encode_text, bos_id=None):
  """`task` (a prompt-file `tasks.Task`) with images, or as it is when no
  prompt has any. `encode_text`: a piece of text -> ids (no BOS / EOS);
  `bos_id`: prepended to every prompt, or None."""
  records = list(task.train) + list(task.heldout)
  counts = [len(p.images) for p in records]
  if not any(counts):
    return task
  first = next(p for p, n in zip(records, counts) if n)
  if model.vision is None:
    raise ConfigError(f"prompt {first.id!r} has images but the model has no image encoder: "
                      "start from a LLaVA checkpoint (config.model.hf_path) or set "
                      "config.model.vision and config.model.image_token_id")
  proc = _processor(data, model)
  P, image_id = model.vision.tokens_per_image, model.image_token_id

  def shown_first(p):
    """The prompt with a marker per image where the text has none."""
    if p.images and not images_lib.count_markers(p.prompt):
      return dataclasses.replace(p, prompt=images_lib.IMAGE_MARKER * len(p.images) + p.prompt)
    return p

  def encode(text: str) -> list[int]:
    ids = images_lib.encode_with_images(encode_text, text, images_lib.count_markers(text), P,
                                        image_id)
    return ids if bos_id is None else [bos_id] + ids

  @functools.lru_cache(maxsize=CACHED_PROMPTS)
  def pixels(p):
    x = images_lib.preprocess_batch(list(p.images), proc)
    x.setflags(write=False)
    return x

  return dataclasses.replace(
      task, train=[shown_first(p) for p in task.train],
      heldout=[shown_first(p) for p in task.heldout], encode=encode, images=pixels,
      image_slots=max(counts), processor=proc,
      category=lambda p: p.type)
