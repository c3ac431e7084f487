"""Curation: stages with a scripted fake model, balancing, report, and the launcher
end to end with a real tiny random model."""
import collections
import json
import os
import subprocess
import sys

import pytest

from kimi_jax.data import curation, curation_report, prompts
from kimi_jax.data.curation import CurationConfig, TextModel
from kimi_jax.data.prompts import Prompt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = "\nThe answer is "


class ScriptedModel:
  """A fake model whose answers are scripted per prompt text.

  guesses[prompt]: the immediate answer after MARKER (default "?").
  solved[prompt]: how many of the samples of one call answer right; the k-th
    copy of a prompt in a call says f"so the answer is {right}" iff k < solved.
  Records every call as (texts, max_new_tokens, temperature).
  """

  def __init__(self, answers, guesses=None, solved=None):
    self.answers, self.guesses, self.solved = answers, guesses or {}, solved or {}
    self.calls = []

  def __call__(self, texts, max_new_tokens, temperature, seed):
    self.calls.append((list(texts), max_new_tokens, temperature))
    seen = collections.Counter()
    out = []
    for text in texts:
      if text.endswith(MARKER):
        out.append(self.guesses.get(text[:-len(MARKER)], "?"))
        continue
      k = seen[text]
      seen[text] += 1
      right = k < self.solved.get(text, 0)
      out.append(f"work... so the answer is {self.answers[text] if right else 'wrong'}")
    return out


def check(prompt, response):
  """Fake checker: the text after the last "answer is ", less brackets and a
  final period, equals the reference."""
  return response.rsplit("answer is ", 1)[-1].strip("(). ") == (prompt.answer or "")


def _mc(i, answer="B"):
  return Prompt(f"mc{i}", f"Which is prime ({i})? (A) 4 (B) 7 (C) 9", "multiple_choice", answer,
                tags=("numbers",))


def _math(i, answer, tags=("arith",)):
  return Prompt(f"m{i}", f"What is {answer} + 0 ({i})?", "math", answer, tags=tags)


def _fake(ps, guesses=None, solved=None, max_length=None):
  model = ScriptedModel({p.prompt: p.answer for p in ps}, guesses, solved)
  return model, TextModel(model, len, max_length)


def test_guessable_multiple_choice_prompts_are_removed():
  ps = [_mc(0), _mc(1), _mc(2, answer="C"), _math(0, "12"), _math(1, "5")]
  model, text_model = _fake(
      ps, guesses={ps[0].prompt: "B", ps[1].prompt: "(A)", ps[2].prompt: "C.",
                   ps[3].prompt: "12", ps[4].prompt: "7"},
      solved={p.prompt: 3 for p in ps})
  config = CurationConfig(drop_types=(), samples=4, guess_attempts=8, answer_marker=MARKER)
  result = curation.curate(ps, text_model, config, checker=check)
  by_id = {r.id: r for r in result.records}
  # mc0 / mc2 / m0 are answered right at once -> dropped; mc1 / m1 are not.
  assert [r.reason for r in result.records] == ["guessable", "kept", "guessable", "guessable",
                                                "kept"]
  assert by_id["mc0"].guess_correct == 8 and by_id["mc1"].guess_correct == 0
  assert "8/8 attempts" in by_id["mc0"].detail
  assert by_id["mc1"].flags == ["hackable_type"] and by_id["m1"].flags == []
  assert [p.id for p in result.kept] == ["mc1", "m1"]
  # Guesses: prompt + marker, N copies each, the short budget; the checker saw the marker.
  guess_texts, guess_budget, _ = model.calls[0]
  assert guess_budget == config.guess_max_new_tokens
  assert guess_texts == [p.prompt + MARKER for p in ps for _ in range(8)]
  # Only survivors were sampled with reasoning.
  texts, budget, temperature = model.calls[1]
  assert budget == config.max_new_tokens and temperature == config.temperature
  assert sorted(set(texts)) == sorted([ps[1].prompt, ps[4].prompt]) and len(texts) == 8


