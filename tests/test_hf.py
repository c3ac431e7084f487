"""HF checkpoints: parity with transformers, round trips, conversion, bad input.

Parity runs against checked-in reference files (tests/data/make_hf_reference.py
writes them with torch + transformers); the `live_` tests rebuild models with
transformers and are skipped when it is not installed.
"""
import importlib.util
import json
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from kimi_jax.models import hf, layer_stack, params_io
from kimi_jax.models.transformer import ModelConfig, RopeScaling, Transformer

DATA = pathlib.Path(__file__).parent / "data"
REF = dict(np.load(DATA / "hf_reference.npz"))
LLAMA, QWEN2 = "hf_tiny_llama", "hf_tiny_qwen2"
MODELS = (LLAMA, QWEN2)
ATOL = 1e-4
# ModelConfig.scan_layers off / on: the same checkpoints in both param forms.
SCAN = pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])


@pytest.fixture(scope="module")
def loaded():
  """name -> (cfg, params) of the reference models, params in fp32."""
  return {name: hf.load_pretrained(DATA / name, param_dtype="float32") for name in MODELS}


@pytest.fixture(scope="module")
def loaded_scan():
  """As `loaded`, imported with `scan_layers=True`."""
  return {name: hf.load_pretrained(DATA / name, param_dtype="float32", scan_layers=True)
          for name in MODELS}


def _loaded(loaded, loaded_scan, scan):
  return loaded_scan if scan else loaded


def _logits(cfg, params, tokens):
  return np.asarray(jax.jit(Transformer(cfg).apply)({"params": params}, np.asarray(tokens)))


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _copy(name, tmp_path) -> pathlib.Path:
  return pathlib.Path(shutil.copytree(DATA / name, tmp_path / name))


# --------------------------------------------------------------- reference


def test_reference_configs(loaded):
  llama, _ = loaded[LLAMA]
  assert (llama.family, llama.num_heads, llama.num_kv_heads, llama.head_size) == ("llama", 4, 2, 8)
  assert not llama.tie_embeddings and not llama.qkv_bias
  assert llama.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 64)
  assert (llama.bos_id, llama.eos_id, llama.pad_id) == (1, 2, 0)  # eos [2, 3]: first kept
  assert llama.rms_norm_eps == 1e-5 and llama.max_position_embeddings == 256
  qwen2, params = loaded[QWEN2]
  assert qwen2.family == "qwen2" and qwen2.qkv_bias and qwen2.tie_embeddings
  assert "lm_head" not in params and params["layers_0"]["attn"]["q_bias"].shape == (4, 8)
  assert (qwen2.rope_theta, qwen2.rope_scaling, qwen2.eos_id, qwen2.pad_id) == (1e6, None, 5, 4)


def test_default_param_dtype_is_the_stored_one():
  cfg, params = hf.load_pretrained(DATA / LLAMA)  # stored as bf16
  assert (cfg.param_dtype, cfg.dtype) == ("bfloat16", "bfloat16")
  assert {x.dtype.name for x in jax.tree.leaves(params)} == {"bfloat16"}
  cfg, _ = hf.load_pretrained(DATA / LLAMA, dtype="float32")
  assert (cfg.param_dtype, cfg.dtype) == ("bfloat16", "float32")


def test_scan_import_is_the_stacked_unrolled_import(loaded, loaded_scan):
  for name in MODELS:
    (cfg, params), (cfg_s, params_s) = loaded[name], loaded_scan[name]
    assert cfg_s == cfg.replace(scan_layers=True) and not cfg.scan_layers
    q = params["layers_0"]["attn"]["q"]
    assert params_s["layers"]["attn"]["q"].shape == (cfg.num_layers,) + q.shape
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(params_s))
    _assert_trees_equal(params_s, layer_stack.stack_layers(params, cfg.num_layers))


@SCAN
@pytest.mark.parametrize("name", MODELS)
def test_logits_match_reference(loaded, loaded_scan, name, scan):
  cfg, params = _loaded(loaded, loaded_scan, scan)[name]
  diff = np.abs(_logits(cfg, params, REF[f"{name}_tokens"]) - REF[f"{name}_logits"]).max()
  assert diff <= ATOL, f"{name}: max abs logit diff {diff}"


