"""Shortest rejection sampling (report §2.4): SFT data from the shortest correct samples.

From n samples per prompt (`samples.draw`, n = 8 in the report), keep for
each prompt its shortest correct response; prompts without a correct one are
dropped. The result is a response file (kimi_jax/sft/data.py: prompt,
response and the prompt's fields) that launch.sft / `sft.run_from_config`
trains on.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from kimi_jax.long2short.samples import PromptSamples
from kimi_jax.sft import data as sft_data


def shortest_correct(lengths: Sequence[int], correct: Sequence[bool]) -> Optional[int]:
  """Index of the shortest correct sample (the first of equal lengths), or
  None when no sample is correct."""
  lengths_N = np.asarray(lengths, np.int64)
  correct_N = np.asarray(correct, bool)
  if lengths_N.shape != correct_N.shape or lengths_N.ndim != 1:
    raise ValueError(f"lengths {lengths_N.shape} and correct {correct_N.shape} must be "
                     "equal-length 1-D sequences")
  if not correct_N.any():
    return None
  return int(np.argmin(np.where(correct_N, lengths_N, np.iinfo(np.int64).max)))


def select(samples: Sequence[PromptSamples]) -> list[dict]:
  """Response-file records: each prompt's fields with `response` = its
  shortest correct sample's text; prompts with none are left out."""
  out = []
  for s in samples:
    best = shortest_correct(s.lengths, s.correct)
    if best is not None:
      out.append({**s.record, "prompt": s.prompt, "response": s.texts[best]})
  return out


def write_set(samples: Sequence[PromptSamples], path: str) -> dict:
  """Writes `select(samples)` to `path` (atomically); returns counts and mean
  lengths. ValueError, writing nothing, when no prompt has a correct sample."""
  records = select(samples)
  if not records:
    raise ValueError(f"rejection sampling: none of {len(samples)} prompts has a correct "
                     f"sample; nothing to write to {path}")
  kept = [min(l for l, c in zip(s.lengths, s.correct) if c) for s in samples if any(s.correct)]
  sft_data.write_responses(records, path)
  return {"prompts": len(samples), "kept": len(records),
          "kept_tokens_mean": float(np.mean(kept)),
          "sampled_tokens_mean": float(np.mean([l for s in samples for l in s.lengths]))}
