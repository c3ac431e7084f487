"""Wall time of one k1.5 RL iteration, split into phases, after compilation.

  python -m bench.rl_iteration --json

Work (the same as shared/peers/trl_grpo_iter.py and tunix_grpo_iter.py): a
3.16M-parameter Llama (vocab 512, hidden 256, intermediate 688, 4 layers,
4 heads, 2 kv heads, untied, fp32), 16 prompts x k=8 samples x 128 new tokens
(no eos: every sample runs to full length), one optimizer step on all 128
samples. Phases: rollout (sample_segment over 128 slots), rewards (decode +
verifier + length penalty), reference log-probs (pi_theta_i), update.
Reported: median over --iterations timed iterations after one warm-up.
"""
from __future__ import annotations

import json
import statistics
import time

from absl import app, flags

flags.DEFINE_integer("iterations", 3, "Timed iterations (after one compiling iteration).")
flags.DEFINE_integer("microbatch", 8, "Samples per forward/backward pass (8: fastest of 8-128 here).")
flags.DEFINE_integer("length_multiple", 16, "Training sequence length rounding.")
flags.DEFINE_integer("decode_phases", 4, "Rollout decode over a cache grown in this many steps.")
flags.DEFINE_integer("samples_per_row", 1, "Samples packed per training row (rl.samples_per_row; "
                     "the 136-token samples here fill a row alone).")
flags.DEFINE_bool("json", False, "Print one JSON object as the last line.")
FLAGS = flags.FLAGS

MODEL = dict(vocab_size=512, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4,
             num_kv_heads=2, max_position_embeddings=512, tie_embeddings=False)
PROMPTS, K, NEW = 16, 8, 128


def main(argv):
  del argv
  import jax
  import numpy as np

  from kimi_jax.models.transformer import ModelConfig, init_params
  from kimi_jax.rl import batch as batch_lib
  from kimi_jax.rl import losses, rewards
  from kimi_jax.rl.update import (TrainState, UpdateConfig, make_optimizer, make_ref_logprobs,
                                  make_train_step, set_learning_rate)
  from kimi_jax.sampling.partial import RolloutScheduler, SchedulerConfig
  from kimi_jax.sampling.repetition import RepeatConfig
  from kimi_jax.sampling.sampler import SamplingConfig
  from kimi_jax.sampling.segment import SegmentSampler

  cfg = ModelConfig(**MODEL)
  params = init_params(cfg, jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  # 8-token prompts and max_length 136: every sample runs exactly 128 tokens (max_length).
  prompt_bank = [rng.integers(3, 500, size=8).tolist() for _ in range(64)]
  sched_cfg = SchedulerConfig(num_slots=PROMPTS * K, samples_per_prompt=K, max_length=8 + NEW,
                              max_prompt_length=8, segment_budget=NEW, partial=False, max_age=0)
  engine = SegmentSampler(cfg, SamplingConfig(temperature=1.0), RepeatConfig(), eos_id=None,
                          budget_slots=sched_cfg.max_length, min_width=8,
                          decode_phases=FLAGS.decode_phases)
  ucfg = UpdateConfig(learning_rate=1e-5, microbatch_size=FLAGS.microbatch)
  loss_cfg = losses.LossConfig()
  optimizer = make_optimizer(ucfg)
  train_step = make_train_step(cfg, loss_cfg, ucfg, optimizer)
  ref_logprobs = make_ref_logprobs(cfg, FLAGS.microbatch)
  counter = iter(range(10 ** 9))

  def source(n, iteration):
    return [(i % 64, prompt_bank[i % 64]) for i in (next(counter) for _ in range(n))]

  scheduler = RolloutScheduler(sched_cfg, source)
  # Separate buffers: the train step donates its state.
  step, skipped = jax.numpy.zeros((), jax.numpy.int32), jax.numpy.zeros((), jax.numpy.int32)
  phases = {"rollout_s": [], "rewards_s": [], "ref_logprobs_s": [], "update_s": [], "total_s": []}
  for it in range(FLAGS.iterations + 1):
    t0 = time.perf_counter()
    state = scheduler.next_state(it)
    state, steps = engine(params, state, scheduler.budget, it, jax.random.PRNGKey(it))
    groups = scheduler.absorb(state, it, steps)
    t1 = time.perf_counter()
    assert len(groups) == PROMPTS and all(t.response_len == NEW for g in groups
                                          for t in g.trajectories)
    # Toy verifier: reward 1 when the first response token is even.
    task = np.array([[float(t.response[0] % 2 == 0) for t in g.trajectories] for g in groups])
    lengths = np.array([[t.response_len for t in g.trajectories] for g in groups])
    finish = np.array([[int(t.finish) for t in g.trajectories] for g in groups])
    total = rewards.total_reward(task, lengths, finish, it,
                                 rewards.RewardConfig(truncated_reward=None))
    mbs = batch_lib.make_minibatches(groups, total, minibatch_size=PROMPTS * K,
                                     loss_segments="all", iteration=it,
                                     length_multiple=FLAGS.length_multiple,
                                     samples_per_row=FLAGS.samples_per_row)
    t2 = time.perf_counter()
    # One minibatch: its reference log-probs come from the first step's own
    # forward pass (params are theta_i then); later minibatches need a pass.
    refs = [np.zeros_like(mbs[0]["mask_NT"])] + [
        ref_logprobs(params, mb["tokens_NT"], mb["positions_NT"], mb["segment_ids_NT"])
        for mb in mbs[1:]]
    jax.block_until_ready(refs)
    t3 = time.perf_counter()
    tstate = TrainState(params=params, opt_state=set_learning_rate(optimizer.init(params), 1e-5),
                        step=step, skipped=skipped)
    computed = in_samples = 0.0
    for j, (mb, ref) in enumerate(zip(mbs, refs)):
      tstate, metrics = train_step(tstate, batch_lib.to_batch(mb, ref), ref_is_current=j == 0)
      computed += float(metrics["train/tokens_computed"])
      in_samples += float(metrics["train/tokens_in_samples"])
    jax.block_until_ready(tstate)
    params, step, skipped = tstate.params, tstate.step, tstate.skipped
    t4 = time.perf_counter()
    if it == 0:
      compile_s = t4 - t0
      continue
    for k, v in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
      phases[k].append(v)
    print(f"iteration {it}: " + " ".join(f"{k}={v[-1]:.2f}" for k, v in phases.items()),
          flush=True)
  report = dict(bench="rl_iteration", params_millions=round(cfg.num_params() / 1e6, 3),
                prompts=PROMPTS, k=K, new_tokens=NEW, train_tokens_per_sample=mbs[0]["tokens_NT"].shape[1],
                microbatch=FLAGS.microbatch, decode_phases=FLAGS.decode_phases,
                samples_per_row=FLAGS.samples_per_row,
                padding_fraction=round(1.0 - in_samples / computed, 3),
                first_iteration_s=round(compile_s, 2),
                **{k: round(statistics.median(v), 3) for k, v in phases.items()},
                target_total_s=4.7, peers={"trl_grpo_s": 9.4, "tunix_grpo_s": 17.5})
  if FLAGS.json:
    print(json.dumps(report))


if __name__ == "__main__":
  app.run(main)
