"""The task families behind `kimi_jax.data.synthetic`: sample, trace, key, check.

Every function here works on a prompt *body*, the text between "Q:" and the
closing "=" of a prompt, so a problem read back from JSONL can be re-traced
and re-verified without any hidden state.

Families (difficulty d):
  add        d-digit + d-digit. Long CoT adds column by column and rewrites
             the state after each column: what is left of both operands, the
             carry and the result digits so far ("473+291 c1 r4"). Each step
             then reads only the line before it, which a tiny model can learn.
  chain      d operations over one-digit numbers with + - *, usual precedence.
             Long CoT reduces one operation per step ('*' first, then left to
             right) and rewrites the remaining expression.
  countdown  d+1 one-digit numbers and a target; use every number once with
             + - * (parentheses allowed). Long CoT explores: a few left-to-right
             attempts that miss ("... no"), then one that hits ("... yes").

A step may be written wrong on purpose and corrected at once:
"3+1+1=6 wait 3+1+1=5" (the report's evaluation/reflection behaviour).
"""
from __future__ import annotations

import dataclasses
import itertools
import re
from typing import Callable, Optional

import numpy as np

CORRECTION = " wait "  # between a wrong step and its corrected restatement
_OPS = ("+", "-", "*")


def _slip(value: int, rng: np.random.Generator) -> int:
  """A plausible wrong result: off by one (or by ten), never negative."""
  deltas = (-10, -1, 1, 10) if value >= 10 else (-1, 1, 2)
  while True:
    wrong = value + int(rng.choice(deltas))
    if wrong >= 0:
      return wrong


def _step(lhs: str, value: int, rng: np.random.Generator, error_rate: float) -> str:
  """"lhs=value", or with probability error_rate a slip and its correction."""
  right = f"{lhs}={value}"
  if error_rate > 0 and rng.random() < error_rate:
    return f"{lhs}={_slip(value, rng)}{CORRECTION}{right}"
  return right


# ---------------------------------------------------------------- add

def _add_operands(body: str) -> tuple[str, str]:
  m = re.fullmatch(r"(\d+)\+(\d+)", body)
  if not m:
    raise ValueError(f"not an 'add' prompt body: {body!r}")
  return m.group(1), m.group(2)


def _add_sample(rng: np.random.Generator, d: int) -> tuple[str, str]:
  lo = 0 if d == 1 else 10 ** (d - 1)
  a, b = (int(x) for x in rng.integers(lo, 10 ** d, size=2))
  return f"{a}+{b}", str(a + b)


def _add_long(body, answer, rng, error_rate, budget) -> list[str]:
  del answer, budget  # a d-digit trace is ~20*d bytes, well inside the budget
  a, b = _add_operands(body)
  n = max(len(a), len(b))
  a, b = a.zfill(n), b.zfill(n)
  carry, digits, segments = 0, "", []
  while a:
    x, y = int(a[-1]), int(b[-1])
    a, b = a[:-1], b[:-1]
    total = x + y + carry
    segments.append(_step(f"{x}+{y}" + ("+1" if carry else ""), total, rng, error_rate))
    carry, digits = total // 10, str(total % 10) + digits
    segments.append((f"{a}+{b} " if a else "") + f"c{carry} r{digits}")
  return segments


def _add_key(body: str) -> str:
  a, b = sorted(int(x) for x in _add_operands(body))
  return f"{a}+{b}"  # commutative: "3+4" and "4+3" are one problem


# ---------------------------------------------------------------- chain

def _chain_tokens(body: str) -> list:
  if not re.fullmatch(r"\d+(?:[-+*]\d+)+", body):
    raise ValueError(f"not a 'chain' prompt body: {body!r}")
  return [t if t in _OPS else int(t) for t in re.findall(r"\d+|[-+*]", body)]


def _chain_key(body: str) -> str:
  tokens = _chain_tokens(body)
  if len(tokens) == 3 and tokens[1] != "-":  # "4*3" = "3*4"; "3+4" = add's "3+4"
    a, b = sorted((tokens[0], tokens[2]))
    return f"{a}{tokens[1]}{b}"
  return body


