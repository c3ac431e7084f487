"""`LossConfig`: which policy loss the RL update minimises, and its options."""
from __future__ import annotations

import dataclasses
from typing import Optional

NORMALISATIONS = ("sequence", "token", "fixed")
FORMS = ("squared", "gradient")
ALGORITHMS = ("k15", "rest", "ppo")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Settings of the policy loss (hashable: usable as a jit static).

  algorithm: 'k15' (the report), 'rest' (positive-only ablation), 'ppo'
    (PPO-clip / GRPO comparison).
  tau: k1.5 KL weight tau > 0 (toy default 0.1; the report gives no value).
  form: 'squared' (report's surrogate, default) or 'gradient' (eq. 3
    surrogate; same direction, gradient 2*tau times smaller: rescale the LR).
  normalisation: 'sequence' | 'token' | 'fixed' (package docstring).
  rest_threshold: ReST trains on samples with reward > rest_threshold.
  clip_eps, clip_eps_high: PPO clip range [1 - clip_eps, 1 + clip_eps_high]
    (clip_eps_high None = clip_eps).
  advantage_std_norm: divide each group's advantages r - r_bar by the
    group's reward standard deviation (+1e-6; GRPO); applies to 'k15' and
    'ppo' (ReST uses no advantage: an error there). Computed on the host
    with the baseline (`group_advantages`, rl/batch.py).
  kl_coef: PPO/GRPO k3-estimator KL penalty weight to the iteration-start
    policy (the reference; 'ppo' only: k1.5's KL weight is `tau`).
  """
  algorithm: str = "k15"
  tau: float = 0.1
  form: str = "squared"
  normalisation: str = "sequence"
  rest_threshold: float = 0.0
  clip_eps: float = 0.2
  clip_eps_high: Optional[float] = None
  advantage_std_norm: bool = False
  kl_coef: float = 0.0

  def __post_init__(self):
    check_choice("LossConfig.algorithm", self.algorithm, ALGORITHMS)
    check_choice("LossConfig.form", self.form, FORMS)
    check_choice("LossConfig.normalisation", self.normalisation, NORMALISATIONS)
    if not (isinstance(self.tau, (int, float)) and self.tau > 0):
      raise ValueError(f"LossConfig.tau must be a number > 0, got {self.tau!r}")
    if not (isinstance(self.clip_eps, (int, float)) and self.clip_eps > 0):
      raise ValueError(f"LossConfig.clip_eps must be a number > 0, got {self.clip_eps!r}")
    if self.clip_eps_high is not None and not (
        isinstance(self.clip_eps_high, (int, float)) and self.clip_eps_high > 0):
      raise ValueError("LossConfig.clip_eps_high must be None or a number > 0, "
                       f"got {self.clip_eps_high!r}")
    if not (isinstance(self.kl_coef, (int, float)) and self.kl_coef >= 0):
      raise ValueError(f"LossConfig.kl_coef must be a number >= 0, got {self.kl_coef!r}")
    if not isinstance(self.rest_threshold, (int, float)):
      raise ValueError(f"LossConfig.rest_threshold must be a number, got {self.rest_threshold!r}")
    if not isinstance(self.advantage_std_norm, bool):
      raise ValueError("LossConfig.advantage_std_norm must be True or False, got "
                       f"{self.advantage_std_norm!r}")
    # Options another algorithm would silently ignore are errors.
    if self.advantage_std_norm and self.algorithm == "rest":
      raise ValueError("LossConfig.advantage_std_norm has no effect with algorithm='rest' "
                       "(ReST uses no advantage)")
    if self.kl_coef and self.algorithm != "ppo":
      raise ValueError(f"LossConfig.kl_coef applies to algorithm='ppo' only, got "
                       f"algorithm={self.algorithm!r} (k1.5's KL weight is tau)")


def check_choice(name: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f"{name} must be one of {choices}, got {value!r}")
