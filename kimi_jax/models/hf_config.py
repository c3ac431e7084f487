"""Hugging Face `config.json` <-> `ModelConfig` for the Llama and Qwen2 families.

`config_from_hf` validates what it reads (errors name the source file and
field); `config_to_hf` writes what transformers loads. Re-exported by
`kimi_jax.models.hf`, which also moves the weights.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from absl import logging

from kimi_jax.models.transformer import ModelConfig, RopeScaling

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "llama3")
CONFIG_NAME = "config.json"
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


class HFCheckpointError(ValueError):
  """A Hugging Face checkpoint that cannot be read or converted."""


def config_from_hf(hf: Mapping[str, Any], *, param_dtype: str = "float32",
                   dtype: Optional[str] = None, source: str = CONFIG_NAME) -> ModelConfig:
  """ModelConfig from a parsed HF config.json (`source` names it in errors).

  `eos_token_id` may be a list in HF configs (e.g. Llama 3 instruct); the
  first id is kept as `eos_id`.
  """
  def fail(msg):
    raise HFCheckpointError(f"{source}: {msg}")

  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    fail(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
  for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads"):
    if key not in hf:
      fail(f"missing required field {key!r}")
  if hf.get("hidden_act", "silu") != "silu":
    fail(f"hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
  if hf.get("quantization_config"):
    fail("quantized checkpoints are not supported")
  if model_type == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
    fail("Llama with attention_bias or mlp_bias is not supported")
  if model_type == "qwen2" and hf.get("use_sliding_window"):
    fail("use_sliding_window=true is not supported (the model has full attention only)")

  theta, scaling = _rope_from_hf(hf, fail)
  eos = hf.get("eos_token_id")
  if isinstance(eos, (list, tuple)):
    if len(eos) > 1:
      logging.info("%s: eos_token_id %s is a list; using the first id %s", source, eos, eos[0])
    eos = eos[0] if eos else None
  heads = hf["num_attention_heads"]
  head_dim = hf.get("head_dim")
  if head_dim is not None and head_dim * heads == hf["hidden_size"]:
    head_dim = None  # the default; keeps configs equal across a round trip
  try:
    return ModelConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim, rope_theta=float(theta), rope_scaling=scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)), qkv_bias=model_type == "qwen2",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=hf.get("max_position_embeddings",
                                       2048 if model_type == "llama" else 32768),
        family=model_type, param_dtype=param_dtype, dtype=dtype or param_dtype,
        bos_id=hf.get("bos_token_id"), eos_id=eos, pad_id=hf.get("pad_token_id"))
  except (ValueError, TypeError) as e:
    fail(f"invalid model config: {e}")


def _rope_from_hf(hf, fail):
  """(theta, RopeScaling | None) from `rope_parameters` (transformers >= 5) or
  the older top-level `rope_theta` + `rope_scaling`."""
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  if rope and all(isinstance(v, dict) for v in rope.values()):  # per layer type
    if any(v != next(iter(rope.values())) for v in rope.values()):
      fail(f"different RoPE per layer type is not supported: {rope}")
    rope = next(iter(rope.values()))
  theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type == "default":
    return theta, None
  if rope_type != "llama3":
    fail(f"unsupported rope type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
  try:
    return theta, RopeScaling(
        factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
        high_freq_factor=float(rope["high_freq_factor"]),
        original_max_position_embeddings=int(rope.get(
            "original_max_position_embeddings", hf.get("max_position_embeddings", 8192))))
  except KeyError as e:
    fail(f"llama3 rope scaling is missing {e}")


def config_to_hf(cfg: ModelConfig, dtype: Optional[str] = None) -> dict[str, Any]:
  """The config.json dict transformers needs for `cfg` (weights stored in `dtype`)."""
  dtype = dtype or cfg.param_dtype
  rope_scaling = None
  if cfg.rope_scaling is not None:
    s = cfg.rope_scaling
    rope_scaling = {"rope_type": "llama3", "factor": s.factor,
                    "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                    "original_max_position_embeddings": s.original_max_position_embeddings}
  hf = {
      "architectures": [_ARCHITECTURES[cfg.family]],
      "model_type": cfg.family,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_size,
      "hidden_act": "silu",
      "max_position_embeddings": cfg.max_position_embeddings,
      "rms_norm_eps": cfg.rms_norm_eps,
      # Top-level rope_theta / rope_scaling: read by transformers 4 and 5.
      "rope_theta": cfg.rope_theta,
      "rope_scaling": rope_scaling,
      "tie_word_embeddings": cfg.tie_embeddings,
      "bos_token_id": cfg.bos_id,
      "eos_token_id": cfg.eos_id,
      "pad_token_id": cfg.pad_id,
      "torch_dtype": dtype,  # transformers 4 name
      "dtype": dtype,  # transformers 5 name
      "initializer_range": 0.02,
      "attention_dropout": 0.0,
      "use_cache": True,
  }
  if cfg.family == "llama":
    hf.update(attention_bias=False, mlp_bias=False)
  else:
    hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
  return hf
