"""SFT examples: synthetic traces, prompt/response JSONL files, and their tokenizer.

A response file is JSONL, one example per line (UTF-8; blank lines ignored):

  {"prompt": "Q:12+30=", "response": "A:42\\n", "id": "add-1f", "answer": "42"}

`prompt` (non-empty string) and `response` (string) are required; `images`
(optional) lists the prompt's images as prompt files do (paths relative to
the JSONL file, or data:image/png;base64 URIs; one `<image>` marker per image
in the prompt, or none: the images then come first), checked to exist and
decode when the file is read. Other keys, such as the prompt-set fields (id, type, answer, difficulty, tags,
source; kimi_jax/data/prompts.py) that `long2short.rejection` writes, are
kept with the record and not used for training. Errors name file, line and
field (`rs.jsonl:7: field 'response': missing`), as prompt files do.

The codec turns text into ids with the tokenizer the trainer accepts:
"bytes" (the synthetic tasks' byte vocabulary, no seqio import), a HF
tokenizer.json (or its directory) or a SentencePiece model. Prompts are
encoded as the trainer encodes them (no chat template, optional BOS, no
EOS); the response is encoded on its own and `pack` appends the EOS.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
from typing import Callable, Sequence

import numpy as np

from kimi_jax.data import images as images_lib
from kimi_jax.data import synthetic
from kimi_jax.data import visual
from kimi_jax.data.prompt_schema import check_image_content, check_images
from kimi_jax.data.prompts import PromptFileError
from kimi_jax.sft.packing import Example
from kimi_jax.tokenizers import BYTE_EOS_ID, byte_decode, byte_encode

REQUIRED = ("prompt", "response")


def synthetic_examples(problems: Sequence[synthetic.Problem], n_examples: int,
                       encode: Callable[[str], list[int]], *, long_frac: float = 1.0,
                       error_rate: float = 0.0, recheck_rate: float = 0.0,
                       seed: int = 0) -> list[Example]:
  """`n_examples` (prompt_ids, response_ids) pairs cycling over `problems`
  (several traces of one problem differ in their slips and rechecks;
  `synthetic.long_cot`)."""
  if not problems:
    raise ValueError("synthetic_examples needs at least one problem")
  rng = np.random.default_rng([seed, 0x5F7])
  out = []
  for i in range(n_examples):
    p = problems[i % len(problems)]
    out.append((encode(p.prompt), encode(synthetic.sft_response(p, rng, long_frac, error_rate,
                                                                 recheck_rate))))
  return out


def visual_examples(problems: Sequence[visual.VisualProblem], n_examples: int,
                    tokens_per_image: int, processor: images_lib.ProcessorConfig, *,
                    long_frac: float = 1.0, error_rate: float = 0.0,
                    seed: int = 0) -> list[Example]:
  """`n_examples` image + text Examples cycling over `data/visual.py` problems.

  prompt: byte ids with the image as `tokens_per_image` IMAGE_TOKEN_ID
  placeholders (`visual.encode_prompt`); response: byte ids of
  `visual.sft_response` (no eos: `pack` appends it); images: float32
  `[1, Y, X, C]`, the problem's rendering through `processor`. Examples of
  one problem share its pixel array (read-only use)."""
  if not problems:
    raise ValueError("visual_examples needs at least one problem")
  rng = np.random.default_rng([seed, 0x5F7])
  pixels: dict[int, np.ndarray] = {}  # rendering + preprocessing once per problem
  out = []
  for i in range(n_examples):
    k = i % len(problems)
    p = problems[k]
    if k not in pixels:
      pixels[k] = images_lib.preprocess(p.image(), processor)[None]
    out.append(Example(visual.encode_prompt(p, tokens_per_image),
                       byte_encode(visual.sft_response(p, rng, long_frac, error_rate)),
                       pixels[k]))
  return out


# ---------------------------------------------------------------- response files

def _check_record(obj, where: str, base_dir: str | None = None) -> dict:
  if not isinstance(obj, dict):
    raise PromptFileError(where, f"expected a JSON object, got {type(obj).__name__}")
  for name in REQUIRED:
    if name not in obj:
      near = difflib.get_close_matches(name, [k for k in obj if k not in REQUIRED], n=1,
                                       cutoff=0.75)
      hint = f" (found {near[0]!r}: a typo?)" if near else ""
      raise PromptFileError(where, f"missing{hint}", name)
    if not isinstance(obj[name], str):
      raise PromptFileError(where, f"expected a string, got {type(obj[name]).__name__}", name)
  if not obj["prompt"].strip():
    raise PromptFileError(where, "must not be empty", "prompt")
  if "images" in obj:
    refs = check_images(obj["images"], obj["prompt"], where, base_dir)
    if base_dir is not None:  # reading a file: open each image once, here
      check_image_content(refs, where)
    obj = {**obj, "images": list(refs)}
  return obj


def read_responses(path: str | os.PathLike) -> list[dict]:
  """The records of a response file, in file order. Raises FileNotFoundError,
  or PromptFileError naming file:line:field at the first bad line or when
  the file holds no record."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"response file {path} does not exist")
  records = []
  with open(path, "rb") as f:
    for line_no, raw in enumerate(f, 1):
      where = f"{path}:{line_no}"
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise PromptFileError(where, f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
      if not text.strip():
        continue
      try:
        obj = json.loads(text)
      except json.JSONDecodeError as e:
        raise PromptFileError(where, f"not valid JSON: {e.msg} (column {e.colno})") from None
      records.append(_check_record(obj, where, os.path.dirname(os.path.abspath(path))))
  if not records:
    raise PromptFileError(path, "no records (an empty SFT set)")
  return records


def write_responses(records: Sequence[dict], path: str | os.PathLike) -> None:
  """Writes records (each with prompt and response) as JSONL, atomically."""
  path = os.fspath(path)
  lines = []
  for i, r in enumerate(records):
    lines.append(json.dumps(_check_record(r, f"record {i}"), ensure_ascii=False) + "\n")
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(lines)
  os.replace(tmp, path)


# ---------------------------------------------------------------- tokenizer

@dataclasses.dataclass(frozen=True)
class Codec:
  """Text <-> ids of one tokenizer. encode_prompt: as the trainer encodes
  prompts; encode_response: the response alone (no BOS, no EOS); decode:
  ids up to the first EOS; eos_id; vocab_size: ids the tokenizer makes."""
  encode_prompt: Callable[[str], list[int]]
  encode_response: Callable[[str], list[int]]
  decode: Callable[[Sequence[int]], str]
  eos_id: int
  vocab_size: int
  bos_id: int | None = None  # what encode_prompt prepends, if anything


def make_codec(spec: str = "bytes", add_bos: bool = False) -> Codec:
  """The codec of a tokenizer spec ("bytes", a tokenizer.json or its
  directory, a *.model); FileNotFoundError / ValueError name the spec."""
  if spec == "bytes":
    if add_bos:
      raise ValueError("tokenizer 'bytes' has no BOS token (add_bos must be False)")
    # seqio.ByteVocabulary ids: pad 0, eos 1, unk 2, bytes 3..258.
    return Codec(byte_encode, byte_encode, byte_decode, BYTE_EOS_ID, 259)
  from kimi_jax import tokenizers  # pylint: disable=g-import-not-at-top  # imports seqio
  vocab = tokenizers.load_vocabulary(spec)
  return Codec(
      encode_prompt=lambda text: tokenizers.encode_prompt(vocab, text, add_bos=add_bos),
      encode_response=lambda text: [int(i) for i in vocab.encode(text)],
      decode=lambda ids: tokenizers.decode_response(vocab, ids),
      eos_id=int(vocab.eos_id), vocab_size=int(vocab.vocab_size),
      bos_id=tokenizers.bos_id_or_none(vocab) if add_bos else None)


@dataclasses.dataclass(frozen=True)
class ImageEncoding:
  """How records with images become Examples: each image through `processor`
  and as `tokens_per_image` copies of `image_token_id` at its marker."""
  processor: images_lib.ProcessorConfig
  tokens_per_image: int
  image_token_id: int


def response_examples(records: Sequence[dict], codec: Codec,
                      image_encoding: ImageEncoding | None = None) -> list[Example]:
  """Examples of response-file records: (prompt_ids, response_ids), and for a
  record with `images` an `Example` with its pixels float32 `[n, Y, X, C]`
  (needs `image_encoding`; ValueError naming the record otherwise)."""
  out: list[Example] = []
  for i, r in enumerate(records):
    refs = r.get("images") or ()
    if not refs:
      out.append((codec.encode_prompt(r["prompt"]), codec.encode_response(r["response"])))
      continue
    if image_encoding is None:
      raise ValueError(f"record {i} (id {r.get('id', '?')!r}) has images but the model has no "
                       "image encoder")
    enc = image_encoding
    # Without markers encode_with_images puts the images first.
    ids = images_lib.encode_with_images(codec.encode_response, r["prompt"], len(refs),
                                        enc.tokens_per_image, enc.image_token_id)
    prompt = ids if codec.bos_id is None else [codec.bos_id] + ids
    out.append(Example(prompt, codec.encode_response(r["response"]),
                       images_lib.preprocess_batch(list(refs), enc.processor)))
  return out


def check_vocab(codec: Codec, vocab_size: int, what: str) -> None:
  """ValueError when the model cannot embed every id the tokenizer makes."""
  if codec.vocab_size > vocab_size:
    raise ValueError(f"{what}: the model's vocab_size {vocab_size} is smaller than the "
                     f"tokenizer's {codec.vocab_size} ids")

