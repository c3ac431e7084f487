"""The loss the RL update minimises, selected by `LossConfig.algorithm`.

Axis legend: N samples (G * K, group-major), T tokens, G groups, K samples
per group.
"""
from __future__ import annotations

import jax.numpy as jnp

from kimi_jax.rl.losses.config import LossConfig
from kimi_jax.rl.losses.policy import k15_loss, ppo_clip_loss, rest_loss
from kimi_jax.rl.losses.reduce import group_advantages, group_baseline


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
