"""HF LLaVA directories: parity with transformers, round trips, bad input.

Reference files come from tests/data/make_llava_reference.py (torch +
transformers); the `live_` tests rebuild models with transformers and are
skipped when it is not installed.

Image + text logits come from `Transformer(cfg).apply(..., pixel_values=...)`,
the multimodal model itself.
Tolerance: 1e-4 on logits as tests/test_hf.py (fp32 both sides, O(10)
logits); 1e-4 on features (O(10), observed 3e-6).
"""
import functools
import importlib.util
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from kimi_jax.data import images
from kimi_jax.models import hf, hf_llava
from kimi_jax.models import vision as V
from kimi_jax.models.transformer import Transformer

DATA = pathlib.Path(__file__).parent / "data"
REF = dict(np.load(DATA / "llava_reference.npz"))
LLAMA, QWEN2 = "llava_tiny_llama", "llava_tiny_qwen2"
MODELS = (LLAMA, QWEN2)
ATOL = 1e-4


@pytest.fixture(scope="module")
def loaded():
  return {n: hf_llava.load_pretrained(DATA / n, param_dtype="float32") for n in MODELS}


def _lm(params):
  return {k: v for k, v in params.items() if k != "vision"}


def _features(cfg, params, pixels_NYXC):
  return np.asarray(jax.jit(functools.partial(
      Transformer(cfg).apply, method=Transformer.encode_images))({"params": params},
                                                                 pixels_NYXC))


@functools.lru_cache(maxsize=None)
def _mm_apply(cfg):
  return jax.jit(lambda p, tokens, pixels, prompt: Transformer(cfg).apply(
      {"params": p}, tokens, pixel_values=pixels, image_prompt_BT=prompt))


def _logits_with_images(cfg, params, tokens_BT, pixels_NYXC, prompt_len=None):
  """Logits `[B, T, V]` of the multimodal model; only the first `prompt_len`
  positions hold placeholders (a generated token may be the image id: HF
  embeds it as an ordinary token)."""
  tokens_BT = np.asarray(tokens_BT)
  prompt = np.ones(tokens_BT.shape, bool)
  if prompt_len is not None:
    prompt[:, prompt_len:] = False
  return np.asarray(_mm_apply(cfg)(params, tokens_BT, pixels_NYXC, prompt))


def _pixels(name, which):
  return REF[f"{name}_pixel_values"][which].transpose(0, 2, 3, 1)


# --------------------------------------------------------------- reference


def test_reference_configs(loaded):
  llama, params = loaded[LLAMA]
  assert (llama.language_model.family, llama.language_model.tie_embeddings, llama.image_token_id) == ("llama", False,
                                                                                  127)
  v = llama.vision
  assert (v.feature_layer, v.feature_select, v.tokens_per_image, v.num_patches) == (
      -2, "default", 15, 16)
  assert (v.hidden_act, v.projector_act, v.layer_norm_eps) == ("gelu_pytorch_tanh", "gelu", 1e-6)
  qwen2, params = loaded[QWEN2]
  assert qwen2.language_model.family == "qwen2" and qwen2.language_model.tie_embeddings and "lm_head" not in params
  assert (qwen2.vision.feature_select, qwen2.vision.tokens_per_image) == ("full", 16)
  assert params["vision"]["tower"]["layers_1"]["attn"]["q"]["kernel"].shape == (32, 4, 8)
  cfg, params = hf_llava.load_pretrained(DATA / LLAMA)  # stored as bf16
  assert (cfg.vision.param_dtype, cfg.vision.dtype) == ("bfloat16", "bfloat16")
  assert {x.dtype.name for x in jax.tree.leaves(params)} == {"bfloat16"}


@pytest.mark.parametrize("name", MODELS)
def test_image_features_match_reference(loaded, name):
  cfg, params = loaded[name]
  got = _features(cfg, params, _pixels(name, slice(0, 3)))
  diff = np.abs(got - REF[f"{name}_image_features"]).max()
  assert diff <= ATOL, f"{name}: max abs feature diff {diff}"


@pytest.mark.parametrize("name", MODELS)
def test_our_preprocessing_gives_the_same_features(loaded, name):
  cfg, params = loaded[name]
  proc = images.load_processor(DATA / name)
  files = [str(DATA / "llava_images" / f) for f in REF["image_files"][:3]]
  pixels = images.preprocess_batch(files, proc)
  np.testing.assert_array_equal(pixels, _pixels(name, slice(0, 3)))


