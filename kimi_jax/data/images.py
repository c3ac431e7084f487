"""Images for multimodal prompts: loading, HF-equal preprocessing, placeholders.

  proc = images.load_processor("path/to/llava")      # its preprocessor_config.json
  pixels_YXC = images.preprocess(images.load_image("cat.png"), proc)   # float32
  ids = images.encode_with_images(encode, "<image>What is it?", 1, 729, image_token_id)

Preprocessing is HF's PIL image processor (SiglipImageProcessor, and
LlavaOnevisionImageProcessor's base image, i.e. without anyres tiles),
reimplemented with the same PIL and numpy calls so that the output is equal
to transformers' (tests/data/make_llava_reference.py writes the reference):
  1. to RGB: transparency (an alpha band or a palette's transparent colour)
     is composited onto white;
  2. resize to size.height x size.width with PIL (`resample`, bicubic = 3);
  3. rescale: float64(x) * rescale_factor, then float32;
  4. normalise: (x - mean) / std in float32, per channel.
Output layout is NHWC (`[Y, X, 3]`), as `models/vision.py` takes it (HF's is
NCHW). Processors that crop (CLIP's shortest_edge + center_crop) are
rejected with an error naming the field.

Placeholders: a prompt's text marks where each image goes with IMAGE_MARKER
("<image>", the LLaVA convention); a text without markers has its images
before it. `encode_with_images` turns each marker into `tokens_per_image`
copies of the image token id, as HF processors expand "<image>".
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
import os
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_MARKER = "<image>"
DATA_URI_PREFIX = "data:image/"
PROCESSOR_CONFIG_NAME = "preprocessor_config.json"
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
# preprocessor_config.json keys that describe what we do not do (anyres tiles,
# padding tiles to a batch) or carry no processing; the base image is the same.
_IGNORED_KEYS = ("image_grid_pinpoints", "do_pad", "image_processor_type", "processor_class",
                 "crop_size", "default_to_square", "image_seq_length", "input_data_format",
                 "data_format", "device", "disable_grouping", "return_tensors", "pad_size")


class ImageError(ValueError):
  """An image or image processor config that cannot be used; the message names it."""


@dataclasses.dataclass(frozen=True)
class ProcessorConfig:
  """What `preprocess` does (HF preprocessor_config.json fields). Hashable."""
  height: int = 32
  width: int = 32
  resample: int = 3  # PIL code: 3 bicubic, 2 bilinear, ...
  do_resize: bool = True
  do_rescale: bool = True
  rescale_factor: float = 1 / 255
  do_normalize: bool = True
  image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
  image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
  do_convert_rgb: bool = True

  def __post_init__(self):
    for name in ("height", "width"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ImageError(f"ProcessorConfig.{name} must be a positive int, got {value!r}")
    if self.resample not in RESAMPLE:
      raise ImageError(f"ProcessorConfig.resample must be a PIL code in {sorted(RESAMPLE)}, "
                       f"got {self.resample!r}")
    for name in ("image_mean", "image_std"):
      value = tuple(float(v) for v in getattr(self, name))
      if len(value) != 3:
        raise ImageError(f"ProcessorConfig.{name} needs 3 values (R, G, B), got {value}")
      object.__setattr__(self, name, value)
    if any(s == 0 for s in self.image_std):
      raise ImageError(f"ProcessorConfig.image_std must not contain 0, got {self.image_std}")


def processor_from_hf(hf: Mapping[str, Any], source: str = PROCESSOR_CONFIG_NAME
                      ) -> ProcessorConfig:
  """ProcessorConfig from a parsed preprocessor_config.json (`source` names it in errors)."""
  def fail(field, msg):
    raise ImageError(f"{source}: field '{field}': {msg}")

  if hf.get("do_center_crop"):
    fail("do_center_crop", "center cropping (CLIP-style processors) is not supported; "
         "supported: a fixed height x width resize (SigLIP, LLaVA-OneVision)")
  size = hf.get("size", {"height": 224, "width": 224})
  if isinstance(size, int):
    size = {"height": size, "width": size}
  if not isinstance(size, Mapping) or not {"height", "width"} <= set(size):
    fail("size", f"expected {{'height': h, 'width': w}}, got {size!r} (shortest_edge / "
         "longest_edge resizes keep the aspect ratio and are not supported)")
  extra = sorted(set(size) - {"height", "width"})
  if extra:
    fail("size", f"unsupported keys {extra}")
  known = {f.name for f in dataclasses.fields(ProcessorConfig)} | {"size", "do_center_crop"}
  unknown = sorted(k for k in hf if k not in known and k not in _IGNORED_KEYS)
  if unknown:
    fail(unknown[0], "unknown image processor field (supported: "
         f"{sorted(known - {'height', 'width'})})")
  kwargs = {k: hf[k] for k in ("resample", "do_resize", "do_rescale", "rescale_factor",
                               "do_normalize", "image_mean", "image_std", "do_convert_rgb")
            if k in hf and hf[k] is not None}
  for key in ("image_mean", "image_std"):
    if isinstance(kwargs.get(key), (int, float)):
      kwargs[key] = (kwargs[key],) * 3
  try:
    return ProcessorConfig(height=size["height"], width=size["width"], **kwargs)
  except (ImageError, TypeError, ValueError) as e:
    raise ImageError(f"{source}: {e}") from None


def processor_to_hf(cfg: ProcessorConfig) -> dict[str, Any]:
  """The preprocessor_config.json of a SiglipImageProcessor doing what `cfg` does."""
  return {"image_processor_type": "SiglipImageProcessor",
          "size": {"height": cfg.height, "width": cfg.width}, "resample": cfg.resample,
          "do_resize": cfg.do_resize, "do_rescale": cfg.do_rescale,
          "rescale_factor": cfg.rescale_factor, "do_normalize": cfg.do_normalize,
          "image_mean": list(cfg.image_mean), "image_std": list(cfg.image_std),
          "do_convert_rgb": cfg.do_convert_rgb}


def load_processor(path: Union[str, os.PathLike]) -> ProcessorConfig:
  """ProcessorConfig from preprocessor_config.json, or a directory holding one."""
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, PROCESSOR_CONFIG_NAME)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"image processor config {path} does not exist")
  try:
    with open(path) as f:
      hf = json.load(f)
  except ValueError as e:
    raise ImageError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(hf, dict):
    raise ImageError(f"{path}: expected a JSON object")
  return processor_from_hf(hf, source=path)


def processor_for_tower(path: Union[str, os.PathLike, None], image_size: int) -> ProcessorConfig:
  """The processor at `path` (a preprocessor_config.json or its directory),
  or SigLIP's default (mean and std 0.5) at `image_size` when `path` is empty.
  FileNotFoundError / ImageError name the file; a processor that resizes to
  anything but the tower's `image_size` square is an ImageError too."""
  if not path:
    return ProcessorConfig(height=image_size, width=image_size)
  proc = load_processor(path)
  if (proc.height, proc.width) != (image_size, image_size):
    raise ImageError(f"{os.fspath(path)}: resizes to {proc.width}x{proc.height} but the "
                     f"model's tower takes {image_size} px images")
  return proc


