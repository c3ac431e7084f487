"""The k1.5 RL loop: SFT warm-up, then iterations of rollout -> rewards -> update.

`run(config, workdir)` is the whole main job. One iteration:
  1. partial rollout: the scheduler fills B slots (carried-over first), the
     jitted `sample_segment` decodes under the per-iteration token budget;
  2. rewards for the groups whose k samples all finished (verifier + length
     penalty + repeat/truncation rules), prompt-sampler statistics updated;
  3. update: reference log-probs under the iteration-start policy, optimizer
     re-initialised, one step per minibatch;
  4. every `eval_every`: held-out evaluation; every `checkpoint_every`: one
     orbax step holding params, optimizer state and all host-side state.
Iteration 0 evaluates the starting (post-SFT) policy before any RL update.

The prompts, their codec and their reward come from a `tasks.Task`: the
synthetic tasks (byte vocabulary) by default, or prompt JSONL files with a
tokenizer.json and a verifier per prompt type. Starting weights are random
(then SFT-warmed) or a HF checkpoint (`config.model.hf_path`). Bad prompt
files and tokenizers fail when the Trainer is built, before anything is
written.

Resume is exact: all randomness derives from (seed, iteration), and the
scheduler / prompt-sampler state is restored from the checkpoint. Metrics
rows written after the last checkpoint by a killed run are moved to
`metrics.jsonl.orphaned` and recomputed.

Devices (`config.mesh`, kimi_jax/parallel.py): params live in the training
layout (FSDP + tensor parallel) for the update and are resharded on device
to the sampling layout (tensor parallel) for rollouts and evaluation, and
back, each time donating the other copy. The default 1 x 1 x 1 mesh is one
device. Several processes (`kimi_jax.distributed.initialize`) each own a
share of the rollout slots and prompts (rl/multihost.py); process 0 writes
metrics, plots and the checkpoint's JSON.
"""
from __future__ import annotations

import os
import sys
import time

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from kimi_jax import distributed, faults, parallel
from kimi_jax.checkpointing import Checkpointer
from kimi_jax.compile_count import total_compiles
from kimi_jax.data import prompts as prompts_lib
from kimi_jax.metrics import MetricsWriter, read_metrics
from kimi_jax.models import params_io
from kimi_jax.models.transformer import init_params
from kimi_jax.plots import write_plots
from kimi_jax.rl import batch as batch_lib
from kimi_jax.rl.console import console_line, finite, quiet_library_logs
from kimi_jax.rl import multihost
from kimi_jax.rl import rewards as rewards_lib
from kimi_jax.rl import settings as settings_lib
from kimi_jax.rl import tasks as tasks_lib
from kimi_jax.rl.evaluation import difficulty_bucket, evaluate
from kimi_jax.rl.initial_weights import initial_params, warm_up  # noqa: F401  (re-exported)
from kimi_jax.rl.prompt_sampler import PromptSampler
from kimi_jax.rl.update import TrainState, make_optimizer, make_ref_logprobs, make_train_step
from kimi_jax.rl.update import set_learning_rate
from kimi_jax.sampling.partial import RolloutScheduler
from kimi_jax.sampling.segment import SegmentSampler
from kimi_jax.tokenizers import BYTE_EOS_ID, byte_decode, byte_encode

# The synthetic default is byte-level (seqio.ByteVocabulary ids).
EOS_ID = BYTE_EOS_ID
encode, decode = byte_encode, byte_decode


