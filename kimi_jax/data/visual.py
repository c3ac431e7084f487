"""Synthetic visual reasoning tasks: rendered scenes, exact answers, CoT traces.

The image counterpart of `data/synthetic.py` (report §2.3.5: synthetic
visual reasoning and text rendered as images), sized for a tiny ViT with 8 px
patches on a CPU: 32 x 32 RGB images, 16 patches. Families
(`data/visual_tasks.py`), each with graded levels:
  count     "count red" / "count red dot": objects of a colour (and shape)
  compare   "more red or blue": which colour has more objects
  spatial   "red dot vs blue box": left / right / above / below
  bars      "tallest bar": 1-based index of the tallest bar of a bar chart
  arith     "calc": arithmetic written in pixels, e.g. "47+38" or a column sum
Level 1 puts every object inside one patch with few objects; higher levels
add objects, distractors, and place things across patch borders.

Text format (ASCII; one byte = one token in the byte vocabulary):
  prompt    IMAGE_MARKER + "Q:" + body + "=", e.g. "<image>Q:count red="
  response  long:  steps joined by ";" then ";A:<answer>\\n": the scene read
                   a row of patches at a time with running totals
                   ("r1+0=0;r2+1=1;r3+2=3;r4+0=3;A:3"), named objects located
                   ("red dot r3c2;blue box r3c1;c2>c1;A:right"), bars read left
                   to right, or the pixels transcribed ("see 47+38") and then
                   worked as `data/synthetic.py` works the arithmetic
            short: "A:<answer>\\n"
  answer    lowercase letters and digits ("3", "red", "left").
A long trace never starts with "A" (it starts reading the scene): as in
`data/synthetic.py`, the first token picks long or short mode.

Tokens: `encode_prompt` turns the marker into `tokens_per_image` copies of
IMAGE_TOKEN_ID, the first id after seqio's byte vocabulary (VOCAB_SIZE ids
in all).

Splits: a problem is held out iff a hash of (seed, task, body, scene) falls
in the held-out bucket, so train and held-out never share a problem.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import zlib
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from kimi_jax.data import images as images_lib
from kimi_jax.data.synthetic import MAX_RESPONSE_BYTES, STEP_SEP, TERMINATOR
from kimi_jax.data.visual_tasks import FAMILIES, IMAGE_SIZE, render
from kimi_jax.tokenizers import byte_encode

PROMPT_TAG = "Q:"
PROMPT_END = "="
ANSWER_TAG = "A:"
IMAGE_MARKER = images_lib.IMAGE_MARKER
IMAGE_TOKEN_ID = 259  # seqio.ByteVocabulary: pad 0, eos 1, unk 2, bytes 3..258
VOCAB_SIZE = 260
TASKS = tuple(FAMILIES)
MAX_DIFFICULTY = {name: f.max_difficulty for name, f in FAMILIES.items()}
_ANSWER_RE = re.compile(r"[a-z0-9]+")


@dataclasses.dataclass(frozen=True)
class VisualProblem:
  """One problem. `scene` (JSON text) fixes the image; `id` derives from
  (task, prompt, scene)."""
  id: str
  task: str
  prompt: str
  answer: str
  difficulty: int
  scene: str

  @property
  def body(self) -> str:
    """The question: the prompt without marker, "Q:" and the closing "="."""
    return self.prompt[len(IMAGE_MARKER) + len(PROMPT_TAG):-len(PROMPT_END)]

  @property
  def scene_dict(self) -> dict:
    return json.loads(self.scene)

  def image(self) -> np.ndarray:
    """uint8 `[IMAGE_SIZE, IMAGE_SIZE, 3]`, rendered from the scene."""
    return render(self.scene_dict)


def _family(task: str):
  if task not in FAMILIES:
    raise ValueError(f"unknown visual task {task!r}; known: {', '.join(TASKS)}")
  return FAMILIES[task]


def _problem(task: str, body: str, scene: dict, difficulty: int) -> VisualProblem:
  prompt = f"{IMAGE_MARKER}{PROMPT_TAG}{body}{PROMPT_END}"
  scene_text = json.dumps(scene, separators=(",", ":"), sort_keys=True)
  digest = hashlib.sha1(f"{task}|{prompt}|{scene_text}".encode()).hexdigest()[:12]
  return VisualProblem(f"{task}-{digest}", task, prompt, _family(task).answer(body, scene),
                       difficulty, scene_text)


def make_problem(task: str, rng: np.random.Generator, difficulty: int) -> VisualProblem:
  """Draws one problem of `task` at `difficulty` (1..MAX_DIFFICULTY[task])."""
  family = _family(task)
  if not 1 <= difficulty <= family.max_difficulty:
    raise ValueError(
        f"difficulty of {task!r} must be in 1..{family.max_difficulty}, got {difficulty}")
  body, scene = family.sample(rng, difficulty)
  return _problem(task, body, scene, difficulty)


def long_cot(problem: VisualProblem, rng: np.random.Generator, error_rate: float = 0.0) -> str:
  """Step-by-step trace ending in the right answer; each counting or
  arithmetic step slips (and is corrected at once) with probability `error_rate`."""
  tail = f"{ANSWER_TAG}{problem.answer}{TERMINATOR}"
  family = _family(problem.task)
  trace = STEP_SEP.join(family.long(problem.body, problem.scene_dict, rng, error_rate) + [tail])
  if len(trace) > MAX_RESPONSE_BYTES:  # slips made it too long: the clean trace fits
    trace = STEP_SEP.join(family.long(problem.body, problem.scene_dict, rng, 0.0) + [tail])
  return trace


def short_cot(problem: VisualProblem) -> str:
  """The answer alone: "A:<answer>\\n"."""
  return f"{ANSWER_TAG}{problem.answer}{TERMINATOR}"


def sft_response(problem: VisualProblem, rng: np.random.Generator, long_frac: float = 1.0,
                 error_rate: float = 0.0) -> str:
  """A warm-up target: long CoT with probability `long_frac`, else short CoT."""
  if rng.random() < long_frac:
    return long_cot(problem, rng, error_rate)
  return short_cot(problem)


def extract_answer(response: str) -> Optional[str]:
  """Text after the last "A:" before the terminator; None if absent or not
  lowercase letters and digits."""
  text = response.split(TERMINATOR, 1)[0]
  at = text.rfind(ANSWER_TAG)
  if at < 0:
    return None
  answer = text[at + len(ANSWER_TAG):].strip()
  return answer if _ANSWER_RE.fullmatch(answer) else None


def is_correct(problem: VisualProblem, response: str) -> bool:
  return extract_answer(response) == problem.answer


def reward(problem: VisualProblem, response: str) -> float:
  """1.0 when the final answer equals the problem's, else 0.0."""
  return 1.0 if is_correct(problem, response) else 0.0


