"""Tests for kimi_jax/sampling/partial.py (host-side partial rollouts).

Axis legend: B slots, L max total length.

The device segment is simulated by `fake_segment`, which edits a
RolloutState the way `sample_segment` does: every active RUNNING row gets up
to `budget` new tokens; it stops with its planned reason when its planned
response length is reached, else with MAX_LENGTH at L, else with BUDGET.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax.sampling.finish import FinishReason as FR
from kimi_jax.sampling.partial import (RolloutScheduler, SchedulerConfig,
                                       Trajectory)
from kimi_jax.sampling.state import RolloutState


def fake_segment(state, budget, iteration, plan):
  """plan(prompt_idx, sample_idx) -> (response length, final reason).

  Response token t is 100 + t with log-prob -t / 100, so a trajectory
  continued across segments has a recognisable response. Returns
  (state, steps) with steps = the longest row's new tokens (>= 1).
  """
  s = jax.tree_util.tree_map(np.array, state)  # copies
  B, L = s.tokens_BL.shape
  steps = 1
  for b in range(B):
    if not s.active_B[b] or s.finish_B[b] != FR.RUNNING:
      continue
    start = int(s.length_B[b])
    done = start - int(s.prompt_len_B[b])
    want, reason = plan(int(s.prompt_idx_B[b]), int(s.sample_idx_B[b]))
    n = min(budget, L - start, want - done)
    pos = done + np.arange(n)
    s.tokens_BL[b, start:start + n] = 100 + pos
    s.logp_BL[b, start:start + n] = -pos / 100
    s.token_iter_BL[b, start:start + n] = iteration
    s.length_B[b] = start + n
    if done + n == want:
      s.finish_B[b] = reason
    elif start + n == L:
      s.finish_B[b] = FR.MAX_LENGTH
    else:
      s.finish_B[b] = FR.BUDGET
    steps = max(steps, n)
  return s, steps


def plan_from(table, default=(1, FR.EOS)):
  return lambda p, j: table.get((p, j), default)


class CountingSource:
  """Prompt i has tokens [i + 1] * prompt_len(i); records every request."""

  def __init__(self, prompt_len=lambda i: 3, position=0):
    self.prompt_len = prompt_len
    self.position = position
    self.requests = []

  def __call__(self, n, iteration):
    self.requests.append((n, iteration))
    out = [(i, [i + 1] * self.prompt_len(i))
           for i in range(self.position, self.position + n)]
    self.position += n
    return out


def cfg(**kw):
  base = dict(num_slots=4, samples_per_prompt=2, max_length=32,
              max_prompt_length=8, segment_budget=3, max_age=5)
  base.update(kw)
  return SchedulerConfig(**base)


def step(sched, it, plan, budget=None):
  state = sched.next_state(it)
  out, steps = fake_segment(state, sched.budget if budget is None else budget,
                            it, plan)
  return state, out, sched.absorb(out, it, steps)


def traj_json(groups):
  return [[g.prompt_idx, g.group_id, [t.to_json() for t in g.trajectories]]
          for g in groups]


def assert_states_equal(a, b):
  for name in a.__dataclass_fields__:
    np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


# ------------------------------------------------------------------ config


@pytest.mark.parametrize("kw, field", [
    (dict(samples_per_prompt=5), "samples_per_prompt"),
    (dict(max_prompt_length=32), "max_prompt_length"),
    (dict(segment_budget=0), "segment_budget"),
    (dict(max_age=-1), "max_age"),
    (dict(num_slots=2.0), "num_slots"),
    (dict(overlong_prompt="drop"), "overlong_prompt"),
    (dict(partial="yes"), "partial"),
    (dict(max_prompt_retries=-1), "max_prompt_retries"),
])
def test_config_validation_names_field(kw, field):
  with pytest.raises(ValueError, match=field):
    cfg(**kw)


# ------------------------------------------------------- group completion


def test_group_returned_only_when_all_k_finished():
  sched = RolloutScheduler(cfg(), CountingSource())
  plan = plan_from({(0, 0): (2, FR.EOS), (0, 1): (7, FR.EOS),
                    (1, 0): (1, FR.REPEAT), (1, 1): (3, FR.EOS)})
  _, _, groups = step(sched, 0, plan)
  assert [g.prompt_idx for g in groups] == [1]  # prompt 0 waits for sample 1
  assert [t.finish for t in groups[0].trajectories] == [FR.REPEAT, FR.EOS]
  _, _, groups = step(sched, 1, plan)
  assert [g.prompt_idx for g in groups] == [2]
  _, _, groups = step(sched, 2, plan)
  assert [g.prompt_idx for g in groups] == [0, 3]
  short, long_ = groups[0].trajectories
  assert (short.sample_idx, short.age, short.finish) == (0, 0, FR.EOS)
  assert (long_.sample_idx, long_.age, long_.finish) == (1, 2, FR.EOS)
  assert (long_.first_iteration, long_.last_iteration) == (0, 2)
  # segments of iterations 0, 1, 2 joined in order after the prompt
  np.testing.assert_array_equal(long_.tokens, [1, 1, 1] + list(range(100, 107)))
  np.testing.assert_array_equal(long_.response, range(100, 107))
  np.testing.assert_array_equal(long_.token_iter, [0, 0, 0, 1, 1, 1, 2])
  np.testing.assert_allclose(long_.logp, -np.arange(7) / 100, rtol=1e-6)
  assert long_.tokens.dtype == np.int32 and long_.logp.dtype == np.float32
  assert long_.token_iter.dtype == np.int32 and long_.prompt_len == 3
  assert sched.num_pending_groups == 0 and sched.buffer_size == 0


def test_staleness_bound_finishes_as_max_age():
  sched = RolloutScheduler(cfg(num_slots=2, max_age=1, segment_budget=2),
                           CountingSource())
  plan = plan_from({}, default=(100, FR.EOS))
  _, _, groups = step(sched, 0, plan)
  assert groups == [] and sched.buffer_size == 2
  _, _, groups = step(sched, 1, plan)  # carrying again would make age 2 > 1
  assert len(groups) == 1 and sched.buffer_size == 0
  for t in groups[0].trajectories:
    assert (t.finish, t.age, t.response_len) == (FR.MAX_AGE, 1, 4)
  m = sched.metrics()
  assert m["rollout/finish_max_age"] == 2 and m["rollout/age_hist_1"] == 2
  assert m["rollout/carried_over"] == 0 and m["rollout/finish_budget"] == 0

  never = RolloutScheduler(cfg(num_slots=2, max_age=0), CountingSource())
  _, _, groups = step(never, 0, plan)
  assert [t.finish for t in groups[0].trajectories] == [FR.MAX_AGE] * 2


# ------------------------------------------------------------ slot filling


def test_carried_rows_fill_slots_first_oldest_first():
  source = CountingSource()
  sched = RolloutScheduler(cfg(num_slots=6), source)
  long_ = (50, FR.EOS)
  plan = plan_from({(0, 1): long_, (2, 0): long_, (3, 0): long_})
  _, after0, _ = step(sched, 0, plan)
  assert source.requests == [(3, 0)]
  state = sched.next_state(1)
  assert source.requests[-1] == (2, 1)  # 6 slots - 2 carried = 2 groups of 2
  np.testing.assert_array_equal(state.prompt_idx_B, [0, 2, 3, 3, 4, 4])
  np.testing.assert_array_equal(state.sample_idx_B, [1, 0, 0, 1, 0, 1])
  assert state.active_B.all() and (state.finish_B == FR.RUNNING).all()
  for slot, old in ((0, 1), (1, 4)):  # carried rows keep tokens/logp/iters
    n = after0.length_B[old]
    assert state.length_B[slot] == n == 6
    for name in ("tokens_BL", "logp_BL", "token_iter_BL"):
      np.testing.assert_array_equal(getattr(state, name)[slot, :n],
                                    getattr(after0, name)[old, :n])
  np.testing.assert_array_equal(state.token_iter_BL[2:], -1)
  np.testing.assert_array_equal(state.length_B[2:], 3)
  out, steps = fake_segment(state, 3, 1, plan)
  sched.absorb(out, 1, steps)
  assert sched.buffer_size == 3  # (0,1) and (2,0) from it 0, (3,0) from it 1

  # Oldest first does not depend on the order the buffer is stored in.
  d = json.loads(json.dumps(sched.state_dict()))
  d["buffer"] = d["buffer"][::-1]
  restored = RolloutScheduler(sched.config, CountingSource(position=5))
  restored.load_state_dict(d)
  a, b = sched.next_state(2), restored.next_state(2)
  np.testing.assert_array_equal(a.prompt_idx_B[:3], [0, 2, 3])
  np.testing.assert_array_equal(a.sample_idx_B[:3], [1, 0, 0])
  assert_states_equal(a, b)


def test_synchronous_mode_never_carries_over():
  sched = RolloutScheduler(cfg(partial=False, num_slots=4, max_length=16),
                           CountingSource())
  assert sched.budget == 16
  plan = plan_from({(0, 0): (5, FR.EOS), (0, 1): (40, FR.EOS),
                    (1, 0): (12, FR.REPEAT)}, default=(9, FR.EOS))
  for it in range(3):
    _, out, groups = step(sched, it, plan)
    assert not (out.finish_B[out.active_B] == FR.RUNNING).any()
    assert len(groups) == 2 and sched.buffer_size == 0
    m = sched.metrics()
    assert m["rollout/carried_over"] == 0 and m["rollout/carried_in"] == 0
    assert m["rollout/groups_pending"] == 0
  # A too-small budget in synchronous mode: BUDGET rows are final (truncated).
  _, _, groups = step(sched, 3, plan, budget=2)
  assert len(groups) == 2 and sched.buffer_size == 0
  assert {t.finish for g in groups for t in g.trajectories} == {FR.BUDGET}
  assert sched.metrics()["rollout/finish_budget"] == 4


def test_synchronous_mode_max_length():
  sched = RolloutScheduler(cfg(partial=False, max_length=16), CountingSource())
  _, _, groups = step(sched, 0, plan_from({}, default=(40, FR.EOS)))
  for t in groups[0].trajectories:
    assert (t.finish, len(t.tokens), t.response_len) == (FR.MAX_LENGTH, 16, 13)


# --------------------------------------------------------- bad prompts


class ListSource:
  """Returns the queued batches in order (then nothing); records requests."""

  def __init__(self, *batches):
    self.batches = list(batches)
    self.requests = []

  def __call__(self, n, iteration):
    self.requests.append(n)
    return self.batches.pop(0) if self.batches else []


def test_overlong_reject_asks_for_replacement():
  source = ListSource([(0, list(range(1, 10))), (1, [5, 6])], [(2, [7])])
  sched = RolloutScheduler(cfg(overlong_prompt="reject"), source)
  _, _, groups = step(sched, 0, plan_from({}))
  assert source.requests == [2, 1]
  assert [g.prompt_idx for g in groups] == [1, 2]
  m = sched.metrics()
  assert m["rollout/prompts_rejected_overlong"] == 1
  assert m["rollout/prompts_truncated"] == 0
  assert m["rollout/prompt_source_calls"] == 2 and m["rollout/slots_used"] == 4


@pytest.mark.parametrize("mode, kept", [("truncate_left", [3, 4, 5, 6]),
                                        ("truncate_right", [1, 2, 3, 4])])
def test_overlong_truncate(mode, kept):
  source = ListSource([(0, [1, 2, 3, 4, 5, 6]), (1, [9])])
  sched = RolloutScheduler(cfg(overlong_prompt=mode, max_prompt_length=4),
                           source)
  state = sched.next_state(0)
  np.testing.assert_array_equal(state.tokens_BL[0, :4], kept)
  np.testing.assert_array_equal(state.prompt_len_B, [4, 4, 1, 1])
  out, steps = fake_segment(state, 3, 0, plan_from({}))
  groups = sched.absorb(out, 0, steps)
  np.testing.assert_array_equal(groups[0].trajectories[1].tokens, kept + [100])
  m = sched.metrics()
  assert m["rollout/prompts_truncated"] == 1
  assert m["rollout/prompts_rejected_overlong"] == 0


def test_source_of_only_bad_prompts_does_not_hang():
  calls = []

  def overlong(n, iteration):
    calls.append(n)
    assert len(calls) < 50, "scheduler keeps asking: would hang"
    return [(i, [1] * 100) for i in range(n)]

  sched = RolloutScheduler(cfg(num_slots=6, max_prompt_retries=2), overlong)
  state = sched.next_state(0)
  assert calls == [3, 3, 3] and not state.active_B.any()
  out, steps = fake_segment(state, 3, 0, plan_from({}))
  assert sched.absorb(out, 0, steps) == []
  m = sched.metrics()
  assert m["rollout/prompts_rejected_overlong"] == 9
  assert m["rollout/slots_used"] == 0 and m["rollout/slots_empty"] == 6
  assert m["rollout/useful_token_fraction"] == 0.0

  malformed = ListSource([(0, []), (-1, [3]), (1, [1.5, 2.0]), (2, [-4]),
                          "junk"], [(3, [[1, 2]])], [(4, [2**40])])
  sched = RolloutScheduler(cfg(num_slots=10, samples_per_prompt=2), malformed)
  state = sched.next_state(0)  # 5 asked; 3 answers, then the source is empty
  assert malformed.requests == [5, 5, 5, 5] and not state.active_B.any()
  sched.absorb(state, 0, 1)
  assert sched.metrics()["rollout/prompts_rejected_invalid"] == 7

  exhausted = ListSource()
  sched = RolloutScheduler(cfg(), exhausted)
  sched.next_state(0)
  assert exhausted.requests == [2]  # an empty answer ends the retries


# ------------------------------------------------------------- counters


def test_counters_on_hand_built_scenario():
  sched = RolloutScheduler(cfg(num_slots=5, segment_budget=4, max_length=16),
                           CountingSource())
  plan = plan_from({(0, 0): (2, FR.EOS), (0, 1): (6, FR.EOS),
                    (1, 0): (4, FR.EOS), (1, 1): (1, FR.REPEAT)})
  state = sched.next_state(0)
  out, steps = fake_segment(state, 4, 0, plan)
  assert steps == 4
  # the device returns jax arrays and a jax scalar
  out = jax.tree_util.tree_map(jnp.asarray, out)
  groups = sched.absorb(out, 0, jnp.int32(steps))
  assert [g.prompt_idx for g in groups] == [1]
  m = sched.metrics()
  expect = {
      "slots_used": 4, "slots_empty": 1, "carried_in": 0, "fresh_prompts": 2,
      "tokens_generated": 2 + 4 + 4 + 1, "decode_steps": 4,
      "useful_token_fraction": 11 / (4 * 5),
      "finish_eos": 2, "finish_repeat": 1, "finish_budget": 1,
      "finish_max_length": 0, "finish_max_age": 0, "carried_over": 1,
      "buffer_size": 1, "groups_completed": 1, "groups_pending": 1,
      "age_mean": 0.0, "age_max": 0, "age_hist_0": 3, "age_hist_1": 0,
      "prompts_rejected_overlong": 0, "prompts_truncated": 0,
  }
  for key, v in expect.items():
    assert m[f"rollout/{key}"] == pytest.approx(v), key
  assert all(isinstance(v, float) for v in m.values())
  assert set(m) >= {f"rollout/age_hist_{a}" for a in range(6)}

  # iteration 1: the carried row needs 2 more tokens; 2 fresh groups need 1
  step(sched, 1, plan)
  m = sched.metrics()
  expect = {"slots_used": 5, "carried_in": 1, "fresh_prompts": 2,
            "tokens_generated": 6, "decode_steps": 2,
            "useful_token_fraction": 6 / (2 * 5), "finish_eos": 5,
            "groups_completed": 3, "groups_pending": 0, "age_mean": 0.2,
            "age_max": 1, "age_hist_0": 4, "age_hist_1": 1,
            "cumulative_useful_token_fraction": 17 / (6 * 5)}
  for key, v in expect.items():
    assert m[f"rollout/{key}"] == pytest.approx(v), key


# ---------------------------------------------- checkpoint and determinism


class SeededSource:
  """Random prompt indices and lengths 1..12 (some over the budget of 8)."""

  def __init__(self, seed):
    self.rng = np.random.default_rng(seed)

  def __call__(self, n, iteration):
    idx = self.rng.integers(0, 50, size=n)
    lens = self.rng.integers(1, 13, size=n)
    return [(int(i), list(range(1, l + 1))) for i, l in zip(idx, lens)]

  def clone(self):
    other = SeededSource(0)
    other.rng.bit_generator.state = self.rng.bit_generator.state
    return other


def seeded_plan(seed):
  def plan(p, j):
    rng = np.random.default_rng([seed, p, j])
    return int(rng.integers(1, 30)), FR(int(rng.choice([1, 1, 1, 4])))
  return plan


def run(sched, iterations, plan, start=0):
  trace = []
  for it in range(start, start + iterations):
    state, out, groups = step(sched, it, plan)
    trace.append((state, traj_json(groups), sched.metrics()))
  return trace


def test_state_dict_roundtrip_gives_identical_next_iteration():
  config = cfg(num_slots=8, samples_per_prompt=3, segment_budget=4, max_age=3,
               overlong_prompt="truncate_left")
  plan = seeded_plan(1)
  source = SeededSource(7)
  sched = RolloutScheduler(config, source)
  run(sched, 3, plan)
  assert sched.buffer_size > 0 and sched.num_pending_groups > 0
  d = sched.state_dict()
  d = json.loads(json.dumps(d))  # plain JSON, exactly
  restored = RolloutScheduler(config, source.clone())
  restored.load_state_dict(d)
  assert restored.state_dict() == sched.state_dict()
  assert restored.metrics() == sched.metrics()
  a, b = run(sched, 3, plan, start=3), run(restored, 3, plan, start=3)
  for (sa, ga, ma), (sb, gb, mb) in zip(a, b):
    assert_states_equal(sa, sb)
    assert ga == gb and ma == mb


def test_state_dict_only_between_iterations_and_protocol_errors():
  sched = RolloutScheduler(cfg(), CountingSource())
  with pytest.raises(RuntimeError, match="no next_state"):
    sched.absorb(RolloutState.empty(4, 32), 0, 1)
  state = sched.next_state(0)
  with pytest.raises(RuntimeError, match="in flight"):
    sched.state_dict()
  with pytest.raises(RuntimeError, match="not absorbed"):
    sched.next_state(1)
  with pytest.raises(ValueError, match="iteration"):
    sched.absorb(state, 1, 1)
  swapped = state.replace(sample_idx_B=state.sample_idx_B[::-1].copy())
  with pytest.raises(ValueError, match="slot 0"):
    sched.absorb(swapped, 0, 1)
  bad_code = state.replace(finish_B=np.full(4, 9, np.int32))
  with pytest.raises(ValueError, match="not a valid"):
    sched.absorb(bad_code, 0, 1)
  sched.absorb(state, 0, 1)  # failed calls changed nothing; RUNNING = BUDGET
  assert sched.buffer_size == 4 and sched.num_pending_groups == 2
  with pytest.raises(ValueError, match="format"):
    sched.load_state_dict({"format": "other"})
  with pytest.raises(ValueError, match="unknown|not a valid"):
    Trajectory.from_json({"prompt_idx": 0, "sample_idx": 0, "group_id": 0,
                          "tokens": [1], "prompt_len": 1, "logp": [],
                          "token_iter": [], "finish": 9, "age": 0,
                          "first_iteration": 0, "last_iteration": 0})


def test_deterministic_and_invariants():
  config = cfg(num_slots=8, samples_per_prompt=2, segment_budget=5, max_age=2,
               overlong_prompt="truncate_right")
  a = run(RolloutScheduler(config, SeededSource(3)), 8, seeded_plan(5))
  b = run(RolloutScheduler(config, SeededSource(3)), 8, seeded_plan(5))
  for (sa, ga, ma), (sb, gb, mb) in zip(a, b):
    assert_states_equal(sa, sb)
    assert ga == gb and ma == mb
  finishes = set()
  for _, groups, m in a:
    assert m["rollout/slots_used"] + m["rollout/slots_empty"] == 8
    for _, _, trajs in groups:
      assert [t["sample_idx"] for t in trajs] == [0, 1]
      for t in trajs:
        finishes.add(t["finish"])
        assert t["age"] <= 2
        assert t["last_iteration"] - t["first_iteration"] == t["age"]
        assert len(t["logp"]) == len(t["tokens"]) - t["prompt_len"]
        assert t["prompt_len"] <= 8
        iters = np.asarray(t["token_iter"])
        assert (np.diff(iters) >= 0).all()
        assert iters.min() >= t["first_iteration"]
  assert {int(FR.EOS), int(FR.MAX_AGE)} <= finishes
