"""Prompt-set schema, JSONL reading/writing, sharding, and the TFDS / seqio sources."""
import json
import os
import re
import subprocess
import sys

import pytest

from kimi_jax import tokenizers
from kimi_jax.data import prompts
from kimi_jax.data.prompts import Prompt, PromptFileError

GOOD = [
    Prompt("m1", "What is 1/2 + 1/4?", "math", "\\frac{3}{4}", difficulty=0.25,
           tags=("algebra", "fractions"), source="hand"),
    Prompt("c1", "Read two ints; print their sum.", "code",
           tests=({"input": "1 2\n", "output": "3\n"}, {"call": "f(2)", "output": [1, 2]})),
    Prompt("mc1", "Which is prime? (A) 4 (B) 7", "multiple_choice", "B", tags=("numbers",)),
    Prompt("tf1", "Is 91 prime? Answer true or false.", "true_false", "false", difficulty=3),
    Prompt("p1", "Prove that √2 is irrational — «unicode» 数学.", "proof"),
]


def _write_lines(path, lines):
  path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  return str(path)


def _line(**fields):
  return json.dumps(fields)


VALID = _line(id="ok", type="math", prompt="1+1?", answer="2")


# ------------------------------------------------------------------ round trip


def test_write_read_round_trip(tmp_path):
  path = tmp_path / "set.jsonl"
  prompts.write_jsonl(GOOD, path)
  assert os.listdir(tmp_path) == ["set.jsonl"]  # the temporary file was renamed away
  got = prompts.read_jsonl(path)
  assert got.prompts == tuple(GOOD) and got.skipped == 0 and got.errors == ()
  assert got.prompts[3].difficulty == 3.0 and isinstance(got.prompts[3].difficulty, float)
  # Defaults are left out of the file; non-ASCII is written as is.
  first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
  assert list(first) == ["id", "type", "prompt", "answer", "difficulty", "tags", "source"]
  assert "数学" in path.read_text(encoding="utf-8")


def test_prompt_validates_when_built_in_code():
  p = Prompt("x", "q", "math", "1", tags=["a"], tests=[])
  assert p.tags == ("a",) and p.tests == ()
  assert len({p, Prompt("x", "q", "math", "1", tags=("a",))}) == 1  # hashable, equal
  with pytest.raises(PromptFileError, match=r"^Prompt 'x': field 'answer': missing \(required"):
    Prompt("x", "q", "multiple_choice")
  with pytest.raises(PromptFileError, match=r"field 'type': unknown type 'essay'"):
    Prompt("x", "q", "essay")


def test_write_rejects_duplicate_ids(tmp_path):
  with pytest.raises(ValueError, match="duplicate id 'm1'"):
    prompts.write_jsonl([GOOD[0], GOOD[0]], tmp_path / "d.jsonl")
  assert not os.listdir(tmp_path)


# ------------------------------------------------------------- error messages

