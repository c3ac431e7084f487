"""TFDS and seqio sources for prompt-set JSONL files (schema: `data/prompts.py`).

  from kimi_jax.data import prompt_pipelines
  builder = prompt_pipelines.PromptSetBuilder(jsonl_path="p.jsonl", data_dir="/data/tfds")
  builder.download_and_prepare()
  ds = builder.as_dataset(split="train")      # one example per prompt, file order

  task = prompt_pipelines.register_task("my_prompts", "p.jsonl", "bytes",
                                        max_prompt_length=512, data_dir="/data/tfds")
  ds = task.get_dataset(split="train", shuffle=False)
  prompt_pipelines.register_mixture("all_prompts", [("my_prompts", 3.0), ("other", 1.0)])

TFDS example (tf.string scalars unless noted): id, prompt, type, answer ("" for
none), tests (the tests list as a JSON string), difficulty (tf.float64, NaN
for none), tags (tf.string[n]), source, images (tf.string[n]: each image's
encoded file bytes, so prepared data does not depend on the image files).
The schema forbids an empty answer and a NaN difficulty, so
`prompt_from_example` recovers the exact Prompt, except that images come
back as inline data URIs (same bytes) instead of paths.

seqio task example: the TFDS example plus `inputs`, tf.int32[T], the prompt's
token ids as `tokenizers.encode_prompt` makes them (no EOS, optional BOS).
An "<image>" marker stays text here: its expansion into one placeholder id
per image patch depends on the model (`data.images.encode_with_images`).
Prompts longer than `max_prompt_length` tokens are dropped, never truncated
(a cut problem statement has another answer); use `count_overlong` to see
how many.

Caching: the prepared data sits under DATA_DIR/prompt_set/<config>/1.0.0,
where <config> is the file's stem plus a hash of its bytes, of skip_invalid
and of the size and modification time of each image file it names, so an
edited file or image is prepared afresh instead of served stale.
On a multi-host job prepare once (e.g. process 0, or before the job):
TFDS writes into a temporary directory and renames it into place.

Order: TFDS shuffling is disabled, so examples come in file order, and
seqio's example-level sharding (`shard_info`) gives host i the prompts at
positions p % n == i: the rule of `prompts.shard`.

Importing this module imports TensorFlow, TFDS and seqio (seconds);
`data/prompts.py` does not.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from kimi_jax import tokenizers
from kimi_jax.data import prompts as prompts_lib

SPLIT = "train"
# The schema's fields, carried next to `inputs` in task examples.
METADATA_FEATURES = prompts_lib.FIELDS


@dataclasses.dataclass(eq=False)
class PromptSetConfig(tfds.core.BuilderConfig):
  """A prompt-set file as a TFDS builder config; build it with `prompt_set_config`."""
  jsonl_path: str = ""
  skip_invalid: bool = False


def prompt_set_config(jsonl_path: Union[str, os.PathLike], *,
                      skip_invalid: bool = False) -> PromptSetConfig:
  """The config of `jsonl_path`, named "<stem>-<hash of its bytes and skip_invalid>"."""
  jsonl_path = os.fspath(jsonl_path)
  if "://" not in jsonl_path and not os.path.exists(jsonl_path):
    raise FileNotFoundError(f"prompt file {jsonl_path} does not exist")
  digest = hashlib.sha256(f"skip_invalid={skip_invalid}\n".encode())
  with tf.io.gfile.GFile(jsonl_path, "rb") as f:
    for line in f:
      digest.update(line)
      if b'"images"' in line:
        digest.update(_image_stats(line, jsonl_path))
  stem = os.path.splitext(os.path.basename(jsonl_path))[0]
  stem = re.sub(r"[^A-Za-z0-9_]+", "_", stem).strip("_")[:64] or "prompts"
  return PromptSetConfig(name=f"{stem}-{digest.hexdigest()[:12]}", jsonl_path=jsonl_path,
                         skip_invalid=skip_invalid,
                         description=f"prompt set {jsonl_path} (skip_invalid={skip_invalid})")


def _image_stats(line: bytes, jsonl_path: str) -> bytes:
  """Size and mtime of the image files one JSONL line names (b"" if it has
  none or does not parse: reading the file reports that, naming the line)."""
  from kimi_jax.data import images as images_lib  # pylint: disable=g-import-not-at-top
  try:
    refs = json.loads(line).get("images")
  except (ValueError, AttributeError):
    return b""
  stats = []
  for ref in refs if isinstance(refs, list) else ():
    if isinstance(ref, str) and not images_lib.is_data_uri(ref):
      path = images_lib.resolve(ref, os.path.dirname(jsonl_path) or ".")
      try:
        st = tf.io.gfile.stat(path)
        stats.append(f"{path}:{st.length}:{st.mtime_nsec}")
      except tf.errors.OpError:
        stats.append(f"{path}:missing")
  return "\n".join(stats).encode()


class PromptSetBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """TFDS builder of one prompt-set JSONL file: a single "train" split in file order.

  `PromptSetBuilder(jsonl_path=..., data_dir=..., skip_invalid=False)`, or
  `config=prompt_set_config(...)`. Not registered by name (each file is its
  own config); read prepared data back with this class or
  `tfds.builder_from_directory`. Invalid lines raise PromptFileError while
  preparing, or are skipped and logged with skip_invalid=True.
  """
  name = "prompt_set"
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "Schema of kimi_jax.data.prompts.",
                   "1.1.0": "images: encoded image bytes per prompt."}

  def __init__(self, *, jsonl_path: Optional[Union[str, os.PathLike]] = None,
               skip_invalid: bool = False, config: Optional[PromptSetConfig] = None,
               **kwargs: Any):
    if (jsonl_path is None) == (config is None):
      raise ValueError("PromptSetBuilder needs exactly one of jsonl_path= or config=")
    if config is None:
      config = prompt_set_config(jsonl_path, skip_invalid=skip_invalid)
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text
    features = tfds.features.FeaturesDict({
        "id": text(), "prompt": text(), "type": text(), "answer": text(),
        "tests": text(), "difficulty": tfds.features.Scalar(dtype=np.float64),
        "tags": tfds.features.Sequence(text()), "source": text(),
        "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_))})
    return self.dataset_info_from_configs(features=features, disable_shuffling=True)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # the file is local or on gfile; nothing to download
    return {SPLIT: self._generate_examples()}

  def _generate_examples(self):
    config = self.builder_config
    prompt_set = prompts_lib.read_jsonl(config.jsonl_path, skip_invalid=config.skip_invalid)
    if prompt_set.skipped:
      logging.warning("%s: skipped %d invalid lines; the first: %s", config.jsonl_path,
                      prompt_set.skipped, prompt_set.errors[0])
    for i, prompt in enumerate(prompt_set.prompts):
      yield i, prompt_to_example(prompt)


def prompt_to_example(prompt: prompts_lib.Prompt) -> dict[str, Any]:
  """The TFDS example of a prompt (see the module docstring)."""
  return {"id": prompt.id, "prompt": prompt.prompt, "type": prompt.type,
          "answer": prompt.answer or "",
          "tests": json.dumps([dict(t) for t in prompt.tests], ensure_ascii=False),
          "difficulty": math.nan if prompt.difficulty is None else prompt.difficulty,
          "tags": list(prompt.tags), "source": prompt.source,
          "images": [_image_bytes(ref) for ref in prompt.images]}


def _image_bytes(ref: str) -> bytes:
  from kimi_jax.data import images as images_lib  # pylint: disable=g-import-not-at-top
  return images_lib.image_bytes(ref)


def _text(value: Any) -> str:
  if isinstance(value, np.ndarray):
    value = value.item()
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def prompt_from_example(example: Mapping[str, Any]) -> prompts_lib.Prompt:
  """The Prompt of a TFDS or seqio example (numpy values, as `tfds.as_numpy` gives).

  Keys other than the schema's (seqio's `inputs`) are ignored.
  """
  difficulty = float(example["difficulty"])
  where = f"example {_text(example['id'])!r}"
  images = []
  if len(example.get("images", ())):
    from kimi_jax.data import images as images_lib  # pylint: disable=g-import-not-at-top
    images = [images_lib.to_data_uri(bytes(b)) for b in example["images"]]
  return prompts_lib.Prompt.from_json({
      "id": _text(example["id"]), "prompt": _text(example["prompt"]),
      "type": _text(example["type"]), "answer": _text(example["answer"]) or None,
      "tests": json.loads(_text(example["tests"])),
      "difficulty": None if math.isnan(difficulty) else difficulty,
      "tags": [_text(t) for t in example["tags"]], "source": _text(example["source"]),
      "images": images}, where)


def register_task(name: str, jsonl_path: Union[str, os.PathLike],
                  vocabulary: Union[str, seqio.Vocabulary], *, max_prompt_length: int,
                  data_dir: Optional[str] = None, skip_invalid: bool = False,
                  add_bos: bool = False, shuffle_buffer_size: int = 10_000) -> seqio.Task:
  """Registers (or replaces) seqio task `name` reading `jsonl_path` through TFDS.

  Prepares the TFDS data now (so schema errors surface here, naming the
  line), under `data_dir` (default: TFDS's default data dir).

  Args:
    name: the seqio task name; a task already registered under it is replaced.
    jsonl_path: the prompt-set file.
    vocabulary: a seqio Vocabulary, or a `tokenizers.load_vocabulary` spec.
    max_prompt_length: prompts with more tokens (BOS included) are dropped.
    skip_invalid: skip invalid lines instead of raising (see `read_jsonl`).
    add_bos: start `inputs` with the vocabulary's BOS id.
    shuffle_buffer_size: used when the task is read with shuffle=True.

  Returns:
    The task; `task.get_dataset(split="train", shuffle=False)` yields the
    prompts in file order.
  """
  if max_prompt_length < 1:
    raise ValueError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
  vocab = (tokenizers.load_vocabulary(vocabulary) if isinstance(vocabulary, str)
           else vocabulary)
  bos = []
  if add_bos:  # encode_prompt's rule: a vocabulary without BOS is an error
    bos = tokenizers.encode_prompt(vocab, "", add_bos=True)
  builder = PromptSetBuilder(jsonl_path=jsonl_path, skip_invalid=skip_invalid,
                             data_dir=data_dir)
  builder.download_and_prepare()

  def dataset_fn(split: str, shuffle_files: bool, seed: Optional[int] = None) -> tf.data.Dataset:
    return builder.as_dataset(split=split, shuffle_files=shuffle_files,
                              read_config=tfds.ReadConfig(shuffle_seed=seed))

  def copy_prompt_to_inputs(ds: tf.data.Dataset) -> tf.data.Dataset:
    return ds.map(lambda ex: {**ex, "inputs": ex["prompt"]},
                  num_parallel_calls=tf.data.AUTOTUNE)

  def add_bos_and_drop_overlong(ds: tf.data.Dataset) -> tf.data.Dataset:
    bos_T = tf.constant(bos, tf.int32, shape=[len(bos)])
    ds = ds.map(lambda ex: {**ex, "inputs": tf.concat([bos_T, ex["inputs"]], 0)})
    return ds.filter(lambda ex: tf.size(ex["inputs"]) <= max_prompt_length)

  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  source = seqio.FunctionDataSource(
      dataset_fn, splits=[SPLIT],
      num_input_examples={SPLIT: builder.info.splits[SPLIT].num_examples})
  return seqio.TaskRegistry.add(
      name, source=source,
      output_features={"inputs": seqio.Feature(vocab, add_eos=False, dtype=tf.int32)},
      preprocessors=[copy_prompt_to_inputs,
                     _tokenize, add_bos_and_drop_overlong],
      shuffle_buffer_size=shuffle_buffer_size)


def register_mixture(name: str, tasks_and_rates: Sequence[tuple[str, float]]) -> seqio.Mixture:
  """Registers (or replaces) seqio mixture `name` of prompt-set tasks, e.g.
  [("math_prompts", 3.0), ("code_prompts", 1.0)] (same vocabulary for all).

  A mixture passes on only `inputs` unless asked: read it with
  `get_dataset(..., passthrough_features=METADATA_FEATURES)` to keep the
  fields a reward needs (`prompt_from_example` then works on its examples).
  """
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  return seqio.MixtureRegistry.add(name, list(tasks_and_rates))


def _tokenize(dataset: tf.data.Dataset,
                                   output_features: Mapping[str, seqio.Feature]):
  # `prompt` already holds the text; seqio's `inputs_pretokenized` copy would repeat it.
  return seqio.preprocessors.tokenize(dataset, output_features, copy_pretokenized=False,
                                      with_eos=False)


def count_overlong(jsonl_path: Union[str, os.PathLike], vocabulary: Union[str, seqio.Vocabulary],
                   max_prompt_length: int, *, skip_invalid: bool = False,
                   add_bos: bool = False) -> int:
  """How many prompts of the file `register_task` would drop as too long."""
  vocab = (tokenizers.load_vocabulary(vocabulary) if isinstance(vocabulary, str)
           else vocabulary)
  extra = int(add_bos)
  return sum(len(vocab.encode(p.prompt)) + extra > max_prompt_length
             for p in prompts_lib.read_jsonl(jsonl_path, skip_invalid=skip_invalid))