def test_default_config_drops_hackable_types_and_solved_prompts():
  ps = [_mc(0), Prompt("tf", "Is 7 prime?", "true_false", "true"), Prompt("pr", "Prove x.", "proof"),
        _math(0, "1"), _math(1, "2"), _math(2, "3"), _math(3, "4"),
        Prompt("c0", "Echo.", "code", answer="x", tests=({"input": "x", "output": "x"},))]
  solved = {ps[3].prompt: 10, ps[4].prompt: 9, ps[5].prompt: 0, ps[6].prompt: 3,
            ps[7].prompt: 5}
  model, text_model = _fake(ps, solved=solved)
  result = curation.curate(ps, text_model, CurationConfig(answer_marker=MARKER), checker=check)
  reasons = {r.id: r.reason for r in result.records}
  assert reasons == {"mc0": "type", "tf": "type", "pr": "type", "m0": "too_easy", "m1": "kept",
                     "m2": "kept", "m3": "kept", "c0": "kept"}
  # difficulty = 1 - pass rate, written into the curated prompts.
  assert {p.id: p.difficulty for p in result.kept} == {"m1": 0.1, "m2": 1.0, "m3": 0.7,
                                                        "c0": 0.5}
  by_id = {r.id: r for r in result.records}
  assert by_id["m0"].pass_rate == 1.0 and by_id["m2"].pass_rate == 0.0
  assert by_id["m2"].bucket == "0.80-1.00" and by_id["m3"].bucket == "0.60-0.80"
  assert by_id["c0"].guess_correct is None  # code has no answer to guess
  assert "unverifiable" in by_id["pr"].flags and "hackable_type" in by_id["pr"].flags
  assert all(p.prompt not in text for p in ps[:3] for text in model.calls[0][0])


def test_pass_rate_window_proofs_and_too_long():
  ps = [_math(0, "1"), _math(1, "2"), Prompt("pr", "Prove x.", "proof", difficulty=4.0),
        _math(2, "3" * 60)]
  _, text_model = _fake(ps, solved={ps[0].prompt: 0, ps[1].prompt: 5}, max_length=1100)
  config = CurationConfig(drop_types=(), samples=10, min_pass_rate=0.1, max_pass_rate=1.01,
                          guess_attempts=0, max_new_tokens=1024)
  result = curation.curate(ps, text_model, config, checker=check)
  by_id = {r.id: r for r in result.records}
  assert by_id["m0"].reason == "too_hard" and by_id["m1"].reason == "kept"
  assert by_id["m2"].reason == "too_long" and "takes 1100" in by_id["m2"].detail
  assert by_id["pr"].reason == "kept" and by_id["pr"].bucket == curation.UNMEASURED
  assert [p.difficulty for p in result.kept] == [0.5, 4.0]  # a proof keeps its own


def test_balance_caps_buckets_and_tags_deterministically():
  ps = [_math(i, str(i), tags=("algebra",) if i % 3 else ("geometry",)) for i in range(30)]
  solved = {p.prompt: (0 if i < 20 else 5) for i, p in enumerate(ps)}
  _, text_model = _fake(ps, solved=solved)
  config = CurationConfig(guess_attempts=0, max_per_bucket=12, max_per_tag=8)
  result = curation.curate(ps, text_model, config, checker=check)
  kept = [r for r in result.records if r.kept]
  buckets = collections.Counter(r.bucket for r in kept)
  tags = collections.Counter(t for r in kept for t in r.tags)
  assert set(buckets) == {"0.40-0.60", "0.80-1.00"} and max(buckets.values()) <= 12
  assert tags["algebra"] == 8 and 3 <= tags["geometry"] <= 8
  # Greedy and maximal: a prompt was dropped only because its bucket or tag was full.
  dropped = [r for r in result.records if not r.kept]
  assert dropped and {r.reason for r in dropped} <= {"balance_bucket", "balance_tag"}
  for r in dropped:
    assert buckets[r.bucket] == 12 or any(tags[t] == 8 for t in r.tags), r
  again = curation.curate(ps, text_model, config, checker=check)
  assert again.kept == result.kept
  other = curation.curate(ps, text_model, CurationConfig(guess_attempts=0, max_per_bucket=12,
                                                         max_per_tag=8, seed=1), checker=check)
  assert other.kept != result.kept  # the seed picks which prompts fill the caps


