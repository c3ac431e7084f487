"""Compile time of a deep model's RL train step, layers unrolled vs one `nn.scan`.

  python -m bench.compile_time --json
  python -m bench.compile_time --num_layers=64 --repeats=2

`make_train_step` (k1.5 surrogate, AdamW, one microbatch of one row of
`--seq_len` tokens) of a `--num_layers`-deep, narrow model is lowered and
compiled, never run, for abstract params, optimizer state and batch
(`jax.ShapeDtypeStruct`s: nothing allocated), once with `scan_layers=False`
(the blocks `layers_0..L-1` traced and compiled one by one) and once with
`scan_layers=True` (one block inside a scan over params stacked `[L, ...]`).
Both are timed `--repeats` times each, alternating, after a 1-layer warm-up
compile that takes JAX's one-off start-up costs; the best is reported, with
the same step of a 1-layer model (`one_layer`: what the scan's depth-free
cost is made of). Lower = trace + StableHLO; compile = XLA. The HLO size
(instructions of the optimised module) shows where the time goes. The last
line is one JSON object with --json.
"""
from __future__ import annotations

import json
import os
import time

from absl import app, flags

flags.DEFINE_integer("num_layers", 32, "Decoder layers.")
flags.DEFINE_integer("seq_len", 512, "Tokens of the one row.")
flags.DEFINE_integer("repeats", 1, "Lower + compile runs per setting (best kept).")
flags.DEFINE_string("remat", "none", "ModelConfig.remat for both settings.")
flags.DEFINE_bool("json", False, "Print one JSON object as the last line.")
FLAGS = flags.FLAGS

# Narrow and deep: compile time is per layer, the width barely matters.
MODEL = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_heads=4,
             num_kv_heads=2, max_position_embeddings=2048)


def lower_and_compile(cfg, seq_len: int) -> dict:
  """Seconds to lower and to compile `make_train_step(cfg, ...)` for
  abstract arguments, and the optimised HLO's instruction count."""
  import jax
  import jax.numpy as jnp

  from kimi_jax.compile_memory import abstract_batch, abstract_params
  from kimi_jax.rl import losses
  from kimi_jax.rl.update import TrainState, UpdateConfig, make_optimizer, make_train_step

  ucfg = UpdateConfig(microbatch_size=1)
  optimizer = make_optimizer(ucfg)
  step = make_train_step(cfg, losses.LossConfig(), ucfg, optimizer)
  params = abstract_params(cfg)
  scalar = jax.ShapeDtypeStruct((), jnp.int32)
  state = TrainState(params=params, opt_state=jax.eval_shape(optimizer.init, params),
                     step=scalar, skipped=scalar)
  batch = abstract_batch(1, seq_len)
  t = time.perf_counter()
  lowered = step.lower(state, batch)
  lower_s = time.perf_counter() - t
  t = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t
  text = compiled.as_text() or ""
  instructions = sum(1 for line in text.splitlines() if " = " in line)
  return dict(lower_s=lower_s, compile_s=compile_s, total_s=lower_s + compile_s,
              hlo_instructions=instructions)


def main(argv):
  del argv
  import jax

  from kimi_jax.models.transformer import ModelConfig

  base = ModelConfig(num_layers=FLAGS.num_layers, remat=FLAGS.remat, **MODEL)
  lower_and_compile(base.replace(num_layers=1), FLAGS.seq_len)  # warm-up
  settings = (("unrolled", base), ("scan", base.replace(scan_layers=True)),
              ("one_layer", base.replace(num_layers=1)))
  runs = {name: [] for name, _ in settings}
  for _ in range(FLAGS.repeats):
    for name, cfg in settings:
      runs[name].append(lower_and_compile(cfg, FLAGS.seq_len))
  best = {name: min(r, key=lambda x: x["total_s"]) for name, r in runs.items()}
  rounded = {name: {k: round(v, 2) if isinstance(v, float) else v for k, v in b.items()}
             for name, b in best.items()}
  report = dict(
      bench="compile_time", model=dict(MODEL, num_layers=FLAGS.num_layers, remat=FLAGS.remat),
      params_millions=round(base.num_params() / 1e6, 2), seq_len=FLAGS.seq_len, rows=1,
      repeats=FLAGS.repeats, **rounded,
      speedup=round(best["unrolled"]["total_s"] / best["scan"]["total_s"], 2),
      backend=jax.default_backend(), jax_version=jax.__version__, cpu_count=os.cpu_count(),
      load_average=[round(x, 2) for x in os.getloadavg()])
  for name, r in rounded.items():
    print(f"{name:9s} lower {r['lower_s']:6.2f} s  compile {r['compile_s']:6.2f} s  "
          f"total {r['total_s']:6.2f} s  hlo {r['hlo_instructions']}", flush=True)
  print(f"speedup {report['speedup']}x", flush=True)
  if FLAGS.json:
    print(json.dumps(report))


if __name__ == "__main__":
  app.run(main)
