"""Partial rollouts vs synchronous rollouts on a heavy-tailed length distribution.

  python -m bench.partial_rollouts --json

Work: a "counter" model whose greedy continuation of token s is s+1, s+2, ...
(attention and MLP outputs zeroed, so the residual stream is the token
embedding; a factored one-hot embedding, token t = 33a + b -> e_a + e_{33+b},
and a head that scores t+1 from (a, b), so hidden is 66 instead of the vocab).
The eos id E is the last vocab id, so a prompt ending in s gets exactly
E - s response tokens: the prompt encodes its target length. Targets are
drawn per prompt from a lognormal (median --median, sigma --sigma) clipped to
[--min_target, --max_target], stratified in blocks of --block prompts whose
--long_per_block longest get --max_target (= 16x the median; see
`draw_targets`). k samples per prompt (greedy, so the k
samples of a prompt have the same length), B slots.

Both modes run the same prompt stream with `RolloutScheduler` +
`SegmentSampler` until --trajectories trajectories have completed (complete
groups of k), after `SegmentSampler.warmup` compiled every width (compile time
excluded; recompiles during the timed runs are counted and must be 0):
  sync:    partial=False, budget = max_length: an iteration ends when its
           longest row ends.
  partial: partial=True, budget = --budget tokens per row per iteration,
           unfinished rows carried over (max_age large enough that nothing
           is cut).
Reported per mode: wall time, completed trajectories/s (and completed
response tokens/s), useful-token fraction (tokens generated / (decode steps x
B), over the whole run), generated tokens/s, iterations, ages of completed
trajectories; plus the partial/sync ratios of trajectories/s and of
generated tokens/s. The second is the steady-state one: from a cold start,
partial mode completes short trajectories first and still holds long ones
when the run stops, which flatters its trajectories/s over a short window.

The prefill/decode split of partial segments: every carried row is
re-prefilled each segment (weights change between RL iterations). A sample
of the partial run's segments is re-timed with budget 1 (= prefill + one
step) and with the full budget, both with grouped prefill (rows re-prefilled
--prefill_rows at a time at the width they need, the default) and with one
whole-batch prefill at the widest row's width (prefill_rows=0, the previous
behaviour). --whole_prefill_run also times a full partial run that way.
"""
from __future__ import annotations

import json
import os
import statistics
import time

from absl import app, flags

flags.DEFINE_integer("num_slots", 64, "B: rows decoded together.")
flags.DEFINE_integer("k", 4, "Samples per prompt.")
flags.DEFINE_integer("trajectories", 1024, "Completed trajectories per timed run.")
flags.DEFINE_integer("budget", 16, "Partial mode: new tokens per row per iteration.")
flags.DEFINE_list("extra_budgets", [], "More partial-mode budgets to run (reported in a sweep).")
flags.DEFINE_integer("max_age", 0, "Partial mode max_age; 0 = ceil(max_target / budget), "
                     "so that nothing is cut.")
flags.DEFINE_float("median", 64.0, "Median target response length.")
flags.DEFINE_float("sigma", 1.0, "Lognormal sigma of the target length.")
flags.DEFINE_integer("min_target", 8, "Shortest target response length.")
flags.DEFINE_integer("max_target", 1024, "Longest target response length.")
flags.DEFINE_integer("block", 128, "Prompts per stratified block of target lengths.")
flags.DEFINE_integer("long_per_block", 2, "Longest targets of each block raised to max_target.")
flags.DEFINE_integer("prompt_len", 4, "Prompt tokens.")
flags.DEFINE_integer("layers", 2, "Counter model layers.")
flags.DEFINE_integer("prefill_rows", 4, "SegmentSampler.prefill_rows for the timed runs.")
flags.DEFINE_integer("split_samples", 6, "Partial segments re-timed for the prefill/decode "
                     "split (0 = skip).")
flags.DEFINE_bool("whole_prefill_run", False, "Also time a partial run with prefill_rows=0.")
flags.DEFINE_bool("skip_sync", False, "Skip the synchronous run (no ratio then).")
flags.DEFINE_integer("seed", 0, "Target-length seed.")
flags.DEFINE_bool("json", False, "Print one JSON object as the last line.")
FLAGS = flags.FLAGS

BASE = 33  # token t = BASE * a + b, a and b < BASE