def encode_prompt(problem: VisualProblem, tokens_per_image: int) -> list[int]:
  """Byte-vocabulary ids of the prompt, the image as `tokens_per_image`
  IMAGE_TOKEN_ID placeholders."""
  return images_lib.encode_with_images(byte_encode, problem.prompt, 1, tokens_per_image,
                                       IMAGE_TOKEN_ID)


# ---------------------------------------------------------------- splits


def _is_heldout(seed: int, key: str, heldout_frac: float) -> bool:
  digest = hashlib.sha1(f"{seed}|{key}".encode()).digest()
  return int.from_bytes(digest[:8], "big") < heldout_frac * 2.0 ** 64


def make_splits(seed: int, n_train: int, n_heldout: int,
                difficulties: Optional[Sequence[int]] = None,
                tasks: Sequence[str] = TASKS, heldout_frac: float = 0.2
                ) -> tuple[list[VisualProblem], list[VisualProblem]]:
  """(train, heldout), disjoint, deterministic in `seed`; counts spread evenly
  over the (task, difficulty) cells (`difficulties` None: every level of each
  task, levels above a task's maximum skipped). Train is shuffled; held-out
  is ordered by task, then difficulty."""
  if not 0.0 < heldout_frac < 1.0:
    raise ValueError(f"heldout_frac must be in (0, 1), got {heldout_frac}")
  cells = _cells(tasks, difficulties)
  train, heldout = [], []
  # Ids are unique over the whole split: two levels of a task can draw the
  # same scene and question (a prompt sampler keys its statistics by id).
  taken = set()
  for (task, d), n_tr, n_ho in zip(cells, _shares(n_train, cells), _shares(n_heldout, cells)):
    for side, n, out in ((True, n_ho, heldout), (False, n_tr, train)):
      _draw(out, taken, n, seed, task, d, stream=int(side),
            keep=lambda p, side=side: _is_heldout(seed, p.id, heldout_frac) == side)
  order = np.random.default_rng([seed, 0x5EED]).permutation(len(train))
  return [train[i] for i in order], heldout


def make_warmup_problems(seed: int, n: int, exclude: Iterable[VisualProblem],
                         difficulties: Optional[Sequence[int]] = None,
                         tasks: Sequence[str] = TASKS, heldout_frac: float = 0.2
                         ) -> list[VisualProblem]:
  """`n` problems for an SFT warm-up, apart from both splits of `make_splits`
  with the same arguments: never held out (the same hash rule) and never one
  of `exclude` (the RL train prompts), spread over the cells like the train
  split, shuffled (fewer when a small cell, such as two bars, runs out of
  distinct problems). Procedural tasks make fresh problems free, and a warm-up
  that cycles over the RL prompts memorises their answers: RL then rewards
  recalled answers, which held-out prompts do not share."""
  if not 0.0 < heldout_frac < 1.0:
    raise ValueError(f"heldout_frac must be in (0, 1), got {heldout_frac}")
  cells = _cells(tasks, difficulties)
  out: list[VisualProblem] = []
  taken = {p.id for p in exclude}
  for (task, d), k in zip(cells, _shares(n, cells)):
    _draw(out, taken, k, seed, task, d, stream=2,
          keep=lambda p: not _is_heldout(seed, p.id, heldout_frac))
  order = np.random.default_rng([seed, 0x3A1]).permutation(len(out))
  return [out[i] for i in order]


