"""Vocabularies (seqio) for bytes, SentencePiece and HF `tokenizer.json`.

  load_vocabulary("bytes")               seqio.ByteVocabulary
  load_vocabulary("path/spm.model")      seqio.SentencePieceVocabulary
  load_vocabulary("path/tokenizer.json") HFTokenizerVocabulary
  load_vocabulary("hf_checkpoint_dir")   same, from DIR/tokenizer.json

Prompts are encoded without a chat template: the text is tokenized as is,
with an optional BOS and never an EOS (the model continues the prompt).
`decode_response` cuts generated ids at the first EOS and drops padding.

Token ids are Python ints; id sequences are `list[int]` (or anything
`np.asarray` turns into a 1-D integer array, e.g. a row of a jax array).

Special ids of a tokenizer.json, in order of precedence:
  1. explicit constructor arguments (`eos_id=`, `bos_id=`, `pad_id=`);
  2. `tokenizer_config.json` next to the file (`eos_token`, `bos_token`,
     `pad_token`, `unk_token`), which is how HF checkpoints declare them;
  3. well-known special tokens present in the vocabulary (`_EOS_TOKENS` ...).
  The pad id falls back to the eos id (the usual HF convention), so padding
  written after an EOS decodes to nothing. A tokenizer whose EOS cannot be
  found is rejected when it is loaded (RL needs an EOS to end a response),
  unless `require_eos=False`.

Importing this module does not import seqio or TensorFlow (seqio imports
TensorFlow at its top, which costs several seconds on a small CPU): seqio is
imported by the first `load_vocabulary` call or the first access to
`HFTokenizerVocabulary`.
"""
from __future__ import annotations

import functools
import json
import os
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
import tokenizers

if TYPE_CHECKING:
  import seqio
  import tensorflow as tf

HF_TOKENIZER_FILE = "tokenizer.json"
HF_TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

# Looked up, in this order, when neither an argument nor tokenizer_config.json
# names the token. Base-model end markers come before chat end markers
# (e.g. Qwen2's "<|endoftext|>" before "<|im_end|>") because prompts here are
# encoded without a chat template.
_EOS_TOKENS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<|im_end|>",
               "<eos>")
_BOS_TOKENS = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")
_PAD_TOKENS = ("<pad>", "<|pad|>", "[PAD]")
_UNK_TOKENS = ("<unk>", "[UNK]", "<|unk|>")


# ----------------------------------------------------------------------------
# Helpers used by the rest of the codebase.


# Byte-level ids without seqio (no TensorFlow import): the same ids as
# seqio.ByteVocabulary: pad 0, eos 1, unk 2, byte b -> b + 3.
BYTE_PAD_ID, BYTE_EOS_ID, BYTE_OFFSET = 0, 1, 3


def byte_encode(text: str) -> list[int]:
  """UTF-8 bytes of `text` as ids (no eos)."""
  return [b + BYTE_OFFSET for b in text.encode("utf-8")]


def byte_decode(ids) -> str:
  """Text of `ids` up to the first eos; pad/unk and ids past the bytes are dropped."""
  out = bytearray()
  for i in ids:
    i = int(i)
    if i == BYTE_EOS_ID:
      break
    if BYTE_OFFSET <= i < BYTE_OFFSET + 256:
      out.append(i - BYTE_OFFSET)
  return out.decode("utf-8", errors="replace")


