"""Checkpointer: exact round trip, keep-last-N, atomicity, corrupt fallback."""
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kimi_jax import checkpointing

# A failed orbax restore leaves sibling tensorstore reads pending on a closed
# event loop; Python reports them as "unraisable". Orbax-internal noise.
_ORBAX_NOISE = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning")

def _params(seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {"dense": {"kernel": jax.random.normal(k1, (8, 16), jnp.float32),
                    "bias": jnp.zeros((16,), jnp.float32)},
          "embed": jax.random.normal(k2, (32, 8)).astype(jnp.bfloat16)}


def _opt_state(params):
  tx = optax.adamw(1e-3)
  state = tx.init(params)
  grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.5, params)
  _, state = tx.update(grads, state, params)  # non-zero mu / nu, count 1
  return state


def _host_state(step):
  rng = np.random.default_rng(step)
  return {
      "step": step,
      "rng_key": [int(x) for x in
                  jax.random.key_data(jax.random.key(step)).tolist()],
      "data_position": {"epoch": 1, "index": 12345},
      "prompt_sampler": {"ema": rng.random(5000).tolist(),
                         "trials": list(range(5000)),
                         "rng": {"state": str(2**127 + 5)}},
      "replay": [{"tokens": rng.integers(0, 1000, 300).tolist(),
                  "segments": [[0, 100], [100, 300]], "prompt": "x = ?"}
                 for _ in range(50)],
      "config": {"lr": 1e-3, "name": "arith_tiny", "nested": [[1, 2], []]},
  }


def _save(ckpt, step, seed=0):
  params = _params(seed)
  opt_state = _opt_state(params)
  ckpt.save(step, params=params, opt_state=opt_state,
            host_state=_host_state(step))
  return params, opt_state


def _assert_bit_exact(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()


def _targets():
  params = jax.eval_shape(_params)
  return {"params_like": params,
          "opt_state_like": jax.eval_shape(_opt_state, params)}


def _corrupt_params(step_dir):
  """Truncates every array data file of the step's params item."""
  data_dir = os.path.join(step_dir, "params", "d")
  names = os.listdir(data_dir)
  assert names
  for name in names:
    path = os.path.join(data_dir, name)
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  return {os.path.join("params", "d", n) for n in names}


def test_round_trip_is_bit_exact(tmp_path):
  with checkpointing.Checkpointer(tmp_path / "ckpt") as ckpt:
    params, opt_state = _save(ckpt, 7)
    step, params2, opt2, host = ckpt.restore(**_targets())
  assert step == 7
  _assert_bit_exact(params, params2)
  _assert_bit_exact(opt_state, opt2)  # namedtuples (ScaleByAdamState, ...)
  assert isinstance(opt2[0], optax.ScaleByAdamState)
  assert host == _host_state(7)


def test_restores_onto_given_shardings(tmp_path):
  mesh = jax.make_mesh((8,), ("data",))
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def layout(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype,
        sharding=sharded if x.ndim and x.shape[0] % 8 == 0 else replicated),
                        tree)

  with checkpointing.Checkpointer(tmp_path / "ckpt") as ckpt:
    params, opt_state = _save(ckpt, 1)  # saved from one device
    targets = _targets()
    restored = ckpt.restore(params_like=layout(targets["params_like"]),
                            opt_state_like=layout(targets["opt_state_like"]))
  kernel = restored.params["dense"]["kernel"]
  assert kernel.sharding == sharded
  assert len(kernel.addressable_shards) == 8
  _assert_bit_exact(params, restored.params)
  _assert_bit_exact(opt_state, restored.opt_state)


def test_keep_last_n_and_step_order(tmp_path):
  with checkpointing.Checkpointer(tmp_path / "ckpt", keep=2) as ckpt:
    for step in (1, 2, 3, 4):
      _save(ckpt, step)
    assert ckpt.all_steps() == [3, 4]
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["3", "4"]
    with pytest.raises(ValueError, match="step 4"):
      _save(ckpt, 4)  # orbax alone would skip this silently


def test_unfinished_save_is_not_latest(tmp_path):
  directory = tmp_path / "ckpt"
  with checkpointing.Checkpointer(directory) as ckpt:
    _save(ckpt, 1)
  # What a run killed mid-save leaves behind: orbax's temporary directory.
  tmp = directory / "2.orbax-checkpoint-tmp-1234567"
  (tmp / "params").mkdir(parents=True)
  (tmp / "params" / "_METADATA").write_text("{half")
  with checkpointing.Checkpointer(directory) as ckpt:
    assert ckpt.latest_step() == 1
    assert ckpt.restore_or_none(**_targets()).step == 1


@pytest.mark.parametrize("damage", ["truncate_arrays", "delete_manifest",
                                    "break_json"])
