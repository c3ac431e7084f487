"""ConfigDict -> typed, frozen settings: the boundary between configs and library.

Each sub-dict of an RL config (`model`, `data`, `sft`, `rollout`, `rl`,
`optim`, `eval`, `mesh`) becomes the frozen dataclass(es) its library module
takes. Unknown keys (top-level ones too) and bad values fail here with the
config path in the message, so a malformed `--config.x.y=...` override stops
before any work starts.

  config.mesh   data / fsdp / tensor sizes of the device mesh
                (`parallel.MeshConfig`; -1 on one axis = the devices left
                over). Optional: the default 1 x 1 x 1 runs on one device.

Optional sources (README "Training on prompt files with a Hugging Face
checkpoint", "long2short"):
  config.model.hf_path   a Hugging Face checkpoint directory: its config.json
                         gives the architecture (keys also set in
                         config.model must agree with it), its weights the
                         starting params (loaded by the trainer).
  config.init_from       starting params from any checkpoint
                         (`params_io.resolve`: an RL or SFT run directory,
                         newest step, or RUN/checkpoints/<step>; an orbax
                         model directory; a HF directory). Params only: the
                         optimizer and host state start fresh. The
                         architecture comes from the checkpoint (config.model
                         may repeat it, and set dtypes / special ids).
  config.data.train_file prompt JSONL files + a tokenizer.json instead of the
                         synthetic tasks (`PromptFileData`).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import ml_collections

from kimi_jax import parallel
from kimi_jax.models import hf, params_io
from kimi_jax.models.model_config import LONG_CONTEXT_FIELDS
from kimi_jax.models.transformer import ModelConfig, RopeScaling
from kimi_jax.models.vision import VisionConfig
from kimi_jax.rl.config_check import (  # noqa: F401  (ConfigError, suggest re-exported)
    ConfigError, build as _build, check_keys, suggest, take as _take)
from kimi_jax.rl.losses import LossConfig
from kimi_jax.rl.prompt_sampler import PromptSamplerConfig
from kimi_jax.rl.rewards import RewardConfig
from kimi_jax.rl.update import UpdateConfig
from kimi_jax.sampling.partial import SchedulerConfig
from kimi_jax.sampling.repetition import RepeatConfig
from kimi_jax.sampling.sampler import SamplingConfig


from kimi_jax.rl.settings_types import (  # noqa: F401  (the settings types live here too)
    DataSettings, EvalSettings, PromptFileData, RLExtras, Settings, SFTData)


# Top-level keys of an RL config: scalars, then sub-dicts (`mesh` optional),
# then optional paths.
SCALAR_KEYS = ("seed", "total_iterations", "eval_every", "checkpoint_every", "keep_checkpoints")
SECTION_KEYS = ("model", "data", "sft", "rollout", "rl", "optim", "eval", "mesh")
PATH_KEYS = ("init_from",)


def _positive_int(config, name):
  value = config.get(name)
  if not isinstance(value, int) or isinstance(value, bool) or value < 0:
    raise ConfigError(f"config.{name} must be an int >= 0, got {value!r}")
  return value


def _section(c: dict, name: str, optional: bool = False) -> dict:
  if name not in c:
    if optional:
      return {}
    raise ConfigError(f"config.{name} is missing (sections: {list(SECTION_KEYS)})")
  if not isinstance(c[name], dict):
    raise ConfigError(f"config.{name} must be a section (ConfigDict), got {c[name]!r}")
  return dict(c[name])


def _model(model: dict) -> tuple[ModelConfig, Optional[str]]:
  """ModelConfig from config.model, or from the config.json of `hf_path`."""
  if model.get("rope_scaling"):
    model["rope_scaling"] = _build(RopeScaling, "model.rope_scaling", model["rope_scaling"])
  if model.get("vision"):
    model["vision"] = _build(VisionConfig, "model.vision", model["vision"])
  hf_path = model.pop("hf_path", None)
  if not hf_path:
    return _build(ModelConfig, "model", model, also_known=("hf_path",)), None
  hf_path = os.path.abspath(os.path.expanduser(hf_path))
  config_file = os.path.join(hf_path, hf.CONFIG_NAME)
  try:
    with open(config_file) as f:
      hf_config = json.load(f)
  except FileNotFoundError:
    raise ConfigError(f"config.model.hf_path: {config_file} does not exist") from None
  except (OSError, ValueError) as e:
    raise ConfigError(f"config.model.hf_path: cannot read {config_file}: {e}") from None
  # RL updates want fp32 master weights, whatever dtype the checkpoint stores.
  numerics = {"param_dtype": model.pop("param_dtype", "float32"), "dtype": model.pop("dtype", None)}
  # How to run it, not what it is: also the context limit, which a long-CoT
  # run may set past the checkpoint's (RoPE extrapolates; no weight changes).
  running = {k: model.pop(k) for k in LONG_CONTEXT_FIELDS + ("max_position_embeddings",)
             if k in model}
  try:
    cfg = hf.model_config_from_hf(hf_config, source=config_file, **numerics)
  except ValueError as e:
    raise ConfigError(f"config.model.hf_path: {e}") from None
  try:
    cfg = cfg.replace(**running)
  except ValueError as e:
    raise ConfigError(f"config.model: {e}") from None
  check_keys("model", model, {f.name for f in dataclasses.fields(ModelConfig)} | {"hf_path"})
  for key, value in sorted(model.items()):
    if value != getattr(cfg, key):
      raise ConfigError(f"config.model.{key}={value!r} but {config_file} says "
                        f"{getattr(cfg, key)!r}; with config.model.hf_path the architecture "
                        "comes from the checkpoint (drop the key)")
  return cfg, hf_path


def _init_from(path, model: dict, sft_steps: int) -> tuple[ModelConfig, str]:
  """(ModelConfig, resolved path) of `config.init_from`."""
  if not isinstance(path, str):
    raise ConfigError(f"config.init_from must be a path (str), got {path!r}")
  if model.get("hf_path"):
    raise ConfigError("config.init_from and config.model.hf_path both name starting weights; "
                      "keep one (init_from also takes a HF directory)")
  if sft_steps:
    raise ConfigError(f"config.sft.steps={sft_steps}: with config.init_from the params come "
                      "from the checkpoint; set config.sft.steps=0 (launch.sft runs SFT from "
                      "any checkpoint)")
  model.pop("hf_path", None)
  path = os.path.abspath(os.path.expanduser(path))
  try:
    return params_io.config_for(params_io.resolve(path), model), path
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(f"config.init_from: {e}") from None


def _data(data: dict):
  """Prompt files when config.data names a train_file, the image + text
  tasks with `kind='visual'`, else the synthetic tasks."""
  kind = data.pop("kind", "synthetic")
  if kind not in ("synthetic", "visual"):
    raise ConfigError(f"config.data.kind must be 'synthetic' or 'visual', got {kind!r}")
  if kind == "visual":
    from kimi_jax.rl import visual_task  # pylint: disable=g-import-not-at-top
    for key in ("tasks", "difficulties"):
      if data.get(key) is not None:
        data[key] = tuple(data[key])
    return _build(visual_task.VisualData, "data", data)
  if "train_file" in data:
    for key in ("train_file", "heldout_file", "tokenizer"):
      if isinstance(data.get(key), str):  # recipes name ~/ paths; gs:// is left alone
        data[key] = os.path.expanduser(data[key])
    return _build(PromptFileData, "data", data)
  for key in ("tasks", "difficulties"):
    if data.get(key) is not None:
      data[key] = tuple(data[key])
  return _build(DataSettings, "data", data)


def from_config(config: ml_collections.ConfigDict) -> Settings:
  """Validate `config` and convert it. Raises ConfigError naming the bad key."""
  from kimi_jax.sft import SFTConfig  # heavy-ish import kept off module load

  c = config.to_dict()
  check_keys("", c, SCALAR_KEYS + SECTION_KEYS + PATH_KEYS)
  top = {k: _positive_int(config, k) for k in SCALAR_KEYS}
  if top["eval_every"] < 1 or top["checkpoint_every"] < 1:
    raise ConfigError("config.eval_every and config.checkpoint_every must be >= 1")

  data = _data(_section(c, "data"))
  sft = _section(c, "sft")
  sft_keys = ("n_examples", "long_frac", "error_rate", "recheck_rate")
  sft_data = _take(sft, sft_keys)
  sft_steps = sft.get("steps", 0)
  if not isinstance(sft_steps, int) or isinstance(sft_steps, bool) or sft_steps < 0:
    raise ConfigError(f"config.sft.steps must be an int >= 0, got {sft_steps!r}")
  sft_fields = {f.name for f in dataclasses.fields(SFTConfig)}
  check_keys("sft", sft, sft_fields | set(sft_keys))  # also when steps == 0 skips SFTConfig
  init_from = c.get("init_from") or None
  if init_from:
    (model, init_from), hf_path = _init_from(init_from, _section(c, "model"), sft_steps), None
  else:
    model, hf_path = _model(_section(c, "model"))

  rollout = _section(c, "rollout")
  sampling_keys = ("temperature", "top_k", "top_p")
  repeat_keys = ("repeat_max_period", "repeat_min_repeats", "repeat_min_span")
  sampling = _take(rollout, sampling_keys)
  repeat = {k[len("repeat_"):]: v for k, v in _take(rollout, repeat_keys).items()}
  decode_phases = rollout.pop("decode_phases", 1)
  if not isinstance(decode_phases, int) or isinstance(decode_phases, bool) or decode_phases < 1:
    raise ConfigError(f"config.rollout.decode_phases must be an int >= 1, got {decode_phases!r}")
  rl = _section(c, "rl")
  if "train_old_segments" in rl:
    raise ConfigError("config.rl.train_old_segments was replaced by config.rl.loss_segments: "
                      "'all' for train_old_segments=True, 'last_segment' for False (its old "
                      "default); the new default 'current_iteration' trains only the tokens "
                      "generated in the training iteration")
  extras_keys = ("minibatch_size", "loss_segments", "samples_per_row")
  reward_keys = ("task_reward", "length_penalty_weight", "length_penalty_start",
                 "truncated_reward", "repeat_penalty")
  prompt_keys = ("prompt_sampling", "prompt_eps", "curriculum", "hard_from_iteration",
                 "hard_min_difficulty", "success_ema_rate")
  extras = _take(rl, extras_keys)
  reward = _take(rl, reward_keys)
  renamed = {"prompt_sampling": "mode", "prompt_eps": "eps", "success_ema_rate": "ema_rate"}
  prompts = {renamed.get(k, k): v for k, v in _take(rl, prompt_keys).items()}
  if "loss" in rl:
    rl["algorithm"] = rl.pop("loss")

  settings = Settings(
      **top,
      model=model,
      data=data,
      sft_steps=sft_steps,
      sft=_build(SFTConfig, "sft", sft) if sft_steps else None,
      sft_data=_build(SFTData, "sft", sft_data),
      scheduler=_build(SchedulerConfig, "rollout", rollout,
                       also_known=sampling_keys + repeat_keys + ("decode_phases",)),
      sampling=_build(SamplingConfig, "rollout", sampling),
      repeat=_build(RepeatConfig, "rollout", repeat,
                    renamed={k[len("repeat_"):]: k for k in repeat_keys}),
      loss=_build(LossConfig, "rl", rl, renamed={"algorithm": "loss"},
                  also_known=extras_keys + reward_keys + prompt_keys),
      reward=_build(RewardConfig, "rl", reward),
      prompts=_build(PromptSamplerConfig, "rl", prompts,
                     renamed={v: k for k, v in renamed.items()}),
      update=_build(UpdateConfig, "optim", _section(c, "optim")),
      rl=_build(RLExtras, "rl", extras),
      eval=_build(EvalSettings, "eval", _section(c, "eval")),
      hf_path=hf_path,
      init_from=init_from,
      decode_phases=decode_phases,
      mesh=_build(parallel.MeshConfig, "mesh", _section(c, "mesh", optional=True) or {"data": 1}),
  )
  if isinstance(data, PromptFileData) and sft_steps:
    raise ConfigError(f"config.sft.steps={sft_steps}: the SFT warm-up trains on synthetic "
                      "traces; with config.data.train_file set it to 0 and start from a "
                      "warmed-up checkpoint (config.model.hf_path)")
  if settings.rl.minibatch_size % settings.update.microbatch_size:
    raise ConfigError(f"config.rl.minibatch_size ({settings.rl.minibatch_size}) must be a "
                      f"multiple of config.optim.microbatch_size "
                      f"({settings.update.microbatch_size})")
  if settings.scheduler.max_length > settings.model.max_position_embeddings:
    raise ConfigError(f"config.rollout.max_length ({settings.scheduler.max_length}) exceeds "
                      f"config.model.max_position_embeddings "
                      f"({settings.model.max_position_embeddings})")
  return settings