def test_checker_errors_count_as_wrong():
  ps = [_math(0, "1"), _math(1, "2")]
  _, text_model = _fake(ps, solved={p.prompt: 10 for p in ps})

  def flaky(prompt, response):
    if prompt.id == "m1":
      raise RuntimeError("verifier broke")
    return check(prompt, response)

  result = curation.curate(ps, text_model, CurationConfig(guess_attempts=0), checker=flaky)
  assert [r.reason for r in result.records] == ["too_easy", "kept"]
  assert result.stats["check_errors"] == 10 and result.kept[0].difficulty == 1.0


@pytest.mark.parametrize("changes, message", [
    ({"samples": 0}, "samples must be >= 1"),
    ({"guess_attempts": -1}, "guess_attempts must be >= 0"),
    ({"drop_types": ("essay",)}, r"unknown types \['essay'\]"),
    ({"min_pass_rate": 0.5, "max_pass_rate": 0.5}, "min_pass_rate < max_pass_rate"),
    ({"max_per_tag": 0}, "max_per_tag must be >= 1 or None"),
])
def test_config_errors_name_the_field(changes, message):
  with pytest.raises(ValueError, match=message):
    CurationConfig(**changes)


def test_duplicate_ids_and_wrong_response_count_are_errors():
  p = _math(0, "1")
  with pytest.raises(ValueError, match="duplicate prompt id 'm0'"):
    curation.curate([p, p], TextModel(lambda *a: []), checker=check)
  with pytest.raises(RuntimeError, match="returned 0 responses for 8 prompts"):
    curation.curate([p], TextModel(lambda *a: []), checker=check)


def test_run_writes_curated_set_and_report(tmp_path):
  ps = [_mc(0), _math(0, "1"), _math(1, "2|3", tags=("a|b",))]
  src = tmp_path / "in.jsonl"
  prompts.write_jsonl(ps, src)
  with open(src, "a", encoding="utf-8") as f:
    f.write('{"id": "bad"}\n')
  _, text_model = _fake(ps, solved={ps[1].prompt: 10, ps[2].prompt: 4})
  out = tmp_path / "out"
  config = CurationConfig(answer_marker=MARKER)
  with pytest.raises(prompts.PromptFileError, match=r"in.jsonl:4: field 'prompt': missing"):
    curation.run(str(src), str(out), text_model, config, checker=check)
  curation.run(str(src), str(out), text_model, config, skip_invalid=True, checker=check)
  assert sorted(os.listdir(out)) == sorted(curation.OUTPUT_FILES + ("progress.jsonl",))
  curated = prompts.read_jsonl(out / "curated.jsonl")
  assert [(p.id, p.difficulty) for p in curated] == [("m1", 0.6)]
  report = json.loads((out / "report.json").read_text())
  assert (report["kept"], report["dropped"]) == (1, 2)
  assert report["dropped_by_reason"] == {"type": 1, "too_easy": 1}
  assert report["input"]["skipped_invalid"] == 1
  assert report["by_type"]["multiple_choice"] == {"input": 1, "kept": 0, "dropped": {"type": 1}}
  assert report["pass_rate_histogram"] == {"0.40": 1, "1.00": 1}
  assert report["flags"] == {"hackable_type": {"total": 1, "kept": 0}}
  assert [r["id"] for r in report["prompts"]] == ["mc0", "m0", "m1"]
  md = (out / "report.md").read_text()
  assert "Kept **1** (33%), dropped 2." in md and "| too_easy | 1 |" in md
  assert "| a\\|b | 1 | 1 |" in md  # pipes in tags escaped
  assert "in.jsonl:4: field 'prompt': missing" in md
  # The same call again finds all the model's work in the journal.
  model, text_model = _fake(ps, solved={ps[1].prompt: 10, ps[2].prompt: 4})
  curation.run(str(src), str(out), text_model, config, skip_invalid=True, checker=check)
  assert model.calls == [] and json.loads((out / "report.json").read_text())["kept"] == 1
  # Other settings: the journal is not theirs.
  other = CurationConfig(answer_marker=MARKER, samples=5)
  with pytest.raises(curation.CurationError, match="progress.jsonl was written for other "
                     "settings"):
    curation.run(str(src), str(out), text_model, other, skip_invalid=True, checker=check)
  curation.run(str(src), str(out), text_model, other, skip_invalid=True, overwrite=True,
               checker=check)
  # Outputs of a run without a journal are not replaced silently.
  os.unlink(out / "progress.jsonl")
  with pytest.raises(FileExistsError, match="curated.jsonl exists"):
    curation.run(str(src), str(out), text_model, config, skip_invalid=True, checker=check)


