"""Files of `python -m launch.testgen`: code problems in, a prompt set and a report out.

Input, one problem per line (JSONL, UTF-8; blank lines ignored):

  {"id": "cf-12", "prompt": "Read two ints, print their sum.",
   "references": ["a, b = map(int, input().split())\\nprint(a + b)\\n", ...],
   "generator": "import random\\ndef generate(seed):\\n  r = random.Random(seed)\\n  ...",
   "difficulty": 0.3, "tags": ["arith"], "source": "codeforces"}

  id, prompt   non-empty strings (id unique in the file)
  references   non-empty list of Python programs (stdin -> stdout) believed correct
  generator    Python source defining generate(seed) -> str (an input)
  difficulty, tags, source: optional, carried into the prompt set.

Output, in the directory given:
  prompts.jsonl   kept problems as prompt-set lines (data/prompts.py schema,
                  type "code", the generated stdin/stdout tests), ready for
                  config.data.train_file or launch.curate
  report.jsonl    one line per problem: id, kept, reason and counts
                  (testgen.GeneratedTests.summary)
  report.md       the same as a table
  results.jsonl   the journal: one line per finished problem (with its
                  tests), so a rerun of the same command skips them

Errors in the input name file, line and field (`TestGenInputError`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Optional

from kimi_jax.data import prompts as prompts_lib

RESULTS_FILE, REPORT_FILE, REPORT_MD, PROMPTS_FILE = (
    "results.jsonl", "report.jsonl", "report.md", "prompts.jsonl")
_CARRIED = ("difficulty", "tags", "source")
_FIELDS = ("id", "prompt", "references", "generator") + _CARRIED


class TestGenInputError(ValueError):
  """A problem line or output directory that cannot be used; the message names it."""
  __test__ = False  # not a pytest test class, despite the name


@dataclasses.dataclass(frozen=True)
class Problem:
  """One input line."""
  id: str
  prompt: str
  references: tuple[str, ...]
  generator: str
  extra: dict  # difficulty / tags / source, as given

  def to_prompt(self, tests) -> prompts_lib.Prompt:
    return prompts_lib.Prompt(id=self.id, prompt=self.prompt, type="code", tests=tuple(tests),
                              **self.extra)


def _problem(obj: Any, where: str) -> Problem:
  def bad(field, reason):
    return TestGenInputError(f"{where}: field {field!r}: {reason}" if field
                             else f"{where}: {reason}")

  if not isinstance(obj, dict):
    raise bad(None, f"expected a JSON object, got {type(obj).__name__}")
  for field in ("id", "prompt", "generator"):
    if field not in obj:
      raise bad(field, "missing")
    if not isinstance(obj[field], str) or not obj[field].strip():
      raise bad(field, f"expected a non-empty string, got {obj[field]!r:.60}")
  refs = obj.get("references")
  if not isinstance(refs, list) or not refs:
    raise bad("references", "missing or empty (a list of Python programs)")
  for i, ref in enumerate(refs):
    if not isinstance(ref, str) or not ref.strip():
      raise bad(f"references[{i}]", "expected a non-empty string (a program)")
  unknown = sorted(set(obj) - set(_FIELDS))
  if unknown:
    raise bad(unknown[0], f"unknown field; fields: {', '.join(_FIELDS)}")
  extra = {k: obj[k] for k in _CARRIED if k in obj}
  try:  # the prompt-set schema decides whether these carried fields are valid
    prompts_lib.Prompt(id=obj["id"], prompt=obj["prompt"], type="code",
                       tests=({"input": "", "output": ""},), **extra)
  except prompts_lib.PromptFileError as e:
    raise bad(e.field, e.reason) from None
  return Problem(obj["id"], obj["prompt"], tuple(refs), obj["generator"], extra)


def read_problems(path: str) -> list[Problem]:
  """All problems of `path`; the first bad line raises TestGenInputError."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"problem file {path} does not exist")
  problems, first = [], {}
  with open(path, "rb") as f:
    for n, raw in enumerate(f, 1):
      where = f"{path}:{n}"
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise TestGenInputError(f"{where}: not UTF-8 ({e.reason})") from None
      if not text.strip():
        continue
      try:
        obj = json.loads(text)
      except json.JSONDecodeError as e:
        raise TestGenInputError(f"{where}: not valid JSON ({e.msg})") from None
      problem = _problem(obj, where)
      if problem.id in first:
        raise TestGenInputError(f"{where}: field 'id': duplicate {problem.id!r} (first on "
                                f"line {first[problem.id]})")
      first[problem.id] = n
      problems.append(problem)
  if not problems:
    raise TestGenInputError(f"{path}: no problems")
  return problems


