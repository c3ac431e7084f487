"""Main job tests: config errors, a smoke run, and exact resume after SIGKILL."""
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import arith_tiny
from kimi_jax import faults
from kimi_jax.rl import settings, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_settings_from_default_config():
  s = settings.from_config(arith_tiny.get_config())
  assert s.loss.algorithm == "k15" and s.prompts.mode == "prioritized"
  assert s.scheduler.partial and s.model.vocab_size == 264
  assert s.decode_phases == 1
  s = settings.from_config(arith_tiny.get_config("smoke"))
  assert s.total_iterations == 4


@pytest.mark.parametrize("path,value,msg", [
    ("rl.loss", "reinforce", r"config.rl.loss must be one of .*'reinforce'"),
    ("rl.prompt_sampling", "random", "config.rl.prompt_sampling must be one of"),
    ("rollout.num_slots", 0, "config.rollout.num_slots must be an int >= 1"),
    ("optim.microbatch_size", 40, "multiple of config.optim.microbatch_size"),
    ("model.num_kv_heads", 4, r"config.model.num_heads \(6\) must be a multiple of num_kv_heads"),
    ("eval_every", 0, "eval_every"),
    ("rollout.decode_phases", 0, "config.rollout.decode_phases must be an int >= 1"),
    ("sft.recheck_rate", 1.5, r"config.sft.recheck_rate must be in \[0, 1\]"),
])
def test_bad_config_values_name_the_key(path, value, msg):
  config = arith_tiny.get_config()
  node, key = config, path.split(".")
  for k in key[:-1]:
    node = node[k]
  node[key[-1]] = value
  with pytest.raises(settings.ConfigError, match=msg):
    settings.from_config(config)


def test_unknown_top_level_key_is_reported():
  config = arith_tiny.get_config()
  config.eval_evry = 5
  config.meshh = {"data": 2}
  with pytest.raises(settings.ConfigError,
                     match=r"config.eval_evry: unknown key \(did you mean 'eval_every'\?\)"):
    settings.from_config(config)


def test_mesh_config_defaults_to_one_device_and_names_bad_keys():
  config = arith_tiny.get_config("smoke")
  assert settings.from_config(config).mesh.sizes == (1, 1, 1)
  del config["mesh"]
  assert settings.from_config(config).mesh.sizes == (1, 1, 1)
  config = arith_tiny.get_config("smoke")
  config.mesh.tensor = 0
  with pytest.raises(settings.ConfigError, match=r"config.mesh.tensor must be a positive int or -1"):
    settings.from_config(config)
  config.mesh.update(tensor=1, fsdp=3)  # 3 devices of 8: fine for the mesh, not for 16 slots
  with pytest.raises(settings.ConfigError, match=r"config.rollout.num_slots of 16 rows does "
                     r"not divide over the 3 data-parallel devices"):
    trainer.Trainer(settings.from_config(config), "/tmp")
  config.mesh.update(data=3, fsdp=2, tensor=2)
  with pytest.raises(settings.ConfigError, match=r"config.mesh: mesh data=3 x fsdp=2 x tensor=2 "
                     r"has 12 devices, but there are 8 devices"):
    trainer.Trainer(settings.from_config(config), "/tmp")


def test_unknown_key_is_reported():
  config = arith_tiny.get_config()
  config.rollout.temprature = 0.5
  with pytest.raises(settings.ConfigError, match=r"config.rollout.temprature: unknown key \(did you mean 'temperature'\?\)"):
    settings.from_config(config)


def test_missing_workdir_parent(tmp_path):
  with pytest.raises(FileNotFoundError, match="parent directory .*does not exist"):
    trainer.prepare_workdir(str(tmp_path / "no" / "such" / "run"))


def test_byte_codec_round_trip_and_eos():
  ids = trainer.encode("Q:12+7=")
  assert trainer.decode(ids + [trainer.EOS_ID, 50]) == "Q:12+7="
  assert trainer.decode([263, 260] + ids) == "Q:12+7="  # ids past the bytes are ignored


def _launch(workdir, *extra, fault=None):
  cmd = [sys.executable, "-m", "launch.train", "--config=configs/arith_tiny.py:smoke",
         f"--workdir={workdir}", *extra]
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  env.pop(faults.ENV, None)
  if fault:
    env[faults.ENV] = fault
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def _comparable(row):
  return {k: v for k, v in row.items() if not k.startswith("time/")}