def load_vocabulary(spec: str) -> seqio.Vocabulary:
  """Returns the vocabulary named by `spec`.

  Args:
    spec: "bytes"; a path ending in ".model" (SentencePiece); a path ending in
      ".json" (HF tokenizer.json); or a directory holding tokenizer.json.
      Paths go through `tf.io.gfile`, so `gs://` works too.

  Raises:
    FileNotFoundError: the file (or DIR/tokenizer.json) does not exist.
    ValueError: `spec` is none of the above, or the tokenizer.json has no
      recognisable EOS (see the module docstring).
  """
  import seqio  # pylint: disable=g-import-not-at-top  # lazy: imports TF
  from tensorflow.io import gfile  # pylint: disable=g-import-not-at-top

  if spec == "bytes":
    return seqio.ByteVocabulary()
  if spec.endswith(".model"):
    _require_file(spec, gfile)
    return seqio.SentencePieceVocabulary(spec)
  if spec.endswith(".json"):
    _require_file(spec, gfile)
    return _hf_vocabulary_class()(spec)
  if spec and gfile.isdir(spec):
    path = os.path.join(spec, HF_TOKENIZER_FILE)
    _require_file(path, gfile)
    return _hf_vocabulary_class()(path)
  if os.sep in spec or "://" in spec:  # meant as a path, but nothing is there
    raise FileNotFoundError(f"vocabulary path {spec!r} does not exist")
  raise ValueError(
      f"unknown vocabulary spec {spec!r}: expected 'bytes', a SentencePiece "
      f"'*.model' file, a '*.json' HF tokenizer file, or a directory holding "
      f"{HF_TOKENIZER_FILE}")


def encode_prompt(vocab: seqio.Vocabulary, text: str, add_bos: bool = False,
                  max_length: Optional[int] = None) -> list[int]:
  """Token ids of `text`, chat-template free, never ending in EOS.

  Args:
    vocab: any seqio vocabulary.
    text: the prompt, tokenized as is.
    add_bos: prepend `vocab.bos_id` (ValueError if the vocabulary has none).
    max_length: if given, a prompt longer than this (BOS included) raises
      ValueError; truncating is the caller's decision.
  """
  ids = [int(i) for i in vocab.encode(text)]
  if add_bos:
    bos_id = bos_id_or_none(vocab)
    if bos_id is None:
      raise ValueError(f"add_bos=True but {vocab} has no BOS token")
    ids = [bos_id] + ids
  if max_length is not None and len(ids) > max_length:
    raise ValueError(
        f"prompt is {len(ids)} tokens, longer than max_length={max_length}")
  return ids


def decode_response(vocab: seqio.Vocabulary, ids: Sequence[int],
                    eos_id: Optional[int] = None) -> str:
  """Text of generated ids up to (not including) the first EOS; pads dropped.

  Args:
    vocab: any seqio vocabulary.
    ids: int[T], generated ids (list, numpy or jax array).
    eos_id: an extra stop id (e.g. the `eos_id` given to the sampler). The
      vocabulary's own EOS ends the text too, whichever comes first.

  Where pad and EOS share an id (tokenizer.json without a pad token), a pad
  ends the text like an EOS: left-padded ids must be stripped by the caller.
  """
  ids_T = np.asarray(ids)
  if ids_T.ndim != 1:
    raise ValueError(
        f"decode_response takes one sequence, got shape {ids_T.shape}")
  stop_ids = {i for i in (eos_id, vocab.eos_id) if i is not None and i >= 0}
  out = []
  pad_id = vocab.pad_id
  for i in ids_T.tolist():
    if i in stop_ids:
      break
    if i != pad_id:
      out.append(i)
  return vocab.decode(out)


def _require_file(path: str, gfile: Any) -> None:
  if not gfile.exists(path):
    raise FileNotFoundError(f"vocabulary file {path!r} does not exist")


def bos_id_or_none(vocab: seqio.Vocabulary) -> Optional[int]:
  """seqio spells "no BOS" three ways: None, -1 (SentencePiece), or raising."""
  try:
    bos_id = vocab.bos_id
  except NotImplementedError:
    return None
  return bos_id if bos_id is not None and bos_id >= 0 else None


# ----------------------------------------------------------------------------
# HF tokenizer.json as a seqio vocabulary.
#
# HFTokenizerVocabulary = _HFVocabularyMethods + seqio.Vocabulary. The class
# is assembled on first use (module `__getattr__` below), because subclassing
# seqio.Vocabulary at import time would import TensorFlow with this module.


