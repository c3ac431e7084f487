"""Policy losses: the k1.5 mirror-descent surrogate and its comparisons.

Axis legend: N samples in the batch (N = G * K when grouped), T tokens per
sample, G prompts (groups), K samples per prompt, P preference pairs.

All functions are pure and jittable; string / bool options are Python values
(close over them or mark them static). Log-probs are per token, float32,
`logp[n, t] = log pi(token t of sample n | prefix)`; `mask[n, t]` (bool or
float) selects the tokens that enter the loss. Nothing here reads the group
structure except `group_baseline` / `group_advantages`.

Masks and partial rollouts: the caller decides which tokens count. To train
only on the segment generated in the current iteration (the default of the
design, `train_old_segments=False`), build the mask with
`current_segment_mask(iteration_of_token, iteration, response_mask)`; tokens
of segments generated in earlier iterations then get zero gradient and do not
enter the sequence log-ratio either.

Normalisation (how token terms become one number per sample), shared by all
losses here:
  'sequence': sum over the sample's masked tokens (the report: log pi(y, z|x)
              is the whole-sequence log-prob). Default for k15 and ReST.
  'token':    that sum divided by the sample's number of masked tokens
              (max 1), i.e. the per-sample token mean (GRPO style).
  'fixed':    that sum divided by T, the static width of the batch, a
              length-independent constant (Dr. GRPO style).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

NORMALISATIONS = ("sequence", "token", "fixed")
FORMS = ("squared", "gradient")
ALGORITHMS = ("k15", "rest", "ppo")

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Settings of the policy loss (hashable: usable as a jit static).

  algorithm: 'k15' (the report), 'rest' (positive-only ablation), 'ppo'
    (PPO-clip / GRPO comparison).
  tau: k1.5 KL weight tau > 0 (toy default 0.1; the report gives no value).
  form: 'squared' (report's surrogate, default) or 'gradient' (eq. 3
    surrogate; same direction, gradient 2*tau times smaller: rescale the LR).
  normalisation: 'sequence' | 'token' | 'fixed' (see module docstring).
  rest_threshold: ReST trains on samples with reward > rest_threshold.
  clip_eps, clip_eps_high: PPO clip range [1 - clip_eps, 1 + clip_eps_high]
    (clip_eps_high None = clip_eps).
  advantage_std_norm: PPO/GRPO advantages divided by the group's reward std.
  kl_coef: PPO/GRPO k3-estimator KL penalty weight to the reference.
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
    _check_choice("LossConfig.algorithm", self.algorithm, ALGORITHMS)
    _check_choice("LossConfig.form", self.form, FORMS)
    _check_choice("LossConfig.normalisation", self.normalisation,
                  NORMALISATIONS)
    if not (isinstance(self.tau, (int, float)) and self.tau > 0):
      raise ValueError(f"LossConfig.tau must be a number > 0, got {self.tau!r}")
    if not (isinstance(self.clip_eps, (int, float)) and self.clip_eps > 0):
      raise ValueError(
          f"LossConfig.clip_eps must be a number > 0, got {self.clip_eps!r}")
    if self.clip_eps_high is not None and not (
        isinstance(self.clip_eps_high, (int, float)) and self.clip_eps_high > 0):
      raise ValueError("LossConfig.clip_eps_high must be None or a number > 0, "
                       f"got {self.clip_eps_high!r}")
    if not (isinstance(self.kl_coef, (int, float)) and self.kl_coef >= 0):
      raise ValueError(
          f"LossConfig.kl_coef must be a number >= 0, got {self.kl_coef!r}")
    if not isinstance(self.rest_threshold, (int, float)):
      raise ValueError("LossConfig.rest_threshold must be a number, got "
                       f"{self.rest_threshold!r}")


def _check_choice(name: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_shapes(**arrays) -> None:
  """All named arrays must have the same shape as the first (static check)."""
  items = list(arrays.items())
  name0, a0 = items[0]
  for name, a in items[1:]:
    if jnp.shape(a) != jnp.shape(a0):
      raise ValueError(f"{name} has shape {jnp.shape(a)} but {name0} has shape "
                       f"{jnp.shape(a0)}")


# ----------------------------------------------------------------- small math


def current_segment_mask(iteration_of_token: Array, iteration,
                         response_mask: Optional[Array] = None) -> Array:
  """Bool mask `[N, T]` of the tokens generated in `iteration`.

  iteration_of_token: int `[N, T]`, the rollout iteration that generated each
    token (prompt / padding tokens may hold any value, e.g. -1; pass
    `response_mask` to exclude them explicitly).
  iteration: int scalar, the current iteration.
  response_mask: optional bool/float `[N, T]`, the response tokens.
  """
  mask_NT = jnp.asarray(iteration_of_token) == iteration
  if response_mask is not None:
    _check_shapes(iteration_of_token=iteration_of_token,
                  response_mask=response_mask)
    mask_NT = jnp.logical_and(mask_NT, jnp.asarray(response_mask) != 0)
  return mask_NT


def reduce_tokens(x_NT: Array, mask_NT: Array,
                  normalisation: str = "sequence") -> Array:
  """Masked per-sample reduction `[N, T] -> [N]` (see module docstring)."""
  _check_choice("normalisation", normalisation, NORMALISATIONS)
  _check_shapes(x=x_NT, mask=mask_NT)
  mask_NT = jnp.asarray(mask_NT).astype(x_NT.dtype)
  total_N = jnp.sum(mask_NT * x_NT, axis=-1)
  if normalisation == "sequence":
    return total_N
  if normalisation == "token":
    return total_N / jnp.maximum(jnp.sum(mask_NT, axis=-1), 1.0)
  return total_N / x_NT.shape[-1]


def sample_mean(x_N: Array, sample_mask_N: Optional[Array] = None) -> Array:
  """Mean over samples, optionally over the samples with sample_mask != 0."""
  if sample_mask_N is None:
    return jnp.mean(x_N)
  _check_shapes(x=x_N, sample_mask=sample_mask_N)
  w_N = jnp.asarray(sample_mask_N).astype(x_N.dtype)
  return jnp.sum(w_N * x_N) / jnp.maximum(jnp.sum(w_N), 1.0)


def group_baseline(rewards_GK: Array, *, leave_one_out: bool = False) -> Array:
  """Per-sample baseline `[G, K]`: the mean reward of the sample's group.

  r_bar[g] = mean_k rewards[g, k] (the report's approximation of tau log Z),
  broadcast to every sample of the group so `baseline_GK.reshape(-1)` lines up
  with `rewards_GK.reshape(-1)` as the `baseline` argument of `k15_loss`.
  leave_one_out: mean of the OTHER K - 1 rewards instead (RLOO; needs K >= 2).
  """
  rewards_GK = jnp.asarray(rewards_GK)
  if rewards_GK.ndim != 2:
    raise ValueError(f"rewards_GK must be [G, K], got shape {rewards_GK.shape}")
  k = rewards_GK.shape[1]
  sum_G1 = jnp.sum(rewards_GK, axis=1, keepdims=True)
  if leave_one_out:
    if k < 2:
      raise ValueError(f"leave_one_out baseline needs K >= 2, got K={k}")
    return (sum_G1 - rewards_GK) / (k - 1)
  return jnp.broadcast_to(sum_G1 / k, rewards_GK.shape)


def group_advantages(rewards_GK: Array, *, std_normalise: bool = False,
                     eps: float = 1e-6, leave_one_out: bool = False) -> Array:
  """A = r - group_baseline(r), optionally / (group std + eps) (GRPO)."""
  rewards_GK = jnp.asarray(rewards_GK)
  adv_GK = rewards_GK - group_baseline(rewards_GK, leave_one_out=leave_one_out)
  if std_normalise:
    adv_GK = adv_GK / (jnp.std(rewards_GK, axis=1, keepdims=True) + eps)
  return adv_GK


# ------------------------------------------------------------------ k1.5 loss


def k15_loss(logp, ref_logp, mask, rewards, baseline, tau, *,
             form: str = "squared", normalisation: str = "sequence",
             sample_mask=None, return_aux: bool = False):
  """Kimi k1.5 surrogate (report §2.3.2), mean over samples.

  Args:
    logp: `[N, T]` float, per-token log pi_theta (the trained policy).
    ref_logp: `[N, T]` float, per-token log pi_theta_i, the policy at the
      start of the iteration (the reference; no gradient flows into it).
    mask: `[N, T]` bool/float, tokens that count (see `current_segment_mask`).
    rewards: `[N]` float, final reward r (task + shaping).
    baseline: `[N]` float, r_bar, the mean reward of the sample's group
      (`group_baseline(rewards_GK).reshape(-1)`).
    tau: KL weight tau > 0 (float or scalar array).
    form: 'squared' (default) returns mean_n (A_n - tau * l_n)^2.
      'gradient' returns the eq. 3 surrogate
      -mean_n(A_n * s_n) + (tau / 2) * mean_n(l_n^2) with s_n the reduced
      log pi_theta; its gradient is the squared form's divided by 2 * tau.
    normalisation: how token terms are reduced to l_n and s_n: 'sequence'
      (default: sums, as in the report), 'token' or 'fixed' (module doc).
    sample_mask: optional `[N]`, samples that count (padding slots = 0); the
      mean is then over those samples.
    return_aux: also return a dict of scalar diagnostics.

  Here A_n = stop_gradient(rewards_n - baseline_n) and
  l_n = reduce_t mask * (logp - stop_gradient(ref_logp)).

  Returns:
    the scalar loss, or `(loss, aux)` when return_aux.
  """
  _check_choice("form", form, FORMS)
  if isinstance(tau, (int, float)) and (tau < 0 or (tau == 0 and
                                                      form == "squared")):
    raise ValueError(f"tau must be > 0 (>= 0 for form='gradient'), got {tau!r}")
  logp_NT = jnp.asarray(logp)
  ref_logp_NT = jax.lax.stop_gradient(jnp.asarray(ref_logp))
  mask_NT = jnp.asarray(mask)
  _check_shapes(logp=logp_NT, ref_logp=ref_logp_NT, mask=mask_NT)
  if logp_NT.ndim != 2:
    raise ValueError(f"logp must be [N, T], got shape {logp_NT.shape}")
  rewards_N = jnp.asarray(rewards, logp_NT.dtype)
  baseline_N = jnp.asarray(baseline, logp_NT.dtype)
  _check_shapes(rewards=rewards_N, baseline=baseline_N)
  if rewards_N.shape != logp_NT.shape[:1]:
    raise ValueError(f"rewards must be [N] = {logp_NT.shape[:1]}, got shape "
                     f"{rewards_N.shape}")

  adv_N = jax.lax.stop_gradient(rewards_N - baseline_N)
  log_ratio_N = reduce_tokens(logp_NT - ref_logp_NT, mask_NT, normalisation)
  residual_N = adv_N - tau * log_ratio_N
  squared = sample_mean(jnp.square(residual_N), sample_mask)
  if form == "squared":
    loss = squared
  else:
    seq_logp_N = reduce_tokens(logp_NT, mask_NT, normalisation)
    pg = -sample_mean(adv_N * seq_logp_N, sample_mask)
    l2 = 0.5 * tau * sample_mean(jnp.square(log_ratio_N), sample_mask)
    loss = pg + l2
  if not return_aux:
    return loss
  aux = {
      "loss": loss,
      "squared_residual": jax.lax.stop_gradient(squared),
      "log_ratio_mean": sample_mean(log_ratio_N, sample_mask),
      "log_ratio_abs_mean": sample_mean(jnp.abs(log_ratio_N), sample_mask),
      "log_ratio_sq_mean": sample_mean(jnp.square(log_ratio_N), sample_mask),
      "advantage_mean": sample_mean(adv_N, sample_mask),
      "advantage_abs_mean": sample_mean(jnp.abs(adv_N), sample_mask),
      "tokens": jnp.sum(_token_weights(mask_NT, sample_mask, logp_NT.dtype)),
      "neg_logp_token_mean": _token_mean(-logp_NT, mask_NT, sample_mask),
  }
  return loss, jax.tree_util.tree_map(jax.lax.stop_gradient, aux)


def _token_weights(mask_NT, sample_mask_N, dtype):
  w_NT = jnp.asarray(mask_NT).astype(dtype)
  if sample_mask_N is not None:
    w_NT = w_NT * jnp.asarray(sample_mask_N).astype(dtype)[:, None]
  return w_NT


def _token_mean(x_NT, mask_NT, sample_mask_N):
  """Mean of x over all selected tokens of the batch (diagnostics only)."""
  w_NT = _token_weights(mask_NT, sample_mask_N, x_NT.dtype)
  return jnp.sum(w_NT * x_NT) / jnp.maximum(jnp.sum(w_NT), 1.0)


# ------------------------------------------------------- ablations / baselines


def rest_loss(logp, mask, rewards, *, threshold: float = 0.0,
              normalisation: str = "sequence", sample_mask=None,
              return_aux: bool = False):
  """Positive-only (ReST) loss: NLL of the samples with reward > threshold.

  The "no negative gradient" ablation (report §3.5): wrong samples are simply
  dropped. loss = -sum_n sel_n * s_n / max(sum_n sel_n, 1), with
  s_n = reduce_t mask * logp (see `normalisation`) and
  sel_n = (rewards_n > threshold) [* sample_mask_n].

  Shapes: logp, mask `[N, T]`; rewards `[N]`. With the default threshold 0,
  correct answers (total reward ~1) are kept and wrong ones (<= 0) dropped.
  """
  logp_NT = jnp.asarray(logp)
  _check_shapes(logp=logp_NT, mask=mask)
  rewards_N = jnp.asarray(rewards)
  if rewards_N.shape != logp_NT.shape[:1]:
    raise ValueError(f"rewards must be [N] = {logp_NT.shape[:1]}, got shape "
                     f"{rewards_N.shape}")
  sel_N = (rewards_N > threshold).astype(logp_NT.dtype)
  if sample_mask is not None:
    _check_shapes(rewards=rewards_N, sample_mask=sample_mask)
    sel_N = sel_N * jnp.asarray(sample_mask).astype(logp_NT.dtype)
  seq_logp_N = reduce_tokens(logp_NT, mask, normalisation)
  n_sel = jnp.sum(sel_N)
  loss = -jnp.sum(sel_N * seq_logp_N) / jnp.maximum(n_sel, 1.0)
  if not return_aux:
    return loss
  return loss, {"loss": loss, "selected_fraction": n_sel / sel_N.shape[0]}


def ppo_clip_loss(logp, behaviour_logp, mask, advantages, *,
                  clip_eps: float = 0.2, clip_eps_high: Optional[float] = None,
                  normalisation: str = "token", ref_logp=None,
                  kl_coef: float = 0.0, sample_mask=None,
                  return_aux: bool = False):
  """PPO-clip / GRPO policy loss for comparison (not in the report).

  Per token: rho = exp(logp - behaviour_logp),
  obj = min(rho * A, clip(rho, 1 - clip_eps, 1 + clip_eps_high) * A);
  loss = -mean_n reduce_t(mask * obj) [+ kl_coef * mean_n reduce_t(mask * k3)],
  with k3 = exp(ref - logp) - (ref - logp) - 1 (GRPO's KL estimator to
  `ref_logp`, required when kl_coef > 0).

  Shapes: logp, behaviour_logp, mask (and ref_logp) `[N, T]`; advantages `[N]`
  (e.g. `group_advantages(rewards_GK, std_normalise=True).reshape(-1)`).
  Default normalisation 'token' is GRPO's per-sample token mean.
  """
  logp_NT = jnp.asarray(logp)
  beh_NT = jax.lax.stop_gradient(jnp.asarray(behaviour_logp))
  _check_shapes(logp=logp_NT, behaviour_logp=beh_NT, mask=mask)
  adv_N = jax.lax.stop_gradient(jnp.asarray(advantages, logp_NT.dtype))
  if adv_N.shape != logp_NT.shape[:1]:
    raise ValueError(f"advantages must be [N] = {logp_NT.shape[:1]}, got "
                     f"shape {adv_N.shape}")
  high = clip_eps if clip_eps_high is None else clip_eps_high
  ratio_NT = jnp.exp(logp_NT - beh_NT)
  adv_NT = adv_N[:, None]
  unclipped_NT = ratio_NT * adv_NT
  clipped_NT = jnp.clip(ratio_NT, 1.0 - clip_eps, 1.0 + high) * adv_NT
  obj_NT = jnp.minimum(unclipped_NT, clipped_NT)
  pg = -sample_mean(reduce_tokens(obj_NT, mask, normalisation), sample_mask)
  loss = pg
  kl = jnp.zeros((), logp_NT.dtype)
  if ref_logp is not None:
    ref_NT = jax.lax.stop_gradient(jnp.asarray(ref_logp))
    _check_shapes(logp=logp_NT, ref_logp=ref_NT)
    d_NT = ref_NT - logp_NT
    k3_NT = jnp.exp(d_NT) - d_NT - 1.0
    kl = sample_mean(reduce_tokens(k3_NT, mask, normalisation), sample_mask)
    loss = loss + kl_coef * kl
  elif isinstance(kl_coef, (int, float)) and kl_coef != 0:
    raise ValueError("ppo_clip_loss: kl_coef > 0 needs ref_logp")
  if not return_aux:
    return loss
  clipped_frac = (unclipped_NT != obj_NT).astype(logp_NT.dtype)
  log_rho_NT = logp_NT - beh_NT
  aux = {
      "loss": loss,
      "pg_loss": pg,
      "kl": kl,
      "clip_fraction": _token_mean(clipped_frac, mask, sample_mask),
      "ratio_mean": _token_mean(ratio_NT, mask, sample_mask),
      # k3 estimate of KL(behaviour || policy), per token.
      "approx_kl": _token_mean(ratio_NT - 1.0 - log_rho_NT, mask, sample_mask),
  }
  return loss, jax.tree_util.tree_map(jax.lax.stop_gradient, aux)


def dpo_loss(policy_chosen_logp, policy_rejected_logp, ref_chosen_logp,
             ref_rejected_logp, beta, *, return_aux: bool = False):
  """DPO loss (long2short, report §2.4) on sequence log-probs `[P]`.

  loss = mean_p -log sigmoid(beta * ((pc - rc) - (pr - rr))), where pc/pr are
  the policy's and rc/rr the frozen reference's summed log-probs of the chosen
  (shortest correct) and rejected responses. The reference gets no gradient.
  """
  pc_P = jnp.asarray(policy_chosen_logp)
  pr_P = jnp.asarray(policy_rejected_logp)
  rc_P = jax.lax.stop_gradient(jnp.asarray(ref_chosen_logp))
  rr_P = jax.lax.stop_gradient(jnp.asarray(ref_rejected_logp))
  _check_shapes(policy_chosen_logp=pc_P, policy_rejected_logp=pr_P,
                ref_chosen_logp=rc_P, ref_rejected_logp=rr_P)
  if pc_P.ndim != 1:
    raise ValueError(f"dpo_loss expects sequence log-probs of shape [P], got "
                     f"{pc_P.shape}")
  if isinstance(beta, (int, float)) and beta <= 0:
    raise ValueError(f"beta must be > 0, got {beta!r}")
  chosen_P = beta * (pc_P - rc_P)
  rejected_P = beta * (pr_P - rr_P)
  margin_P = chosen_P - rejected_P
  loss = -jnp.mean(jax.nn.log_sigmoid(margin_P))
  if not return_aux:
    return loss
  aux = {
      "loss": loss,
      "chosen_reward": jnp.mean(chosen_P),
      "rejected_reward": jnp.mean(rejected_P),
      "margin": jnp.mean(margin_P),
      "accuracy": jnp.mean((margin_P > 0).astype(pc_P.dtype)),
  }
  return loss, jax.tree_util.tree_map(jax.lax.stop_gradient, aux)


# ------------------------------------------------------------------ dispatch


def policy_loss(cfg: LossConfig, logp, ref_logp, mask, rewards_GK, *,
                sample_mask=None, return_aux: bool = False):
  """The loss selected by `cfg.algorithm`, from per-group rewards.

  logp, ref_logp, mask: `[N, T]` with N = G * K, samples ordered group-major
  (sample n belongs to group n // K). rewards_GK: `[G, K]` final rewards.
  For 'ppo' the iteration-start policy `ref_logp` is the behaviour policy
  (synchronous loop: it generated the current segment up to sampler
  numerics). Returns like `k15_loss`.
  """
  rewards_GK = jnp.asarray(rewards_GK, jnp.asarray(logp).dtype)
  if rewards_GK.ndim != 2 or rewards_GK.size != jnp.shape(logp)[0]:
    raise ValueError(f"rewards_GK must be [G, K] with G * K = N = "
                     f"{jnp.shape(logp)[0]}, got shape {rewards_GK.shape}")
  rewards_N = rewards_GK.reshape(-1)
  if cfg.algorithm == "k15":
    baseline_N = group_baseline(rewards_GK).reshape(-1)
    return k15_loss(logp, ref_logp, mask, rewards_N, baseline_N, cfg.tau,
                    form=cfg.form, normalisation=cfg.normalisation,
                    sample_mask=sample_mask, return_aux=return_aux)
  if cfg.algorithm == "rest":
    return rest_loss(logp, mask, rewards_N, threshold=cfg.rest_threshold,
                     normalisation=cfg.normalisation, sample_mask=sample_mask,
                     return_aux=return_aux)
  adv_N = group_advantages(
      rewards_GK, std_normalise=cfg.advantage_std_norm).reshape(-1)
  return ppo_clip_loss(
      logp, ref_logp, mask, adv_N, clip_eps=cfg.clip_eps,
      clip_eps_high=cfg.clip_eps_high, normalisation=cfg.normalisation,
      ref_logp=ref_logp if cfg.kl_coef > 0 else None, kl_coef=cfg.kl_coef,
      sample_mask=sample_mask, return_aux=return_aux)