# Every attention implementation that runs on CPU (splash in Pallas
# interpret mode); "auto" above is "xla" at these lengths.
@pytest.mark.parametrize("attention", ["blockwise", "splash"])
@pytest.mark.parametrize("name", MODELS)
def test_logits_match_reference_with_every_cpu_attention(loaded, name, attention):
  cfg, params = loaded[name]
  got = _logits(cfg.replace(attention=attention), params, REF[f"{name}_tokens"])
  diff = np.abs(got - REF[f"{name}_logits"]).max()
  assert diff <= ATOL, f"{name} / {attention}: max abs logit diff {diff}"


@SCAN
@pytest.mark.parametrize("name", MODELS)
def test_greedy_generation_matches_reference(loaded, loaded_scan, name, scan):
  from kimi_jax.sampling import generate  # the sampler's public entry point
  cfg, params = _loaded(loaded, loaded_scan, scan)[name]
  prompts = [REF[f"{name}_prompts"][i, :n].tolist()
             for i, n in enumerate(REF[f"{name}_prompt_lens"])]
  assert len({len(p) for p in prompts}) == len(prompts)  # different lengths
  out = generate(cfg, params, prompts, 32, temperature=0.0)
  np.testing.assert_array_equal(np.asarray(out), REF[f"{name}_generations"])


# -------------------------------------------------------------- round trips


@SCAN
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("name,param_dtype", [(LLAMA, None), (QWEN2, None), (QWEN2, "bfloat16")],
                         ids=["llama_untied_bf16", "qwen2_tied_fp32", "qwen2_tied_bf16"])
def test_save_load_round_trip_is_bit_exact(tmp_path, name, param_dtype, sharded, scan):
  cfg, params = hf.load_pretrained(DATA / name, param_dtype=param_dtype, scan_layers=scan)
  out = tmp_path / "out"
  hf.save_pretrained(cfg, params, out, max_shard_size=20_000 if sharded else "1GB")
  files = sorted(os.listdir(out))
  if sharded:
    assert hf.INDEX_NAME in files and len([f for f in files if f.endswith(".safetensors")]) > 1
  else:
    assert files == ["config.json", "model.safetensors"]
  cfg2, params2 = hf.load_pretrained(out, scan_layers=scan)
  assert cfg2 == cfg
  _assert_trees_equal(params2, params)
  assert os.listdir(tmp_path) == ["out"]  # no temporary directories left behind
  # The export is the same tensors whichever form it is written from.
  exported = hf.params_to_hf(cfg, params)
  other = layer_stack.to_layer_form(not scan, cfg.num_layers, params)
  from_other = hf.params_to_hf(cfg.replace(scan_layers=not scan), other)
  assert from_other.keys() == exported.keys()
  for key, x in from_other.items():
    np.testing.assert_array_equal(x, exported[key])


def test_save_never_silently_overwrites(tmp_path, loaded):
  cfg, params = loaded[QWEN2]
  out = tmp_path / "model"
  out.mkdir()
  (out / "keep.txt").write_text("another model")
  with pytest.raises(FileExistsError, match="model.*overwrite=True"):
    hf.save_pretrained(cfg, params, out)
  assert os.listdir(out) == ["keep.txt"]
  hf.save_pretrained(cfg, params, out, overwrite=True)
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  assert sorted(os.listdir(tmp_path)) == ["model"]


def test_save_rejects_params_that_do_not_fit_the_config(tmp_path, loaded, loaded_scan):
  cfg, params = loaded[QWEN2]
  bad = jax.tree.map(lambda x: x, params)
  bad["layers_1"]["mlp"]["up"] = np.zeros((32, 65), np.float32)
  with pytest.raises(ValueError, match=r"\['layers_1'\]\['mlp'\]\['up'\].*\(32, 64\).*\(32, 65\)"):
    hf.save_pretrained(cfg, bad, tmp_path / "x")
  cfg_s, bad_s = loaded_scan[QWEN2]
  bad_s = jax.tree.map(lambda x: x, bad_s)
  bad_s["layers"]["mlp"]["up"] = np.zeros((cfg.num_layers, 32, 65), np.float32)
  with pytest.raises(ValueError, match=r"\['layers_0'\]\['mlp'\]\['up'\].*\(32, 65\)"):
    hf.save_pretrained(cfg_s, bad_s, tmp_path / "x")
  del bad["layers_1"]["mlp"]["up"]
  with pytest.raises(ValueError, match=r"missing .*'up'"):
    hf.save_pretrained(cfg, bad, tmp_path / "x")
  assert not (tmp_path / "x").exists()


