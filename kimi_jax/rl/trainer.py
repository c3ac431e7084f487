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
"""
from __future__ import annotations

import logging as std_logging
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm import tqdm

from kimi_jax.checkpointing import Checkpointer
from kimi_jax.compile_count import total_compiles
from kimi_jax.metrics import MetricsWriter, read_metrics
from kimi_jax.models import hf
from kimi_jax.models.transformer import init_params
from kimi_jax.plots import write_plots
from kimi_jax.rl import batch as batch_lib
from kimi_jax.rl import rewards as rewards_lib
from kimi_jax.rl import settings as settings_lib
from kimi_jax.rl import tasks as tasks_lib
from kimi_jax.rl.evaluation import difficulty_bucket, evaluate
from kimi_jax.rl.prompt_sampler import PromptSampler
from kimi_jax.rl.update import TrainState, make_optimizer, make_ref_logprobs, make_train_step
from kimi_jax.rl.update import set_learning_rate
from kimi_jax.sampling.partial import RolloutScheduler
from kimi_jax.sampling.segment import SegmentSampler
from kimi_jax.tokenizers import BYTE_EOS_ID, byte_decode, byte_encode

# The synthetic default is byte-level (seqio.ByteVocabulary ids).
EOS_ID = BYTE_EOS_ID
encode, decode = byte_encode, byte_decode


class _DropLibraryInfo(std_logging.Filter):
  """Keep orbax's per-save INFO chatter out of the run log (warnings pass)."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def quiet_library_logs():
  for handler in std_logging.getLogger().handlers + std_logging.getLogger("absl").handlers:
    handler.addFilter(_DropLibraryInfo())
  std_logging.getLogger("absl").addFilter(_DropLibraryInfo())


