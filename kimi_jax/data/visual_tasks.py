"""The scenes behind `kimi_jax.data.visual`: sample, render, answer, trace.

A scene is a small JSON-able dict that fixes the image completely; the
answer and the long-CoT trace are functions of (prompt body, scene), so a
problem read back from JSONL re-renders, re-answers and re-traces without
hidden state. Images are IMAGE_SIZE x IMAGE_SIZE RGB on black, drawn with
numpy masks (exact and the same on every machine and Pillow version).

Scene kinds:
  {"objects": [[shape, color, x0, y0], ...]}  SIZE x SIZE shapes, top-left (x0, y0)
  {"bars": [[x0, height, color], ...]}        BAR_WIDTH wide, height in BAR_UNIT px,
                                              standing on the bottom row
  {"text": [[string, x0, y0], ...]}           5x7 glyphs at a GLYPH_PITCH pitch

Objects sit in a 4 x 4 grid of 8 px cells, the patches of an 8 px ViT:
"r2c3" is row 2, column 3 (1-based) of the cell holding an object's centre.
Aligned levels put each object inside one cell (one patch holds exactly one
object); the harder levels place objects freely, across patch borders.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from kimi_jax.data.synthetic_tasks import CORRECTION, FAMILIES as TEXT_FAMILIES

IMAGE_SIZE = 32
CELL = 8
GRID = IMAGE_SIZE // CELL
SIZE = 6  # object side in px
BAR_WIDTH, BAR_UNIT, MAX_BAR = 4, 4, 7  # bars are 1..7 units of 4 px
GLYPH_PITCH = 8
COLORS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (60, 90, 250),
          "white": (235, 235, 235)}
SHAPE_COLORS = ("red", "green", "blue")
SHAPES = ("dot", "box", "tri")  # circle, square, triangle
RELATIONS = ("left", "right", "above", "below")

# 5x7 bitmap font: digits and the operators the arithmetic uses.
_FONT = {
    "0": ("01110", "10001", "10011", "10101", "11001", "10001", "01110"),
    "1": ("00100", "01100", "00100", "00100", "00100", "00100", "01110"),
    "2": ("01110", "10001", "00001", "00010", "00100", "01000", "11111"),
    "3": ("11110", "00001", "00001", "01110", "00001", "00001", "11110"),
    "4": ("00010", "00110", "01010", "10010", "11111", "00010", "00010"),
    "5": ("11111", "10000", "11110", "00001", "00001", "10001", "01110"),
    "6": ("00110", "01000", "10000", "11110", "10001", "10001", "01110"),
    "7": ("11111", "00001", "00010", "00100", "01000", "01000", "01000"),
    "8": ("01110", "10001", "10001", "01110", "10001", "10001", "01110"),
    "9": ("01110", "10001", "10001", "01111", "00001", "00010", "01100"),
    "+": ("00000", "00100", "00100", "11111", "00100", "00100", "00000"),
    "-": ("00000", "00000", "00000", "11111", "00000", "00000", "00000"),
    " ": ("00000",) * 7,
}
GLYPHS = {c: np.array([[ch == "1" for ch in row] for row in rows]) for c, rows in _FONT.items()}


# ---------------------------------------------------------------- rendering


def shape_mask(shape: str) -> np.ndarray:
  """bool [SIZE, SIZE]: which pixels of an object's box the shape covers."""
  c = (np.arange(SIZE) + 0.5) - SIZE / 2
  y, x = np.meshgrid(c, c, indexing="ij")
  if shape == "box":
    return np.ones((SIZE, SIZE), bool)
  if shape == "dot":
    return x * x + y * y <= (SIZE / 2) ** 2
  if shape == "tri":  # apex up: half-width grows linearly to the base
    return np.abs(x) <= (y + SIZE / 2) / 2
  raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def render(scene: dict) -> np.ndarray:
  """uint8 [IMAGE_SIZE, IMAGE_SIZE, 3] image of a scene (module docstring)."""
  img = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
  for shape, color, x0, y0 in scene.get("objects", ()):
    region = img[y0:y0 + SIZE, x0:x0 + SIZE]
    region[shape_mask(shape)] = COLORS[color]
  for x0, height, color in scene.get("bars", ()):
    img[IMAGE_SIZE - height * BAR_UNIT:, x0:x0 + BAR_WIDTH] = COLORS[color]
  for text, x0, y0 in scene.get("text", ()):
    for i, ch in enumerate(text):
      x = x0 + i * GLYPH_PITCH
      img[y0:y0 + 7, x:x + 5][GLYPHS[ch]] = COLORS["white"]
  return img


# ---------------------------------------------------------------- objects


