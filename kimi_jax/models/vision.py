"""Image encoder for multimodal prompts: a SigLIP ViT and the LLaVA projector.

Axis legend: N images, P patches per image (the tokens an image becomes),
C colour channels, Y/X image height/width in pixels, W vision width, H vision
heads, E vision head dim, F vision MLP width, D language-model width,
B batch rows, T sequence length, S image slots per row.

  feats_NPD = VisionEncoder(vcfg, lm_width).apply({"params": p}, pixels_NYXC)
  x_BTD = merge_image_features(x_BTD, tokens_BT, feats_NPD, image_token_id)

The tower follows HF `SiglipVisionModel` (patch embedding = a stride-P conv,
learned position embeddings, pre-norm LayerNorm blocks, GELU(tanh) MLP,
post-LayerNorm, no class token) and the projector HF
`LlavaMultiModalProjector` (linear, GELU, linear into the LM width), so that
HF LLaVA checkpoints map one to one (`models/hf_llava.py`). As in HF LLaVA the
features are the hidden state after `feature_layer` blocks, *before*
post-LayerNorm; its parameters exist (a SigLIP checkpoint has them and a
round trip keeps them) but only a feature layer of `num_layers` with
`post_norm_features=True` uses them. Blocks after the feature layer are not
run (they are still initialised, for the same reason).

Every parameter has logical axes named like the language model's ("embed",
"q_heads", "head_dim", "mlp", "norm"), so the rule tables of
`kimi_jax/parallel.py` shard the tower without new rules: vision width over
`fsdp` when training, heads and MLP width over `tensor`. Matmuls run in
`VisionConfig.dtype`; LayerNorm statistics and softmax stay float32.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from kimi_jax.models.image_placeholders import (  # noqa: F401  (re-exported)
    check_image_placeholders, merge_image_features)

PARAMS_KEY = "vision"  # the encoder's top-level key in a multimodal model's params
ACTIVATIONS = ("gelu_pytorch_tanh", "gelu")  # HF names: tanh approximation, exact erf
FEATURE_SELECT = ("full", "default")  # HF vision_feature_select_strategy

# Logical activation axes (rules in kimi_jax/parallel.py): images are batch rows.
ACT_NPW = ("activation_batch", "activation_length", "activation_embed")
ACT_NPF = ("activation_batch", "activation_length", "activation_mlp")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """Architecture and numerics of the image encoder. Hashable: usable as a jit static.

  feature_layer: which hidden state the projector reads, HF
    `vision_feature_layer`: 0 the patch embeddings, i the output of block i,
    negative counts from the end (-1 the last block, -2 the one before).
  feature_select: "full" keeps every patch; "default" drops the first one
    (HF's rule for CLIP's class token; a SigLIP tower has none, so LLaVA
    checkpoints with SigLIP use "full").
  post_norm_features: apply the post-LayerNorm to the features (only with
    the last block as feature layer). HF LLaVA never does; a model trained
    here may.
  """
  image_size: int = 32
  patch_size: int = 8
  num_channels: int = 3
  hidden_size: int = 64
  intermediate_size: int = 256
  num_layers: int = 2
  num_heads: int = 4
  layer_norm_eps: float = 1e-6
  hidden_act: str = "gelu_pytorch_tanh"
  feature_layer: int = -1
  feature_select: str = "full"
  post_norm_features: bool = False
  projector_act: str = "gelu"
  projector_bias: bool = True
  param_dtype: str = "float32"
  dtype: str = "float32"  # compute dtype of the matmuls

  def __post_init__(self):
    for name in ("image_size", "patch_size", "num_channels", "hidden_size",
                 "intermediate_size", "num_layers", "num_heads"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"VisionConfig.{name} must be a positive int, got {value!r}")
    if self.image_size % self.patch_size:
      raise ValueError(f"VisionConfig.image_size ({self.image_size}) must be a multiple of "
                       f"patch_size ({self.patch_size})")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"VisionConfig.hidden_size ({self.hidden_size}) must be a multiple of "
                       f"num_heads ({self.num_heads})")
    for name in ("hidden_act", "projector_act"):
      if getattr(self, name) not in ACTIVATIONS:
        raise ValueError(f"VisionConfig.{name} must be one of {ACTIVATIONS}, "
                         f"got {getattr(self, name)!r}")
    if self.feature_select not in FEATURE_SELECT:
      raise ValueError(f"VisionConfig.feature_select must be one of {FEATURE_SELECT}, "
                       f"got {self.feature_select!r}")
    if not -(self.num_layers + 1) <= self.feature_layer <= self.num_layers:
      raise ValueError(f"VisionConfig.feature_layer must be in [{-(self.num_layers + 1)}, "
                       f"{self.num_layers}] for {self.num_layers} layers, got {self.feature_layer}")
    if self.post_norm_features and self.feature_blocks != self.num_layers:
      raise ValueError("VisionConfig.post_norm_features needs the last block as feature_layer "
                       f"(-1 or {self.num_layers}), got {self.feature_layer}")
    if self.feature_select == "default" and self.num_patches == 1:
      raise ValueError("VisionConfig.feature_select='default' drops the only patch")
    for name in ("dtype", "param_dtype"):
      try:
        jnp.dtype(getattr(self, name))
      except TypeError as e:
        raise ValueError(f"VisionConfig.{name}: unknown dtype {getattr(self, name)!r}") from e

  @property
  def grid(self) -> int:
    """Patches per image side."""
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    """Patches the tower sees per image (= its position embeddings)."""
    return self.grid * self.grid

  @property
  def tokens_per_image(self) -> int:
    """Placeholder tokens per image in a prompt: the projected features' P."""
    return self.num_patches - (self.feature_select == "default")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def feature_blocks(self) -> int:
    """Blocks run before the features are taken (`feature_layer` made non-negative)."""
    return self.feature_layer % (self.num_layers + 1)

  def num_params(self, out_dim: int) -> int:
    """Parameters of tower + projector into an LM of width `out_dim` (exact)."""
    W, F, s = self.hidden_size, self.intermediate_size, self.patch_size
    block = 4 * (W * W + W) + 2 * 2 * W + (W * F + F) + (F * W + W)
    tower = s * s * self.num_channels * W + W + self.num_patches * W + self.num_layers * block + 2 * W
    projector = W * out_dim + out_dim * out_dim + 2 * out_dim * self.projector_bias
    return tower + projector

  def replace(self, **changes) -> "VisionConfig":
    return dataclasses.replace(self, **changes)


