r"""Curate a prompt set with a model (report §2.1): drop hackable types and
guessable prompts, measure difficulty by pass rate, balance, and report.

  python -m launch.curate --prompts=in.jsonl --out=/tmp/curated \
      --model=/ckpt/Qwen2.5-Math-1.5B            # HF dir; its tokenizer.json
  python -m launch.curate --prompts=in.jsonl --out=/tmp/curated \
      --model=/ckpt/byte_model --vocab=bytes --answer_marker=A: --max_new_tokens=200

--model is an orbax model directory (params/ + model_config.json, as
launch/convert.py writes it) or a Hugging Face one. Writes OUT/curated.jsonl (difficulty = 1 - pass rate),
OUT/report.json (every prompt's fate) and OUT/report.md. The stages and their
settings are documented in kimi_jax/data/curation.py.

Resumable: the model's work is journaled in OUT/progress.jsonl chunk by chunk
(--prompts_per_call prompts), so rerunning the same command after a kill or a
crash continues where it stopped, with the same result as an uninterrupted
run. --overwrite_out starts over.
"""
from typing import Sequence

from kimi_jax import cli  # first: quiets TensorFlow / XLA before they load

from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-order

from kimi_jax.data import curation

_D = curation.CurationConfig()  # the flag defaults are the library's
_PROMPTS = flags.DEFINE_string("prompts", None, "Input prompt-set JSONL.", required=True)
_OUT = flags.DEFINE_string("out", None, "Output directory (its parent must exist).",
                           required=True)
_MODEL = flags.DEFINE_string("model", None, "Orbax or Hugging Face model directory.",
                             required=True)
_VOCAB = flags.DEFINE_string("vocab", None, "'bytes', a tokenizer.json / .model file or a "
                             "directory; default: the model directory's tokenizer.json.")
_ADD_BOS = flags.DEFINE_bool("add_bos", False, "Start every prompt with the BOS token.")
_SKIP_INVALID = flags.DEFINE_bool("skip_invalid", False,
                                  "Skip (and count) invalid lines instead of stopping.")
_OVERWRITE = flags.DEFINE_bool("overwrite_out", False, "Replace existing outputs in --out.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Sequences per generate() call.")
_SAMPLES = flags.DEFINE_integer("samples", _D.samples, "Responses per prompt for its pass rate.")
_TEMP = flags.DEFINE_float("temperature", _D.temperature, "Temperature of those responses.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", _D.max_new_tokens,
                                "Token budget of one response.")
_GUESSES = flags.DEFINE_integer("guess_attempts", _D.guess_attempts,
                                "Immediate answers tried per prompt (0: no guess filter).")
_GUESS_TEMP = flags.DEFINE_float("guess_temperature", _D.guess_temperature,
                                 "Temperature of the immediate answers.")
_GUESS_NEW = flags.DEFINE_integer("guess_max_new_tokens", _D.guess_max_new_tokens,
                                  "Token budget of one immediate answer.")
_MARKER = flags.DEFINE_string("answer_marker", _D.answer_marker,
                              "Text appended to a prompt to force an immediate answer.")
_DROP_TYPES = flags.DEFINE_list("drop_types", list(_D.drop_types),
                                "Prompt types dropped outright (empty: none).")
_MIN_RATE = flags.DEFINE_float("min_pass_rate", _D.min_pass_rate,
                               "Drop prompts whose pass rate is below this.")
_MAX_RATE = flags.DEFINE_float("max_pass_rate", _D.max_pass_rate,
                               "Drop prompts whose pass rate is at least this (>1: keep all).")
_BUCKETS = flags.DEFINE_integer("difficulty_buckets", _D.difficulty_buckets,
                                "Equal-width difficulty buckets for balancing and the report.")
_PER_BUCKET = flags.DEFINE_integer("max_per_bucket", None, "Cap per difficulty bucket.")
_PER_TAG = flags.DEFINE_integer("max_per_tag", None, "Cap per tag.")
_SEED = flags.DEFINE_integer("seed", _D.seed, "Seed of sampling and balancing.")
_WORKERS = flags.DEFINE_integer("check_workers", _D.check_workers,
                                "Threads checking answers (math-verify, code sandbox).")
_PER_CALL = flags.DEFINE_integer("prompts_per_call", _D.prompts_per_call,
                                 "Prompts per model call: the unit of progress and resume.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = curation.CurationConfig(
      samples=_SAMPLES.value, temperature=_TEMP.value, max_new_tokens=_MAX_NEW.value,
      guess_attempts=_GUESSES.value, guess_temperature=_GUESS_TEMP.value,
      guess_max_new_tokens=_GUESS_NEW.value, answer_marker=_MARKER.value,
      drop_types=tuple(_DROP_TYPES.value), min_pass_rate=_MIN_RATE.value,
      max_pass_rate=_MAX_RATE.value, difficulty_buckets=_BUCKETS.value,
      max_per_bucket=_PER_BUCKET.value, max_per_tag=_PER_TAG.value, seed=_SEED.value,
      check_workers=_WORKERS.value, prompts_per_call=_PER_CALL.value)
  model = curation.load_text_model(_MODEL.value, _VOCAB.value, add_bos=_ADD_BOS.value,
                                   batch_size=_BATCH.value)
  # What the journal of a resumed run must match besides the settings above.
  model_id = f"{_MODEL.value}|{_VOCAB.value}|bos={_ADD_BOS.value}|batch={_BATCH.value}"
  result = curation.run(_PROMPTS.value, _OUT.value, model, config,
                        skip_invalid=_SKIP_INVALID.value, overwrite=_OVERWRITE.value,
                        model_id=model_id)
  print(f"kept {len(result.kept)} of {len(result.records)} prompts; see {_OUT.value}/report.md")


if __name__ == "__main__":
  cli.run(main)
