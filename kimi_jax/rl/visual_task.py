"""The synthetic image + text task: `data/visual.py` problems as a `tasks.Task`.

Selected by `config.data.kind = "visual"` (configs/visual_tiny.py). Prompts
are byte ids with each image as `tokens_per_image` placeholder ids (the
model's `vision.tokens_per_image`, id `visual.IMAGE_TOKEN_ID`); the images
are rendered from each problem's scene and preprocessed once
(`data.images.preprocess`, SigLIP's mean/std of 0.5), so a prompt's pixels
are a function of its index: rollouts, carried rows, the update and
checkpoint resume all read them from the record, never from a buffer.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import numpy as np

from kimi_jax.data import images as images_lib
from kimi_jax.data import visual
from kimi_jax.data.visual_tasks import IMAGE_SIZE
from kimi_jax.models.model_config import ModelConfig
from kimi_jax.rl.config_check import ConfigError, suggest
from kimi_jax.tokenizers import BYTE_EOS_ID, byte_decode, byte_encode


@dataclasses.dataclass(frozen=True)
class VisualData:
  """config.data of the visual tasks (`data/visual.py`).

  tasks: task families (count, compare, spatial, bars, arith).
  difficulties: levels to draw (None: every level of each task).
  n_train / n_heldout / heldout_frac: as the arithmetic tasks'.
  n_warmup: problems of their own for the SFT warm-up, drawn apart from the
    RL prompts and the held-out split (`visual.make_warmup_problems`); 0:
    the warm-up cycles over the RL train prompts. A tiny tower that sees the
    same few thousand images for many epochs memorises their answers, and
    RL on those prompts then rewards recall.
  """
  tasks: tuple = visual.TASKS
  difficulties: Optional[tuple] = None
  n_train: int = 2000
  n_heldout: int = 200
  heldout_frac: float = 0.2
  n_warmup: int = 0

  def __post_init__(self):
    if not self.tasks:
      raise ValueError("VisualData.tasks must be a non-empty list of task names")
    for task in self.tasks:
      if task not in visual.TASKS:
        raise ValueError(f"VisualData.tasks: unknown task {task!r}"
                         f"{suggest(str(task), visual.TASKS)}; known: {list(visual.TASKS)}")
    for name in ("n_train", "n_heldout"):
      if getattr(self, name) < 1:
        raise ValueError(f"VisualData.{name} must be >= 1, got {getattr(self, name)}")
    if not isinstance(self.n_warmup, int) or self.n_warmup < 0:
      raise ValueError(f"VisualData.n_warmup must be an int >= 0, got {self.n_warmup!r}")
    if not 0 < self.heldout_frac < 1:
      raise ValueError(f"VisualData.heldout_frac must be in (0, 1), got {self.heldout_frac}")


PROCESSOR = images_lib.ProcessorConfig(height=IMAGE_SIZE, width=IMAGE_SIZE)
IMAGE_SLOTS = 1  # one image per prompt


def check_model(model: ModelConfig) -> None:
  """ConfigError unless `model` can read the visual prompts."""
  if model.vision is None:
    raise ConfigError("config.data.kind='visual' needs an image encoder: set config.model.vision "
                      "(a VisionConfig dict) and config.model.image_token_id")
  if model.vision.image_size != IMAGE_SIZE:
    raise ConfigError(f"config.model.vision.image_size is {model.vision.image_size}; the visual "
                      f"tasks render {IMAGE_SIZE}x{IMAGE_SIZE} images")
  if model.image_token_id != visual.IMAGE_TOKEN_ID:
    raise ConfigError(f"config.model.image_token_id is {model.image_token_id}; the visual tasks' "
                      f"placeholder id is {visual.IMAGE_TOKEN_ID}")


@functools.lru_cache(maxsize=None)
def problem_pixels(problem: visual.VisualProblem) -> np.ndarray:
  """float32 `[1, 32, 32, 3]`: the problem's image, preprocessed (cached:
  every sample, carried row and update of the prompt reads the same array)."""
  x = images_lib.preprocess(problem.image(), PROCESSOR)[None]
  x.setflags(write=False)
  return x


def problem_sets(seed: int, data: VisualData) -> tuple[list, list, list]:
  """(train, heldout, warmup): the RL prompts, the held-out split and the
  SFT warm-up's problems (`data.n_warmup` of their own, else `train`)."""
  train, heldout = visual.make_splits(seed, data.n_train, data.n_heldout,
                                      difficulties=data.difficulties, tasks=data.tasks,
                                      heldout_frac=data.heldout_frac)
  if not data.n_warmup:
    return train, heldout, train
  warmup = visual.make_warmup_problems(seed, data.n_warmup, train, difficulties=data.difficulties,
                                       tasks=data.tasks, heldout_frac=data.heldout_frac)
  return train, heldout, warmup


def visual_task(seed: int, data: VisualData, model: ModelConfig):
  """The `tasks.Task` of the visual problems for `model` (checked first)."""
  from kimi_jax import sft  # pylint: disable=g-import-not-at-top
  from kimi_jax.rl.tasks import Task  # pylint: disable=g-import-not-at-top
  check_model(model)
  train, heldout, warmup = problem_sets(seed, data)
  P = model.vision.tokens_per_image

  def encode(text: str) -> list[int]:
    return images_lib.encode_with_images(byte_encode, text,
                                         images_lib.count_markers(text), P,
                                         visual.IMAGE_TOKEN_ID)

  def sft_examples(n: int, long_frac: float, error_rate: float, example_seed: int):
    return sft.visual_examples(warmup, n, P, PROCESSOR, long_frac=long_frac,
                               error_rate=error_rate, seed=example_seed)

  return Task(train, heldout, encode, byte_decode, BYTE_EOS_ID, visual.VOCAB_SIZE, visual.reward,
              sft_problems=warmup, images=problem_pixels, image_slots=IMAGE_SLOTS,
              category=lambda p: p.task, sft_examples=sft_examples, processor=PROCESSOR)
