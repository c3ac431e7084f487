"""RL train step throughput and model FLOP utilisation against a measured matmul peak.

  python -m bench.train_step --json
  python -m bench.train_step --batch=8 --seq_len=256 --steps=3

One jitted `make_train_step` (k1.5 surrogate, AdamW, one microbatch of
`--batch` x `--seq_len` tokens) on ONE device, fp32, ~20.6M parameters.
Reported: tokens/s (median of `--steps` timed steps after one compiling
step) and model FLOP utilisation

  mfu = achieved model FLOP/s / peak FLOP/s, with model FLOPs per step
      = 6 * N * tokens                      (`flops_6n`: dense matmuls, fwd + bwd)
      + 12 * layers * T * heads * head_dim * tokens   (`flops_attention`: q.k and p.v,
        fwd + bwd, the full T x T square the model computes under its causal mask)

where N counts the weights that take part in matmuls (every parameter except
the input embedding table, which is a gather). `mfu` includes attention;
`mfu_6n` leaves it out. The peak is MEASURED in the same process: the best
FLOP/s of a jitted fp32 `jnp.dot` over a few square sizes, timed before and
after the train steps (the larger is kept, so machine load lowers mfu rather
than inflating it). The last line is one JSON object with --json.
Target: mfu >= 0.5.
"""
from __future__ import annotations

import json
import os
import statistics
import time

from absl import app, flags

flags.DEFINE_integer("batch", 8, "Samples per step (one microbatch).")
flags.DEFINE_integer("seq_len", 256, "Tokens per sample.")
flags.DEFINE_integer("steps", 3, "Timed steps after the compiling one.")
flags.DEFINE_list("peak_sizes", ["1024", "2048"], "Square fp32 matmul sizes for the peak.")
flags.DEFINE_bool("json", False, "Print one JSON object as the last line.")
FLAGS = flags.FLAGS

# ~20.6M parameters: the decode benchmark's model.
MODEL = dict(vocab_size=8192, hidden_size=512, intermediate_size=896, num_layers=6,
             num_heads=8, num_kv_heads=2, max_position_embeddings=1024)
TARGET_MFU = 0.5


def matmul_peak(sizes, repeats: int = 5) -> float:
  """Best FLOP/s of a jitted fp32 n x n @ n x n product over `sizes`."""
  import jax
  import jax.numpy as jnp
  best = 0.0
  for n in sizes:
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    for _ in range(repeats):
      t = time.perf_counter()
      dot(a, b).block_until_ready()
      best = max(best, 2 * n ** 3 / (time.perf_counter() - t))
  return best


def step_flops(cfg, batch: int, seq_len: int) -> tuple[int, int]:
  """(6 N tokens, attention flops) of one forward + backward step."""
  tokens = batch * seq_len
  n_matmul = cfg.num_params() - cfg.vocab_size * cfg.hidden_size  # input embedding is a gather
  attention = 12 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_size * tokens
  return 6 * n_matmul * tokens, attention


def main(argv):
  del argv
  import jax
  import numpy as np

  from bench.step_inputs import step_and_inputs
  from kimi_jax.models.transformer import ModelConfig

  cfg = ModelConfig(**MODEL)
  B, T = FLAGS.batch, FLAGS.seq_len
  sizes = [int(s) for s in FLAGS.peak_sizes]
  peak_before = matmul_peak(sizes)

  step, state, batch = step_and_inputs(cfg, B, T, prompt_tokens=T // 4)

  t = time.perf_counter()
  state, metrics = jax.block_until_ready(step(state, batch))
  first_s = time.perf_counter() - t
  times = []
  for _ in range(FLAGS.steps):
    t = time.perf_counter()
    state, metrics = jax.block_until_ready(step(state, batch))
    times.append(time.perf_counter() - t)
  assert np.isfinite(float(metrics["train/loss"])), "non-finite loss"
  peak_after = matmul_peak(sizes)
  peak = max(peak_before, peak_after)

  step_s = statistics.median(times)
  flops_6n, flops_attn = step_flops(cfg, B, T)
  report = dict(
      bench="train_step", params_millions=round(cfg.num_params() / 1e6, 2), model=MODEL,
      batch=B, seq_len=T, tokens_per_step=B * T, dtype="float32", devices=1,
      backend=jax.default_backend(), first_call_s=round(first_s, 2),
      step_s_median=round(step_s, 4), step_s_best=round(min(times), 4),
      tokens_per_s=round(B * T / step_s, 1),
      flops_6n=flops_6n, flops_attention=flops_attn,
      peak_flops_measured=round(peak), peak_gflops_before_after=[
          round(peak_before / 1e9, 1), round(peak_after / 1e9, 1)],
      achieved_gflops=round((flops_6n + flops_attn) / step_s / 1e9, 1),
      mfu=round((flops_6n + flops_attn) / step_s / peak, 3),
      mfu_6n=round(flops_6n / step_s / peak, 3), target_mfu=TARGET_MFU,
      cpu_count=os.cpu_count(), load_average=[round(x, 2) for x in os.getloadavg()])
  report["meets_target"] = report["mfu"] >= TARGET_MFU
  print(" ".join(f"{k}={report[k]}" for k in ("tokens_per_s", "mfu", "mfu_6n",
                                              "achieved_gflops", "peak_flops_measured")),
        flush=True)
  if FLAGS.json:
    print(json.dumps(report))


if __name__ == "__main__":
  app.run(main)