def test_markdown_caps_the_listing():
  records = tuple(curation.Record(f"p{i}", "math", [], reason="too_hard") for i in range(250))
  result = curation.CurationResult((), records, CurationConfig(), {})
  md = curation_report.markdown(curation_report.summary(result))
  assert "## Dropped prompts (250)" in md and "... and 50 more: see report.json." in md


# ---------------------------------------------------------------- launcher


def _run_launcher(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  return subprocess.run([sys.executable, "-m", "launch.curate", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


def test_launcher_help_lists_the_settings():
  proc = _run_launcher("--help")  # absl exits with status 1 after printing help
  assert "Traceback" not in proc.stderr, proc.stderr
  for flag in ("--prompts", "--out", "--model", "--vocab", "--[no]skip_invalid", "--samples",
               "--guess_attempts", "--answer_marker", "--max_per_tag"):
    assert flag in proc.stdout
  assert "report.md" in proc.stdout  # the module docstring explains the outputs


def test_launcher_end_to_end_with_a_tiny_random_model(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  from kimi_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  from kimi_jax.models import params_io  # pylint: disable=g-import-not-at-top
  from kimi_jax.models.transformer import ModelConfig, init_params  # pylint: disable=g-import-not-at-top
  cfg = ModelConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_layers=1,
                    num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=128)
  params_io.save_orbax(cfg, init_params(cfg, jax.random.PRNGKey(0)), tmp_path / "model")
  _, problems = synthetic.make_splits(0, 0, 6)
  src = tmp_path / "generated.jsonl"
  synthetic.to_jsonl(problems, src)
  extra = [_mc(0), Prompt("pr", "Prove it.", "proof")]
  with open(src, "a", encoding="utf-8") as f:
    f.writelines(json.dumps(p.to_json()) + "\n" for p in extra)
    f.write("{not json\n")
  out = tmp_path / "curated"
  proc = _run_launcher(f"--prompts={src}", f"--out={out}", f"--model={tmp_path / 'model'}",
                       "--vocab=bytes", "--skip_invalid", "--samples=3", "--guess_attempts=4",
                       "--max_new_tokens=16", "--guess_max_new_tokens=10", "--answer_marker=A:",
                       "--drop_types=proof", "--batch_size=32")  # one compiled shape, mostly
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "prompts; see" in proc.stdout
  report = json.loads((out / "report.json").read_text())
  assert report["input"] == {"path": str(src), "prompts": 8, "skipped_invalid": 1,
                             "invalid_lines": [f"{src}:9: not valid JSON: Expecting property "
                                               "name enclosed in double quotes (column 2)"]}
  by_id = {r["id"]: r for r in report["prompts"]}
  assert by_id["pr"]["reason"] == "type"
  assert by_id["mc0"]["guess_correct"] is not None  # kept type: went through the guess stage
  for p in problems:  # every math prompt was guessed, then measured unless guessed right
    r = by_id[p.id]
    assert r["guess_correct"] is not None
    assert (r["reason"] == "guessable") == (r["guess_correct"] > 0)
    assert r["reason"] == "guessable" or r["pass_rate"] in (0.0, 1 / 3, 2 / 3, 1.0)
  assert report["stats"]["responses_generated"] == 7 * 4 + 3 * sum(
      r["reason"] != "guessable" for r in by_id.values() if r["id"] != "pr")
  kept = {r["id"] for r in report["prompts"] if r["kept"]}
  lines = (out / "curated.jsonl").read_text().splitlines()
  assert {json.loads(line)["id"] for line in lines} == kept
  assert (out / "report.md").read_text().startswith("# Prompt-set curation report")
