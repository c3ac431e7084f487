"""Held-out evaluation: pass@1 and response length, overall and per difficulty."""
from __future__ import annotations

import collections
from typing import Callable, Sequence

import numpy as np

from kimi_jax.sampling import generate


def evaluate(cfg, params, problems: Sequence, *, encode: Callable[[str], list[int]],
             decode: Callable[[list[int]], str], score: Callable[[object, str], float],
             max_new_tokens: int, eos_id: int, temperature: float = 0.0, samples: int = 1,
             seed: int = 0, batch_size: int = 256) -> dict[str, float]:
  """Sample each problem `samples` times; report mean score and lengths.

  Args:
    problems: objects with `.prompt` (str) and `.difficulty` (int).
    encode / decode: text <-> token ids (decode stops at eos).
    score: (problem, response text) -> 1.0 correct / 0.0 wrong.
    max_new_tokens: response budget per problem.

  Returns:
    `eval/accuracy`, `eval/response_tokens_mean`, and per difficulty d
    `eval/accuracy_d{d}` and `eval/response_tokens_d{d}` (tokens incl. eos).
  """
  acc = collections.defaultdict(list)
  lengths = collections.defaultdict(list)
  prompts = [encode(p.prompt) for p in problems]
  for s in range(samples):
    for lo in range(0, len(problems), batch_size):
      chunk = prompts[lo:lo + batch_size]
      outs = generate(cfg, params, chunk, max_new_tokens, temperature=temperature,
                      seed=seed + 1000 * s + lo, eos_id=eos_id,
                      max_length=max(map(len, chunk)) + max_new_tokens)
      for p, out in zip(problems[lo:lo + batch_size], outs):
        for key in ("all", p.difficulty):
          acc[key].append(score(p, decode(out)))
          lengths[key].append(len(out))
  metrics = {"eval/accuracy": float(np.mean(acc["all"])),
             "eval/response_tokens_mean": float(np.mean(lengths["all"]))}
  for d in sorted(k for k in acc if k != "all"):
    metrics[f"eval/accuracy_d{d}"] = float(np.mean(acc[d]))
    metrics[f"eval/response_tokens_d{d}"] = float(np.mean(lengths[d]))
  return metrics
