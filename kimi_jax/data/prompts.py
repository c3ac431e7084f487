"""Prompt sets: the schema, strict JSONL reading and writing, per-host sharding.

One prompt per line of a JSONL file (UTF-8; blank lines are ignored):

  {"id": "gsm-17", "type": "math", "prompt": "What is 3/4 + 1/4?", "answer": "1",
   "difficulty": 0.3, "tags": ["arithmetic"], "source": "gsm8k"}
  {"id": "cf-12", "type": "code", "prompt": "Read two ints, print their sum.",
   "tests": [{"input": "1 2\\n", "output": "3\\n"}]}

Fields (other keys, such as a worked solution or a subset name, are ignored,
except a key one edit away from a field name, e.g. "anwser" or "tag", which
is an error: a typo must not silently drop a field):
  id          non-empty string, unique in the file
  prompt      non-empty string, the problem text as the model sees it
  type        one of PROMPT_TYPES
  answer      non-empty string or null; required for math, multiple_choice,
              true_false (a number must be quoted: "42", not 42)
  tests       list of tests as `verifiers.code.run_tests` takes them:
              {"input": str, "output": str} or {"call": str, "output": any
              JSON value, "input": str optional}; required, non-empty, for code
  difficulty  finite number or null; larger = harder (a grade label, or
              1 - pass rate as `data.curation` writes it)
  tags        list of strings (domain, discipline, ...), for balancing
  source      string naming where the prompt came from
  images      list of images the prompt shows the model, each a path (relative
              to the JSONL file's directory, or absolute) or an inline
              "data:image/png;base64,..." URI. Every image must exist and
              decode. The text marks where each goes with "<image>"
              (`data.images.IMAGE_MARKER`); with no marker the images come
              before the text, with markers there is one per image.

Errors name file, line (1-based) and field:
  prompts.jsonl:17: field 'answer': expected a string, got int
  prompts.jsonl:18: field 'images[1]': image file /data/img/cat.png does not exist

Reading resolves image paths against the file's directory (a Prompt holds
them resolved); `write_jsonl` writes local paths relative to its output file.

Sharding: `shard(prompts, i, n)` gives host i the prompts at 0-based
positions p with p % n == i, in file order. This is the rule of
`tf.data.Dataset.shard` and of seqio's example-level sharding, so every
source (JSONL, TFDS, seqio) hands each host the same prompts.

The field-by-field checks live in `data/prompt_schema.py` (re-exported here);
TFDS and seqio sources in `data/prompt_pipelines.py`. This module
imports neither (nor TensorFlow), except `tf.io.gfile` for "scheme://" paths.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

from kimi_jax.data.prompt_schema import (  # noqa: F401  (the schema's names live here too)
    ANSWER_TYPES, FIELDS, IMAGE_MARKER, PROMPT_TYPES, PromptFileError, check_fields,
    check_image_content, kind)


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One problem of a prompt set (see the module docstring for the fields).

  Constructing one validates it (lists become tuples, an int difficulty a
  float); a bad value raises PromptFileError. `tests` is a tuple of dicts and
  is left out of hashing, so prompts can key dicts and sets; so are `images`
  (inline data can be large). Built in code, image files are not opened
  (relative paths are relative to the working directory); `from_json` and
  `read_jsonl` check that each exists and decodes.
  """
  id: str
  prompt: str
  type: str
  answer: Optional[str] = None
  tests: tuple = dataclasses.field(default=(), hash=False)  # ({"input": str, "output": str}, ...)
  difficulty: Optional[float] = None
  tags: tuple = ()
  source: str = ""
  images: tuple = dataclasses.field(default=(), hash=False)  # paths / data URIs

  def __post_init__(self):
    where = f"Prompt {self.id!r}" if isinstance(self.id, str) else "Prompt"
    checked = check_fields(
        {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, where)
    for name, value in checked.items():
      object.__setattr__(self, name, value)

  def to_json(self) -> dict[str, Any]:
    """JSON-ready dict in FIELDS order; fields at their defaults are left out."""
    obj = {"id": self.id, "type": self.type, "prompt": self.prompt}
    if self.answer is not None:
      obj["answer"] = self.answer
    if self.tests:
      obj["tests"] = [dict(t) for t in self.tests]
    if self.difficulty is not None:
      obj["difficulty"] = self.difficulty
    if self.tags:
      obj["tags"] = list(self.tags)
    if self.source:
      obj["source"] = self.source
    if self.images:
      obj["images"] = list(self.images)
    return obj

  @classmethod
  def from_json(cls, obj: Any, where: str, base_dir: Optional[str] = None) -> Prompt:
    """The prompt of one parsed JSON value; PromptFileError (naming `where`) if
    invalid. Relative image paths are joined to `base_dir`; images are decoded."""
    if not isinstance(obj, dict):
      raise PromptFileError(where, f"expected a JSON object, got {kind(obj)}")
    fields = check_fields(obj, where, base_dir)
    check_image_content(fields["images"], where)
    return cls(**fields)


@dataclasses.dataclass(frozen=True)
class PromptSet:
  """What `read_jsonl` read: the valid prompts in file order, and what it skipped.

  skipped: number of invalid lines left out (skip_invalid=True only).
  errors: the PromptFileError message of each skipped line.
  """
  prompts: tuple[Prompt, ...]
  skipped: int = 0
  errors: tuple[str, ...] = ()

  def __len__(self) -> int:
    return len(self.prompts)

  def __iter__(self) -> Iterator[Prompt]:
    return iter(self.prompts)


def _is_remote(path: str) -> bool:
  return "://" in path


def _open(path: str, mode: str):
  if _is_remote(path):  # gs:// etc.; TF only for such paths
    from tensorflow.io import gfile  # pylint: disable=g-import-not-at-top
    return gfile.GFile(path, mode)
  return open(path, mode)


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
  obj = {}
  for key, value in pairs:
    if key in obj:
      raise _DuplicateKey(key)
    obj[key] = value
  return obj


class _DuplicateKey(Exception):
  pass


def _parse_line(raw: bytes, where: str, base_dir: Optional[str] = None) -> Optional[Prompt]:
  """The prompt on one line; None for a blank line; PromptFileError if invalid."""
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise PromptFileError(where, f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
  text = text.lstrip("\ufeff")  # a byte-order mark some editors write
  if not text.strip():
    return None
  try:
    obj = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
  except json.JSONDecodeError as e:
    raise PromptFileError(where, f"not valid JSON: {e.msg} (column {e.colno})") from None
  except _DuplicateKey as e:
    raise PromptFileError(where, "appears twice in the object", str(e)) from None
  except RecursionError:
    raise PromptFileError(where, "not valid JSON: nested too deeply") from None
  return Prompt.from_json(obj, where, base_dir)


def read_jsonl(path: Union[str, os.PathLike], *, skip_invalid: bool = False) -> PromptSet:
  """Reads and validates a prompt-set JSONL file.

  Args:
    path: local path, or a "scheme://" path read through tf.io.gfile.
    skip_invalid: False: the first invalid line raises PromptFileError.
      True: invalid lines (bad UTF-8 or JSON, schema errors, duplicate ids)
      are left out and counted in `skipped`, their messages in `errors`.

  Raises:
    FileNotFoundError: no such file.
    PromptFileError: an invalid line (skip_invalid=False), or no valid
      prompt at all (an empty set is never what a run wants).
  """
  path = os.fspath(path)
  if not _is_remote(path) and not os.path.exists(path):
    raise FileNotFoundError(f"prompt file {path} does not exist")
  prompts, errors, first_line = [], [], {}
  base_dir = _dirname(path)
  with _open(path, "rb") as f:
    for line_no, raw in enumerate(f, 1):
      where = f"{path}:{line_no}"
      try:
        prompt = _parse_line(raw, where, base_dir)
        if prompt is None:
          continue
        if prompt.id in first_line:
          raise PromptFileError(where, f"duplicate id {prompt.id!r} (first on line "
                                f"{first_line[prompt.id]})", "id")
      except PromptFileError as e:
        if not skip_invalid:
          raise
        errors.append(str(e))
        continue
      first_line[prompt.id] = line_no
      prompts.append(prompt)
  if not prompts:
    detail = f"; {len(errors)} invalid lines skipped, the first: {errors[0]}" if errors else ""
    raise PromptFileError(path, f"no valid prompts{detail}")
  return PromptSet(tuple(prompts), len(errors), tuple(errors))


def _dirname(path: str) -> str:
  if _is_remote(path):
    return path.rsplit("/", 1)[0]
  return os.path.dirname(os.path.abspath(path))


def write_jsonl(prompts: Iterable[Prompt], path: Union[str, os.PathLike]) -> None:
  """Writes prompts as JSONL, atomically (a temporary file renamed into place).
  Local image paths are written relative to the file's directory.

  Raises ValueError on a duplicate id (the file would not read back).
  """
  path = os.fspath(path)
  out_dir = _dirname(path)
  seen = set()
  lines = []
  for p in prompts:
    if not isinstance(p, Prompt):
      raise TypeError(f"write_jsonl takes Prompt objects, got {type(p).__name__}")
    if p.id in seen:
      raise ValueError(f"write_jsonl {path}: duplicate id {p.id!r}")
    seen.add(p.id)
    obj = p.to_json()
    if p.images:
      from kimi_jax.data import images as images_lib  # pylint: disable=g-import-not-at-top
      obj["images"] = [images_lib.relative(ref, out_dir) for ref in p.images]
    lines.append(json.dumps(obj, ensure_ascii=False) + "\n")
  tmp = f"{path}.tmp-{os.getpid()}"
  with _open(tmp, "wb") as f:
    f.write("".join(lines).encode("utf-8"))
  if _is_remote(path):
    from tensorflow.io import gfile  # pylint: disable=g-import-not-at-top
    gfile.rename(tmp, path, overwrite=True)
  else:
    os.replace(tmp, path)


def shard(prompts: Union[PromptSet, Sequence[Prompt]], process_index: int,
          process_count: int) -> tuple[Prompt, ...]:
  """The prompts of host `process_index` of `process_count`: positions p, p % count == index.

  Deterministic and stable (file order kept); over all hosts every prompt
  appears exactly once; host sizes differ by at most one. A host gets no
  prompt when there are fewer prompts than hosts.
  """
  if isinstance(prompts, PromptSet):
    prompts = prompts.prompts
  if isinstance(process_count, bool) or not isinstance(process_count, int) or process_count < 1:
    raise ValueError(f"process_count must be an int >= 1, got {process_count!r}")
  if (isinstance(process_index, bool) or not isinstance(process_index, int)
      or not 0 <= process_index < process_count):
    raise ValueError(f"process_index must be an int in [0, {process_count}), "
                     f"got {process_index!r}")
  return tuple(prompts[process_index::process_count])