def _chain_reduce(tokens: list) -> Optional[list[tuple[str, int, list]]]:
  """Steps (lhs, value, tokens after the step): '*' first, then left to right.

  None when a step leaves 0..99 or multiplies a number above 9 (kept out so
  that every step is a one-line fact a tiny model can learn).
  """
  steps = []
  while len(tokens) > 1:
    i = tokens.index("*") if "*" in tokens else 1
    a, op, b = tokens[i - 1:i + 2]
    if op == "*" and (a > 9 or b > 9):
      return None
    value = a * b if op == "*" else a + b if op == "+" else a - b
    if not 0 <= value <= 99:
      return None
    tokens = tokens[:i - 1] + [value] + tokens[i + 2:]
    steps.append((f"{a}{op}{b}", value, tokens))
  return steps


def _chain_sample(rng: np.random.Generator, d: int) -> tuple[str, str]:
  while True:  # rejection: about half the draws are valid at d = 5
    nums = [int(x) for x in rng.integers(1, 10, size=d + 1)]
    ops = [_OPS[int(i)] for i in rng.integers(0, 3, size=d)]
    tokens = [nums[0]] + [t for pair in zip(ops, nums[1:]) for t in pair]
    steps = _chain_reduce(tokens)
    if steps:
      return "".join(map(str, tokens)), str(steps[-1][1])


def _chain_long(body, answer, rng, error_rate, budget) -> list[str]:
  del answer, budget  # a 5-op trace is ~90 bytes
  steps = _chain_reduce(_chain_tokens(body))
  if steps is None:
    raise ValueError(f"'chain' body {body!r} has a step outside 0..99 or a '*' above 9")
  segments = []
  for lhs, value, rest in steps:
    segments.append(_step(lhs, value, rng, error_rate))
    if len(rest) > 1:
      segments.append("".join(map(str, rest)))
  return segments


# ---------------------------------------------------------------- countdown

def _cd_parse(body: str) -> tuple[list[int], int]:
  m = re.fullmatch(r"(\d+(?:,\d+)+) to (\d+)", body)
  if not m:
    raise ValueError(f"not a 'countdown' prompt body: {body!r}")
  return [int(x) for x in m.group(1).split(",")], int(m.group(2))


def _cd_run(nums, ops) -> Optional[list[tuple[str, int]]]:
  """Left-to-right steps of nums[0] ops[0] nums[1] ...; None if a value leaves 0..99."""
  steps, acc = [], nums[0]
  for op, b in zip(ops, nums[1:]):
    value = acc * b if op == "*" else acc + b if op == "+" else acc - b
    if not 0 <= value <= 99:
      return None
    steps.append((f"{acc}{op}{b}", value))
    acc = value
  return steps


def _cd_expr(nums, ops) -> str:
  """The left-to-right chain as an ordinary expression, parenthesised where needed."""
  expr, low = str(nums[0]), False  # low: expr has a top-level + or -
  for op, b in zip(ops, nums[1:]):
    if op == "*" and low:
      expr = f"({expr})"
    expr, low = f"{expr}{op}{b}", op != "*"
  return expr


def _cd_sample(rng: np.random.Generator, d: int) -> tuple[str, str]:
  while True:
    nums = [int(x) for x in rng.integers(1, 10, size=d + 1)]
    ops = [_OPS[int(i)] for i in rng.integers(0, 3, size=d)]
    steps = _cd_run(nums, ops)
    if steps and steps[-1][1] > 0:
      # The prompt lists the numbers sorted: it does not give the order away,
      # and the prompt is then a function of the canonical content.
      return f"{','.join(map(str, sorted(nums)))} to {steps[-1][1]}", _cd_expr(nums, ops)


def _cd_solution(nums, target, answer) -> tuple[list[int], list[str]]:
  """A left-to-right chain that hits the target: the answer's own, else a search."""
  toks = re.findall(r"\d+|[-+*]", answer)
  order, ops = [int(t) for t in toks[::2]], toks[1::2]
  if sorted(order) == sorted(nums) and len(ops) == len(order) - 1:
    steps = _cd_run(order, ops)
    if steps and steps[-1][1] == target and _cd_expr(order, ops) == answer:
      return order, ops
  for perm in itertools.permutations(nums):
    for ops in itertools.product(_OPS, repeat=len(nums) - 1):
      steps = _cd_run(perm, ops)
      if steps and steps[-1][1] == target:
        return list(perm), list(ops)
  raise ValueError(f"countdown {nums} to {target} has no left-to-right solution")


