"""Hugging Face checkpoints (config.json + safetensors) <-> ModelConfig + params.

  cfg, params = load_pretrained("path/to/Qwen2.5-0.5B")
  save_pretrained(cfg, params, "out/dir")   # a directory transformers loads

Supported: `model_type` "llama" (incl. Llama 3 `rope_type: llama3`) and
"qwen2" (q/k/v bias, no sliding window); tied or untied embeddings; one
`model.safetensors` or shards listed in `model.safetensors.index.json`.
Only numpy and `safetensors` are used: no torch at run time.

Axis legend: D model width, H query heads, K kv heads, E head dim, F MLP
width, V vocab. torch `Linear` weights are `[out, in]`; ours are `[in, ...]`:
  q_proj.weight [H*E, D] <-> attn/q [D, H, E]    q_proj.bias [H*E] <-> q_bias [H, E]
  o_proj.weight [D, H*E] <-> attn/o [H, E, D]    gate/up [F, D] <-> [D, F]
  down [D, F] <-> [F, D]                         lm_head [V, D] <-> [D, V]
RoPE uses the HF rotate-half layout in both, so q/k need no permutation.

Errors about the checkpoint's content raise `HFCheckpointError` (a
ValueError) naming the file, tensor or field; a missing directory or file
raises FileNotFoundError naming the path.
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
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from kimi_jax.models import layer_stack
from kimi_jax.models.transformer import ModelConfig, RopeScaling, init_params

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "llama3")
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# Buffers some exporters write that carry no weights (recomputed from config).
_IGNORED_TENSORS = re.compile(r".*rotary_emb\.inv_freq$")

_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}

Params = dict[str, Any]


class HFCheckpointError(ValueError):
  """A Hugging Face checkpoint that cannot be read or converted."""


# --------------------------------------------------------------------- config


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


# -------------------------------------------------------------------- tensors


def _hf_layout(cfg: ModelConfig) -> Iterator[tuple[str, tuple, tuple[int, ...]]]:
  """(HF name, our param path, HF shape) for every tensor of `cfg`."""
  D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  H, K, E = cfg.num_heads, cfg.num_kv_heads, cfg.head_size
  yield "model.embed_tokens.weight", ("embed",), (V, D)
  for i in range(cfg.num_layers):
    pre, ours = f"model.layers.{i}.", f"layers_{i}"
    for proj, heads in (("q", H), ("k", K), ("v", K)):
      yield f"{pre}self_attn.{proj}_proj.weight", (ours, "attn", proj), (heads * E, D)
      if cfg.qkv_bias:
        yield f"{pre}self_attn.{proj}_proj.bias", (ours, "attn", f"{proj}_bias"), (heads * E,)
    yield f"{pre}self_attn.o_proj.weight", (ours, "attn", "o"), (D, H * E)
    yield f"{pre}input_layernorm.weight", (ours, "attn_norm", "scale"), (D,)
    yield f"{pre}post_attention_layernorm.weight", (ours, "mlp_norm", "scale"), (D,)
    yield f"{pre}mlp.gate_proj.weight", (ours, "mlp", "gate"), (F, D)
    yield f"{pre}mlp.up_proj.weight", (ours, "mlp", "up"), (F, D)
    yield f"{pre}mlp.down_proj.weight", (ours, "mlp", "down"), (D, F)
  yield "model.norm.weight", ("final_norm", "scale"), (D,)
  if not cfg.tie_embeddings:
    yield "lm_head.weight", ("lm_head",), (V, D)


def _from_hf(cfg: ModelConfig, leaf: str, x: np.ndarray) -> np.ndarray:
  """One HF tensor in our layout (see the table in the module docstring)."""
  D, E = cfg.hidden_size, cfg.head_size
  if leaf in ("q", "k", "v"):
    return x.T.reshape(D, -1, E)
  if leaf.endswith("_bias"):
    return x.reshape(-1, E)
  if leaf == "o":
    return x.T.reshape(-1, E, D)
  if leaf in ("gate", "up", "down", "lm_head"):
    return x.T
  return x  # embed, norm scales


def _to_hf(cfg: ModelConfig, leaf: str, x: np.ndarray) -> np.ndarray:
  D = cfg.hidden_size
  if leaf in ("q", "k", "v"):
    return x.reshape(D, -1).T
  if leaf.endswith("_bias"):
    return x.reshape(-1)
  if leaf == "o":
    return x.reshape(-1, D).T
  if leaf in ("gate", "up", "down", "lm_head"):
    return x.T
  return x


class _TensorFiles:
  """Lazy access to the tensors of one HF directory (single file or shards)."""

  def __init__(self, path: str):
    index = os.path.join(path, INDEX_NAME)
    single = os.path.join(path, WEIGHTS_NAME)
    if os.path.isfile(index):
      try:
        with open(index) as f:
          weight_map = json.load(f)["weight_map"]
      except (OSError, ValueError, KeyError, TypeError) as e:
        raise HFCheckpointError(f"{index}: not a valid safetensors index ({e})") from e
      files = sorted(set(weight_map.values()))
    elif os.path.isfile(single):
      weight_map, files = None, [WEIGHTS_NAME]
    else:
      extra = ""
      if any(n.endswith((".bin", ".pt", ".pth")) for n in os.listdir(path)):
        extra = " (only safetensors weights are supported, not pytorch .bin files)"
      raise FileNotFoundError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {path}{extra}")
    self._handles, self.location = {}, {}
    for name in files:
      file = os.path.join(path, name)
      if not os.path.isfile(file):
        raise FileNotFoundError(f"safetensors shard {file} (listed in {index}) does not exist")
      try:
        handle = safe_open(file, framework="np")
        keys = list(handle.keys())
      except (SafetensorError, OSError, ValueError) as e:
        raise HFCheckpointError(
            f"{file}: not a readable safetensors file (truncated or corrupt?): {e}") from e
      self._handles[file] = handle
      for key in keys:
        if key in self.location:
          raise HFCheckpointError(f"tensor {key!r} is stored twice: in {self.location[key]} "
                                  f"and {file}")
        self.location[key] = file
    if weight_map is not None:
      for key, name in weight_map.items():
        if self.location.get(key) != os.path.join(path, name):
          raise HFCheckpointError(f"{index} lists tensor {key!r} in {name}, which does not "
                                  "contain it")

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._handles[self.location[key]].get_slice(key).get_shape())

  def dtype(self, key: str) -> str:
    """The stored dtype as a numpy name ("bfloat16", "float32", ...)."""
    code = self._handles[self.location[key]].get_slice(key).get_dtype()
    return _SAFETENSORS_DTYPES.get(code, code.lower())

  def get(self, key: str) -> np.ndarray:
    file = self.location[key]
    try:
      return self._handles[file].get_tensor(key)
    except (SafetensorError, OSError, ValueError, TypeError) as e:
      raise HFCheckpointError(f"{file}: cannot read tensor {key!r}: {e}") from e


def load_pretrained(path: Union[str, os.PathLike], dtype: Optional[str] = None,
                    param_dtype: Optional[str] = None, *, scan_layers: bool = False
                    ) -> tuple[ModelConfig, Params]:
  """Reads a HF Llama / Qwen2 directory into `(ModelConfig, params)`.

  Args:
    path: directory with config.json and model.safetensors (or shards plus
      model.safetensors.index.json).
    dtype: compute dtype of the returned config; default `param_dtype`
      (as transformers computes in the weights' dtype).
    param_dtype: dtype of the returned params; default the stored dtype of
      the embedding (bf16 stays bf16).
    scan_layers: return `cfg.scan_layers=True` and the blocks stacked
      `[L, ...]` under "layers" (`models.layer_stack`; HF config.json does
      not say, so the caller does).

  Returns:
    The config and a params tree of jax arrays, as `init_params(cfg)` makes.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"Hugging Face model directory {path} does not exist")
  config_file = os.path.join(path, CONFIG_NAME)
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
  files = _TensorFiles(path)
  embed_name = "model.embed_tokens.weight"
  if param_dtype is None:
    if embed_name not in files.location:
      raise HFCheckpointError(f"missing tensor {embed_name!r} in {path}")
    param_dtype = files.dtype(embed_name)
  cfg = config_from_hf(hf_config, param_dtype=param_dtype, dtype=dtype, source=config_file)
  cfg = cfg.replace(scan_layers=scan_layers)
  return cfg, _params_from_files(cfg, files, path)


