"""Tests of kimi_jax.tokenizers: byte, SentencePiece and tokenizer.json vocabs.

The SentencePiece model and the tokenizer.json are trained here on a few
sentences (milliseconds); nothing is downloaded.
"""
import functools
import io
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece
import tokenizers as hf_tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from kimi_jax import tokenizers

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Solve 12 + 30 = 42, then check the answer twice.",
    "héllo wörld — naïve café, déjà vu",
    "数学 推理 🙂",
]
TEXTS = [
    "Q:17+25=",
    "The fox checks 42.",
    "  two  spaces\nnew line\ttab",
    "unicode: héllo — 数学 🙂, unseen ∑ ∫ 🚀",
]
HF_SPECIALS = ["<unk>", "<|endoftext|>", "<s>"]  # ids 0, 1, 2; no pad token


def _train_hf_tokenizer(specials=HF_SPECIALS) -> hf_tokenizers.Tokenizer:
  # Byte-level BPE whose alphabet is all 256 bytes: any text round-trips.
  tok = hf_tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=320, special_tokens=list(specials), show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS * 4, trainer=trainer)
  return tok


@pytest.fixture(scope="module")
def hf_path(tmp_path_factory):
  path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
  _train_hf_tokenizer().save(str(path))
  return str(path)


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
  model = io.BytesIO()
  # seqio's ids (pad 0, eos 1, unk 2) plus a BOS; identity normalization and
  # byte fallback make the round trip exact, unseen characters included.
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(CORPUS * 4), model_writer=model, vocab_size=320,
      model_type="bpe", byte_fallback=True, character_coverage=1.0,
      pad_id=0, eos_id=1, unk_id=2, bos_id=3,
      normalization_rule_name="identity", remove_extra_whitespaces=False,
      hard_vocab_limit=False, num_threads=1, minloglevel=2)
  path = tmp_path_factory.mktemp("spm") / "tiny.model"
  path.write_bytes(model.getvalue())
  return str(path)


@pytest.fixture(scope="module", params=["bytes", "spm", "hf"])
def vocab(request, hf_path, spm_path):
  spec = {"bytes": "bytes", "spm": spm_path, "hf": hf_path}[request.param]
  return tokenizers.load_vocabulary(spec)


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(vocab, text):
  ids = tokenizers.encode_prompt(vocab, text)
  assert all(isinstance(i, int) and 0 <= i < vocab.vocab_size for i in ids)
  assert vocab.eos_id not in ids  # prompts never end in EOS
  assert vocab.decode(ids) == text
  assert tokenizers.decode_response(vocab, ids) == text


def test_load_vocabulary_types(hf_path, spm_path):
  import seqio  # pylint: disable=g-import-not-at-top
  assert isinstance(tokenizers.load_vocabulary("bytes"), seqio.ByteVocabulary)
  assert isinstance(tokenizers.load_vocabulary(spm_path),
                    seqio.SentencePieceVocabulary)
  hf = tokenizers.load_vocabulary(hf_path)
  assert isinstance(hf, seqio.Vocabulary)
  assert isinstance(hf, tokenizers.HFTokenizerVocabulary)
  # A checkpoint directory holding tokenizer.json loads the same vocabulary.
  assert tokenizers.load_vocabulary(os.path.dirname(hf_path)) == hf


# ------------------------------------------------------------ special ids / eos


def test_hf_special_ids_found_in_vocabulary(hf_path):
  vocab = tokenizers.load_vocabulary(hf_path)
  assert (vocab.unk_id, vocab.eos_id, vocab.bos_id) == (0, 1, 2)
  assert vocab.pad_id == vocab.eos_id  # no pad token: pad falls back to eos
  assert vocab.vocab_size == 320


