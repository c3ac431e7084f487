"""n verified samples per prompt: what rejection sampling and DPO start from.

`draw(cfg, params, task, records, n)` samples n responses per prompt with
`kimi_jax.sampling.generate` and scores each with the prompt type's verifier
(`task.score` through `rewards.apply_verifier`, which never raises). A
response that hit `max_new_tokens` without EOS counts as wrong (it has no
final answer), as in the RL rewards.

A samples file is JSONL, one prompt per line:
  {"prompt": str, "record": {the prompt's fields}, "responses": [[ids]] (n),
   "texts": [str] (n), "correct": [bool] (n)}
Lengths are token counts of `responses`, EOS included (as evaluation counts).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np

from kimi_jax.data.prompts import PromptFileError
from kimi_jax.rl import rewards as rewards_lib
from kimi_jax.sampling import generate


@dataclasses.dataclass(frozen=True)
class PromptSamples:
  """The n samples of one prompt. record: the prompt's fields (JSON-able
  dict with at least "prompt"); responses: n token-id lists (EOS included
  when the response finished); texts: their decoded text; correct: n bools."""
  record: dict
  responses: tuple
  texts: tuple
  correct: tuple

  @property
  def prompt(self) -> str:
    return self.record["prompt"]

  @property
  def lengths(self) -> list[int]:
    return [len(r) for r in self.responses]


def record_fields(record: Any) -> dict:
  """The JSON fields of a prompt record: a prompt-set `Prompt` (data/prompts.py)
  or a synthetic `Problem` (data/synthetic.py)."""
  if hasattr(record, "to_json"):
    return record.to_json()
  return dataclasses.asdict(record)


def draw(cfg, params, task, records: Sequence[Any], n: int = 8, *, max_new_tokens: int,
         temperature: float = 1.0, seed: int = 0, batch_size: int = 256,
         layout=None) -> list[PromptSamples]:
  """n samples per record from (cfg, params), verified by `task.score`.

  task: a `kimi_jax.rl.tasks.Task` (encode, decode, eos_id, score,
  verifier_workers). Rows are generated `batch_size` at a time (rounded to
  whole prompts); the draws depend only on `seed` and the order of records.
  """
  if n < 1:
    raise ValueError(f"samples per prompt must be >= 1, got {n}")
  per_chunk = max(1, batch_size // n)
  out = []
  for lo in range(0, len(records), per_chunk):
    chunk = records[lo:lo + per_chunk]
    prompts = [task.encode(r.prompt) for r in chunk for _ in range(n)]
    seqs = generate(cfg, params, prompts, max_new_tokens, temperature=temperature,
                    seed=seed + lo, eos_id=task.eos_id,
                    max_length=max(map(len, prompts)) + max_new_tokens, layout=layout)
    texts = [task.decode(s) for s in seqs]
    flat = [r for r in chunk for _ in range(n)]
    scored = rewards_lib.apply_verifier(task.score, flat, texts,
                                        max_workers=task.verifier_workers)
    finished = [bool(s) and s[-1] == task.eos_id for s in seqs]
    ok = (scored.rewards >= 1.0) & np.asarray(finished)
    for i, r in enumerate(chunk):
      rows = slice(i * n, (i + 1) * n)
      out.append(PromptSamples(record_fields(r), tuple(tuple(s) for s in seqs[rows]),
                               tuple(texts[rows]), tuple(bool(x) for x in ok[rows])))
  return out


def write(samples: Sequence[PromptSamples], path: str) -> None:
  """Writes a samples file atomically."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    for s in samples:
      f.write(json.dumps({"prompt": s.prompt, "record": s.record,
                          "responses": [list(r) for r in s.responses], "texts": list(s.texts),
                          "correct": list(s.correct)}, ensure_ascii=False) + "\n")
  os.replace(tmp, path)


def _field(obj: dict, name: str, kind, where: str):
  if name not in obj:
    raise PromptFileError(where, "missing", name)
  if not isinstance(obj[name], kind):
    raise PromptFileError(where, f"expected {kind.__name__}, got {type(obj[name]).__name__}",
                          name)
  return obj[name]


def read(path: str) -> list[PromptSamples]:
  """Reads a samples file; PromptFileError names file:line:field."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"samples file {path} does not exist")
  out = []
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      where = f"{path}:{line_no}"
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise PromptFileError(where, f"not valid JSON: {e.msg} (column {e.colno})") from None
      if not isinstance(obj, dict):
        raise PromptFileError(where, "expected a JSON object")
      prompt = _field(obj, "prompt", str, where)
      record = dict(_field(obj, "record", dict, where), prompt=prompt)
      responses = _field(obj, "responses", list, where)
      texts = _field(obj, "texts", list, where)
      correct = _field(obj, "correct", list, where)
      if not len(responses) == len(texts) == len(correct):
        raise PromptFileError(where, f"{len(responses)} responses, {len(texts)} texts and "
                              f"{len(correct)} correct flags: one of each per sample")
      for i, r in enumerate(responses):
        if not isinstance(r, list) or not all(isinstance(t, int) for t in r):
          raise PromptFileError(where, "expected a list of token ids", f"responses[{i}]")
      if not all(isinstance(c, bool) for c in correct):
        raise PromptFileError(where, "expected true / false values", "correct")
      out.append(PromptSamples(record, tuple(tuple(r) for r in responses), tuple(texts),
                               tuple(correct)))
  return out
