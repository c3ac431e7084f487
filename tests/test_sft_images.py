"""SFT on image + text examples: packing with image slots, the loss through
the image encoder, a frozen tower, training on the synthetic visual tasks.

Axis legend: N rows, T tokens, S image slots per row, Y X C pixels.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax import sft
from kimi_jax.data import images as images_lib
from kimi_jax.data import visual
from kimi_jax.models.transformer import Transformer, init_params
from multimodal_models import tiny_config

EOS = sft.BYTE_EOS_ID
IMG = visual.IMAGE_TOKEN_ID
# The visual tasks' byte vocabulary; 16 px images of 8 px patches: 4 placeholders each.
CFG = tiny_config(vocab_size=visual.VOCAB_SIZE, image_token_id=IMG)
PER = CFG.vision.tokens_per_image
YXC = (16, 16, 3)


def numpy_params(cfg, seed=0):
  """init_params' shapes, filled by numpy: compiling the initialisers would
  take longer than these tests (as in test_sft.py)."""
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']"):
      return jnp.ones(x.shape, x.dtype)
    if name.endswith("['bias']"):
      return jnp.zeros(x.shape, x.dtype)
    return jnp.asarray(rng.normal(0.0, 0.05, x.shape), x.dtype)

  return jax.tree_util.tree_map_with_path(
      leaf, jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0))))


@pytest.fixture(scope="module")
def params():
  return numpy_params(CFG)


def const_images(*values):
  """float32 `[n, 16, 16, 3]`, image i filled with values[i] (easy to trace)."""
  return np.stack([np.full(YXC, v, np.float32) for v in values])


def random_images(n, seed):
  return np.random.default_rng(seed).normal(size=(n,) + YXC).astype(np.float32)


def test_pack_places_images_in_row_order_then_padding_and_respects_the_slots():
  examples = [sft.Example([IMG] * 4 + [10], [11, 12], const_images(1)),   # 8 tokens -> row 0
              sft.Example([IMG] * 8 + [20], [21], const_images(2, 3)),    # 11: too long -> row 1
              sft.Example([IMG] * 4, [], const_images(4)),  # 5 -> row 0 (its last slot)
              # 5 tokens would fit row 1, but its 2 slots are taken: a new row.
              sft.Example([IMG] * 4, [], const_images(5)),
              ([30], [31])]                                              # text -> row 0's last room
  batch, skipped = sft.pack(examples, seq_len=16, eos_id=EOS, image_slots=2)
  assert skipped == 0
  np.testing.assert_array_equal(batch.tokens_NT, [
      [IMG] * 4 + [10, 11, 12, EOS] + [IMG] * 4 + [EOS, 30, 31, EOS],
      [IMG] * 8 + [20, 21, EOS] + [0] * 5,
      [IMG] * 4 + [EOS] + [0] * 11])
  assert batch.pixels_NSYXC.shape == (3, 2) + YXC and batch.pixels_NSYXC.dtype == np.float32
  np.testing.assert_array_equal(batch.pixels_NSYXC[:, :, 0, 0, 0], [[1, 4], [2, 3], [5, 0]])
  assert not batch.pixels_NSYXC[2, 1].any()  # padding slot: zeros
  np.testing.assert_array_equal(batch.prompt_mask_NT, [
      [1] * 5 + [0] * 3 + [1] * 4 + [0] + [1, 0, 0],
      [1] * 9 + [0] * 7,
      [1] * 4 + [0] * 12])
  assert batch.prompt_mask_NT.dtype == bool
  # The stream keeps the slots (and stacks pixels across epochs).
  cfg = sft.SFTConfig(batch_size=4, seq_len=16, image_slots=2)
  _, streamed = next(sft.batches(examples, cfg, EOS))
  assert streamed.pixels_NSYXC.shape == (4, 2) + YXC
  assert streamed.prompt_mask_NT.shape == (4, 16)


def test_text_only_packing_is_unchanged():
  pairs = [([5, 6], [7, 8, 9]), ([10, 11, 12, 14], [15, 16]), ([20], [21])]
  plain, _ = sft.pack(pairs, seq_len=9, eos_id=EOS)
  named, _ = sft.pack([sft.Example(p, r) for p, r in pairs], seq_len=9, eos_id=EOS)
  assert plain.pixels_NSYXC is None and plain.prompt_mask_NT is None
  jax.tree.map(np.testing.assert_array_equal, plain, named)
  # Text examples with image slots: all-padding pixels of the given shape.
  slotted, _ = sft.pack(pairs, seq_len=9, eos_id=EOS, image_slots=1, image_shape=YXC)
  np.testing.assert_array_equal(slotted.tokens_NT, plain.tokens_NT)
  assert slotted.pixels_NSYXC.shape == (2, 1) + YXC and not slotted.pixels_NSYXC.any()


def test_bad_image_inputs_raise_clear_errors(params):
  three = sft.Example([IMG] * 12 + [3], [4], random_images(3, 0))
  with pytest.raises(ValueError, match="example 0 has 3 images.*image_slots=2"):
    sft.pack([three], seq_len=32, eos_id=EOS, image_slots=2)
  with pytest.raises(ValueError, match="image_slots=0"):
    sft.pack([three], seq_len=32, eos_id=EOS)
  with pytest.raises(ValueError, match="example 1: images of shape"):
    sft.pack([three, sft.Example([IMG] * 4, [4], np.zeros((1, 8, 8, 3), np.float32))],
             seq_len=32, eos_id=EOS, image_slots=3)
  with pytest.raises(ValueError, match="pass image_shape"):
    sft.pack([([3], [4])], seq_len=8, eos_id=EOS, image_slots=1)
  for field, value in (("image_slots", -1), ("image_slots", 1.5), ("train_vision", "no")):
    with pytest.raises(ValueError, match=f"SFTConfig.{field}"):
      sft.SFTConfig(**{field: value})

  run = sft.SFTConfig(steps=1, batch_size=1, seq_len=32, image_slots=3)
  text_cfg = CFG.language_model
  with pytest.raises(ValueError, match="example 0 has 3 images but the model has no image"):
    sft.run_sft(text_cfg, params, [three], dataclasses.replace(run, image_slots=0),
                eos_id=EOS, progress=False)
  with pytest.raises(ValueError, match="image_slots=3 but the model has no image encoder"):
    sft.run_sft(text_cfg, params, [([3], [4])], run, eos_id=EOS, progress=False)
  with pytest.raises(ValueError, match="example 0 has 3 images.*image_slots=2"):
    sft.run_sft(CFG, params, [three], dataclasses.replace(run, image_slots=2), eos_id=EOS,
                progress=False)
  with pytest.raises(ValueError, match=r"example 1: 8 image placeholder tokens .* 1 images x 4"):
    sft.check_examples(CFG, [three, sft.Example([IMG] * 8, [4], random_images(1, 0))], run)
  with pytest.raises(ValueError, match="example 0: images of shape .* encoder takes"):
    sft.check_examples(CFG, [sft.Example([IMG] * 4, [4], np.zeros((1, 8, 8, 3)))], run)
  with pytest.raises(ValueError, match="4 image placeholder tokens .* 0 images"):
    sft.check_examples(CFG, [([IMG] * 4 + [3], [4])], run)  # placeholders but no image


# Packed rows (S=2, T=24), by first fit: row 0 = a, c, d; row 1 = b, e. b does
# not join row 0 for lack of slots. a's response holds the image id: were it
# replaced it would take d's image (the next in row 0); e's is text only.
LOSS_EXAMPLES = [
    sft.Example([IMG] * 4 + [10, 11], [12, IMG, 13], random_images(1, 1)),  # a
    sft.Example([IMG] * 8 + [20], [21, 22], random_images(2, 2)),          # b
    sft.Example([30, 31], [32, 33, 34]),                                    # c
    sft.Example([IMG] * 4 + [40], [41], random_images(1, 3)),               # d
    sft.Example([50], [IMG, 51])]                                           # e
T, S = 24, 2


@pytest.fixture(scope="module")
def loss_batch():
  batch, _ = sft.pack(LOSS_EXAMPLES, seq_len=T, eos_id=EOS, image_slots=S)
  assert batch.tokens_NT.shape == (2, T)
  np.testing.assert_array_equal(batch.segment_ids_NT[:, [0, 10, 13, 16, 23]],
                                [[1, 2, 2, 3, 0], [1, 1, 2, 0, 0]])
  return batch


def _alone_logprobs(params, example):
  """Response (+ eos) log-probs of one example alone in a row, by hand: the
  model's own call with the example's images (HF's flat placeholder rule, no
  slots and no prompt mask: a response image id past the images stays a
  token there)."""
  prompt, response, images = example
  seq = list(prompt) + list(response) + [EOS]
  tokens = np.zeros((1, T), np.int32)
  tokens[0, :len(seq)] = seq
  segments = (np.arange(T) < len(seq)).astype(np.int32)[None]
  logp = np.asarray(_log_softmax(params, tokens, segments, images))
  return [logp[0, t, tokens[0, t + 1]] for t in range(len(prompt) - 1, len(seq) - 1)]


@jax.jit
def _log_softmax(params, tokens, segments, images):
  logits = Transformer(CFG).apply({"params": params}, tokens, segment_ids_BT=segments,
                                  pixel_values=images)
  return jax.nn.log_softmax(logits, -1)


@jax.jit
def _packed_logprobs(params, batch):
  """Per-position log-prob of the next token of packed rows, as sft_loss calls the model."""
  N = batch.tokens_NT.shape[0]
  logits = Transformer(CFG).apply(
      {"params": params}, batch.tokens_NT, positions_BT=batch.positions_NT,
      segment_ids_BT=batch.segment_ids_NT,
      pixel_values=batch.pixels_NSYXC.reshape((N * S,) + YXC), images_per_row=S,
      image_prompt_BT=batch.prompt_mask_NT)
  targets = jnp.pad(batch.tokens_NT[:, 1:], ((0, 0), (0, 1)))
  return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1)[..., 0]


_loss = jax.jit(sft.sft_loss, static_argnums=1)


def test_loss_with_images_matches_each_example_alone(params, loss_batch):
  alone = [_alone_logprobs(params, e) for e in LOSS_EXAMPLES]
  packed_NT = np.asarray(_packed_logprobs(params, loss_batch))
  got = {}
  for n, t in zip(*np.nonzero(loss_batch.loss_mask_NT)):
    got.setdefault((n, loss_batch.segment_ids_NT[n, t]), []).append(packed_NT[n, t])
  # Row 0 holds a, c, d and row 1 b, e (segments in packing order).
  where = {0: (0, 1), 2: (0, 2), 3: (0, 3), 1: (1, 1), 4: (1, 2)}
  for i, want in enumerate(alone):
    np.testing.assert_allclose(got[where[i]], want, atol=1e-5, err_msg=f"example {i}")
  loss, metrics = _loss(params, CFG, loss_batch)
  np.testing.assert_allclose(float(loss), -np.mean(np.concatenate(alone)), rtol=1e-5)
  assert float(metrics["tokens"]) == sum(len(e.response) + 1 for e in LOSS_EXAMPLES)


def test_response_image_ids_stay_tokens_and_images_reach_the_loss(params, loss_batch):
  loss = float(_loss(params, CFG, loss_batch)[0])
  # Without the prompt mask a's response image id takes d's image: another loss.
  unmasked = dataclasses.replace(loss_batch, prompt_mask_NT=None)
  assert abs(float(_loss(params, CFG, unmasked)[0]) - loss) > 1e-4
  for n, s in ((0, 0), (0, 1), (1, 1)):  # a's, d's, b's second image
    pixels = loss_batch.pixels_NSYXC.copy()
    pixels[n, s] = random_images(1, 99)[0]
    changed = dataclasses.replace(loss_batch, pixels_NSYXC=pixels)
    assert abs(float(_loss(params, CFG, changed)[0]) - loss) > 1e-5, (n, s)


def test_text_model_rejects_a_batch_with_pixels(params, loss_batch):
  lm = {k: v for k, v in params.items() if k != "vision"}
  with pytest.raises(ValueError, match="no image encoder"):
    sft.sft_loss(lm, CFG.language_model, loss_batch)


def test_visual_examples():
  train, _ = visual.make_splits(0, 10, 2, tasks=("count",), difficulties=(1,))
  processor = images_lib.ProcessorConfig(height=16, width=16)
  examples = sft.visual_examples(train, 12, PER, processor, long_frac=0.0)
  assert len(examples) == 12
  for i, e in enumerate(examples):
    p = train[i % len(train)]
    assert e.prompt == visual.encode_prompt(p, PER) and e.prompt.count(IMG) == PER
    assert sft.byte_decode(e.response) == visual.short_cot(p)
    assert e.images.shape == (1,) + YXC and e.images.dtype == np.float32
    np.testing.assert_array_equal(e.images[0], images_lib.preprocess(p.image(), processor))
  sft.check_examples(CFG, examples, sft.SFTConfig(image_slots=1))
  with pytest.raises(ValueError, match="at least one problem"):
    sft.visual_examples([], 1, PER, processor)


VISUAL_SFT = sft.SFTConfig(steps=30, batch_size=4, seq_len=80, learning_rate=1e-2,
                           warmup_steps=3, weight_decay=0.0, image_slots=2, log_every=10)


@pytest.fixture(scope="module")
def visual_data():
  train, _ = visual.make_splits(0, 16, 2, tasks=("count", "compare"), difficulties=(1,))
  return sft.visual_examples(train, 16, PER, images_lib.ProcessorConfig(height=16, width=16))


def test_sft_on_visual_examples_lowers_the_loss_and_trains_the_tower(params, visual_data):
  trained, history = sft.run_sft(CFG, params, visual_data, VISUAL_SFT, eos_id=EOS,
                                 progress=False)
  assert len(history) == VISUAL_SFT.steps
  first, last = history[0]["loss"], np.mean([h["loss"] for h in history[-5:]])
  assert last < 0.4 * first, (first, last)
  for key in ("vision", "embed"):
    assert any(not np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(trained[key]), jax.tree.leaves(params[key]))), key


def test_frozen_tower_stays_bit_identical_while_the_lm_learns(params, visual_data):
  frozen_cfg = dataclasses.replace(VISUAL_SFT, steps=3, train_vision=False)
  trained, history = sft.run_sft(CFG, params, visual_data, frozen_cfg, eos_id=EOS,
                                 progress=False)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a).view(np.uint32),
                                                          np.asarray(b).view(np.uint32)),
               trained["vision"], params["vision"])
  lm_changed = [not np.array_equal(trained[k], params[k]) for k in ("embed", "lm_head")]
  assert all(lm_changed) and np.isfinite(history[-1]["loss"])
  assert history[-1]["grad_norm"] > 0
