"""Two local CPU processes under jax.distributed (gloo) run the RL trainer end to end.

Each process sees 2 CPU devices (its own XLA_FLAGS, not the 8 fake devices of
conftest); the mesh data=2 x tensor=2 spans both, so every process owns 4 of
the 8 rollout slots and half of the prompts. The checkpoint they write is
restored here in ONE process and compared with the params the 2-process run
held when it saved (gathered to process 0 by a wrapper around
`Checkpointer.save`): exactly equal. Resuming that checkpoint with another
process count is a clear error.
"""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import arith_tiny
from kimi_jax import distributed, parallel
from kimi_jax.checkpointing import Checkpointer
from kimi_jax.models.transformer import init_params
from kimi_jax.rl import multihost, settings, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config():
  """arith_tiny:smoke at toy sizes: 2 iterations, a checkpoint at 0 and 2."""
  c = arith_tiny.get_config("smoke")
  c.total_iterations, c.eval_every, c.checkpoint_every = 2, 2, 2
  c.model.update(hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
                 num_kv_heads=2, max_position_embeddings=128)
  c.data.n_train, c.data.n_heldout = 64, 8
  c.sft.update(steps=2, n_examples=32, batch_size=4, seq_len=64, warmup_steps=1)
  # max_age=1: groups started in iteration 1 finish (and train) in iteration 2.
  c.rollout.update(num_slots=8, samples_per_prompt=2, max_length=64, max_prompt_length=32,
                   segment_budget=16, max_age=1)
  c.rl.update(minibatch_size=8, length_penalty_start=0)
  c.optim.update(microbatch_size=4, learning_rate=1e-3)
  c.eval.update(samples=1, greedy=False, max_new_tokens=16)
  c.mesh.update(data=2, fsdp=1, tensor=2)
  return c


# Runs in each of the two processes: `python -c WORKER ADDRESS PROCESS_ID WORKDIR`.
WORKER = r"""
import json, sys
import numpy as np
from kimi_jax import distributed
address, pid, workdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
distributed.initialize(address, 2, pid)
import jax
from kimi_jax.rl import trainer
from tests.test_multihost import tiny_config

saved = {}
save = trainer.Checkpointer.save
def recording_save(self, step, *, params, **kw):
  flat = jax.tree_util.tree_flatten_with_path(distributed.fetch(params))[0]
  saved[str(step)] = {jax.tree_util.keystr(k): v for k, v in flat}
  return save(self, step, params=params, **kw)
trainer.Checkpointer.save = recording_save

rows = trainer.run(tiny_config(), workdir)
assert jax.process_count() == 2 and jax.device_count() == 4
if distributed.is_primary():
  np.savez(f"{workdir}/reported_params.npz", **saved["2"])
  with open(f"{workdir}/rows.json", "w") as f:
    json.dump(rows, f)
else:
  assert rows == [], rows
"""


def test_combine_rows_by_hand():
  a = {"rollout/slots_used": 4.0, "rollout/groups_completed": 3, "rollout/reward_mean": 1.0,
       "rollout/decode_steps": 16.0, "rollout/useful_token_fraction": 0.5,
       "rollout/finish_eos": 2.0, "sampler/eligible": 10, "sampler/success_rate_mean": 0.2,
       "rollout/verifier_errors/timeout": 1.0, "time/rollout_s": 1.0}
  b = {"rollout/slots_used": 4.0, "rollout/groups_completed": 1, "rollout/reward_mean": 0.0,
       "rollout/decode_steps": 16.0, "rollout/useful_token_fraction": 0.25,
       "rollout/finish_eos": 1.0, "sampler/eligible": 30, "sampler/success_rate_mean": 0.6,
       "time/rollout_s": 3.0}
  c = {k: v for k, v in b.items() if k not in ("rollout/reward_mean",)}  # no group finished
  c["rollout/groups_completed"] = 0
  out = multihost.combine_rows([a, b, c])
  assert out == {
      "rollout/slots_used": 12.0, "rollout/groups_completed": 4,
      "rollout/reward_mean": 0.75,  # 3 groups at 1.0, 1 at 0.0; c has none
      "rollout/decode_steps": 16.0,  # one loop for all processes
      "rollout/useful_token_fraction": pytest.approx(1 / 3),  # equal slots: plain mean
      "rollout/finish_eos": 4.0, "sampler/eligible": 70,
      "sampler/success_rate_mean": pytest.approx((10 * 0.2 + 60 * 0.6) / 70),
      "rollout/verifier_errors/timeout": 1.0, "time/rollout_s": 3.0}
  assert multihost.combine_rows([a]) == a