def fingerprint(settings: dict, path: str) -> str:
  """What the journaled results depend on: the settings and the input bytes."""
  h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
  with open(path, "rb") as f:
    h.update(f.read())
  return h.hexdigest()


def open_results(out_dir: str, fp: str, *, overwrite: bool) -> dict[str, dict]:
  """Results already journaled in OUT (id -> line); starts the journal if none."""
  path = os.path.join(out_dir, RESULTS_FILE)
  if overwrite and os.path.exists(path):
    os.unlink(path)
  if not os.path.exists(path):
    for name in (PROMPTS_FILE, REPORT_FILE, REPORT_MD):
      if os.path.exists(os.path.join(out_dir, name)) and not overwrite:
        raise FileExistsError(f"{os.path.join(out_dir, name)} exists; pass --overwrite to "
                              "replace it")
    append(path, {"fingerprint": fp})
    return {}
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  if not lines[0].strip() or json.loads(lines[0]).get("fingerprint") != fp:
    raise TestGenInputError(f"{path} was written for other settings or another problem "
                            "file; pass --overwrite to start over")
  done = {}
  for line in lines[1:]:
    try:
      entry = json.loads(line)
      done[entry["id"]] = entry
    except (ValueError, KeyError, TypeError):
      continue  # a torn last line (a kill mid-write): that problem runs again
  return done


def append(path: str, entry: dict) -> None:
  """One journal line, on disk before the next problem starts."""
  with open(path, "a", encoding="utf-8") as f:
    f.write(json.dumps(entry, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


def markdown(rows: list[dict], source: str, settings: dict) -> str:
  kept = sum(r["kept"] for r in rows)
  out = ["# Test generation report", "", f"Input: `{source}`: {len(rows)} problems; kept "
         f"**{kept}**.", "", "| id | kept | reason | inputs | tests | references passing all |",
         "|---|---|---|---|---|---|"]
  for r in rows:
    cell = lambda v: str(v).replace("|", "\\|")
    out.append(f"| {cell(r['id'])} | {'yes' if r['kept'] else 'no'} | {cell(r['reason'])} | "
               f"{r['inputs']} | {r['valid_tests']} | {r['references_passing_all']}/"
               f"{r['references']} |")
  out += ["", "## Settings", "", "```"] + [f"{k} = {v!r}" for k, v in settings.items()] + [
      "```", ""]
  return "\n".join(out)


def write_text(path: str, text: str) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def summary_line(problem_id: str, summary: dict) -> str:
  """One console line per problem."""
  counts = (f"{summary['valid_tests']} tests from {summary['inputs']} inputs, "
            f"{summary['references_passing_all']}/{summary['references']} references pass all")
  if summary["kept"]:
    return f"{problem_id}: kept, {counts}"
  return f"{problem_id}: dropped ({summary['reason']}); {counts}"


def report_row(entry: dict) -> dict[str, Any]:
  return {"id": entry["id"], **entry["summary"]}


def kept_prompts(problems: list[Problem], done: dict[str, dict]) -> list:
  return [p.to_prompt(done[p.id]["tests"]) for p in problems
          if p.id in done and done[p.id]["summary"]["kept"]]


def out_dir_ready(out_dir: str) -> Optional[str]:
  """Creates OUT (its parent must exist); returns it absolute."""
  out_dir = os.path.abspath(os.path.expanduser(out_dir))
  if not os.path.isdir(os.path.dirname(out_dir)):
    raise FileNotFoundError(f"--out {out_dir}: parent directory does not exist")
  os.makedirs(out_dir, exist_ok=True)
  return out_dir
