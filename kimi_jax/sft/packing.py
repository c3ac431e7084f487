"""SFT data on device: sequence packing and the endless batch stream.

Axis legend: N packed rows, T sequence length (`seq_len`).

Examples are `(prompt_ids, response_ids)` pairs or `Example`s (with
images). `pack` appends eos to each response and packs whole examples,
greedy first-fit, into rows of `seq_len` tokens; every example is one
segment (segment ids 1, 2, ... within a row, 0 = padding), its positions
restart at 0, and attention stays inside it.

Loss alignment (next-token prediction): the target of position t is
`tokens[t + 1]`. `loss_mask_NT[n, t] = 1` exactly when `tokens[n, t + 1]` is a
response token or the eos of the SAME segment, i.e. from the last prompt
token up to the token before eos. A segment's last position (whose "next"
token belongs to the next segment or is padding) is never in the loss, so
nothing is predicted across a segment boundary.

Images (`image_slots` S > 0; axis S image slots, Y X C pixels): an example's
images are float32 `[n, Y, X, C]` preprocessed pixels, one per placeholder
run in its prompt, in order. A row's images are its examples' images
concatenated in row order (so the row's prompt placeholders, counted left to
right, take them in order, as `vision.merge_image_features` reads
`images_per_row` slots), then zero slots up to S. A row is closed to an
example whose images would not fit in its free slots, as it is to one whose
tokens would not fit. `prompt_mask_NT` marks prompt tokens: only there may a
placeholder id take image features (a response token equal to the image id
is an ordinary target).
"""
from __future__ import annotations

from typing import Any, Iterator, NamedTuple, Optional, Sequence

import flax.struct
import jax
import numpy as np

from kimi_jax.sft.config import SFTConfig



class Example(NamedTuple):
  """One SFT example. A plain `(prompt_ids, response_ids)` pair is an Example
  without images. images: float32 `[n, Y, X, C]` preprocessed pixels (n >= 0;
  None = text only), one per image placeholder run in the prompt, in order."""
  prompt: Sequence[int]
  response: Sequence[int]
  images: Optional[np.ndarray] = None


def example_images(example, where: str = "example") -> Optional[np.ndarray]:
  """The float32 `[n, Y, X, C]` images of a 2- or 3-tuple example (None: none)."""
  if len(example) == 2 or example[2] is None:
    return None
  images = np.asarray(example[2])
  if images.ndim != 4:
    raise ValueError(f"{where}: images must be [n, Y, X, C] pixels, got shape {images.shape}")
  return images.astype(np.float32, copy=False)


@flax.struct.dataclass
class PackedBatch:
  """Packed rows (all `[N, T]`): tokens_NT int32, segment_ids_NT int32
  (1.. per example within a row, 0 = padding), positions_NT int32 (0 at each
  example's first token), loss_mask_NT float32 (1 where the NEXT token is a
  response token or eos of the same example).

  With images (else both None): pixels_NSYXC float32 `[N, S, Y, X, C]`, each
  row's images in placeholder order then zero slots; prompt_mask_NT bool
  `[N, T]`, True at prompt tokens (where placeholders take image features).
  """
  tokens_NT: Any
  segment_ids_NT: Any
  positions_NT: Any
  loss_mask_NT: Any
  pixels_NSYXC: Any = None
  prompt_mask_NT: Any = None

  def rows(self, idx) -> "PackedBatch":
    return jax.tree.map(lambda x: x[idx], self)


