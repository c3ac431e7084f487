"""config.init_from: any checkpoint as the trainer's starting params (params only)."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import arith_tiny
from kimi_jax import parallel
from kimi_jax.checkpointing import Checkpointer
from kimi_jax.models import hf, params_io
from kimi_jax.rl import multihost, settings, tasks, trainer


def _random(cfg, seed):
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: trainer.init_params(cfg, jax.random.PRNGKey(0)))
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.1, x.shape), x.dtype), shapes)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """An RL-style run directory with steps 3 and 7 (different params)."""
  cfg = settings.from_config(arith_tiny.get_config("smoke")).model
  root = tmp_path_factory.mktemp("run")
  params_io.write_config(cfg, root)
  by_step = {}
  with Checkpointer(str(root / "checkpoints")) as ckpt:
    for step in (3, 7):
      by_step[step] = _random(cfg, step)
      ckpt.save(step, params=by_step[step], opt_state={"count": np.zeros((), np.int32)},
                host_state={"iteration": step})
  (root / "checkpoints" / "9.orbax-checkpoint-tmp-123").mkdir()  # an unfinished save
  return root, cfg, by_step


def _config(init_from, **model):
  c = arith_tiny.get_config("smoke")
  c.init_from = str(init_from)
  c.sft.steps = 0
  c.model.update(model)
  return c


def _start(c):
  s = settings.from_config(c)
  layout, _ = multihost.make_mesh_layouts(s)
  return s, trainer.initial_params(s, tasks.make_task(s), jax.random.PRNGKey(0), layout)


def test_newest_or_chosen_step_of_a_run(run_dir):
  root, cfg, by_step = run_dir
  assert params_io.run_steps(root) == [3, 7]
  s, params = _start(_config(root))
  assert s.model == cfg and s.init_from == str(root)
  jax.tree.map(np.testing.assert_array_equal, params, by_step[7])
  _, params = _start(_config(root / "checkpoints" / "3"))
  jax.tree.map(np.testing.assert_array_equal, params, by_step[3])


def test_starting_from_a_run_step_logs_no_orbax_metadata_warning(run_dir, caplog):
  root, cfg, by_step = run_dir
  with caplog.at_level(logging.WARNING):
    _, params = params_io.load_params(params_io.resolve(root), cfg)
  jax.tree.map(np.testing.assert_array_equal, params, by_step[7])
  assert not [r for r in caplog.records if "Metadata file" in r.getMessage()]


def test_hf_and_orbax_directories(run_dir, tmp_path):
  _, cfg, by_step = run_dir
  hf.save_pretrained(cfg, by_step[3], str(tmp_path / "hf"))
  params_io.save_orbax(cfg, by_step[7], tmp_path / "orbax")
  for path, want in ((tmp_path / "hf", by_step[3]), (tmp_path / "orbax", by_step[7])):
    s, params = _start(_config(path, eos_id=None))
    assert params_io.same_architecture(s.model, cfg) == []
    jax.tree.map(np.testing.assert_array_equal, params, want)


def test_starts_sharded_on_a_mesh(run_dir):
  root, _, by_step = run_dir
  c = _config(root)
  c.mesh.update(data=2, fsdp=2, tensor=2)
  s, params = _start(c)
  want = parallel.Layout.train(multihost.make_mesh_layouts(s)[0].mesh, s.model).params()
  assert jax.tree.map(lambda x: x.sharding, params) == want
  jax.tree.map(np.testing.assert_array_equal, params, by_step[7])


@pytest.mark.parametrize("change,match", [
    (dict(model=dict(hidden_size=64)), r"config\.model\.hidden_size=64 but .*model_config\.json "
                                       r"says %d" % arith_tiny.get_config().model.hidden_size),
    (dict(sft_steps=5), r"config\.sft\.steps=5: with config\.init_from"),
    (dict(init_from="/nonexistent/run"), r"config\.init_from: checkpoint /nonexistent/run does "
                                         r"not exist"),
    (dict(init_from="step"), r"config\.init_from: checkpoint .*/checkpoints/5: step 5 has no "
                             r"params/ \(finished steps of .*: \[3, 7\]\)"),
    (dict(hf_path=True), r"config\.init_from and config\.model\.hf_path"),
])
def test_errors_name_the_key(run_dir, change, match):
  root, _, _ = run_dir
  c = _config(root, **change.get("model", {}))
  if "sft_steps" in change:
    c.sft.steps = change["sft_steps"]
  if change.get("init_from") == "step":
    (root / "checkpoints" / "5").mkdir(exist_ok=True)
    c.init_from = str(root / "checkpoints" / "5")
  elif "init_from" in change:
    c.init_from = change["init_from"]
  if "hf_path" in change:
    c.model.hf_path = str(root)
  with pytest.raises(settings.ConfigError, match=match):
    settings.from_config(c)
