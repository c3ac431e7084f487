"""Writes the tiny HF LLaVA models and outputs that tests/test_hf_llava.py and
tests/test_images.py check.

Rerun (needs torch + transformers + pillow, which the package never needs):

  python -m venv /tmp/hf && /tmp/hf/bin/pip install torch==2.13.0 transformers pillow
  /tmp/hf/bin/python tests/data/make_llava_reference.py     # from the repository root

It rewrites, deterministically (fixed seeds, CPU, fp32 compute):

  tests/data/llava_images/*.png   test images: odd sizes, RGB, RGBA with varying
                                  alpha, grayscale, a palette image with a
                                  transparent colour, one already 32x32
  tests/data/llava_tiny_llama/    LlavaForConditionalGeneration: SigLIP tower
                                  (feature layer -2, select "default": 15 of 16
                                  patches), Llama LM (GQA, untied head);
                                  SiglipImageProcessor with CLIP's mean/std;
                                  bf16, sharded by transformers (index.json)
  tests/data/llava_tiny_qwen2/    the same with feature layer -1, select "full"
                                  (16 patches), Qwen2 LM (qkv bias, tied);
                                  LlavaOnevisionImageProcessor (mean/std 0.5;
                                  its first tile is the resized whole image)
  tests/data/llava_reference.npz  for each model `<name>_...`:
    pixel_values    float32 [n_files, 3, 32, 32]  the HF processor's output per
                                                  test image (sorted file names)
    image_features  float32 [3, P, D]   get_image_features of pixel_values[:3]
    tokens          int32 [2, T]        image + text batch: row 0 holds image 0,
                                        row 1 images 1 and 2 (HF consumes the
                                        images in placeholder order)
    logits          float32 [2, T, V]   HF logits of tokens + pixel_values[:3]
    text_tokens     int32 [2, 12]       text only
    text_logits     float32 [2, 12, V]
    prompts         int32 [2, L]        prompts with images, right-padded with -1
    prompt_lens     int32 [2]
    prompt_images   int32 [2, 2]        indices into pixel_values, -1 = none
    generations     int32 [2, 16]       greedy continuations, each prompt alone,
                                        eos disabled
    min_margin      float32             smallest top-1 minus top-2 logit gap over
                                        all greedy steps

Weights follow make_hf_reference.py: a larger scale than HF's init, random norms
and biases, rounded to bf16 before the fp32 reference run.
"""
import json
import os
import shutil

import numpy as np
from PIL import Image
import torch
import transformers

HERE = os.path.dirname(os.path.abspath(__file__))
IMAGES = os.path.join(HERE, "llava_images")
VOCAB = 128
IMAGE_TOKEN = VOCAB - 1
NEW_TOKENS = 16
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


# ------------------------------------------------------------------ images


def write_images() -> list[str]:
  """Small deterministic test images; returns their paths, sorted."""
  shutil.rmtree(IMAGES, ignore_errors=True)
  os.makedirs(IMAGES)
  y, x = np.mgrid[0:24, 0:40]
  rgb = np.stack([x * 6, y * 10, (x + y) * 4], -1).astype(np.uint8)
  rgb[(y - 12) ** 2 + (x - 20) ** 2 < 49] = (250, 30, 30)  # an edge for bicubic to ring on
  Image.fromarray(rgb).save(os.path.join(IMAGES, "a_rgb_40x24.png"))
  y, x = np.mgrid[0:20, 0:20]
  rgba = np.stack([x * 12, 200 - y * 8, np.full_like(x, 90), (x + y) * 6], -1).astype(np.uint8)
  Image.fromarray(rgba, "RGBA").save(os.path.join(IMAGES, "b_rgba_20x20.png"))
  y, x = np.mgrid[0:33, 0:17]
  Image.fromarray(((x * 15 + y * 7) % 256).astype(np.uint8), "L").save(
      os.path.join(IMAGES, "c_gray_17x33.png"))
  pal = Image.fromarray((np.add.outer(np.arange(12), np.arange(14)) % 4).astype(np.uint8), "P")
  pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * 756)
  pal.save(os.path.join(IMAGES, "d_palette_14x12.png"), transparency=2)
  y, x = np.mgrid[0:32, 0:32]
  sq = np.stack([(x // 8) * 60, (y // 8) * 60, np.full_like(x, 128)], -1).astype(np.uint8)
  Image.fromarray(sq).save(os.path.join(IMAGES, "e_rgb_32x32.png"))
  return sorted(os.path.join(IMAGES, n) for n in os.listdir(IMAGES))


# ------------------------------------------------------------------ models


def hf_configs() -> dict:
  """name -> (LlavaConfig, image processor, weight std, max_shard_size)."""
  def siglip(**kw):
    return transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8, vision_use_head=False, **kw)

  llama = transformers.LlavaConfig(
      vision_config=siglip(layer_norm_eps=1e-6),
      text_config=transformers.LlamaConfig(
          vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
          num_attention_heads=4, num_key_value_heads=2, head_dim=8,
          max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
          bos_token_id=1, eos_token_id=2, pad_token_id=0,
          rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
      image_token_index=IMAGE_TOKEN, vision_feature_layer=-2,
      vision_feature_select_strategy="default", image_seq_length=15,
      projector_hidden_act="gelu")
  qwen2 = transformers.LlavaConfig(
      vision_config=siglip(layer_norm_eps=1e-5),
      text_config=transformers.Qwen2Config(
          vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
          rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False,
          bos_token_id=None, eos_token_id=5, pad_token_id=4,
          rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
      image_token_index=IMAGE_TOKEN, vision_feature_layer=-1,
      vision_feature_select_strategy="full", image_seq_length=16,
      projector_hidden_act="gelu", tie_word_embeddings=True)
  siglip_proc = transformers.SiglipImageProcessorPil(
      size={"height": 32, "width": 32}, image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=3)
  onevision_proc = transformers.LlavaOnevisionImageProcessorPil(
      size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
      image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]], resample=3)
  return {"llava_tiny_llama": (llama, siglip_proc, 0.2, "60KB"),
          "llava_tiny_qwen2": (qwen2, onevision_proc, 0.2, "50GB")}


def _randomize(model: torch.nn.Module, seed: int, std: float) -> None:
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in sorted(model.named_parameters()):
      if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "layernorm.weight")):
        new = 1.0 + 0.2 * torch.randn(p.shape, generator=gen)
      elif name.endswith(".bias"):
        new = 0.3 * torch.randn(p.shape, generator=gen)
      else:
        new = std * torch.randn(p.shape, generator=gen)
      p.copy_(new.to(torch.bfloat16).to(torch.float32))


