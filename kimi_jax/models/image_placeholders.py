"""Image placeholders: where a prompt's image features go in its token embeddings.

Axis legend: B batch rows, T sequence length, D language-model width, N
images, P patches per image (the placeholder tokens an image becomes), S
image slots per row. `merge_image_features` runs inside the jitted model;
`check_image_placeholders` is its host-side check (counts depend on token
values, which jitted code cannot raise on).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


def merge_image_features(x_BTD: jax.Array, tokens_BT: jax.Array, feats_NPD: jax.Array,
                         image_token_id: int, images_per_row: Optional[int] = None,
                         prompt_BT: Optional[jax.Array] = None,
                         offset_B: Optional[jax.Array] = None) -> jax.Array:
  """Token embeddings with the image placeholders replaced by image features.

  Args:
    x_BTD: token embeddings (output dtype).
    tokens_BT: int token ids; `image_token_id` marks one image patch each.
    feats_NPD: projected features of N images, P patches each.
    image_token_id: the placeholder id.
    images_per_row: None: HF LLaVA's rule, the placeholders of the whole
      batch (row-major) take the N*P feature vectors in order. S: static
      image slots, N = B*S, row b owns images b*S..b*S+S-1 and its
      placeholders take them in order; slots after a row's last image are
      padding and never read. Per-row indexing keeps the gather within a
      row, so it stays local when rows are sharded.
    prompt_BT: bool, where placeholders may be (default everywhere): the
      prompt positions of a row that also holds sampled tokens, so that a
      sampled image id stays an ordinary token, as in HF generation.
    offset_B: int32 `[B]`, with `images_per_row`: placeholders of each row
      that came before these tokens (a prefill in chunks); the first one
      here takes feature vector `offset_B[b]` of the row's images.

  Returns `[B, T, D]`. Shapes that cannot match raise ValueError here (at
  trace time). Whether the placeholder count matches the images depends on
  token values, which jitted code cannot raise on: placeholders beyond the
  images keep their token embedding. Check on the host with
  `check_image_placeholders` where the tokens are built.
  """
  B, T, D = x_BTD.shape
  N, P, Df = feats_NPD.shape
  if Df != D:
    raise ValueError(f"image features have width {Df}, the token embeddings {D}")
  if tokens_BT.shape != (B, T):
    raise ValueError(f"tokens {tokens_BT.shape} do not match embeddings {x_BTD.shape}")
  is_image_BT = tokens_BT == image_token_id
  if prompt_BT is not None:
    is_image_BT = is_image_BT & prompt_BT
  if images_per_row is None:
    if offset_B is not None:
      raise ValueError("offset_B needs images_per_row (per-row image slots)")
    if N * P > B * T:
      raise ValueError(f"{N} images x {P} patches do not fit in {B} x {T} tokens")
    flat = is_image_BT.reshape(B * T)
    index = jnp.cumsum(flat, dtype=jnp.int32) - 1
    ok = flat & (index < N * P)
    picked = jnp.take(feats_NPD.reshape(N * P, D), jnp.clip(index, 0, N * P - 1), axis=0)
    return jnp.where(ok[:, None], picked.astype(x_BTD.dtype),
                     x_BTD.reshape(B * T, D)).reshape(B, T, D)
  S = images_per_row
  if N != B * S:
    raise ValueError(f"{N} images for {B} rows x {S} image slots (expected {B * S})")
  index_BT = jnp.cumsum(is_image_BT, axis=1, dtype=jnp.int32) - 1
  if offset_B is not None:
    index_BT = index_BT + offset_B[:, None]
  ok_BT = is_image_BT & (index_BT < S * P)
  picked_BTD = jnp.take_along_axis(feats_NPD.reshape(B, S * P, D),
                                   jnp.clip(index_BT, 0, S * P - 1)[..., None], axis=1)
  return jnp.where(ok_BT[..., None], picked_BTD.astype(x_BTD.dtype), x_BTD)


def check_image_placeholders(tokens_BT, num_images: int, tokens_per_image: int,
                             image_token_id: int, images_per_row: Optional[int] = None,
                             images_in_row=None, prompt_BT=None) -> None:
  """Raise ValueError unless the placeholders in host `tokens_BT` match the images.

  Without `images_per_row`: the batch holds `num_images * tokens_per_image`
  placeholders. With S = `images_per_row`: each row holds a whole number of
  images, at most S; `images_in_row` (int `[B]`, optional) pins each row's
  count; `prompt_BT` as in `merge_image_features`. The message names the
  row and both counts.
  """
  is_image_BT = np.asarray(tokens_BT) == image_token_id
  if prompt_BT is not None:
    is_image_BT &= np.asarray(prompt_BT, bool)
  counts_B = is_image_BT.sum(axis=-1)
  P = tokens_per_image
  if images_per_row is None:
    total = int(counts_B.sum())
    if total != num_images * P:
      raise ValueError(f"{total} image placeholder tokens (id {image_token_id}) but "
                       f"{num_images} images x {P} patches = {num_images * P}")
    return
  for b, count in enumerate(counts_B.tolist()):
    want = None if images_in_row is None else int(np.asarray(images_in_row)[b])
    if count % P or count > images_per_row * P or (want is not None and count != want * P):
      expect = (f"{want} images x {P} patches = {want * P}" if want is not None else
                f"a multiple of {P} patches, at most {images_per_row} images")
      raise ValueError(f"row {b}: {count} image placeholder tokens (id {image_token_id}), "
                       f"expected {expect}")


def slot_inputs(pixels_NSYXC, prompt_NT) -> dict:
  """`Transformer.apply`'s image keywords for rows with S static image slots:
  pixels float32 `[N, S, Y, X, C]` (None: text rows, {}), bool `prompt_NT`
  the positions whose placeholders take image features."""
  if pixels_NSYXC is None:
    return {}
  N, S = pixels_NSYXC.shape[:2]
  return dict(pixel_values=pixels_NSYXC.reshape((N * S,) + pixels_NSYXC.shape[2:]),
              images_per_row=S, image_prompt_BT=prompt_NT)
