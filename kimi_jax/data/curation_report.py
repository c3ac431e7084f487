"""The curation report: what was kept and dropped and why, as JSON and Markdown.

`summary(result, ...)` is the JSON object (report.json): counts by reason,
type, difficulty bucket, tag and pass rate, flags, the settings, stage
timings, and one row per input prompt (`curation.Record`). `markdown(summary)`
renders it for reading (report.md); the per-prompt listing there is capped at
MAX_MARKDOWN_ROWS dropped prompts (report.json has them all).
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, Optional, Sequence

from kimi_jax.data import curation

MAX_MARKDOWN_ROWS = 200
MAX_INVALID_LINES = 50

REASON_TEXT = {
    "type": "type in drop_types (multiple choice / true-false / proof can be guessed or "
            "not verified)",
    "too_long": "prompt + response budget longer than the model's context",
    "guessable": "answered right without reasoning within the guess attempts",
    "too_easy": "pass rate >= max_pass_rate",
    "too_hard": "pass rate < min_pass_rate",
    "balance_bucket": "difficulty bucket over max_per_bucket",
    "balance_tag": "a tag over max_per_tag",
}


def summary(result: curation.CurationResult, *, source: str = "", skipped_invalid: int = 0,
            invalid_lines: Sequence[str] = ()) -> dict[str, Any]:
  """The report.json object of a curation run."""
  records = result.records
  kept = [r for r in records if r.kept]
  by_type: dict[str, Any] = {}
  for r in records:
    row = by_type.setdefault(r.type, {"input": 0, "kept": 0, "dropped": {}})
    row["input"] += 1
    if r.kept:
      row["kept"] += 1
    else:
      row["dropped"][r.reason] = row["dropped"].get(r.reason, 0) + 1
  buckets: dict[str, Any] = {}
  for r in records:
    if r.bucket is not None:  # reached the balancing stage
      row = buckets.setdefault(r.bucket, {"before_balance": 0, "kept": 0})
      row["before_balance"] += 1
      row["kept"] += r.kept
  tags: dict[str, Any] = {}
  for r in records:
    for t in sorted(set(r.tags)) or ["(untagged)"]:
      row = tags.setdefault(t, {"input": 0, "kept": 0})
      row["input"] += 1
      row["kept"] += r.kept
  rates = collections.Counter(f"{r.pass_rate:.2f}" for r in records if r.pass_rate is not None)
  flags: dict[str, Any] = {}
  for r in records:
    for f in r.flags:
      row = flags.setdefault(f, {"total": 0, "kept": 0})
      row["total"] += 1
      row["kept"] += r.kept
  dropped = collections.Counter(r.reason for r in records if not r.kept)
  return {
      "input": {"path": source, "prompts": len(records), "skipped_invalid": skipped_invalid,
                "invalid_lines": list(invalid_lines[:MAX_INVALID_LINES])},
      "kept": len(kept),
      "dropped": len(records) - len(kept),
      "dropped_by_reason": {k: dropped[k] for k in curation.DROP_REASONS if dropped[k]},
      "by_type": dict(sorted(by_type.items())),
      "by_difficulty_bucket": dict(sorted(buckets.items())),
      "by_tag": dict(sorted(tags.items())),
      "pass_rate_histogram": dict(sorted(rates.items())),
      "flags": flags,
      "config": dataclasses.asdict(result.config),
      "stats": dict(result.stats),
      "prompts": [{**dataclasses.asdict(r), "kept": r.kept} for r in records],
  }


def _cell(value: Any) -> str:
  """A Markdown table cell: pipes escaped, one line."""
  return " ".join(str(value).split()).replace("|", "\\|")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
  return lines + [""]


def _percent(part: int, whole: int) -> str:
  return f"{100 * part / whole:.0f}%" if whole else "-"


def markdown(report: dict[str, Any], title: Optional[str] = None) -> str:
  """report.md: the summary tables, then the dropped prompts (capped)."""
  n, kept = report["input"]["prompts"], report["kept"]
  source = report["input"]["path"] or "(prompts given in code)"
  out = [f"# {title or 'Prompt-set curation report'}", "",
         f"Input: `{source}`: {n} prompts"
         + (f" ({report['input']['skipped_invalid']} invalid lines skipped)"
            if report["input"]["skipped_invalid"] else "") + ".",
         f"Kept **{kept}** ({_percent(kept, n)}), dropped {report['dropped']}.", ""]
  if report["dropped_by_reason"]:
    out += ["## Dropped, by reason", ""]
    out += _table(["reason", "prompts", "meaning"],
                  [(k, v, REASON_TEXT[k]) for k, v in report["dropped_by_reason"].items()])
  out += ["## By type", ""]
  out += _table(["type", "input", "kept", "dropped by"],
                [(t, row["input"], row["kept"],
                  ", ".join(f"{k} {v}" for k, v in row["dropped"].items()) or "-")
                 for t, row in report["by_type"].items()])
  if report["by_difficulty_bucket"]:
    out += ["## Difficulty buckets (difficulty = 1 - pass rate)", ""]
    out += _table(["bucket", "before balancing", "kept"],
                  [(b, row["before_balance"], row["kept"])
                   for b, row in report["by_difficulty_bucket"].items()])
  if report["pass_rate_histogram"]:
    out += ["## Pass rates (prompts measured)", ""]
    out += _table(["pass rate", "prompts"], list(report["pass_rate_histogram"].items()))
  out += ["## Tags", ""]
  out += _table(["tag", "input", "kept"],
                [(t, row["input"], row["kept"]) for t, row in report["by_tag"].items()])
  if report["flags"]:
    out += ["## Flags", ""]
    out += _table(["flag", "prompts", "kept"],
                  [(f, row["total"], row["kept"]) for f, row in report["flags"].items()])
  out += ["## Settings", "", "```"]
  out += [f"{k} = {v!r}" for k, v in report["config"].items()]
  out += ["```", "", "Stats: " + ", ".join(f"{k} {v}" for k, v in report["stats"].items()), ""]
  dropped = [r for r in report["prompts"] if not r["kept"]]
  if dropped:
    out += [f"## Dropped prompts ({len(dropped)})", ""]
    shown = dropped[:MAX_MARKDOWN_ROWS]
    out += _table(["id", "type", "reason", "detail"],
                  [(r["id"], r["type"], r["reason"], r["detail"]) for r in shown])
    if len(dropped) > len(shown):
      out += [f"... and {len(dropped) - len(shown)} more: see report.json.", ""]
  if report["input"]["invalid_lines"]:
    out += ["## Invalid input lines (skipped)", ""]
    out += [f"- {_cell(e)}" for e in report["input"]["invalid_lines"]] + [""]
  return "\n".join(out)
