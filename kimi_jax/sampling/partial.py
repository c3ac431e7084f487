"""Partial rollouts on the host: slot filling, replay buffer, group completion.

Axis legend: B slots, L max total length (prompt + response), k samples per
prompt.

Report §2.6.1-2.6.2 and implementation note 7 of the method spec. One RL
iteration runs

    state = scheduler.next_state(it)             # fill the B slots
    state, steps = sample_segment(params, state, scheduler.budget, it, ...)
    groups = scheduler.absorb(state, it, steps)  # finished groups -> rewards

`next_state` fills slots with the trajectories carried over in the replay
buffer first (oldest first: by first iteration, then group id, then sample
index), then with fresh prompts from `prompt_source`, k slots per prompt. A
prompt is admitted only while k free slots remain, so the k samples of a group
all start in the same iteration (under the same weights) and `B mod k` slots
may stay empty. Carried rows get `finish == RUNNING` again; the device
re-prefills them under the current weights.

`absorb` reads the rows after the segment. A row that stopped with BUDGET is
put back into the replay buffer with its age (the number of times it has been
carried over, i.e. segments spanned - 1) increased by one; if that would exceed
`max_age` it is finished as MAX_AGE instead, so every trajectory spans at most
`max_age + 1` segments and every group completes after at most that many
iterations. Rows with a final reason (EOS, MAX_LENGTH, REPEAT) are attached to
their group; a group is returned once all its k samples are final (its
baseline, the mean reward of the k samples, needs them all).

`partial=False` gives classic synchronous rollouts for comparison: `budget`
is `max_length`, so every row runs to a final reason within the iteration and
nothing is carried over. If the device is nevertheless given a smaller budget
the BUDGET rows are final (scored as truncated, see `finish.TRUNCATED`).

Prompts longer than `max_prompt_length` are rejected (the source is asked for
replacements, at most `max_prompt_retries` more calls per iteration, after
which slots stay empty) or truncated, by the explicit `overlong_prompt`
choice. Malformed prompts (empty, not 1-D integer ids, negative ids or
prompt index) are always rejected. Both are counted; neither raises.

The scheduler draws no random numbers: given the same prompt source outputs
(e.g. a seeded `PromptSampler`) and the same segment results, it is
deterministic. Between iterations (after `absorb`, before `next_state`) its
whole state round-trips through `state_dict()` / `load_state_dict()` as
JSON-able Python values. Its settings are `scheduler_config.SchedulerConfig`;
what it returns, `trajectory.Trajectory` / `Group` (both re-exported here).
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any, Mapping, Optional

import numpy as np

from kimi_jax.sampling.finish import FINAL, FinishReason
from kimi_jax.sampling.scheduler_config import (  # noqa: F401  (re-exported)
    OVERLONG, PromptSource, SchedulerConfig)
from kimi_jax.sampling.state import RolloutState
from kimi_jax.sampling.trajectory import Group, Trajectory  # noqa: F401  (re-exported)

_FORMAT = "kimi_jax.RolloutScheduler/1"
_INT32_MAX = np.iinfo(np.int32).max


@dataclasses.dataclass
class _Pending:
  """A group with some samples still running or in the buffer."""
  prompt_idx: int
  k: int
  done: dict  # sample_idx -> final Trajectory


@dataclasses.dataclass(frozen=True)
class _Slot:
  """What the scheduler put into one slot (kept while the segment runs)."""
  group_id: int
  prompt_idx: int
  sample_idx: int
  prompt_len: int
  age: int
  first_iteration: int
  length: int  # row length when issued


class RolloutScheduler:
  """Host-side scheduler of partial (or synchronous) rollouts.

  prompt_source: `(n_prompts, iteration) -> [(prompt_idx, token_ids), ...]`
    with at most n_prompts items (fewer = source exhausted for now).
  """

  def __init__(self, config: SchedulerConfig, prompt_source: PromptSource):
    if not isinstance(config, SchedulerConfig):
      raise ValueError(f"config must be a SchedulerConfig, got "
                       f"{type(config).__name__}")
    self.config = config
    self._source = prompt_source
    self._buffer: list[Trajectory] = []
    self._pending: dict[int, _Pending] = {}
    self._next_group_id = 0
    self._totals = {"iterations": 0, "tokens_generated": 0, "slot_steps": 0,
                    "groups_completed": 0}
    self._metrics: dict[str, float] = {}
    self._in_flight: Optional[tuple[int, list, dict]] = None

  @property
  def budget(self) -> int:
    """New tokens per row for this iteration's segment."""
    cfg = self.config
    return cfg.segment_budget if cfg.partial else cfg.max_length

  @property
  def buffer_size(self) -> int:
    return len(self._buffer)

  @property
  def num_pending_groups(self) -> int:
    return len(self._pending)

  def metrics(self) -> dict[str, float]:
    """Counters of the last absorbed iteration ({} before the first).

    Flat `rollout/...` keys, all floats:
      slots_used, slots_empty: B = used + empty; carried_in (slots filled from
        the buffer), fresh_prompts (groups admitted), prompt_source_calls.
      prompts_rejected_overlong, prompts_rejected_invalid, prompts_truncated.
      tokens_generated (new tokens of all rows), decode_steps, and
        useful_token_fraction = tokens_generated / (decode_steps * B);
        cumulative_useful_token_fraction over all iterations so far.
      finish_{eos,budget,max_length,repeat,max_age}: how each row of this
        iteration stopped (finish_budget includes the rows carried over).
      carried_over: rows saved to the buffer for the next iteration;
        buffer_size, groups_completed, groups_pending.
      age_mean, age_max, age_hist_{a} (a = 0..max_age, always present): ages
        of the trajectories that became final this iteration.
    """
    return dict(self._metrics)

  # ------------------------------------------------------------ slot filling

  def next_state(self, iteration: int) -> RolloutState:
    """The B slots for `iteration`: carried-over rows, then fresh groups."""
    if self._in_flight is not None:
      raise RuntimeError(f"next_state({iteration}): iteration "
                         f"{self._in_flight[0]} was not absorbed yet")
    cfg = self.config
    B, k = cfg.num_slots, cfg.samples_per_prompt
    s = RolloutState.empty(B, cfg.max_length)
    slots: list[Optional[_Slot]] = [None] * B

    def put(b, tokens, prompt_len, prompt_idx, sample_idx, logp=None,
            token_iter=None):
      n = len(tokens)
      s.tokens_BL[b, :n] = tokens
      if logp is not None:
        s.logp_BL[b, prompt_len:n] = logp
        s.token_iter_BL[b, prompt_len:n] = token_iter
      s.length_B[b], s.prompt_len_B[b] = n, prompt_len
      s.active_B[b] = True
      s.prompt_idx_B[b], s.sample_idx_B[b] = prompt_idx, sample_idx

    carried = sorted(self._buffer, key=lambda t: (t.first_iteration,
                                                  t.group_id, t.sample_idx))
    used = min(len(carried), B)  # < len(carried) only if restored into fewer slots
    prompts, counts = self._draw_prompts((B - used) // k, iteration)
    self._buffer = carried[used:]
    for b, t in enumerate(carried[:used]):
      put(b, t.tokens, t.prompt_len, t.prompt_idx, t.sample_idx, t.logp,
          t.token_iter)
      slots[b] = _Slot(t.group_id, t.prompt_idx, t.sample_idx, t.prompt_len,
                       t.age, t.first_iteration, len(t.tokens))
    for prompt_idx, tokens in prompts:
      gid = self._next_group_id
      self._next_group_id += 1
      self._pending[gid] = _Pending(prompt_idx, k, {})
      for j in range(k):
        put(used, tokens, len(tokens), prompt_idx, j)
        slots[used] = _Slot(gid, prompt_idx, j, len(tokens), 0, iteration,
                            len(tokens))
        used += 1
    counts.update(carried_in=len(carried) - len(self._buffer),
                  fresh_prompts=len(prompts))
    self._in_flight = (iteration, slots, counts)
    return s

  def _draw_prompts(self, n: int, iteration: int):
    """Up to n valid prompts from the source, with bounded retries."""
    cfg = self.config
    counts = {"prompts_rejected_overlong": 0, "prompts_rejected_invalid": 0,
              "prompts_truncated": 0, "prompt_source_calls": 0}
    out = []
    while len(out) < n and counts["prompt_source_calls"] <= cfg.max_prompt_retries:
      need = n - len(out)
      got = list(self._source(need, iteration))
      counts["prompt_source_calls"] += 1
      if len(got) > need:
        raise ValueError(f"prompt_source returned {len(got)} prompts, asked "
                         f"for {need}")
      if not got:
        break  # exhausted for this iteration
      for item in got:
        prompt = _parse_prompt(item)
        if prompt is None:
          counts["prompts_rejected_invalid"] += 1
          continue
        idx, tokens = prompt
        if len(tokens) > cfg.max_prompt_length:
          if cfg.overlong_prompt == "reject":
            counts["prompts_rejected_overlong"] += 1
            continue
          counts["prompts_truncated"] += 1
          m = cfg.max_prompt_length
          tokens = tokens[-m:] if cfg.overlong_prompt == "truncate_left" else tokens[:m]
        out.append((idx, tokens))
    return out, counts

  # ---------------------------------------------------------------- absorb

  def absorb(self, state: RolloutState, iteration: int, steps: int) -> list[Group]:
    """Reads the rows after the segment; returns the groups now complete.

    state: the segment's output (numpy or jax arrays) for the state
      `next_state(iteration)` issued.
    steps: decode steps the segment loop ran (slot-steps = steps * B).
    """
    if self._in_flight is None:
      raise RuntimeError(f"absorb({iteration}): no next_state was issued")
    issued_iter, slots, counts = self._in_flight
    if iteration != issued_iter:
      raise ValueError(f"absorb: iteration {iteration} != {issued_iter}, the "
                       "iteration of the last next_state")
    steps = operator.index(np.asarray(steps).item())
    if steps < 0:
      raise ValueError(f"absorb: steps must be >= 0, got {steps}")
    cfg = self.config
    B, L = cfg.num_slots, cfg.max_length
    s = state.to_numpy()
    if s.tokens_BL.shape != (B, L):
      raise ValueError(f"absorb: state has shape {s.tokens_BL.shape}, "
                       f"expected ({B}, {L})")

    # Check and read every row before changing anything, so a bad state
    # raises without losing the scheduler's own state.
    rows = []
    for b, slot in enumerate(slots):
      if slot is None:
        continue
      length, prompt_len = int(s.length_B[b]), slot.prompt_len
      issued = (slot.prompt_idx, slot.sample_idx, prompt_len)
      got = (int(s.prompt_idx_B[b]), int(s.sample_idx_B[b]),
             int(s.prompt_len_B[b]))
      if got != issued or not s.active_B[b]:
        raise ValueError(f"absorb: slot {b} holds (prompt_idx, sample_idx, "
                         f"prompt_len) {got}, active={bool(s.active_B[b])}; "
                         f"next_state issued {issued}, active")
      if not slot.length <= length <= L:
        raise ValueError(f"absorb: slot {b} length {length} outside "
                         f"[{slot.length}, {L}]")
      rows.append((slot, Trajectory(
          prompt_idx=slot.prompt_idx, sample_idx=slot.sample_idx,
          group_id=slot.group_id, tokens=s.tokens_BL[b, :length].copy(),
          prompt_len=prompt_len, logp=s.logp_BL[b, prompt_len:length].copy(),
          token_iter=s.token_iter_BL[b, prompt_len:length].copy(),
          finish=FinishReason(int(s.finish_B[b])), age=slot.age,
          first_iteration=slot.first_iteration, last_iteration=iteration)))

    tokens_generated, final, carried, completed = 0, [], 0, []
    for slot, t in rows:
      length = len(t.tokens)
      tokens_generated += length - slot.length
      if t.finish not in FINAL:  # BUDGET (or RUNNING: treated the same)
        if not cfg.partial:
          reason = FinishReason.BUDGET  # final, scored as truncated
        elif length >= L:
          reason = FinishReason.MAX_LENGTH
        elif slot.age + 1 > cfg.max_age:
          reason = FinishReason.MAX_AGE
        else:
          self._buffer.append(dataclasses.replace(
              t, finish=FinishReason.BUDGET, age=slot.age + 1))
          carried += 1
          continue
        t = dataclasses.replace(t, finish=reason)
      final.append(t)
      group = self._pending[t.group_id]
      group.done[t.sample_idx] = t
      if len(group.done) == group.k:
        del self._pending[t.group_id]
        completed.append(Group(group.prompt_idx, t.group_id,
                               [group.done[j] for j in sorted(group.done)]))
    completed.sort(key=lambda g: g.group_id)
    self._in_flight = None

    tot = self._totals
    tot["iterations"] += 1
    tot["tokens_generated"] += tokens_generated
    tot["slot_steps"] += steps * B
    tot["groups_completed"] += len(completed)
    used = sum(slot is not None for slot in slots)
    m = {f"rollout/{key}": float(v) for key, v in counts.items()}
    m.update({
        "rollout/slots_used": used,
        "rollout/slots_empty": B - used,
        "rollout/tokens_generated": tokens_generated,
        "rollout/decode_steps": steps,
        "rollout/useful_token_fraction": _ratio(tokens_generated, steps * B),
        "rollout/carried_over": carried,
        "rollout/buffer_size": len(self._buffer),
        "rollout/groups_completed": len(completed),
        "rollout/groups_pending": len(self._pending),
        "rollout/cumulative_useful_token_fraction": _ratio(
            tot["tokens_generated"], tot["slot_steps"]),
    })
    for reason in FinishReason:
      if reason != FinishReason.RUNNING:
        m[f"rollout/finish_{reason.name.lower()}"] = sum(
            t.finish == reason for t in final)
    m["rollout/finish_budget"] += carried  # carried rows also stopped on budget
    ages = np.asarray([t.age for t in final], np.int64)
    m["rollout/age_mean"] = float(ages.mean()) if ages.size else 0.0
    m["rollout/age_max"] = int(ages.max()) if ages.size else 0
    hist = np.bincount(ages, minlength=cfg.max_age + 1)
    for a, c in enumerate(hist):
      m[f"rollout/age_hist_{a}"] = c
    self._metrics = {key: float(v) for key, v in m.items()}
    return completed

  # ------------------------------------------------------------- checkpoint

  def state_dict(self) -> dict:
    """JSON-able snapshot of the whole state; only between iterations."""
    if self._in_flight is not None:
      raise RuntimeError("state_dict: iteration "
                         f"{self._in_flight[0]} is in flight; save after absorb")
    return {
        "format": _FORMAT,
        "config": dataclasses.asdict(self.config),
        "next_group_id": self._next_group_id,
        "buffer": [t.to_json() for t in self._buffer],
        "pending": [{"group_id": gid, "prompt_idx": g.prompt_idx, "k": g.k,
                     "done": [g.done[j].to_json() for j in sorted(g.done)]}
                    for gid, g in sorted(self._pending.items())],
        "totals": dict(self._totals),
        "metrics": dict(self._metrics),
    }

  def load_state_dict(self, state: Mapping[str, Any]) -> None:
    """Restores `state_dict()` output (any config whose L fits the buffer)."""
    if state.get("format") != _FORMAT:
      raise ValueError(f"load_state_dict: expected format {_FORMAT!r}, got "
                       f"{state.get('format')!r}")
    buffer = [Trajectory.from_json(d) for d in state["buffer"]]
    for t in buffer:
      if len(t.tokens) >= self.config.max_length:
        raise ValueError(f"load_state_dict: buffered trajectory (group "
                         f"{t.group_id}, sample {t.sample_idx}) has "
                         f"{len(t.tokens)} tokens, no room under max_length "
                         f"{self.config.max_length}")
    pending = {}
    for g in state["pending"]:
      done = {t.sample_idx: t for t in map(Trajectory.from_json, g["done"])}
      pending[int(g["group_id"])] = _Pending(int(g["prompt_idx"]), int(g["k"]),
                                             done)
    self._buffer = buffer
    self._pending = pending
    self._next_group_id = int(state["next_group_id"])
    self._totals = {key: int(v) for key, v in state["totals"].items()}
    self._metrics = {key: float(v) for key, v in state["metrics"].items()}
    self._in_flight = None


def _ratio(num: float, den: float) -> float:
  return float(num) / den if den > 0 else 0.0


def _parse_prompt(item) -> Optional[tuple[int, np.ndarray]]:
  """(prompt_idx, int32 tokens [n]) or None when malformed."""
  try:
    idx, tokens = item
    idx = operator.index(idx)
    arr = np.asarray(tokens)
  except (TypeError, ValueError):
    return None
  if (idx < 0 or arr.ndim != 1 or arr.size == 0 or arr.dtype.kind not in "iu"
      or arr.min() < 0 or arr.max() > _INT32_MAX):
    return None
  return int(idx), arr.astype(np.int32)
