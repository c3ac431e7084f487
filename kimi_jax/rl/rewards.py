"""Rewards on the host: verifier calls, correctness, length penalty, final reward.

Axis legend: G prompts (groups), K samples per prompt, B flat batch.

Everything here is numpy: verifiers run on the host, and the result is a
`[G, K]` float32 array that goes into the train batch. Pipeline:

  scores_B, errors = apply_verifier(verify, records, responses)   # never raises
  total_GK, parts = total_reward(scores_B.reshape(G, K), lengths_GK, finish_GK,
                                 iteration, cfg, return_parts=True)

Correctness has one definition, `is_correct(score)`: the verifier's full
marks (an equivalent answer; every test passed for code). The task reward
(`RewardConfig.task_reward`), the length penalty, the prompt sampler's
success rate (`parts["correct"]`) and held-out evaluation all use it. In
rollouts a response cut before a natural stop is, in addition, scored as
having no answer (`RewardConfig.truncated_reward`).

The group baseline (mean of the K final rewards) is taken later, from
`total_GK`, by `losses.group_advantages` (rl/batch.py).
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import math
import numbers
import re
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import numpy as np

from kimi_jax.sampling.finish import FinishReason, TRUNCATED, as_finish_codes

_LOG = logging.getLogger(__name__)


TASK_REWARDS = ("binary", "fraction")
FULL_MARKS = 1.0  # a verifier score at least this is a correct response


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """How the final reward is assembled (report §2.3.3, impl. notes 6 and 8).

  task_reward: 'binary' (default): 1 for a correct response (`is_correct`),
    else 0, as in the report (code passes ALL its tests). 'fraction': the
    verifier's score itself (e.g. the fraction of code tests passed: partial
    credit). Correctness, and so the length penalty and the prompt
    sampler's statistic, is the same in both.
  length_penalty_weight: w_len >= 0, weight of the length reward once on
    (toy 0.2; the report gives no value).
  length_penalty_start: first iteration with the length reward on (warm-up:
    weight 0 before it; e.g. ~25% of total_iterations). 0 = on from the
    start (long2short RL).
  truncated_reward: task reward given to responses cut before a natural stop
    (finish BUDGET, MAX_LENGTH, MAX_AGE or REPEAT): they are scored as having
    no answer (not correct). None keeps the verifier's score for them.
  repeat_penalty: >= 0, subtracted (on top) from responses stopped by the
    repeat detector (toy 0.5).
  """
  task_reward: str = "binary"
  length_penalty_weight: float = 0.0
  length_penalty_start: int = 0
  truncated_reward: Optional[float] = 0.0
  repeat_penalty: float = 0.0

  def __post_init__(self):
    if self.task_reward not in TASK_REWARDS:
      raise ValueError(f"RewardConfig.task_reward must be one of {TASK_REWARDS}, got "
                       f"{self.task_reward!r}")
    _check_number("length_penalty_weight", self.length_penalty_weight, lo=0.0)
    if (not isinstance(self.length_penalty_start, numbers.Integral)
        or isinstance(self.length_penalty_start, bool)
        or self.length_penalty_start < 0):
      raise ValueError("RewardConfig.length_penalty_start must be an int >= 0, "
                       f"got {self.length_penalty_start!r}")
    if self.truncated_reward is not None:
      _check_number("truncated_reward", self.truncated_reward)
    _check_number("repeat_penalty", self.repeat_penalty, lo=0.0)


def is_correct(scores) -> np.ndarray:
  """bool, same shape: the verifier gave full marks (`FULL_MARKS`).

  THE definition of a correct response, for rewards, the length penalty, the
  prompt sampler and evaluation. Verifier scores lie in [0, 1]: 1/0 for
  math and exact answers, the fraction of tests passed for code.
  """
  return np.asarray(scores, np.float64) >= FULL_MARKS


def _check_number(field: str, value: Any, lo: Optional[float] = None) -> None:
  ok = (isinstance(value, numbers.Real) and not isinstance(value, bool)
        and math.isfinite(value))
  if ok and lo is not None:
    ok = value >= lo
  if not ok:
    bound = f" >= {lo}" if lo is not None else ""
    raise ValueError(f"RewardConfig.{field} must be a finite number{bound}, "
                     f"got {value!r}")


# ------------------------------------------------------------ length penalty


def length_penalty(lengths_GK, correct_GK) -> np.ndarray:
  """Length reward of report §2.3.3, per group of K samples. float32 [G, K].

  lambda_i = 0.5 - (len_i - min_len) / (max_len - min_len), min/max over the
  sample's group; all 0 for a group whose lengths are all equal. A correct
  sample gets lambda_i, a wrong one min(0, lambda_i) (short wrong answers are
  not rewarded). Values lie in [-0.5, 0.5].
  """
  lengths_GK = np.asarray(lengths_GK, np.float64)
  correct_GK = np.asarray(correct_GK, bool)
  if lengths_GK.ndim != 2 or lengths_GK.shape[1] == 0:
    raise ValueError(f"lengths_GK must be [G, K] with K >= 1, got shape "
                     f"{lengths_GK.shape}")
  if correct_GK.shape != lengths_GK.shape:
    raise ValueError(f"correct_GK has shape {correct_GK.shape} but lengths_GK "
                     f"has shape {lengths_GK.shape}")
  if not np.all(np.isfinite(lengths_GK)) or np.any(lengths_GK < 0):
    raise ValueError("lengths_GK must be finite and >= 0")
  min_G1 = lengths_GK.min(axis=1, keepdims=True)
  span_G1 = lengths_GK.max(axis=1, keepdims=True) - min_G1
  safe_span_G1 = np.where(span_G1 > 0, span_G1, 1.0)
  lam_GK = np.where(span_G1 > 0, 0.5 - (lengths_GK - min_G1) / safe_span_G1,
                    0.0)
  return np.where(correct_GK, lam_GK, np.minimum(0.0, lam_GK)).astype(
      np.float32)


def length_penalty_weight(iteration: int, cfg: RewardConfig) -> float:
  """Warm-up schedule: 0 before `cfg.length_penalty_start`, then constant."""
  if iteration < cfg.length_penalty_start:
    return 0.0
  return float(cfg.length_penalty_weight)


# -------------------------------------------------------------- final reward


def total_reward(scores_GK, lengths_GK, finish_reason_GK, iteration: int,
                 cfg: RewardConfig, *, return_parts: bool = False):
  """Final reward float32 [G, K] = task + w_len(iteration) * len_reward
  - repeat_penalty * [finish == REPEAT].

  scores_GK: verifier scores in [0, 1] (`apply_verifier`).
  lengths_GK: response lengths in tokens (all segments).
  finish_reason_GK: `FinishReason` codes or names; must be final (RUNNING is
    an error: an unfinished trajectory cannot be scored).
  correct = `is_correct(score)`, and not cut (truncated / repeat-stopped)
  unless `cfg.truncated_reward` is None. task = correct as 0/1 ('binary') or
  the score ('fraction'), with cut responses given `cfg.truncated_reward`.
  The length penalty ranks by correctness.

  Returns total_GK, or (total_GK, parts) with parts a dict of float32 [G, K]
  arrays 'task', 'length', 'repeat', the bool [G, K] 'correct' and the
  scalar 'length_weight'.
  """
  scores_GK = np.asarray(scores_GK, np.float64)
  if scores_GK.ndim != 2:
    raise ValueError(f"scores_GK must be [G, K], got shape {scores_GK.shape}")
  finish_GK = as_finish_codes(finish_reason_GK)
  if finish_GK.shape != scores_GK.shape:
    raise ValueError(f"finish_reason_GK has shape {finish_GK.shape} but "
                     f"scores_GK has shape {scores_GK.shape}")
  if np.any(finish_GK == FinishReason.RUNNING):
    raise ValueError("total_reward: some trajectories are still RUNNING; "
                     "only finished groups can be scored")
  if not np.all(np.isfinite(scores_GK)):
    raise ValueError("scores_GK must be finite (apply_verifier maps "
                     "verifier failures to 0)")
  repeat_GK = finish_GK == FinishReason.REPEAT
  cut_GK = np.isin(finish_GK, [int(r) for r in TRUNCATED]) | repeat_GK
  correct_GK = is_correct(scores_GK)
  task_GK = correct_GK.astype(np.float64) if cfg.task_reward == "binary" else scores_GK
  if cfg.truncated_reward is not None:
    correct_GK = correct_GK & ~cut_GK
    task_GK = np.where(cut_GK, float(cfg.truncated_reward), task_GK)
  length_GK = length_penalty(lengths_GK, correct_GK).astype(np.float64)
  if length_GK.shape != task_GK.shape:
    raise ValueError(f"lengths_GK has shape {length_GK.shape} but "
                     f"scores_GK has shape {task_GK.shape}")
  weight = length_penalty_weight(iteration, cfg)
  repeat_pen_GK = -float(cfg.repeat_penalty) * repeat_GK
  total_GK = (task_GK + weight * length_GK + repeat_pen_GK).astype(np.float32)
  if not return_parts:
    return total_GK
  parts = {
      "task": task_GK.astype(np.float32),
      "correct": correct_GK,
      "length": length_GK.astype(np.float32),
      "repeat": repeat_pen_GK.astype(np.float32),
      "length_weight": weight,
  }
  return total_GK, parts


# ---------------------------------------------------------------- verifiers


class VerifierOutcome(NamedTuple):
  """rewards: float32 [B]; errors: reason -> count (empty when all fine)."""
  rewards: np.ndarray
  errors: dict


Verifier = Callable[[Any, str], float]


def _score_one(verifier: Verifier, record: Any, response: str):
  """(reward, None, None) or (0.0, reason, detail); never raises but KeyboardInterrupt."""
  try:
    value = verifier(record, response)
  except KeyboardInterrupt:
    raise
  except BaseException as e:  # pylint: disable=broad-except
    # BaseException: a verifier calling sys.exit must not end the trainer.
    return 0.0, f"exception:{type(e).__name__}", repr(e)[:500]
  if not isinstance(value, (numbers.Real, np.bool_)):
    return 0.0, "non_numeric", f"returned {type(value).__name__}"
  value = float(value)
  if not math.isfinite(value):
    return 0.0, "non_finite", f"returned {value}"
  return value, None, None


def apply_verifier(verifier: Verifier, prompt_records: Sequence[Any],
                   responses: Sequence[str], *,
                   max_logged_per_reason: int = 3,
                   max_workers: int = 1) -> VerifierOutcome:
  """Scores B responses with `verifier(prompt_record, response_text)`.

  Never raises because of the verifier: an exception, a non-numeric result
  (anything but a real number or bool) or a non-finite number becomes
  reward 0 and is counted under a reason ('exception:<Type>', 'non_numeric',
  'non_finite'); the first `max_logged_per_reason` of each reason per call
  are logged with their index, prompt id and message. Only KeyboardInterrupt
  passes through. A length mismatch between records and responses is the
  caller's bug and raises ValueError.

  max_workers > 1 scores in a thread pool: for verifiers that wait on a
  subprocess (the code sandbox, the math worker). The result is the same as
  sequential scoring (each reward lands at its index).
  """
  if len(prompt_records) != len(responses):
    raise ValueError(f"apply_verifier: {len(prompt_records)} prompt records "
                     f"but {len(responses)} responses")
  pairs = list(zip(prompt_records, responses))
  if max_workers > 1 and len(pairs) > 1:
    with concurrent.futures.ThreadPoolExecutor(min(max_workers, len(pairs))) as pool:
      scored = list(pool.map(lambda rr: _score_one(verifier, *rr), pairs))
  else:
    scored = [_score_one(verifier, record, response) for record, response in pairs]
  rewards_B = np.zeros(len(responses), np.float32)
  errors = collections.Counter()
  for i, (value, reason, detail) in enumerate(scored):
    if reason is None:
      rewards_B[i] = value
      continue
    errors[reason] += 1
    if errors[reason] <= max_logged_per_reason:
      record = prompt_records[i]
      pid = record.get("id") if isinstance(record, Mapping) else getattr(record, "id", None)
      _LOG.warning("verifier failed on sample %d (prompt id %r): %s: %s", i,
                   pid, reason, detail)
  return VerifierOutcome(rewards_B, dict(errors))


# ------------------------------------------------- verifiers by prompt type

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.S)


def extract_code(response: str) -> str:
  """The program in a response: the last fenced block tagged python (or
  py / python3), else the last fenced block, else the whole response."""
  blocks = _FENCE.findall(response)
  tagged = [body for lang, body in blocks if lang.lower() in ("python", "py", "python3")]
  if tagged:
    return tagged[-1]
  return blocks[-1][1] if blocks else response


def _choice(text: str) -> str:
  """"(B)." / "**b**" / "True" -> "b" / "b" / "true": the label alone, casefolded."""
  return " ".join(text.split()).strip("()[]{}*.:$ ").casefold()


@dataclasses.dataclass(frozen=True)
class PromptVerifier:
  """The reward of a response to a `data.prompts.Prompt`, by its type.

    math             1/0: `verifiers.math.verify` (math-verify equivalence)
    code             passed / total tests of `verifiers.code.run_tests` on
                     the response's program (`extract_code`); correct
                     (`is_correct`) only when all pass
    multiple_choice, true_false
                     1/0: the final answer (\\boxed{}, "answer is ...")
                     equals `answer` up to case, spaces and brackets
    proof            no verifier: raises (counted by `apply_verifier`);
                     curation drops proofs (report §2.1)
  Verifier timeouts and sandbox failures are reward 0 (the verifiers never
  raise on a response).
  """
  math_timeout_s: float = 5.0
  code_timeout_s: float = 5.0

  def __call__(self, prompt, response: str) -> float:
    kind = prompt.type
    if kind == "math":
      from kimi_jax.verifiers import math as math_verifier  # pylint: disable=g-import-not-at-top
      return float(math_verifier.verify(response, prompt.answer, self.math_timeout_s))
    if kind == "code":
      from kimi_jax.verifiers import code  # pylint: disable=g-import-not-at-top
      result = code.run_tests(extract_code(response), list(prompt.tests), self.code_timeout_s)
      return result.passed / result.total
    if kind in ("multiple_choice", "true_false"):
      from kimi_jax.verifiers import exact  # pylint: disable=g-import-not-at-top
      answer = exact.extract_final(response)
      return float(answer is not None and _choice(answer) == _choice(prompt.answer))
    raise ValueError(f"prompt {prompt.id!r}: no verifier for type {kind!r}")
