"""Curation resumes: a run cut short (an exception, a kill -9 at fault point
"curation", a torn journal line) is finished by the same call, with the
outputs of an uninterrupted run."""
import json
import os
import subprocess
import sys

import pytest

from kimi_jax.data import curation, prompts
from kimi_jax.data.curation import CurationConfig, TextModel
from test_curation import MARKER, REPO, _fake, _math, _mc, check


def _resume_inputs(tmp_path):
  ps = [_math(i, str(i)) for i in range(7)] + [_mc(0)]
  src = tmp_path / "in.jsonl"
  prompts.write_jsonl(ps, src)
  solved = {p.prompt: i % 5 for i, p in enumerate(ps)}
  config = CurationConfig(answer_marker=MARKER, samples=4, guess_attempts=2, drop_types=(),
                          prompts_per_call=2, max_pass_rate=1.0)
  return ps, src, solved, config


def _outputs(out):
  """The outputs less wall times (which differ between any two runs)."""
  report = json.loads((out / "report.json").read_text())
  for key in [k for k in report["stats"] if k.endswith("_seconds")]:
    del report["stats"][key]
  md = [l for l in (out / "report.md").read_text().splitlines() if not l.startswith("Stats: ")]
  return (out / "curated.jsonl").read_text(), report, md


class _Interrupted(Exception):
  pass


def test_interrupted_curation_resumes_with_the_same_result(tmp_path):
  ps, src, solved, config = _resume_inputs(tmp_path)
  _, model = _fake(ps, solved=solved)
  curation.run(str(src), str(tmp_path / "whole"), model, config, checker=check)
  whole_calls = len(_.calls)

  scripted, model = _fake(ps, solved=solved)
  def dies_after_three_calls(*args):
    if len(scripted.calls) == 3:
      raise _Interrupted()
    return scripted(*args)
  with pytest.raises(_Interrupted):
    curation.run(str(src), str(tmp_path / "cut"), TextModel(dies_after_three_calls), config,
                 checker=check)
  again, model = _fake(ps, solved=solved)
  curation.run(str(src), str(tmp_path / "cut"), model, config, checker=check)
  assert len(again.calls) == whole_calls - 3  # the three done chunks were not sampled again
  assert _outputs(tmp_path / "cut") == _outputs(tmp_path / "whole")


_KILLED_CURATION = """\
import collections, sys
from kimi_jax.data import curation
from kimi_jax.data.curation import CurationConfig, TextModel
MARKER = "\\nThe answer is "
def generate(texts, max_new_tokens, temperature, seed):
  seen, out = collections.Counter(), []
  for text in texts:
    if text.endswith(MARKER):  # an immediate answer: never right
      out.append("?")
      continue
    k = seen[text]; seen[text] += 1
    number = text.split("(")[-1].rstrip(")?")  # "What is 3 + 0 (3)?" -> "3"
    out.append("so the answer is " + (number if k < int(number) % 5 else "wrong"))
  return out
def check(prompt, response):
  return response.rsplit("answer is ", 1)[-1].strip("(). ") == (prompt.answer or "")
config = CurationConfig(answer_marker=MARKER, samples=4, guess_attempts=2, drop_types=(),
                        prompts_per_call=2)
curation.run(sys.argv[1], sys.argv[2], TextModel(generate), config, checker=check,
             model_id="scripted")
"""


def test_curation_killed_mid_run_resumes_on_rerun(tmp_path):
  ps = [_math(i, str(i)) for i in range(7)]
  src = tmp_path / "in.jsonl"
  prompts.write_jsonl(ps, src)
  script = tmp_path / "curate.py"
  script.write_text(_KILLED_CURATION)

  def run(out, fault=None):
    env = {**os.environ, "PYTHONPATH": REPO}
    env.pop("KIMI_JAX_FAULT", None)
    if fault:
      env["KIMI_JAX_FAULT"] = fault
    return subprocess.run([sys.executable, str(script), str(src), str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)

  assert run(tmp_path / "whole").returncode == 0
  killed = run(tmp_path / "cut", fault="curation@3")  # SIGKILL after the 3rd journaled chunk
  assert killed.returncode == -9, killed.stderr
  assert not (tmp_path / "cut" / "curated.jsonl").exists()
  journal = (tmp_path / "cut" / "progress.jsonl").read_text().splitlines()
  assert len(journal) == 1 + 3  # fingerprint + three chunks
  resumed = run(tmp_path / "cut")
  assert resumed.returncode == 0, resumed.stderr
  assert _outputs(tmp_path / "cut") == _outputs(tmp_path / "whole")
  # Every chunk journaled once: the three of the killed run were not redone.
  assert ((tmp_path / "cut" / "progress.jsonl").read_text()
          == (tmp_path / "whole" / "progress.jsonl").read_text())


def test_torn_journal_line_is_cut_and_its_chunk_redone(tmp_path):
  ps, src, solved, config = _resume_inputs(tmp_path)
  _, model = _fake(ps, solved=solved)
  curation.run(str(src), str(tmp_path / "whole"), model, config, checker=check)
  scripted, model = _fake(ps, solved=solved)
  curation.run(str(src), str(tmp_path / "cut"), model, config, checker=check)
  journal = tmp_path / "cut" / "progress.jsonl"
  lines = journal.read_text().splitlines(keepends=True)
  journal.write_text("".join(lines[:3]) + lines[3][:20])  # the 3rd chunk's line, cut short
  for name in curation.OUTPUT_FILES:
    os.unlink(tmp_path / "cut" / name)
  again, model = _fake(ps, solved=solved)
  curation.run(str(src), str(tmp_path / "cut"), model, config, checker=check)
  assert len(again.calls) == len(scripted.calls) - 2
  assert _outputs(tmp_path / "cut") == _outputs(tmp_path / "whole")
