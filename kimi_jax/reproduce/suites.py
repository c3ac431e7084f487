"""The reproduction suites: which runs test which claim of the report.

A suite is one base config (a config file plus overrides applied to every
run), the seeds, and the arms: named override sets, each run once per seed.
All arms of one seed start from the same SFT warm-up (the `sft` run of that
seed: the base config with 0 RL iterations), so arms differ only in the RL
setting they ablate, and the warm-up is paid once per seed.

Arms (the report's ablations, §3.5; each compared with `k15` unless said):
  k15           the default: k1.5 surrogate, prioritized prompts, length
                penalty with warm-up, partial rollouts
  rest          ReST: positive-only (Fig. 10)
  uniform       uniform prompt sampling (prioritized vs uniform)
  curriculum    uniform sampling, then only hard prompts from the middle of
                the run (Fig. 9; compared with `uniform`)
  lp_off        no length penalty (§2.3.3)
  lp_no_warmup  the length penalty from iteration 0
  sync          synchronous rollouts: every response finished in its
                iteration, no carry-over (§2.6.2)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

ARMS: dict[str, dict[str, Any]] = {
    "k15": {},
    "rest": {"rl.loss": "rest"},
    "uniform": {"rl.prompt_sampling": "uniform"},
    "curriculum": {"rl.prompt_sampling": "uniform", "rl.curriculum": "two_phase"},
    "lp_off": {"rl.length_penalty_weight": 0.0},
    "lp_no_warmup": {"rl.length_penalty_start": 0},
    "sync": {"rollout.partial": False},
}


@dataclasses.dataclass(frozen=True)
class Suite:
  """config: a config file `path[:arg]`; overrides: dotted key -> value for
  every run (then each arm's own); seeds: values of `config.seed` (and
  `config.sft.seed`); arms: name -> overrides; hard_from: the curriculum
  arm's switch to hard prompts as a fraction of the run; hard_level: the
  lowest difficulty the curriculum counts as hard."""
  name: str
  config: str
  overrides: Mapping[str, Any]
  seeds: tuple[int, ...]
  arms: Mapping[str, Mapping[str, Any]]
  hard_from: float = 0.5
  hard_level: int = 2
  about: str = ""

  def arm_overrides(self, arm: str, seed: int) -> dict[str, Any]:
    """Every override of one run of `arm` (init_from is filled in by the runner)."""
    out = {**self.overrides, **self.seed_overrides(seed), **self.arms[arm]}
    if out.get("rl.curriculum") == "two_phase":
      out.setdefault("rl.hard_from_iteration",
                     max(1, int(self.hard_from * out["total_iterations"])))
      out.setdefault("rl.hard_min_difficulty", float(self.hard_level))
    return out

  def sft_overrides(self, seed: int) -> dict[str, Any]:
    """The shared warm-up of one seed: the base config, evaluated, 0 RL iterations."""
    return {**self.overrides, **self.seed_overrides(seed), "total_iterations": 0}

  @staticmethod
  def seed_overrides(seed: int) -> dict[str, Any]:
    return {"seed": seed, "sft.seed": seed}


SUITES = {
    # The main job's config, shortened so that 3 seeds x 7 arms fit in about
    # 3 hours on a 2-core CPU: 100 RL iterations (the length-penalty warm-up
    # keeps its share) of the 0.86M model the main job had until it grew to
    # 1.68M; docs/reproduction/ holds this suite's run.
    "toy": Suite(
        name="toy", config="configs/arith_tiny.py",
        overrides={"total_iterations": 100, "rl.length_penalty_start": 40,
                   "checkpoint_every": 20, "keep_checkpoints": 1,
                   "model.hidden_size": 128, "model.intermediate_size": 384,
                   "model.num_heads": 4},
        seeds=(0, 1, 2), arms=ARMS,
        about="configs/arith_tiny.py (the main job) with 100 RL iterations of a 0.86M model "
              "(width 128)"),
    # Every code path of the toy suite in about a minute per run (CI).
    "smoke": Suite(
        name="smoke", config="configs/arith_tiny.py:smoke",
        overrides={"total_iterations": 2, "eval_every": 1, "checkpoint_every": 2,
                   "rl.length_penalty_start": 1, "keep_checkpoints": 1},
        seeds=(0, 1), arms=ARMS,
        about="configs/arith_tiny.py:smoke with 2 RL iterations (tests the machinery, "
              "not the claims)"),
}


def get(name: str) -> Suite:
  if name not in SUITES:
    raise ValueError(f"--suite {name!r}: unknown (known: {sorted(SUITES)})")
  return SUITES[name]
