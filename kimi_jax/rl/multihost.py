"""The trainer's multi-host pieces: rows per process, metrics across processes.

Every process runs the trainer. Each owns `num_slots / process_count`
rollout slots (its own `RolloutScheduler`), its shard of the train prompts
(`data.prompts.shard`: positions p with p % count == index, its own
`PromptSampler`), verifies its own groups, and supplies
`minibatch_size / process_count` rows of every minibatch. The update, the
evaluation (every process evaluates all held-out problems, identically) and
the params are global. Process 0 alone writes metrics and plots; its rows
combine every process's rollout metrics (`combine_rows`). Checkpoints hold
each process's scheduler and prompt-sampler state (`process_state`).

With one process all of this is the identity.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax

from kimi_jax import distributed, parallel
from kimi_jax.parallel import Layout
from kimi_jax.rl import settings as settings_lib
from kimi_jax.sampling.partial import SchedulerConfig

# How one metric of several processes becomes one number. Counters add up;
# these take the largest value; the rest are means weighted by what they
# average over (the default weight is 1: e.g. per-process fractions of
# equally many slots).
_SUMMED = ("slots_used", "slots_empty", "carried_in", "fresh_prompts", "prompt_source_calls",
           "prompts_rejected_overlong", "prompts_rejected_invalid", "prompts_truncated",
           "tokens_generated", "carried_over", "buffer_size", "groups_completed",
           "groups_pending", "verifier_errors", "eligible")
_SUMMED_PREFIXES = ("rollout/finish_", "rollout/age_hist_", "rollout/verifier_errors/")
_MAXED = ("rollout/decode_steps", "rollout/age_max")
_WEIGHTS = (  # (key prefix, key of its weight)
    ("rollout/reward_mean", "rollout/groups_completed"),
    ("rollout/task_reward_mean", "rollout/groups_completed"),
    ("rollout/response_tokens", "rollout/groups_completed"),
    ("sampler/success_rate_mean", "sampler/eligible"),
)


def _rule(key: str) -> str:
  if key.split("/", 1)[-1] in _SUMMED or key.startswith(_SUMMED_PREFIXES):
    return "sum"
  if key in _MAXED or key.startswith("time/"):
    return "max"  # the slowest process sets the pace
  return "mean"


def combine_rows(rows: Sequence[dict]) -> dict:
  """One metrics row from every process's row (keys a process lacks are
  combined over the processes that have them). One row: returned as is."""
  if len(rows) == 1:
    return dict(rows[0])
  out = {}
  for key in dict.fromkeys(k for r in rows for k in r):
    have = [r for r in rows if key in r]
    values = [float(r[key]) for r in have]
    rule = _rule(key)
    if rule == "sum":
      out[key] = sum(values)
    elif rule == "max":
      out[key] = max(values)
    else:
      weight_key = next((w for prefix, w in _WEIGHTS if key.startswith(prefix)), None)
      if weight_key == "rollout/groups_completed" and key.startswith("rollout/response_tokens_d"):
        weight_key = None  # per difficulty: the per-process count is not logged
      weights = [float(r.get(weight_key, 1.0)) if weight_key else 1.0 for r in have]
      total = sum(weights)
      out[key] = (sum(w * v for w, v in zip(weights, values)) / total if total > 0
                  else sum(values) / len(values))
    if all(isinstance(r[key], int) for r in have) and float(out[key]).is_integer():
      out[key] = int(out[key])
  return out


def process_rows(s: settings_lib.Settings, layout: Layout) -> SchedulerConfig:
  """This process's scheduler settings (its share of the slots), after
  checking that slots and minibatches split over the data axes and the
  processes. ConfigError names the config key and both numbers."""
  count = jax.process_count()
  for key, rows in (("rollout.num_slots", s.scheduler.num_slots),
                    ("rl.minibatch_size", s.rl.minibatch_size),
                    ("optim.microbatch_size", s.update.microbatch_size)):
    try:
      layout.check_batch(rows, f"config.{key}")
      if key != "optim.microbatch_size":  # a microbatch is global, never per process
        distributed.owned_rows(layout.batch(), rows, f"config.{key}={rows}")
    except ValueError as e:
      raise settings_lib.ConfigError(str(e)) from None
  local = s.scheduler.num_slots // count
  if local < s.scheduler.samples_per_prompt:
    raise settings_lib.ConfigError(
        f"config.rollout.num_slots={s.scheduler.num_slots} over {count} processes leaves "
        f"{local} slots per process, fewer than config.rollout.samples_per_prompt="
        f"{s.scheduler.samples_per_prompt} (a group runs in one process)")
  return dataclasses.replace(s.scheduler, num_slots=local)


def make_mesh_layouts(s: settings_lib.Settings) -> tuple[Layout, Layout]:
  """(train, sample) layouts on the mesh of `config.mesh` (ConfigError naming
  it when the sizes do not fit the devices)."""
  try:
    mesh = parallel.make_mesh(s.mesh, distributed.mesh_devices(s.mesh.sizes))
  except ValueError as e:
    raise settings_lib.ConfigError(f"config.mesh: {e} ({jax.process_count()} process(es))"
                                   ) from None
  return Layout.train(mesh, s.model), Layout.sample(mesh, s.model)


def host_state(it, s, step, skipped) -> dict:
  """Run-wide host values of a checkpoint (the same on every process)."""
  return {"iteration": it, "seed": s.seed, "optimizer_steps": int(distributed.to_local(step)),
          "skipped_updates": int(distributed.to_local(skipped))}


def process_state(sampler, scheduler) -> dict:
  """This process's host state: its prompt statistics and rollout slots."""
  return {"prompt_sampler": sampler.state_dict(), "scheduler": scheduler.state_dict()}


def restored_process_state(restored, directory: str) -> dict:
  """This process's host state from a checkpoint; ConfigError when it was
  written by another number of processes."""
  own = restored.process_state
  if own is not None:
    return own
  written = restored.host_state.get("processes")
  if written is None and jax.process_count() == 1:
    return restored.host_state  # written before per-process host state (one process)
  raise settings_lib.ConfigError(
      f"checkpoint step {restored.step} in {directory} was written by "
      f"{len(written or [])} process(es) and this run has {jax.process_count()}: resume with "
      "as many (each process's rollout slots and prompt shard are its own)")


class NullWriter:
  """MetricsWriter stand-in on processes other than 0 (they write nothing)."""

  def write(self, iteration, metrics):
    del iteration
    return metrics

  def truncate_after(self, iteration) -> int:
    del iteration
    return 0

  def close(self) -> None:
    pass
