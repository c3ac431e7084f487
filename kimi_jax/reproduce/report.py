"""DIR/REPORT.md: per claim the verdict, each effect's numbers over seeds,
its figure, and the commands that regenerate every run; DIR/report.json
holds the same numbers for scripts."""
from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

from kimi_jax import sweep
from kimi_jax.reproduce import verdicts
from kimi_jax.reproduce.claims import Result
from kimi_jax.reproduce.suites import Suite

REPORT_NAME, JSON_NAME = "REPORT.md", "report.json"


def _effect_rows(result: Result) -> list[str]:
  rows = ["| effect | mean +- se over seeds | verdict |", "|---|---|---|"]
  rows += [f"| {e.claim} | {e.numbers()} | {e.verdict} |" for e in result.effects]
  return rows


def commands(suite: Suite, plan: Sequence[tuple[str, dict, str, bool]]) -> list[str]:
  """One launch.train command per run of `runner.plan` (what the runner does in-process)."""
  return [sweep.launch_command(suite.config, run_dir, overrides)
          for _, overrides, run_dir, _ in plan]


def markdown(suite: Suite, results: Sequence[Result], figures: Mapping[str, str],
             workdir: str, stage_seconds: Mapping[str, float], machine: str) -> str:
  hours = sum(stage_seconds.values()) / 3600
  lines = [f"# Reproducing Kimi k1.5's claims at toy scale (suite `{suite.name}`)", "",
           f"Suite: {suite.about}; seeds {list(suite.seeds)}; arms {list(suite.arms)}. "
           f"Every arm of a seed starts from that seed's SFT warm-up.",
           f"Machine: {machine}. Runs recorded: {len(stage_seconds)}, "
           f"{hours:.2f} h of wall time in all.", "",
           "Regenerate (resumes what exists):", "", "```bash",
           f"python -m launch.reproduce --suite={suite.name} --workdir={workdir}", "```", "",
           "Verdicts follow one rule fixed before the runs (`kimi_jax/reproduce/verdicts.py`): "
           "an effect claimed positive is *reproduced* when every seed is positive and the mean "
           "exceeds 2 standard errors, *not reproduced* when the mean is <= 0, else "
           "*inconclusive*; an effect claimed equal is *reproduced* when |mean| + se is within "
           f"{100 * verdicts.ACCURACY_TOLERANCE:.0f} points (the evaluation noise), *not "
           "reproduced* when |mean| - se is beyond it. \"Final\" is the mean of the last three "
           "held-out evaluations; figures show the mean over seeds and the min-max band.", "",
           "| claim | report | verdict |", "|---|---|---|"]
  lines += [f"| {r.claim.title} | {r.claim.report} | **{r.verdict}** |" for r in results]
  for i, r in enumerate(results, 1):
    lines += ["", f"## {i}. {r.claim.title} ({r.claim.report})", "",
              f"**Verdict: {r.verdict}.**" + (f" Seeds: {list(r.seeds)}." if r.seeds else "")]
    if r.note:
      lines += ["", r.note]
    if r.effects:
      lines += [""] + _effect_rows(r)
    if r.claim.key in figures:
      rel = os.path.relpath(figures[r.claim.key], workdir)
      lines += ["", f"![{r.claim.key}]({rel})"]
  return "\n".join(lines) + "\n"


def as_json(suite: Suite, results: Sequence[Result],
            stage_seconds: Mapping[str, float]) -> dict:
  return {"suite": suite.name, "seeds": list(suite.seeds), "stage_seconds": dict(stage_seconds),
          "claims": {r.claim.key: {
              "title": r.claim.title, "verdict": r.verdict, "seeds": list(r.seeds),
              "note": r.note,
              "effects": [{"claim": e.claim, "kind": e.kind, "per_seed": list(e.per_seed),
                           "mean": e.mean, "se": e.se, "unit": e.unit, "scale": e.scale,
                           "verdict": e.verdict} for e in r.effects]}
              for r in results}}


def _write(path: str, text: str) -> None:
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def write(suite: Suite, results: Sequence[Result], figures: Mapping[str, str], workdir: str,
          stage_seconds: Mapping[str, float], machine: str, cmds: Sequence[str]) -> str:
  """Writes DIR/REPORT.md (with the per-run commands at the end) and DIR/report.json."""
  text = markdown(suite, results, figures, workdir, stage_seconds, machine)
  text += ("\n## Every run as its own command\n\nWhat `launch.reproduce` runs in-process, "
           "one after another:\n\n```bash\n" + "\n".join(cmds) + "\n```\n")
  path = os.path.join(workdir, REPORT_NAME)
  _write(path, text)
  _write(os.path.join(workdir, JSON_NAME),
         json.dumps(as_json(suite, results, stage_seconds), indent=1, default=float))
  return path
