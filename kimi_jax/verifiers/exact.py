"""Exact-match rewards for synthetic tasks: extract the final answer, compare strings.

  from kimi_jax.verifiers import exact
  exact.verify("4+3=7;A:7\n", "7", tag="A:")          # -> True
  exact.check("... so the answer is 12.", "12")       # -> Verdict(True, 'exact_match', '12')

Both sides are compared after whitespace normalisation (runs of whitespace
become one space, ends stripped); nothing else is forgiven ("7.0" != "7"),
which is the point for toy tasks with one canonical answer. For answers that
may be written several ways, use `verifiers.math`.
"""
from __future__ import annotations

from typing import Optional

from kimi_jax.verifiers.math import Verdict, extract_answer


def normalize(text: str) -> str:
  """Whitespace-normalised text: single spaces, no leading or trailing space."""
  return " ".join(text.split())


def extract_final(response: str, tag: Optional[str] = None) -> Optional[str]:
  """The final answer of `response`.

  With `tag` (e.g. "A:" for data/synthetic.py): the text after its last
  occurrence, up to the end of that line. Without: the last \\boxed{},
  else "answer is ...", else the last number (`math.extract_answer`).
  """
  if not isinstance(response, str):
    return None
  if tag is None:
    return extract_answer(response)
  at = response.rfind(tag)
  if at < 0:
    return None
  answer = response[at + len(tag):].split("\n", 1)[0].strip()
  return answer or None


def check(response: str, answer: str, tag: Optional[str] = None) -> Verdict:
  """Whether the extracted final answer equals `answer` exactly (modulo whitespace).

  Never raises; reasons: 'exact_match', 'no_answer', 'mismatch', 'error: ...'.
  """
  try:
    extracted = extract_final(response, tag)
    if extracted is None:
      return Verdict(False, "no_answer")
    if normalize(extracted) == normalize(str(answer)):
      return Verdict(True, "exact_match", extracted)
    return Verdict(False, "mismatch", extracted)
  except Exception as e:  # pylint: disable=broad-except
    return Verdict(False, f"error: {type(e).__name__}: {e}"[:300])


def verify(response: str, answer: str, tag: Optional[str] = None) -> bool:
  """True when the response's final answer equals `answer` modulo whitespace."""
  return check(response, answer, tag).correct
