"""HF `LlavaForConditionalGeneration` directories <-> ModelConfig + params.

  cfg, params = hf_llava.load_pretrained("llava-onevision-qwen2-0.5b-ov-hf")
  proc = images.load_processor("llava-onevision-qwen2-0.5b-ov-hf")
  hf_llava.save_pretrained(cfg, params, "out/dir", processor=proc)

Supported: a SigLIP vision tower (`siglip_vision_model`, no pooling head
used), the LLaVA projector, and a Llama or Qwen2 language model, whose
config and tensors go through `models/hf.py` unchanged. Images at the
tower's resolution only (no anyres tiles): the layout of
llava-onevision-qwen2-0.5b's LM + tower.

The config (translated by `models/hf_llava_config.py`) is a `ModelConfig`
with `vision` (the tower + projector) and `image_token_id` set;
`cfg.language_model` is the Llama / Qwen2 decoder.
params = the language model's params (as `hf.load_pretrained` gives them)
plus params["vision"] = {"tower": ..., "projector": ...} (`models/vision.py`),
the layout `Transformer(cfg)` takes.

Tensor names. Read in every layout transformers has written (the
`language_model.model.*` / `vision_tower.vision_model.*` one of the Hub
checkpoints and transformers 4, the `model.language_model.*` /
`model.vision_tower.*` one of transformers >= 4.52 models, transformers 5's
`vision_tower.*` without `vision_model.`); written in the Hub layout, which
transformers 4 and 5 both load. A SigLIP pooling head (`vision_use_head`)
is not used by LLaVA and is dropped on reading.

LLaVA-OneVision directories (`llava_onevision`, e.g.
llava-onevision-qwen2-0.5b-ov-hf) have the same tower, projector and LM and
load too, as a starting point: their `image_newline` vector is dropped, and
an image is its base (resized) view alone, without anyres tiles or newline
tokens, so outputs differ from transformers' LlavaOnevision on the same
image (a warning says so). Saving always writes a plain LLaVA directory.

Axis legend: W vision width, H vision heads, E vision head dim, F vision
MLP width, C channels, s patch side, P patches, D LM width. torch `Linear`
weights are `[out, in]`, ours `[in, ...]`:
  q/k/v_proj [H*E, W] <-> attn/q|k|v/kernel [W, H, E]   bias [H*E] <-> [H, E]
  out_proj [W, H*E] <-> attn/o/kernel [H, E, W]         fc1 [F, W] <-> [W, F]
  patch_embedding [W, C, s, s] <-> patch_embed/kernel [s, s, C, W]
  linear_1 [D, W] <-> projector/linear_1/kernel [W, D]
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Any, Iterator, Mapping, Optional, Union

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from kimi_jax.data import images as images_lib
from kimi_jax.models import hf
from kimi_jax.models import vision as vision_lib
from kimi_jax.models.transformer import ModelConfig
from kimi_jax.models.hf_llava_config import (  # noqa: F401  (public here too)
    ARCHITECTURE, MODEL_TYPES, PROJECTOR_ACTS, VISION_MODEL_TYPES, config_from_hf, config_to_hf)

HFCheckpointError = hf.HFCheckpointError
Params = dict[str, Any]
_TOWER = "vision_tower.vision_model."
_PROJECTOR = "multi_modal_projector."
_LM = "language_model.model."
_LM_HEAD = "language_model.lm_head.weight"
# (stored prefix, Hub-layout prefix), first match wins: the aliases
# transformers has written over its versions.
_ALIASES = (
    ("model.vision_tower.vision_model.", _TOWER), ("model.vision_tower.", _TOWER),
    ("vision_tower.vision_model.", _TOWER), ("vision_tower.", _TOWER),
    ("model.multi_modal_projector.", _PROJECTOR), (_PROJECTOR, _PROJECTOR),
    ("model.language_model.", _LM), (_LM, _LM),
    ("lm_head.weight", _LM_HEAD), (_LM_HEAD, _LM_HEAD))
_POOLING_HEAD = re.compile(re.escape(_TOWER) + r"head\.")
_ONEVISION_ONLY = ("image_newline", "model.image_newline")


# -------------------------------------------------------------------- tensors


def _vision_layout(cfg: ModelConfig) -> Iterator[tuple[str, tuple, tuple[int, ...]]]:
  """(Hub-layout name, our path under params["vision"], HF shape) per tensor."""
  v, D = cfg.vision, cfg.language_model.hidden_size
  W, F, C, s = v.hidden_size, v.intermediate_size, v.num_channels, v.patch_size
  t = ("tower",)
  yield f"{_TOWER}embeddings.patch_embedding.weight", t + ("patch_embed", "kernel"), (W, C, s, s)
  yield f"{_TOWER}embeddings.patch_embedding.bias", t + ("patch_embed", "bias"), (W,)
  yield f"{_TOWER}embeddings.position_embedding.weight", t + ("pos_embed",), (v.num_patches, W)
  for i in range(v.num_layers):
    pre, ours = f"{_TOWER}encoder.layers.{i}.", t + (f"layers_{i}",)
    for hf_name, name in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("out_proj", "o")):
      yield f"{pre}self_attn.{hf_name}.weight", ours + ("attn", name, "kernel"), (W, W)
      yield f"{pre}self_attn.{hf_name}.bias", ours + ("attn", name, "bias"), (W,)
    for n in ("1", "2"):
      yield f"{pre}layer_norm{n}.weight", ours + (f"norm{n}", "scale"), (W,)
      yield f"{pre}layer_norm{n}.bias", ours + (f"norm{n}", "bias"), (W,)
    yield f"{pre}mlp.fc1.weight", ours + ("fc1", "kernel"), (F, W)
    yield f"{pre}mlp.fc1.bias", ours + ("fc1", "bias"), (F,)
    yield f"{pre}mlp.fc2.weight", ours + ("fc2", "kernel"), (W, F)
    yield f"{pre}mlp.fc2.bias", ours + ("fc2", "bias"), (W,)
  yield f"{_TOWER}post_layernorm.weight", t + ("post_norm", "scale"), (W,)
  yield f"{_TOWER}post_layernorm.bias", t + ("post_norm", "bias"), (W,)
  for n, shape in (("1", (D, W)), ("2", (D, D))):
    yield f"{_PROJECTOR}linear_{n}.weight", ("projector", f"linear_{n}", "kernel"), shape
    if v.projector_bias:
      yield f"{_PROJECTOR}linear_{n}.bias", ("projector", f"linear_{n}", "bias"), (D,)


def _from_hf(cfg: ModelConfig, route: tuple, x: np.ndarray) -> np.ndarray:
  """One HF vision / projector tensor in our layout (module docstring table)."""
  H, E = cfg.vision.num_heads, cfg.vision.head_dim
  if route[-2] == "patch_embed" and route[-1] == "kernel":
    return x.transpose(2, 3, 1, 0)
  if route[-3:-1] in (("attn", "q"), ("attn", "k"), ("attn", "v")):
    return x.T.reshape(-1, H, E) if route[-1] == "kernel" else x.reshape(H, E)
  if route[-2:] == ("o", "kernel"):
    return x.T.reshape(H, E, -1)
  if route[-1] == "kernel":  # fc1, fc2, projector linears
    return x.T
  return x


def _to_hf(cfg: ModelConfig, route: tuple, x: np.ndarray) -> np.ndarray:
  if route[-2] == "patch_embed" and route[-1] == "kernel":
    return x.transpose(3, 2, 0, 1)
  if route[-3:-1] in (("attn", "q"), ("attn", "k"), ("attn", "v")):
    return x.reshape(x.shape[0], -1).T if route[-1] == "kernel" else x.reshape(-1)
  if route[-2:] == ("o", "kernel"):
    return x.reshape(-1, x.shape[-1]).T
  if route[-1] == "kernel":
    return x.T
  return x


def _hub_name(stored: str) -> Optional[str]:
  for prefix, hub in _ALIASES:
    if stored == prefix or (prefix.endswith(".") and stored.startswith(prefix)):
      return hub + stored[len(prefix):]
  return None


class _Renamed:
  """The tensors of a `hf._TensorFiles` under other names (`names`: new -> stored),
  with the interface `hf._params_from_files` reads."""

  def __init__(self, files, names: Mapping[str, str]):
    self._files, self._names = files, dict(names)
    self.location = {new: files.location[old] for new, old in self._names.items()}

  def shape(self, key):
    return self._files.shape(self._names[key])

  def dtype(self, key):
    return self._files.dtype(self._names[key])

  def get(self, key):
    return self._files.get(self._names[key])


def load_pretrained(path: Union[str, os.PathLike], dtype: Optional[str] = None,
                    param_dtype: Optional[str] = None, *, scan_layers: bool = False
                    ) -> tuple[ModelConfig, Params]:
  """Reads a HF LLaVA directory into `(ModelConfig, params)` (module docstring).

  dtype / param_dtype / scan_layers (the LM's blocks stacked) as in
  `hf.load_pretrained` (default: the stored dtype of the token embedding,
  for the tower too).
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"Hugging Face model directory {path} does not exist")
  config_file = os.path.join(path, hf.CONFIG_NAME)
  if not os.path.isfile(config_file):
    raise FileNotFoundError(f"{config_file} does not exist")
  try:
    with open(config_file) as f:
      hf_config = json.load(f)
  except ValueError as e:
    raise HFCheckpointError(f"{config_file}: not valid JSON ({e})") from e
  if not isinstance(hf_config, dict):
    raise HFCheckpointError(f"{config_file}: expected a JSON object")
  config_from_hf(hf_config, source=config_file)  # config errors before weight errors
  files = hf._TensorFiles(path)  # pylint: disable=protected-access
  hub: dict[str, str] = {}
  unexpected, dropped = [], []
  onevision = hf_config.get("model_type") == "llava_onevision"
  if onevision:
    logging.warning("%s: LLaVA-OneVision checkpoint read as LLaVA: images are their base "
                    "view only (no anyres tiles, no image_newline); outputs differ from "
                    "transformers' LlavaOnevision", path)
  for stored in sorted(files.location):
    name = _hub_name(stored)
    if (name is not None and _POOLING_HEAD.match(name)) or (
        onevision and stored in _ONEVISION_ONLY):
      dropped.append(stored)
    elif name is None:
      unexpected.append(stored)
    elif name in hub:
      raise HFCheckpointError(f"{path}: tensors {hub[name]!r} and {stored!r} are the same "
                              f"tensor in two name layouts")
    else:
      hub[name] = stored
  if dropped:
    logging.info("%s: dropped %d tensors LLaVA does not use: %s", path, len(dropped),
                 ", ".join(dropped[:4]))
  if param_dtype is None:
    embed = f"{_LM}embed_tokens.weight"
    if embed not in hub:
      raise HFCheckpointError(f"missing tensor {embed!r} in {path}")
    param_dtype = files.dtype(hub[embed])
  cfg = config_from_hf(hf_config, param_dtype=param_dtype, dtype=dtype, source=config_file)
  cfg = cfg.replace(scan_layers=scan_layers)

  vision_names = {name for name, _, _ in _vision_layout(cfg)}
  lm = {}
  for name, stored in hub.items():
    if name.startswith(_LM):
      lm["model." + name[len(_LM):]] = stored
    elif name == _LM_HEAD:
      lm["lm_head.weight"] = stored
    elif name not in vision_names:
      unexpected.append(stored)
  if unexpected:
    raise HFCheckpointError(f"unexpected tensors in {path} (not part of a LLaVA model with this "
                            f"config): {', '.join(sorted(unexpected))}")
  missing = sorted(n for n in vision_names if n not in hub)
  if missing:
    raise HFCheckpointError(f"missing tensors in {path}: {', '.join(missing)}")
  params = hf._params_from_files(  # pylint: disable=protected-access
      cfg.language_model, _Renamed(files, lm), f"{path} (language model)")
  pd = jnp.dtype(cfg.vision.param_dtype)
  vision: Params = {}
  for name, route, shape in _vision_layout(cfg):
    found = files.shape(hub[name])
    if found != shape:
      raise HFCheckpointError(f"tensor {hub[name]!r} in {files.location[hub[name]]}: expected "
                              f"shape {shape} from config.json, found {found}")
    node = vision
    for key in route[:-1]:
      node = node.setdefault(key, {})
    node[route[-1]] = jnp.asarray(_from_hf(cfg, route, files.get(hub[name])).astype(pd))
  params["vision"] = vision
  return cfg, params


