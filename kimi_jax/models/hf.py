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

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from kimi_jax.models import layer_stack
from kimi_jax.models.hf_config import (  # noqa: F401  (re-exported)
    CONFIG_NAME, SUPPORTED_MODEL_TYPES, SUPPORTED_ROPE_TYPES, HFCheckpointError, config_from_hf,
    config_to_hf)
from kimi_jax.models.transformer import ModelConfig, init_params

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# Buffers some exporters write that carry no weights (recomputed from config).
_IGNORED_TENSORS = re.compile(r".*rotary_emb\.inv_freq$")

_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}

Params = dict[str, Any]


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


# model_type values of image + text directories (models/hf_llava.py reads them).
LLAVA_MODEL_TYPES = ("llava", "llava_onevision")


def model_config_from_hf(hf_config: Mapping[str, Any], **kwargs) -> ModelConfig:
  """`config_from_hf` for a text-only directory, `hf_llava.config_from_hf`
  (a ModelConfig with `vision`) for a LLaVA one; same keyword arguments."""
  if hf_config.get("model_type") in LLAVA_MODEL_TYPES:
    from kimi_jax.models import hf_llava  # pylint: disable=g-import-not-at-top
    return hf_llava.config_from_hf(hf_config, **kwargs)
  return config_from_hf(hf_config, **kwargs)


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
  if hf_config.get("model_type") in LLAVA_MODEL_TYPES:
    from kimi_jax.models import hf_llava  # pylint: disable=g-import-not-at-top
    return hf_llava.load_pretrained(path, dtype, param_dtype, scan_layers=scan_layers)
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
                    overwrite: bool = False, processor=None) -> None:
  """Writes a HF directory that `transformers.AutoModelForCausalLM` loads
  (`LlavaForConditionalGeneration` for a `cfg` with `vision`).

  Args:
    cfg, params: the model (params as `init_params` / `load_pretrained` make).
    path: output directory. An existing non-empty directory is an error
      unless `overwrite` (then it is replaced as a whole).
    max_shard_size: bytes (int) or e.g. "500MB"; above it the tensors are
      split into `model-0000i-of-0000n.safetensors` plus an index.
    dtype: storage dtype; default `cfg.param_dtype`.
    processor: image + text models only: the `data.images.ProcessorConfig`
      written as preprocessor_config.json (None writes none).

  Everything is written into a temporary sibling directory that is renamed
  into place at the end, so a crash never leaves a half-written model at
  `path`. Call from one process only (params must be fully addressable).
  """
  if cfg.vision is not None:
    from kimi_jax.models import hf_llava  # pylint: disable=g-import-not-at-top
    return hf_llava.save_pretrained(cfg, params, path, max_shard_size=max_shard_size,
                                    dtype=dtype, overwrite=overwrite, processor=processor)
  if processor is not None:
    raise ValueError("save_pretrained: an image processor was given for a text-only model "
                     "(cfg.vision is None)")
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
