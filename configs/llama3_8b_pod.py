r"""k1.5 RL of Llama 3 8B on curated math/code prompts, sized for a TPU pod.

Local directories (on every host; nothing is downloaded by the run):
  ~/models/Meta-Llama-3-8B  a HF checkpoint: config.json, *.safetensors,
      tokenizer.json + tokenizer_config.json (which names the EOS,
      "<|end_of_text|>" for the base model), e.g.
      `huggingface-cli download meta-llama/Meta-Llama-3-8B --local-dir ~/models/Meta-Llama-3-8B`.
      Point it at your long-CoT warmed-up checkpoint to follow the report.
  ~/data/k15/train.jsonl, ~/data/k15/heldout.jsonl
      prompt sets in the data/prompts.py schema, with a difficulty per
      prompt for the curriculum (launch/curate.py writes both).

  python -m launch.train --config=configs/llama3_8b_pod.py --workdir=$HOME/runs/llama3_8b \
      --config.model.hf_path=$HOME/models/Meta-Llama-3-8B \
      --config.data.train_file=$HOME/data/k15/train.jsonl \
      --config.data.heldout_file=$HOME/data/k15/heldout.jsonl

The tokenizer follows --config.model.hf_path. Variants: `:smoke` is the same
recipe at toy sizes (tests/test_recipes.py runs it on a tiny random
checkpoint); `:32k` trains 32,768-token rows (1024 prompt + 31,744 response,
4096 new tokens per iteration, carried up to 8 iterations), one row per
FSDP group and microbatch, `max_position_embeddings` raised to 32,768 (Llama
3 8B was trained at 8192: use a long-context warmed-up checkpoint).
The sizes below are for a pod (v5p-64 class, 8 hosts): start the same
command on every host (README "Multi-host"); config.mesh lays the weights
out over the 32 chips (data x fsdp=8 x tensor=4; data=-1 grows with more
chips, in multiples of 32).

Sizes: 128 prompts x 8 samples = 1024 rollout rows per iteration, 8192
tokens (the model's context: 1024 prompt + 7168 response, 2048 new tokens
per iteration with partial rollouts), 4 optimizer steps of 256 samples per
iteration (microbatches of 8 per step and replica). Llama 3 8B: 32 layers,
width 4096, 32 heads / 8 kv heads, untied embeddings, vocab 128256; prompts
start with BOS "<|begin_of_text|>" as in pretraining.

Memory per chip (v5p: 95 GiB HBM), `MEMORY_GIB[variant]`: the train step
compiled (not run) for this recipe's model and row length with abstract
shapes, SPMD over 8 devices (fsdp=2 x tensor=4: the pod's tensor split, a
quarter of its FSDP), one row per FSDP group, long-context settings on
(configs/prompt_rl.py). XLA's per-device peak: 22.1 GiB at 8k and 40.5 GiB
at 32k, of which 11.2 GiB are the shards of the fp32 weights and AdamW
moments, 2.8 GiB on the pod's 32 chips. tests/test_recipe_memory.py
recompiles both and checks the numbers. Without those settings a 32k row's
float32 logits alone are 15.7 GiB and its attention scores quadratic.
"""
import ml_collections

from configs import prompt_rl

# Checked by tests/test_recipe_memory.py (compiled on CPU, XLA memory_analysis).
MEMORY_GIB = {
    "": dict(mesh=(1, 2, 4), rows_per_device=1, peak_per_device=22.1, hbm_per_chip=95.0),
    "32k": dict(mesh=(1, 2, 4), rows_per_device=1, peak_per_device=40.5, hbm_per_chip=95.0),
}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = prompt_rl.base_config(
      hf_path="~/models/Meta-Llama-3-8B",
      train_file="~/data/k15/train.jsonl",
      heldout_file="~/data/k15/heldout.jsonl",
      add_bos=True,  # Llama 3 was pretrained with <|begin_of_text|> first
      total_iterations=150,
      prompts_per_iteration=128,
      max_length=8192, max_prompt_length=1024, segment_budget=2048,
      minibatch_size=256, microbatch_size=8,
      learning_rate=1e-6,  # spec: AdamW 1e-6..1e-5; the low end for a pretrained model
      # 32 chips (v5p-64: 8 hosts x 4 chips). Training: fp32 weights + AdamW
      # moments (~128 GB) over fsdp x tensor = 32 ways, ~4 GB per chip.
      # Sampling: weights over tensor=4 (8 GB per chip; 8 kv heads -> 2 per
      # chip), 1024 rows over the 8 fsdp groups: the bf16 KV cache of 128
      # rows x 8192 tokens, ~35 GB per chip. Each host owns 128 slots.
      mesh=dict(data=-1, fsdp=8, tensor=4))
  c.data.verifier_workers = 32  # pod hosts have many cores for the sandbox
  if arg == "smoke":
    c = prompt_rl.smoke(c)
  elif arg == "32k":
    c.rollout.update(max_length=32768, max_prompt_length=1024, segment_budget=4096, max_age=8)
    c.model.max_position_embeddings = 32768
    c.eval.max_new_tokens = 32768 - 1024
  elif arg:
    raise ValueError(f"configs/llama3_8b_pod.py: unknown variant {arg!r} (known: smoke, 32k)")
  return c