BAD_LINES = [
    ('{"id": "a", "type": "math",', r"not valid JSON: .* \(column \d+\)$"),
    (_line(type="math", prompt="q", answer="1"), r"field 'id': missing$"),
    (_line(id=None, type="math", prompt="q", answer="1"), r"field 'id': must not be null$"),
    (_line(id="a", type="math", answer="1"), r"field 'prompt': missing$"),
    (_line(id="a", type="math", prompt="q", answer=42),
     r"field 'answer': expected a string, got int$"),
    (_line(id="a", type="math", prompt="q"), r"field 'answer': missing \(required for type 'math'\)"),
    (_line(id="a", type="math", prompt="  ", answer="1"), r"field 'prompt': must not be empty"),
    (_line(id=7, type="math", prompt="q", answer="1"), r"field 'id': expected a string, got int$"),
    (_line(id="a", type="essay", prompt="q"), r"field 'type': unknown type 'essay'"),
    (_line(id="a", type="code", prompt="q"), r"field 'tests': missing or empty"),
    (_line(id="a", type="code", prompt="q", tests={"input": "", "output": ""}),
     r"field 'tests': expected a list of tests, got object$"),
    (_line(id="a", type="code", prompt="q", tests=[{"input": "1", "output": 1}]),
     r"field 'tests\[0\].output': expected a string"),
    (_line(id="a", type="code", prompt="q", tests=[{"input": "1", "outptu": "1"}]),
     r"field 'tests\[0\]': unknown keys \['outptu'\]"),
    (_line(id="a", type="proof", prompt="q", difficulty="hard"),
     r"field 'difficulty': expected a number, got string$"),
    (_line(id="a", type="proof", prompt="q", difficulty=True),
     r"field 'difficulty': expected a number, got bool$"),
    ('{"id": "a", "type": "proof", "prompt": "q", "difficulty": NaN}',
     r"field 'difficulty': expected a finite number, got nan$"),
    (_line(id="a", type="proof", prompt="q", tags="algebra"),
     r"field 'tags': expected a list of strings, got string$"),
    (_line(id="a", type="proof", prompt="q", tags=["x", 3]), r"field 'tags\[1\]': expected a non-empty"),
    (_line(id="a", type="math", prompt="q", answer="1", anwser="1"),
     r"field 'anwser': unknown field; did you mean 'answer'\?$"),
    (_line(id="a", type="proof", prompt="q", tag=["x"]), r"field 'tag': .* did you mean 'tags'"),
    (_line(ID="a", type="proof", prompt="q"), r"field 'ID': .* did you mean 'id'"),
    ('{"id": "a", "id": "b", "type": "proof", "prompt": "q"}', r"field 'id': appears twice"),
    ('["a", "b"]', r"expected a JSON object, got list$"),
    (VALID, r"field 'id': duplicate id 'ok' \(first on line 1\)$"),
]


@pytest.mark.parametrize("bad, message", BAD_LINES)
def test_bad_line_names_file_line_and_field(tmp_path, bad, message):
  # Line 1 is valid, line 2 blank (ignored but counted), line 3 is the bad one.
  path = _write_lines(tmp_path / "prompts.jsonl", [VALID, "", bad])
  with pytest.raises(PromptFileError) as info:
    prompts.read_jsonl(path)
  text = str(info.value)
  assert text.startswith(f"{path}:3: "), text
  assert info.value.where == f"{path}:3"
  assert re.search(message, text), text


def test_other_keys_are_ignored_and_synthetic_files_read(tmp_path):
  from kimi_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  path = _write_lines(tmp_path / "p.jsonl", [_line(id="a", type="proof", prompt="q",
                                                   solution="...", task="x", level=3)])
  assert prompts.read_jsonl(path).prompts == (Prompt("a", "q", "proof"),)
  _, problems = synthetic.make_splits(0, 0, 12)
  synthetic.to_jsonl(problems, tmp_path / "synthetic.jsonl")
  got = prompts.read_jsonl(tmp_path / "synthetic.jsonl")
  assert [(p.id, p.prompt, p.answer, p.difficulty) for p in got] == [
      (q.id, q.prompt, q.answer, float(q.difficulty)) for q in problems]


def test_invalid_utf8_names_the_line(tmp_path):
  path = tmp_path / "p.jsonl"
  path.write_bytes(VALID.encode() + b"\n" + b'{"id": "\xff"}\n')
  with pytest.raises(PromptFileError, match=r"p.jsonl:2: not valid UTF-8"):
    prompts.read_jsonl(path)


