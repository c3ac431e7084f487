"""Which prompts to roll out: curriculum + prioritized sampling (report §2.3.4).

Axis legend: P prompts in the prompt set, E eligible prompts at an
iteration, K samples of one prompt.

Host-side and numpy only. Two independent parts:
- curriculum: a difficulty window per iteration decides which prompts are
  eligible. 'none' = all; 'two_phase' = all prompts before
  `hard_from_iteration`, then only those with difficulty >=
  `hard_min_difficulty` (the report's ablation, Fig. 9); 'linear' = prompts
  with difficulty <= a maximum that rises linearly from
  `start_max_difficulty` to `end_max_difficulty` over `ramp_iterations`.
  Difficulty is any float where larger = harder (a grade label, or
  1 - SFT pass rate).
- weighting among the eligible prompts: 'uniform', or 'prioritized' with
  weight (1 - s_i) + eps, s_i the prompt's success rate (impl. note 9).
  Success rates come from finished groups via `update`, which takes each
  sample's correctness (`rewards.is_correct`, the same definition the reward
  uses: `parts["correct"]` of `rewards.total_reward`); an unseen prompt has
  s = `init_success`. If every weight is 0 (eps = 0 and all s = 1) the
  draw falls back to uniform.

Within one `sample(n, ...)` call prompts are drawn WITHOUT replacement by
default (`replace=False`): no prompt appears twice in a batch unless n
exceeds the E eligible prompts of positive weight, in which case each of them
is taken n // E times and the remaining n % E are drawn without replacement (still
weighted). Note that weighted draws without replacement are only
approximately proportional to the weights (numpy's sequential scheme); with
`replace=True` every draw is exactly proportional.

The whole state (stats and the PCG64 state) round-trips through
`state_dict()` / `load_state_dict()` as JSON-able Python values (128-bit
generator words are stored as decimal strings), so a restored sampler draws
exactly the samples the original would have drawn next.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping, Sequence

import numpy as np

MODES = ("uniform", "prioritized")
STATS = ("ema", "mean")
CURRICULA = ("none", "two_phase", "linear")
_FORMAT = "kimi_jax.PromptSampler/1"


@dataclasses.dataclass(frozen=True)
class PromptSamplerConfig:
  """Settings of `PromptSampler`.

  mode: 'uniform' or 'prioritized' (weights (1 - s) + eps).
  eps: >= 0, floor added to every prioritized weight so solved prompts are
    still revisited now and then.
  init_success: s of a prompt never updated, in [0, 1].
  stat: 'ema' (s <- (1 - ema_rate) s + ema_rate * group success fraction; the
    first observation replaces init_success) or 'mean' (all samples ever seen).
  ema_rate: in (0, 1], weight of the newest group in the EMA.
  replace: sample with replacement within one call (module docstring).
  curriculum: 'none' | 'two_phase' | 'linear' (module docstring).
  hard_from_iteration, hard_min_difficulty: 'two_phase' switch iteration and
    the difficulty at which a prompt counts as hard.
  start_max_difficulty, end_max_difficulty, ramp_iterations: 'linear'.
  """
  mode: str = "prioritized"
  eps: float = 0.05
  init_success: float = 0.5
  stat: str = "ema"
  ema_rate: float = 0.5
  replace: bool = False
  curriculum: str = "none"
  hard_from_iteration: int = 0
  hard_min_difficulty: float = 0.5
  start_max_difficulty: float = 0.0
  end_max_difficulty: float = 1.0
  ramp_iterations: int = 1

  def __post_init__(self):
    for name, choices in (("mode", MODES), ("stat", STATS),
                          ("curriculum", CURRICULA)):
      if getattr(self, name) not in choices:
        raise ValueError(f"PromptSamplerConfig.{name} must be one of "
                         f"{choices}, got {getattr(self, name)!r}")
    self._number("eps", lo=0.0)
    self._number("init_success", lo=0.0, hi=1.0)
    self._number("ema_rate", lo=0.0, hi=1.0)
    if self.ema_rate == 0:
      raise ValueError("PromptSamplerConfig.ema_rate must be in (0, 1], got 0")
    self._number("hard_min_difficulty")
    self._number("start_max_difficulty")
    self._number("end_max_difficulty")
    if self.end_max_difficulty < self.start_max_difficulty:
      raise ValueError(
          "PromptSamplerConfig.end_max_difficulty must be >= "
          f"start_max_difficulty ({self.start_max_difficulty!r}), got "
          f"{self.end_max_difficulty!r}")
    self._integer("hard_from_iteration", lo=0)
    self._integer("ramp_iterations", lo=1)
    if not isinstance(self.replace, (bool, np.bool_)):
      raise ValueError(
          f"PromptSamplerConfig.replace must be a bool, got {self.replace!r}")

  def _number(self, name, lo=None, hi=None):
    v = getattr(self, name)
    ok = (isinstance(v, numbers.Real) and not isinstance(v, bool)
          and math.isfinite(v) and (lo is None or v >= lo)
          and (hi is None or v <= hi))
    if not ok:
      rng = "" if lo is None and hi is None else f" in [{lo}, {hi}]"
      raise ValueError(f"PromptSamplerConfig.{name} must be a finite number"
                       f"{rng}, got {v!r}")

  def _integer(self, name, lo):
    v = getattr(self, name)
    if (not isinstance(v, numbers.Integral) or isinstance(v, bool)
        or v < lo):
      raise ValueError(f"PromptSamplerConfig.{name} must be an int >= {lo}, "
                       f"got {v!r}")


def difficulty_window(iteration: int,
                      cfg: PromptSamplerConfig) -> tuple[float, float]:
  """(lo, hi): prompts with lo <= difficulty <= hi are eligible."""
  if cfg.curriculum == "two_phase" and iteration >= cfg.hard_from_iteration:
    return float(cfg.hard_min_difficulty), math.inf
  if cfg.curriculum == "linear":
    frac = min(1.0, max(0.0, iteration / cfg.ramp_iterations))
    hi = cfg.start_max_difficulty + frac * (
        cfg.end_max_difficulty - cfg.start_max_difficulty)
    return -math.inf, float(hi)
  return -math.inf, math.inf


class PromptSampler:
  """Curriculum + prioritized prompt sampler with exact save/restore.

  prompts_meta: sequence of mappings with 'id' (str or int, unique) and
    'difficulty' (float, larger = harder; required unless curriculum is
    'none').
  """

  def __init__(self, prompts_meta: Sequence[Mapping[str, Any]],
               config: PromptSamplerConfig = PromptSamplerConfig(),
               seed: int = 0):
    if not isinstance(config, PromptSamplerConfig):
      raise ValueError(f"config must be a PromptSamplerConfig, got "
                       f"{type(config).__name__}")
    self.config = config
    self.ids, self.difficulty_P = _parse_meta(prompts_meta,
                                              config.curriculum != "none")
    num = len(self.ids)
    self._rng = np.random.Generator(np.random.PCG64(seed))
    self._ema_P = np.full(num, config.init_success, np.float64)
    self._successes_P = np.zeros(num, np.float64)  # successful samples
    self._trials_P = np.zeros(num, np.float64)  # samples seen
    self._groups_P = np.zeros(num, np.int64)  # updates (groups) seen
    self._check_schedule()

  def __len__(self) -> int:
    return len(self.ids)

  def _check_schedule(self) -> None:
    """Fail at construction, not mid-training, if a phase has no prompts."""
    cfg = self.config
    checks = {"none": [0], "linear": [0],
              "two_phase": [0, cfg.hard_from_iteration]}[cfg.curriculum]
    for it in checks:
      if not self.eligible(it).any():
        lo, hi = difficulty_window(it, cfg)
        raise ValueError(
            f"PromptSampler: no prompt has difficulty in [{lo}, {hi}] at "
            f"iteration {it} (curriculum={cfg.curriculum!r}; difficulties "
            f"range {np.nanmin(self.difficulty_P)}..."
            f"{np.nanmax(self.difficulty_P)})")

  # ---------------------------------------------------------------- queries

  @property
  def success_rate(self) -> np.ndarray:
    """s_P, float64 [P]: current success-rate estimate of every prompt."""
    if self.config.stat == "ema":
      return self._ema_P.copy()
    seen_P = self._trials_P > 0
    return np.where(seen_P, self._successes_P / np.maximum(self._trials_P, 1),
                    self.config.init_success)

  def eligible(self, iteration: int) -> np.ndarray:
    """Bool [P]: prompts the curriculum allows at `iteration`."""
    if self.config.curriculum == "none":
      return np.ones(len(self.ids), bool)
    lo, hi = difficulty_window(iteration, self.config)
    return (self.difficulty_P >= lo) & (self.difficulty_P <= hi)

  def weights(self, iteration: int) -> np.ndarray:
    """Unnormalised sampling weights [P] (0 for ineligible prompts)."""
    if self.config.mode == "uniform":
      w_P = np.ones(len(self.ids))
    else:
      w_P = (1.0 - self.success_rate) + self.config.eps
    w_P = np.where(self.eligible(iteration), w_P, 0.0)
    if w_P.sum() <= 0:  # all solved and eps == 0: uniform over eligible
      w_P = self.eligible(iteration).astype(np.float64)
    return w_P

  def metrics(self, iteration: int) -> dict:
    elig_P = self.eligible(iteration)
    s_P = self.success_rate
    return {
        "sampler/eligible": int(elig_P.sum()),
        "sampler/success_rate_mean": float(s_P[elig_P].mean()),
        "sampler/seen_fraction": float((self._groups_P > 0).mean()),
    }

  # ---------------------------------------------------------------- sampling

  def sample(self, n: int, iteration: int) -> list[int]:
    """n prompt indices (into prompts_meta) for `iteration`; advances the RNG."""
    if (not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 0):
      raise ValueError(f"sample: n must be an int >= 0, got {n!r}")
    if n == 0:
      return []
    w_P = self.weights(iteration)
    idx_E = np.flatnonzero(w_P > 0)
    w_E = w_P[idx_E]
    p_E = w_E / w_E.sum()
    if self.config.replace:
      out = self._rng.choice(idx_E, size=n, replace=True, p=p_E)
      return [int(i) for i in out]
    full_rounds, rest = divmod(n, len(idx_E))
    parts = [np.tile(idx_E, full_rounds)]
    if rest:
      parts.append(self._rng.choice(idx_E, size=rest, replace=False, p=p_E))
    out = np.concatenate(parts)
    if full_rounds:  # do not return the full rounds in index order
      out = self._rng.permutation(out)
    return [int(i) for i in out]

  # ----------------------------------------------------------------- updates

  def update(self, prompt_idx: int, correct_k) -> None:
    """Records one finished group: whether each of the K samples of prompt
    `prompt_idx` is correct (bool, or 0/1; `rewards.is_correct`)."""
    if (not isinstance(prompt_idx, numbers.Integral)
        or not 0 <= prompt_idx < len(self.ids)):
      raise ValueError(f"update: prompt_idx must be an int in "
                       f"[0, {len(self.ids)}), got {prompt_idx!r}")
    correct_K = np.asarray(correct_k)
    if correct_K.ndim != 1 or correct_K.size == 0:
      raise ValueError(f"update: correct_k must be a non-empty 1-D array, got "
                       f"shape {correct_K.shape}")
    if correct_K.dtype != bool and not np.all(np.isin(correct_K, (0, 1))):
      # A reward (partial credit, length bonus) here would be a second
      # definition of success.
      raise ValueError(f"update: correct_k must be booleans (rewards.is_correct), got "
                       f"{correct_K}")
    successes = float(np.sum(correct_K.astype(bool)))
    frac = successes / correct_K.size
    i = int(prompt_idx)
    if self._groups_P[i] == 0:
      self._ema_P[i] = frac
    else:
      rate = self.config.ema_rate
      self._ema_P[i] = (1.0 - rate) * self._ema_P[i] + rate * frac
    self._successes_P[i] += successes
    self._trials_P[i] += correct_K.size
    self._groups_P[i] += 1

  def update_groups(self, prompt_idx_G: Sequence[int], correct_GK) -> None:
    """`update` for G finished groups; correct_GK is bool [G, K]."""
    correct_GK = np.asarray(correct_GK)
    if correct_GK.ndim != 2 or correct_GK.shape[0] != len(prompt_idx_G):
      raise ValueError(f"update_groups: correct_GK must be [G={len(prompt_idx_G)}"
                       f", K], got shape {correct_GK.shape}")
    for i, correct_K in zip(prompt_idx_G, correct_GK):
      self.update(int(i), correct_K)

  # ------------------------------------------------------------- checkpoint

  def state_dict(self) -> dict:
    """JSON-able snapshot of the full state (stats and RNG)."""
    return {
        "format": _FORMAT,
        "prompt_ids": list(self.ids),
        "ema": self._ema_P.tolist(),
        "successes": self._successes_P.tolist(),
        "trials": self._trials_P.tolist(),
        "groups": self._groups_P.tolist(),
        "rng": _rng_to_json(self._rng),
    }

  def load_state_dict(self, state: Mapping[str, Any]) -> None:
    """Restores `state_dict()` output; the prompt ids must match exactly."""
    if state.get("format") != _FORMAT:
      raise ValueError(f"load_state_dict: expected format {_FORMAT!r}, got "
                       f"{state.get('format')!r}")
    ids = [_as_id(x) for x in state["prompt_ids"]]
    if ids != list(self.ids):
      raise ValueError(f"load_state_dict: the checkpoint was written for "
                       f"{len(ids)} prompts that differ from the current "
                       f"{len(self.ids)} (first ids {ids[:3]} vs "
                       f"{list(self.ids[:3])})")
    num = len(self.ids)
    arrays = {}
    for key, dtype in (("ema", np.float64), ("successes", np.float64),
                       ("trials", np.float64), ("groups", np.int64)):
      arr = np.asarray(state[key], dtype)
      if arr.shape != (num,):
        raise ValueError(f"load_state_dict: {key!r} has shape {arr.shape}, "
                         f"expected ({num},)")
      arrays[key] = arr.copy()
    self._rng = _rng_from_json(state["rng"])
    self._ema_P = arrays["ema"]
    self._successes_P = arrays["successes"]
    self._trials_P = arrays["trials"]
    self._groups_P = arrays["groups"]


# ------------------------------------------------------------------ helpers


def _as_id(x: Any):
  if isinstance(x, (str, int)) and not isinstance(x, bool):
    return x
  if isinstance(x, np.integer):
    return int(x)
  if isinstance(x, np.str_):
    return str(x)
  raise ValueError(f"prompt id must be a str or int, got {x!r}")


def _parse_meta(prompts_meta, need_difficulty: bool):
  if len(prompts_meta) == 0:
    raise ValueError("PromptSampler: prompts_meta is empty")
  ids, difficulty = [], []
  for i, rec in enumerate(prompts_meta):
    if not isinstance(rec, Mapping) or "id" not in rec:
      raise ValueError(f"prompts_meta[{i}] must be a mapping with an 'id', "
                       f"got {rec!r}")
    ids.append(_as_id(rec["id"]))
    d = rec.get("difficulty")
    if d is None:
      if need_difficulty:
        raise ValueError(f"prompts_meta[{i}] (id {rec['id']!r}) has no "
                         "'difficulty' but the curriculum needs one")
      d = math.nan
    elif (not isinstance(d, numbers.Real) or isinstance(d, bool)
          or not math.isfinite(d)):
      raise ValueError(f"prompts_meta[{i}] (id {rec['id']!r}): difficulty "
                       f"must be a finite number, got {d!r}")
    difficulty.append(float(d))
  if len(set(ids)) != len(ids):
    seen, dup = set(), None
    for x in ids:
      if x in seen:
        dup = x
        break
      seen.add(x)
    raise ValueError(f"PromptSampler: duplicate prompt id {dup!r}")
  return tuple(ids), np.asarray(difficulty, np.float64)


def _rng_to_json(rng: np.random.Generator) -> dict:
  st = rng.bit_generator.state
  if st["bit_generator"] != "PCG64":
    raise ValueError(f"only PCG64 is supported, got {st['bit_generator']}")
  return {"bit_generator": "PCG64",
          "state": str(st["state"]["state"]), "inc": str(st["state"]["inc"]),
          "has_uint32": int(st["has_uint32"]),
          "uinteger": int(st["uinteger"])}


def _rng_from_json(d: Mapping[str, Any]) -> np.random.Generator:
  if d.get("bit_generator") != "PCG64":
    raise ValueError(f"load_state_dict: rng must be PCG64, got "
                     f"{d.get('bit_generator')!r}")
  bit_gen = np.random.PCG64()
  bit_gen.state = {"bit_generator": "PCG64",
                   "state": {"state": int(d["state"]), "inc": int(d["inc"])},
                   "has_uint32": int(d["has_uint32"]),
                   "uinteger": int(d["uinteger"])}
  return np.random.Generator(bit_gen)