def test_hf_tokenizer_config_and_explicit_ids_take_precedence(tmp_path):
  tok = _train_hf_tokenizer(["<unk>", "</s>", "<|im_end|>", "<pad>"])
  tok.save(str(tmp_path / "tokenizer.json"))
  path = str(tmp_path / "tokenizer.json")
  assert tokenizers.load_vocabulary(path).eos_id == 1  # "</s>" listed first
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"eos_token": "<|im_end|>", "pad_token": {"content": "<pad>"},
       "bos_token": None}))
  vocab = tokenizers.load_vocabulary(str(tmp_path))
  assert (vocab.eos_id, vocab.pad_id, vocab.bos_id) == (2, 3, None)
  explicit = tokenizers.HFTokenizerVocabulary(path, eos_id=1, pad_id=0)
  assert (explicit.eos_id, explicit.pad_id) == (1, 0)
  with pytest.raises(ValueError, match="outside the vocabulary"):
    tokenizers.HFTokenizerVocabulary(path, eos_id=10_000)
  (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<eot>"}')
  with pytest.raises(ValueError, match="names eos_token '<eot>'"):
    tokenizers.load_vocabulary(path)


def test_hf_without_eos_is_a_clear_error(tmp_path):
  path = tmp_path / "tokenizer.json"
  _train_hf_tokenizer(["<unk>"]).save(str(path))
  with pytest.raises(ValueError, match="no EOS token found.*eos_id="):
    tokenizers.load_vocabulary(str(path))
  vocab = tokenizers.HFTokenizerVocabulary(str(path), require_eos=False)
  assert vocab.eos_id is None and vocab.pad_id is None
  assert tokenizers.decode_response(vocab, vocab.encode("ab")) == "ab"


def test_decode_response_stops_at_first_eos_and_drops_pad(vocab):
  head, tail = vocab.encode("The fox"), vocab.encode(" junk")
  pad, eos = vocab.pad_id, vocab.eos_id
  ids = head + [eos] + tail + [eos, pad]
  decode = functools.partial(tokenizers.decode_response, vocab)
  assert decode(ids) == "The fox"
  assert decode(np.asarray(ids, np.int32)) == "The fox"
  assert decode(head + tail) == vocab.decode(head + tail)
  assert decode([]) == ""
  if pad != eos:  # else (HF without a pad token) a pad *is* an EOS
    assert decode([pad, pad] + head + [pad]) == "The fox"


def test_decode_response_extra_eos_id():
  vocab = tokenizers.load_vocabulary("bytes")
  newline_id = vocab.encode("\n")[0]
  ids = vocab.encode("42\nmore") + [vocab.eos_id]
  assert tokenizers.decode_response(vocab, ids, eos_id=newline_id) == "42"
  assert tokenizers.decode_response(vocab, ids) == "42\nmore"
  with pytest.raises(ValueError, match="one sequence"):
    tokenizers.decode_response(vocab, [ids, ids])


# -------------------------------------------------------------- encode_prompt


def test_encode_prompt_bos(hf_path, spm_path):
  hf = tokenizers.load_vocabulary(hf_path)
  ids = tokenizers.encode_prompt(hf, "hi", add_bos=True)
  assert ids == [2] + hf.encode("hi")
  spm = tokenizers.load_vocabulary(spm_path)
  assert tokenizers.encode_prompt(spm, "hi", add_bos=True)[0] == 3
  with pytest.raises(ValueError, match="no BOS"):
    tokenizers.encode_prompt(tokenizers.load_vocabulary("bytes"), "hi",
                             add_bos=True)


def test_encode_prompt_max_length():
  vocab = tokenizers.load_vocabulary("bytes")
  assert len(tokenizers.encode_prompt(vocab, "abcd", max_length=4)) == 4
  with pytest.raises(ValueError, match=r"prompt is 5 tokens.*max_length=4"):
    tokenizers.encode_prompt(vocab, "abcde", max_length=4)


# --------------------------------------------------------------------- errors


def test_load_vocabulary_errors(tmp_path):
  missing_model = str(tmp_path / "missing.model")
  with pytest.raises(FileNotFoundError, match="missing.model"):
    tokenizers.load_vocabulary(missing_model)
  with pytest.raises(FileNotFoundError, match="nope.json"):
    tokenizers.load_vocabulary(str(tmp_path / "nope.json"))
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    tokenizers.load_vocabulary(str(tmp_path))  # a directory without one
  with pytest.raises(FileNotFoundError, match="no/such/dir"):
    tokenizers.load_vocabulary(str(tmp_path / "no/such/dir"))
  with pytest.raises(ValueError, match="unknown vocabulary spec 'gpt2'"):
    tokenizers.load_vocabulary("gpt2")


# ------------------------------------------------------------- TF / seqio path


def test_hf_tf_path_matches_python(hf_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  vocab = tokenizers.load_vocabulary(hf_path)
  for text in TEXTS:
    ids = vocab.encode_tf(tf.constant(text))
    assert ids.dtype == tf.int32 and ids.shape.rank == 1
    assert ids.numpy().tolist() == vocab.encode(text)
    assert vocab.decode_tf(ids).numpy().decode("utf-8") == text
  # Batched decode: seqio blanks everything after the first EOS with pad.
  a, b = vocab.encode("The fox"), vocab.encode("数学 🙂")
  width = max(len(a), len(b)) + 3
  rows = [a + [vocab.eos_id] + [5] * (width - len(a) - 1),
          b + [vocab.pad_id] * (width - len(b))]
  texts = vocab.decode_tf(tf.constant(rows, tf.int32))
  assert texts.shape == (2,)
  assert [t.decode() for t in texts.numpy()] == ["The fox", "数学 🙂"]


def test_hf_encode_tf_in_tf_data_graph(hf_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  vocab = tokenizers.load_vocabulary(hf_path)
  ds = tf.data.Dataset.from_tensor_slices({"text": TEXTS})
  ds = ds.map(lambda ex: {"targets": vocab.encode_tf(ex["text"])})
  assert ds.element_spec["targets"].shape.as_list() == [None]
  got = [ex["targets"].tolist() for ex in ds.as_numpy_iterator()]
  assert got == [vocab.encode(t) for t in TEXTS]


def test_spm_and_bytes_tf_path_match_python(spm_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for vocab in (tokenizers.load_vocabulary("bytes"),
                tokenizers.load_vocabulary(spm_path)):
    text = TEXTS[-1]
    ids = vocab.encode_tf(tf.constant(text))
    assert ids.numpy().tolist() == vocab.encode(text)
    assert vocab.decode_tf(ids).numpy().decode("utf-8") == text


# ---------------------------------------------------------- seqio integration


def test_hf_vocabulary_pickles_and_compares(hf_path):
  vocab = tokenizers.load_vocabulary(hf_path)
  copy = pickle.loads(pickle.dumps(vocab))
  assert copy == vocab and type(copy) is type(vocab)
  assert copy.encode(TEXTS[-1]) == vocab.encode(TEXTS[-1])
  assert vocab != tokenizers.HFTokenizerVocabulary(hf_path, pad_id=0)
  assert "HFTokenizerVocabulary" in str(vocab)


def test_import_does_not_import_tensorflow():
  code = ("import sys, kimi_jax.tokenizers; "
          "assert 'tensorflow' not in sys.modules; "
          "assert 'seqio' not in sys.modules")
  subprocess.run([sys.executable, "-c", code], check=True)
