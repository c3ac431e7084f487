"""Wall time of one k1.5 RL iteration, split into phases, after compilation.

  python -m bench.rl_iteration --json

Work (the same as shared/peers/trl_grpo_iter.py and tunix_grpo_iter.py): a
3.16M-parameter Llama (vocab 512, hidden 256, intermediate 688, 4 layers,
4 heads, 2 kv heads, untied, fp32), 16 prompts x k=8 samples x 128 new tokens
(no eos: every sample runs to full length), one optimizer step on all 128
samples. Phases: rollout (sample_segment over 128 slots), rewards (decode +
verifier + length penalty), reference log-probs (pi_theta_i), update.
Reported: median over --iterations timed iterations after one warm-up.

  python -m bench.rl_iteration --multimodal --json

times the same iteration for an image + text model (the Llama plus a
2-block SigLIP tower of width 128, one 32 x 32 image = 16 placeholder
tokens per prompt, 24-token prompts) beside the text-only model on the same 24-token
prompts, in alternating rounds of one process: what images cost an
iteration (the tower in the rollout prefill, the reference pass and the
update).
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
flags.DEFINE_bool("multimodal", False, "Time an image + text model (SigLIP tower, one 32 px image "
                  "= 16 placeholder tokens per prompt) beside the same model text-only, "
                  "alternating rounds.")
flags.DEFINE_integer("rounds", 2, "--multimodal: alternating rounds of each variant.")
flags.DEFINE_bool("json", False, "Print one JSON object as the last line.")
FLAGS = flags.FLAGS

MODEL = dict(vocab_size=512, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4,
             num_kv_heads=2, max_position_embeddings=512, tie_embeddings=False)
PROMPTS, K, NEW = 16, 8, 128


VISION = dict(image_size=32, patch_size=8, hidden_size=128, intermediate_size=512, num_layers=2,
              num_heads=4)  # 16 placeholder tokens per image
IMAGE_ID = 3


def time_iterations(cfg, prompt_bank, prompt_len, images=None):
  """Runs --iterations + 1 iterations; returns (phases, first_iteration_s,
  train tokens per sample, padding fraction). `images`: prompt index ->
  float32 [1, 32, 32, 3] for an image + text model."""
  import jax
  import numpy as np

  from kimi_jax.rl import batch as batch_lib
  from kimi_jax.rl import losses, rewards
  from kimi_jax.rl.update import (TrainState, UpdateConfig, make_optimizer, make_ref_logprobs,
                                  make_train_step, set_learning_rate)
  from kimi_jax.models.transformer import init_params
  from kimi_jax.sampling.partial import RolloutScheduler, SchedulerConfig
  from kimi_jax.sampling.repetition import RepeatConfig
  from kimi_jax.sampling.sampler import SamplingConfig
  from kimi_jax.sampling.segment import SegmentSampler

  params = init_params(cfg, jax.random.PRNGKey(0))
  # max_length = prompt + NEW: every sample runs exactly NEW tokens (max_length).
  sched_cfg = SchedulerConfig(num_slots=PROMPTS * K, samples_per_prompt=K,
                              max_length=prompt_len + NEW, max_prompt_length=prompt_len,
                              segment_budget=NEW, partial=False, max_age=0)
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
    if images is not None:
      # What the trainer does: each row's images from its prompt index.
      state = state.replace(pixels_BSYXC=np.stack([images(int(i)) for i in state.prompt_idx_B]))
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
                                     samples_per_row=FLAGS.samples_per_row,
                                     images=images, image_slots=1 if images else 0)
    t2 = time.perf_counter()
    # One minibatch: its reference log-probs come from the first step's own
    # forward pass (params are theta_i then); later minibatches need a pass.
    refs = [np.zeros_like(mbs[0]["mask_NT"])] + [
        ref_logprobs(params, mb["tokens_NT"], mb["positions_NT"], mb["segment_ids_NT"],
                     mb.get("pixels_NIYXC"), mb.get("image_prompt_NT"))
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
    print(f"{'image' if images else 'text'} iteration {it}: "
          + " ".join(f"{k}={v[-1]:.2f}" for k, v in phases.items()), flush=True)
  medians = {k: round(statistics.median(v), 3) for k, v in phases.items()}
  return medians, round(compile_s, 2), mbs[0]["tokens_NT"].shape[1], round(
      1.0 - in_samples / computed, 3)


def main(argv):
  del argv
  import numpy as np

  from kimi_jax.models.transformer import ModelConfig
  from kimi_jax.models.vision import VisionConfig

  cfg = ModelConfig(**MODEL)
  rng = np.random.default_rng(0)
  if not FLAGS.multimodal:
    prompt_bank = [rng.integers(3, 500, size=8).tolist() for _ in range(64)]
    medians, compile_s, train_len, padding = time_iterations(cfg, prompt_bank, 8)
    report = dict(bench="rl_iteration", params_millions=round(cfg.num_params() / 1e6, 3),
                  prompts=PROMPTS, k=K, new_tokens=NEW, train_tokens_per_sample=train_len,
                  microbatch=FLAGS.microbatch, decode_phases=FLAGS.decode_phases,
                  samples_per_row=FLAGS.samples_per_row, padding_fraction=padding,
                  first_iteration_s=compile_s, **medians,
                  target_total_s=4.7, peers={"trl_grpo_s": 9.4, "tunix_grpo_s": 17.5})
  else:
    # The same token counts both ways: 16 placeholders + 8 text ids per
    # prompt, which the text-only model reads as 24 ordinary ids.
    vision = VisionConfig(**VISION)
    mm_cfg = cfg.replace(vision=vision, image_token_id=IMAGE_ID)
    P = vision.tokens_per_image
    prompt_bank = [[IMAGE_ID] * P + rng.integers(4, 500, size=8).tolist() for _ in range(64)]
    pixels = rng.normal(size=(64, 1, 32, 32, 3)).astype(np.float32)
    runs = {}
    # Alternating rounds: the machine is shared and noisy.
    for r in range(FLAGS.rounds):
      for name, c, images in (("text", cfg, None), ("image", mm_cfg, lambda i: pixels[i])):
        runs.setdefault(name, []).append(time_iterations(c, prompt_bank, P + 8, images))
    pick = lambda name, key: statistics.median(x[0][key] for x in runs[name])  # noqa: E731
    report = dict(bench="rl_iteration_multimodal", rounds=FLAGS.rounds,
                  params_millions=round(cfg.num_params() / 1e6, 3),
                  vision_params_millions=round(vision.num_params(cfg.hidden_size) / 1e6, 3),
                  prompts=PROMPTS, k=K, new_tokens=NEW, prompt_tokens=P + 8, image_tokens=P,
                  microbatch=FLAGS.microbatch, decode_phases=FLAGS.decode_phases,
                  **{f"{name}_{key}": round(pick(name, key), 3) for name in runs
                     for key in ("rollout_s", "ref_logprobs_s", "update_s", "total_s")},
                  image_over_text_total=round(pick("image", "total_s") / pick("text", "total_s"),
                                              3))
  if FLAGS.json:
    print(json.dumps(report))


if __name__ == "__main__":
  app.run(main)