# ----------------------------------------------------------------------- save


def params_to_hf(cfg: ModelConfig, params: Params, dtype: Optional[str] = None
                 ) -> dict[str, np.ndarray]:
  """Hub-layout numpy tensors (in `dtype`, default the LM's param dtype),
  checked against the shapes `cfg` implies."""
  if "vision" not in params:
    raise ValueError("params have no 'vision' subtree (the image encoder)")
  lm_params = {k: v for k, v in params.items() if k != "vision"}
  tensors = {}
  for name, x in hf.params_to_hf(cfg.language_model, lm_params, dtype).items():
    tensors[_LM_HEAD if name == "lm_head.weight" else _LM + name[len("model."):]] = x
  expected = jax.eval_shape(lambda: vision_lib.init_params(
      cfg.vision, cfg.language_model.hidden_size, jax.random.PRNGKey(0)))
  want = {jax.tree_util.keystr(p): x.shape
          for p, x in jax.tree_util.tree_leaves_with_path(expected)}
  got = {jax.tree_util.keystr(p): np.shape(x)
         for p, x in jax.tree_util.tree_leaves_with_path(params["vision"])}
  if want.keys() != got.keys():
    raise ValueError(f"params['vision'] do not match the config: missing "
                     f"{sorted(want.keys() - got.keys())}, unexpected "
                     f"{sorted(got.keys() - want.keys())}")
  for key, shape in want.items():
    if got[key] != shape:
      raise ValueError(f"params['vision']{key}: expected shape {shape} from the config, "
                       f"found {got[key]}")
  out_dtype = jnp.dtype(dtype or cfg.language_model.param_dtype)
  for name, route, _ in _vision_layout(cfg):
    x = params["vision"]
    for key in route:
      x = x[key]
    x = np.asarray(jax.device_get(x)).astype(out_dtype)
    tensors[name] = np.ascontiguousarray(_to_hf(cfg, route, x))
  return tensors


