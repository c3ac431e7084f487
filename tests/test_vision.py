"""Image encoder (models/vision.py): shapes, dtypes, the conv it replaces,
feature-layer rules, sharding, and the placeholder merge.

HF parity of the tower and projector is in test_hf_llava.py. Tolerances:
float32 vs float32 with another summation order 1e-5 (outputs are O(1));
bf16 compute vs float32 0.1 (bf16 has 8 mantissa bits, errors add over two
blocks and the projector).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from kimi_jax import parallel
from kimi_jax.models import vision as V

CFG = V.VisionConfig(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64,
                     num_layers=3, num_heads=4)
D = 24  # the language model's width


def _pixels(n, cfg=CFG, seed=0):
  return np.random.default_rng(seed).normal(size=(n, cfg.image_size, cfg.image_size, 3)
                                            ).astype(np.float32)


@pytest.fixture(scope="module")
def params():
  return V.init_params(CFG, D, jax.random.PRNGKey(0))


def _apply(cfg, params, pixels):
  return jax.jit(V.VisionEncoder(cfg, D).apply)({"params": params}, pixels)


def test_shapes_and_dtypes(params):
  out = _apply(CFG, params, _pixels(3))
  assert out.shape == (3, CFG.tokens_per_image, D) == (3, 16, D) and out.dtype == jnp.float32
  assert params["tower"]["pos_embed"].shape == (16, 32)
  assert set(params["tower"]) == {"patch_embed", "pos_embed", "post_norm", "layers_0",
                                  "layers_1", "layers_2"}
  bf16 = CFG.replace(dtype="bfloat16")
  out16 = _apply(bf16, params, _pixels(3))
  assert out16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out16, np.float32), out, atol=0.1)
  p16 = V.init_params(CFG.replace(param_dtype="bfloat16"), D, jax.random.PRNGKey(0))
  assert {x.dtype for x in jax.tree.leaves(p16)} == {jnp.dtype(jnp.bfloat16)}


def test_wrong_image_shape_is_named(params):
  with pytest.raises(ValueError, match=r"pixel_values must be \[num_images, 16, 16, 3\].*"
                     r"\(2, 3, 16, 16\)"):
    V.VisionEncoder(CFG, D).apply({"params": params}, np.zeros((2, 3, 16, 16), np.float32))


def test_patch_embedding_is_the_stride_p_convolution(params):
  pixels = _pixels(2)
  cfg1 = CFG.replace(feature_layer=0)  # the features are the patch + position embeddings
  got = V.VisionTower(cfg1).apply({"params": params["tower"]}, pixels)
  k = params["tower"]["patch_embed"]["kernel"]  # [s, s, C, W]: HWIO
  conv = jax.lax.conv_general_dilated(pixels, k, (4, 4), "VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  want = (conv.reshape(2, 16, 32) + params["tower"]["patch_embed"]["bias"][None, None]
          + params["tower"]["pos_embed"][None])
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_blocks_after_the_feature_layer_and_post_norm_are_unused(params):
  cfg = CFG.replace(feature_layer=-2)  # after block 2 of 3
  assert cfg.feature_blocks == 2
  pixels = _pixels(2)
  base = _apply(cfg, params, pixels)
  changed = jax.tree.map(lambda x: x, params)
  changed["tower"]["layers_2"] = jax.tree.map(lambda x: x + 1.0, params["tower"]["layers_2"])
  changed["tower"]["post_norm"] = jax.tree.map(lambda x: x + 1.0, params["tower"]["post_norm"])
  np.testing.assert_array_equal(_apply(cfg, changed, pixels), base)
  changed["tower"]["layers_1"] = jax.tree.map(lambda x: x + 1.0, params["tower"]["layers_1"])
  assert np.abs(_apply(cfg, changed, pixels) - base).max() > 1e-3
  # post_norm_features: the last block's output goes through the post-LayerNorm.
  normed = V.VisionConfig(**{**CFG.__dict__, "post_norm_features": True})
  tower = V.VisionTower(normed).apply({"params": params["tower"]}, pixels)
  raw = V.VisionTower(CFG).apply({"params": params["tower"]}, pixels)
  pn = params["tower"]["post_norm"]
  np.testing.assert_allclose(tower, V.layer_normalize(raw, pn["scale"], pn["bias"], 1e-6),
                             atol=1e-5)


def test_default_feature_select_drops_the_first_patch(params):
  cfg = CFG.replace(feature_select="default")
  assert cfg.tokens_per_image == 15
  full = V.VisionTower(CFG).apply({"params": params["tower"]}, _pixels(2))
  dropped = V.VisionTower(cfg).apply({"params": params["tower"]}, _pixels(2))
  np.testing.assert_array_equal(dropped, full[:, 1:])


@pytest.mark.parametrize("changes,message", [
    (dict(image_size=30), "multiple of patch_size"),
    (dict(hidden_size=30), "multiple of num_heads"),
    (dict(feature_layer=4), r"feature_layer must be in \[-4, 3\]"),
    (dict(feature_layer=-2, post_norm_features=True), "post_norm_features needs the last"),
    (dict(hidden_act="relu"), "hidden_act must be one of"),
    (dict(feature_select="cls"), "feature_select must be one of"),
    (dict(dtype="float8"), "unknown dtype"),
])
def test_bad_config_is_named(changes, message):
  with pytest.raises(ValueError, match=message):
    CFG.replace(**changes)


def test_gradients_reach_the_tower(params):
  def loss(p):
    return jnp.sum(V.VisionEncoder(CFG, D).apply({"params": p}, _pixels(2)) ** 2)
  grads = jax.jit(jax.grad(loss))(params)
  norms = {jax.tree_util.keystr(k): float(jnp.abs(g).max())
           for k, g in jax.tree_util.tree_leaves_with_path(grads)}
  unused = [k for k in norms if "post_norm" in k]
  assert all(norms[k] == 0 for k in unused)
  assert all(v > 0 for k, v in norms.items() if k not in unused), norms


def test_every_parameter_axis_has_a_rule():
  names = {n for rules in parallel.RULES.values() for n, _ in rules}
  for spec in jax.tree.leaves(V.param_logical_axes(CFG, D),
                              is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)):
    assert all(a is None or a in names for a in spec), spec


@pytest.mark.parametrize("kind", ["train", "sample"])
def test_sharded_encoder_equals_unsharded(params, kind):
  mesh = parallel.make_mesh(parallel.MeshConfig(2, 2, 2))
  rules = parallel.RULES[kind]
  shapes = jax.eval_shape(lambda: V.init_params(CFG, D, jax.random.PRNGKey(0)))
  shardings = jax.tree.map(
      lambda spec, x: NamedSharding(mesh, parallel.fit_spec(
          nn.logical_to_mesh_axes(tuple(spec), rules), x.shape, mesh)),
      V.param_logical_axes(CFG, D), shapes,
      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  sharded = jax.device_put(params, shardings)
  assert sharded["tower"]["layers_0"]["fc1"]["kernel"].sharding.spec[1] == "tensor"
  pixels = _pixels(4)

  def run(p, x):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
      return V.VisionEncoder(CFG, D).apply({"params": p}, x)
  x = jax.device_put(pixels, NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"))))
  np.testing.assert_allclose(jax.jit(run)(sharded, x), _apply(CFG, params, pixels), atol=1e-5)


# ------------------------------------------------------------------- merge


def _merge_reference(x, tokens, feats, image_id, per_row=None):
  """Loop form of the rule: the k-th placeholder (of the batch, or of a row
  with `per_row` slots) takes the k-th feature vector."""
  out = np.array(x)
  flat = feats.reshape(-1, feats.shape[-1])
  k = 0
  for b in range(tokens.shape[0]):
    if per_row is not None:
      k = b * per_row * feats.shape[1]
    for t in range(tokens.shape[1]):
      if tokens[b, t] == image_id:
        out[b, t] = flat[k]
        k += 1
  return out


def _batch(rows, T=10, D_=4, seed=0):
  """Embeddings and tokens; rows = number of images per row, 2 patches each."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(len(rows), T, D_)).astype(np.float32)
  tokens = rng.integers(0, 9, (len(rows), T)).astype(np.int32)
  for b, n in enumerate(rows):
    pos = np.sort(rng.choice(T, 2 * n, replace=False))
    tokens[b, pos] = 9
  return x, tokens


