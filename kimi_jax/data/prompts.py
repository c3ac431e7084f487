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

TFDS and seqio sources live in `data/prompt_pipelines.py`; this module
imports neither (nor TensorFlow), except `tf.io.gfile` for "scheme://" paths.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

PROMPT_TYPES = ("math", "code", "multiple_choice", "true_false", "proof")
# Types whose reward compares a final answer with `answer`.
ANSWER_TYPES = ("math", "multiple_choice", "true_false")
FIELDS = ("id", "type", "prompt", "answer", "tests", "difficulty", "tags", "source", "images")
IMAGE_MARKER = "<image>"  # = data.images.IMAGE_MARKER (imported only for image prompts: PIL)
_REQUIRED = ("id", "prompt", "type")
_TEST_KEYS = ("input", "output", "call")


class PromptFileError(ValueError):
  """A prompt that breaks the schema; str() is "<where>: field '<field>': <reason>".

  Attributes: `where` ("path:line", or a description for a Prompt built in
  code), `field` (None for whole-line problems such as bad JSON), `reason`.
  """

  def __init__(self, where: str, reason: str, field: Optional[str] = None):
    self.where, self.reason, self.field = where, reason, field
    at = f"field '{field}': " if field is not None else ""
    super().__init__(f"{where}: {at}{reason}")


def _kind(value: Any) -> str:
  """JSON-ish type name for error messages."""
  if value is None:
    return "null"
  return {str: "string", dict: "object", bool: "bool"}.get(type(value), type(value).__name__)


def _one_edit_apart(a: str, b: str) -> bool:
  """Equal, or one insertion, deletion, substitution or adjacent swap apart."""
  if a == b:
    return True
  if abs(len(a) - len(b)) > 1:
    return False
  i = 0
  while i < min(len(a), len(b)) and a[i] == b[i]:
    i += 1
  if len(a) == len(b):
    swapped = a[i + 1:i + 2] + a[i:i + 1] + a[i + 2:] == b[i:]
    return a[i + 1:] == b[i + 1:] or swapped
  return a[i + 1:] == b[i:] if len(a) > len(b) else a[i:] == b[i + 1:]


def _check_tests(tests: Any, where: str) -> tuple:
  if isinstance(tests, (str, bytes, Mapping)) or not isinstance(tests, (list, tuple)):
    raise PromptFileError(where, f"expected a list of tests, got {_kind(tests)}", "tests")
  checked = []
  for i, test in enumerate(tests):
    field = f"tests[{i}]"
    if not isinstance(test, Mapping):
      raise PromptFileError(where, f"expected an object, got {_kind(test)}", field)
    unknown = sorted(set(test) - set(_TEST_KEYS))
    if unknown:
      raise PromptFileError(where, f"unknown keys {unknown}; a test has {list(_TEST_KEYS)}",
                            field)
    if "output" not in test:
      raise PromptFileError(where, "missing", f"{field}.output")
    if "call" in test and not isinstance(test["call"], str):
      raise PromptFileError(where, f"expected a string, got {_kind(test['call'])}",
                            f"{field}.call")
    if "call" not in test and "input" not in test:
      raise PromptFileError(where, "missing (a stdin test needs 'input'; a call test "
                            "needs 'call')", f"{field}.input")
    if "input" in test and not isinstance(test["input"], str):
      raise PromptFileError(where, f"expected a string, got {_kind(test['input'])}",
                            f"{field}.input")
    if "call" not in test and not isinstance(test["output"], str):
      raise PromptFileError(where, "expected a string (stdout of a stdin test), got "
                            f"{_kind(test['output'])}", f"{field}.output")
    checked.append(dict(test))
  return tuple(checked)