def pack(examples: Sequence[Example], seq_len: int, eos_id: int, pad_id: int = 0,
         image_slots: int = 0,
         image_shape: Optional[tuple[int, int, int]] = None) -> tuple[PackedBatch, int]:
  """Greedy first-fit packing of whole examples (numpy, host side).

  Each example becomes `prompt + response + [eos_id]` and goes, in the given
  order, into the first row with room for all of it (and, with images, free
  image slots for all of its images). An example longer than `seq_len` is
  skipped (never truncated: a cut response would teach the model to stop
  without eos). Returns `(batch, num_skipped)`; the batch has as many rows as
  needed (0 if nothing fits).

  image_slots: S, the static image slots per row; 0 = text only (an example
    with images then raises ValueError, as does one with more than S images).
  image_shape: `(Y, X, C)` of the pixels, for a batch whose examples have no
    images (default: the first example's images' shape; all must match).
  """
  if not isinstance(image_slots, (int, np.integer)) or image_slots < 0:
    raise ValueError(f"pack: image_slots must be an int >= 0, got {image_slots!r}")
  free = np.zeros(len(examples), np.int64)  # room left per row (<= one row per example)
  free_slots = np.zeros(len(examples), np.int64)
  placed: list[list[list[int]]] = []  # per row: the examples' token lists
  prompt_lens: list[list[int]] = []
  row_images: list[list[np.ndarray]] = []
  skipped = 0
  for i, example in enumerate(examples):
    prompt, response = example[0], example[1]
    if len(prompt) == 0:
      raise ValueError(f"example {i}: empty prompt (the first response token needs "
                       "a token before it to be predicted from)")
    images = example_images(example, f"example {i}")
    n_images = 0 if images is None else images.shape[0]
    if n_images:
      if n_images > image_slots:
        raise ValueError(f"example {i} has {n_images} images but a packed row has "
                         f"image_slots={image_slots} (SFTConfig.image_slots)")
      if image_shape is None:
        image_shape = tuple(images.shape[1:])
      elif tuple(images.shape[1:]) != tuple(image_shape):
        raise ValueError(f"example {i}: images of shape {tuple(images.shape[1:])}, expected "
                         f"{tuple(image_shape)} (Y, X, C) like the others")
    seq = list(prompt) + list(response) + [eos_id]
    if len(seq) > seq_len:
      skipped += 1
      continue
    fits = (free[:len(placed)] >= len(seq)) & (free_slots[:len(placed)] >= n_images)
    row = int(np.argmax(fits)) if fits.any() else len(placed)
    if row == len(placed):
      placed.append([])
      prompt_lens.append([])
      row_images.append([])
      free[row] = seq_len
      free_slots[row] = image_slots
    placed[row].append(seq)
    prompt_lens[row].append(len(prompt))
    if n_images:
      row_images[row].append(images)
    free[row] -= len(seq)
    free_slots[row] -= n_images

  n = len(placed)
  tokens = np.full((n, seq_len), pad_id, np.int32)
  segments = np.zeros((n, seq_len), np.int32)
  positions = np.zeros((n, seq_len), np.int32)
  mask = np.zeros((n, seq_len), np.float32)
  in_prompt = np.zeros((n, seq_len), bool)
  for r, (seqs, plens) in enumerate(zip(placed, prompt_lens)):
    at = 0
    for s, (seq, p) in enumerate(zip(seqs, plens), start=1):
      end = at + len(seq)
      tokens[r, at:end] = seq
      segments[r, at:end] = s
      positions[r, at:end] = np.arange(len(seq))
      # Targets tokens[at+p : end] (response + eos) are predicted at t-1.
      mask[r, at + p - 1:end - 1] = 1.0
      in_prompt[r, at:at + p] = True
      at = end
  if not image_slots:
    return PackedBatch(tokens, segments, positions, mask), skipped
  if image_shape is None:
    raise ValueError("pack: image_slots > 0 but no example has images; pass image_shape")
  pixels = np.zeros((n, image_slots) + tuple(image_shape), np.float32)
  for r, imgs in enumerate(row_images):
    if imgs:
      row = np.concatenate(imgs)
      pixels[r, :row.shape[0]] = row
  return PackedBatch(tokens, segments, positions, mask, pixels, in_prompt), skipped


def batches(examples: Sequence[Example], sft_cfg: SFTConfig, eos_id: int, pad_id: int = 0,
            image_shape: Optional[tuple[int, int, int]] = None
            ) -> Iterator[tuple[int, PackedBatch]]:
  """Endless `(epoch, batch)` stream of `batch_size` rows: each epoch shuffles
  the examples (numpy RNG seeded by `sft_cfg.seed`), packs them (with
  `sft_cfg.image_slots` image slots per row; `image_shape` as in `pack`),
  shuffles the rows; a batch may straddle two epochs (no row is dropped or
  padded)."""
  rng = np.random.default_rng(sft_cfg.seed)
  buf, epoch = None, -1
  while True:
    while buf is None or buf.tokens_NT.shape[0] < sft_cfg.batch_size:
      epoch += 1
      order = rng.permutation(len(examples))
      packed, _ = pack([examples[i] for i in order], sft_cfg.seq_len, eos_id, pad_id,
                       sft_cfg.image_slots, image_shape)
      if packed.tokens_NT.shape[0] == 0:
        raise ValueError(f"no example fits in seq_len={sft_cfg.seq_len}")
      packed = packed.rows(rng.permutation(packed.tokens_NT.shape[0]))
      buf = packed if buf is None else jax.tree.map(
          lambda a, b: np.concatenate([a, b]), buf, packed)
    yield epoch, buf.rows(slice(0, sft_cfg.batch_size))
    buf = buf.rows(slice(sft_cfg.batch_size, None))
