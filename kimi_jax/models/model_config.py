"""`ModelConfig`: the architecture, numerics and long-context settings of one
decoder (hashable: a jit static), and Llama 3 `RopeScaling`. A multimodal
model also has an image encoder (`vision`, models/vision.py) and the id of
its image placeholder token."""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp

from kimi_jax.models.vision import VisionConfig

FAMILIES = ("llama", "qwen2")
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "blockwise", "splash", "cudnn")
REMAT_POLICIES = ("none", "full", "dots", "offload")
# How the model runs, not what it computes: set per run, never taken from a
# checkpoint's or HF config (README "Long context").
LONG_CONTEXT_FIELDS = ("attention", "remat", "scan_layers", "logits_chunk", "prefill_chunk")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama 3 style frequency-dependent RoPE scaling (HF `rope_type: llama3`)."""
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture and numerics of one model. Hashable: usable as a jit static.

  dtype fields are strings ("float32", "bfloat16") to keep the config
  hashable and JSON-friendly.
  """
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: Optional[int] = None  # default hidden_size // num_heads
  rope_theta: float = 10000.0
  rope_scaling: Optional[RopeScaling] = None
  rms_norm_eps: float = 1e-6
  qkv_bias: bool = False  # True for Qwen2
  tie_embeddings: bool = False
  max_position_embeddings: int = 4096
  family: str = "llama"  # "llama" | "qwen2": decides the HF export format
  param_dtype: str = "float32"
  dtype: str = "float32"  # compute dtype; norms, softmax and logits stay fp32
  bos_id: Optional[int] = None
  eos_id: Optional[int] = None
  pad_id: Optional[int] = None
  # Long-context settings (README "Long context"); none changes the values.
  attention: str = "auto"  # see kimi_jax/models/attention_kernels.py
  remat: str = "none"  # "none" | "full" (blocks keep only their input) | "dots" | "offload"
  scan_layers: bool = False  # params stacked [L, ...] under "layers", nn.scan
  logits_chunk: int = 0  # LM head + log-softmax in chunks of this many tokens; 0 = all
  prefill_chunk: int = 0  # prompt prefill into the KV cache in chunks; 0 = one shot
  # Image + text (README "Images"): the encoder whose projected features
  # replace the embeddings of `image_token_id` placeholders; None = text only.
  vision: Optional[VisionConfig] = None
  image_token_id: Optional[int] = None

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                 "num_heads", "num_kv_heads", "max_position_embeddings"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of "
          f"num_kv_heads ({self.num_kv_heads})")
    if self.head_dim is None and self.hidden_size % self.num_heads:
      raise ValueError(
          f"ModelConfig.hidden_size ({self.hidden_size}) is not divisible by "
          f"num_heads ({self.num_heads}); set head_dim explicitly")
    if self.family not in FAMILIES:
      raise ValueError(f"ModelConfig.family must be one of {FAMILIES}, got {self.family!r}")
    if self.attention not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"ModelConfig.attention must be one of {ATTENTION_IMPLEMENTATIONS}, "
                       f"got {self.attention!r}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"ModelConfig.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
    if not isinstance(self.scan_layers, bool):
      raise ValueError(f"ModelConfig.scan_layers must be a bool, got {self.scan_layers!r}")
    for name in ("logits_chunk", "prefill_chunk"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"ModelConfig.{name} must be an int >= 0 (0 = whole sequence), "
                         f"got {value!r}")
    for name in ("dtype", "param_dtype"):
      try:
        jnp.dtype(getattr(self, name))
      except TypeError as e:
        raise ValueError(f"ModelConfig.{name}: unknown dtype {getattr(self, name)!r}") from e
    if self.vision is not None and not isinstance(self.vision, VisionConfig):
      raise ValueError(f"ModelConfig.vision must be a VisionConfig or None, got "
                       f"{type(self.vision).__name__}")
    if (self.vision is None) != (self.image_token_id is None):
      raise ValueError("ModelConfig.vision and ModelConfig.image_token_id go together: set both "
                       f"(image + text) or neither (text only), got vision="
                       f"{'set' if self.vision else None}, image_token_id={self.image_token_id!r}")
    if self.image_token_id is not None and not (
        isinstance(self.image_token_id, int) and 0 <= self.image_token_id < self.vocab_size):
      raise ValueError(f"ModelConfig.image_token_id {self.image_token_id!r} is not a token id of "
                       f"the vocabulary ({self.vocab_size})")

  @property
  def language_model(self) -> "ModelConfig":
    """This config without its image encoder (the text decoder alone)."""
    return self.replace(vision=None, image_token_id=None)

  @property
  def head_size(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  def num_params(self) -> int:
    """Parameter count (exact, from the architecture)."""
    d, f, e = self.hidden_size, self.intermediate_size, self.head_size
    attn = d * e * (self.num_heads * 2 + self.num_kv_heads * 2)
    if self.qkv_bias:
      attn += e * (self.num_heads + 2 * self.num_kv_heads)
    layer = attn + 3 * d * f + 2 * d
    head = 0 if self.tie_embeddings else d * self.vocab_size
    vision = 0 if self.vision is None else self.vision.num_params(d)
    return self.vocab_size * d + self.num_layers * layer + d + head + vision

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)
