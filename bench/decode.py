"""Decode throughput of `kimi_jax.sampling.generate`, side by side with transformers.

  python -m bench.decode --json
  python -m bench.decode --batches=16,32 --prompt_len=128 --new_tokens=256

Greedy, fixed length (no eos), fp32. For each batch size it reports
tokens/s (best of --repeats timed calls after one compiling call), the
compile time, the number of recompilations on the second call (must be 0)
and, when transformers is importable, transformers' greedy `generate` on the
SAME weights and prompts, timed alternately with ours in this process so that
machine noise hits both alike. The last line is one JSON object with --json.
"""
from __future__ import annotations

import json
import os
import tempfile
import time

from absl import app, flags

flags.DEFINE_list("batches", ["16", "32"], "Batch sizes to time.")
flags.DEFINE_integer("prompt_len", 128, "Prompt tokens per row.")
flags.DEFINE_integer("new_tokens", 256, "Generated tokens per row.")
flags.DEFINE_integer("repeats", 2, "Timed calls per batch size and library (best is kept).")
flags.DEFINE_bool("hf", True, "Also time transformers when it is installed.")
flags.DEFINE_bool("json", False, "Print one JSON object as the last line.")
FLAGS = flags.FLAGS

# ~20.6M parameters: the size the project's decode target is stated for.
MODEL = dict(vocab_size=8192, hidden_size=512, intermediate_size=896, num_layers=6,
             num_heads=8, num_kv_heads=2, max_position_embeddings=1024)
TARGETS = {16: 1.5, 32: 2.0}


def _hf_model():
  """A random transformers Llama with MODEL's shape, or None without transformers."""
  try:
    import torch
    import transformers
  except ImportError:
    return None
  torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
      vocab_size=MODEL["vocab_size"], hidden_size=MODEL["hidden_size"],
      intermediate_size=MODEL["intermediate_size"], num_hidden_layers=MODEL["num_layers"],
      num_attention_heads=MODEL["num_heads"], num_key_value_heads=MODEL["num_kv_heads"],
      max_position_embeddings=MODEL["max_position_embeddings"], tie_word_embeddings=False,
      rms_norm_eps=1e-6)
  return transformers.LlamaForCausalLM(cfg).eval().float()


def _time_hf(model, toks, n):
  import torch
  t = time.perf_counter()
  with torch.no_grad():
    out = model.generate(torch.tensor(toks), attention_mask=torch.ones_like(torch.tensor(toks)),
                         max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
  dt = time.perf_counter() - t
  assert out.shape == (len(toks), len(toks[0]) + n)
  return len(toks) * n / dt


def _time_kimi(cfg, params, prompts, n):
  from kimi_jax.sampling import generate
  t = time.perf_counter()
  out = generate(cfg, params, prompts, max_new_tokens=n, max_length=len(prompts[0]) + n)
  dt = time.perf_counter() - t
  assert all(len(o) == n for o in out), "generate returned short rows"
  return len(prompts) * n / dt


def main(argv):
  del argv
  import jax
  import numpy as np

  from kimi_jax.compile_count import CompileCounter
  from kimi_jax.models.transformer import ModelConfig, init_params

  hf_model = _hf_model() if FLAGS.hf else None
  if hf_model is not None:
    from kimi_jax.models import hf
    with tempfile.TemporaryDirectory() as d:
      hf_model.save_pretrained(d, safe_serialization=True)
      cfg, params = hf.load_pretrained(d)
  else:
    cfg = ModelConfig(**MODEL)
    params = init_params(cfg, jax.random.PRNGKey(0))
  P, N = FLAGS.prompt_len, FLAGS.new_tokens
  results = []
  for batch in map(int, FLAGS.batches):
    toks = np.random.default_rng(0).integers(3, cfg.vocab_size, size=(batch, P))
    prompts = toks.tolist()
    t = time.perf_counter()
    with CompileCounter() as first:
      _time_kimi(cfg, params, prompts, N)
    compile_s = time.perf_counter() - t
    kimi, ref = [], []
    with CompileCounter() as later:
      for _ in range(FLAGS.repeats):
        kimi.append(_time_kimi(cfg, params, prompts, N))
        if hf_model is not None:
          ref.append(_time_hf(hf_model, prompts, N))
    row = dict(batch=batch, kimi_tok_s=round(max(kimi), 1),
               first_call_s=round(compile_s, 2), compiles_first_call=first.count,
               recompiles_later_calls=later.count)
    if ref:
      ratio = max(kimi) / max(ref)
      row.update(hf_tok_s=round(max(ref), 1), ratio=round(ratio, 3),
                 target=TARGETS.get(batch), meets_target=ratio >= TARGETS.get(batch, 0))
    results.append(row)
    print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
  from kimi_jax import decode_jit
  report = dict(bench="decode", decode_compiler_options=decode_jit.compiler_options(),
                params_millions=round(cfg.num_params() / 1e6, 2), model=MODEL,
                prompt_len=P, new_tokens=N, dtype="float32", greedy=True,
                backend=jax.default_backend(), cpu_count=os.cpu_count(),
                transformers=hf_model is not None, results=results)
  if FLAGS.json:
    print(json.dumps(report))


if __name__ == "__main__":
  app.run(main)