def prepare_workdir(workdir: str) -> str:
  """Create `workdir` (its parent must exist: a typo should not build a tree)."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  parent = os.path.dirname(workdir)
  if not os.path.isdir(parent):
    raise FileNotFoundError(f"--workdir {workdir}: parent directory {parent} does not exist")
  os.makedirs(workdir, exist_ok=True)
  return workdir


class Trainer:
  """Holds the run's static pieces; `run` drives the iterations."""

  def __init__(self, s: settings_lib.Settings, workdir: str):
    self.s, self.workdir = s, workdir
    self.task = tasks_lib.make_task(s)  # reads and checks the data first: fail before work
    # This process's prompts; records are looked up by index into them.
    self.train = prompts_lib.shard(self.task.train, jax.process_index(), jax.process_count())
    self.heldout = self.task.heldout
    self.train_layout, self.sample_layout = multihost.make_mesh_layouts(s)
    self.scheduler_cfg = multihost.process_rows(s, self.train_layout)
    self.optimizer = make_optimizer(s.update)
    self.train_step = make_train_step(s.model, s.loss, s.update, self.optimizer,
                                      layout=self.train_layout)
    self.ref_logprobs = make_ref_logprobs(s.model, s.update.microbatch_size, self.train_layout)
    # The optimizer restarts every iteration (a new mirror-descent problem).
    self.fresh_opt_state = jax.jit(
        lambda p, lr: set_learning_rate(self.optimizer.init(p), lr),
        out_shardings=self.train_layout.opt_state(self.optimizer))
    budget_slots = s.scheduler.max_length if not s.scheduler.partial else s.scheduler.segment_budget
    # Rollouts run the sampling layout's (unrolled) form of the model.
    self.engine = SegmentSampler(self.sample_layout.cfg, s.sampling, s.repeat, self.task.eos_id,
                                 budget_slots, min_width=s.scheduler.max_prompt_length,
                                 decode_phases=s.decode_phases, layout=self.sample_layout)
    self.base_key = jax.random.PRNGKey(s.seed)

  def counter(self, value: int) -> jax.Array:
    """An int32 scalar as the train step takes and returns it (replicated; a
    host value instead would compile the step a second time)."""
    return jax.device_put(np.int32(value), self.train_layout.replicated)

  def abstract_state(self):
    """Shapes, dtypes and training-layout shardings of (params, opt_state)."""
    like = lambda tree, shardings: jax.tree.map(  # noqa: E731
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree, shardings)
    params = jax.eval_shape(lambda: init_params(self.s.model, jax.random.PRNGKey(0)))
    opt = jax.eval_shape(self.optimizer.init, params)
    return (like(params, self.train_layout.params()),
            like(opt, self.train_layout.opt_state(self.optimizer)))

  def new_host_state(self):
    meta = [{"id": p.id, "difficulty": p.difficulty} for p in self.train]
    # Process 0 keeps the single-process seed; others draw independently.
    seed = self.s.seed + 1_000_003 * jax.process_index()
    sampler = PromptSampler(meta, self.s.prompts, seed=seed)
    scheduler = RolloutScheduler(self.scheduler_cfg, self.prompt_source(sampler))
    return sampler, scheduler

  def prompt_images(self, prompt_idx: int) -> np.ndarray:
    """float32 `[n, Y, X, C]`: the images of train prompt `prompt_idx`."""
    return self.task.images(self.train[prompt_idx])

  def with_images(self, state):
    """The scheduler's state with each row's prompt images (image + text
    tasks; fresh and carried rows alike: images follow the prompt index)."""
    if self.task.images is None:
      return state
    v = self.s.model.vision
    pixels = np.zeros((state.num_slots, self.task.image_slots, v.image_size, v.image_size,
                       v.num_channels), np.float32)
    for b in np.flatnonzero(state.active_B):
      x = self.prompt_images(int(state.prompt_idx_B[b]))
      pixels[b, :len(x)] = x
    return state.replace(pixels_BSYXC=pixels)

  def image_batch(self) -> dict:
    """`make_minibatches` / `empty_minibatch` image arguments ({} for text)."""
    if self.task.images is None:
      return {}
    v = self.s.model.vision
    return dict(image_slots=self.task.image_slots,
                image_shape=(v.image_size, v.image_size, v.num_channels))

  def prompt_source(self, sampler):
    def source(n, iteration):
      return [(i, self.task.encode(self.train[i].prompt)) for i in sampler.sample(n, iteration)]
    return source

  def evaluate(self, params, iteration) -> dict:
    """Held-out metrics of training-layout `params` (sampled in a resharded copy)."""
    e = self.s.eval
    t = self.task
    params = parallel.reshard(params, self.sample_layout)
    kw = dict(encode=t.encode, decode=t.decode, score=t.score, eos_id=t.eos_id,
              max_new_tokens=e.max_new_tokens, verifier_workers=t.verifier_workers,
              layout=self.sample_layout, images=t.images, category=t.category)
    out = evaluate(self.sample_layout.cfg, params, self.heldout, temperature=e.temperature,
                   samples=e.samples, seed=self.s.seed + 7919 * iteration, **kw)
    if e.greedy:
      greedy = evaluate(self.sample_layout.cfg, params, self.heldout, temperature=0.0, **kw)
      out["eval/greedy_accuracy"] = greedy["eval/accuracy"]
    return out

  def rewards(self, groups, iteration):
    """(correct_GK bool, total_GK float32, metrics) for completed groups:
    correctness (`rewards.is_correct`, also the prompt sampler's success)
    and final rewards."""
    records = [self.train[g.prompt_idx] for g in groups for _ in g.trajectories]
    texts = [self.task.decode(t.response) for g in groups for t in g.trajectories]
    outcome = rewards_lib.apply_verifier(self.task.score, records, texts,
                                         max_workers=self.task.verifier_workers)
    G, K = len(groups), len(groups[0].trajectories)
    scores_GK = np.asarray(outcome.rewards, np.float32).reshape(G, K)
    lengths_GK = np.array([[t.response_len for t in g.trajectories] for g in groups]).reshape(G, K)
    finish_GK = np.array([[int(t.finish) for t in g.trajectories] for g in groups]).reshape(G, K)
    total_GK, parts = rewards_lib.total_reward(scores_GK, lengths_GK, finish_GK, iteration,
                                               self.s.reward, return_parts=True)
    m = {"rollout/groups_completed": G, "rollout/reward_mean": float(total_GK.mean()),
         "rollout/task_reward_mean": float(parts["task"].mean()),
         "rollout/response_tokens_mean": float(lengths_GK.mean()),
         "rollout/verifier_errors": float(sum(outcome.errors.values()))}
    # Per reason only when it happens: a rare event, and the synthetic rows stay as they were.
    for reason, count in sorted(outcome.errors.items()):
      m[f"rollout/verifier_errors/{reason}"] = float(count)
    difficulty_G = [difficulty_bucket(self.train[g.prompt_idx].difficulty) for g in groups]
    for d in sorted({d for d in difficulty_G if d is not None}):
      rows = [i for i, dg in enumerate(difficulty_G) if dg == d]
      m[f"rollout/response_tokens_d{d}"] = float(lengths_GK[rows].mean())
    return parts["correct"], total_GK, m

  def update(self, params, groups, total_GK, iteration, step, skipped):
    """The training phase; every process calls it (with its own, maybe no,
    groups). Returns (TrainState, metrics), or (None, {}) when no process
    has a group to train on."""
    s = self.s
    n, T, S = self._rows()
    image_batch = self.image_batch()
    mbs = batch_lib.make_minibatches(
        groups, total_GK, minibatch_size=n, length=T, loss_segments=s.rl.loss_segments,
        iteration=iteration, samples_per_row=S, advantage_std_norm=s.loss.advantage_std_norm,
        images=self.prompt_images if image_batch else None,
        image_slots=image_batch.get("image_slots", 0))
    # Every process takes the same number of steps; padding rows weigh 0.
    count = distributed.max_over_processes(len(mbs))
    if not count:
      return None, {}
    mbs += [batch_lib.empty_minibatch(n, T, S, **image_batch) for _ in range(count - len(mbs))]
    mbs = [distributed.to_global(mb, self.train_layout.batch()) for mb in mbs]
    # pi_theta_i scores every sample once, before any step of this iteration;
    # the first minibatch gets its scores inside the first step (same params).
    refs = [None] + [self._ref_logprobs(params, mb) for mb in mbs[1:]]
    lr = np.float32(s.update.learning_rate_at(iteration))
    state = TrainState(params=params, opt_state=self.fresh_opt_state(params, lr), step=step,
                       skipped=skipped)
    metrics = []
    for mb, ref in zip(mbs, refs):
      first = ref is None
      if first:
        ref = distributed.to_global(np.zeros((n, T), np.float32), self.train_layout.batch())
      state, m = self.train_step(state, batch_lib.to_batch(mb, ref), ref_is_current=first)
      metrics.append(m)
    metrics = distributed.to_local(metrics)  # replicated: every process has them
    # Token counts add up over the steps; the rest are means over steps.
    computed, in_samples = (sum(float(m.pop(key)) for m in metrics)
                            for key in ("train/tokens_computed", "train/tokens_in_samples"))
    out = {key: float(np.mean([float(m[key]) for m in metrics])) for key in metrics[0]}
    out["train/padding_fraction"] = 1.0 - in_samples / computed if computed else 0.0
    out["train/steps"] = len(metrics)
    out["train/skipped_total"] = int(distributed.to_local(state.skipped))
    return state, out

  def _ref_logprobs(self, params, mb: dict):
    return self.ref_logprobs(params, mb["tokens_NT"], mb["positions_NT"], mb["segment_ids_NT"],
                             mb.get("pixels_NIYXC"), mb.get("image_prompt_NT"))

  def _rows(self):
    """(rows per minibatch on this process, row length, samples per row)."""
    s = self.s
    return (s.rl.minibatch_size // jax.process_count(), s.scheduler.max_length,
            s.rl.samples_per_row)

  def warmup(self, params) -> None:
    """Compile the rollout and update programs now (fixed shapes), not mid-run."""
    s = self.s
    self.engine.warmup(parallel.reshard(params, self.sample_layout), self.scheduler_cfg.num_slots,
                       s.scheduler.max_length, self.task.image_slots)
    mb = distributed.to_global(batch_lib.empty_minibatch(*self._rows(), **self.image_batch()),
                               self.train_layout.batch())
    ref = self._ref_logprobs(params, mb)
    for first in (True, False):
      copy = parallel.reshard(params, self.train_layout)  # the step donates its state
      # The donating switches of every iteration, there and back.
      copy = parallel.reshard(parallel.reshard(copy, self.sample_layout, donate=True),
                              self.train_layout, donate=True)
      state = TrainState(params=copy, opt_state=self.fresh_opt_state(copy, np.float32(0.0)),
                         step=self.counter(0), skipped=self.counter(0))
      out = self.train_step(state, batch_lib.to_batch(mb, ref), ref_is_current=first)
      jax.block_until_ready(out)

  def iteration(self, it, params, sampler, scheduler, step, skipped):
    """One rollout + update. `params` (training layout) are donated; returns
    (params, opt_state or None, step, skipped, metrics row)."""
    t0 = time.perf_counter()
    key = jax.random.fold_in(self.base_key, it)
    params = parallel.reshard(params, self.sample_layout, donate=True)
    state = self.with_images(scheduler.next_state(it))
    state, steps = self.engine(params, state, scheduler.budget, it, key)
    groups = scheduler.absorb(state, it, steps)
    params = parallel.reshard(params, self.train_layout, donate=True)
    t_rollout = time.perf_counter()
    row = dict(scheduler.metrics())
    total_GK = None
    if groups:
      correct_GK, total_GK, m = self.rewards(groups, it)
      row.update(m)
      sampler.update_groups([g.prompt_idx for g in groups], correct_GK)
    row.update(sampler.metrics(it))
    row = multihost.combine_rows(distributed.allgather_json(row))
    row["train/loss"] = float("nan")
    t_reward = time.perf_counter()
    tstate, m = self.update(params, groups, total_GK, it, step, skipped)
    opt_state = None
    if tstate is not None:
      params, opt_state = tstate.params, tstate.opt_state
      step, skipped = tstate.step, tstate.skipped
      row.update(m)
    t_end = time.perf_counter()
    row.update({"time/rollout_s": t_rollout - t0, "time/reward_s": t_reward - t_rollout,
                "time/update_s": t_end - t_reward})
    return params, opt_state, step, skipped, row