def test_config_dict_round_trip():
  cfg = ModelConfig(vocab_size=11, hidden_size=8, intermediate_size=16, num_layers=1,
                    num_heads=2, num_kv_heads=1, head_dim=6, eos_id=3,
                    rope_scaling=RopeScaling(4.0, 1.0, 2.0, 32), param_dtype="bfloat16")
  d = json.loads(json.dumps(params_io.config_to_dict(cfg)))
  assert params_io.config_from_dict(d) == cfg
  with pytest.raises(ValueError, match="unknown ModelConfig fields.*'hiden_size'"):
    params_io.config_from_dict({**d, "hiden_size": 8})


def test_convert_hf_to_orbax_to_hf(tmp_path):
  from absl import flags
  from absl.testing import flagsaver
  from launch import convert
  orbax_dir, hf_dir = tmp_path / "orbax", tmp_path / "hf"
  was_parsed = flags.FLAGS.is_parsed()
  flags.FLAGS.mark_as_parsed()
  try:  # through the launcher's main, as `python -m launch.convert` runs it
    with flagsaver.flagsaver(hf_dir=str(DATA / LLAMA), orbax_dir=str(orbax_dir),
                             direction="hf_to_orbax"):
      convert.main(["convert"])
  finally:
    if not was_parsed:
      flags.FLAGS.unparse_flags()
  assert sorted(os.listdir(orbax_dir)) == [params_io.CONFIG_NAME, params_io.PARAMS_NAME]
  convert.convert("orbax_to_hf", str(hf_dir), str(orbax_dir), max_shard_size="50KB")
  assert (hf_dir / hf.INDEX_NAME).exists()
  cfg, params = hf.load_pretrained(DATA / LLAMA)
  cfg2, params2 = hf.load_pretrained(hf_dir)
  assert cfg2 == cfg
  _assert_trees_equal(params2, params)
  with pytest.raises(FileExistsError, match="orbax"):
    convert.convert("hf_to_orbax", str(DATA / LLAMA), str(orbax_dir))


# ---------------------------------------------------------------- configs


def _llama_hf_config(**changes):
  base = {"model_type": "llama", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 24,
          "num_hidden_layers": 1, "num_attention_heads": 2}
  return {**base, **changes}


def test_legacy_transformers4_config_fields():
  cfg = hf.config_from_hf(_llama_hf_config(
      rope_theta=5e5, torch_dtype="bfloat16", eos_token_id=[7, 8], num_key_value_heads=1,
      head_dim=8, rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192}))
  assert cfg.rope_theta == 5e5 and cfg.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
  assert cfg.eos_id == 7 and cfg.num_kv_heads == 1
  assert cfg.head_dim is None and cfg.head_size == 8  # 8 == 16 // 2 is the default
  assert hf.config_from_hf(_llama_hf_config(head_dim=4)).head_size == 4


@pytest.mark.parametrize("changes,message", [
    ({"model_type": "mistral"}, r"unsupported model_type 'mistral'; supported: llama, qwen2"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
     r"unsupported rope type 'yarn'; supported: default, llama3"),
    ({"model_type": "qwen2", "use_sliding_window": True}, r"use_sliding_window"),
    ({"hidden_act": "gelu"}, r"hidden_act 'gelu'"),
    ({"attention_bias": True}, r"Llama with attention_bias"),
    ({"num_attention_heads": 3}, r"num_heads \(3\)"),
], ids=["model_type", "rope_type", "sliding_window", "act", "llama_bias", "invalid"])
def test_unsupported_configs_are_rejected(changes, message):
  with pytest.raises(hf.HFCheckpointError, match="config.json: .*" + message):
    hf.config_from_hf(_llama_hf_config(**changes))


# -------------------------------------------------------------- bad input


def test_missing_directory_and_files(tmp_path):
  with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'} does not exist"):
    hf.load_pretrained(tmp_path / "nope")
  model = _copy(QWEN2, tmp_path)
  os.remove(model / "model.safetensors")
  with pytest.raises(FileNotFoundError, match=f"no model.safetensors .* in {model}"):
    hf.load_pretrained(model)
  os.remove(model / "config.json")
  with pytest.raises(FileNotFoundError, match=f"{model / 'config.json'} does not exist"):
    hf.load_pretrained(model)
  shard = _copy(LLAMA, tmp_path) / "model-00002-of-00002.safetensors"
  os.remove(shard)
  with pytest.raises(FileNotFoundError, match=f"{shard} .*does not exist"):
    hf.load_pretrained(shard.parent)