def test_malformed_override_fails_cleanly(tmp_path):
  proc = _launch(tmp_path / "run", "--config.rl.loss=reinforce")
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode != 0
  assert "config.rl" in out and "reinforce" in out
  assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_smoke_run_and_exact_resume_after_sigkill(tmp_path):
  ref_dir, killed_dir = tmp_path / "ref", tmp_path / "killed"
  ref = _launch(ref_dir)
  out, _ = ref.communicate(timeout=1200)
  assert ref.returncode == 0, out[-3000:]
  ref_rows = _rows(ref_dir)
  assert [r["iteration"] for r in ref_rows] == [0, 1, 2, 3, 4]
  for key in ("train/loss", "rollout/reward_mean", "rollout/response_tokens_mean",
              "eval/accuracy"):
    assert key in ref_rows[0]
  assert any(r.get("train/steps", 0) > 0 for r in ref_rows)
  assert (ref_dir / "plots" / "accuracy.png").exists()
  assert [r.get("time/compiles") for r in ref_rows[2:]] == [0, 0, 0]  # no recompiles

  # The second run kills itself (SIGKILL) at the start of iteration 3, once
  # checkpoint 2 is committed: a deterministic point, not a clock.
  proc = _launch(killed_dir, fault="iteration@3")
  out, _ = proc.communicate(timeout=1200)
  assert proc.returncode == -signal.SIGKILL, out[-3000:]
  assert [r["iteration"] for r in _rows(killed_dir)] == [0, 1, 2]
  assert (killed_dir / "checkpoints" / "2").is_dir()

  resumed = _launch(killed_dir)
  out, _ = resumed.communicate(timeout=1200)
  assert resumed.returncode == 0, out[-3000:]
  assert "Resumed from iteration 2" in out
  got = _rows(killed_dir)
  assert [r["iteration"] for r in got] == [0, 1, 2, 3, 4]
  for a, b in zip(got, ref_rows):
    a, b = _comparable(a), _comparable(b)
    assert a.keys() == b.keys()
    for k in a:  # bit-identical: CPU XLA is deterministic and all RNG is (seed, iteration)
      assert a[k] == b[k], (a["iteration"], k, a[k], b[k])


def _mesh_config(mesh):
  """arith_tiny:smoke at test sizes: synchronous rollouts of 16 slots (every
  group finishes and trains in iteration 1), length penalty on from the start
  (rewards differ within a group), a 2-layer model whose 2 kv heads split
  over tensor=2."""
  c = arith_tiny.get_config("smoke")
  c.model.update(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                 num_kv_heads=2, max_position_embeddings=128)
  c.data.n_train, c.data.n_heldout = 64, 8
  c.rollout.update(partial=False, max_length=64, samples_per_prompt=4)
  c.rl.update(length_penalty_start=0, minibatch_size=16)
  c.optim.update(microbatch_size=8, learning_rate=1e-3)
  c.eval.update(samples=1, max_new_tokens=16)
  c.mesh.update(dict(zip(("data", "fsdp", "tensor"), mesh)))
  return c


def _one_iteration(mesh, params, workdir):
  """Metrics of iteration 1 (rollout, rewards, update, eval) and the params after it."""
  from kimi_jax import distributed
  s = settings.from_config(_mesh_config(mesh))
  tr = trainer.Trainer(s, str(workdir))
  sampler, scheduler = tr.new_host_state()
  params = distributed.place(params, tr.train_layout.params())
  params, _, _, _, row = tr.iteration(1, params, sampler, scheduler, tr.counter(0), tr.counter(0))
  row.update(tr.evaluate(params, 1))
  assert jax.tree.leaves(params)[0].sharding.mesh.devices.size == np.prod(mesh)
  return _comparable(row), distributed.fetch(params)


@pytest.mark.slow
def test_iteration_under_2x2x2_mesh_matches_one_device(tmp_path):
  """Tolerances: rollouts, rewards and eval are exact (the same tokens: only
  float32 summation order differs under the mesh, far from flipping a draw);
  train metrics rtol 1e-4, params after the AdamW step (lr 1e-3) atol 1e-5."""
  s = settings.from_config(_mesh_config((1, 1, 1)))
  task = trainer.tasks_lib.make_task(s)
  tr1 = trainer.Trainer(s, str(tmp_path))
  warm = jax.device_get(trainer.initial_params(s, task, tr1.base_key, tr1.train_layout))
  one, params1 = _one_iteration((1, 1, 1), warm, tmp_path)
  mesh, params8 = _one_iteration((2, 2, 2), warm, tmp_path)
  assert one["train/steps"] >= 1 and one["train/grad_norm"] > 0
  assert one["rollout/groups_completed"] == 4
  assert one.keys() == mesh.keys()
  for key in one:
    if key.startswith("train/"):
      np.testing.assert_allclose(mesh[key], one[key], rtol=1e-4, atol=1e-7, err_msg=key)
    else:
      assert mesh[key] == one[key], key
  for a, b in zip(jax.tree.leaves(params8), jax.tree.leaves(params1)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  assert not np.allclose(params1["lm_head"], warm["lm_head"])


@pytest.mark.parametrize("name", ["arith_tiny", "visual_tiny", "prompt_rl", "qwen2_5_math_1_5b",
                                  "llava_qwen2_images", "llama3_8b_pod"])
def test_every_rl_config_takes_init_from(name):
  """`--config.init_from=RUN` works on every RL config (a flag override needs the key)."""
  import importlib
  module = importlib.import_module(f"configs.{name}")
  config = (module.base_config(hf_path="h", train_file="t", heldout_file="", add_bos=False,
                               total_iterations=1, prompts_per_iteration=1, max_length=64,
                               max_prompt_length=16, segment_budget=16, minibatch_size=1,
                               microbatch_size=1, learning_rate=1e-6, mesh={})
            if name == "prompt_rl" else module.get_config())
  assert config.init_from == ""
