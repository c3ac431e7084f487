"""SFT settings: the frozen `SFTConfig` the library takes, and the job's config schema."""
from __future__ import annotations

import dataclasses

import ml_collections
import numpy as np

from kimi_jax.tokenizers import BYTE_EOS_ID, BYTE_PAD_ID


@dataclasses.dataclass(frozen=True)
class SFTConfig:
  """Settings of an SFT run.

  steps: optimizer steps; batch_size: packed rows per step; seq_len: tokens per row.
  learning_rate: AdamW peak, reached after `warmup_steps` (linear), then
    cosine decay to `end_lr_frac * learning_rate` at `steps`.
  weight_decay: decoupled, on matrices only (not norm scales).
  clip_norm: global gradient-norm clip. seed: data order.
  log_every: `log_fn` cadence in steps (the last step is always logged).
  checkpoint_every: `save_fn` cadence in steps, 0 = only after the last step
    (the job's checkpoints; the RL warm-up saves none).
  image_slots: image slots per packed row (S), 0 = text only. Every batch's
    pixels are `[batch_size, S, Y, X, C]` whatever the rows hold (one
    compiled step); a row takes examples until their images would exceed S.
  train_vision: train the image encoder (params["vision"]) with the LM;
    False freezes it (no update at all: it stays bit-identical).
  """
  steps: int = 300
  batch_size: int = 16
  seq_len: int = 256
  learning_rate: float = 3e-3
  warmup_steps: int = 20
  end_lr_frac: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  weight_decay: float = 0.01
  clip_norm: float = 1.0
  seed: int = 0
  log_every: int = 20
  checkpoint_every: int = 0
  image_slots: int = 0
  train_vision: bool = True

  def __post_init__(self):
    def check(name, ok, what):
      if not ok:
        raise ValueError(f"SFTConfig.{name} must be {what}, got {getattr(self, name)!r}")
    for name in ("steps", "batch_size", "log_every"):
      check(name, _is_int(getattr(self, name)) and getattr(self, name) >= 1, "an int >= 1")
    check("seq_len", _is_int(self.seq_len) and self.seq_len >= 2, "an int >= 2")
    for name in ("warmup_steps", "checkpoint_every", "image_slots"):
      check(name, _is_int(getattr(self, name)) and getattr(self, name) >= 0, "an int >= 0")
    check("seed", _is_int(self.seed), "an int")
    check("train_vision", isinstance(self.train_vision, (bool, np.bool_)), "a bool")
    check("learning_rate", self.learning_rate > 0, "> 0")
    check("clip_norm", self.clip_norm > 0, "> 0")
    check("weight_decay", self.weight_decay >= 0, ">= 0")
    check("end_lr_frac", 0 <= self.end_lr_frac <= 1, "in [0, 1]")
    for name in ("b1", "b2"):
      check(name, 0 <= getattr(self, name) < 1, "in [0, 1)")


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


# Image slots per packed row, per image an example holds, when a config sets
# none: rows pack several examples, each with its images.
EXAMPLES_PER_ROW_WITH_IMAGES = 4


def with_image_slots(cfg: SFTConfig, images_per_example: int) -> SFTConfig:
  """`cfg` with image slots for examples of up to `images_per_example`
  images: unchanged when it sets `image_slots` or the examples have none."""
  if cfg.image_slots or not images_per_example:
    return cfg
  return dataclasses.replace(cfg, image_slots=EXAMPLES_PER_ROW_WITH_IMAGES * images_per_example)


def sft_config_from(config_sft) -> SFTConfig:
  """The SFTConfig fields of a config's `sft` sub-dict (other keys ignored)."""
  names = {f.name for f in dataclasses.fields(SFTConfig)}
  return SFTConfig(**{k: v for k, v in dict(config_sft).items() if k in names})


def default_config() -> ml_collections.ConfigDict:
  """The config schema `launch.sft` reads (`job.run_from_config`).

  Top level: seed (parameter init), init_from (the starting checkpoint:
  an RL or SFT run directory, one step of it `RUN/checkpoints/<step>`, an
  orbax model directory or a Hugging Face directory; "" = random init of
  `model`). Sub-dicts: model (ModelConfig fields; with init_from they may only
  repeat the checkpoint's architecture), sft (SFTConfig fields + the
  synthetic-trace keys), data (the synthetic tasks, or `train_file`: a
  prompt/response JSONL with its `tokenizer` and, for records with images,
  `image_processor`).

  Defaults from CPU measurements (2 shared cores): this 0.86M-parameter
  model reaches ~40% greedy held-out accuracy on add+chain, all levels,
  after 600 steps of 16 x 128 tokens (~6 min); see the SFT report.
  """
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.init_from = ""
  c.model = dict(vocab_size=264, hidden_size=128, intermediate_size=384, num_layers=4,
                 num_heads=4, num_kv_heads=2, max_position_embeddings=512,
                 eos_id=BYTE_EOS_ID, pad_id=BYTE_PAD_ID)
  # seq_len 160 holds every add/chain trace (<= 103 tokens clean, ~140 with slips).
  c.sft = dict(dataclasses.asdict(SFTConfig(steps=600, seq_len=160, log_every=50)),
               n_examples=4000,  # (prompt, trace) pairs, cycling over data.n_train problems
               long_frac=1.0,  # share of long-CoT (vs answer-only) targets
               error_rate=0.0,  # per-step probability of a corrected slip
               recheck_rate=0.0)  # share of long traces that redo their work once
  c.data = dict(tasks=("add", "chain"),
                difficulties=None,  # None = every level of each task
                n_train=4000, n_heldout=256, seed=0,
                # A prompt/response JSONL instead of synthetic traces ("" = synthetic):
                train_file="",
                tokenizer="bytes",  # "bytes", a tokenizer.json (or its directory), a *.model
                add_bos=False,  # prepend the tokenizer's BOS to every prompt
                # Records with images: their preprocessor_config.json (or its
                # directory); "" = the starting checkpoint's, else SigLIP's default.
                image_processor="")
  return c