def test_merge_consumes_features_in_placeholder_order():
  x, tokens = _batch([1, 0, 2])
  feats = np.random.default_rng(1).normal(size=(3, 2, 4)).astype(np.float32)
  got = V.merge_image_features(x, tokens, feats, 9)
  np.testing.assert_array_equal(got, _merge_reference(x, tokens, feats, 9))
  assert got.dtype == x.dtype
  V.check_image_placeholders(tokens, 3, 2, 9)
  with pytest.raises(ValueError, match=r"6 image placeholder tokens \(id 9\) but 2 images x 2 "
                     r"patches = 4"):
    V.check_image_placeholders(tokens, 2, 2, 9)


def test_merge_with_image_slots_reads_only_each_rows_images():
  x, tokens = _batch([1, 0, 2])
  feats = np.random.default_rng(1).normal(size=(6, 2, 4)).astype(np.float32)  # 3 rows x 2 slots
  got = jax.jit(V.merge_image_features, static_argnums=(3, 4))(x, tokens, feats, 9, 2)
  np.testing.assert_array_equal(got, _merge_reference(x, tokens, feats, 9, per_row=2))
  V.check_image_placeholders(tokens, 6, 2, 9, images_per_row=2, images_in_row=[1, 0, 2])
  with pytest.raises(ValueError, match=r"row 2: 4 image placeholder tokens \(id 9\), expected "
                     r"1 images x 2 patches = 2"):
    V.check_image_placeholders(tokens, 6, 2, 9, images_per_row=2, images_in_row=[1, 0, 1])
  with pytest.raises(ValueError, match=r"row 2: 4 .* at most 1 images"):
    V.check_image_placeholders(tokens, 3, 2, 9, images_per_row=1)