@pytest.mark.parametrize("name", MODELS)
def test_text_logits_match_reference(loaded, name):
  cfg, params = loaded[name]
  got = np.asarray(Transformer(cfg.language_model).apply({"params": _lm(params)},
                                               REF[f"{name}_text_tokens"]))
  diff = np.abs(got - REF[f"{name}_text_logits"]).max()
  assert diff <= ATOL, f"{name}: max abs logit diff {diff}"


@pytest.mark.parametrize("name", MODELS)
def test_image_text_logits_match_reference(loaded, name):
  cfg, params = loaded[name]
  tokens = REF[f"{name}_tokens"]
  feats = _features(cfg, params, _pixels(name, slice(0, 3)))
  V.check_image_placeholders(tokens, 3, cfg.vision.tokens_per_image, cfg.image_token_id)
  # The merge puts exactly the features the logits path uses where HF does.
  lm = _lm(params)
  embeds = jnp.take(lm["embed"], tokens, axis=0)
  merged = np.asarray(V.merge_image_features(embeds, tokens, feats, cfg.image_token_id))
  is_image = tokens == cfg.image_token_id
  np.testing.assert_array_equal(merged[is_image], feats.reshape(-1, feats.shape[-1]))
  np.testing.assert_array_equal(merged[~is_image], np.asarray(embeds)[~is_image])
  diff = np.abs(_logits_with_images(cfg, params, tokens, _pixels(name, slice(0, 3)))
                - REF[f"{name}_logits"]).max()
  assert diff <= ATOL, f"{name}: max abs logit diff {diff}"


@pytest.mark.parametrize("name", MODELS)
def test_greedy_generation_with_images_matches_reference(loaded, name):
  cfg, params = loaded[name]
  assert REF[f"{name}_min_margin"] > 10 * ATOL
  for i, n in enumerate(REF[f"{name}_prompt_lens"]):
    which = REF[f"{name}_prompt_images"][i]
    pixels = _pixels(name, which[which >= 0])
    new = REF[f"{name}_generations"].shape[1]
    seq = np.zeros((1, n + new), np.int32)  # fixed shape: one compile; causal, so the
    seq[0, :n] = REF[f"{name}_prompts"][i, :n]  # zeros after the cursor change nothing
    for t in range(n, n + new):  # a full forward per token: the model is tiny
      logits = _logits_with_images(cfg, params, seq, pixels, prompt_len=n)
      seq[0, t] = int(np.argmax(logits[0, t - 1]))
    assert seq[0, n:].tolist() == REF[f"{name}_generations"][i].tolist(), f"{name} prompt {i}"


# ------------------------------------------------------------- round trips


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _tensors(path):
  out = {}
  for f in sorted(pathlib.Path(path).glob("*.safetensors")):
    out.update(load_file(f))
  return out


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("name", MODELS)
def test_save_load_round_trip_is_bit_exact(tmp_path, name, sharded, scan):
  cfg, params = hf_llava.load_pretrained(DATA / name, scan_layers=scan)
  assert cfg.language_model.scan_layers == scan and ("layers" in params) == scan  # the LM's blocks
  assert "layers_0" in params["vision"]["tower"]  # the tower stays unrolled
  proc = images.load_processor(DATA / name)
  hf_llava.save_pretrained(cfg, params, tmp_path / "out", processor=proc,
                           max_shard_size=40_000 if sharded else "5GB")
  assert (tmp_path / "out" / hf.INDEX_NAME).exists() == sharded
  cfg2, params2 = hf_llava.load_pretrained(tmp_path / "out", scan_layers=scan)
  assert cfg2 == cfg and images.load_processor(tmp_path / "out") == proc
  _assert_trees_equal(params, params2)
  # HF -> ours -> HF: the same tensors; the reference (written by
  # transformers 5: "vision_tower.*") and ours (the Hub's "vision_tower.vision_model.*")
  # name them in two layouts.
  want = {hf_llava._hub_name(k): x for k, x in _tensors(DATA / name).items()}  # pylint: disable=protected-access
  got = _tensors(tmp_path / "out")
  assert want.keys() == got.keys()
  for key in want:
    np.testing.assert_array_equal(got[key], want[key])