def save_pretrained(cfg: ModelConfig, params: Params, path: Union[str, os.PathLike], *,
                    processor: Optional[images_lib.ProcessorConfig] = None,
                    max_shard_size: Union[int, str] = "5GB", dtype: Optional[str] = None,
                    overwrite: bool = False) -> None:
  """Writes a directory `transformers.LlavaForConditionalGeneration` loads.

  processor: written as preprocessor_config.json (SiglipImageProcessor), so
    that `transformers.AutoImageProcessor` and `images.load_processor` read
    the normalisation the model was trained with; None writes none.
  Other arguments, sharding and the atomic write as `hf.save_pretrained`.
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path) and not os.path.isdir(path):
    raise FileExistsError(f"{path} exists and is not a directory")
  if os.path.isdir(path) and os.listdir(path) and not overwrite:
    raise FileExistsError(f"{path} already exists and is not empty; pass overwrite=True "
                          "to replace it")
  config = config_to_hf(cfg, dtype)
  tensors = params_to_hf(cfg, params, dtype)
  limit = hf._parse_size(max_shard_size)  # pylint: disable=protected-access
  shards, current, current_size = [], {}, 0
  for name, x in tensors.items():
    if current and current_size + x.nbytes > limit:
      shards.append(current)
      current, current_size = {}, 0
    current[name] = x
    current_size += x.nbytes
  shards.append(current)
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
  try:
    os.chmod(tmp, 0o755)
    with open(os.path.join(tmp, hf.CONFIG_NAME), "w") as f:
      json.dump(config, f, indent=2, sort_keys=True)
    if processor is not None:
      with open(os.path.join(tmp, images_lib.PROCESSOR_CONFIG_NAME), "w") as f:
        json.dump(images_lib.processor_to_hf(processor), f, indent=2, sort_keys=True)
    metadata = {"format": "pt"}
    if len(shards) == 1:
      save_file(shards[0], os.path.join(tmp, hf.WEIGHTS_NAME), metadata=metadata)
    else:
      weight_map = {}
      for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(tmp, name), metadata=metadata)
        weight_map.update({key: name for key in shard})
      index = {"metadata": {"total_size": sum(x.nbytes for x in tensors.values())},
               "weight_map": weight_map}
      with open(os.path.join(tmp, hf.INDEX_NAME), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    hf._replace_dir(tmp, path)  # pylint: disable=protected-access
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
