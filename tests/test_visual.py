"""Synthetic visual tasks: answers re-derived from the scene, images that show
the scene, deterministic rendering, traces that verify, splits, files."""
import json
import re

import numpy as np
import pytest
from PIL import Image

from kimi_jax.data import prompts
from kimi_jax.data import visual as V
from kimi_jax.data import visual_tasks as VT
from kimi_jax.data.synthetic import MAX_RESPONSE_BYTES, TERMINATOR

CELLS = [(t, d) for t in V.TASKS for d in range(1, V.MAX_DIFFICULTY[t] + 1)]


def _problems(task, d, n=120, seed=0):
  rng = np.random.default_rng([seed, d, len(task)])
  return [V.make_problem(task, rng, d) for _ in range(n)]


def _center(obj):
  _, _, x0, y0 = obj
  return x0 + VT.SIZE / 2, y0 + VT.SIZE / 2


def _expected_answer(p):
  """The answer from the scene, by this test's own reading of the question."""
  scene, words = p.scene_dict, p.body.split()
  if p.task == "count":
    return str(sum(o[1] == words[1] and (len(words) == 2 or o[0] == words[2])
                   for o in scene["objects"]))
  if p.task == "compare":
    a, b = words[1], words[3]
    na, nb = (sum(o[1] == c for o in scene["objects"]) for c in (a, b))
    assert na != nb
    return a if na > nb else b
  if p.task == "spatial":
    named = {(o[1], o[0]): o for o in scene["objects"]}
    assert len(named) == len(scene["objects"])  # every object nameable
    a, b = named[(words[0], words[1])], named[(words[3], words[4])]
    (xa, ya), (xb, yb) = _center(a), _center(b)
    size = VT.SIZE
    if abs(xa - xb) > size:  # wholly beside each other and level: well posed
      assert abs(ya - yb) < size
      return "left" if xa < xb else "right"
    assert abs(ya - yb) > size and abs(xa - xb) < size
    return "above" if ya < yb else "below"
  if p.task == "bars":
    heights = [h for _, h, _ in sorted(scene["bars"])]
    assert heights.count(max(heights)) == 1
    return str(int(np.argmax(heights)) + 1)
  expr = "".join(t for t, _, _ in scene["text"]).replace(" ", "")
  assert re.fullmatch(r"\d+[+-]\d+", expr)
  return str(eval(expr))  # pylint: disable=eval-used


@pytest.mark.parametrize("task,d", CELLS)
def test_answers_are_exact(task, d):
  for p in _problems(task, d):
    assert (p.task, p.difficulty) == (task, d)
    assert p.answer == _expected_answer(p), (p.body, p.scene)
    assert p.prompt.startswith(V.IMAGE_MARKER + "Q:") and p.prompt.count(V.IMAGE_MARKER) == 1


@pytest.mark.parametrize("task,d", CELLS)
def test_images_show_the_scene(task, d):
  for p in _problems(task, d, n=40):
    img = p.image()
    assert img.shape == (V.IMAGE_SIZE, V.IMAGE_SIZE, 3) and img.dtype == np.uint8
    scene, painted = p.scene_dict, np.zeros(img.shape[:2], int)
    for shape, color, x0, y0 in scene.get("objects", ()):
      mask = VT.shape_mask(shape)
      assert (img[y0:y0 + 6, x0:x0 + 6][mask] == VT.COLORS[color]).all()
      painted[y0:y0 + 6, x0:x0 + 6] += mask
    for x0, h, color in scene.get("bars", ()):
      column = (img[:, x0:x0 + VT.BAR_WIDTH] == VT.COLORS[color]).all(-1)
      assert column.sum(0).tolist() == [h * VT.BAR_UNIT] * VT.BAR_WIDTH
      painted[:, x0:x0 + VT.BAR_WIDTH] += column
    for text, x0, y0 in scene.get("text", ()):
      for i, ch in enumerate(text):  # read each glyph back from the pixels
        box = (img[y0:y0 + 7, x0 + 8 * i:x0 + 8 * i + 5] == VT.COLORS["white"]).all(-1)
        assert [c for c, g in VT.GLYPHS.items() if (g == box).all()] == [ch]
        painted[y0:y0 + 7, x0 + 8 * i:x0 + 8 * i + 5] += box
    assert painted.max() <= 1  # nothing overlaps
    assert ((img != 0).any(-1) == (painted == 1)).all()  # nothing else is drawn
    if task in ("count", "compare", "spatial") and d <= 2:
      assert all(x0 % 8 == 1 and y0 % 8 == 1 for _, _, x0, y0 in scene["objects"])  # aligned


def test_rendering_and_problems_are_deterministic_per_seed():
  for task, d in CELLS:
    a, b, c = _problems(task, d, 20, seed=4), _problems(task, d, 20, seed=4), _problems(
        task, d, 20, seed=5)
    assert a == b and a != c
    for x, y in zip(a, b):
      np.testing.assert_array_equal(x.image(), y.image())


