r"""k1.5 RL of a LLaVA-style Qwen2 (SigLIP tower + projector + Qwen2 LM) on image + text prompts.

Local directories (nothing is downloaded by the run):
  ~/models/llava-qwen2-0.5b  a HF LlavaForConditionalGeneration directory with
      a SigLIP tower and a Qwen2 LM: config.json, *.safetensors, tokenizer.json
      (+ tokenizer_config.json naming the EOS), preprocessor_config.json. The
      tensors of llava-onevision-qwen2-0.5b-ov-hf load (as its base view,
      without anyres tiles: models/hf_llava.py); point it at your long-CoT
      warmed-up checkpoint to follow the report.
  ~/data/k15/visual_train.jsonl, ~/data/k15/visual_heldout.jsonl
      prompt sets in the data/prompts.py schema with `images` (paths relative
      to the file, or data URIs) and `<image>` markers; data.visual.to_jsonl
      writes the synthetic tasks in it.

  python -m launch.train --config=configs/llava_qwen2_images.py --workdir=$HOME/runs/llava \
      --config.model.hf_path=$HOME/models/llava-qwen2-0.5b

The tokenizer and the image processor follow --config.model.hf_path. Each
image becomes the tower's `image_seq_length` placeholder tokens (729 for a
384 px / 14 px SigLIP); pixels are read and preprocessed per prompt
(rl/prompt_images.py). Variant `:smoke` is the same recipe at toy sizes
(tests/test_prompt_images.py runs it on a tiny random LLaVA directory).
"""
import ml_collections

from configs import prompt_rl

MAX_LENGTH = 1024 + 4096


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = prompt_rl.base_config(
      hf_path="~/models/llava-qwen2-0.5b",
      train_file="~/data/k15/visual_train.jsonl",
      heldout_file="~/data/k15/visual_heldout.jsonl",
      add_bos=False,  # Qwen2 tokenizers have no BOS
      total_iterations=150,
      prompts_per_iteration=64,
      # One image (729 placeholders) + the question fit 1024 prompt tokens.
      max_length=MAX_LENGTH, max_prompt_length=1024, segment_budget=2048,
      minibatch_size=128, microbatch_size=4,
      learning_rate=1e-6,
      mesh=dict(data=-1, fsdp=4, tensor=1))
  c.model.max_position_embeddings = MAX_LENGTH
  c.data.image_processor = ""  # the checkpoint's preprocessor_config.json
  if arg == "smoke":
    c = prompt_rl.smoke(c)
  elif arg:
    raise ValueError(f"configs/llava_qwen2_images.py: unknown variant {arg!r} (known: smoke)")
  return c
