"""The prompt schema's checks: what `data.prompts` validates, field by field.

`check_fields` turns one JSON object (or a `Prompt`'s constructor arguments)
into validated, normalised fields, or raises `PromptFileError` naming where
and which field; `check_image_content` opens the images. The schema itself
is documented in `data/prompts.py`, which re-exports these names.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

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


def kind(value: Any) -> str:
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
    raise PromptFileError(where, f"expected a list of tests, got {kind(tests)}", "tests")
  checked = []
  for i, test in enumerate(tests):
    field = f"tests[{i}]"
    if not isinstance(test, Mapping):
      raise PromptFileError(where, f"expected an object, got {kind(test)}", field)
    unknown = sorted(set(test) - set(_TEST_KEYS))
    if unknown:
      raise PromptFileError(where, f"unknown keys {unknown}; a test has {list(_TEST_KEYS)}",
                            field)
    if "output" not in test:
      raise PromptFileError(where, "missing", f"{field}.output")
    if "call" in test and not isinstance(test["call"], str):
      raise PromptFileError(where, f"expected a string, got {kind(test['call'])}",
                            f"{field}.call")
    if "call" not in test and "input" not in test:
      raise PromptFileError(where, "missing (a stdin test needs 'input'; a call test "
                            "needs 'call')", f"{field}.input")
    if "input" in test and not isinstance(test["input"], str):
      raise PromptFileError(where, f"expected a string, got {kind(test['input'])}",
                            f"{field}.input")
    if "call" not in test and not isinstance(test["output"], str):
      raise PromptFileError(where, "expected a string (stdout of a stdin test), got "
                            f"{kind(test['output'])}", f"{field}.output")
    checked.append(dict(test))
  return tuple(checked)


def check_images(images: Any, text: str, where: str, base_dir: Optional[str]) -> tuple:
  """The image references, relative paths resolved against `base_dir` (the
  files themselves are checked by `check_image_content`)."""
  if isinstance(images, (str, bytes, Mapping)) or not isinstance(images, (list, tuple)):
    raise PromptFileError(where, f"expected a list of image paths or data URIs, got "
                          f"{kind(images)}", "images")
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


def check_image_content(images: Sequence[str], where: str) -> None:
  """Every image exists and decodes (PromptFileError naming `images[i]`)."""
  if not images:
    return
  from kimi_jax.data import images as images_lib  # pylint: disable=g-import-not-at-top
  for i, ref in enumerate(images):
    try:
      images_lib.load_image(ref)
    except (images_lib.ImageError, FileNotFoundError) as e:
      raise PromptFileError(where, str(e), f"images[{i}]") from None


def check_fields(obj: Mapping[str, Any], where: str,
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
      raise PromptFileError(where, f"expected a string, got {kind(value)}", name)
    if name != "source" and not value.strip():
      raise PromptFileError(where, "must not be empty", name)
    out[name] = value
  if out["type"] not in PROMPT_TYPES:
    raise PromptFileError(where, f"unknown type {out['type']!r}; expected one of "
                          f"{list(PROMPT_TYPES)}", "type")
  answer = obj.get("answer")
  if answer is not None and not isinstance(answer, str):
    raise PromptFileError(where, f"expected a string, got {kind(answer)}", "answer")
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
      raise PromptFileError(where, f"expected a number, got {kind(difficulty)}", "difficulty")
    try:
      difficulty = float(difficulty)
    except OverflowError:
      difficulty = math.inf
    if not math.isfinite(difficulty):
      raise PromptFileError(where, f"expected a finite number, got {difficulty}", "difficulty")
  out["difficulty"] = difficulty
  tags = obj.get("tags", ())
  if isinstance(tags, str) or not isinstance(tags, (list, tuple)):
    raise PromptFileError(where, f"expected a list of strings, got {kind(tags)}", "tags")
  for i, tag in enumerate(tags):
    if not isinstance(tag, str) or not tag:
      raise PromptFileError(where, f"expected a non-empty string, got {tag!r}", f"tags[{i}]")
  out["tags"] = tuple(tags)
  out["images"] = check_images(obj.get("images", ()), out["prompt"], where, base_dir)
  return out
