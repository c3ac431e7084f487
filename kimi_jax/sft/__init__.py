"""Supervised fine-tuning: long-CoT warm-up (method spec §5) and SFT on response files.

  packing.py  whole examples packed into rows, response-only loss mask, batch stream
  train.py    the loss, optimizer, jitted step and `run_sft` (the step loop)
  data.py     synthetic (text and visual) traces, prompt/response JSONL files, tokenizer codec
  config.py   `SFTConfig` and the launch.sft config schema
  job.py      `run_from_config`: the job behind launch.sft (a run directory)

The library entry point is `run_sft(model_cfg, params, examples, sft_cfg)`.
"""
from kimi_jax.sft.config import (SFTConfig, default_config, sft_config_from,  # noqa: F401
                                 with_image_slots)
from kimi_jax.sft.data import (Codec, make_codec, read_responses, response_examples,  # noqa: F401
                               synthetic_examples, visual_examples, write_responses)
from kimi_jax.sft.job import evaluate_greedy, run_from_config  # noqa: F401
from kimi_jax.sft.packing import Example, PackedBatch, batches, pack  # noqa: F401
from kimi_jax.sft.train import (check_examples, lr_schedule, make_optimizer,  # noqa: F401
                                make_sft_step, run_sft, sft_loss)
from kimi_jax.tokenizers import BYTE_EOS_ID, byte_decode, byte_encode  # noqa: F401