def _cells(tasks: Sequence[str], difficulties: Optional[Sequence[int]]) -> list[tuple[str, int]]:
  """(task, level) pairs to draw from; levels above a task's maximum skipped."""
  cells = []
  for task in tasks:
    top = _family(task).max_difficulty
    levels = range(1, top + 1) if difficulties is None else [d for d in difficulties if d <= top]
    for d in levels:
      if d < 1:
        raise ValueError(f"difficulty must be >= 1, got {d}")
      cells.append((task, int(d)))
  if not cells:
    raise ValueError("visual problems need at least one task and one difficulty")
  return cells


def _shares(n: int, cells: Sequence) -> list[int]:
  base, extra = divmod(n, len(cells))
  return [base + (i < extra) for i in range(len(cells))]


def _draw(out: list, taken: set, n: int, seed: int, task: str, d: int, stream: int,
          keep: Callable[[VisualProblem], bool]) -> None:
  """Appends up to `n` new problems of (task, d) that `keep` accepts, from
  the random stream (seed, task, d, stream); ids go into `taken`."""
  rng = np.random.default_rng([seed, zlib.crc32(task.encode()), d, stream])
  got = 0
  for _ in range(50 * n + 200):  # tiny cells (2 bars) run out: return fewer
    if got == n:
      break
    p = make_problem(task, rng, d)
    if p.id not in taken and keep(p):
      taken.add(p.id)
      out.append(p)
      got += 1


# ---------------------------------------------------------------- files


def to_jsonl(problems: Iterable[VisualProblem], path: str | os.PathLike,
             image_dir: str = "images") -> None:
  """A prompt-set file (`data/prompts.py` schema) with each image as a PNG in
  `image_dir` (relative to the file); extra keys task and scene let
  `from_jsonl` rebuild the problems."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  root = os.path.join(os.path.dirname(os.path.abspath(path)), image_dir)
  os.makedirs(root, exist_ok=True)
  with open(path, "w") as f:
    for p in problems:
      Image.fromarray(p.image()).save(os.path.join(root, f"{p.id}.png"))
      f.write(json.dumps({
          "id": p.id, "prompt": p.prompt, "answer": p.answer,
          "type": FAMILIES[p.task].answer_type, "difficulty": p.difficulty,
          "tags": [p.task, f"difficulty:{p.difficulty}"], "source": "synthetic_visual",
          "images": [f"{image_dir}/{p.id}.png"], "task": p.task, "scene": p.scene}) + "\n")


def from_jsonl(path: str | os.PathLike) -> list[VisualProblem]:
  """Reads `to_jsonl` output back, re-deriving each answer from its scene; a
  bad record raises naming file, line and field."""
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
      for field, kind in (("task", str), ("prompt", str), ("answer", str), ("difficulty", int),
                          ("scene", str)):
        if not isinstance(record.get(field), kind):
          raise ValueError(f"{where}: field {field!r} must be a {kind.__name__}, "
                           f"got {record.get(field)!r}")
      if record["task"] not in FAMILIES:
        raise ValueError(f"{where}: field 'task' must be one of {TASKS}, got {record['task']!r}")
      prompt = record["prompt"]
      head = IMAGE_MARKER + PROMPT_TAG
      if not (prompt.startswith(head) and prompt.endswith(PROMPT_END)):
        raise ValueError(f"{where}: field 'prompt' must look like '{head}...=', got {prompt!r}")
      try:
        p = _problem(record["task"], prompt[len(head):-len(PROMPT_END)],
                     json.loads(record["scene"]), record["difficulty"])
      except (ValueError, KeyError, TypeError, IndexError) as e:
        raise ValueError(f"{where}: field 'scene' does not fit the task: {e!r}") from None
      if p.answer != record["answer"]:
        raise ValueError(f"{where}: field 'answer' is {record['answer']!r} but the scene "
                         f"gives {p.answer!r}")
      problems.append(p)
  return problems


__all__ = ["IMAGE_SIZE", "IMAGE_TOKEN_ID", "VOCAB_SIZE", "TASKS", "VisualProblem",
           "make_problem", "long_cot", "short_cot", "sft_response", "extract_answer",
           "is_correct", "reward", "encode_prompt", "make_splits", "make_warmup_problems",
           "to_jsonl", "from_jsonl"]