def prepare_workdir(workdir: str) -> str:
  """Create `workdir` (its parent must exist: a typo should not build a tree)."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  parent = os.path.dirname(workdir)
  if not os.path.isdir(parent):
    raise FileNotFoundError(f"--workdir {workdir}: parent directory {parent} does not exist")
  os.makedirs(workdir, exist_ok=True)
  return workdir


def warm_up(s: settings_lib.Settings, params, task: tasks_lib.Task):
  """Long-CoT SFT on verified traces of the train split (method spec §5)."""
  from kimi_jax import sft
  examples = sft.synthetic_examples(task.sft_problems, s.sft_data.n_examples, task.encode,
                                    long_frac=s.sft_data.long_frac,
                                    error_rate=s.sft_data.error_rate, seed=s.seed)
  logging.info("SFT warm-up: %d examples, %d steps", len(examples), s.sft.steps)
  params, history = sft.run_sft(s.model, params, examples, s.sft, eos_id=task.eos_id)
  return params, history


def initial_params(s: settings_lib.Settings, task: tasks_lib.Task, key):
  """Starting weights: the HF checkpoint of `s.hf_path`, else random init +
  SFT warm-up (if configured)."""
  if s.hf_path:
    t = time.perf_counter()
    cfg, params = hf.load_pretrained(s.hf_path, dtype=s.model.dtype,
                                     param_dtype=s.model.param_dtype)
    if cfg != s.model:  # settings read the same config.json: a change under our feet
      raise settings_lib.ConfigError(f"config.model.hf_path {s.hf_path}: config.json "
                                     f"changed since the run was configured")
    logging.info("Loaded %s in %.0f s", s.hf_path, time.perf_counter() - t)
    return params
  params = init_params(s.model, key)
  if s.sft_steps:
    t = time.perf_counter()
    params, _ = warm_up(s, params, task)
    logging.info("SFT warm-up done in %.0f s", time.perf_counter() - t)
  return params


class Trainer:
  """Holds the run's static pieces; `run` drives the iterations."""

  def __init__(self, s: settings_lib.Settings, workdir: str):
    self.s, self.workdir = s, workdir
    self.task = tasks_lib.make_task(s)  # reads and checks the data first: fail before work
    self.train, self.heldout = self.task.train, self.task.heldout
    self.optimizer = make_optimizer(s.update)
    self.train_step = make_train_step(s.model, s.loss, s.update, self.optimizer)
    self.ref_logprobs = make_ref_logprobs(s.model, s.update.microbatch_size)
    budget_slots = s.scheduler.max_length if not s.scheduler.partial else s.scheduler.segment_budget
    self.engine = SegmentSampler(s.model, s.sampling, s.repeat, self.task.eos_id, budget_slots,
                                 min_width=s.scheduler.max_prompt_length)
    self.base_key = jax.random.PRNGKey(s.seed)

  def new_host_state(self):
    meta = [{"id": p.id, "difficulty": p.difficulty} for p in self.train]
    sampler = PromptSampler(meta, self.s.prompts, seed=self.s.seed)
    scheduler = RolloutScheduler(self.s.scheduler, self.prompt_source(sampler))
    return sampler, scheduler

  def prompt_source(self, sampler):
    def source(n, iteration):
      return [(i, self.task.encode(self.train[i].prompt)) for i in sampler.sample(n, iteration)]
    return source

  def evaluate(self, params, iteration) -> dict:
    e = self.s.eval
    t = self.task
    kw = dict(encode=t.encode, decode=t.decode, score=t.score, eos_id=t.eos_id,
              max_new_tokens=e.max_new_tokens, verifier_workers=t.verifier_workers)
    out = evaluate(self.s.model, params, self.heldout, temperature=e.temperature,
                   samples=e.samples, seed=self.s.seed + 7919 * iteration, **kw)
    if e.greedy:
      greedy = evaluate(self.s.model, params, self.heldout, temperature=0.0, **kw)
      out["eval/greedy_accuracy"] = greedy["eval/accuracy"]
    return out

  def rewards(self, groups, iteration):
    """Final rewards [G, K] and reward metrics for completed groups."""
    records = [self.train[g.prompt_idx] for g in groups for _ in g.trajectories]
    texts = [self.task.decode(t.response) for g in groups for t in g.trajectories]
    outcome = rewards_lib.apply_verifier(self.task.score, records, texts,
                                         max_workers=self.task.verifier_workers)
    G, K = len(groups), len(groups[0].trajectories)
    task_GK = np.asarray(outcome.rewards, np.float32).reshape(G, K)
    lengths_GK = np.array([[t.response_len for t in g.trajectories] for g in groups]).reshape(G, K)
    finish_GK = np.array([[int(t.finish) for t in g.trajectories] for g in groups]).reshape(G, K)
    total_GK = rewards_lib.total_reward(task_GK, lengths_GK, finish_GK, iteration, self.s.reward)
    m = {"rollout/groups_completed": G, "rollout/reward_mean": float(total_GK.mean()),
         "rollout/task_reward_mean": float(task_GK.mean()),
         "rollout/response_tokens_mean": float(lengths_GK.mean()),
         "rollout/verifier_errors": float(sum(outcome.errors.values()))}
    # Per reason only when it happens: a rare event, and the synthetic rows stay as they were.
    for reason, count in sorted(outcome.errors.items()):
      m[f"rollout/verifier_errors/{reason}"] = float(count)
    difficulty_G = [difficulty_bucket(self.train[g.prompt_idx].difficulty) for g in groups]
    for d in sorted({d for d in difficulty_G if d is not None}):
      rows = [i for i, dg in enumerate(difficulty_G) if dg == d]
      m[f"rollout/response_tokens_d{d}"] = float(lengths_GK[rows].mean())
    return task_GK, total_GK, m

  def update(self, params, groups, total_GK, iteration, step, skipped):
    s = self.s
    mbs = batch_lib.make_minibatches(groups, total_GK, minibatch_size=s.rl.minibatch_size,
                                     length=s.scheduler.max_length,
                                     train_old_segments=s.rl.train_old_segments)
    # pi_theta_i scores every sample once, before any step of this iteration;
    # the first minibatch gets its scores inside the first step (same params).
    refs = [None] + [self.ref_logprobs(params, mb["tokens_NT"]) for mb in mbs[1:]]
    opt_state = set_learning_rate(self.optimizer.init(params), s.update.learning_rate_at(iteration))
    state = TrainState(params=params, opt_state=opt_state, step=step, skipped=skipped)
    metrics = []
    for mb, ref in zip(mbs, refs):
      first = ref is None
      ref = np.zeros_like(mb["mask_NT"]) if first else ref
      state, m = self.train_step(state, batch_lib.to_batch(mb, ref), ref_is_current=first)
      metrics.append(m)
    out = {}
    if metrics:
      for key in metrics[0]:
        out[key] = float(np.mean([float(m[key]) for m in metrics]))
    out["train/steps"] = len(metrics)
    out["train/skipped_total"] = int(state.skipped)
    return state, out

  def warmup_update(self, params):
    """Compile the update's programs now (fixed shapes), not mid-run."""
    s = self.s
    N, T = s.rl.minibatch_size, s.scheduler.max_length
    tokens = np.zeros((N, T), np.int32)
    ref = self.ref_logprobs(params, tokens)
    mb = dict(tokens_NT=tokens, mask_NT=np.zeros((N, T), np.float32),
              rewards_N=np.zeros(N, np.float32), baseline_N=np.zeros(N, np.float32),
              advantages_N=np.zeros(N, np.float32), sample_mask_N=np.zeros(N, np.float32))
    for first in (True, False):
      state = TrainState(params=jax.tree.map(jnp.copy, params),
                         opt_state=set_learning_rate(self.optimizer.init(params), 0.0),
                         step=jnp.zeros((), jnp.int32), skipped=jnp.zeros((), jnp.int32))
      jax.block_until_ready(self.train_step(state, batch_lib.to_batch(mb, ref), ref_is_current=first))

  def iteration(self, it, params, opt_state, sampler, scheduler, step, skipped):
    t0 = time.perf_counter()
    key = jax.random.fold_in(self.base_key, it)
    state = scheduler.next_state(it)
    state, steps = self.engine(params, state, scheduler.budget, it, key)
    groups = scheduler.absorb(state, it, steps)
    t_rollout = time.perf_counter()
    row = dict(scheduler.metrics())
    row["train/loss"] = float("nan")
    if groups:
      task_GK, total_GK, m = self.rewards(groups, it)
      row.update(m)
      sampler.update_groups([g.prompt_idx for g in groups], task_GK)
      t_reward = time.perf_counter()
      tstate, m = self.update(params, groups, total_GK, it, step, skipped)
      params, opt_state, step, skipped = tstate.params, tstate.opt_state, tstate.step, tstate.skipped
      row.update(m)
    else:
      t_reward = time.perf_counter()
    row.update(sampler.metrics(it))
    t_end = time.perf_counter()
    row.update({"time/rollout_s": t_rollout - t0, "time/reward_s": t_reward - t_rollout,
                "time/update_s": t_end - t_reward})
    return params, opt_state, step, skipped, row


