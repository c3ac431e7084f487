"""Train <-> sample layout switch: time and bytes moved, ~100M params, 8 fake CPU devices.

  python -m bench.reshard --json
  python -m bench.reshard --mesh=2,2,2 --repeats=5

The weights live in the training layout (FSDP over `fsdp` x tensor parallel
over `tensor`) and are switched to the sampling layout (tensor parallel only)
before rollouts and back before the update: `parallel.reshard`, one jitted
identity with out_shardings, donating its input as the trainer would. Each
direction is timed `--repeats` times after one compiling call (best and
median kept). Bytes moved are computed from the two shardings: for every
device, the bytes of its target shard it did not already hold
(`parallel.reshard_bytes`). Values are checked unchanged after the round
trips. Parameter values are a cheap fill (random init of 100M parameters
compiles for minutes on CPU and does not change what is copied).
The last line is one JSON object with --json. Target: < 1 s each direction.
"""
from __future__ import annotations

import os

# Fake devices must be requested before jax initialises its CPU backend.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402

flags.DEFINE_list("mesh", ["1", "4", "2"], "data,fsdp,tensor sizes (-1 = the rest).")
flags.DEFINE_integer("repeats", 3, "Timed switches per direction (after one compiling call).")
flags.DEFINE_bool("json", False, "Print one JSON object as the last line.")
FLAGS = flags.FLAGS

# ~100.7M parameters (Llama shape; a 16k vocabulary keeps embeddings at a quarter).
MODEL = dict(vocab_size=16384, hidden_size=768, intermediate_size=2048, num_layers=12,
             num_heads=12, num_kv_heads=4, max_position_embeddings=2048)
TARGET_S = 1.0


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np

  from kimi_jax import parallel
  from kimi_jax.models.transformer import ModelConfig

  cfg = ModelConfig(**MODEL)
  mesh = parallel.make_mesh(parallel.MeshConfig(*map(int, FLAGS.mesh)))
  train, sample = parallel.Layout.train(mesh, cfg), parallel.Layout.sample(mesh, cfg)
  shapes = parallel.param_shapes(cfg)
  fill = jax.jit(lambda: jax.tree.map(
      lambda s: (jnp.arange(np.prod(s.shape), dtype=jnp.float32).reshape(s.shape) % 97) * 1e-3,
      shapes), out_shardings=train.params())
  params = jax.block_until_ready(fill())
  # One program (many small eager reductions over fake devices can starve
  # the CPU client's threads inside their all-reduces).
  total = jax.jit(lambda t: sum(jnp.sum(x) for x in jax.tree.leaves(t)))
  checksum = float(total(params))
  bytes_to_sample = parallel.reshard_bytes(params, sample)
  per_device = lambda tree: max(  # noqa: E731
      sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
          if s.device == d) for d in mesh.devices.flat)
  train_device_bytes = per_device(params)

  # Round trips, as the trainer runs them: each direction donates its input.
  to_sample = lambda p: parallel.reshard(p, sample, donate=True)  # noqa: E731
  to_train = lambda p: parallel.reshard(p, train, donate=True)  # noqa: E731
  t = time.perf_counter()
  p_sample = jax.block_until_ready(to_sample(params))
  compile_there = time.perf_counter() - t
  sample_device_bytes = per_device(p_sample)
  bytes_to_train = parallel.reshard_bytes(p_sample, train)
  t = time.perf_counter()
  params = jax.block_until_ready(to_train(p_sample))
  compile_back = time.perf_counter() - t
  ts, tt = [], []
  for _ in range(FLAGS.repeats):
    t = time.perf_counter()
    p_sample = jax.block_until_ready(to_sample(params))
    ts.append(time.perf_counter() - t)
    t = time.perf_counter()
    params = jax.block_until_ready(to_train(p_sample))
    tt.append(time.perf_counter() - t)
  for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(train.params())):
    assert x.sharding == s, "round trip changed a sharding"
  assert float(total(params)) == checksum, "values changed"

  directions = {
      "train_to_sample": dict(best_s=round(min(ts), 4), median_s=round(statistics.median(ts), 4),
                              bytes_moved=bytes_to_sample, first_call_s=round(compile_there, 2)),
      "sample_to_train": dict(best_s=round(min(tt), 4), median_s=round(statistics.median(tt), 4),
                              bytes_moved=bytes_to_train, first_call_s=round(compile_back, 2)),
  }
  for name, row in directions.items():
    row["meets_target"] = row["median_s"] < TARGET_S
    print(name, " ".join(f"{k}={v}" for k, v in row.items()), flush=True)
  report = dict(
      bench="reshard", params_millions=round(cfg.num_params() / 1e6, 2), model=MODEL,
      mesh=dict(mesh.shape), devices=len(mesh.devices.flat), backend=jax.default_backend(),
      param_bytes=cfg.num_params() * 4, per_device_bytes=dict(train=train_device_bytes,
                                                              sample=sample_device_bytes),
      repeats=FLAGS.repeats, target_s=TARGET_S, directions=directions,
      cpu_count=os.cpu_count(), load_average=[round(x, 2) for x in os.getloadavg()])
  if FLAGS.json:
    print(json.dumps(report))


if __name__ == "__main__":
  app.run(main)