@pytest.mark.parametrize("task,d", CELLS)
@pytest.mark.parametrize("error_rate", [0.0, 0.3])
def test_traces_verify_and_fit_budgets(task, d, error_rate):
  rng = np.random.default_rng(1)
  for p in _problems(task, d, n=60):
    for response in (V.long_cot(p, rng, error_rate), V.short_cot(p)):
      assert response.isascii() and len(response) <= MAX_RESPONSE_BYTES
      assert response.endswith(TERMINATOR) and response.count(TERMINATOR) == 1
      assert response.count(V.ANSWER_TAG) == 1
      assert V.extract_answer(response) == p.answer and V.reward(p, response) == 1.0
    long = V.long_cot(p, rng, error_rate)
    assert long[0] != "A"  # the first byte tells the mode
    if task in ("count", "compare"):  # rows top to bottom, each with its true count
      clean = V.long_cot(p, rng, 0.0)
      words = p.body.split()
      rows = [[o for o in p.scene_dict["objects"] if (o[3] + 3) // 8 == r] for r in range(4)]
      if task == "count":
        want = [sum(o[1] == words[1] and (len(words) == 2 or o[0] == words[2]) for o in row)
                for row in rows]
        got = [int(k) for k in re.findall(r"r\d\+(\d)=", clean)]
      else:
        want = np.cumsum([[sum(o[1] == c for o in row) for c in (words[1], words[3])]
                          for row in rows], 0).tolist()
        got = [[int(a), int(b)] for a, b in re.findall(r"r\d (\d+),(\d+)", clean)]
      assert re.findall(r"(?:^|;)r(\d)", clean) == ["1", "2", "3", "4"]
      assert got == want, clean


def test_slips_are_corrected():
  rng = np.random.default_rng(2)
  for task in ("count", "compare", "arith"):
    slipped = 0
    for p in _problems(task, V.MAX_DIFFICULTY[task], n=30):
      trace = V.long_cot(p, rng, error_rate=1.0)
      # A trace whose slips overflow the byte budget falls back to the clean one.
      assert " wait " in trace or trace == V.long_cot(p, rng, 0.0)
      slipped += " wait " in trace
      clean = V.long_cot(p, rng, 0.0).split(";")
      for wrong, right in re.findall(r"([^;]+) wait ([^;]+)", trace):
        step = lambda x: x.split("=")[0] if "=" in x else x.split(" ")[0]  # noqa: E731
        assert wrong != right and step(wrong) == step(right) and right in clean
      assert V.reward(p, trace) == 1.0
    assert slipped >= 15, task


def test_wrong_and_malformed_answers_score_zero():
  p = _problems("compare", 1, n=1)[0]
  other = "blue" if p.answer != "blue" else "red"
  for response in (f"A:{other}\n", "A:\n", "no answer\n", f"A:{p.answer.upper()}\n",
                   f"A:{p.answer};more\n"):
    assert V.reward(p, response) == 0.0
  assert V.reward(p, f"x;A:{p.answer}\nignored") == 1.0


def test_prompt_tokens_have_one_placeholder_per_patch():
  p = _problems("count", 1, n=1)[0]
  ids = V.encode_prompt(p, tokens_per_image=16)
  assert ids[:16] == [V.IMAGE_TOKEN_ID] * 16 and V.IMAGE_TOKEN_ID not in ids[16:]
  assert max(ids[16:]) < V.IMAGE_TOKEN_ID and len(ids) == 16 + len(p.prompt) - len(
      V.IMAGE_MARKER)


def test_splits_are_disjoint_balanced_and_deterministic():
  train, heldout = V.make_splits(0, 300, 100)
  assert not {p.id for p in train} & {p.id for p in heldout}
  assert len({p.id for p in train}) == len(train)
  assert (train, heldout) == V.make_splits(0, 300, 100)
  counts = {(p.task, p.difficulty) for p in heldout}
  assert counts == set(CELLS)
  sub_train, sub_heldout = V.make_splits(0, 50, 20, difficulties=[1], tasks=["count", "bars"])
  assert {(p.task, p.difficulty) for p in sub_train} == {("count", 1), ("bars", 1)}
  with pytest.raises(ValueError, match="unknown visual task 'colour'"):
    V.make_splits(0, 10, 10, tasks=["colour"])


def test_warmup_problems_are_apart_from_both_splits():
  train, heldout = V.make_splits(0, 300, 100)
  warmup = V.make_warmup_problems(0, 400, train)
  ids = {p.id for p in warmup}
  assert len(ids) == len(warmup) == 400
  assert not ids & {p.id for p in train}
  assert not ids & {p.id for p in heldout}
  # Never held out under the split's rule, whatever the held-out count.
  _, more_heldout = V.make_splits(0, 10, 2000)
  assert not ids & {p.id for p in more_heldout}
  assert {(p.task, p.difficulty) for p in warmup} == set(CELLS)
  assert warmup == V.make_warmup_problems(0, 400, train)
  assert {p.id for p in V.make_warmup_problems(1, 400, train)} != ids


def test_jsonl_round_trip_is_a_valid_image_prompt_set(tmp_path):
  _, heldout = V.make_splits(1, 0, 30)
  V.to_jsonl(heldout, tmp_path / "visual.jsonl")
  assert V.from_jsonl(tmp_path / "visual.jsonl") == heldout
  read = prompts.read_jsonl(tmp_path / "visual.jsonl").prompts  # the schema accepts it
  assert [p.id for p in read] == [p.id for p in heldout]
  for prompt, problem in zip(read, heldout):
    assert prompt.prompt == problem.prompt and prompt.answer == problem.answer
    np.testing.assert_array_equal(np.asarray(Image.open(prompt.images[0])), problem.image())
  lines = (tmp_path / "visual.jsonl").read_text().splitlines()
  record = json.loads(lines[0])
  record["answer"] = "99"
  (tmp_path / "bad.jsonl").write_text(json.dumps(record) + "\n")
  with pytest.raises(ValueError, match=r"bad.jsonl:1: field 'answer' is '99' but the scene"):
    V.from_jsonl(tmp_path / "bad.jsonl")