def test_skip_invalid_counts_and_keeps_order(tmp_path):
  lines = [_line(id="a", type="math", prompt="q", answer="1"), "{oops",
           "   ", _line(id="b", type="math", prompt="q", answer=2),
           _line(id="c", type="true_false", prompt="q", answer="true"),
           _line(id="a", type="proof", prompt="again"), ""]
  path = _write_lines(tmp_path / "p.jsonl", lines)
  with pytest.raises(PromptFileError, match=r"p.jsonl:2: not valid JSON"):
    prompts.read_jsonl(path)
  got = prompts.read_jsonl(path, skip_invalid=True)
  assert [p.id for p in got] == ["a", "c"] and len(got) == 2
  assert got.skipped == 3
  assert [e.split(": ")[0] for e in got.errors] == [f"{path}:2", f"{path}:4", f"{path}:6"]
  assert "field 'answer': expected a string, got int" in got.errors[1]


def test_empty_or_all_invalid_file_is_an_error(tmp_path):
  empty = _write_lines(tmp_path / "empty.jsonl", ["", "  "])
  with pytest.raises(PromptFileError, match="empty.jsonl: no valid prompts$"):
    prompts.read_jsonl(empty)
  bad = _write_lines(tmp_path / "bad.jsonl", ["{", "[]"])
  with pytest.raises(PromptFileError, match=r"2 invalid lines skipped, the first: .*bad.jsonl:1"):
    prompts.read_jsonl(bad, skip_invalid=True)
  with pytest.raises(FileNotFoundError, match="missing.jsonl does not exist"):
    prompts.read_jsonl(tmp_path / "missing.jsonl")


# ------------------------------------------------------------------- sharding


@pytest.mark.parametrize("n, hosts", [(10, 1), (10, 3), (7, 4), (2, 4), (64, 8)])
def test_shard_covers_every_prompt_once(n, hosts):
  ps = [Prompt(f"p{i}", "q", "proof") for i in range(n)]
  shards = [prompts.shard(ps, i, hosts) for i in range(hosts)]
  ids = [p.id for s in shards for p in s]
  assert sorted(ids) == sorted(p.id for p in ps) and len(ids) == n
  sizes = [len(s) for s in shards]
  assert max(sizes) - min(sizes) <= 1
  for i, s in enumerate(shards):  # the documented rule: position p goes to host p % hosts
    assert [p.id for p in s] == [f"p{j}" for j in range(n) if j % hosts == i]
    assert prompts.shard(prompts.PromptSet(tuple(ps)), i, hosts) == s


@pytest.mark.parametrize("index, count", [(2, 2), (-1, 2), (0, 0), (0.0, 2), (True, 2)])
def test_shard_rejects_bad_host_numbers(index, count):
  with pytest.raises(ValueError, match="process_"):
    prompts.shard(GOOD, index, count)


def test_import_does_not_import_tensorflow():
  code = ("import sys, kimi_jax.data.prompts; "
          "assert 'tensorflow' not in sys.modules, 'tensorflow'; "
          "assert 'jax' not in sys.modules, 'jax'")
  subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------- TFDS / seqio


@pytest.fixture(scope="module")
def pipelines():
  from kimi_jax.data import prompt_pipelines  # pylint: disable=g-import-not-at-top
  return prompt_pipelines


@pytest.fixture()
def prompt_file(tmp_path):
  """GOOD with an invalid line in the middle (read with skip_invalid=True)."""
  path = tmp_path / "mixed set.jsonl"
  lines = [json.dumps(p.to_json(), ensure_ascii=False) for p in GOOD]
  lines.insert(2, _line(id="bad", type="math", prompt="q", answer=1))
  return _write_lines(path, lines)


def _numpy_examples(ds):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return list(tfds.as_numpy(ds))


def test_tfds_builder_gives_the_jsonl_prompts(pipelines, prompt_file, tmp_path):
  expected = prompts.read_jsonl(prompt_file, skip_invalid=True).prompts
  builder = pipelines.PromptSetBuilder(jsonl_path=prompt_file, skip_invalid=True,
                                       data_dir=str(tmp_path / "tfds"))
  builder.download_and_prepare()
  examples = _numpy_examples(builder.as_dataset(split="train"))
  assert tuple(pipelines.prompt_from_example(e) for e in examples) == expected
  # Prepared data is keyed by content: editing the file gives a fresh config.
  with open(prompt_file, "a", encoding="utf-8") as f:
    f.write(_line(id="new", type="proof", prompt="q") + "\n")
  edited = pipelines.PromptSetBuilder(jsonl_path=prompt_file, skip_invalid=True,
                                      data_dir=str(tmp_path / "tfds"))
  assert edited.builder_config.name != builder.builder_config.name
  edited.download_and_prepare()
  assert [e["id"] for e in _numpy_examples(edited.as_dataset(split="train"))][-1] == b"new"


