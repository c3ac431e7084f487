"""The typed, frozen settings an RL config becomes (`rl/settings.py` builds them).

Each dataclass checks its own values in `__post_init__`; `Settings` holds one
of each plus the run's scalars. `rl/settings.py` re-exports every name here.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

from kimi_jax import parallel
from kimi_jax.data import synthetic
from kimi_jax.models.transformer import ModelConfig
from kimi_jax.rl.config_check import suggest
from kimi_jax.rl.losses import LossConfig
from kimi_jax.rl.prompt_sampler import PromptSamplerConfig
from kimi_jax.rl.rewards import RewardConfig
from kimi_jax.rl.update import UpdateConfig
from kimi_jax.sampling.partial import SchedulerConfig
from kimi_jax.sampling.repetition import RepeatConfig
from kimi_jax.sampling.sampler import SamplingConfig


def _require(obj, name: str, ok: bool, what: str) -> None:
  if not ok:
    raise ValueError(f"{type(obj).__name__}.{name} must be {what}, got {getattr(obj, name)!r}")


@dataclasses.dataclass(frozen=True)
class DataSettings:
  tasks: tuple
  difficulties: Optional[tuple]
  n_train: int
  n_heldout: int
  heldout_frac: float = 0.2

  def __post_init__(self):
    _require(self, "tasks", len(self.tasks) > 0, "a non-empty list of task names")
    for task in self.tasks:
      if task not in synthetic.TASKS:
        raise ValueError(f"DataSettings.tasks: unknown task {task!r}"
                         f"{suggest(str(task), synthetic.TASKS)}; known: {list(synthetic.TASKS)}")
    _require(self, "n_train", self.n_train >= 1, ">= 1")
    _require(self, "n_heldout", self.n_heldout >= 1, ">= 1")
    _require(self, "heldout_frac", 0 < self.heldout_frac < 1, "in (0, 1)")


@dataclasses.dataclass(frozen=True)
class PromptFileData:
  """Prompt-set JSONL files (data/prompts.py schema) and their tokenizer.

  train_file / heldout_file: JSONL paths (ids must not overlap).
  tokenizer: a tokenizer.json, or a directory holding one (e.g. the HF
    checkpoint directory); its EOS ends responses.
  skip_invalid: False: a broken line stops the run before any work, naming
    file:line:field. True: broken lines are skipped, counted in the log and
    in the `data/skipped_prompts` metric.
  add_bos: prepend the tokenizer's BOS to every prompt (Llama 3 expects it).
  verifier_workers: responses scored in parallel (code sandbox, math worker).
  math_timeout_s, code_timeout_s: per equivalence check / per code test.
  image_processor: for prompts with images (rl/prompt_images.py): the
    preprocessor_config.json (or its directory) of the checkpoint; "" = the
    tokenizer's directory when it holds one, else SigLIP's 0.5 mean/std at
    the tower's resolution.
  """
  train_file: str
  heldout_file: str
  tokenizer: str
  skip_invalid: bool = False
  add_bos: bool = False
  verifier_workers: int = 2
  math_timeout_s: float = 5.0
  code_timeout_s: float = 5.0
  image_processor: str = ""  # prompts with images: a preprocessor_config.json (or its dir)

  def __post_init__(self):
    for name in ("train_file", "heldout_file", "tokenizer"):
      if not isinstance(getattr(self, name), str) or not getattr(self, name):
        raise ValueError(f"{name} must be a non-empty path, got {getattr(self, name)!r}")
    for name in ("skip_invalid", "add_bos"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
    if not isinstance(self.verifier_workers, int) or self.verifier_workers < 1:
      raise ValueError(f"verifier_workers must be an int >= 1, got {self.verifier_workers!r}")
    if not self.math_timeout_s > 0 or not self.code_timeout_s > 0:
      raise ValueError("math_timeout_s and code_timeout_s must be > 0")


@dataclasses.dataclass(frozen=True)
class SFTData:
  """How warm-up examples are drawn from the train split."""
  n_examples: int = 4000
  long_frac: float = 0.8
  error_rate: float = 0.1
  recheck_rate: float = 0.0  # arithmetic tasks: share of long traces that redo their work

  def __post_init__(self):
    _require(self, "n_examples", self.n_examples >= 1, ">= 1")
    _require(self, "long_frac", 0 <= self.long_frac <= 1, "in [0, 1]")
    _require(self, "error_rate", 0 <= self.error_rate <= 1, "in [0, 1]")
    _require(self, "recheck_rate", 0 <= self.recheck_rate <= 1, "in [0, 1]")


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """pass@1 at `temperature`, averaged over `samples` draws per problem; greedy too."""
  temperature: float = 1.0
  samples: int = 2
  greedy: bool = True
  max_new_tokens: int = 200

  def __post_init__(self):
    _require(self, "temperature", self.temperature >= 0, ">= 0")
    _require(self, "samples", self.samples >= 1, ">= 1")
    _require(self, "max_new_tokens", self.max_new_tokens >= 1, ">= 1")


@dataclasses.dataclass(frozen=True)
class RLExtras:
  """Trainer-level RL options that belong to no library dataclass.

  minibatch_size: samples per optimizer step.
  loss_segments: which response tokens enter the loss under partial
    rollouts (`batch.LOSS_SEGMENTS`, README "The RL update"). Default
    'current_iteration': only the segment generated in the training
    iteration was drawn by the iteration-start policy (report §2.6.2), and a
    group is trained only once all k samples finished, so a sample that
    finished two iterations earlier would otherwise be trained as if the
    current policy had drawn it ('last_segment', the old behaviour).
    'all' trains whole responses (the k1.5 squared loss admits off-policy
    samples); the toy main job uses it.
  samples_per_row: S, the most finished samples packed into one training
    row of rollout.max_length tokens (1 = one padded sample per row).
    Packing changes the cost, not the maths: each minibatch keeps its
    minibatch_size samples (rl/batch.py).
  """
  minibatch_size: int = 64
  loss_segments: str = "current_iteration"
  samples_per_row: int = 1

  def __post_init__(self):
    from kimi_jax.rl.batch import LOSS_SEGMENTS  # pylint: disable=g-import-not-at-top
    if self.loss_segments not in LOSS_SEGMENTS:
      raise ValueError(f"loss_segments must be one of {LOSS_SEGMENTS}, got "
                       f"{self.loss_segments!r}")
    if (not isinstance(self.samples_per_row, int) or isinstance(self.samples_per_row, bool)
        or self.samples_per_row < 1):
      raise ValueError(f"samples_per_row must be an int >= 1, got {self.samples_per_row!r}")
    _require(self, "minibatch_size", self.minibatch_size >= 1, ">= 1")


@dataclasses.dataclass(frozen=True)
class Settings:
  seed: int
  total_iterations: int
  eval_every: int
  checkpoint_every: int
  keep_checkpoints: int
  model: ModelConfig
  data: Union[DataSettings, PromptFileData]
  sft_steps: int
  sft: Any  # kimi_jax.sft.SFTConfig (None when sft_steps == 0)
  sft_data: SFTData
  scheduler: SchedulerConfig
  sampling: SamplingConfig
  repeat: RepeatConfig
  loss: LossConfig
  reward: RewardConfig
  prompts: PromptSamplerConfig
  update: UpdateConfig
  rl: RLExtras
  eval: EvalSettings
  hf_path: Optional[str] = None  # starting weights (else random init + SFT warm-up)
  init_from: Optional[str] = None  # starting params from any checkpoint (params_io.resolve)
  decode_phases: int = 1  # rollout decode over a cache grown in this many steps (segment.py)
  mesh: parallel.MeshConfig = parallel.MeshConfig(data=1, fsdp=1, tensor=1)