def counter_model(vocab: int, layers: int):
  """(cfg, params) of a model whose greedy next token is (t + 1) % vocab."""
  import jax
  import numpy as np

  from kimi_jax.models.transformer import ModelConfig, init_params
  assert BASE * BASE >= vocab
  D = 2 * BASE
  cfg = ModelConfig(vocab_size=vocab, hidden_size=D, intermediate_size=32, num_layers=layers,
                    num_heads=2, num_kv_heads=1, head_dim=32, max_position_embeddings=4096)
  p = jax.tree.map(np.asarray, init_params(cfg, jax.random.PRNGKey(0)))
  embed = np.zeros((vocab, D), np.float32)
  head = np.zeros((D, vocab), np.float32)
  for t in range(vocab):
    a, b = divmod(t, BASE)
    embed[t, a] = embed[t, BASE + b] = 1.0
    head[a, (t + 1) % vocab] = head[BASE + b, (t + 1) % vocab] = 10.0
  p = dict(p, embed=embed, lm_head=head)
  for i in range(layers):  # the residual stream stays the embedding
    layer = p[f"layers_{i}"] = {k: dict(v) if isinstance(v, dict) else v
                                for k, v in p[f"layers_{i}"].items()}
    layer["attn"]["o"] = np.zeros_like(layer["attn"]["o"])
    layer["mlp"]["down"] = np.zeros_like(layer["mlp"]["down"])
  return cfg, p


