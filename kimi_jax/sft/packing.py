"""SFT data on device: sequence packing and the endless batch stream.

Axis legend: N packed rows, T sequence length (`seq_len`).

Examples are `(prompt_ids, response_ids)` pairs. `pack` appends eos to each
response and packs whole examples, greedy first-fit, into rows of `seq_len`
tokens; every example is one segment (segment ids 1, 2, ... within a row,
0 = padding), its positions restart at 0, and attention stays inside it.

Loss alignment (next-token prediction): the target of position t is
`tokens[t + 1]`. `loss_mask_NT[n, t] = 1` exactly when `tokens[n, t + 1]` is a
response token or the eos of the SAME segment, i.e. from the last prompt
token up to the token before eos. A segment's last position (whose "next"
token belongs to the next segment or is padding) is never in the loss, so
nothing is predicted across a segment boundary.
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import flax.struct
import jax
import numpy as np

from kimi_jax.sft.config import SFTConfig

Example = tuple[Sequence[int], Sequence[int]]  # (prompt_ids, response_ids)


@flax.struct.dataclass
class PackedBatch:
  """Packed rows (all `[N, T]`): tokens_NT int32, segment_ids_NT int32
  (1.. per example within a row, 0 = padding), positions_NT int32 (0 at each
  example's first token), loss_mask_NT float32 (1 where the NEXT token is a
  response token or eos of the same example)."""
  tokens_NT: Any
  segment_ids_NT: Any
  positions_NT: Any
  loss_mask_NT: Any

  def rows(self, idx) -> "PackedBatch":
    return jax.tree.map(lambda x: x[idx], self)


def pack(examples: Sequence[Example], seq_len: int, eos_id: int,
         pad_id: int = 0) -> tuple[PackedBatch, int]:
  """Greedy first-fit packing of whole examples (numpy, host side).

  Each example becomes `prompt + response + [eos_id]` and goes, in the given
  order, into the first row with room for all of it. An example longer than
  `seq_len` is skipped (never truncated: a cut response would teach the model
  to stop without eos). Returns `(batch, num_skipped)`; the batch has as many
  rows as needed (0 if nothing fits).
  """
  free = np.zeros(len(examples), np.int64)  # room left per row (<= one row per example)
  placed: list[list[list[int]]] = []  # per row: the examples' token lists
  prompt_lens: list[list[int]] = []
  skipped = 0
  for i, (prompt, response) in enumerate(examples):
    if len(prompt) == 0:
      raise ValueError(f"example {i}: empty prompt (the first response token needs "
                       "a token before it to be predicted from)")
    seq = list(prompt) + list(response) + [eos_id]
    if len(seq) > seq_len:
      skipped += 1
      continue
    fits = free[:len(placed)] >= len(seq)
    row = int(np.argmax(fits)) if fits.any() else len(placed)
    if row == len(placed):
      placed.append([])
      prompt_lens.append([])
      free[row] = seq_len
    placed[row].append(seq)
    prompt_lens[row].append(len(prompt))
    free[row] -= len(seq)

  n = len(placed)
  tokens = np.full((n, seq_len), pad_id, np.int32)
  segments = np.zeros((n, seq_len), np.int32)
  positions = np.zeros((n, seq_len), np.int32)
  mask = np.zeros((n, seq_len), np.float32)
  for r, (seqs, plens) in enumerate(zip(placed, prompt_lens)):
    at = 0
    for s, (seq, p) in enumerate(zip(seqs, plens), start=1):
      end = at + len(seq)
      tokens[r, at:end] = seq
      segments[r, at:end] = s
      positions[r, at:end] = np.arange(len(seq))
      # Targets tokens[at+p : end] (response + eos) are predicted at t-1.
      mask[r, at + p - 1:end - 1] = 1.0
      at = end
  return PackedBatch(tokens, segments, positions, mask), skipped


def batches(examples: Sequence[Example], sft_cfg: SFTConfig, eos_id: int,
            pad_id: int = 0) -> Iterator[tuple[int, PackedBatch]]:
  """Endless `(epoch, batch)` stream of `batch_size` rows: each epoch shuffles
  the examples (numpy RNG seeded by `sft_cfg.seed`), packs them, shuffles the
  rows; a batch may straddle two epochs (no row is dropped or padded)."""
  rng = np.random.default_rng(sft_cfg.seed)
  buf, epoch = None, -1
  while True:
    while buf is None or buf.tokens_NT.shape[0] < sft_cfg.batch_size:
      epoch += 1
      order = rng.permutation(len(examples))
      packed, _ = pack([examples[i] for i in order], sft_cfg.seq_len, eos_id, pad_id)
      if packed.tokens_NT.shape[0] == 0:
        raise ValueError(f"no example fits in seq_len={sft_cfg.seq_len}")
      packed = packed.rows(rng.permutation(packed.tokens_NT.shape[0]))
      buf = packed if buf is None else jax.tree.map(
          lambda a, b: np.concatenate([a, b]), buf, packed)
    yield epoch, buf.rows(slice(0, sft_cfg.batch_size))
    buf = buf.rows(slice(sft_cfg.batch_size, None))