def save_processor(cfg: ProcessorConfig, directory: Union[str, os.PathLike]) -> str:
  """Writes `directory/preprocessor_config.json` atomically; returns its path.

  Runs and orbax model directories keep the processor their images went
  through beside model_config.json, so that `launch.convert` exports the
  normalisation the model was trained with."""
  path = os.path.join(os.fspath(directory), PROCESSOR_CONFIG_NAME)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(processor_to_hf(cfg), f, indent=2, sort_keys=True)
  os.replace(tmp, path)
  return path


# ------------------------------------------------------------------ loading


def is_data_uri(ref: str) -> bool:
  return ref.startswith(DATA_URI_PREFIX)


def _is_remote(path: str) -> bool:
  return "://" in path


def resolve(ref: str, base_dir: str) -> str:
  """A path relative to `base_dir` made absolute (normalised); absolute paths,
  "scheme://" paths and data URIs unchanged."""
  if is_data_uri(ref) or _is_remote(ref) or os.path.isabs(ref):
    return ref
  if _is_remote(base_dir):
    return base_dir.rstrip("/") + "/" + ref
  return os.path.normpath(os.path.join(base_dir, ref))


def relative(ref: str, base_dir: str) -> str:
  """A local path relative to `base_dir` (inverse of `resolve`); others unchanged."""
  if is_data_uri(ref) or _is_remote(ref) or _is_remote(base_dir):
    return ref
  return os.path.relpath(os.path.abspath(ref), base_dir)


def describe(ref: str) -> str:
  """`ref` for a message: a data URI shortened."""
  return ref if not is_data_uri(ref) else ref[:40] + "..."


def data_uri_bytes(ref: str) -> bytes:
  """The encoded image inside "data:image/<type>;base64,<data>"; ImageError if malformed."""
  head, sep, data = ref.partition(",")
  if not sep or not head.endswith(";base64") or not is_data_uri(head):
    raise ImageError(f"not a base64 image data URI (expected 'data:image/png;base64,...', "
                     f"got {describe(ref)!r})")
  try:
    return base64.b64decode(data, validate=True)
  except (binascii.Error, ValueError) as e:
    raise ImageError(f"data URI {describe(ref)!r} is not valid base64 ({e})") from None


def to_data_uri(data: bytes) -> str:
  """A data URI for encoded image bytes, its type as PIL detects it (png, jpeg, ...)."""
  fmt = decode_image(data).format or "png"
  return f"{DATA_URI_PREFIX}{fmt.lower()};base64,{base64.b64encode(data).decode('ascii')}"