@pytest.mark.parametrize("cut", [0.5, 0.999, 0.0001], ids=["data", "last_bytes", "header"])
def test_truncated_safetensors_names_the_file(tmp_path, cut):
  file = _copy(LLAMA, tmp_path) / "model-00001-of-00002.safetensors"
  data = file.read_bytes()
  file.write_bytes(data[:max(1, int(len(data) * cut))])
  with pytest.raises(hf.HFCheckpointError, match=f"{file}: not a readable safetensors file"):
    hf.load_pretrained(file.parent)


def test_unknown_model_type_names_it(tmp_path):
  model = _copy(QWEN2, tmp_path)
  config = json.loads((model / "config.json").read_text())
  (model / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
  with pytest.raises(hf.HFCheckpointError,
                     match=r"config.json: unsupported model_type 'gpt2'; supported: llama, qwen2"):
    hf.load_pretrained(model)


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
  model = _copy(QWEN2, tmp_path)
  config = json.loads((model / "config.json").read_text())
  (model / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
  with pytest.raises(hf.HFCheckpointError, match=(
      r"tensor 'model.layers.0.mlp.gate_proj.weight' .*expected shape \(48, 32\) "
      r"from config.json, found \(64, 32\)")):
    hf.load_pretrained(model)


def _edit_tensors(model: pathlib.Path, edit):
  file = model / "model.safetensors"
  tensors = load_file(file)
  edit(tensors)
  save_file(tensors, file, metadata={"format": "pt"})


def test_missing_and_unexpected_tensors_are_named(tmp_path):
  model = _copy(QWEN2, tmp_path)
  _edit_tensors(model, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
  with pytest.raises(hf.HFCheckpointError,
                     match=r"missing tensors in .*: model.layers.1.self_attn.k_proj.bias$"):
    hf.load_pretrained(model)

  model = _copy(QWEN2, tmp_path / "b")
  _edit_tensors(model, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": np.zeros(3)}))
  with pytest.raises(hf.HFCheckpointError,
                     match=r"unexpected tensors in .*: model.layers.2.mlp.up_proj.weight"):
    hf.load_pretrained(model)


def test_tied_model_with_a_separate_lm_head(tmp_path):
  model = _copy(QWEN2, tmp_path)
  _edit_tensors(model, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"]}))
  hf.load_pretrained(model)  # an exact copy of the embedding is accepted
  _edit_tensors(model, lambda t: t.update({"lm_head.weight": t["lm_head.weight"] + 1}))
  with pytest.raises(hf.HFCheckpointError, match="lm_head.weight differs"):
    hf.load_pretrained(model)


# ------------------------------------------------- live (needs transformers)


def _reference_script():
  spec = importlib.util.spec_from_file_location("make_hf_reference",
                                                DATA / "make_hf_reference.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _hf_logits(model, tokens):
  import torch
  with torch.no_grad():
    return model(torch.from_numpy(np.asarray(tokens)).long()).logits.float().numpy()


@SCAN
@pytest.mark.parametrize("name", MODELS)
def test_live_fresh_hf_model_parity(tmp_path, name, scan):
  pytest.importorskip("transformers")
  model = _reference_script().build(name, seed=1234)
  model.save_pretrained(tmp_path / name)
  cfg, params = hf.load_pretrained(tmp_path / name, scan_layers=scan)
  assert cfg.param_dtype == "float32"
  tokens = np.random.default_rng(5).integers(0, cfg.vocab_size, (2, 16))
  expected = _hf_logits(model, tokens)
  diff = np.abs(_logits(cfg, params, tokens) - expected).max()
  assert diff <= ATOL, f"{name}: max abs logit diff {diff}"


@SCAN
@pytest.mark.parametrize("name,shard_size", [(LLAMA, 50_000), (QWEN2, "5GB")],
                         ids=["llama_sharded", "qwen2_single"])
def test_live_saved_model_loads_in_transformers(tmp_path, loaded, loaded_scan, name, shard_size,
                                               scan):
  transformers = pytest.importorskip("transformers")
  cfg, params = _loaded(loaded, loaded_scan, scan)[name]
  hf.save_pretrained(cfg, params, tmp_path / name, max_shard_size=shard_size)
  assert (tmp_path / name / hf.INDEX_NAME).exists() == (shard_size == 50_000)
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / name).eval()
  assert type(model).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[
      cfg.family]
  assert model.config.tie_word_embeddings == cfg.tie_embeddings
  tokens = REF[f"{name}_tokens"]
  diff = np.abs(_hf_logits(model, tokens) - REF[f"{name}_logits"]).max()
  assert diff <= ATOL, f"{name}: max abs logit diff {diff}"