def _cd_attempt(nums, ops, rng, error_rate, hit: bool) -> str:
  steps = _cd_run(nums, ops)
  return ",".join(_step(lhs, v, rng, error_rate) for lhs, v in steps) + (" yes" if hit else " no")


def _cd_long(body, answer, rng, error_rate, budget) -> list[str]:
  nums, target = _cd_parse(body)
  order, ops = _cd_solution(nums, target, answer)
  misses = []
  for _ in range(int(rng.integers(0, len(nums)))):  # 0..d failed attempts
    for _ in range(20):
      perm = [int(x) for x in rng.permutation(nums)]
      tries = [_OPS[int(i)] for i in rng.integers(0, 3, size=len(nums) - 1)]
      steps = _cd_run(perm, tries)
      if steps and steps[-1][1] != target:
        misses.append((perm, tries))
        break
  while True:  # drop misses (then slips) until the trace fits the byte budget
    segments = [_cd_attempt(p, o, rng, error_rate, False) for p, o in misses]
    segments.append(_cd_attempt(order, ops, rng, error_rate, True))
    if len(";".join(segments)) <= budget:
      return segments
    if misses:
      misses.pop()
    else:
      error_rate = 0.0


def _cd_value(text: str) -> Optional[tuple[int, list[int]]]:
  """(value, numbers used) of an expression of + - * and parentheses; None if malformed."""
  if len(text) > 64 or not re.fullmatch(r"[0-9+\-*()]+", text):
    return None
  toks, pos, used = re.findall(r"\d+|[-+*()]", text), 0, []

  def atom():
    nonlocal pos
    tok = toks[pos] if pos < len(toks) else None
    pos += 1
    if tok == "(":
      value = expr()
      if pos >= len(toks) or toks[pos] != ")":
        raise ValueError
      pos += 1
      return value
    if tok is None or not tok.isdigit():
      raise ValueError
    used.append(int(tok))
    return int(tok)

  def term():
    nonlocal pos
    value = atom()
    while pos < len(toks) and toks[pos] == "*":
      pos += 1
      value *= atom()
    return value

  def expr():
    nonlocal pos
    value = term()
    while pos < len(toks) and toks[pos] in "+-":
      op, pos = toks[pos], pos + 1
      value = value + term() if op == "+" else value - term()
    return value

  try:
    value = expr()
  except (ValueError, RecursionError):
    return None
  return (value, used) if pos == len(toks) else None


def _cd_check(body: str, answer: str, candidate: str) -> bool:
  del answer  # any expression that uses each number once and hits the target
  nums, target = _cd_parse(body)
  result = _cd_value(candidate)
  return result is not None and result[0] == target and sorted(result[1]) == sorted(nums)


# ---------------------------------------------------------------- table

@dataclasses.dataclass(frozen=True)
class Family:
  """One task family, as plain functions of the prompt body.

  sample(rng, d) -> (body, answer); long(body, answer, rng, error_rate,
  budget) -> trace segments (joined by ';' before the answer; `budget` is
  the byte limit on the joined segments); key(body) -> canonical content,
  comparable across families (equal keys = the same problem: add's "3+4" is
  chain's "4+3"); check(body, answer, candidate) -> bool.
  """
  max_difficulty: int
  sample: Callable[[np.random.Generator, int], tuple[str, str]]
  long: Callable[..., list[str]]
  key: Callable[[str], str]
  check: Callable[[str, str, str], bool]
  answer_type: str  # the prompt-set `type`: which verifier applies


def _exact(body: str, answer: str, candidate: str) -> bool:
  del body
  return candidate == answer


FAMILIES = {
    "add": Family(4, _add_sample, _add_long, _add_key, _exact, "math"),
    "chain": Family(5, _chain_sample, _chain_long, _chain_key, _exact, "math"),
    "countdown": Family(4, _cd_sample, _cd_long, lambda body: body, _cd_check, "countdown"),
}
