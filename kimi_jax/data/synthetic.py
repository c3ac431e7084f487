"""Verifiable synthetic reasoning tasks with difficulty levels and CoT traces.

The embedded default data of kimi_jax: problems a byte-level model of a few
million parameters can learn on a CPU in minutes, each with an exact answer,
a long chain of thought (step-by-step work, an occasional slip that is
noticed and corrected at once) and a short one (the answer alone).

Text format (ASCII; one byte = one token in the byte vocabulary):
  prompt    "Q:" + body + "=", at most MAX_PROMPT_BYTES bytes
            add "Q:4738+2916=", chain "Q:3+4*2-5=", countdown "Q:3,4,5 to 17="
  response  long:  steps joined by ";" then ";A:<answer>\\n"
            short: "A:<answer>\\n"
            at most MAX_RESPONSE_BYTES bytes. A response ends with exactly one
            TERMINATOR ("\\n") and holds no other: a sampler may stop on the
            byte "\\n" or on a special EOS id appended after it.
  answer    the text after the last "A:" up to the terminator (`extract_answer`).
  slip      "3+1+1=6 wait 3+1+1=5": a wrong step corrected in place.
  recheck   "8+6=14;c1 r4;check;8+6=14;c1 r4;A:14": the work done twice (its
            second pass clean) before the answer; off unless asked for
            (`recheck_rate`). The long2short comparison's long model learns
            it, as overthinking to trim (report §2.4).

Long responses start with a digit, short ones with "A": the first token picks
the mode, so a warm-up on a mix of both (`sft_response(long_frac=...)`)
leaves RL a visible choice: long CoT is right far more often on hard levels
(the report's "accuracy grows with length").

Splits: a problem is held out iff a hash of (seed, canonical content) falls
in the held-out bucket, so train and held-out never share a problem (also
not "4+3" vs "3+4"), whatever their sizes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import zlib
from typing import Iterable, Optional, Sequence

import numpy as np

from kimi_jax.data.synthetic_tasks import CORRECTION, FAMILIES  # noqa: F401 (CORRECTION re-exported)

PROMPT_TAG = "Q:"
PROMPT_END = "="
ANSWER_TAG = "A:"
TERMINATOR = "\n"
STEP_SEP = ";"
RECHECK = "check"
MAX_PROMPT_BYTES = 32
MAX_RESPONSE_BYTES = 200
_ANSWER_RE = re.compile(r"[0-9+\-*()]+")

TASKS = tuple(FAMILIES)  # ("add", "chain", "countdown")
DEFAULT_TASKS = ("add", "chain")  # exact-match answers; countdown needs `reward`
MAX_DIFFICULTY = {name: f.max_difficulty for name, f in FAMILIES.items()}


@dataclasses.dataclass(frozen=True)
class Problem:
  """One verifiable problem. `id` is derived from (task, prompt)."""
  id: str
  task: str
  prompt: str
  answer: str
  difficulty: int

  @property
  def body(self) -> str:
    """The prompt without "Q:" and the closing "="."""
    return self.prompt[len(PROMPT_TAG):-len(PROMPT_END)]


def _family(task: str):
  if task not in FAMILIES:
    raise ValueError(f"unknown synthetic task {task!r}; known: {', '.join(TASKS)}")
  return FAMILIES[task]


def _problem(task: str, body: str, answer: str, difficulty: int) -> Problem:
  prompt = f"{PROMPT_TAG}{body}{PROMPT_END}"
  digest = hashlib.sha1(f"{task}|{prompt}".encode()).hexdigest()[:12]
  return Problem(f"{task}-{digest}", task, prompt, answer, difficulty)


def make_problem(task: str, rng: np.random.Generator, difficulty: int) -> Problem:
  """Draws one problem of `task` at `difficulty` (1..MAX_DIFFICULTY[task])."""
  family = _family(task)
  if not 1 <= difficulty <= family.max_difficulty:
    raise ValueError(
        f"difficulty of {task!r} must be in 1..{family.max_difficulty}, got {difficulty}")
  body, answer = family.sample(rng, difficulty)
  return _problem(task, body, answer, difficulty)


def canonical_key(problem: Problem) -> str:
  """The problem's content up to notation, whatever its task: equal keys =
  the same problem (add's "Q:3+4=" and chain's "Q:4+3=" share one key)."""
  return _family(problem.task).key(problem.body)


def long_cot(problem: Problem, rng: np.random.Generator, error_rate: float = 0.0,
             recheck_rate: float = 0.0) -> str:
  """Step-by-step trace ending in the right answer.

  Each arithmetic step is independently written wrong with probability
  `error_rate` and corrected right after it (CORRECTION); `rng` draws the
  slips and, for countdown, the failed attempts. With probability
  `recheck_rate` the trace then redoes its work once, without slips,
  after RECHECK (skipped where the result would pass MAX_RESPONSE_BYTES);
  recheck_rate=0 draws nothing more from `rng`.
  """
  tail = f"{ANSWER_TAG}{problem.answer}{TERMINATOR}"
  budget = MAX_RESPONSE_BYTES - len(tail) - len(STEP_SEP)
  family = _family(problem.task)
  segments = family.long(problem.body, problem.answer, rng, error_rate, budget)
  if recheck_rate and rng.random() < recheck_rate:
    again = family.long(problem.body, problem.answer, rng, 0.0, budget)
    checked = segments + [RECHECK] + again
    if len(STEP_SEP.join(checked + [tail])) <= MAX_RESPONSE_BYTES:
      segments = checked
  return STEP_SEP.join(segments + [tail])


def short_cot(problem: Problem) -> str:
  """The answer alone: "A:<answer>\\n"."""
  return f"{ANSWER_TAG}{problem.answer}{TERMINATOR}"


def sft_response(problem: Problem, rng: np.random.Generator, long_frac: float = 1.0,
                 error_rate: float = 0.0, recheck_rate: float = 0.0) -> str:
  """A warm-up target: long CoT with probability `long_frac`, else short CoT."""
  if rng.random() < long_frac:
    return long_cot(problem, rng, error_rate, recheck_rate)
  return short_cot(problem)


def extract_answer(response: str) -> Optional[str]:
  """The final answer: text after the last "A:" before the terminator.

  None when there is no "A:", or what follows it is empty or not made of
  digits, + - * and parentheses (e.g. a trace that goes on after "A:").
  """
  text = response.split(TERMINATOR, 1)[0]
  at = text.rfind(ANSWER_TAG)
  if at < 0:
    return None
  answer = text[at + len(ANSWER_TAG):].strip()
  if not _ANSWER_RE.fullmatch(answer):
    return None
  return answer


def is_correct(problem: Problem, response: str) -> bool:
  """Whether the response's final answer solves the problem (exact for add/chain;
  for countdown any expression using each number once that hits the target)."""
  candidate = extract_answer(response)
  if candidate is None:
    return False
  return _family(problem.task).check(problem.body, problem.answer, candidate)


def reward(problem: Problem, response: str) -> float:
  """1.0 when `is_correct`, else 0.0."""
  return 1.0 if is_correct(problem, response) else 0.0


# ---------------------------------------------------------------- splits

def _is_heldout(seed: int, key: str, heldout_frac: float) -> bool:
  digest = hashlib.sha1(f"{seed}|{key}".encode()).digest()
  return int.from_bytes(digest[:8], "big") < heldout_frac * 2.0 ** 64


def _cells(tasks: Sequence[str], difficulties: Optional[Sequence[int]]) -> list[tuple[str, int]]:
  cells = []
  for task in tasks:
    top = _family(task).max_difficulty
    levels = range(1, top + 1) if difficulties is None else difficulties
    for d in levels:
      if not 1 <= d <= top:
        raise ValueError(f"difficulty of {task!r} must be in 1..{top}, got {d}")
      cells.append((task, int(d)))
  if not cells:
    raise ValueError("make_splits needs at least one task and one difficulty")
  return cells


def _draw_cell(seed: int, task: str, d: int, n: int, heldout: bool,
               heldout_frac: float, seen: set[str]) -> list[Problem]:
  """Up to n problems of one (task, difficulty) on one side of the split whose
  keys are not in `seen` (updated)."""
  rng = np.random.default_rng([seed, zlib.crc32(task.encode()), d, int(heldout)])
  out = []
  for _ in range(50 * n + 200):  # small cells (1-digit add) run out: return fewer
    if len(out) == n:
      break
    problem = make_problem(task, rng, d)
    key = canonical_key(problem)
    if key in seen or _is_heldout(seed, key, heldout_frac) != heldout:
      continue
    seen.add(key)
    out.append(problem)
  return out


def make_splits(seed: int, n_train: int, n_heldout: int,
                difficulties: Optional[Sequence[int]] = None,
                tasks: Sequence[str] = DEFAULT_TASKS,
                heldout_frac: float = 0.2) -> tuple[list[Problem], list[Problem]]:
  """(train, heldout) problems, disjoint by `canonical_key`, deterministic in `seed`.

  The counts are spread evenly over the (task, difficulty) cells; `difficulties`
  None means every level of each task. Within a side no problem repeats, so a
  cell smaller than its share (1-digit add has 55 problems, some shared
  with 1-op chain) yields fewer.
  A key is held out iff its hash with `seed` falls in a bucket of mass
  `heldout_frac`; the held-out set does not depend on `n_train`. Train is
  shuffled; held-out is ordered by task, then difficulty.
  """
  if not 0.0 < heldout_frac < 1.0:
    raise ValueError(f"heldout_frac must be in (0, 1), got {heldout_frac}")
  cells = _cells(tasks, difficulties)

  def shares(n: int) -> list[int]:
    base, extra = divmod(n, len(cells))
    return [base + (i < extra) for i in range(len(cells))]

  train, heldout, seen_train, seen_heldout = [], [], set(), set()
  for (task, d), n_tr, n_ho in zip(cells, shares(n_train), shares(n_heldout)):
    heldout += _draw_cell(seed, task, d, n_ho, True, heldout_frac, seen_heldout)
    train += _draw_cell(seed, task, d, n_tr, False, heldout_frac, seen_train)
  order = np.random.default_rng([seed, 0x5EED]).permutation(len(train))
  return [train[i] for i in order], heldout


# ---------------------------------------------------------------- JSONL

def to_jsonl(problems: Iterable[Problem], path: str | os.PathLike) -> None:
  """Writes the prompt-set records: id, prompt, answer, type, difficulty, tags,
  source="synthetic", task."""
  with open(path, "w") as f:
    for p in problems:
      f.write(json.dumps({
          "id": p.id, "prompt": p.prompt, "answer": p.answer,
          "type": FAMILIES[p.task].answer_type, "difficulty": p.difficulty,
          "tags": [p.task, f"difficulty:{p.difficulty}"], "source": "synthetic",
          "task": p.task,
      }) + "\n")


def from_jsonl(path: str | os.PathLike) -> list[Problem]:
  """Reads `to_jsonl` output back; a bad record raises naming file, line and field."""
  problems = []
  with open(path) as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{os.fspath(path)}:{lineno}"
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
      if not isinstance(record, dict):
        raise ValueError(f"{where}: a record must be a JSON object")
      for field, kind in (("id", str), ("task", str), ("prompt", str), ("answer", str),
                          ("difficulty", int)):
        if not isinstance(record.get(field), kind):
          raise ValueError(f"{where}: field {field!r} must be a {kind.__name__}, "
                           f"got {record.get(field)!r}")
      if record["task"] not in FAMILIES:
        raise ValueError(f"{where}: field 'task' must be one of {TASKS}, got {record['task']!r}")
      prompt = record["prompt"]
      if not (prompt.startswith(PROMPT_TAG) and prompt.endswith(PROMPT_END)):
        raise ValueError(f"{where}: field 'prompt' must look like 'Q:...=', got {prompt!r}")
      problems.append(Problem(record["id"], record["task"], prompt, record["answer"],
                              record["difficulty"]))
  return problems
