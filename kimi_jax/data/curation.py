"""Prompt-set curation (report §2.1, impl. note 10): hackable types, guessable
prompts, difficulty by pass rate, balance; every prompt's fate is recorded.

  from kimi_jax.data import curation, prompts
  model = curation.load_text_model("/ckpt/sft_model", vocab="bytes")
  result = curation.curate(prompts.read_jsonl("in.jsonl").prompts, model)
  result.kept, result.records          # curated prompts; why each was kept or dropped

Stages, cheapest first, so the model only samples prompts still in play:
  1. type       types in `drop_types` are dropped (default multiple_choice,
                true_false, proof: a choice can be guessed, a proof not
                verified). These types are flagged "hackable_type" even when
                kept; types without a checker (proof) are flagged "unverifiable"
                and skip stages 3-4 (their difficulty is left as given).
  2. too_long   prompt + response budget does not fit the model.
  3. guessable  answer without reasoning: the prompt followed by
                `answer_marker` ("...\\nThe answer is "), `guess_max_new_tokens`
                new tokens, `guess_attempts` (N = 8) samples; a prompt
                answered right by any attempt is dropped. Types with an
                answer only (math, multiple_choice, true_false); the checker
                sees marker + guess, so "The answer is B" is read as "B".
  4. pass rate  `samples` (n = 10) responses at `temperature` (1.0), each up
                to `max_new_tokens`; pass rate = correct / n; difficulty :=
                1 - pass rate (larger = harder, as `rl/prompt_sampler.py`
                reads it). Kept iff min_pass_rate <= pass rate < max_pass_rate:
                by default only prompts solved n times out of n are dropped.
  5. balance    difficulty buckets (`difficulty_buckets` equal bins of
                [0, 1]; "unmeasured" for prompts of stage-1 survivors not
                measured) and tags are capped at `max_per_bucket` /
                `max_per_tag` prompts; prompts are visited in a seeded random
                order and kept while their bucket and every tag have room.

Small interfaces, so curation runs with a fake model in tests: a `TextModel`
(texts in, texts out: `text_model` wraps `sampling.generate`) and a checker
`(prompt, response) -> bool` (default: the trainer's own reward,
`rl.rewards.PromptVerifier`, correct iff the reward is 1).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np
from absl import logging

from kimi_jax.data import curation_journal
from kimi_jax.data import prompts as prompts_lib
from kimi_jax.data.curation_model import CurationError  # noqa: F401
from kimi_jax.data.curation_model import TextModel, load_text_model, text_model  # noqa: F401
from kimi_jax.data.prompts import Prompt

HACKABLE_TYPES = ("multiple_choice", "true_false", "proof")  # report §2.1
GUESS_TYPES = prompts_lib.ANSWER_TYPES  # a final answer that can be guessed
CHECKABLE_TYPES = ("math", "code", "multiple_choice", "true_false")
DROP_REASONS = ("type", "too_long", "guessable", "too_easy", "too_hard", "balance_bucket",
                "balance_tag")
UNMEASURED = "unmeasured"
OUTPUT_FILES = ("curated.jsonl", "report.json", "report.md")
_STAGE_SEED = {"guess": 1, "pass_rate": 2}  # stages draw from distinct seeds

Checker = Callable[[Prompt, str], bool]


@dataclasses.dataclass(frozen=True)
class CurationConfig:
  """Settings of `curate` (defaults: the report's values where it gives them)."""
  samples: int = 10  # n responses per prompt for its pass rate (report: 10)
  temperature: float = 1.0  # "relatively high" (report gives no value)
  max_new_tokens: int = 1024  # budget of one reasoning response
  guess_attempts: int = 8  # N immediate answers (report: 8); 0 turns stage 3 off
  guess_temperature: float = 1.0
  guess_max_new_tokens: int = 32  # room for an answer, not for reasoning
  answer_marker: str = "\nThe answer is "  # appended to the prompt to force an answer now
  drop_types: tuple[str, ...] = HACKABLE_TYPES
  min_pass_rate: float = 0.0  # kept iff min_pass_rate <= pass rate < max_pass_rate
  max_pass_rate: float = 1.0  # > 1 keeps prompts solved every time too
  difficulty_buckets: int = 5
  max_per_bucket: Optional[int] = None  # None: no cap
  max_per_tag: Optional[int] = None
  seed: int = 0
  prompts_per_call: int = 64  # prompts per model call (x samples rows); progress unit
  check_workers: int = 2  # threads running the checker (math-verify, code sandbox)

  def __post_init__(self):
    positive = ("samples", "max_new_tokens", "guess_max_new_tokens", "difficulty_buckets",
                "prompts_per_call", "check_workers")
    for name in positive:
      if getattr(self, name) < 1:
        raise CurationError(f"CurationConfig.{name} must be >= 1, got {getattr(self, name)}")
    for name in ("guess_attempts", "temperature", "guess_temperature"):
      if getattr(self, name) < 0:
        raise CurationError(f"CurationConfig.{name} must be >= 0, got {getattr(self, name)}")
    for name in ("max_per_bucket", "max_per_tag"):
      if getattr(self, name) is not None and getattr(self, name) < 1:
        raise CurationError(f"CurationConfig.{name} must be >= 1 or None, got "
                            f"{getattr(self, name)}")
    unknown = sorted(set(self.drop_types) - set(prompts_lib.PROMPT_TYPES))
    if unknown:
      raise CurationError(f"CurationConfig.drop_types: unknown types {unknown}; "
                       f"known: {list(prompts_lib.PROMPT_TYPES)}")
    if not 0.0 <= self.min_pass_rate < self.max_pass_rate:
      raise CurationError(f"CurationConfig: need 0 <= min_pass_rate < max_pass_rate, got "
                       f"{self.min_pass_rate} and {self.max_pass_rate}")
    object.__setattr__(self, "drop_types", tuple(self.drop_types))


def default_checker(math_timeout_s: float = 5.0, code_timeout_s: float = 5.0) -> Checker:
  """Correct iff `rewards.is_correct` of the verifier's score (all tests, for code): the
  trainer's definition."""
  from kimi_jax.rl import rewards  # pylint: disable=g-import-not-at-top
  verifier = rewards.PromptVerifier(math_timeout_s=math_timeout_s,
                                    code_timeout_s=code_timeout_s)
  return lambda prompt, response: bool(rewards.is_correct(verifier(prompt, response)))


# ------------------------------------------------------------------ curation


@dataclasses.dataclass
class Record:
  """The fate of one input prompt (a row of the report).

  reason: "kept" or one of DROP_REASONS; detail says why in words.
  flags: "hackable_type" (multiple_choice / true_false / proof),
    "unverifiable" (no checker: guess and pass rate not measured).
  guess_correct: right immediate answers out of `guess_attempts` (None: not run).
  pass_rate: correct / samples (None: not measured).
  difficulty: as written to the curated file (None when dropped before stage 4).
  bucket: difficulty bucket label used for balancing.
  """
  id: str
  type: str
  tags: list[str]
  reason: str = "kept"
  detail: str = ""
  flags: list[str] = dataclasses.field(default_factory=list)
  guess_correct: Optional[int] = None
  pass_rate: Optional[float] = None
  difficulty: Optional[float] = None
  bucket: Optional[str] = None

  @property
  def kept(self) -> bool:
    return self.reason == "kept"


@dataclasses.dataclass(frozen=True)
class CurationResult:
  """kept: curated prompts, input order, difficulty = 1 - pass rate where
  measured. records: one per input prompt, input order. stats: counters and
  seconds per stage (check_errors: checker exceptions, counted as wrong)."""
  kept: tuple[Prompt, ...]
  records: tuple[Record, ...]
  config: CurationConfig
  stats: dict[str, Any]


def bucket_of(difficulty: float, buckets: int) -> str:
  """Label of the equal-width bin of [0, 1] holding `difficulty`: "0.20-0.40"."""
  i = min(max(int(difficulty * buckets + 1e-9), 0), buckets - 1)  # 1e-9: (1 - 0.8) * 5 < 1
  return f"{i / buckets:.2f}-{(i + 1) / buckets:.2f}"


def curate(prompts: Sequence[Prompt], model: TextModel,
           config: CurationConfig = CurationConfig(), *,
           checker: Optional[Checker] = None,
           journal: Optional[curation_journal.Journal] = None) -> CurationResult:
  """Runs the five stages of the module docstring over `prompts` (unique ids).

  journal: chunks of model work already done (and where to record new
    ones); `run` keeps one in OUT so that a rerun resumes.
  """
  checker = checker or default_checker()
  journal = journal or curation_journal.Journal(None, {})
  records = {}
  for p in prompts:
    if p.id in records:
      raise ValueError(f"curate: duplicate prompt id {p.id!r}")
    flags = (["hackable_type"] if p.type in HACKABLE_TYPES else []) + (
        [] if p.type in CHECKABLE_TYPES else ["unverifiable"])
    records[p.id] = Record(p.id, p.type, list(p.tags), flags=flags)
  stats = {"check_errors": 0, "responses_generated": 0}

  def drop(p: Prompt, reason: str, detail: str) -> bool:
    records[p.id].reason, records[p.id].detail = reason, detail
    return False

  # 1. type
  alive = [p for p in prompts if p.type not in config.drop_types
           or drop(p, "type", f"type {p.type} is dropped (drop_types)")]
  # 2. too_long
  if model.max_length is not None:
    alive = [p for p in alive if p.type not in CHECKABLE_TYPES or _fits(p, model, config, drop)]
  # 3. guessable
  guessed = [p for p in alive if p.type in GUESS_TYPES] if config.guess_attempts else []
  counts = _count_correct(guessed, model, checker, config, "guess", stats, journal)
  for p in guessed:
    records[p.id].guess_correct = counts[p.id]
    if counts[p.id]:
      drop(p, "guessable", f"answered right without reasoning in {counts[p.id]}/"
           f"{config.guess_attempts} attempts")
  alive = [p for p in alive if records[p.id].kept]
  # 4. pass rate
  measured = [p for p in alive if p.type in CHECKABLE_TYPES]
  counts = _count_correct(measured, model, checker, config, "pass_rate", stats, journal)
  curated = {p.id: p for p in alive}
  for p in measured:
    record, n = records[p.id], config.samples
    record.pass_rate = counts[p.id] / n
    record.difficulty = (n - counts[p.id]) / n
    curated[p.id] = dataclasses.replace(p, difficulty=record.difficulty)
    if record.pass_rate >= config.max_pass_rate:
      drop(p, "too_easy", f"pass rate {record.pass_rate:.2f} >= max_pass_rate "
           f"{config.max_pass_rate}")
    elif record.pass_rate < config.min_pass_rate:
      drop(p, "too_hard", f"pass rate {record.pass_rate:.2f} < min_pass_rate "
           f"{config.min_pass_rate}")
  alive = [p for p in alive if records[p.id].kept]
  # 5. balance
  for p in alive:
    record = records[p.id]
    if record.pass_rate is None:  # proofs kept by choice: difficulty as given
      record.bucket, record.difficulty = UNMEASURED, p.difficulty
    else:
      record.bucket = bucket_of(record.difficulty, config.difficulty_buckets)
  _balance(alive, records, config, drop)
  kept = tuple(curated[p.id] for p in alive if records[p.id].kept)
  return CurationResult(kept, tuple(records.values()), config, stats)


def _fits(p: Prompt, model: TextModel, config: CurationConfig, drop) -> bool:
  need = model.count_tokens(p.prompt) + config.max_new_tokens
  if p.type in GUESS_TYPES and config.guess_attempts:
    need = max(need, model.count_tokens(p.prompt + config.answer_marker)
               + config.guess_max_new_tokens)
  if need <= model.max_length:
    return True
  return drop(p, "too_long", f"needs {need} tokens (prompt + response budget), the model "
              f"takes {model.max_length}")


def _count_correct(prompts: Sequence[Prompt], model: TextModel, checker: Checker,
                   config: CurationConfig, stage: str, stats: dict[str, Any],
                   journal: curation_journal.Journal) -> dict[str, int]:
  """{id: correct responses}: `guess` (N immediate answers) or `pass_rate` (n
  samples), chunk by chunk; a chunk in the journal is not sampled again."""
  if stage == "guess":
    n, max_new, temperature = (config.guess_attempts, config.guess_max_new_tokens,
                               config.guess_temperature)
    suffix = config.answer_marker
  else:
    n, max_new, temperature, suffix = (config.samples, config.max_new_tokens,
                                       config.temperature, "")
  counts, start_s = {}, time.time()

  errors = [0]

  def check(args: tuple[Prompt, str]) -> bool:
    try:
      return bool(checker(*args))
    except Exception as e:  # pylint: disable=broad-except  # one bad check is one wrong answer
      if not stats["check_errors"] + errors[0]:
        logging.warning("checker failed on prompt %r (counted as wrong): %r", args[0].id, e)
      errors[0] += 1
      return False

  with concurrent.futures.ThreadPoolExecutor(config.check_workers) as pool:
    for lo in range(0, len(prompts), config.prompts_per_call):
      chunk = prompts[lo:lo + config.prompts_per_call]
      ids = [p.id for p in chunk]
      entry = journal.get(stage, lo, ids)
      if entry is None:
        texts = [p.prompt + suffix for p in chunk for _ in range(n)]
        # The seed depends on the chunk only, so a resumed run samples what
        # an uninterrupted one would have.
        seed = int(np.random.SeedSequence([config.seed, _STAGE_SEED[stage], lo])
                   .generate_state(1)[0])
        responses = model.generate(texts, max_new, temperature, seed)
        if len(responses) != len(texts):
          raise RuntimeError(f"model.generate returned {len(responses)} responses for "
                             f"{len(texts)} prompts")
        errors[0] = 0
        correct = list(pool.map(check, [(p, suffix + r) for p, r in zip(
            [p for p in chunk for _ in range(n)], responses)]))
        entry = {"counts": {p.id: int(sum(correct[i * n:(i + 1) * n]))
                            for i, p in enumerate(chunk)},
                 "responses": len(texts), "check_errors": errors[0]}
        journal.put(stage, lo, ids, **entry)
      counts.update(entry["counts"])
      stats["responses_generated"] += entry["responses"]
      stats["check_errors"] += entry["check_errors"]
      logging.info("curation %s: %d/%d prompts, %.0f s", stage, lo + len(chunk), len(prompts),
                   time.time() - start_s)
  stats[f"{stage}_seconds"] = round(time.time() - start_s, 3)
  return counts


def _balance(alive: Sequence[Prompt], records: dict[str, Record], config: CurationConfig,
             drop) -> None:
  """Caps per difficulty bucket and per tag; seeded order independent of file order."""
  if config.max_per_bucket is None and config.max_per_tag is None:
    return
  order = sorted(alive, key=lambda p: hashlib.sha256(f"{config.seed}:{p.id}".encode()).digest())
  per_bucket: dict[str, int] = {}
  per_tag: dict[str, int] = {}
  for p in order:
    bucket = records[p.id].bucket
    if config.max_per_bucket is not None and per_bucket.get(bucket, 0) >= config.max_per_bucket:
      drop(p, "balance_bucket", f"difficulty bucket {bucket} is full "
           f"(max_per_bucket {config.max_per_bucket})")
      continue
    full = [t for t in p.tags
            if config.max_per_tag is not None and per_tag.get(t, 0) >= config.max_per_tag]
    if full:
      drop(p, "balance_tag", f"tag {full[0]!r} is full (max_per_tag {config.max_per_tag})")
      continue
    per_bucket[bucket] = per_bucket.get(bucket, 0) + 1
    for t in set(p.tags):
      per_tag[t] = per_tag.get(t, 0) + 1


def run(prompts_path: str, out_dir: str, model: TextModel,
        config: CurationConfig = CurationConfig(), *, skip_invalid: bool = False,
        overwrite: bool = False, checker: Optional[Checker] = None,
        model_id: str = "") -> CurationResult:
  """Reads `prompts_path`, curates, writes OUT/curated.jsonl, report.json, report.md.

  OUT is created (its parent must exist). Resumable: the model's work is
  journaled in OUT/progress.jsonl (curation_journal.py), so rerunning the
  same call after a kill continues where it stopped and writes what an
  uninterrupted run writes. model_id names the model for that journal (its
  path and vocabulary); a journal of other settings is an error unless
  `overwrite`, which also replaces outputs of a finished run that has no
  journal of these settings. Every output is written atomically. A curated
  set that kept nothing is still written (empty), with the report saying why.
  """
  from kimi_jax.data import curation_report  # pylint: disable=g-import-not-at-top  # cycle
  out_dir = os.path.abspath(os.path.expanduser(out_dir))
  if not os.path.isdir(os.path.dirname(out_dir)):
    raise FileNotFoundError(f"output {out_dir}: parent directory does not exist")
  outputs = {name: os.path.join(out_dir, name) for name in OUTPUT_FILES}
  existing = [path for path in outputs.values() if os.path.exists(path)]
  journal_path = os.path.join(out_dir, curation_journal.JOURNAL_FILE)
  if existing and not overwrite and not os.path.exists(journal_path):
    raise FileExistsError(f"{existing[0]} exists; pass overwrite to replace it")
  read = prompts_lib.read_jsonl(prompts_path, skip_invalid=skip_invalid)
  if read.skipped:
    logging.warning("%s: skipped %d invalid lines; the first: %s", prompts_path, read.skipped,
                    read.errors[0])
  os.makedirs(out_dir, exist_ok=True)
  fields = dataclasses.asdict(config)
  fields.pop("check_workers")  # threads cannot change a count
  fields["skip_invalid"] = skip_invalid
  journal = curation_journal.open_journal(
      out_dir, curation_journal.fingerprint(fields, prompts_path, model_id),
      start_over=overwrite)
  result = curate(read.prompts, model, config, checker=checker, journal=journal)
  prompts_lib.write_jsonl(result.kept, outputs["curated.jsonl"])
  report = curation_report.summary(result, source=os.fspath(prompts_path),
                                   skipped_invalid=read.skipped, invalid_lines=read.errors)
  _write_text(outputs["report.json"], json.dumps(report, indent=1, ensure_ascii=False) + "\n")
  _write_text(outputs["report.md"], curation_report.markdown(report))
  logging.info("curation: kept %d of %d prompts; wrote %s", len(result.kept), len(read),
               ", ".join(outputs.values()))
  return result


def _write_text(path: str, text: str) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)
