"""Held-out evaluation: pass@1 and response length, overall and per difficulty.

pass@1 counts a response as correct by `rewards.is_correct` of its verifier
score, the definition the RL reward uses (so a code response passing 3 of 4
tests is wrong here too, whatever `RewardConfig.task_reward` says).
"""
from __future__ import annotations

import collections
from typing import Callable, Optional, Sequence

import numpy as np

from kimi_jax.rl.rewards import apply_verifier, is_correct
from kimi_jax.sampling import generate


def difficulty_bucket(difficulty):
  """The per-difficulty metric bucket: ints as they are (synthetic levels),
  floats to one decimal (a pass-rate difficulty has at most 11 buckets), None
  for unlabelled prompts (no per-difficulty metric)."""
  if difficulty is None or isinstance(difficulty, (int, np.integer)):
    return difficulty
  rounded = round(float(difficulty), 1)
  return int(rounded) if rounded.is_integer() else rounded


def evaluate(cfg, params, problems: Sequence, *, encode: Callable[[str], list[int]],
             decode: Callable[[list[int]], str], score: Callable[[object, str], float],
             max_new_tokens: int, eos_id: int, temperature: float = 0.0, samples: int = 1,
             seed: int = 0, batch_size: int = 256, verifier_workers: int = 1,
             layout=None, images: Optional[Callable[[object], np.ndarray]] = None,
             category: Optional[Callable[[object], str]] = None) -> dict[str, float]:
  """Sample each problem `samples` times; report mean score and lengths.

  Args:
    problems: objects with `.prompt` (str) and `.difficulty` (int, float,
      or None: not in any per-difficulty metric).
    encode / decode: text <-> token ids (decode stops at eos).
    score: (problem, response text) -> verifier score in [0, 1] (1/0, a
      pass fraction for code); correct = `rewards.is_correct(score)`. Run
      through `rewards.apply_verifier`, so a failing verifier scores 0 and is
      counted, never ending the run.
    max_new_tokens: response budget per problem.
    verifier_workers: responses scored in parallel.
    layout: the sampling `parallel.Layout` that `params` are in, or None.
      With several processes every one evaluates every problem (same
      prompts, same seed: the same numbers on each).
    images: image + text problems: problem -> its images float32
      `[n, Y, X, C]` (`sampling.generate`'s `images`).
    category: problem -> task name, for per-task metrics.

  Returns:
    `eval/accuracy`, `eval/response_tokens_mean`, and per difficulty d
    `eval/accuracy_d{d}` and `eval/response_tokens_d{d}` (tokens incl. eos);
    `eval/verifier_errors` when the verifier failed on some response;
    with `category`, `eval/accuracy_task/{name}` and
    `eval/response_tokens_task/{name}` per task.
  """
  acc = collections.defaultdict(list)
  lengths = collections.defaultdict(list)
  prompts = [encode(p.prompt) for p in problems]
  errors = 0
  for s in range(samples):
    for lo in range(0, len(problems), batch_size):
      chunk = prompts[lo:lo + batch_size]
      chunk_problems = problems[lo:lo + batch_size]
      outs = generate(cfg, params, chunk, max_new_tokens, temperature=temperature,
                      seed=seed + 1000 * s + lo, eos_id=eos_id,
                      max_length=max(map(len, chunk)) + max_new_tokens, layout=layout,
                      images=None if images is None else [images(p) for p in chunk_problems])
      scored = apply_verifier(score, chunk_problems, [decode(out) for out in outs],
                              max_workers=verifier_workers)
      errors += sum(scored.errors.values())
      correct = is_correct(scored.rewards).astype(np.float64).tolist()
      for p, out, value in zip(chunk_problems, outs, correct):
        bucket = difficulty_bucket(p.difficulty)
        keys = ("all",) + ((bucket,) if bucket is not None else ())
        if category is not None:
          keys += (("task", category(p)),)
        for key in keys:
          acc[key].append(value)
          lengths[key].append(len(out))
  metrics = {"eval/accuracy": float(np.mean(acc["all"])),
             "eval/response_tokens_mean": float(np.mean(lengths["all"]))}
  for d in sorted(k for k in acc if k != "all" and not isinstance(k, tuple)):
    metrics[f"eval/accuracy_d{d}"] = float(np.mean(acc[d]))
    metrics[f"eval/response_tokens_d{d}"] = float(np.mean(lengths[d]))
  for key in sorted(k for k in acc if isinstance(k, tuple)):
    metrics[f"eval/accuracy_task/{key[1]}"] = float(np.mean(acc[key]))
    metrics[f"eval/response_tokens_task/{key[1]}"] = float(np.mean(lengths[key]))
  if errors:
    metrics["eval/verifier_errors"] = float(errors)
  return metrics
