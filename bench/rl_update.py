"""The main job's RL update with and without packing, alternated in one process.

  python -m bench.rl_update --json
  python -m bench.rl_update --samples_per_row=1,2,4 --rounds=9

Work: the update of one `configs/arith_tiny.py` iteration (its model, 192
samples = one minibatch of 192 rows of `rollout.max_length` = 160 tokens,
16-row microbatches, the k1.5 loss; the first step scores its own
reference, as in the trainer) on samples shaped like the main job's: prompts
of the synthetic train split (levels 1-3 of add and chain) with a response
drawn as the SFT warm-up draws them (80% long CoT), plus eos. Each round
builds a fresh iteration's groups, then times `make_minibatches` + the
train step for every `--samples_per_row` value in turn (the order rotates
each round), so machine load hits all settings alike. Reported per setting:
median seconds, padding fraction (`train/padding_fraction`: row tokens of
the computed microbatches that hold no sample), and the speed-up over the
first setting.
"""
from __future__ import annotations

import json
import statistics
import time

from absl import app, flags

flags.DEFINE_list("samples_per_row", ["1", "4"], "rl.samples_per_row values to compare.")
flags.DEFINE_integer("rounds", 7, "Timed rounds (after one compiling round).")
flags.DEFINE_bool("json", False, "Print one JSON object as the last line.")
FLAGS = flags.FLAGS

K = 8  # samples per prompt, as in the main job


def main(argv):
  del argv
  import jax
  import numpy as np
  import optax  # noqa: F401  (imported by update; keeps the import cost out of the timing)

  from configs import arith_tiny
  from kimi_jax.data import synthetic
  from kimi_jax.models.transformer import init_params
  from kimi_jax.rl import batch as batch_lib
  from kimi_jax.rl import settings
  from kimi_jax.rl.update import (TrainState, make_optimizer, make_train_step,
                                  set_learning_rate)
  from kimi_jax.sampling.finish import FinishReason
  from kimi_jax.sampling.partial import Group, Trajectory
  from kimi_jax.tokenizers import BYTE_EOS_ID, byte_encode

  s = settings.from_config(arith_tiny.get_config())
  n, T = s.rl.minibatch_size, s.scheduler.max_length
  prompts = s.scheduler.num_slots // K  # one iteration's prompts
  assert prompts * K == n, "one minibatch per iteration, as in the main job"
  train, _ = synthetic.make_splits(0, 4000, 0, difficulties=(1, 2, 3), tasks=("add", "chain"))
  rng = np.random.default_rng(0)

  def groups_of_an_iteration():
    out = []
    for g, i in enumerate(rng.choice(len(train), prompts, replace=False)):
      prompt = byte_encode(train[i].prompt)
      trajs = []
      for k in range(K):
        response = byte_encode(synthetic.sft_response(train[i], rng, long_frac=0.8))
        response = (response + [BYTE_EOS_ID])[:T - len(prompt)]
        trajs.append(Trajectory(
            prompt_idx=g, sample_idx=k, group_id=g,
            tokens=np.asarray(prompt + response, np.int32), prompt_len=len(prompt),
            logp=np.full(len(response), -1.0, np.float32),
            token_iter=np.ones(len(response), np.int32), finish=FinishReason.EOS, age=0,
            first_iteration=1, last_iteration=1))
      out.append(Group(g, g, trajs))
    return out, rng.integers(0, 2, (prompts, K)).astype(np.float32)

  optimizer = make_optimizer(s.update)
  step = make_train_step(s.model, s.loss, s.update, optimizer)
  params = init_params(s.model, jax.random.PRNGKey(0))
  settings_S = [int(x) for x in FLAGS.samples_per_row]

  def update(groups, rewards_GK, S):
    nonlocal params
    mb, = batch_lib.make_minibatches(groups, rewards_GK, minibatch_size=n, length=T,
                                     loss_segments="all", iteration=1, samples_per_row=S)
    state = TrainState(params=params, opt_state=set_learning_rate(optimizer.init(params), 0.0),
                       step=jax.numpy.zeros((), jax.numpy.int32),
                       skipped=jax.numpy.zeros((), jax.numpy.int32))
    state, metrics = step(state, batch_lib.to_batch(mb, np.zeros((n, T), np.float32)),
                          ref_is_current=True)
    params = state.params  # lr 0: the same weights every time
    metrics = jax.device_get(metrics)
    return 1.0 - metrics["train/tokens_in_samples"] / metrics["train/tokens_computed"]

  times = {S: [] for S in settings_S}
  padding = {S: [] for S in settings_S}
  sample_tokens = []
  for r in range(FLAGS.rounds + 1):
    groups, rewards_GK = groups_of_an_iteration()
    sample_tokens.append(np.mean([len(t.tokens) for g in groups for t in g.trajectories]))
    order = settings_S[r % len(settings_S):] + settings_S[:r % len(settings_S)]
    for S in order:
      t = time.perf_counter()
      pad = update(groups, rewards_GK, S)
      dt = time.perf_counter() - t
      if r:  # round 0 compiles
        times[S].append(dt)
        padding[S].append(pad)
    if r:
      print(f"round {r}: " + " ".join(f"S={S}: {times[S][-1]:.3f}s pad={padding[S][-1]:.2f}"
                                      for S in settings_S), flush=True)
  base = statistics.median(times[settings_S[0]])
  report = dict(bench="rl_update", params_millions=round(s.model.num_params() / 1e6, 3),
                samples=n, row_length=T, microbatch=s.update.microbatch_size,
                sample_tokens_mean=round(float(np.mean(sample_tokens)), 1),
                rounds=FLAGS.rounds,
                settings=[dict(samples_per_row=S, update_s=round(statistics.median(times[S]), 4),
                               padding_fraction=round(float(np.mean(padding[S])), 3),
                               speedup=round(base / statistics.median(times[S]), 2))
                          for S in settings_S])
  if FLAGS.json:
    print(json.dumps(report))


if __name__ == "__main__":
  app.run(main)