def _host_state(it, sampler, scheduler, s, step=0, skipped=0):
  return {"iteration": it, "seed": s.seed, "prompt_sampler": sampler.state_dict(),
          "scheduler": scheduler.state_dict(), "optimizer_steps": int(step),
          "skipped_updates": int(skipped)}


def run(config, workdir: str) -> list[dict]:
  """Run (or resume) the main job in `workdir`; returns the metrics rows."""
  s = settings_lib.from_config(config)
  workdir = prepare_workdir(workdir)
  quiet_library_logs()
  logging.info("kimi_jax RL: %s, %.2fM params, workdir %s", s.model.family,
               s.model.num_params() / 1e6, workdir)
  tr = Trainer(s, workdir)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=s.keep_checkpoints)
  writer = MetricsWriter(workdir)
  params_like = jax.eval_shape(lambda: init_params(s.model, jax.random.PRNGKey(0)))
  opt_like = jax.eval_shape(tr.optimizer.init, params_like)
  sampler, scheduler = tr.new_host_state()
  restored = ckpt.restore_or_none(params_like=params_like, opt_state_like=opt_like)
  step = jnp.zeros((), jnp.int32)
  skipped = jnp.zeros((), jnp.int32)
  if restored is None:
    writer.truncate_after(-1)
    params = initial_params(s, tr.task, tr.base_key)
    opt_state = tr.optimizer.init(params)
    row = tr.evaluate(params, 0)
    writer.write(0, {"train/loss": float("nan"), "rollout/reward_mean": float("nan"),
                     "rollout/response_tokens_mean": float("nan"), **row,
                     **tr.task.metrics()})
    ckpt.save(0, params=params, opt_state=opt_state, host_state=_host_state(0, sampler, scheduler, s))
    start = 1
  else:
    start = restored.step + 1
    params, opt_state = restored.params, restored.opt_state
    step = jnp.asarray(restored.host_state["optimizer_steps"], jnp.int32)
    skipped = jnp.asarray(restored.host_state["skipped_updates"], jnp.int32)
    sampler.load_state_dict(restored.host_state["prompt_sampler"])
    scheduler.load_state_dict(restored.host_state["scheduler"])
    moved = writer.truncate_after(restored.step)
    logging.info("Resumed from iteration %d (%d later metrics rows set aside)", restored.step, moved)

  if start <= s.total_iterations:
    t = time.perf_counter()
    tr.engine.warmup(params, s.scheduler.num_slots, s.scheduler.max_length)
    tr.warmup_update(params)
    logging.info("Compiled rollout and update programs in %.0f s", time.perf_counter() - t)
  bar = tqdm(range(start, s.total_iterations + 1), desc="RL", unit="it", initial=start - 1,
             total=s.total_iterations, dynamic_ncols=True)
  for it in bar:
    compiles = total_compiles()
    params, opt_state, step, skipped, row = tr.iteration(it, params, opt_state, sampler,
                                                         scheduler, step, skipped)
    last = it == s.total_iterations
    if it % s.eval_every == 0 or last:
      row.update(tr.evaluate(params, it))
    row["time/compiles"] = total_compiles() - compiles
    row.update(tr.task.metrics())
    writer.write(it, row)
    bar.set_postfix(reward=f"{row.get('rollout/reward_mean', float('nan')):.3f}",
                    acc=f"{row.get('eval/accuracy', float('nan')):.3f}")
    if it % s.checkpoint_every == 0 or last:
      ckpt.save(it, params=params, opt_state=opt_state,
                host_state=_host_state(it, sampler, scheduler, s, step, skipped))
    if it % s.eval_every == 0 or last:
      write_plots(read_metrics(os.path.join(workdir, "metrics.jsonl")),
                  os.path.join(workdir, "plots"))
  ckpt.wait_until_finished()
  rows = read_metrics(os.path.join(workdir, "metrics.jsonl"))
  write_plots(rows, os.path.join(workdir, "plots"))
  writer.close()
  ckpt.close()
  return rows
