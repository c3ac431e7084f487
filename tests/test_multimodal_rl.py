"""Image + text RL: minibatches carry images, the update sees them, evaluation per task."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from kimi_jax.models.transformer import Transformer
from kimi_jax.rl import batch as batch_lib
from kimi_jax.rl import losses, settings, tasks
from kimi_jax.rl.config_check import ConfigError
from kimi_jax.rl.evaluation import evaluate
from kimi_jax.rl.update import (TrainState, UpdateConfig, make_optimizer, make_ref_logprobs,
                                make_train_step, set_learning_rate, token_logprobs)
from kimi_jax.sampling.finish import FinishReason
from kimi_jax.sampling.partial import Group, Trajectory
from multimodal_models import IMAGE_ID, pixels, prompt, tiny_model

# Prompt p has p % 2 + 1 images; its pixels are a function of p.
def _images(p):
  return pixels(p % 2 + 1, seed=p)


def _group(prompt_idx, k=2, extra=0):
  p = prompt([3, 4], prompt_idx % 2 + 1)
  trajs = []
  for j in range(k):
    response = [5 + j] * (3 + j + extra) + [IMAGE_ID]  # a sampled image id: a token
    tokens = np.asarray(p + response, np.int32)
    trajs.append(Trajectory(prompt_idx=prompt_idx, sample_idx=j, group_id=prompt_idx,
                            tokens=tokens, prompt_len=len(p),
                            logp=np.full(len(response), -1.0, np.float32),
                            token_iter=np.ones(len(response), np.int32), finish=FinishReason.EOS,
                            age=0, first_iteration=1, last_iteration=1))
  return Group(prompt_idx, prompt_idx, trajs)


GROUPS = [_group(0), _group(1), _group(2, extra=2)]
REWARDS = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], np.float32)


def _minibatch(samples_per_row):
  mb, = batch_lib.make_minibatches(GROUPS, REWARDS, minibatch_size=8, length=32,
                                   loss_segments="all", iteration=1,
                                   samples_per_row=samples_per_row, images=_images,
                                   image_slots=2)
  return mb


def test_packed_rows_carry_their_samples_images_in_order():
  mb = _minibatch(3)
  assert mb["pixels_NIYXC"].shape == (8, 6, 16, 16, 3)
  for n in range(8):
    starts = {}
    for t in range(32):
      sid = mb["segment_ids_NT"][n, t]
      if sid and sid not in starts:
        starts[sid] = t
    images = []
    for sid, t in sorted(starts.items(), key=lambda x: x[1]):
      prompt_idx = next(g.prompt_idx for g in GROUPS for tr in g.trajectories
                        if np.array_equal(tr.tokens, mb["tokens_NT"][n, t:t + len(tr.tokens)]))
      images.extend(_images(prompt_idx))
      plen = GROUPS[prompt_idx].trajectories[0].prompt_len
      assert mb["image_prompt_NT"][n, t:t + plen].all()
    used = len(images)
    if used:
      np.testing.assert_array_equal(mb["pixels_NIYXC"][n, :used], np.stack(images))
    assert not mb["pixels_NIYXC"][n, used:].any()
  assert mb["image_prompt_NT"].sum() == sum(len(g.trajectories) * g.trajectories[0].prompt_len
                                            for g in GROUPS)


def test_too_many_images_for_the_slots_is_an_error():
  with pytest.raises(ValueError, match="prompt 1 has 2 images, more than the 1 image slots"):
    batch_lib.make_minibatches(GROUPS, REWARDS, minibatch_size=8, length=32,
                               loss_segments="all", iteration=1, images=_images, image_slots=1)


def _batch(mb, ref):
  return batch_lib.to_batch({k: jnp.asarray(v) for k, v in mb.items()}, ref)


@pytest.fixture(scope="module")
def model():
  return tiny_model(seed=2)


def test_packed_log_probs_equal_each_sample_alone(model):
  cfg, params = model
  mb = _minibatch(3)
  ref = make_ref_logprobs(cfg, 4)(params, mb["tokens_NT"], mb["positions_NT"],
                                  mb["segment_ids_NT"], mb["pixels_NIYXC"], mb["image_prompt_NT"])
  ref = np.asarray(ref)
  for n in range(8):
    for t in range(32):
      sid = mb["segment_ids_NT"][n, t]
      if not sid or (t and mb["segment_ids_NT"][n, t - 1] == sid):
        continue
      tr = next(tr for g in GROUPS for tr in g.trajectories
                if np.array_equal(tr.tokens, mb["tokens_NT"][n, t:t + len(tr.tokens)]))
      alone = token_logprobs(cfg, params, jnp.asarray(tr.tokens[None]),
                             pixel_values=_images(tr.prompt_idx),
                             image_prompt_BT=np.arange(len(tr.tokens))[None] < tr.prompt_len)
      span = slice(t + 1, t + len(tr.tokens))  # the first token of a packed sample is unscored
      np.testing.assert_allclose(ref[n, span], np.asarray(alone)[0, 1:], atol=1e-5)


def test_update_trains_the_tower_and_its_first_step_reference_is_exact(model):
  cfg, params = model
  mb = _minibatch(2)
  ucfg = UpdateConfig(learning_rate=1e-2, microbatch_size=4)
  opt = make_optimizer(ucfg)
  step = make_train_step(cfg, losses.LossConfig(tau=0.5), ucfg, opt)
  ref = make_ref_logprobs(cfg, 4)(params, mb["tokens_NT"], mb["positions_NT"],
                                  mb["segment_ids_NT"], mb["pixels_NIYXC"], mb["image_prompt_NT"])

  def run(batch, first):
    state = TrainState(params=jax.tree.map(jnp.copy, params), opt_state=opt.init(params),
                       step=jnp.zeros((), jnp.int32), skipped=jnp.zeros((), jnp.int32))
    return step(state, batch, ref_is_current=first)

  explicit, m1 = run(_batch(mb, ref), False)
  implicit, m2 = run(_batch(mb, jnp.zeros_like(ref)), True)
  np.testing.assert_allclose(float(m1["train/loss"]), float(m2["train/loss"]), rtol=1e-5)
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), explicit.params["vision"],
                       params["vision"])
  assert max(jax.tree.leaves(moved)) > 0  # the tower gets a gradient
  # The images enter the gradient (the loss value at the reference does not
  # depend on log-probs: it is the squared advantage): other pixels, another one.
  other = dict(mb, pixels_NIYXC=mb["pixels_NIYXC"] + 1.0)
  _, m3 = run(_batch(other, jnp.zeros_like(ref)), True)
  assert abs(float(m3["train/grad_norm"]) - float(m2["train/grad_norm"])) > 1e-6


def test_a_frozen_tower_stays_bit_identical(model):
  cfg, params = model
  mb = _minibatch(2)
  ucfg = UpdateConfig(learning_rate=1e-2, microbatch_size=4, train_vision=False,
                      weight_decay=0.1)
  opt = make_optimizer(ucfg)
  step = make_train_step(cfg, losses.LossConfig(tau=0.5), ucfg, opt)
  state = TrainState(params=jax.tree.map(jnp.copy, params), opt_state=opt.init(params),
                     step=jnp.zeros((), jnp.int32), skipped=jnp.zeros((), jnp.int32))
  for _ in range(2):
    state, _ = step(state, _batch(mb, jnp.zeros((8, 32), jnp.float32)), ref_is_current=True)
  same = jax.tree.map(lambda a, b: bool((np.asarray(a).view(np.uint32)
                                         == np.asarray(b).view(np.uint32)).all()),
                      state.params["vision"], params["vision"])
  assert all(jax.tree.leaves(same))
  assert float(jnp.abs(state.params["embed"] - params["embed"]).max()) > 0


def test_vision_lr_scale_scales_only_the_towers_step(model):
  cfg, params = model
  mb = _minibatch(2)
  batch = _batch(mb, jnp.zeros((8, 32), jnp.float32))

  def first_step(scale):
    ucfg = UpdateConfig(learning_rate=1e-3, microbatch_size=4, vision_lr_scale=scale)
    opt = make_optimizer(ucfg)
    step = make_train_step(cfg, losses.LossConfig(tau=0.5), ucfg, opt)
    # The per-iteration learning rate is set on a state that holds the extra transform.
    opt_state = set_learning_rate(opt.init(params), 1e-3)
    state = TrainState(params=jax.tree.map(jnp.copy, params), opt_state=opt_state,
                       step=jnp.zeros((), jnp.int32), skipped=jnp.zeros((), jnp.int32))
    new, _ = step(state, batch, ref_is_current=True)
    return jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), new.params, params)

  base, scaled = first_step(1.0), first_step(10.0)
  for key in base:
    for d1, d10 in zip(jax.tree.leaves(base[key]), jax.tree.leaves(scaled[key])):
      np.testing.assert_allclose(d10, (10.0 if key == "vision" else 1.0) * d1,
                                 rtol=1e-4, atol=1e-9)
  assert max(float(np.abs(d).max()) for d in jax.tree.leaves(base["vision"])) > 0
  with pytest.raises(ValueError, match="vision_lr_scale"):
    UpdateConfig(vision_lr_scale=0.0)


def test_evaluation_with_images_reports_each_task(model):
  cfg, params = model

  class Problem:
    def __init__(self, i):
      self.prompt, self.difficulty, self.task, self.i = f"{i % 2}", 1, ("a", "b")[i % 2], i

  problems = [Problem(i) for i in range(4)]
  out = evaluate(cfg, params, problems, encode=lambda text: prompt([3], int(text) + 1),
                 decode=lambda ids: str(len(ids)), score=lambda p, text: float(p.task == "a"),
                 max_new_tokens=3, eos_id=1, images=lambda p: _images(p.i),
                 category=lambda p: p.task)
  assert out["eval/accuracy_task/a"] == 1.0 and out["eval/accuracy_task/b"] == 0.0
  assert out["eval/accuracy"] == 0.5 and "eval/response_tokens_task/a" in out


def _visual_config(**model_changes):
  from configs import visual_tiny
  c = visual_tiny.get_config("smoke")
  c.model.update(model_changes)
  return c


def test_visual_task_builds_prompts_images_and_sft_examples():
  s = settings.from_config(_visual_config())
  task = tasks.make_task(s)
  p = task.train[0]
  ids = task.encode(p.prompt)
  assert ids.count(259) == 16 and task.images(p).shape == (1, 32, 32, 3)
  assert task.category(p) in ("count", "compare", "spatial", "bars", "arith")
  assert task.score(p, "A:" + p.answer + "\n") == 1.0
  examples = task.sft_examples(4, 1.0, 0.0, 0)
  assert len(examples) == 4 and examples[0].images.shape == (1, 32, 32, 3)


def test_visual_warmup_draws_problems_apart_from_the_rl_prompts():
  c = _visual_config()
  c.data.n_warmup = 0
  task = tasks.make_task(settings.from_config(c))
  assert task.sft_problems == task.train
  c.data.n_warmup = 60
  task = tasks.make_task(settings.from_config(c))
  warm = {p.id for p in task.sft_problems}
  assert len(warm) == 60
  assert not warm & {p.id for p in task.train} and not warm & {p.id for p in task.heldout}
  c.data.n_warmup = -1
  with pytest.raises(ConfigError, match="n_warmup"):
    settings.from_config(c)


def test_visual_config_errors_name_the_key():
  c = _visual_config()
  del c.model["vision"]
  c.model.image_token_id = None
  with pytest.raises(ConfigError, match="needs an image encoder"):
    tasks.make_task(settings.from_config(c))
  c = _visual_config()
  c.data.tasks = ("count", "bar")
  with pytest.raises(ConfigError, match=r"unknown task 'bar'.*bars"):
    settings.from_config(c)
  c = _visual_config()
  c.data.kind = "pictures"
  with pytest.raises(ConfigError, match="config.data.kind must be"):
    settings.from_config(c)
  c = _visual_config()
  c.model.vision = ml_collections.ConfigDict(dict(c.model.vision, image_size=16, patch_size=8))
  with pytest.raises(ConfigError, match="render 32x32"):
    tasks.make_task(settings.from_config(c))


# --------------------------------------------------- main job, resume (slow)

def _launch(workdir, fault=None):
  import os
  import subprocess
  import sys
  from kimi_jax import faults
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  env.pop(faults.ENV, None)
  if fault:
    env[faults.ENV] = fault
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return subprocess.Popen([sys.executable, "-m", "launch.train",
                           "--config=configs/visual_tiny.py:smoke", f"--workdir={workdir}"],
                          cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def _finish(proc):
  out, _ = proc.communicate(timeout=1200)
  return proc.returncode, out


def _rows(workdir):
  import json
  with open(workdir / "metrics.jsonl") as f:
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")}
            for line in f if line.strip()]


@pytest.mark.slow
def test_visual_smoke_run_resumes_exactly_after_sigkill(tmp_path):
  """configs/visual_tiny.py:smoke end to end (SFT with images, partial
  rollouts with images, updates, per-task evaluation), killed at the start
  of iteration 3 and resumed from checkpoint 2: the same metrics bit for bit."""
  import signal
  # The reference and the run to kill side by side: their compiles overlap.
  ref, killed = _launch(tmp_path / "ref"), _launch(tmp_path / "run", fault="iteration@3")
  (rc, out), (killed_rc, killed_out) = _finish(ref), _finish(killed)
  assert rc == 0, out[-3000:]
  assert killed_rc == -signal.SIGKILL, killed_out[-3000:]
  want = _rows(tmp_path / "ref")
  assert [r["iteration"] for r in want] == [0, 1, 2, 3]
  assert any(k.startswith("eval/accuracy_task/") for k in want[0])
  assert any(r.get("train/steps", 0) > 0 for r in want), "no update ran"
  assert (tmp_path / "ref" / "plots" / "accuracy_by_task.png").exists()
  from kimi_jax.data import images  # the run keeps its images' normalisation for convert
  from kimi_jax.rl import visual_task
  assert images.load_processor(tmp_path / "ref") == visual_task.PROCESSOR
  rc, out = _finish(_launch(tmp_path / "run"))
  assert rc == 0 and "Resumed from iteration 2" in out, out[-3000:]
  assert _rows(tmp_path / "run") == want
