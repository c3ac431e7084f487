"""The model side of curation: texts in, texts out (`TextModel`), and loaders.

  model = load_text_model("/ckpt/qwen_math", vocab=None)   # HF dir with tokenizer.json
  model = load_text_model("/ckpt/sft_params", vocab="bytes")  # orbax dir (launch/convert.py)
  model.generate(["Q:3+4="], 16, 1.0, 0)                     # -> ["7;A:7\n"]

Curation needs nothing else of a model, so tests hand it a fake TextModel.
Importing this module does not import jax or TensorFlow; the loaders do.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, Optional, Sequence

import numpy as np


class CurationError(ValueError):
  """Bad input to curation (a model, vocabulary, setting or output directory
  that cannot be used); the message names it."""


@dataclasses.dataclass(frozen=True)
class TextModel:
  """What curation needs of a model.

  generate: (texts, max_new_tokens, temperature, seed) -> one response text
    per input text (the continuation, up to EOS).
  count_tokens: text -> number of prompt tokens.
  max_length: most tokens of prompt + response (None: no limit).
  """
  generate: Callable[[Sequence[str], int, float, int], list[str]]
  count_tokens: Callable[[str], int] = len
  max_length: Optional[int] = None


def text_model(cfg, params, *, encode: Callable[[str], list[int]],
               decode: Callable[[Sequence[int]], str], eos_id: Optional[int],
               batch_size: int = 64) -> TextModel:
  """A TextModel over `sampling.generate` for a kimi_jax model (cfg, params).

  Rows go through `generate` `batch_size` at a time, sorted by prompt length
  so a batch pads little; each batch draws from its own seed.
  """
  from kimi_jax.sampling import generate  # pylint: disable=g-import-not-at-top  # jax

  def run(texts: Sequence[str], max_new_tokens: int, temperature: float,
          seed: int) -> list[str]:
    ids = [encode(t) for t in texts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[Optional[str]] = [None] * len(ids)
    for lo in range(0, len(order), batch_size):
      rows = order[lo:lo + batch_size]
      batch_seed = int(np.random.SeedSequence([seed, lo]).generate_state(1)[0])
      new = generate(cfg, params, [ids[i] for i in rows], max_new_tokens,
                     temperature=temperature, seed=batch_seed, eos_id=eos_id)
      for i, tokens in zip(rows, new):
        out[i] = decode(tokens)
    return out

  return TextModel(run, lambda text: len(encode(text)), cfg.max_position_embeddings)


def load_model(path: str):
  """(ModelConfig, params) from an orbax model directory or a Hugging Face one."""
  from kimi_jax.models import hf, params_io  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(path):
    raise FileNotFoundError(f"model {path}: no such directory")
  if os.path.isfile(os.path.join(path, params_io.CONFIG_NAME)):
    return params_io.load_orbax(path)
  if os.path.isfile(os.path.join(path, hf.CONFIG_NAME)):
    return hf.load_pretrained(path)
  raise FileNotFoundError(
      f"model {path}: neither an orbax model directory (no {params_io.CONFIG_NAME}) nor a "
      f"Hugging Face directory (no {hf.CONFIG_NAME})")


def load_text_model(model_path: str, vocab: Optional[str] = None, *, add_bos: bool = False,
                    batch_size: int = 64) -> TextModel:
  """A TextModel for the model at `model_path`.

  vocab: "bytes" (kimi_jax's byte ids), a tokenizer.json / SentencePiece file
    or directory (`tokenizers.load_vocabulary`); default the model
    directory's tokenizer.json.
  """
  from kimi_jax import tokenizers  # pylint: disable=g-import-not-at-top
  if vocab is None:
    if not os.path.isdir(model_path):
      raise FileNotFoundError(f"model {model_path}: no such directory")
    if not os.path.isfile(os.path.join(model_path, tokenizers.HF_TOKENIZER_FILE)):
      raise CurationError(f"model {model_path} has no {tokenizers.HF_TOKENIZER_FILE}; name the "
                       "vocabulary ('bytes' or a tokenizer file)")
    vocab = model_path
  cfg, params = load_model(model_path)
  if vocab == "bytes":  # no seqio/TensorFlow import for the byte vocabulary
    if add_bos:
      raise CurationError("the byte vocabulary has no BOS token (add_bos=True)")
    encode, decode = tokenizers.byte_encode, tokenizers.byte_decode
    eos_id, vocab_size = tokenizers.BYTE_EOS_ID, tokenizers.BYTE_OFFSET + 256
  else:
    v = tokenizers.load_vocabulary(vocab)
    encode = functools.partial(tokenizers.encode_prompt, v, add_bos=add_bos)
    decode = functools.partial(tokenizers.decode_response, v)
    eos_id, vocab_size = v.eos_id, v.vocab_size
  if vocab_size > cfg.vocab_size:
    raise CurationError(f"vocabulary {vocab} has {vocab_size} ids, more than the model "
                     f"{model_path} embeds ({cfg.vocab_size})")
  return text_model(cfg, params, encode=encode, decode=decode, eos_id=eos_id,
                    batch_size=batch_size)