def image_bytes(ref: str) -> bytes:
  """The encoded bytes of a path ("scheme://" through tf.io.gfile) or data URI.
  FileNotFoundError / ImageError naming `ref`."""
  if is_data_uri(ref):
    return data_uri_bytes(ref)
  if _is_remote(ref):
    from tensorflow.io import gfile  # pylint: disable=g-import-not-at-top
    if not gfile.exists(ref):
      raise FileNotFoundError(f"image file {ref} does not exist")
    with gfile.GFile(ref, "rb") as f:
      return f.read()
  if not os.path.isfile(ref):
    raise FileNotFoundError(f"image file {ref} does not exist")
  with open(ref, "rb") as f:
    return f.read()


def decode_image(data: bytes) -> Image.Image:
  """A fully decoded PIL image (ImageError when the bytes are not a readable image)."""
  try:
    image = Image.open(io.BytesIO(data))
    image.load()  # decode now: a truncated file fails here, not later in a batch
  except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
    raise ImageError(f"cannot decode image ({type(e).__name__}: {e})") from None
  return image


def load_image(ref: str) -> Image.Image:
  """A decoded image from a path or a base64 data URI; errors name `ref`."""
  data = image_bytes(ref)
  try:
    return decode_image(data)
  except ImageError as e:
    raise ImageError(f"{describe(ref)}: {e}") from None


# ------------------------------------------------------------ preprocessing


def to_rgb(image: Union[Image.Image, np.ndarray]) -> np.ndarray:
  """uint8 `[Y, X, 3]`: HF's `convert_to_rgb`, transparency composited on white.
  A uint8 array must already be `[Y, X, 3]` RGB."""
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
      raise ImageError(f"an image array must be uint8 [height, width, 3], got "
                       f"{image.dtype} {image.shape}")
    return image
  if "A" in image.getbands() or image.info.get("transparency") is not None:
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.array(Image.alpha_composite(white, rgba).convert("RGB"))
  return np.array(image.convert("RGB"))


def preprocess(image: Union[Image.Image, np.ndarray], cfg: ProcessorConfig) -> np.ndarray:
  """float32 `[height, width, 3]` pixel values of one image (module docstring)."""
  if cfg.do_convert_rgb:
    x = to_rgb(image)
  else:
    x = image if isinstance(image, np.ndarray) else np.array(image)
    if x.ndim != 3 or x.shape[-1] != 3:
      raise ImageError(f"do_convert_rgb is false but the image is not RGB (shape {x.shape})")
  if cfg.do_resize:
    # HF resizes a uint8 image through PIL the same way (reducing_gap None).
    x = np.array(Image.fromarray(x).resize((cfg.width, cfg.height), resample=cfg.resample))
  if x.shape[:2] != (cfg.height, cfg.width):
    raise ImageError(f"image is {x.shape[1]}x{x.shape[0]} but do_resize is false and the "
                     f"model takes {cfg.width}x{cfg.height}")
  if cfg.do_rescale:
    x = (x.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
  x = x.astype(np.float32)
  if cfg.do_normalize:
    x = (x - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)
  return x


def preprocess_batch(images: Sequence[Union[Image.Image, np.ndarray, str]],
                     cfg: ProcessorConfig, slots: Optional[int] = None) -> np.ndarray:
  """float32 `[N, height, width, 3]`; a str is a path or data URI. With `slots`,
  N = slots and the images after the given ones are zeros (padding slots)."""
  n = len(images) if slots is None else slots
  if len(images) > n:
    raise ImageError(f"{len(images)} images do not fit in {n} image slots")
  out = np.zeros((n, cfg.height, cfg.width, 3), np.float32)
  for i, image in enumerate(images):
    out[i] = preprocess(load_image(image) if isinstance(image, str) else image, cfg)
  return out


# ------------------------------------------------------------- placeholders


def count_markers(text: str) -> int:
  return text.count(IMAGE_MARKER)


def split_at_markers(text: str, num_images: int) -> list[str]:
  """The `num_images + 1` text pieces around the images: split at the markers,
  or, without markers, the images first. ValueError when the counts differ."""
  markers = count_markers(text)
  if markers == 0:
    return [""] * num_images + [text]
  if markers != num_images:
    raise ValueError(f"the text has {markers} '{IMAGE_MARKER}' markers but there are "
                     f"{num_images} images")
  return text.split(IMAGE_MARKER)


def encode_with_images(encode: Callable[[str], list[int]], text: str, num_images: int,
                       tokens_per_image: int, image_token_id: int) -> list[int]:
  """Token ids of `text` with each image as `tokens_per_image` placeholder ids.

  `encode` tokenizes a piece of text (no BOS/EOS); pieces are encoded
  separately, as a tokenizer with "<image>" as a special token splits there.
  """
  ids: list[int] = []
  pieces = split_at_markers(text, num_images)
  for i, piece in enumerate(pieces):
    if piece:
      encoded = list(encode(piece))
      if image_token_id in encoded:
        raise ValueError(f"the text encodes to the image token id {image_token_id} outside "
                         "a marker; pick an id the tokenizer never produces")
      ids += encoded
    if i < len(pieces) - 1:
      ids += [image_token_id] * tokens_per_image
  return ids