def _check_images(images: Any, text: str, where: str, base_dir: Optional[str]) -> tuple:
  """The image references, relative paths resolved against `base_dir` (the
  files themselves are checked by `_check_image_content`)."""
  if isinstance(images, (str, bytes, Mapping)) or not isinstance(images, (list, tuple)):
    raise PromptFileError(where, f"expected a list of image paths or data URIs, got "
                          f"{_kind(images)}", "images")
  for i, ref in enumerate(images):
    if not isinstance(ref, str) or not ref.strip():
      raise PromptFileError(where, f"expected a path or data URI, got {ref!r}"[:200],
                            f"images[{i}]")
  markers = text.count(IMAGE_MARKER)
  if markers and markers != len(images):
    raise PromptFileError(where, f"{len(images)} images but the prompt has {markers} "
                          f"'{IMAGE_MARKER}' markers (one per image, or none: the images "
                          "then come before the text)", "images")
  if not images or base_dir is None:
    return tuple(images)
  from kimi_jax.data import images as images_lib  # pylint: disable=g-import-not-at-top
  return tuple(images_lib.resolve(ref, base_dir) for ref in images)


def _check_image_content(images: Sequence[str], where: str) -> None:
  """Every image exists and decodes (PromptFileError naming `images[i]`)."""
  if not images:
    return
  from kimi_jax.data import images as images_lib  # pylint: disable=g-import-not-at-top
  for i, ref in enumerate(images):
    try:
      images_lib.load_image(ref)
    except (images_lib.ImageError, FileNotFoundError) as e:
      raise PromptFileError(where, str(e), f"images[{i}]") from None


def _check_fields(obj: Mapping[str, Any], where: str,
                  base_dir: Optional[str] = None) -> dict[str, Any]:
  """Validated, normalised constructor arguments of `Prompt` (tuples, float
  difficulty, image paths joined to `base_dir`)."""
  for key in obj:
    if key not in FIELDS:
      near = [f for f in FIELDS if _one_edit_apart(key.lower(), f)]
      if near:
        raise PromptFileError(where, f"unknown field; did you mean '{near[0]}'?", key)
  for name in _REQUIRED:
    if obj.get(name) is None:
      raise PromptFileError(where, "missing" if name not in obj else "must not be null", name)
  out = {}
  for name in ("id", "prompt", "type", "source"):
    value = obj.get(name, "")
    if not isinstance(value, str):
      raise PromptFileError(where, f"expected a string, got {_kind(value)}", name)
    if name != "source" and not value.strip():
      raise PromptFileError(where, "must not be empty", name)
    out[name] = value
  if out["type"] not in PROMPT_TYPES:
    raise PromptFileError(where, f"unknown type {out['type']!r}; expected one of "
                          f"{list(PROMPT_TYPES)}", "type")
  answer = obj.get("answer")
  if answer is not None and not isinstance(answer, str):
    raise PromptFileError(where, f"expected a string, got {_kind(answer)}", "answer")
  if answer is not None and not answer.strip():
    raise PromptFileError(where, "must not be empty (use null for no answer)", "answer")
  if answer is None and out["type"] in ANSWER_TYPES:
    raise PromptFileError(where, f"missing (required for type {out['type']!r})", "answer")
  out["answer"] = answer
  out["tests"] = _check_tests(obj.get("tests", ()), where)
  if not out["tests"] and out["type"] == "code":
    raise PromptFileError(where, "missing or empty (required for type 'code')", "tests")
  difficulty = obj.get("difficulty")
  if difficulty is not None:
    if isinstance(difficulty, bool) or not isinstance(difficulty, (int, float)):
      raise PromptFileError(where, f"expected a number, got {_kind(difficulty)}", "difficulty")
    try:
      difficulty = float(difficulty)
    except OverflowError:
      difficulty = math.inf
    if not math.isfinite(difficulty):
      raise PromptFileError(where, f"expected a finite number, got {difficulty}", "difficulty")
  out["difficulty"] = difficulty
  tags = obj.get("tags", ())
  if isinstance(tags, str) or not isinstance(tags, (list, tuple)):
    raise PromptFileError(where, f"expected a list of strings, got {_kind(tags)}", "tags")
  for i, tag in enumerate(tags):
    if not isinstance(tag, str) or not tag:
      raise PromptFileError(where, f"expected a non-empty string, got {tag!r}", f"tags[{i}]")
  out["tags"] = tuple(tags)
  out["images"] = _check_images(obj.get("images", ()), out["prompt"], where, base_dir)
  return out


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
    checked = _check_fields(
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
      raise PromptFileError(where, f"expected a JSON object, got {_kind(obj)}")
    fields = _check_fields(obj, where, base_dir)
    _check_image_content(fields["images"], where)
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
