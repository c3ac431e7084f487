"""ConfigDict -> typed, frozen settings: the boundary between configs and library.

Each sub-dict of an RL config (`model`, `data`, `sft`, `rollout`, `rl`,
`optim`, `eval`) becomes the frozen dataclass(es) its library module takes.
Unknown keys and bad values fail here with the config path in the message,
so a malformed `--config.x.y=...` override stops before any work starts.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import ml_collections

from kimi_jax.models.transformer import ModelConfig, RopeScaling
from kimi_jax.rl.losses import LossConfig
from kimi_jax.rl.prompt_sampler import PromptSamplerConfig
from kimi_jax.rl.rewards import RewardConfig
from kimi_jax.rl.update import UpdateConfig
from kimi_jax.sampling.partial import SchedulerConfig
from kimi_jax.sampling.repetition import RepeatConfig
from kimi_jax.sampling.sampler import SamplingConfig


class ConfigError(ValueError):
  """A config value that cannot be used; the message names its path."""


def _build(cls, path: str, values: dict, **extra):
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - names)
  if unknown:
    raise ConfigError(f"config.{path}: unknown key(s) {unknown} for {cls.__name__}; "
                      f"known: {sorted(names)}")
  try:
    return cls(**values, **extra)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.{path}: {e}") from e


def _take(d: dict, keys) -> dict:
  return {k: d.pop(k) for k in keys if k in d}


@dataclasses.dataclass(frozen=True)
class DataSettings:
  tasks: tuple
  difficulties: Optional[tuple]
  n_train: int
  n_heldout: int
  heldout_frac: float = 0.2


@dataclasses.dataclass(frozen=True)
class SFTData:
  """How warm-up examples are drawn from the train split."""
  n_examples: int = 4000
  long_frac: float = 0.8
  error_rate: float = 0.1


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """pass@1 at `temperature`, averaged over `samples` draws per problem; greedy too."""
  temperature: float = 1.0
  samples: int = 2
  greedy: bool = True
  max_new_tokens: int = 200


@dataclasses.dataclass(frozen=True)
class RLExtras:
  """Trainer-level RL options that belong to no library dataclass."""
  minibatch_size: int = 64
  train_old_segments: bool = False


@dataclasses.dataclass(frozen=True)
class Settings:
  seed: int
  total_iterations: int
  eval_every: int
  checkpoint_every: int
  keep_checkpoints: int
  model: ModelConfig
  data: DataSettings
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


def _positive_int(config, name):
  value = config.get(name)
  if not isinstance(value, int) or isinstance(value, bool) or value < 0:
    raise ConfigError(f"config.{name} must be an int >= 0, got {value!r}")
  return value


def from_config(config: ml_collections.ConfigDict) -> Settings:
  """Validate `config` and convert it. Raises ConfigError naming the bad key."""
  from kimi_jax.sft import SFTConfig  # heavy-ish import kept off module load

  c = config.to_dict()
  top = {k: _positive_int(config, k) for k in
         ("seed", "total_iterations", "eval_every", "checkpoint_every", "keep_checkpoints")}
  if top["eval_every"] < 1 or top["checkpoint_every"] < 1:
    raise ConfigError("config.eval_every and config.checkpoint_every must be >= 1")

  model = dict(c["model"])
  if model.get("rope_scaling"):
    model["rope_scaling"] = _build(RopeScaling, "model.rope_scaling", model["rope_scaling"])
  data = dict(c["data"])
  for key in ("tasks", "difficulties"):
    if data.get(key) is not None:
      data[key] = tuple(data[key])
  sft = dict(c["sft"])
  sft_data = _take(sft, ("n_examples", "long_frac", "error_rate"))
  sft_steps = sft.get("steps", 0)

  rollout = dict(c["rollout"])
  sampling = _take(rollout, ("temperature", "top_k", "top_p"))
  repeat = {k[len("repeat_"):]: v for k, v in
            _take(rollout, ("repeat_max_period", "repeat_min_repeats", "repeat_min_span")).items()}
  rl = dict(c["rl"])
  extras = _take(rl, ("minibatch_size", "train_old_segments"))
  reward = _take(rl, ("length_penalty_weight", "length_penalty_start", "truncated_reward",
                      "repeat_penalty"))
  prompts = _take(rl, ("prompt_sampling", "prompt_eps", "curriculum", "hard_from_iteration",
                       "hard_min_difficulty", "success_ema_rate"))
  renamed = {"prompt_sampling": "mode", "prompt_eps": "eps", "success_ema_rate": "ema_rate"}
  prompts = {renamed.get(k, k): v for k, v in prompts.items()}
  if "loss" in rl:
    rl["algorithm"] = rl.pop("loss")

  settings = Settings(
      **top,
      model=_build(ModelConfig, "model", model),
      data=_build(DataSettings, "data", data),
      sft_steps=sft_steps,
      sft=_build(SFTConfig, "sft", sft) if sft_steps else None,
      sft_data=_build(SFTData, "sft", sft_data),
      scheduler=_build(SchedulerConfig, "rollout", rollout),
      sampling=_build(SamplingConfig, "rollout", sampling),
      repeat=_build(RepeatConfig, "rollout.repeat_*", repeat),
      loss=_build(LossConfig, "rl", rl),
      reward=_build(RewardConfig, "rl", reward),
      prompts=_build(PromptSamplerConfig, "rl", prompts),
      update=_build(UpdateConfig, "optim", dict(c["optim"])),
      rl=_build(RLExtras, "rl", extras),
      eval=_build(EvalSettings, "eval", dict(c["eval"])),
  )
  if settings.rl.minibatch_size % settings.update.microbatch_size:
    raise ConfigError(f"config.rl.minibatch_size ({settings.rl.minibatch_size}) must be a "
                      f"multiple of config.optim.microbatch_size "
                      f"({settings.update.microbatch_size})")
  if settings.scheduler.max_length > settings.model.max_position_embeddings:
    raise ConfigError(f"config.rollout.max_length ({settings.scheduler.max_length}) exceeds "
                      f"config.model.max_position_embeddings "
                      f"({settings.model.max_position_embeddings})")
  return settings