def test_tfds_builder_raises_on_invalid_line(pipelines, prompt_file, tmp_path):
  builder = pipelines.PromptSetBuilder(jsonl_path=prompt_file, data_dir=str(tmp_path))
  with pytest.raises(PromptFileError, match=r"mixed set.jsonl:3: field 'answer'"):
    builder.download_and_prepare()


def test_seqio_task_gives_the_jsonl_prompts_as_token_ids(pipelines, prompt_file, tmp_path):
  import seqio  # pylint: disable=g-import-not-at-top
  expected = prompts.read_jsonl(prompt_file, skip_invalid=True).prompts
  vocab = tokenizers.load_vocabulary("bytes")
  data_dir = str(tmp_path / "tfds")
  task = pipelines.register_task("test_prompts_task", prompt_file, vocab,
                                 max_prompt_length=1000, data_dir=data_dir, skip_invalid=True)
  assert seqio.get_mixture_or_task("test_prompts_task") is task
  examples = _numpy_examples(task.get_dataset(split="train", shuffle=False))
  assert tuple(pipelines.prompt_from_example(e) for e in examples) == expected
  for p, e in zip(expected, examples):
    assert e["inputs"].tolist() == tokenizers.encode_prompt(vocab, p.prompt)
  # Host sharding through seqio is prompts.shard's rule.
  for index in range(3):
    shard = task.get_dataset(split="train", shuffle=False,
                             shard_info=seqio.ShardInfo(index=index, num_shards=3))
    assert ([e["id"].decode() for e in _numpy_examples(shard)]
            == [p.id for p in prompts.shard(expected, index, 3)])
  # Too-long prompts are dropped, not truncated; re-registering replaces the task.
  limit = 32
  task = pipelines.register_task("test_prompts_task", prompt_file, "bytes",
                                 max_prompt_length=limit, data_dir=data_dir, skip_invalid=True)
  kept = [e["id"].decode() for e in _numpy_examples(task.get_dataset("train", shuffle=False))]
  assert kept == [p.id for p in expected if len(p.prompt.encode("utf-8")) <= limit]
  assert 0 < len(kept) < len(expected)
  assert pipelines.count_overlong(prompt_file, "bytes", limit, skip_invalid=True) == (
      len(expected) - len(kept))


def test_seqio_mixture_keeps_the_prompt_fields(pipelines, tmp_path):
  import seqio  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path / "tfds")
  for name, chosen in (("a", GOOD[:2]), ("b", GOOD[2:])):
    prompts.write_jsonl(chosen, tmp_path / f"{name}.jsonl")
    pipelines.register_task(f"test_prompts_{name}", tmp_path / f"{name}.jsonl", "bytes",
                            max_prompt_length=1000, data_dir=data_dir)
  mixture = pipelines.register_mixture("test_prompts_mix", [("test_prompts_a", 1.0),
                                                            ("test_prompts_b", 1.0)])
  assert seqio.get_mixture_or_task("test_prompts_mix") is mixture
  # A mixture repeats its tasks (with num_epochs=1 it stops when one runs out).
  ds = mixture.get_dataset(None, split="train", shuffle=False, seed=0,
                           passthrough_features=pipelines.METADATA_FEATURES)
  got = [pipelines.prompt_from_example(e) for e in _numpy_examples(ds.take(60))]
  by_id = {p.id: p for p in GOOD}
  assert all(p == by_id[p.id] for p in got) and {p.id for p in got} == set(by_id)