def _params_from_files(cfg: ModelConfig, files: _TensorFiles, path: str) -> Params:
  """`cfg`'s params (in the form `cfg.scan_layers` asks for) from `files`."""
  layout = list(_hf_layout(cfg))
  missing = [name for name, _, _ in layout if name not in files.location]
  if missing:
    raise HFCheckpointError(f"missing tensors in {path}: {', '.join(missing)}")
  expected = {name for name, _, _ in layout}
  unexpected = sorted(k for k in files.location
                      if k not in expected and not _IGNORED_TENSORS.match(k))
  if cfg.tie_embeddings and "lm_head.weight" in unexpected:
    # Some exporters keep a copy of the tied head; accept it only if it is one.
    if not np.array_equal(files.get("lm_head.weight"), files.get("model.embed_tokens.weight")):
      raise HFCheckpointError(
          f"{path}: tie_word_embeddings is true but lm_head.weight differs from "
          "model.embed_tokens.weight")
    unexpected.remove("lm_head.weight")
  if unexpected:
    raise HFCheckpointError(f"unexpected tensors in {path} (not part of a {cfg.family} model "
                            f"with this config): {', '.join(unexpected)}")
  pd = jnp.dtype(cfg.param_dtype)
  params: Params = {}
  for name, route, shape in layout:
    found = files.shape(name)
    if found != shape:
      raise HFCheckpointError(f"tensor {name!r} in {files.location[name]}: expected shape "
                              f"{shape} from config.json, found {found}")
    x = _from_hf(cfg, route[-1], files.get(name)).astype(pd)
    node = params
    for key in route[:-1]:
      node = node.setdefault(key, {})
    node[route[-1]] = x
  if cfg.scan_layers:  # stacked on the host: no second copy of the blocks on device
    params = layer_stack.stack_layers(params, cfg.num_layers)
  return jax.tree.map(jnp.asarray, params)