def test_merge_keeps_extra_placeholders_and_checks_static_shapes():
  x, tokens = _batch([2])
  feats = np.ones((1, 2, 4), np.float32)  # one image for two images' placeholders
  got = np.asarray(V.merge_image_features(x, tokens, feats, 9))
  pos = np.flatnonzero(tokens[0] == 9)
  np.testing.assert_array_equal(got[0, pos[:2]], 1.0)
  np.testing.assert_array_equal(got[0, pos[2:]], x[0, pos[2:]])
  with pytest.raises(ValueError, match="do not fit in 1 x 10 tokens"):
    V.merge_image_features(x, tokens, np.ones((6, 2, 4), np.float32), 9)
  with pytest.raises(ValueError, match="image features have width 5"):
    V.merge_image_features(x, tokens, np.ones((1, 2, 5), np.float32), 9)
  with pytest.raises(ValueError, match=r"3 images for 1 rows x 2 image slots"):
    V.merge_image_features(x, tokens, np.ones((3, 2, 4), np.float32), 9, 2)
  # More slots than a row has tokens is legal (a prefill chunk; unused slots).
  more = np.asarray(V.merge_image_features(x, tokens, np.ones((6, 2, 4), np.float32), 9, 6))
  np.testing.assert_array_equal(more[0, pos], 1.0)


def test_sampled_image_ids_outside_the_prompt_stay_tokens():
  x, tokens = _batch([1, 1])
  x = np.concatenate([x, np.ones((2, 1, 4), np.float32)], 1)
  tokens = np.concatenate([tokens, np.full((2, 1), 9, np.int32)], 1)  # "sampled" after the prompt
  prompt = np.ones_like(tokens, bool)
  prompt[:, -1] = False
  feats = np.random.default_rng(1).normal(size=(4, 2, 4)).astype(np.float32)
  got = np.asarray(V.merge_image_features(x, tokens, feats, 9, 2, prompt_BT=prompt))
  ref_tokens = np.where(prompt, tokens, 0)
  np.testing.assert_array_equal(got, _merge_reference(x, ref_tokens, feats, 9, per_row=2))
  V.check_image_placeholders(tokens, 4, 2, 9, images_per_row=2, images_in_row=[1, 1],
                             prompt_BT=prompt)
