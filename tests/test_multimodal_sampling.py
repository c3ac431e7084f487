"""Image + text sampling: generate, chunked prefill, and partial rollouts with images."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax import parallel
from kimi_jax.models.transformer import Transformer
from kimi_jax.sampling.repetition import RepeatConfig
from kimi_jax.sampling.sampler import SamplingConfig, generate, image_slots
from kimi_jax.sampling.segment import SegmentSampler
from multimodal_models import IMAGE_ID, pixels, prompt, tiny_model
from rollout_states import BUDGET, make_state, resume

# Prompts with 1, 2, 0 and 1 images (4 placeholders each).
PROMPTS = [prompt([3, 4], 1), prompt([5], 2), [6, 8, 9], [3] + prompt([10, 11, 12], 1)]
COUNTS = [1, 2, 0, 1]


@pytest.fixture(scope="module")
def model():
  return tiny_model(seed=3)


def _images(seed=0):
  return [pixels(n, seed=seed + 10 * b) for b, n in enumerate(COUNTS)]


def _greedy_by_full_forward(cfg, params, p, imgs, new):
  """Greedy continuation with a cache-free forward per token (the reference)."""
  seq = list(p)
  for _ in range(new):
    tokens = np.asarray([seq])
    kw = {}
    if len(imgs):
      kw = dict(pixel_values=imgs, image_prompt_BT=np.arange(len(seq))[None] < len(p))
    logits = Transformer(cfg).apply({"params": params}, tokens, **kw)
    seq.append(int(jnp.argmax(logits[0, -1])))
  return seq[len(p):]


@pytest.mark.parametrize("chunk", [0, 4])
def test_generate_with_images_matches_the_cache_free_model(model, chunk):
  cfg, params = model
  cfg = cfg.replace(prefill_chunk=chunk)
  imgs = _images()
  got = generate(cfg, params, PROMPTS, 6, images=imgs)
  for p, x, g in zip(PROMPTS, imgs, got):
    assert g == _greedy_by_full_forward(cfg, params, p, x, 6)
  # The images matter: other pixels, other continuations somewhere.
  assert generate(cfg, params, PROMPTS, 6, images=_images(seed=99)) != got


def test_image_counts_that_disagree_with_placeholders_are_named(model):
  cfg, params = model
  imgs = _images()
  imgs[1] = imgs[1][:1]
  with pytest.raises(ValueError, match=r"prompt 1: 8 image placeholder tokens .* expected 1 "
                                       r"images x 4 patches"):
    generate(cfg, params, PROMPTS, 4, images=imgs)
  with pytest.raises(ValueError, match="no image encoder"):
    image_slots(cfg.language_model, PROMPTS, _images(), 4)
  with pytest.raises(ValueError, match=r"prompt 0: images must be \[n, 16, 16, 3\]"):
    image_slots(cfg, PROMPTS, [pixels(1, size=8)] + _images()[1:], 4)


def _image_state(cfg, max_length=48):
  st = make_state(PROMPTS, max_length=max_length)
  return st.replace(pixels_BSYXC=image_slots(cfg, PROMPTS, _images(), len(PROMPTS)))


@pytest.mark.parametrize("prefill_rows", [0, 2])
def test_rollouts_in_three_segments_equal_one_segment_with_images(model, prefill_rows):
  """Carried rows are re-prefilled with their images (partial rollouts)."""
  cfg, params = model
  state = _image_state(cfg)
  greedy = SegmentSampler(cfg, SamplingConfig(), RepeatConfig(), eos_id=None, budget_slots=12,
                          min_width=4, prefill_rows=prefill_rows)
  one, _ = greedy(params, state, 12, 0, jax.random.PRNGKey(1))
  three = state
  for it in range(3):
    three, _ = greedy(params, three, 4, it, jax.random.PRNGKey(1))
    three = resume(three)
  assert (one.finish_B == BUDGET).all()
  np.testing.assert_array_equal(one.tokens_BL, three.tokens_BL)
  np.testing.assert_allclose(one.logp_BL, three.logp_BL, atol=1e-5)
  np.testing.assert_array_equal(three.pixels_BSYXC, state.pixels_BSYXC)
  for b, (p, g) in enumerate(zip(PROMPTS, generate(cfg, params, PROMPTS, 12, images=_images()))):
    assert one.tokens_BL[b, len(p):len(p) + 12].tolist() == g


def test_sampled_placeholder_ids_are_tokens_when_re_prefilled(model):
  """A response holding the image id is re-prefilled as tokens, as generated."""
  cfg, params = model
  state = _image_state(cfg)
  tokens, length = state.tokens_BL.copy(), state.length_B.copy()
  tokens[0, length[0]:length[0] + 3] = IMAGE_ID  # a response of three image ids so far
  length[0] += 3
  carried = state.replace(tokens_BL=tokens, length_B=length)
  engine = SegmentSampler(cfg, SamplingConfig(), RepeatConfig(), eos_id=None, budget_slots=4,
                          min_width=4, prefill_rows=0)
  out, _ = engine(params, carried, 4, 0, jax.random.PRNGKey(0))
  seq = list(tokens[0, :length[0]])
  for _ in range(4):
    mask = np.arange(len(seq))[None] < len(PROMPTS[0])
    logits = Transformer(cfg).apply({"params": params}, np.asarray([seq]),
                                    pixel_values=_images()[0], image_prompt_BT=mask)
    seq = seq + [int(jnp.argmax(logits[0, -1]))]
  assert out.tokens_BL[0, :len(seq)].tolist() == seq


def test_rollouts_with_images_under_a_sample_layout_match_one_device(model):
  cfg, params = model
  layout = parallel.Layout.sample(parallel.make_mesh(parallel.MeshConfig(2, 2, 2)), cfg)
  kw = dict(sampling=SamplingConfig(), repeat=RepeatConfig(), eos_id=None, budget_slots=6,
            min_width=4)
  plain = SegmentSampler(cfg, prefill_rows=2, **kw)
  sharded = SegmentSampler(cfg, prefill_rows=2, layout=layout, **kw)
  state = _image_state(cfg)
  a, _ = plain(params, state, 6, 0, jax.random.PRNGKey(0))
  b, _ = sharded(parallel.reshard(params, layout), state, 6, 0, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(a.tokens_BL, b.tokens_BL)
  np.testing.assert_allclose(a.logp_BL, b.logp_BL, atol=1e-5)
