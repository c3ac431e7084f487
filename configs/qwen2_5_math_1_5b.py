r"""k1.5 RL of Qwen2.5-Math-1.5B on curated math/code prompts (one TPU host or a small pod).

Local directories (nothing is downloaded by the run):
  ~/models/Qwen2.5-Math-1.5B  a HF checkpoint: config.json, *.safetensors,
      tokenizer.json (+ tokenizer_config.json, which names the EOS), e.g.
      `huggingface-cli download Qwen/Qwen2.5-Math-1.5B --local-dir ~/models/Qwen2.5-Math-1.5B`.
      Point it at your long-CoT warmed-up checkpoint to follow the report.
  ~/data/k15/math_train.jsonl, ~/data/k15/math_heldout.jsonl
      prompt sets in the data/prompts.py schema, with a difficulty per
      prompt for the curriculum (launch/curate.py writes both).

  python -m launch.train --config=configs/qwen2_5_math_1_5b.py --workdir=$HOME/runs/qwen_math \
      --config.model.hf_path=$HOME/models/Qwen2.5-Math-1.5B \
      --config.data.train_file=$HOME/data/k15/math_train.jsonl \
      --config.data.heldout_file=$HOME/data/k15/math_heldout.jsonl

The tokenizer follows --config.model.hf_path (override config.data.tokenizer
to use another tokenizer.json). Variants: `:smoke` is the same recipe at toy
sizes (tests/test_recipes.py runs it on a tiny random checkpoint).

Sizes: 64 prompts x 8 samples = 512 rollout rows per iteration, 16,896
tokens (512 prompt + 16,384 response: the long chains of thought the report
trains on; 2048 new tokens per iteration with partial rollouts, so a
response spans up to 8 iterations, `max_age`), 4 optimizer steps of 128
samples per iteration, finished samples packed up to 8 a row, microbatches
of 4 rows: one 16.9k-token row per chip at a time on a data x 4-way FSDP
mesh (one TPU host and up). Qwen2.5-Math-1.5B: 28 layers, width 1536,
12 heads / 2 kv heads, tied embeddings, vocab 151936, no BOS token, trained
at 4096 positions: `max_position_embeddings` is raised to the run's length
(RoPE extrapolates; warm up on long chains of thought first, as the report
does, and point hf_path at that checkpoint).

Memory per chip (v5p: 95 GiB HBM), `MEMORY_GIB`: the train step compiled
(not run) for this recipe's model, row length and mesh with abstract shapes,
SPMD over 4 devices (fsdp=4), one 16.9k-token row per device, long-context
settings on (configs/prompt_rl.py). XLA's per-device peak (inputs + outputs
not aliased + temporaries): 13.0 GiB, of which 4.3 GiB are the shards of the
fp32 weights and AdamW moments. tests/test_recipe_memory.py recompiles it
and checks the number. Without those settings the row's float32 logits
alone are 9.6 GiB and its attention scores quadratic.
"""
import ml_collections

from configs import prompt_rl

MAX_LENGTH = 512 + 16384
# Checked by tests/test_recipe_memory.py (compiled on CPU, XLA memory_analysis).
MEMORY_GIB = dict(mesh=(1, 4, 1), rows_per_device=1, peak_per_device=13.0, hbm_per_chip=95.0)



def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = prompt_rl.base_config(
      hf_path="~/models/Qwen2.5-Math-1.5B",
      train_file="~/data/k15/math_train.jsonl",
      heldout_file="~/data/k15/math_heldout.jsonl",
      add_bos=False,  # Qwen2 tokenizers have no BOS
      total_iterations=150,
      prompts_per_iteration=64,
      max_length=MAX_LENGTH, max_prompt_length=512, segment_budget=2048,
      minibatch_size=128, microbatch_size=4,
      learning_rate=1e-6,  # spec: AdamW 1e-6..1e-5; the low end for a pretrained model
      # FSDP over the 4 chips of one TPU host (v4-8 / v5p-8): fp32 weights +
      # AdamW moments, ~18 GB, become ~4.5 GB per chip; sampling holds the
      # whole fp32 weights (6 GB) per chip. More hosts add data parallelism
      # (data=-1; data x fsdp must divide the microbatch, so raise it with them).
      mesh=dict(data=-1, fsdp=4, tensor=1))
  c.model.max_position_embeddings = MAX_LENGTH
  c.rollout.max_age = 8
  if arg == "smoke":
    c = prompt_rl.smoke(c)
  elif arg:
    raise ValueError(f"configs/qwen2_5_math_1_5b.py: unknown variant {arg!r} (known: smoke)")
  return c