def _gelu(name: str, x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=name == "gelu_pytorch_tanh")


def _kernel_init():
  return nn.initializers.normal(stddev=0.02)


def layer_normalize(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
  """LayerNorm over the last axis: statistics in float32, result in x's dtype."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + eps)
  lead = (1,) * (x.ndim - 1)
  return (y * scale.astype(jnp.float32).reshape(lead + (-1,))
          + bias.astype(jnp.float32).reshape(lead + (-1,))).astype(x.dtype)


class LayerNorm(nn.Module):
  eps: float
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    w = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (w,), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                      (w,), self.param_dtype)
    return layer_normalize(x, scale, bias, self.eps)


class Dense(nn.Module):
  """`x @ kernel + bias`, contracting the last `in_dims` axes of x.

  The kernel is `[*x.shape[-in_dims:], *out_shape]` with logical `axes` (one
  name per kernel axis); the bias has the output axes' names.
  """
  out_shape: tuple[int, ...]
  axes: tuple[str, ...]
  param_dtype: jnp.dtype
  in_dims: int = 1
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    shape = x.shape[x.ndim - self.in_dims:] + tuple(self.out_shape)
    kernel = self.param("kernel", nn.with_logical_partitioning(_kernel_init(), self.axes),
                        shape, self.param_dtype)
    y = jnp.tensordot(x, jnp.asarray(kernel, x.dtype), axes=self.in_dims)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(
          nn.initializers.zeros, self.axes[self.in_dims:]), tuple(self.out_shape),
          self.param_dtype)
      y = y + jnp.asarray(bias, y.dtype).reshape((1,) * (y.ndim - bias.ndim) + bias.shape)
    return y


class Attention(nn.Module):
  """Bidirectional multi-head self-attention among the patches of each image."""
  cfg: VisionConfig

  @nn.compact
  def __call__(self, x_NPW):
    cfg = self.cfg
    pd = jnp.dtype(cfg.param_dtype)
    H, E = cfg.num_heads, cfg.head_dim
    q_NPHE, k_NPHE, v_NPHE = (
        Dense((H, E), ("embed", "q_heads", "head_dim"), pd, name=name)(x_NPW)
        for name in ("q", "k", "v"))
    # jax's attention entry point: plain XLA here, cuDNN's fused kernel on
    # GPU; the XLA form takes the softmax in float32 whatever the input dtype.
    out_NPHE = jax.nn.dot_product_attention(q_NPHE, k_NPHE, v_NPHE, scale=E ** -0.5)
    return Dense((cfg.hidden_size,), ("q_heads", "head_dim", "embed"), pd, in_dims=2,
                 name="o")(out_NPHE)


class Block(nn.Module):
  """Pre-norm encoder block: x + attn(ln1(x)), then x + mlp(ln2(x))."""
  cfg: VisionConfig

  @nn.compact
  def __call__(self, x_NPW):
    cfg = self.cfg
    pd = jnp.dtype(cfg.param_dtype)
    h = LayerNorm(cfg.layer_norm_eps, pd, name="norm1")(x_NPW)
    x_NPW = x_NPW + Attention(cfg, name="attn")(h)
    h = LayerNorm(cfg.layer_norm_eps, pd, name="norm2")(x_NPW)
    h_NPF = Dense((cfg.intermediate_size,), ("embed", "mlp"), pd, name="fc1")(h)
    h_NPF = nn.with_logical_constraint(_gelu(cfg.hidden_act, h_NPF), ACT_NPF)
    return x_NPW + Dense((cfg.hidden_size,), ("mlp", "embed"), pd, name="fc2")(h_NPF)


class VisionTower(nn.Module):
  """SigLIP ViT: pixels float32 `[N, Y, X, C]` (normalised) -> features
  `[N, P, W]` in the compute dtype (the hidden state `cfg.feature_layer`)."""
  cfg: VisionConfig

  @nn.compact
  def __call__(self, pixels_NYXC: jax.Array) -> jax.Array:
    cfg = self.cfg
    pd, cd = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
    want = (cfg.image_size, cfg.image_size, cfg.num_channels)
    if pixels_NYXC.ndim != 4 or tuple(pixels_NYXC.shape[1:]) != want:
      raise ValueError(f"pixel_values must be [num_images, {want[0]}, {want[1]}, {want[2]}] "
                       f"(NHWC, as data.images.preprocess makes), got {pixels_NYXC.shape}")
    n, g, s, c = pixels_NYXC.shape[0], cfg.grid, cfg.patch_size, cfg.num_channels
    # The stride-s "valid" convolution of SigLIP is a matmul over each patch's
    # pixels; patches in raster order (row of patches, then column), as HF's
    # flatten of the conv output. Kernel [s, s, C, W] = flax's HWIO conv layout.
    patches = pixels_NYXC.astype(cd).reshape(n, g, s, g, s, c).transpose(0, 1, 3, 2, 4, 5)
    x_NPW = Dense((cfg.hidden_size,), (None, None, None, "embed"), pd, in_dims=3,
                  name="patch_embed")(patches.reshape(n, g * g, s, s, c))
    pos_PW = self.param("pos_embed", nn.with_logical_partitioning(
        nn.initializers.normal(stddev=0.02), (None, "embed")),
        (cfg.num_patches, cfg.hidden_size), pd)
    x_NPW = nn.with_logical_constraint(x_NPW + jnp.asarray(pos_PW, cd)[None], ACT_NPW)
    blocks = [Block(cfg, name=f"layers_{i}") for i in range(cfg.num_layers)]
    post_norm = LayerNorm(cfg.layer_norm_eps, pd, name="post_norm")
    for block in blocks[:cfg.feature_blocks]:
      x_NPW = nn.with_logical_constraint(block(x_NPW), ACT_NPW)
    features = post_norm(x_NPW) if cfg.post_norm_features else x_NPW
    if self.is_initializing():
      # Create what the features do not use, so the parameters always have
      # the full SigLIP layout (checkpoints round-trip whatever feature_layer).
      rest = features
      for block in blocks[cfg.feature_blocks:]:
        rest = block(rest)
      if not cfg.post_norm_features:
        post_norm(rest)
    if cfg.feature_select == "default":
      features = features[:, 1:]
    return features


class Projector(nn.Module):
  """LLaVA projector: `[N, P, W]` -> `[N, P, D]`, linear, GELU, linear.

  Kernels are sharded like an MLP (first over `tensor` on its output, the
  second on its input), so the hidden stays split between the two."""
  cfg: VisionConfig
  out_dim: int

  @nn.compact
  def __call__(self, x_NPW):
    cfg = self.cfg
    pd = jnp.dtype(cfg.param_dtype)
    h_NPD = Dense((self.out_dim,), ("embed", "mlp"), pd, use_bias=cfg.projector_bias,
                  name="linear_1")(x_NPW)
    h_NPD = _gelu(cfg.projector_act, h_NPD)
    return Dense((self.out_dim,), ("mlp", "embed"), pd, use_bias=cfg.projector_bias,
                 name="linear_2")(h_NPD)


class VisionEncoder(nn.Module):
  """Tower + projector: pixels float32 `[N, Y, X, C]` -> `[N, P, D]` features
  in the LM's embedding space (`out_dim` = its hidden size), compute dtype.

  Parameters: {"tower": SigLIP, "projector": {"linear_1", "linear_2"}}."""
  cfg: VisionConfig
  out_dim: int

  @nn.compact
  def __call__(self, pixels_NYXC: jax.Array) -> jax.Array:
    feats = VisionTower(self.cfg, name="tower")(pixels_NYXC)
    return Projector(self.cfg, self.out_dim, name="projector")(feats)


def _dummy_pixels(cfg: VisionConfig) -> jax.Array:
  return jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32)


def init_params(cfg: VisionConfig, out_dim: int, rng: jax.Array) -> dict:
  """Random encoder parameters (plain arrays, logical-axis boxes removed)."""
  init = jax.jit(lambda r: nn.unbox(
      VisionEncoder(cfg, out_dim).init(r, _dummy_pixels(cfg))["params"]))
  return init(rng)


def param_logical_axes(cfg: VisionConfig, out_dim: int) -> dict:
  """A pytree like the params whose leaves are `PartitionSpec`s of logical names."""
  boxed = jax.eval_shape(lambda: VisionEncoder(cfg, out_dim).init(
      jax.random.PRNGKey(0), _dummy_pixels(cfg)))
  return nn.get_partition_spec(boxed)["params"]