# ----------------------------------------------------------------------- save


def _parse_size(size: Union[int, str]) -> int:
  """Bytes from an int or a string such as "500MB", "2GiB"."""
  if isinstance(size, int):
    return size
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", str(size).upper())
  if not m:
    raise ValueError(f"max_shard_size {size!r}: expected bytes or e.g. '500MB', '5GB'")
  scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,
           "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[m.group(2) or "B"]
  return int(float(m.group(1)) * scale)


def params_to_hf(cfg: ModelConfig, params: Params, dtype: Optional[str] = None
                 ) -> dict[str, np.ndarray]:
  """HF-named numpy tensors (in `dtype`, default `cfg.param_dtype`), checked
  against the parameter shapes `cfg` implies. Params may be in either layer
  form (`models.layer_stack`), whatever `cfg.scan_layers` says."""
  if layer_stack.is_scanned(params):  # on the host first: the per-layer slices are views
    params = layer_stack.unstack_layers(jax.tree.map(np.asarray, jax.device_get(params)))
  cfg = cfg.replace(scan_layers=False)
  expected = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
  want = {jax.tree_util.keystr(p): x.shape
          for p, x in jax.tree_util.tree_leaves_with_path(expected)}
  got = {jax.tree_util.keystr(p): np.shape(x)
         for p, x in jax.tree_util.tree_leaves_with_path(params)}
  if want.keys() != got.keys():
    raise ValueError(f"params do not match the config: missing {sorted(want.keys() - got.keys())}, "
                     f"unexpected {sorted(got.keys() - want.keys())}")
  for key, shape in want.items():
    if got[key] != shape:
      raise ValueError(f"params{key}: expected shape {shape} from the config, found {got[key]}")
  out_dtype = jnp.dtype(dtype or cfg.param_dtype)
  tensors = {}
  for name, route, _ in _hf_layout(cfg):
    x = params
    for key in route:
      x = x[key]
    x = np.asarray(jax.device_get(x)).astype(out_dtype)
    tensors[name] = np.ascontiguousarray(_to_hf(cfg, route[-1], x))
  return tensors


def save_pretrained(cfg: ModelConfig, params: Params, path: Union[str, os.PathLike], *,
                    max_shard_size: Union[int, str] = "5GB", dtype: Optional[str] = None,
                    overwrite: bool = False) -> None:
  """Writes a HF directory that `transformers.AutoModelForCausalLM` loads.

  Args:
    cfg, params: the model (params as `init_params` / `load_pretrained` make).
    path: output directory. An existing non-empty directory is an error
      unless `overwrite` (then it is replaced as a whole).
    max_shard_size: bytes (int) or e.g. "500MB"; above it the tensors are
      split into `model-0000i-of-0000n.safetensors` plus an index.
    dtype: storage dtype; default `cfg.param_dtype`.

  Everything is written into a temporary sibling directory that is renamed
  into place at the end, so a crash never leaves a half-written model at
  `path`. Call from one process only (params must be fully addressable).
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path) and not os.path.isdir(path):
    raise FileExistsError(f"{path} exists and is not a directory")
  if os.path.isdir(path) and os.listdir(path) and not overwrite:
    raise FileExistsError(f"{path} already exists and is not empty; pass overwrite=True "
                          "to replace it")
  tensors = params_to_hf(cfg, params, dtype)
  shards, current, current_size = [], {}, 0
  limit = _parse_size(max_shard_size)
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
    with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
      json.dump(config_to_hf(cfg, dtype), f, indent=2, sort_keys=True)
    metadata = {"format": "pt"}  # transformers expects it in the header
    if len(shards) == 1:
      save_file(shards[0], os.path.join(tmp, WEIGHTS_NAME), metadata=metadata)
    else:
      weight_map = {}
      for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(tmp, name), metadata=metadata)
        weight_map.update({key: name for key in shard})
      index = {"metadata": {"total_size": sum(x.nbytes for x in tensors.values())},
               "weight_map": weight_map}
      with open(os.path.join(tmp, INDEX_NAME), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    _replace_dir(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _replace_dir(new: str, path: str) -> None:
  """Renames `new` to `path`; an existing `path` is moved aside first and
  deleted only once the new directory is in place."""
  if not os.path.exists(path):
    os.rename(new, path)
    return
  old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=os.path.dirname(path))
  os.rmdir(old)
  os.rename(path, old)
  try:
    os.rename(new, path)
  except BaseException:
    os.rename(old, path)
    raise
  shutil.rmtree(old)
