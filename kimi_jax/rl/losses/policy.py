"""Policy losses: the k1.5 mirror-descent surrogate, ReST and PPO-clip.

Axis legend: N rows (one sample each, or packed), T tokens per row, S sample
slots per packed row.

Every loss takes `segment_ids=None` (one sample per row; per-sample arguments
`[N]`) or packed rows: `segment_ids` int `[N, T]` (s + 1 on the tokens of the
row's sample slot s, 0 on padding) and per-sample arguments `[N, S]`. Both
give the same value for the same samples (tests/test_packing.py).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from kimi_jax.rl.losses.config import FORMS, check_choice
from kimi_jax.rl.losses.reduce import (check_shapes, per_sample, reduce_tokens, sample_mean,
                                       to_tokens, token_mean, token_weights)


def k15_loss(logp, ref_logp, mask, rewards, baseline, tau, *,
             form: str = "squared", normalisation: str = "sequence",
             sample_mask=None, segment_ids=None, return_aux: bool = False):
  """Kimi k1.5 surrogate (report §2.3.2), mean over samples.

  Args:
    logp: `[N, T]` float, per-token log pi_theta (the trained policy).
    ref_logp: `[N, T]` float, per-token log pi_theta_i, the policy at the
      start of the iteration (the reference; no gradient flows into it).
    mask: `[N, T]` bool/float, the tokens that count.
    rewards: `[N]` float, final reward r (task + shaping).
    baseline: `[N]` float, r_bar, the mean reward of the sample's group
      (`group_baseline(rewards_GK).reshape(-1)`).
    tau: KL weight tau > 0 (float or scalar array).
    form: 'squared' (default) returns mean_n (A_n - tau * l_n)^2.
      'gradient' returns the eq. 3 surrogate
      -mean_n(A_n * s_n) + (tau / 2) * mean_n(l_n^2) with s_n the reduced
      log pi_theta; its gradient is the squared form's divided by 2 * tau.
    normalisation: how token terms are reduced to l_n and s_n: 'sequence'
      (default: sums, as in the report), 'token' or 'fixed' (package doc).
    sample_mask: optional `[N]`, samples that count (padding slots = 0); the
      mean is then over those samples.
    segment_ids: optional int `[N, T]`: packed rows (module docstring);
      rewards, baseline and sample_mask are then `[N, S]`.
    return_aux: also return a dict of scalar diagnostics.

  Here A_n = stop_gradient(rewards_n - baseline_n) and
  l_n = reduce_t mask * (logp - stop_gradient(ref_logp)).

  Returns:
    the scalar loss, or `(loss, aux)` when return_aux.
  """
  rewards = jnp.asarray(rewards, jnp.asarray(logp).dtype)
  baseline = jnp.asarray(baseline, rewards.dtype)
  check_shapes(rewards=rewards, baseline=baseline)
  return k15_surrogate(logp, ref_logp, mask, rewards - baseline, tau, form=form,
                       normalisation=normalisation, sample_mask=sample_mask,
                       segment_ids=segment_ids, return_aux=return_aux)


def k15_surrogate(logp, ref_logp, mask, advantages, tau, *, form: str = "squared",
                  normalisation: str = "sequence", sample_mask=None, segment_ids=None,
                  return_aux: bool = False):
  """`k15_loss` from precomputed advantages A_n, `[N]` or `[N, S]` (e.g.
  r - r_bar divided by the group's std, `group_advantages`); the other
  arguments as there."""
  check_choice("form", form, FORMS)
  if isinstance(tau, (int, float)) and (tau < 0 or (tau == 0 and form == "squared")):
    raise ValueError(f"tau must be > 0 (>= 0 for form='gradient'), got {tau!r}")
  logp_NT = jnp.asarray(logp)
  ref_logp_NT = jax.lax.stop_gradient(jnp.asarray(ref_logp))
  mask_NT = jnp.asarray(mask)
  check_shapes(logp=logp_NT, ref_logp=ref_logp_NT, mask=mask_NT)
  if logp_NT.ndim != 2:
    raise ValueError(f"logp must be [N, T], got shape {logp_NT.shape}")
  adv = jax.lax.stop_gradient(
      per_sample("rewards / advantages", advantages, logp_NT, segment_ids).astype(logp_NT.dtype))
  seg = dict(segment_ids=segment_ids, num_samples=adv.shape[-1])

  log_ratio = reduce_tokens(logp_NT - ref_logp_NT, mask_NT, normalisation, **seg)
  residual = adv - tau * log_ratio
  squared = sample_mean(jnp.square(residual), sample_mask)
  if form == "squared":
    loss = squared
  else:
    seq_logp = reduce_tokens(logp_NT, mask_NT, normalisation, **seg)
    pg = -sample_mean(adv * seq_logp, sample_mask)
    l2 = 0.5 * tau * sample_mean(jnp.square(log_ratio), sample_mask)
    loss = pg + l2
  if not return_aux:
    return loss
  aux = {
      "loss": loss,
      "squared_residual": jax.lax.stop_gradient(squared),
      "log_ratio_mean": sample_mean(log_ratio, sample_mask),
      "log_ratio_abs_mean": sample_mean(jnp.abs(log_ratio), sample_mask),
      "log_ratio_sq_mean": sample_mean(jnp.square(log_ratio), sample_mask),
      "advantage_mean": sample_mean(adv, sample_mask),
      "advantage_abs_mean": sample_mean(jnp.abs(adv), sample_mask),
      "tokens": jnp.sum(token_weights(mask_NT, sample_mask, logp_NT.dtype, segment_ids)),
      "neg_logp_token_mean": token_mean(-logp_NT, mask_NT, sample_mask, segment_ids),
  }
  return loss, jax.tree_util.tree_map(jax.lax.stop_gradient, aux)


# ------------------------------------------------------- ablations / baselines


def rest_loss(logp, mask, rewards, *, threshold: float = 0.0,
              normalisation: str = "sequence", sample_mask=None, segment_ids=None,
              return_aux: bool = False):
  """Positive-only (ReST) loss: NLL of the samples with reward > threshold.

  The "no negative gradient" ablation (report §3.5): wrong samples are simply
  dropped. loss = -sum_n sel_n * s_n / max(sum_n sel_n, 1), with
  s_n = reduce_t mask * logp (see `normalisation`) and
  sel_n = (rewards_n > threshold) [* sample_mask_n].

  Shapes: logp, mask `[N, T]`; rewards `[N]` (`[N, S]` with segment_ids).
  With the default threshold 0, correct answers (total reward ~1) are kept
  and wrong ones (<= 0) dropped.
  """
  logp_NT = jnp.asarray(logp)
  check_shapes(logp=logp_NT, mask=mask)
  rewards = per_sample("rewards", rewards, logp_NT, segment_ids)
  sel = (rewards > threshold).astype(logp_NT.dtype)
  if sample_mask is not None:
    check_shapes(rewards=rewards, sample_mask=sample_mask)
    sel = sel * jnp.asarray(sample_mask).astype(logp_NT.dtype)
  seq_logp = reduce_tokens(logp_NT, mask, normalisation, segment_ids=segment_ids,
                           num_samples=rewards.shape[-1])
  n_sel = jnp.sum(sel)
  loss = -jnp.sum(sel * seq_logp) / jnp.maximum(n_sel, 1.0)
  if not return_aux:
    return loss
  valid = sel.size if sample_mask is None else jnp.maximum(jnp.sum(sample_mask), 1.0)
  return loss, {"loss": loss, "selected_fraction": n_sel / valid}


def ppo_clip_loss(logp, behaviour_logp, mask, advantages, *,
                  clip_eps: float = 0.2, clip_eps_high: Optional[float] = None,
                  normalisation: str = "token", ref_logp=None,
                  kl_coef: float = 0.0, sample_mask=None, segment_ids=None,
                  return_aux: bool = False):
  """PPO-clip / GRPO policy loss for comparison (not in the report).

  Per token: rho = exp(logp - behaviour_logp),
  obj = min(rho * A, clip(rho, 1 - clip_eps, 1 + clip_eps_high) * A);
  loss = -mean_n reduce_t(mask * obj) [+ kl_coef * mean_n reduce_t(mask * k3)],
  with k3 = exp(ref - logp) - (ref - logp) - 1 (GRPO's KL estimator to
  `ref_logp`, required when kl_coef > 0).

  Shapes: logp, behaviour_logp, mask (and ref_logp) `[N, T]`; advantages `[N]`
  (`[N, S]` with segment_ids; e.g. `group_advantages(rewards_GK,
  std_normalise=True).reshape(-1)`). Default normalisation 'token' is GRPO's
  per-sample token mean.
  """
  logp_NT = jnp.asarray(logp)
  beh_NT = jax.lax.stop_gradient(jnp.asarray(behaviour_logp))
  check_shapes(logp=logp_NT, behaviour_logp=beh_NT, mask=mask)
  adv = jax.lax.stop_gradient(
      per_sample("advantages", advantages, logp_NT, segment_ids).astype(logp_NT.dtype))
  seg = dict(segment_ids=segment_ids, num_samples=adv.shape[-1])
  high = clip_eps if clip_eps_high is None else clip_eps_high
  ratio_NT = jnp.exp(logp_NT - beh_NT)
  adv_NT = to_tokens(adv, segment_ids)
  unclipped_NT = ratio_NT * adv_NT
  clipped_NT = jnp.clip(ratio_NT, 1.0 - clip_eps, 1.0 + high) * adv_NT
  obj_NT = jnp.minimum(unclipped_NT, clipped_NT)
  pg = -sample_mean(reduce_tokens(obj_NT, mask, normalisation, **seg), sample_mask)
  loss = pg
  kl = jnp.zeros((), logp_NT.dtype)
  if ref_logp is not None:
    ref_NT = jax.lax.stop_gradient(jnp.asarray(ref_logp))
    check_shapes(logp=logp_NT, ref_logp=ref_NT)
    d_NT = ref_NT - logp_NT
    k3_NT = jnp.exp(d_NT) - d_NT - 1.0
    kl = sample_mean(reduce_tokens(k3_NT, mask, normalisation, **seg), sample_mask)
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
      "clip_fraction": token_mean(clipped_frac, mask, sample_mask, segment_ids),
      "ratio_mean": token_mean(ratio_NT, mask, sample_mask, segment_ids),
      # k3 estimate of KL(behaviour || policy), per token.
      "approx_kl": token_mean(ratio_NT - 1.0 - log_rho_NT, mask, sample_mask, segment_ids),
  }
  return loss, jax.tree_util.tree_map(jax.lax.stop_gradient, aux)