def draw_targets(n: int):
  """Target response length of prompt i, for i < n.

  Stratified lognormal: each block of --block prompts holds the quantiles
  (j + 0.5) / block, j < block, of lognormal(median, sigma), rounded and
  clipped to [min_target, max_target], the --long_per_block largest raised
  to max_target, in a seeded random order. So every block has the stated
  median and a max of max_target, with no sampling luck in either.
  """
  import statistics as st

  import numpy as np
  m = FLAGS.block
  z = np.asarray([st.NormalDist().inv_cdf((j + 0.5) / m) for j in range(m)])
  base = np.clip(np.round(FLAGS.median * np.exp(FLAGS.sigma * z)), FLAGS.min_target,
                 FLAGS.max_target).astype(np.int64)
  if FLAGS.long_per_block:
    base[-FLAGS.long_per_block:] = FLAGS.max_target
  rng = np.random.default_rng(FLAGS.seed)
  return np.concatenate([rng.permutation(base) for _ in range(-(-n // m))])[:n]


def load() -> str:
  """The 1/5/15-minute load averages (the machine is shared)."""
  try:
    return " ".join(open("/proc/loadavg").read().split()[:3])
  except OSError:
    return "?"


def run_mode(engine, params, sched_cfg, targets, eos, keys, record=None):
  """Runs until FLAGS.trajectories trajectories completed; returns stats."""
  import numpy as np

  from kimi_jax.compile_count import CompileCounter
  from kimi_jax.sampling.finish import FinishReason
  from kimi_jax.sampling.partial import RolloutScheduler

  P = FLAGS.prompt_len
  counter = [0]

  def source(n, iteration):
    out = []
    for _ in range(n):
      i = counter[0]
      counter[0] += 1
      s = eos - int(targets[i])
      out.append((i, list(range(s - P + 1, s + 1))))
    return out

  sched = RolloutScheduler(sched_cfg, source)
  B = sched_cfg.num_slots
  done, it, widths, seg_s, trajs = 0, 0, [], [], []
  with CompileCounter() as cc:
    t0 = time.perf_counter()
    while done < FLAGS.trajectories:
      ts = time.perf_counter()
      state = sched.next_state(it)
      if record is not None:
        record.append(state)
      widths.append(engine.width_for(state))
      state, steps = engine(params, state, sched.budget, it, keys[it])
      groups = sched.absorb(state, it, steps)
      seg_s.append(time.perf_counter() - ts)
      for g in groups:
        trajs.extend(g.trajectories)
      done += sum(len(g.trajectories) for g in groups)
      it += 1
    wall = time.perf_counter() - t0
  tot = sched.state_dict()["totals"]
  for t in trajs:  # the counter model is exact: every trajectory hits its target
    assert t.finish == FinishReason.EOS and t.response_len == targets[t.prompt_idx], (
        t.finish, t.response_len, targets[t.prompt_idx])
  ages = np.asarray([t.age for t in trajs])
  carried = ages[ages > 0]
  resp = np.asarray([t.response_len for t in trajs])
  return dict(
      wall_s=round(wall, 3), iterations=it, trajectories=len(trajs),
      trajectories_per_s=round(len(trajs) / wall, 3),
      completed_response_tokens_per_s=round(float(resp.sum()) / wall, 1),
      completed_response_len_mean=round(float(resp.mean()), 1),
      completed_response_len_max=int(resp.max()),
      generated_tokens_per_s=round(tot["tokens_generated"] / wall, 1),
      useful_token_fraction=round(tot["tokens_generated"] / max(tot["slot_steps"], 1), 4),
      tokens_generated=tot["tokens_generated"], decode_slot_steps=tot["slot_steps"],
      decode_steps=tot["slot_steps"] // B, prompts_started=counter[0],
      age_mean=round(float(ages.mean()), 3), age_max=int(ages.max()),
      carried_trajectories=int(carried.size),
      carried_age_mean=round(float(carried.mean()), 3) if carried.size else 0.0,
      buffer_left=sched.buffer_size,
      segment_s_mean=round(statistics.mean(seg_s), 4), segment_s_max=round(max(seg_s), 3),
      width_hist={str(w): widths.count(w) for w in sorted(set(widths))},
      recompiles=cc.count, load_after=load())


def time_split(engine, params, state, budget, key, repeats=3):
  """(budget-1 seconds, full-budget seconds) of one segment: best of `repeats`,
  the two calls interleaved so that load changes hit both alike."""
  engine(params, state, 1, 0, key)  # compiles if this width is new
  engine(params, state, budget, 0, key)
  one, full = float("inf"), float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    engine(params, state, 1, 0, key)
    one = min(one, time.perf_counter() - t)
    t = time.perf_counter()
    engine(params, state, budget, 0, key)
    full = min(full, time.perf_counter() - t)
  return one, full


def main(argv):
  del argv
  import dataclasses

  import jax
  import numpy as np

  from kimi_jax.sampling.partial import SchedulerConfig
  from kimi_jax.sampling.repetition import RepeatConfig
  from kimi_jax.sampling.sampler import SamplingConfig
  from kimi_jax.sampling.segment import SegmentSampler

  B, k, P = FLAGS.num_slots, FLAGS.k, FLAGS.prompt_len
  eos = FLAGS.max_target + P + 3  # the first prompt token is >= eos - max_target - P + 1 >= 4
  vocab = eos + 1
  L = P + FLAGS.max_target + 4
  cfg, params = counter_model(vocab, FLAGS.layers)
  targets = draw_targets(100_000)
  keys = np.asarray(jax.random.split(jax.random.PRNGKey(1), 100_000))
  min_width = 16
  print(f"load {load()} nproc {os.cpu_count()}", flush=True)

  def engine_for(budget_slots, prefill_rows):
    return SegmentSampler(cfg, SamplingConfig(), RepeatConfig(), eos_id=eos,
                          budget_slots=budget_slots, min_width=min_width,
                          prefill_rows=prefill_rows)

  def warm(engine):
    t = time.perf_counter()
    engine.warmup(params, B, L)
    return round(time.perf_counter() - t, 1)

  report = dict(
      bench="partial_rollouts", backend=jax.default_backend(), cpu_count=os.cpu_count(),
      load_start=load(),
      model=dict(kind="counter (greedy next token = t+1; eos after target tokens)",
                 vocab=vocab, hidden=cfg.hidden_size, layers=cfg.num_layers,
                 heads=cfg.num_heads, kv_heads=cfg.num_kv_heads, head_dim=cfg.head_size,
                 intermediate=cfg.intermediate_size, params=cfg.num_params()),
      slots=B, k=k, prompt_len=P, max_length=L, trajectories_target=FLAGS.trajectories,
      sampling="greedy", prefill_rows=FLAGS.prefill_rows)
  block = targets[:FLAGS.block]
  report["targets"] = dict(
      distribution=f"stratified lognormal(median={FLAGS.median}, sigma={FLAGS.sigma}), clipped "
      f"to [{FLAGS.min_target}, {FLAGS.max_target}], {FLAGS.long_per_block} per "
      f"{FLAGS.block} prompts = {FLAGS.max_target}",
      block_median=float(np.median(block)), block_mean=round(float(block.mean()), 1),
      block_p90=float(np.percentile(block, 90)), block_max=int(block.max()),
      max_over_median=round(float(block.max() / np.median(block)), 2))

  def sched_cfg(partial, budget):
    max_age = FLAGS.max_age or -(-FLAGS.max_target // budget)
    return SchedulerConfig(num_slots=B, samples_per_prompt=k, max_length=L,
                           max_prompt_length=P, segment_budget=budget, partial=partial,
                           max_age=max_age)

  if not FLAGS.skip_sync:
    sync_engine = engine_for(L, FLAGS.prefill_rows)
    c = warm(sync_engine)
    print(f"sync warmup {c}s", flush=True)
    report["sync"] = dict(budget=L, compile_s=c, **run_mode(
        sync_engine, params, sched_cfg(False, L), targets, eos, keys))
    print("sync", report["sync"], flush=True)

  def partial_run(budget, prefill_rows, record=None):
    engine = engine_for(budget, prefill_rows)
    c = warm(engine)
    scfg = sched_cfg(True, budget)
    out = dict(budget=budget, max_age=scfg.max_age, prefill_rows=prefill_rows, compile_s=c,
               **run_mode(engine, params, scfg, targets, eos, keys, record))
    if "sync" in report:
      out["speedup_vs_sync"] = round(out["trajectories_per_s"]
                                     / report["sync"]["trajectories_per_s"], 3)
      out["generated_tokens_speedup_vs_sync"] = round(
          out["generated_tokens_per_s"] / report["sync"]["generated_tokens_per_s"], 3)
    print("partial", out, flush=True)
    return engine, out

  states = []
  engine, report["partial"] = partial_run(FLAGS.budget, FLAGS.prefill_rows, states)
  if "sync" in report:
    report["speedup_trajectories_per_s"] = report["partial"]["speedup_vs_sync"]
    # Partial mode finishes short trajectories first and still holds long ones
    # at the end, so a fixed-N window flatters it; generated tokens/s counts
    # all work done (nothing is cut: max_age covers max_target), the
    # steady-state trajectory rate is proportional to it.
    report["speedup_generated_tokens_per_s"] = report["partial"][
        "generated_tokens_speedup_vs_sync"]

  if FLAGS.split_samples:
    # Re-time a spread of the partial run's segments (widest ones included).
    order = sorted(range(len(states)), key=lambda i: engine.width_for(states[i]))
    pick = sorted({order[round(j * (len(order) - 1) / max(FLAGS.split_samples - 1, 1))]
                   for j in range(FLAGS.split_samples)})
    whole = dataclasses.replace(engine, prefill_rows=0)
    split = dict(segments=pick, widths=[engine.width_for(states[i]) for i in pick],
                 note=f"prefill_s: one segment with budget 1; decode_s: budget {FLAGS.budget} minus "
                 f"budget 1 ({FLAGS.budget - 1} decode steps); best of 3 each, interleaved")
    for name, eng in (("grouped", engine), ("whole", whole)):
      one, full = zip(*(time_split(eng, params, states[i], FLAGS.budget, keys[i]) for i in pick))
      # budget 1 = prefill + the first token; the rest is budget - 1 decode steps.
      split[name] = dict(prefill_s=[round(x, 4) for x in one],
                         decode_s=[round(f - o, 4) for f, o in zip(full, one)],
                         prefill_s_mean=round(statistics.mean(one), 4),
                         decode_s_mean=round(statistics.mean(full) - statistics.mean(one), 4))
      print("split", name, split[name], flush=True)
    split["load_after"] = load()
    report["prefill_decode_split"] = split

  if FLAGS.whole_prefill_run:
    _, report["partial_whole_prefill"] = partial_run(FLAGS.budget, 0)
  sweep = []
  for b in map(int, FLAGS.extra_budgets):
    _, out = partial_run(b, FLAGS.prefill_rows)
    sweep.append(out)
  if sweep:
    report["partial_budget_sweep"] = sweep

  p = report["partial"]
  report["targets_met"] = dict(
      useful_token_fraction_ge_0_90=p["useful_token_fraction"] >= 0.90,
      speedup_ge_2x=report.get("speedup_trajectories_per_s", 0.0) >= 2.0,
      generated_tokens_speedup_ge_2x=report.get("speedup_generated_tokens_per_s", 0.0) >= 2.0,
      no_recompiles=all(r.get("recompiles", 0) == 0 for r in
                        [report.get("sync", {}), p, report.get("partial_whole_prefill", {})]
                        + sweep))
  report["load_end"] = load()
  if FLAGS.json:
    print(json.dumps(report))


if __name__ == "__main__":
  app.run(main)
