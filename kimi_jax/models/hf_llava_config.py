"""HF LLaVA config.json <-> the multimodal `ModelConfig` (`models/hf_llava.py` re-exports).

`config_from_hf` validates a parsed config.json (a SigLIP tower, the LLaVA
projector, a Llama / Qwen2 text config through `models/hf.py`) and names the
offending field in every error; `config_to_hf` writes the dict transformers
loads as `LlavaForConditionalGeneration`.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from kimi_jax.models import hf
from kimi_jax.models.transformer import ModelConfig
from kimi_jax.models.vision import VisionConfig

HFCheckpointError = hf.HFCheckpointError
ARCHITECTURE = "LlavaForConditionalGeneration"
VISION_MODEL_TYPES = ("siglip_vision_model",)
PROJECTOR_ACTS = ("gelu", "gelu_pytorch_tanh")
MODEL_TYPES = hf.LLAVA_MODEL_TYPES


def config_from_hf(hf_config: Mapping[str, Any], *, param_dtype: str = "float32",
                   dtype: Optional[str] = None, source: str = hf.CONFIG_NAME) -> ModelConfig:
  """The multimodal ModelConfig of a parsed LLaVA config.json (`source` names it in errors)."""
  def fail(msg):
    raise HFCheckpointError(f"{source}: {msg}")

  if hf_config.get("model_type") not in MODEL_TYPES:
    fail(f"model_type {hf_config.get('model_type')!r} is not one of {MODEL_TYPES} (text-only "
         "Llama / Qwen2 directories load with models.hf.load_pretrained)")
  text, vis = hf_config.get("text_config"), hf_config.get("vision_config")
  for name, sub in (("text_config", text), ("vision_config", vis)):
    if not isinstance(sub, Mapping):
      fail(f"missing or invalid {name!r} (expected an object)")
  if vis.get("model_type") not in VISION_MODEL_TYPES:
    fail(f"vision_config.model_type {vis.get('model_type')!r} is not supported; supported: "
         f"{', '.join(VISION_MODEL_TYPES)} (CLIP towers have a class token and a pre-norm)")
  # LlavaForConditionalGeneration ties the head if either config says so.
  tie = bool(hf_config.get("tie_word_embeddings") or text.get("tie_word_embeddings"))
  text_cfg = hf.config_from_hf({**text, "tie_word_embeddings": tie}, param_dtype=param_dtype,
                               dtype=dtype, source=f"{source} text_config")
  layer = hf_config.get("vision_feature_layer", -2)
  if not isinstance(layer, int) or isinstance(layer, bool):
    fail(f"vision_feature_layer {layer!r}: only a single int layer is supported")
  act = hf_config.get("projector_hidden_act", "gelu")
  if act not in PROJECTOR_ACTS:
    fail(f"projector_hidden_act {act!r} is not supported; supported: {', '.join(PROJECTOR_ACTS)}")
  size = vis.get("image_size", 224)
  patch = vis.get("patch_size", 16)
  for field, value in (("image_size", size), ("patch_size", patch)):
    if isinstance(value, (list, tuple)):
      if len(set(value)) != 1:
        fail(f"vision_config.{field} {value}: only square images and patches are supported")
  size = size[0] if isinstance(size, (list, tuple)) else size
  patch = patch[0] if isinstance(patch, (list, tuple)) else patch
  token = hf_config.get("image_token_index", hf_config.get("image_token_id", 32000))
  try:
    vision_cfg = VisionConfig(
        image_size=size, patch_size=patch, num_channels=vis.get("num_channels", 3),
        hidden_size=vis.get("hidden_size", 768),
        intermediate_size=vis.get("intermediate_size", 3072),
        num_layers=vis.get("num_hidden_layers", 12),
        num_heads=vis.get("num_attention_heads", 12),
        layer_norm_eps=float(vis.get("layer_norm_eps", 1e-6)),
        hidden_act=vis.get("hidden_act", "gelu_pytorch_tanh"), feature_layer=layer,
        feature_select=hf_config.get("vision_feature_select_strategy", "default"),
        projector_act=act, projector_bias=bool(hf_config.get("multimodal_projector_bias", True)),
        param_dtype=text_cfg.param_dtype, dtype=text_cfg.dtype)
    cfg = text_cfg.replace(vision=vision_cfg, image_token_id=token)
  except (ValueError, TypeError) as e:
    fail(f"invalid LLaVA config: {e}")
  seq = hf_config.get("image_seq_length")
  if seq is not None and seq != vision_cfg.tokens_per_image:
    fail(f"image_seq_length {seq} != {vision_cfg.tokens_per_image} placeholder tokens per "
         f"image of a {size}px / {patch}px-patch tower with feature select "
         f"{vision_cfg.feature_select!r}")
  return cfg


def config_to_hf(cfg: ModelConfig, dtype: Optional[str] = None) -> dict[str, Any]:
  """The config.json dict transformers needs for `cfg` (weights stored in `dtype`)."""
  v = cfg.vision
  if v.post_norm_features:
    raise ValueError("VisionConfig.post_norm_features=True has no LLaVA equivalent (HF LLaVA "
                     "reads the features before the post-LayerNorm); it cannot be exported")
  dtype = dtype or cfg.language_model.param_dtype
  text = hf.config_to_hf(cfg.language_model, dtype)
  text.pop("architectures")
  return {
      "architectures": [ARCHITECTURE], "model_type": "llava", "text_config": text,
      "vision_config": {
          "model_type": "siglip_vision_model", "hidden_size": v.hidden_size,
          "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_layers,
          "num_attention_heads": v.num_heads, "num_channels": v.num_channels,
          "image_size": v.image_size, "patch_size": v.patch_size,
          "hidden_act": v.hidden_act, "layer_norm_eps": v.layer_norm_eps,
          "attention_dropout": 0.0, "vision_use_head": False},
      "image_token_index": cfg.image_token_id, "image_seq_length": v.tokens_per_image,
      "projector_hidden_act": v.projector_act, "vision_feature_layer": v.feature_layer,
      "vision_feature_select_strategy": v.feature_select,
      "multimodal_projector_bias": v.projector_bias,
      "tie_word_embeddings": cfg.language_model.tie_embeddings,
      "torch_dtype": dtype, "dtype": dtype,
  }