def run(config, workdir: str) -> list[dict]:
  """Run (or resume) the main job in `workdir`; returns the metrics rows
  (on process 0; other processes write nothing and return [])."""
  s = settings_lib.from_config(config)
  workdir = prepare_workdir(workdir)
  quiet_library_logs()
  logging.info("kimi_jax RL: %s, %.2fM params, workdir %s", s.model.family,
               s.model.num_params() / 1e6, workdir)
  primary = distributed.is_primary()
  tr = Trainer(s, workdir)
  params_io.write_config(s.model, workdir)  # the run's architecture, for init_from
  if primary and tr.task.processor is not None:  # the images' normalisation, for convert
    from kimi_jax.data import images  # pylint: disable=g-import-not-at-top  # PIL
    images.save_processor(tr.task.processor, workdir)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=s.keep_checkpoints)
  writer = (MetricsWriter(workdir, log_line=lambda it, row: console_line(
      it, s.total_iterations, row)) if primary else multihost.NullWriter())
  params_like, opt_like = tr.abstract_state()
  sampler, scheduler = tr.new_host_state()
  restored = ckpt.restore_or_none(params_like=params_like, opt_state_like=opt_like)
  step, skipped = tr.counter(0), tr.counter(0)
  if restored is None:
    writer.truncate_after(-1)
    params = initial_params(s, tr.task, tr.base_key, tr.train_layout)
    opt_state = parallel.init_opt_state(tr.optimizer, params, tr.train_layout)
    row = tr.evaluate(params, 0)
    writer.write(0, {"train/loss": float("nan"), "rollout/reward_mean": float("nan"),
                     "rollout/response_tokens_mean": float("nan"), **row,
                     **tr.task.metrics()})
    ckpt.save(0, params=params, opt_state=opt_state,
              host_state=multihost.host_state(0, s, step, skipped),
              process_state=multihost.process_state(sampler, scheduler))
    start = 1
  else:
    start = restored.step + 1
    params, opt_state = restored.params, restored.opt_state
    step = tr.counter(restored.host_state["optimizer_steps"])
    skipped = tr.counter(restored.host_state["skipped_updates"])
    own = multihost.restored_process_state(restored, ckpt.directory)
    sampler.load_state_dict(own["prompt_sampler"])
    scheduler.load_state_dict(own["scheduler"])
    moved = writer.truncate_after(restored.step)
    logging.info("Resumed from iteration %d (%d later metrics rows set aside)", restored.step,
                 moved)

  if start <= s.total_iterations:
    t = time.perf_counter()
    tr.warmup(params)
    logging.info("Compiled rollout and update programs in %.0f s", time.perf_counter() - t)
  # A bar only on a terminal: in a log file its carriage returns are noise,
  # and the line per iteration already says how far the run is.
  bar = tqdm(range(start, s.total_iterations + 1), desc="RL", unit="it", initial=start - 1,
             total=s.total_iterations, dynamic_ncols=True,
             disable=not primary or not sys.stderr.isatty())
  for it in bar:
    faults.reached("iteration", it, settle=ckpt.wait_until_finished)
    compiles = total_compiles()
    params, new_opt_state, step, skipped, row = tr.iteration(it, params, sampler, scheduler,
                                                             step, skipped)
    opt_state = opt_state if new_opt_state is None else new_opt_state
    last = it == s.total_iterations
    if it % s.eval_every == 0 or last:
      row.update(tr.evaluate(params, it))
    row["time/compiles"] = total_compiles() - compiles
    row.update(tr.task.metrics())
    writer.write(it, row)
    if finite(row, "rollout/reward_mean") is not None:
      bar.set_postfix(reward=f"{row['rollout/reward_mean']:.3f}", refresh=False)
    if it % s.checkpoint_every == 0 or last:
      ckpt.save(it, params=params, opt_state=opt_state,
                host_state=multihost.host_state(it, s, step, skipped),
                process_state=multihost.process_state(sampler, scheduler))
    if primary and (it % s.eval_every == 0 or last):
      write_plots(read_metrics(os.path.join(workdir, "metrics.jsonl")),
                  os.path.join(workdir, "plots"))
  ckpt.wait_until_finished()
  rows = []
  if primary:
    rows = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    write_plots(rows, os.path.join(workdir, "plots"))
  writer.close()
  ckpt.close()
  return rows
