"""The image + text Transformer: placeholders take image features, text is unchanged."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax.models import params_io
from kimi_jax.models import vision as V
from kimi_jax.models.transformer import Transformer, init_params
from multimodal_models import IMAGE_ID, pixels, prompt, tiny_config, tiny_model


def _apply(cfg, params, tokens, **kw):
  return np.asarray(Transformer(cfg).apply({"params": params}, jnp.asarray(tokens), **kw))


def test_text_only_call_is_the_language_model():
  cfg, params = tiny_model()
  assert set(params["vision"]) == {"tower", "projector"}
  lm = {k: v for k, v in params.items() if k != "vision"}
  tokens = np.array([[3, 4, IMAGE_ID, 5]])  # no images given: the id is a plain token
  np.testing.assert_array_equal(_apply(cfg, params, tokens),
                                _apply(cfg.language_model, lm, tokens))


def test_num_params_counts_the_image_encoder():
  cfg, params = tiny_model()
  assert cfg.num_params() == sum(x.size for x in jax.tree.leaves(params))
  assert cfg.language_model.num_params() < cfg.num_params()


def test_images_change_only_what_follows_their_placeholders():
  cfg, params = tiny_model()
  tokens = np.array([[3] + prompt([4, 5], 1)])
  a = _apply(cfg, params, tokens, pixel_values=pixels(1, seed=0))
  b = _apply(cfg, params, tokens, pixel_values=pixels(1, seed=1))
  np.testing.assert_array_equal(a[:, 0], b[:, 0])  # causal: before the image
  assert np.abs(a[:, 1:] - b[:, 1:]).max() > 1e-3


def test_image_slots_per_row_match_the_batch_order_rule():
  cfg, params = tiny_model()
  tokens = np.array([prompt([3, 4], 2), prompt([5, 6], 2)])
  px = pixels(4)
  flat = _apply(cfg, params, tokens, pixel_values=px)
  rows = _apply(cfg, params, tokens, pixel_values=px, images_per_row=2)
  np.testing.assert_allclose(rows, flat, atol=1e-6)


def test_unused_image_slots_are_never_read():
  cfg, params = tiny_model()
  tokens = np.array([prompt([3, 4, 5, 6, 3, 4], 1), prompt([5, 6], 2)])  # row 0 uses one of 2 slots
  px = pixels(4)
  other = px.copy()
  other[1] = 100.0  # row 0's empty slot
  np.testing.assert_array_equal(
      _apply(cfg, params, tokens, pixel_values=px, images_per_row=2),
      _apply(cfg, params, tokens, pixel_values=other, images_per_row=2))


def test_sampled_image_ids_outside_the_prompt_stay_tokens():
  cfg, params = tiny_model()
  tokens = np.array([prompt([3], 1) + [IMAGE_ID] * 4])  # 1 image, then 4 sampled image ids
  in_prompt = np.arange(tokens.shape[1])[None] < 5
  feats = Transformer(cfg).apply({"params": params}, pixels(2), method=Transformer.encode_images)
  embeds = jnp.take(params["embed"], tokens, axis=0)
  masked = np.asarray(V.merge_image_features(embeds, tokens, feats, IMAGE_ID, 2, in_prompt))
  np.testing.assert_array_equal(masked[0, 5:], np.asarray(embeds[0, 5:]))
  np.testing.assert_array_equal(masked[0, :4], np.asarray(feats[0]))
  unmasked = np.asarray(V.merge_image_features(embeds, tokens, feats, IMAGE_ID, 2))
  np.testing.assert_array_equal(unmasked[0, 5:], np.asarray(feats[1]))  # would read slot 1


def test_merge_in_chunks_with_offsets_equals_one_merge():
  rng = np.random.default_rng(0)
  tokens = np.array([prompt([3, 4], 2), [3, 3] + prompt([5, 6], 1) + [0, 0]])
  x = jnp.asarray(rng.normal(size=tokens.shape + (8,)), jnp.float32)
  feats = jnp.asarray(rng.normal(size=(4, 4, 8)), jnp.float32)
  whole = V.merge_image_features(x, tokens, feats, IMAGE_ID, 2)
  cut = 5
  first = V.merge_image_features(x[:, :cut], tokens[:, :cut], feats, IMAGE_ID, 2)
  offset = jnp.asarray((tokens[:, :cut] == IMAGE_ID).sum(1), jnp.int32)
  second = V.merge_image_features(x[:, cut:], tokens[:, cut:], feats, IMAGE_ID, 2,
                                  offset_B=offset)
  np.testing.assert_array_equal(np.concatenate([first, second], 1), whole)


def test_bad_inputs_raise():
  cfg, params = tiny_model()
  lm = {k: v for k, v in params.items() if k != "vision"}
  with pytest.raises(ValueError, match="no image encoder"):
    _apply(cfg.language_model, lm, np.array([[3, 4]]), pixel_values=pixels(1))
  with pytest.raises(ValueError, match="not both"):
    _apply(cfg, params, np.array([prompt([3], 1)]), pixel_values=pixels(1),
           image_features=np.zeros((1, 4, 32), np.float32))
  with pytest.raises(ValueError, match=r"3 images for 1 rows x 2 image slots"):
    _apply(cfg, params, np.array([prompt([3], 2)]), pixel_values=pixels(3), images_per_row=2)
  with pytest.raises(ValueError, match="go together"):
    tiny_config(image_token_id=None)
  with pytest.raises(ValueError, match="not a token id"):
    tiny_config(image_token_id=64)


def test_config_round_trips_through_json(tmp_path):
  cfg = tiny_config()
  params_io.write_config(cfg, tmp_path)
  assert params_io.read_config(tmp_path / params_io.CONFIG_NAME) == cfg
  d = params_io.config_to_dict(cfg)
  d["vision"] = dict(d["vision"], bogus=1)
  with pytest.raises(ValueError, match="vision must be a dict with keys"):
    params_io.config_from_dict(d)


def test_scanned_layers_keep_the_image_encoder():
  cfg = tiny_config(scan_layers=True)
  params = init_params(cfg, jax.random.PRNGKey(0))
  assert "layers" in params and "vision" in params
  assert dataclasses.replace(cfg, scan_layers=False).num_params() == cfg.num_params()