def test_distributed_initialize_is_a_noop_alone_and_names_what_is_missing(monkeypatch):
  for name in (distributed.ENV_ADDRESS, distributed.ENV_NUM, distributed.ENV_ID):
    monkeypatch.delenv(name, raising=False)
  assert distributed.initialize() is False
  with pytest.raises(ValueError, match=r"num_processes, process_id not set \(flags "
                     r"--num_processes, --process_id or \$JAX_NUM_PROCESSES, \$JAX_PROCESS_ID\)"):
    distributed.initialize("localhost:1234")
  monkeypatch.setenv(distributed.ENV_NUM, "2")
  monkeypatch.setenv(distributed.ENV_ID, "5")
  with pytest.raises(ValueError, match=r"process_id 5 not in \[0, num_processes=2\)"):
    distributed.initialize("localhost:1234")


def test_row_helpers_with_one_process():
  mesh = parallel.make_mesh(parallel.MeshConfig(2, 2, 2))
  sharding = parallel.Layout.train(mesh, tiny_settings().model).batch()
  assert distributed.owned_rows(sharding, 16, "rows") == slice(0, 16)
  rows = {"a": np.arange(32).reshape(16, 2), "b": np.ones(16, np.float32)}
  placed = distributed.to_global(rows, sharding)
  assert placed["a"].sharding == sharding and placed["b"].sharding == sharding
  back = distributed.to_local(placed)
  np.testing.assert_array_equal(back["a"], rows["a"])
  np.testing.assert_array_equal(distributed.fetch(placed)["b"], rows["b"])
  assert distributed.allgather_json({"x": [1]}) == [{"x": [1]}]
  assert distributed.max_over_processes(3) == 3


def tiny_settings():
  return settings.from_config(tiny_config())


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_and_one_process_restores(tmp_path):
  workdir = tmp_path / "run"
  address = f"localhost:{_free_port()}"
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  # Each process: 2 CPU devices of its own (not the 8 fake devices of this process).
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
             TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
  procs = [subprocess.Popen([sys.executable, "-c", WORKER, address, str(i), str(workdir)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=900)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i}:\n{out[-4000:]}"

  # Process 0 alone wrote the metrics: one row per iteration, training happened.
  with open(workdir / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert [r["iteration"] for r in rows] == [0, 1, 2]
  assert rows[2]["train/steps"] >= 1 and np.isfinite(rows[2]["train/loss"])
  assert rows[2]["rollout/slots_used"] + rows[2]["rollout/slots_empty"] == 8  # both processes
  assert "eval/accuracy" in rows[2]

  # One process restores the checkpoint the two wrote.
  s = tiny_settings()
  tr_opt = trainer.make_optimizer(s.update)
  params_like = jax.eval_shape(lambda: init_params(s.model, jax.random.PRNGKey(0)))
  with Checkpointer(workdir / "checkpoints") as ckpt:
    assert ckpt.all_steps() == [0, 2]
    restored = ckpt.restore(params_like=params_like,
                            opt_state_like=jax.eval_shape(tr_opt.init, params_like))
  assert restored.step == 2 and restored.process_state is None  # written by 2, read by 1
  reported = np.load(workdir / "reported_params.npz")
  flat = jax.tree_util.tree_flatten_with_path(restored.params)[0]
  assert sorted(reported.files) == sorted(jax.tree_util.keystr(k) for k, _ in flat)
  for path, value in flat:
    np.testing.assert_array_equal(np.asarray(value), reported[jax.tree_util.keystr(path)])
  assert int(restored.host_state["optimizer_steps"]) == rows[2]["train/steps"]

  # Each process's host state: its own 4 slots and a disjoint half of the prompts.
  states = restored.host_state["processes"]
  assert len(states) == 2
  ids = [set(p["prompt_sampler"]["prompt_ids"]) for p in states]
  assert not ids[0] & ids[1] and len(ids[0] | ids[1]) == len(trainer.tasks_lib.make_task(s).train)
  assert [p["scheduler"]["config"]["num_slots"] for p in states] == [4, 4]

  # Resuming with one process is refused, naming both counts.
  config = tiny_config()
  config.total_iterations = 3
  with pytest.raises(settings.ConfigError, match=r"written by 2 process\(es\) and this run has 1"):
    trainer.run(config, str(workdir))
