"""What the trainer learns from: prompts, their text <-> token codec, their reward.

One `Task` whatever the source, built from settings by `make_task`:
  synthetic     data/synthetic.py problems, byte vocabulary, exact-match
                reward, long-CoT traces for the SFT warm-up (the default);
  prompt files  JSONL prompt sets (data/prompts.py), a tokenizer.json, a
                verifier per prompt type (`rewards.PromptVerifier`);
  visual        data/visual.py image + text problems (rl/visual_task.py).

Records (`Task.train`, `Task.heldout`) have at least `.id`, `.prompt` and
`.difficulty` (int, float or None); `Task.score(record, text)` is the
verifier handed to `rewards.apply_verifier`, which turns its failures into
reward 0 plus a counted reason.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

from absl import logging

from kimi_jax.data import synthetic
from kimi_jax.rl import rewards as rewards_lib
from kimi_jax.rl import prompt_images
from kimi_jax.rl import settings as settings_lib
from kimi_jax.rl import visual_task
from kimi_jax.tokenizers import BYTE_EOS_ID, byte_decode, byte_encode


@dataclasses.dataclass(frozen=True)
class Task:
  """train / heldout: records; encode: text -> ids (no eos); decode: ids ->
  text up to eos; eos_id: the stop token; vocab_size: ids the codec makes;
  score: (record, response text) -> reward; verifier_workers: threads for
  scoring; skipped_prompts: invalid prompt-file lines skipped (None for
  synthetic data); sft_problems: problems with traces for the warm-up (None:
  no warm-up possible).

  Image + text tasks also have images: record -> its images float32
  `[n, Y, X, C]` (n <= image_slots, the static slots per prompt); category:
  record -> task name (per-task evaluation metrics); sft_examples:
  (n, long_frac, error_rate, seed) -> SFT `Example`s for the warm-up (None:
  `sft.synthetic_examples` of sft_problems); processor: the
  `data.images.ProcessorConfig` the images went through (the trainer writes
  it beside the run's model_config.json)."""
  train: Sequence[Any]
  heldout: Sequence[Any]
  encode: Callable[[str], list[int]]
  decode: Callable[[Sequence[int]], str]
  eos_id: int
  vocab_size: int
  score: Callable[[Any, str], float]
  verifier_workers: int = 1
  skipped_prompts: Optional[int] = None
  sft_problems: Optional[Sequence[Any]] = None
  images: Optional[Callable[[Any], Any]] = None
  image_slots: int = 0
  category: Optional[Callable[[Any], str]] = None
  sft_examples: Optional[Callable[[int, float, float, int], list]] = None
  processor: Optional[Any] = None

  def metrics(self) -> dict:
    """Constant per-run metrics logged on every row (prompt files only)."""
    if self.skipped_prompts is None:
      return {}
    return {"data/skipped_prompts": self.skipped_prompts,
            "data/train_prompts": len(self.train), "data/heldout_prompts": len(self.heldout)}


def synthetic_task(s: settings_lib.Settings) -> Task:
  d = s.data
  train, heldout = synthetic.make_splits(s.seed, d.n_train, d.n_heldout,
                                         difficulties=d.difficulties, tasks=d.tasks,
                                         heldout_frac=d.heldout_frac)
  # seqio.ByteVocabulary ids: pad 0, eos 1, unk 2, bytes 3..258.
  return Task(train, heldout, byte_encode, byte_decode, BYTE_EOS_ID, 259, synthetic.reward,
              sft_problems=train)


def _read(path: str, skip_invalid: bool, what: str):
  from kimi_jax.data import prompts  # pylint: disable=g-import-not-at-top
  read = prompts.read_jsonl(path, skip_invalid=skip_invalid)
  if read.skipped:
    logging.warning("%s prompts %s: skipped %d invalid line(s); the first: %s", what, path,
                    read.skipped, read.errors[0])
  unverifiable = [p.id for p in read.prompts if p.type == "proof"]
  if unverifiable:
    # A proof has no automatic verifier: it would only ever score 0.
    raise settings_lib.ConfigError(
        f"config.data.{what}_file {path}: {len(unverifiable)} prompt(s) of type 'proof' "
        f"(first id {unverifiable[0]!r}) have no verifier; remove them (curation drops "
        "them, report §2.1)")
  return read


def prompt_file_task(s: settings_lib.Settings) -> Task:
  """Reads and validates both prompt files and the tokenizer (before any work:
  a broken line raises PromptFileError naming file:line:field)."""
  from kimi_jax import tokenizers  # pylint: disable=g-import-not-at-top
  d = s.data
  train = _read(d.train_file, d.skip_invalid, "train")
  heldout = _read(d.heldout_file, d.skip_invalid, "heldout")
  overlap = {p.id for p in train} & {p.id for p in heldout}
  if overlap:
    raise settings_lib.ConfigError(
        f"config.data: {len(overlap)} prompt id(s) are in both {d.train_file} and "
        f"{d.heldout_file} (e.g. {sorted(overlap)[0]!r}); held-out prompts must be unseen")
  try:
    vocab = tokenizers.load_vocabulary(d.tokenizer)
  except (ValueError, FileNotFoundError) as e:
    raise settings_lib.ConfigError(f"config.data.tokenizer: {e}") from e
  logging.info("Prompt files: %d train, %d held-out prompts (%d skipped); tokenizer %s",
               len(train), len(heldout), train.skipped + heldout.skipped, vocab)

  def encode(text: str) -> list[int]:
    return tokenizers.encode_prompt(vocab, text, add_bos=d.add_bos)

  def decode(ids) -> str:
    return tokenizers.decode_response(vocab, ids)

  verifier = rewards_lib.PromptVerifier(math_timeout_s=d.math_timeout_s,
                                        code_timeout_s=d.code_timeout_s)
  task = Task(train.prompts, heldout.prompts, encode, decode, int(vocab.eos_id),
              vocab.vocab_size, verifier, verifier_workers=d.verifier_workers,
              skipped_prompts=train.skipped + heldout.skipped)
  # Prompts with images: placeholders at the markers, pixels per record.
  return prompt_images.with_images(
      task, d, s.model, encode_text=lambda text: tokenizers.encode_prompt(vocab, text),
      bos_id=tokenizers.bos_id_or_none(vocab) if d.add_bos else None)


def make_task(s: settings_lib.Settings) -> Task:
  """The task of `s.data`; ConfigError when the model cannot embed its ids."""
  if isinstance(s.data, settings_lib.PromptFileData):
    task, what = prompt_file_task(s), f"tokenizer {s.data.tokenizer}"
  elif isinstance(s.data, visual_task.VisualData):
    task, what = visual_task.visual_task(s.seed, s.data, s.model), "visual tasks' vocabulary"
  else:
    task, what = synthetic_task(s), "byte vocabulary"
  if task.vocab_size > s.model.vocab_size:
    raise settings_lib.ConfigError(
        f"config.model: vocab_size {s.model.vocab_size} is smaller than the {what} "
        f"({task.vocab_size} ids)")
  return task
