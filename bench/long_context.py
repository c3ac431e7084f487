"""Memory of the RL train step, the reference pass and prefill at 4k-128k tokens.

  python -m bench.long_context --json
  python -m bench.long_context --lengths=4096,8192 --today_max=8192 --run_lengths=

Part 1 (compile only, `kimi_jax.compile_memory`): for each length T, XLA's
`memory_analysis()` of the compiled programs for ONE sample of T tokens of a
Qwen2.5-1.5B-shaped model (vocab 151,936, width 1536, 12 query / 2 kv heads
of 128, MLP 8960, tied embeddings, qkv bias) cut to `--layers` layers, fp32
params, bf16 compute:
  train_step    `rl.update.make_train_step` (k1.5 loss, AdamW, microbatch 1)
  ref_logprobs  `rl.update.make_ref_logprobs` (forward only)
  prefill       `sampling.sampler.prefill` into a cache of T slots
with the long-context settings (`LONG`: blockwise attention, full remat,
chunked logits, chunked prefill), and with today's settings (`TODAY`: the
XLA reference attention with a dense mask, no remat, whole-row logits,
one-shot prefill) up to `--today_max`. Nothing is allocated, so the table
compiles on a small machine.

Targets (issue 16): train-step temp grows at most linearly
(temp(128k) / temp(8k) <= 17), and at 32k it is >= 20x below today's.

Part 2 (`--run_lengths`, measured): one train step of bench/train_step.py's
20.6M model at each length, `"blockwise"` vs `"xla"` attention (everything
else as `LONG`), each in its own process: tokens/s of the second step and the
process's peak RSS.

The last line is one JSON object with --json.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

from absl import app, flags

flags.DEFINE_list("lengths", ["4096", "8192", "16384", "32768", "65536", "131072"],
                  "Sample lengths T for the compile-only table.")
flags.DEFINE_integer("today_max", 32768, "Largest T compiled with today's settings.")
flags.DEFINE_integer("layers", 2, "Layers of the Qwen2.5-1.5B shape.")
flags.DEFINE_list("run_lengths", ["8192", "16384"], "T of the measured CPU train steps "
                  "(empty: skip part 2).")
flags.DEFINE_integer("run_timeout_s", 1800, "Wall-clock limit of one measured step's process.")
flags.DEFINE_bool("json", False, "Print one JSON object as the last line.")
flags.DEFINE_string("_child", "", "Internal: run one measured step 'attention,T' and print JSON.")
FLAGS = flags.FLAGS

QWEN_1_5B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_heads=12,
                 num_kv_heads=2, head_dim=128, qkv_bias=True, tie_embeddings=True,
                 rope_theta=1e6, family="qwen2", max_position_embeddings=131072,
                 param_dtype="float32", dtype="bfloat16")
LONG = dict(attention="blockwise", remat="full", scan_layers=True, logits_chunk=1024,
            prefill_chunk=2048)
TODAY = dict(attention="xla", remat="none", scan_layers=False, logits_chunk=0,
             prefill_chunk=0)
SMALL = dict(vocab_size=8192, hidden_size=512, intermediate_size=896, num_layers=6,
             num_heads=8, num_kv_heads=2, max_position_embeddings=16384)
RATIO_TARGET = 17.0
TODAY_OVER_LONG_AT_32K = 20.0
GiB = 1 << 30


def compile_table(lengths, today_max, layers):
  from kimi_jax import compile_memory as cm
  from kimi_jax.models.transformer import ModelConfig
  rows = []
  for name, settings in (("long", LONG), ("today", TODAY)):
    cfg = ModelConfig(num_layers=layers, **QWEN_1_5B, **settings)
    for T in lengths:
      if name == "today" and T > today_max:
        continue
      row = {"settings": name, "T": T}
      for part, fn in (("train_step", cm.train_step_memory),
                       ("ref_logprobs", cm.ref_logprobs_memory),
                       ("prefill", cm.prefill_memory)):
        m = fn(cfg, T)
        row[part] = m.as_dict()
      print(f"{name:5s} T={T:6d}  temp GiB: train_step {row['train_step']['temp'] / GiB:7.2f}"
            f"  ref_logprobs {row['ref_logprobs']['temp'] / GiB:7.2f}"
            f"  prefill {row['prefill']['temp'] / GiB:7.2f}"
            f"  (compile {row['train_step']['compile_s']:.0f} s)", flush=True)
      rows.append(row)
  return rows


def _temp(rows, settings, T, part="train_step"):
  for r in rows:
    if r["settings"] == settings and r["T"] == T:
      return r[part]["temp"]
  return None


def run_one(attention: str, T: int) -> dict:
  """One compiling + one timed train step of SMALL at T tokens (this process)."""
  import jax
  import numpy as np

  from bench.step_inputs import step_and_inputs
  from kimi_jax.models.transformer import ModelConfig

  cfg = ModelConfig(**SMALL, **dict(LONG, attention=attention))
  step, state, batch = step_and_inputs(cfg, 1, T, prompt_tokens=256, rewards=[1.0])
  t = time.perf_counter()
  state, _ = jax.block_until_ready(step(state, batch))
  first_s = time.perf_counter() - t
  t = time.perf_counter()
  state, metrics = jax.block_until_ready(step(state, batch))
  step_s = time.perf_counter() - t
  return dict(attention=attention, T=T, first_call_s=round(first_s, 2), step_s=round(step_s, 3),
              tokens_per_s=round(T / step_s, 1),
              loss_finite=bool(np.isfinite(float(metrics["train/loss"]))),
              peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20),
                                 3))


def _child(attention: str, T: int) -> dict:
  """`run_one` in a fresh process (its own peak RSS), or the error it ended with."""
  try:
    proc = subprocess.run([sys.executable, "-m", "bench.long_context",
                           f"--_child={attention},{T}"], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          timeout=FLAGS.run_timeout_s)
  except subprocess.TimeoutExpired:
    return dict(attention=attention, T=T, error=f"over --run_timeout_s={FLAGS.run_timeout_s}")
  if proc.returncode:
    return dict(attention=attention, T=T, error=proc.stderr.strip().splitlines()[-1:])
  return json.loads(proc.stdout.strip().splitlines()[-1])


def run_table(lengths):
  rows = []
  for T in lengths:
    for attention in ("blockwise", "xla"):
      row = _child(attention, T)
      print(f"run   T={T:6d} {attention:9s} {row}", flush=True)
      rows.append(row)
  return rows


def main(argv):
  del argv
  if FLAGS._child:  # pylint: disable=protected-access
    attention, T = FLAGS._child.split(",")  # pylint: disable=protected-access
    print(json.dumps(run_one(attention, int(T))))
    return
  import jax
  lengths = [int(x) for x in FLAGS.lengths]
  t = time.perf_counter()
  table = compile_table(lengths, FLAGS.today_max, FLAGS.layers)
  report = dict(bench="long_context", model=dict(QWEN_1_5B, num_layers=FLAGS.layers),
                long_settings=LONG, today_settings=TODAY, backend=jax.default_backend(),
                compile_table=table)
  hi = max(lengths)
  base = 8192 if 8192 in lengths else min(lengths)
  if _temp(table, "long", base) and _temp(table, "long", hi):
    ratio = round(_temp(table, "long", hi) / _temp(table, "long", base), 2)
    # The 17 for 8k -> 128k (16x), i.e. 1/16 above linear, at any pair.
    target = hi / base * RATIO_TARGET / 16
    report["train_temp_ratio"] = dict(lengths=[base, hi], ratio=ratio, linear=hi / base,
                                      target=target, meets_target=ratio <= target)
  if _temp(table, "today", 32768) and _temp(table, "long", 32768):
    x = _temp(table, "today", 32768) / _temp(table, "long", 32768)
    report["today_over_long_at_32k"] = dict(ratio=round(x, 1), target=TODAY_OVER_LONG_AT_32K,
                                            meets_target=x >= TODAY_OVER_LONG_AT_32K)
  report["compile_table_s"] = round(time.perf_counter() - t, 1)
  run_lengths = [int(x) for x in FLAGS.run_lengths if x]
  if run_lengths:
    report["cpu_runs"] = run_table(run_lengths)
  report.update(cpu_count=os.cpu_count(), load_average=[round(x, 2) for x in os.getloadavg()])
  for key in ("train_temp_ratio", "today_over_long_at_32k"):
    if key in report:
      print(f"{key}: {report[key]}", flush=True)
  if FLAGS.json:
    print(json.dumps(report))


if __name__ == "__main__":
  app.run(main)