@pytest.mark.parametrize("layout", [
    {},  # the Hub's: language_model.model.*, vision_tower.vision_model.*
    {"vision_tower.vision_model.": "vision_tower."},  # transformers 5 save
    {"vision_tower.vision_model.": "model.vision_tower.", "language_model.model.":
     "model.language_model.", "multi_modal_projector.": "model.multi_modal_projector.",
     "language_model.lm_head.": "lm_head."},  # transformers >= 4.52 state_dict
    {"vision_tower.": "model.vision_tower.", "language_model.model.": "model.language_model."},
], ids=["hub", "v5", "state_dict", "state_dict_vision_model"])
def test_every_transformers_name_layout_loads(tmp_path, loaded, layout):
  cfg, params = loaded[QWEN2]
  model = pathlib.Path(shutil.copytree(DATA / QWEN2, tmp_path / "m"))
  out = {}
  for key, x in load_file(model / "model.safetensors").items():
    key = hf_llava._hub_name(key)  # pylint: disable=protected-access
    for old, new in layout.items():
      if key.startswith(old):
        key = new + key[len(old):]
        break
    out[key] = x
  head = next(iter(layout.values()), "vision_tower.vision_model.")
  out[f"{head}head.probe"] = np.zeros((1, 1, 32), np.float32)  # SigLIP pooling head: dropped
  save_file(out, model / "model.safetensors", metadata={"format": "pt"})
  _assert_trees_equal(hf_llava.load_pretrained(model, param_dtype="float32")[1], params)


def test_llava_onevision_directories_load_as_llava(tmp_path, loaded):
  cfg, params = loaded[QWEN2]
  model = _edit_config(tmp_path, lambda c: c.update(
      model_type="llava_onevision", architectures=["LlavaOnevisionForConditionalGeneration"],
      image_grid_pinpoints=[[32, 32]], vision_aspect_ratio="anyres_max_9"))
  tensors = load_file(model / "model.safetensors")
  tensors["image_newline"] = np.zeros((32,), np.float32)
  save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
  cfg2, params2 = hf_llava.load_pretrained(model, param_dtype="float32")
  assert cfg2 == cfg
  _assert_trees_equal(params2, params)


# --------------------------------------------------------------- bad input


def _edit_config(tmp_path, edit, name=QWEN2):
  model = pathlib.Path(shutil.copytree(DATA / name, tmp_path / name))
  config = json.loads((model / "config.json").read_text())
  edit(config)
  (model / "config.json").write_text(json.dumps(config))
  return model


@pytest.mark.parametrize("edit,message", [
    (lambda c: c["vision_config"].update(model_type="clip_vision_model"),
     "vision_config.model_type 'clip_vision_model' is not supported"),
    (lambda c: c.update(vision_feature_layer=[-2, -1]), "only a single int layer"),
    (lambda c: c.update(projector_hidden_act="relu"), "projector_hidden_act 'relu'"),
    (lambda c: c.update(vision_feature_select_strategy="cls"), "feature_select must be one of"),
    (lambda c: c.update(image_seq_length=576), "image_seq_length 576 != 16"),
    (lambda c: c.update(image_token_index=500), "image_token_id 500 is not a token id"),
    (lambda c: c["vision_config"].update(image_size=[32, 48]), "only square images"),
    (lambda c: c.pop("text_config"), "missing or invalid 'text_config'"),
    (lambda c: c["text_config"].update(hidden_act="gelu"), "text_config: hidden_act 'gelu'"),
    (lambda c: c.update(model_type="qwen2"), "model_type 'qwen2' is not one of"),
])
def test_unsupported_configs_are_rejected(tmp_path, edit, message):
  with pytest.raises(hf.HFCheckpointError, match=message):
    hf_llava.load_pretrained(_edit_config(tmp_path, edit))


def test_missing_unexpected_and_misshapen_tensors_are_named(tmp_path):
  for case in ("missing", "unexpected", "shape", "duplicate"):
    model = pathlib.Path(shutil.copytree(DATA / QWEN2, tmp_path / case))
    tensors = load_file(model / "model.safetensors")
    key = "vision_tower.encoder.layers.1.mlp.fc1.weight"  # transformers 5's layout
    if case == "missing":
      del tensors[key]
    elif case == "unexpected":
      tensors["vision_tower.encoder.layers.2.mlp.fc1.weight"] = tensors[key]
    elif case == "shape":
      tensors[key] = tensors[key][:-1]
    else:
      tensors["vision_tower.vision_model." + key[len("vision_tower."):]] = tensors[key]
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    message = {"missing": r"missing tensors in .*vision_model\.encoder\.layers\.1\.mlp\.fc1",
               "unexpected": r"unexpected tensors .*encoder\.layers\.2\.mlp\.fc1\.weight",
               "shape": rf"{key}.*expected shape \(48, 32\).*found \(47, 32\)",
               "duplicate": "the same tensor in two name layouts"}[case]
    with pytest.raises(hf.HFCheckpointError, match=message):
      hf_llava.load_pretrained(model)