def cell(obj) -> tuple[int, int]:
  """(row, col), 1-based, of the cell holding the object's centre."""
  _, _, x0, y0 = obj
  return (y0 + SIZE // 2) // CELL + 1, (x0 + SIZE // 2) // CELL + 1


def label(obj) -> str:
  r, c = cell(obj)
  return f"r{r}c{c}"


def reading_order(objects) -> list:
  return sorted(objects, key=cell)


def _place(rng: np.random.Generator, n: int, free: bool) -> list[tuple[int, int]]:
  """n top-left corners: aligned (one per cell, 1 px margin) or free (anywhere,
  1 px apart, centres in distinct cells so that the cell labels name them)."""
  if not free:
    cells = rng.choice(GRID * GRID, n, replace=False)
    return [(int(c % GRID) * CELL + 1, int(c // GRID) * CELL + 1) for c in cells]
  while True:
    corners, cells = [], set()
    for _ in range(n):
      for _ in range(100):
        x0, y0 = (int(v) for v in rng.integers(0, IMAGE_SIZE - SIZE + 1, 2))
        c = cell(("", "", x0, y0))
        apart = all(abs(x0 - x) > SIZE or abs(y0 - y) > SIZE for x, y in corners)
        if apart and c not in cells:
          corners.append((x0, y0))
          cells.add(c)
          break
    if len(corners) == n:
      return corners


def _objects(rng, kinds: list[tuple[str, str]], free: bool) -> list[list]:
  return [[s, c, x0, y0] for (s, c), (x0, y0) in zip(kinds, _place(rng, len(kinds), free))]


def _pick(rng, options, k=1):
  return [options[int(i)] for i in rng.choice(len(options), k, replace=False)]


def _step(lhs: str, value: int, rng: np.random.Generator, error_rate: float) -> str:
  """"lhs=value", or with probability error_rate a slip and its correction."""
  right = f"{lhs}={value}"
  if error_rate > 0 and rng.random() < error_rate:
    wrong = value + int(rng.choice((-1, 1))) if value > 0 else value + 1
    return f"{lhs}={wrong}{CORRECTION}{right}"
  return right


# ---------------------------------------------------------------- count


def _count_sample(rng, d):
  """d1 1-3 objects of one colour and shape, aligned; d2 2-6 of two colours;
  d3 the same placed freely; d4 free, 3-7 of three colours and shapes,
  counting a colour-shape pair."""
  if d == 1:
    n, colors, shapes = int(rng.integers(1, 4)), _pick(rng, SHAPE_COLORS), _pick(rng, SHAPES)
  elif d in (2, 3):
    n, colors, shapes = int(rng.integers(2, 7)), _pick(rng, SHAPE_COLORS, 2), _pick(rng, SHAPES)
  else:
    n, colors, shapes = int(rng.integers(3, 8)), list(SHAPE_COLORS), list(SHAPES)
  kinds = [(_pick(rng, shapes)[0], _pick(rng, colors)[0]) for _ in range(n)]
  target = kinds[int(rng.integers(n))]  # at least one object matches
  body = f"count {target[1]} {target[0]}" if d == 4 else f"count {target[1]}"
  return body, {"objects": _objects(rng, kinds, free=d >= 3)}


def _count_matches(body: str, obj) -> bool:
  words = body.split()[1:]
  return obj[1] == words[0] and (len(words) == 1 or obj[0] == words[1])


def _count_answer(body, scene):
  return str(sum(_count_matches(body, o) for o in scene["objects"]))


def _row_counts(scene, keep) -> list[int]:
  """Objects `keep` accepts in each row of cells, top to bottom."""
  return [sum(keep(o) for o in scene["objects"] if cell(o)[0] == row)
          for row in range(1, GRID + 1)]


def _count_long(body, scene, rng, error_rate):
  """Row by row, a running total: "r3+2=3" = two in row 3, three so far. Each
  step looks at one row of patches and adds a small number to the line before."""
  segments, total = [], 0
  for row, k in enumerate(_row_counts(scene, lambda o: _count_matches(body, o)), 1):
    total += k
    segments.append(_step(f"r{row}+{k}", total, rng, error_rate))
  return segments


# ---------------------------------------------------------------- compare


def _compare_sample(rng, d):
  """Which colour has more objects. d1 aligned, one shape, counts 2+ apart;
  d2 aligned, mixed shapes, 1+ apart; d3 free with a third colour as distractor."""
  a, b = _pick(rng, SHAPE_COLORS, 2)
  while True:  # free placement packs at most ~8 objects: d3 keeps to that
    na, nb = (int(v) for v in rng.integers(1, 5 if d != 2 else 6, 2))
    extra = int(rng.integers(1, 3)) if d == 3 else 0
    if abs(na - nb) >= (2 if d == 1 else 1) and (d < 3 or na + nb + extra <= 8):
      break
  other = [c for c in SHAPE_COLORS if c not in (a, b)][0]
  shapes = _pick(rng, SHAPES) if d == 1 else list(SHAPES)
  colors = [a] * na + [b] * nb + [other] * extra
  kinds = [(_pick(rng, shapes)[0], c) for c in colors]
  return f"more {a} or {b}", {"objects": _objects(rng, kinds, free=d == 3)}


def _compare_counts(body, scene):
  _, a, _, b = body.split()
  return a, b, [sum(o[1] == c for o in scene["objects"]) for c in (a, b)]


def _compare_answer(body, scene):
  a, b, (na, nb) = _compare_counts(body, scene)
  return a if na > nb else b


def _compare_long(body, scene, rng, error_rate):
  """Row by row, both running totals: "r2 1,3" = 1 of the first colour and 3
  of the second in rows 1-2; then the comparison."""
  a, b, (na, nb) = _compare_counts(body, scene)
  segments, sa, sb = [], 0, 0
  for row, (ka, kb) in enumerate(zip(_row_counts(scene, lambda o: o[1] == a),
                                     _row_counts(scene, lambda o: o[1] == b)), 1):
    sa, sb = sa + ka, sb + kb
    right = f"r{row} {sa},{sb}"
    if error_rate > 0 and rng.random() < error_rate:
      right = f"r{row} {sa + 1},{sb}{CORRECTION}{right}"
    segments.append(right)
  segments.append(f"{na}{'>' if na > nb else '<'}{nb}")
  return segments


# ---------------------------------------------------------------- spatial


def _relation(a, b):
  """("col" | "row", answer) when a's box is wholly on one side of b's along one
  axis and overlaps it along the other, and their cells differ along that
  axis (so the trace's cell labels show it); else None."""
  dx, dy = a[2] - b[2], a[3] - b[3]
  (r1, c1), (r2, c2) = cell(a), cell(b)
  if abs(dx) > SIZE and abs(dy) < SIZE and c1 != c2:
    return "col", "left" if dx < 0 else "right"
  if abs(dy) > SIZE and abs(dx) < SIZE and r1 != r2:
    return "row", "above" if dy < 0 else "below"
  return None


def _spatial_sample(rng, d):
  """Where the first named object is relative to the second: wholly left /
  right of it and level with it, or wholly above / below and in line. d1 two
  objects, aligned; d2 aligned with 1-3 distractors; d3 free with distractors."""
  while True:
    n = 2 if d == 1 else int(rng.integers(3, 6))
    kinds = [(_pick(rng, SHAPES)[0], _pick(rng, SHAPE_COLORS)[0]) for _ in range(n)]
    if len(set(kinds)) < n:
      continue  # every object must be nameable by colour and shape
    objects = _objects(rng, kinds, free=d == 3)
    if _relation(objects[0], objects[1]):
      order = rng.permutation(n)
      body = f"{kinds[0][1]} {kinds[0][0]} vs {kinds[1][1]} {kinds[1][0]}"
      return body, {"objects": [objects[i] for i in order]}


def _spatial_pair(body, scene):
  first, second = body.split(" vs ")
  find = {f"{o[1]} {o[0]}": o for o in scene["objects"]}
  return first, second, find[first], find[second]


def _spatial_answer(body, scene):
  _, _, a, b = _spatial_pair(body, scene)
  return _relation(a, b)[1]


def _spatial_long(body, scene, rng, error_rate):
  del rng, error_rate  # no arithmetic step to slip on
  first, second, a, b = _spatial_pair(body, scene)
  axis, _ = _relation(a, b)
  (r1, c1), (r2, c2) = cell(a), cell(b)
  x, y = (f"c{c1}", f"c{c2}") if axis == "col" else (f"r{r1}", f"r{r2}")
  return [f"{first} {label(a)}", f"{second} {label(b)}", f"{x}{'<' if x < y else '>'}{y}"]


# ---------------------------------------------------------------- bars


def _bars_sample(rng, d):
  """The tallest bar of a chart. d1 two bars 3+ units apart; d2 three or four
  bars, top two 2+ apart; d3 four coloured bars off the patch grid, 1+ apart."""
  k = 2 if d == 1 else int(rng.integers(3, 5)) if d == 2 else 4
  gap = {1: 3, 2: 2, 3: 1}[d]
  while True:
    heights = [int(h) for h in rng.integers(1, MAX_BAR + 1, k)]
    top = sorted(heights)
    if top[-1] - top[-2] >= gap:
      break
  if d < 3:
    slots = sorted(int(s) for s in rng.choice(GRID, k, replace=False))
    xs = [s * CELL + 2 for s in slots]
  else:
    while True:  # shifted across patch borders, still 1+ px apart
      xs = [min(max(s * CELL + 2 + int(rng.integers(-3, 4)), 0), IMAGE_SIZE - BAR_WIDTH)
            for s in range(k)]
      if all(b - a > BAR_WIDTH for a, b in zip(xs, xs[1:])):
        break
  colors = ["white"] * k if d < 3 else [_pick(rng, SHAPE_COLORS)[0] for _ in range(k)]
  return "tallest bar", {"bars": [[x, h, c] for x, h, c in zip(xs, heights, colors)]}


def _bars_answer(body, scene):
  del body
  heights = [h for _, h, _ in sorted(scene["bars"])]
  return str(heights.index(max(heights)) + 1)


def _bars_long(body, scene, rng, error_rate):
  del body, rng, error_rate
  heights = [h for _, h, _ in sorted(scene["bars"])]
  return [f"{i + 1}:h{h}" for i, h in enumerate(heights)] + [f"max h{max(heights)}"]


# ---------------------------------------------------------------- arithmetic


def _arith_sample(rng, d):
  """Arithmetic written in pixels. d1 "a+b" one digit each, one glyph per
  patch; d2 "ab+c" / "ab-c"; d3 "ab" over "+cd" / "-cd" (column layout);
  d4 d3 shifted off the patch grid by up to 2 px."""
  op = "+" if d == 1 or rng.random() < 0.5 else "-"
  digits = lambda lo, hi: int(rng.integers(lo, hi))  # noqa: E731
  a, b = (digits(0, 10), digits(0, 10)) if d == 1 else (
      (digits(10, 100), digits(0, 10)) if d == 2 else (digits(10, 100), digits(10, 100)))
  if op == "-" and b > a:
    a, b = b, a
  expr = f"{a}{op}{b}"
  if d <= 2:
    row, col = int(rng.integers(0, GRID)), int(rng.integers(0, GRID - len(expr) + 1))
    lines = [[expr, col * CELL + 1, row * CELL]]
  else:
    row = int(rng.integers(0, GRID - 1))
    lines = [[f" {a}", CELL + 1, row * CELL], [f"{op}{b}", CELL + 1, (row + 1) * CELL]]
    if d == 4:  # both lines shift together, inside the image
      top, bottom = lines[0][2], lines[1][2] + 7
      dx = int(rng.integers(-2, 3))
      dy = int(rng.integers(max(-2, -top), min(2, IMAGE_SIZE - bottom) + 1))
      lines = [[t, x + dx, y + dy] for t, x, y in lines]
  return "calc", {"text": lines}


def _arith_expr(scene) -> str:
  return "".join(t for t, _, _ in scene["text"]).replace(" ", "")


def _arith_answer(body, scene):
  del body
  a, op, b = _split_expr(_arith_expr(scene))
  return str(a + b if op == "+" else a - b)


def _split_expr(expr):
  i = max(expr.rfind("+"), expr.rfind("-"))
  return int(expr[:i]), expr[i], int(expr[i + 1:])


def _arith_long(body, scene, rng, error_rate):
  expr, answer = _arith_expr(scene), _arith_answer(body, scene)
  family = TEXT_FAMILIES["add" if "+" in expr else "chain"]
  return [f"see {expr}"] + family.long(expr, answer, rng, error_rate, 200)


# ---------------------------------------------------------------- table


@dataclasses.dataclass(frozen=True)
class VisualFamily:
  """One task family as plain functions: sample(rng, d) -> (body, scene);
  answer(body, scene) -> str; long(body, scene, rng, error_rate) -> trace
  segments (joined by ';' before the answer); answer_type: the prompt-set
  `type` whose verifier applies in a prompt file."""
  max_difficulty: int
  sample: Callable[[np.random.Generator, int], tuple[str, dict]]
  answer: Callable[[str, dict], str]
  long: Callable[..., list[str]]
  answer_type: str


FAMILIES = {
    "count": VisualFamily(4, _count_sample, _count_answer, _count_long, "math"),
    "compare": VisualFamily(3, _compare_sample, _compare_answer, _compare_long,
                            "multiple_choice"),
    "spatial": VisualFamily(3, _spatial_sample, _spatial_answer, _spatial_long,
                            "multiple_choice"),
    "bars": VisualFamily(3, _bars_sample, _bars_answer, _bars_long, "math"),
    "arith": VisualFamily(4, _arith_sample, _arith_answer, _arith_long, "math"),
}
