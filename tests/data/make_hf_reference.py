"""Writes the tiny HF reference models and outputs that tests/test_hf.py checks.

Rerun (needs torch + transformers, which the package itself never needs):

  . .venv/bin/activate
  python tests/data/make_hf_reference.py        # from the repository root

It rewrites, deterministically (fixed seeds, CPU, fp32 compute):

  tests/data/hf_tiny_llama/   LlamaForCausalLM: GQA (4 heads / 2 kv heads),
                              explicit head_dim (8 != 64 / 4), Llama 3
                              rope_scaling, UNTIED lm_head, stored as bf16 and
                              sharded by transformers itself (index.json).
  tests/data/hf_tiny_qwen2/   Qwen2ForCausalLM: qkv bias, TIED embeddings,
                              stored as fp32 in one model.safetensors.
  tests/data/hf_reference.npz for each model `<name>_...`:
    tokens      int32 [2, 16]        a batch without padding
    logits      float32 [2, 16, V]   HF fp32 logits of `tokens`
    prompts     int32 [3, P]         prompts of different lengths, right-padded
                                     with -1 (`prompt_lens` gives the lengths)
    generations int32 [3, 32]        HF greedy continuations (32 new tokens),
                                     each prompt run alone (no padding) with
                                     eos disabled
    min_margin  float32 scalar       smallest top-1 minus top-2 logit gap over
                                     all greedy steps (a safety margin: fp32
                                     noise ~1e-5 cannot flip an argmax)

Weights are drawn at a larger scale than HF's default init (0.02) so that
logits are far from uniform and greedy decoding is robust to fp32 noise;
norm weights and qkv biases are random too, so that a mapping that ignored
them would fail the parity test. The bf16 model's weights are rounded to bf16
before the fp32 reference run, so the files hold exactly the weights used.
"""
import os

import numpy as np
import torch
import transformers

HERE = os.path.dirname(os.path.abspath(__file__))
VOCAB = 128
NEW_TOKENS = 32
PROMPT_LENS = (3, 7, 12)


def _randomize(model: torch.nn.Module, seed: int, std: float, round_bf16: bool) -> None:
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in sorted(model.named_parameters()):
      if name.endswith("norm.weight"):
        new = 1.0 + 0.2 * torch.randn(p.shape, generator=gen)
      elif name.endswith(".bias"):
        new = 0.5 * torch.randn(p.shape, generator=gen)
      else:
        new = std * torch.randn(p.shape, generator=gen)
      if round_bf16:
        new = new.to(torch.bfloat16).to(torch.float32)
      p.copy_(new)


def _greedy(model, prompt: list[int]) -> tuple[list[int], float]:
  ids = torch.tensor([prompt])
  out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                       max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                       output_scores=True, return_dict_in_generate=True)
  new = out.sequences[0, len(prompt):].tolist()
  assert len(new) == NEW_TOKENS, new
  margin = min(float(torch.topk(s[0], 2).values.diff().abs()) for s in out.scores)
  return new, margin


def hf_configs() -> dict:
  """name -> (transformers config, weight std, storage dtype, max_shard_size)."""
  llama = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
      rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=[2, 3],
      pad_token_id=0,
      rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 64})
  qwen2 = transformers.Qwen2Config(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
      rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False,
      bos_token_id=None, eos_token_id=5, pad_token_id=4,
      rope_parameters={"rope_type": "default", "rope_theta": 1e6})
  return {"hf_tiny_llama": (llama, 0.15, torch.bfloat16, "100KB"),
          "hf_tiny_qwen2": (qwen2, 0.2, torch.float32, "50GB")}


def build(name: str, seed: int):
  """A random fp32 HF model for `name` (weights bf16-exact if stored as bf16)."""
  config, std, save_dtype, _ = hf_configs()[name]
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config).eval().to(torch.float32)
  _randomize(model, seed, std, round_bf16=save_dtype == torch.bfloat16)
  # No eos and no pad: greedy decoding runs the full 32 tokens and nothing is
  # masked from the logits, so it matches a sampler called with eos_id=None.
  model.generation_config.eos_token_id = None
  model.generation_config.pad_token_id = None
  model.generation_config.bos_token_id = None
  return model


def make(name: str, seed: int) -> dict:
  _, _, save_dtype, max_shard_size = hf_configs()[name]
  model = build(name, seed)
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, VOCAB, (2, 16)).astype(np.int32)
  with torch.no_grad():
    logits = model(torch.from_numpy(tokens).long()).logits.float().numpy()
    prompts = np.full((len(PROMPT_LENS), max(PROMPT_LENS)), -1, np.int32)
    gens, margins = [], []
    for i, n in enumerate(PROMPT_LENS):
      prompt = rng.integers(0, VOCAB, n).tolist()
      prompts[i, :n] = prompt
      new, margin = _greedy(model, prompt)
      gens.append(new)
      margins.append(margin)

  out_dir = os.path.join(HERE, name)
  model.to(save_dtype).save_pretrained(out_dir, max_shard_size=max_shard_size)
  print(f"{name}: min greedy margin {min(margins):.4f}, files {sorted(os.listdir(out_dir))}")
  return {f"{name}_tokens": tokens, f"{name}_logits": logits.astype(np.float32),
          f"{name}_prompts": prompts, f"{name}_prompt_lens": np.asarray(PROMPT_LENS, np.int32),
          f"{name}_generations": np.asarray(gens, np.int32),
          f"{name}_min_margin": np.float32(min(margins))}


def main():
  torch.set_num_threads(1)
  ref = {}
  ref.update(make("hf_tiny_llama", seed=0))
  ref.update(make("hf_tiny_qwen2", seed=1))
  ref["versions"] = np.asarray(
      f"torch {torch.__version__}, transformers {transformers.__version__}")
  np.savez_compressed(os.path.join(HERE, "hf_reference.npz"), **ref)


if __name__ == "__main__":
  main()