@_ORBAX_NOISE
def test_corrupt_latest_falls_back_and_keeps_files(tmp_path, caplog, damage):
  directory = tmp_path / "ckpt"
  with checkpointing.Checkpointer(directory) as ckpt:
    params2, _ = _save(ckpt, 2, seed=2)
    _save(ckpt, 3, seed=3)
  step_dir = str(directory / "3")
  if damage == "truncate_arrays":
    damaged = _corrupt_params(step_dir)
  elif damage == "delete_manifest":
    os.remove(os.path.join(step_dir, "params", "manifest.ocdbt"))
    damaged = set()
  else:
    with open(os.path.join(step_dir, "host", "metadata"), "w") as f:
      f.write('{"step": 3, "replay": [1, 2')
    damaged = {os.path.join("host", "metadata")}
  files_before = {os.path.relpath(os.path.join(d, f), step_dir)
                  for d, _, fs in os.walk(step_dir) for f in fs}

  with caplog.at_level(logging.WARNING):
    with checkpointing.Checkpointer(directory) as ckpt:
      restored = ckpt.restore_or_none(**_targets())
      assert restored.step == 2
      _assert_bit_exact(params2, restored.params)
      assert restored.host_state == _host_state(2)
      # The step number is free again: the rerun of iteration 3 can save.
      assert ckpt.all_steps() == [2]
      _save(ckpt, 3, seed=33)
      assert ckpt.all_steps() == [2, 3]
  warnings = [r.getMessage() for r in caplog.records
              if r.levelno >= logging.WARNING]
  assert any("step 3" in m and "unreadable" in m for m in warnings), warnings
  # Nothing deleted: the damaged step sits, file for file, beside the new one.
  kept = str(directory / "3.corrupt")
  files_after = {os.path.relpath(os.path.join(d, f), kept)
                 for d, _, fs in os.walk(kept) for f in fs}
  assert files_after == files_before
  assert damaged <= files_after


@_ORBAX_NOISE
def test_nothing_restorable_returns_none_and_keeps_files(tmp_path, caplog):
  directory = tmp_path / "ckpt"
  with checkpointing.Checkpointer(directory) as ckpt:
    _save(ckpt, 5)
  damaged = _corrupt_params(str(directory / "5"))
  with caplog.at_level(logging.WARNING):
    with checkpointing.Checkpointer(directory) as ckpt:
      assert ckpt.restore_or_none(**_targets()) is None
      _save(ckpt, 1)  # a fresh start can checkpoint again
  assert all((directory / "5.corrupt" / f).exists() for f in damaged)
  assert any("step 5" in r.getMessage() for r in caplog.records)


def test_no_checkpoint(tmp_path):
  with checkpointing.Checkpointer(tmp_path / "ckpt") as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.restore_or_none(**_targets()) is None
    with pytest.raises(FileNotFoundError, match="ckpt"):
      ckpt.restore(**_targets())


@_ORBAX_NOISE
def test_mismatched_model_is_an_error_not_corruption(tmp_path):
  directory = tmp_path / "ckpt"
  with checkpointing.Checkpointer(directory) as ckpt:
    _save(ckpt, 1)
    _save(ckpt, 2)
    targets = _targets()
    wider = jax.ShapeDtypeStruct((32, 16), jnp.bfloat16)
    targets["params_like"]["embed"] = wider
    with pytest.raises(checkpointing.CheckpointMismatchError,
                       match="embed"):
      ckpt.restore_or_none(**targets)
    assert ckpt.all_steps() == [1, 2]  # nothing quarantined


def test_host_state_validation_and_numpy(tmp_path):
  with checkpointing.Checkpointer(tmp_path / "ckpt") as ckpt:
    params = _params()
    opt_state = _opt_state(params)
    with pytest.raises(TypeError, match=r"host_state\['buf'\]"):
      ckpt.save(1, params=params, opt_state=opt_state,
                host_state={"buf": {3: "int key"}})
    ckpt.save(1, params=params, opt_state=opt_state,
              host_state={"pos": np.int64(4), "ema": np.arange(3.0),
                          "pair": (1, 2), "bad": float("nan")})
    host = ckpt.restore(1, **_targets()).host_state
  assert host["pos"] == 4 and host["ema"] == [0.0, 1.0, 2.0]
  assert host["pair"] == [1, 2] and np.isnan(host["bad"])


def test_missing_parent_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="no_such_dir"):
    checkpointing.Checkpointer(tmp_path / "no_such_dir" / "ckpt")


def test_abandoned_writes_of_a_failed_save_are_not_logged_after_its_error():
  """asyncio logs "Future exception was never retrieved" when it collects the
  futures of writes a failed save abandoned, at any later moment (once as the
  last line of a run, after the one-line error). Those records (full disk,
  closed loop) are dropped; any other asyncio error still reaches the log."""
  import logging as std_logging
  from kimi_jax import save_faults
  save_faults.quiet_abandoned_writes()
  seen = []

  class Keep(std_logging.Handler):
    def emit(self, record):
      seen.append(record.getMessage())

  logger = std_logging.getLogger("asyncio")
  handler = Keep()
  logger.addHandler(handler)
  try:
    for e in (ValueError("RESOURCE_EXHAUSTED: No space left on device [os_error_code='28']"),
              OSError(28, "No space left on device"),
              RuntimeError("Event loop is closed"),
              KeyError("something else")):
      logger.error("Future exception was never retrieved\nfuture: <Future>",
                   exc_info=(type(e), e, None))
    logger.error("Task was destroyed but it is pending!")
  finally:
    logger.removeHandler(handler)
  assert len(seen) == 2
  assert seen[0].startswith("Future exception was never retrieved")
  assert seen[1] == "Task was destroyed but it is pending!"