def test_lm_tensor_errors_come_from_hf_py(tmp_path):
  model = pathlib.Path(shutil.copytree(DATA / QWEN2, tmp_path / "m"))
  tensors = load_file(model / "model.safetensors")
  del tensors["language_model.model.layers.0.mlp.up_proj.weight"]
  save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(hf.HFCheckpointError, match=r"\(language model\).*layers\.0\.mlp\.up_proj"):
    hf_llava.load_pretrained(model)


def test_save_rejects_what_llava_cannot_express(tmp_path, loaded):
  cfg, params = loaded[QWEN2]
  normed = cfg.replace(vision=cfg.vision.replace(post_norm_features=True))
  with pytest.raises(ValueError, match="post_norm_features=True has no LLaVA equivalent"):
    hf_llava.save_pretrained(normed, params, tmp_path / "a")
  bad = dict(params, vision={**params["vision"], "projector": {}})
  with pytest.raises(ValueError, match=r"params\['vision'\] do not match the config"):
    hf_llava.save_pretrained(cfg, bad, tmp_path / "b")
  with pytest.raises(ValueError, match="no 'vision' subtree"):
    hf_llava.save_pretrained(cfg, _lm(params), tmp_path / "c")
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ------------------------------------------------- live (needs transformers)


def _reference_script():
  spec = importlib.util.spec_from_file_location("make_llava_reference",
                                                DATA / "make_llava_reference.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("name", MODELS)
def test_live_fresh_hf_model_parity(tmp_path, name):
  pytest.importorskip("transformers")
  import torch  # pylint: disable=g-import-not-at-top
  model, _ = _reference_script().build(name, seed=1234)
  model.save_pretrained(tmp_path / name)
  cfg, params = hf_llava.load_pretrained(tmp_path / name)
  pixels = np.random.default_rng(5).normal(size=(2, 3, 32, 32)).astype(np.float32)
  P = cfg.vision.tokens_per_image
  tokens = np.asarray([[3] + [cfg.image_token_id] * P + [4, 5] + [cfg.image_token_id] * P + [6]])
  with torch.no_grad():
    want = model(torch.from_numpy(tokens).long(),
                 pixel_values=torch.from_numpy(pixels)).logits.numpy()
  diff = np.abs(_logits_with_images(cfg, params, tokens, pixels.transpose(0, 2, 3, 1))
                - want).max()
  assert diff <= ATOL, f"{name}: max abs logit diff {diff}"


@pytest.mark.parametrize("name,shard_size", [(LLAMA, 40_000), (QWEN2, "5GB")])
def test_live_saved_model_loads_in_transformers(tmp_path, loaded, name, shard_size):
  transformers = pytest.importorskip("transformers")
  import torch  # pylint: disable=g-import-not-at-top
  cfg, params = loaded[name]
  hf_llava.save_pretrained(cfg, params, tmp_path / name, max_shard_size=shard_size,
                           processor=images.load_processor(DATA / name))
  model = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / name).eval()
  pixels = torch.from_numpy(REF[f"{name}_pixel_values"][:3])
  with torch.no_grad():
    got = model(torch.from_numpy(REF[f"{name}_tokens"]).long(), pixel_values=pixels).logits
  diff = np.abs(got.numpy() - REF[f"{name}_logits"]).max()
  assert diff <= ATOL, f"{name}: max abs logit diff {diff}"
  proc = transformers.AutoImageProcessor.from_pretrained(tmp_path / name)
  files = [DATA / "llava_images" / f for f in REF["image_files"]]
  hf_pixels = np.stack([_reference_script().process(proc, str(f)) for f in files])
  np.testing.assert_array_equal(hf_pixels.transpose(0, 2, 3, 1),
                                images.preprocess_batch([str(f) for f in files],
                                                        images.load_processor(tmp_path / name)))


def test_hf_entry_points_dispatch_to_llava(tmp_path, loaded):
  """`hf.load_pretrained` / `save_pretrained` / `model_config_from_hf` take
  LLaVA directories too (what the trainer, init_from and convert call)."""
  cfg, params = hf.load_pretrained(DATA / QWEN2, param_dtype="float32")
  assert cfg == loaded[QWEN2][0] and cfg.vision is not None
  hf.save_pretrained(cfg, params, tmp_path / "out")
  again, _ = hf_llava.load_pretrained(tmp_path / "out", param_dtype="float32")
  assert again == cfg
  hf_config = json.loads((DATA / QWEN2 / "config.json").read_text())
  assert hf.model_config_from_hf(hf_config, param_dtype="float32") == cfg