def build(name: str, seed: int):
  """A random fp32 HF LLaVA model for `name` (weights bf16-exact) and its processor."""
  config, processor, std, _ = hf_configs()[name]
  torch.manual_seed(seed)
  model = transformers.LlavaForConditionalGeneration(config).eval().to(torch.float32)
  _randomize(model, seed, std)
  model.generation_config.eos_token_id = None
  model.generation_config.pad_token_id = None
  model.generation_config.bos_token_id = None
  return model, processor


def process(processor, path: str) -> np.ndarray:
  """float32 [3, H, W]: the processor's pixel values of one image (for
  LLaVA-OneVision the first tile, the resized whole image)."""
  with Image.open(path) as image:
    out = processor(images=[image], return_tensors="np")["pixel_values"]
  return np.asarray(out[0, 0] if out.ndim == 5 else out[0], np.float32)


def _text(rng, n: int) -> list[int]:
  return rng.integers(0, IMAGE_TOKEN, n).tolist()  # never the image token


def _greedy(model, prompt: list[int], pixels: np.ndarray) -> tuple[list[int], float]:
  ids = torch.tensor([prompt])
  out = model.generate(ids, attention_mask=torch.ones_like(ids),
                       pixel_values=torch.from_numpy(pixels), do_sample=False,
                       max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                       output_scores=True, return_dict_in_generate=True)
  new = out.sequences[0, len(prompt):].tolist()
  assert len(new) == NEW_TOKENS, new
  margin = min(float(torch.topk(s[0], 2).values.diff().abs()) for s in out.scores)
  return new, margin


def make(name: str, seed: int, image_paths: list[str]) -> dict:
  config, _, _, max_shard_size = hf_configs()[name]
  model, processor = build(name, seed)
  pixels = np.stack([process(processor, p) for p in image_paths])
  P = config.image_seq_length
  rng = np.random.default_rng(seed)
  img = [IMAGE_TOKEN] * P
  row0 = _text(rng, 4) + img + _text(rng, 6 + P)
  row1 = _text(rng, 3) + img + _text(rng, 2) + img + _text(rng, 5)
  tokens = np.asarray([row0, row1], np.int32)
  text_tokens = rng.integers(0, IMAGE_TOKEN, (2, 12)).astype(np.int32)
  prompts = [_text(rng, 2) + img + _text(rng, 3), img + _text(rng, 1) + img + _text(rng, 2)]
  prompt_images = np.asarray([[3, -1], [1, 4]], np.int32)
  with torch.no_grad():
    pv = torch.from_numpy(pixels[:3])
    feats = model.get_image_features(pixel_values=pv).pooler_output
    feats = torch.stack(list(feats)).float().numpy()
    logits = model(torch.from_numpy(tokens).long(), pixel_values=pv).logits.float().numpy()
    text_logits = model(torch.from_numpy(text_tokens).long()).logits.float().numpy()
    gens, margins = [], []
    for prompt, which in zip(prompts, prompt_images):
      new, margin = _greedy(model, prompt, pixels[which[which >= 0]])
      gens.append(new)
      margins.append(margin)
  padded = np.full((2, max(map(len, prompts))), -1, np.int32)
  for i, p in enumerate(prompts):
    padded[i, :len(p)] = p

  out_dir = os.path.join(HERE, name)
  shutil.rmtree(out_dir, ignore_errors=True)
  model.to(torch.bfloat16).save_pretrained(out_dir, max_shard_size=max_shard_size)
  processor.save_pretrained(out_dir)
  print(f"{name}: min greedy margin {min(margins):.4f}, files {sorted(os.listdir(out_dir))}")
  return {f"{name}_pixel_values": pixels, f"{name}_image_features": feats,
          f"{name}_tokens": tokens, f"{name}_logits": logits.astype(np.float32),
          f"{name}_text_tokens": text_tokens, f"{name}_text_logits": text_logits,
          f"{name}_prompts": padded, f"{name}_prompt_lens": np.asarray(list(map(len, prompts)),
                                                                        np.int32),
          f"{name}_prompt_images": prompt_images,
          f"{name}_generations": np.asarray(gens, np.int32),
          f"{name}_min_margin": np.float32(min(margins))}


def main():
  torch.set_num_threads(1)
  paths = write_images()
  ref = {"image_files": np.asarray([os.path.basename(p) for p in paths])}
  ref.update(make("llava_tiny_llama", seed=0, image_paths=paths))
  ref.update(make("llava_tiny_qwen2", seed=1, image_paths=paths))
  ref["versions"] = np.asarray(
      f"torch {torch.__version__}, transformers {transformers.__version__}")
  np.savez_compressed(os.path.join(HERE, "llava_reference.npz"), **ref)
  print(json.dumps({n: os.path.getsize(os.path.join(IMAGES, n)) for n in os.listdir(IMAGES)}))


if __name__ == "__main__":
  main()