class _HFVocabularyMethods:
  """A `tokenizers.Tokenizer` (tokenizer.json) as a `seqio.Vocabulary`.

  Use it as `HFTokenizerVocabulary(path, eos_id=None, bos_id=None,
  pad_id=None, require_eos=True, skip_special_tokens=True)`.

  Encoding never adds special tokens (the tokenizer's post-processor, e.g.
  Llama 3's automatic BOS, is skipped): BOS/EOS are the caller's business.
  Special tokens written literally in the text ("<|endoftext|>") are still
  matched as such, as everywhere in HF `tokenizers`.
  Decoding drops BOS/EOS/pad, ids outside the vocabulary, and (by default)
  every other special added token, like SentencePiece drops control pieces.
  `pad_id` is not seqio's 0 here: id 0 is usually an ordinary token.
  """

  def __init__(self, path: str, eos_id: Optional[int] = None,
               bos_id: Optional[int] = None, pad_id: Optional[int] = None,
               require_eos: bool = True, skip_special_tokens: bool = True):
    """Loads `path` (a tokenizer.json; local or gfile path).

    Args:
      path: the tokenizer.json file.
      eos_id, bos_id, pad_id: override the ids found in the files.
      require_eos: raise ValueError when no EOS is found (else eos_id is None).
      skip_special_tokens: drop special added tokens when decoding.
    """
    from tensorflow.io import gfile  # pylint: disable=g-import-not-at-top
    with gfile.GFile(path, "r") as f:
      self._json = f.read()
    self._path = path
    self._tokenizer = tokenizers.Tokenizer.from_str(self._json)
    self._skip_special_tokens = skip_special_tokens
    size = self._tokenizer.get_vocab_size(with_added_tokens=True)
    declared = _declared_special_tokens(os.path.dirname(path), gfile)

    def find(explicit, key, candidates):
      if explicit is not None:
        if not 0 <= explicit < size:
          raise ValueError(f"{key}_id={explicit} outside the vocabulary of "
                           f"{path!r} (size {size})")
        return int(explicit)
      if key in declared:  # the checkpoint's own word; no guessing past it
        token_id = self._tokenizer.token_to_id(declared[key])
        if token_id is None:
          raise ValueError(
              f"{HF_TOKENIZER_CONFIG_FILE} next to {path!r} names {key}_token "
              f"{declared[key]!r}, which is not in the vocabulary")
        return token_id
      for token in candidates:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is not None:
          return token_id
      return None

    self._eos_id = find(eos_id, "eos", _EOS_TOKENS)
    self._bos_id = find(bos_id, "bos", _BOS_TOKENS)
    self._unk_id = find(None, "unk", _UNK_TOKENS)
    found_pad_id = find(pad_id, "pad", _PAD_TOKENS)
    self._pad_id = self._eos_id if found_pad_id is None else found_pad_id
    if require_eos and self._eos_id is None:
      raise ValueError(
          f"no EOS token found for {path!r}: none named in "
          f"{HF_TOKENIZER_CONFIG_FILE} and none of {_EOS_TOKENS} is in the "
          "vocabulary; pass eos_id= (or require_eos=False)")
    super().__init__(extra_ids=0)  # seqio.Vocabulary, next in the MRO

  # Special ids. seqio's types say int, but None means "this tokenizer has
  # none", as in seqio.ByteVocabulary.bos_id.
  @property
  def eos_id(self) -> Optional[int]:
    return self._eos_id

  @property
  def bos_id(self) -> Optional[int]:
    return self._bos_id

  @property
  def pad_id(self) -> Optional[int]:
    return self._pad_id

  @property
  def unk_id(self) -> Optional[int]:
    return self._unk_id

  @property
  def _base_vocab_size(self) -> int:
    return self._tokenizer.get_vocab_size(with_added_tokens=True)

  @property
  def tokenizer(self) -> tokenizers.Tokenizer:
    return self._tokenizer

  def _encode(self, s: str | bytes) -> list[int]:
    """str -> int[T] (no special tokens added)."""
    s = s.decode("utf-8") if isinstance(s, bytes) else s
    return self._tokenizer.encode(s, add_special_tokens=False).ids

  def _decode(self, ids: Sequence[int]) -> str:
    """int[T] -> str; special ids and ids outside the vocabulary dropped."""
    drop = {self._eos_id, self._bos_id, self._pad_id}
    size = self._base_vocab_size
    kept = [int(i) for i in ids if i not in drop and 0 <= i < size]
    return self._tokenizer.decode(
        kept, skip_special_tokens=self._skip_special_tokens)

  # The TF variants run the Python tokenizer through tf.numpy_function: seqio
  # pipelines (tf.data maps) need them, and there is no TF kernel for HF
  # tokenizers. They hold the GIL, which is fine at prompt-set scale.
  def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
    """tf.string[] -> tf.int32[T]."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    def encode(s_bytes):
      return np.asarray(self._encode(_as_bytes(s_bytes)), np.int32)

    s = tf.convert_to_tensor(s, tf.string)
    if s.shape.rank != 0:
      raise ValueError(f"encode_tf takes a scalar string, got shape {s.shape}")
    ids_T = tf.numpy_function(encode, [s], tf.int32, stateful=False)
    ids_T.set_shape([None])
    return ids_T

  def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
    """tf.int32[..., T] -> tf.string[...] (one string per row)."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    def decode(ids_NT):
      rows = ids_NT.reshape(-1, ids_NT.shape[-1])
      texts = [self._decode(row.tolist()).encode("utf-8") for row in rows]
      return np.array(texts, dtype=object).reshape(ids_NT.shape[:-1])

    ids = tf.convert_to_tensor(ids)
    texts = tf.numpy_function(decode, [ids], tf.string, stateful=False)
    texts.set_shape(ids.shape[:-1])
    return texts

  def __eq__(self, other: Any) -> bool:
    # seqio compares the output features of the tasks of a mixture; two loads
    # of the same tokenizer must compare equal.
    return (isinstance(other, _HFVocabularyMethods)
            and self._json == other._json
            and self._special_ids() == other._special_ids()
            and self._skip_special_tokens == other._skip_special_tokens)

  def _special_ids(self) -> tuple[Optional[int], ...]:
    return (self._eos_id, self._bos_id, self._pad_id, self._unk_id)

  def __str__(self) -> str:
    return (f"HFTokenizerVocabulary(file={self._path}, "
            f"vocab_size={self._base_vocab_size}, eos_id={self._eos_id}, "
            f"bos_id={self._bos_id}, pad_id={self._pad_id})")

  def __getstate__(self) -> dict[str, Any]:
    # Rebuilt from the JSON: cheaper to pickle and independent of the
    # `tokenizers` version's own pickle format.
    state = self.__dict__.copy()
    del state["_tokenizer"]
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._tokenizer = tokenizers.Tokenizer.from_str(self._json)


def _as_bytes(s: Any) -> bytes:
  """numpy_function hands a scalar string over as bytes or a 0-d array."""
  return s.item() if isinstance(s, np.ndarray) else s


def _declared_special_tokens(directory: str, gfile: Any) -> dict[str, str]:
  """{"eos": "<|im_end|>", ...} from DIR/tokenizer_config.json, if any."""
  path = os.path.join(directory, HF_TOKENIZER_CONFIG_FILE)
  if not gfile.exists(path):
    return {}
  with gfile.GFile(path, "r") as f:
    try:
      config = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from e
  declared = {}
  for key in ("eos", "bos", "pad", "unk"):
    token = config.get(f"{key}_token")
    if isinstance(token, dict):  # older files store a serialized AddedToken
      token = token.get("content")
    if isinstance(token, str) and token:
      declared[key] = token
  return declared


@functools.cache
def _hf_vocabulary_class() -> type:
  import seqio  # pylint: disable=g-import-not-at-top  # lazy: imports TF
  return type("HFTokenizerVocabulary",
              (_HFVocabularyMethods, seqio.Vocabulary),
              {"__module__": __name__, "__doc__": _HFVocabularyMethods.__doc__})


def __getattr__(name: str) -> Any:
  # PEP 562: `tokenizers.HFTokenizerVocabulary` (and pickle, which looks the
  # class up by this name) builds the seqio subclass on first access.
  if name == "HFTokenizerVocabulary":
    return _hf_vocabulary_class()
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
