"""The loss the RL update minimises, selected by `LossConfig.algorithm`.

The one dispatcher: the train step (rl/update.py) calls `policy_loss` on
each microbatch and weights microbatch gradients by `loss_weights`.

Axis legend: N samples, T tokens per sample.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kimi_jax.rl.losses.config import LossConfig
from kimi_jax.rl.losses.policy import k15_surrogate, ppo_clip_loss, rest_loss


def policy_loss(cfg: LossConfig, logp_NT: jax.Array, batch, *, return_aux: bool = False):
  """The configured loss of `logp_NT` (float32 `[N, T]`, the trained policy's
  per-token log-probs of `batch.tokens_NT`) on `batch`, an `rl.batch.Batch`:

    k15   k15_surrogate(advantages, reference = ref_logp_NT), cfg.tau / form
    rest  rest_loss: NLL of the samples with reward > cfg.rest_threshold
    ppo   ppo_clip_loss: ratio to the behaviour policy behaviour_logp_NT
          (the sampler's log-probs: right for segments carried over from
          older iterations too), + cfg.kl_coef * k3 KL to the iteration-start
          policy ref_logp_NT

  Advantages come with the batch (`group_advantages` on the host, std-
  normalised when cfg.advantage_std_norm). Returns the scalar loss, or
  `(loss, aux)` when return_aux.
  """
  common = dict(normalisation=cfg.normalisation, sample_mask=batch.sample_mask_N,
                return_aux=return_aux)
  if cfg.algorithm == "k15":
    return k15_surrogate(logp_NT, batch.ref_logp_NT, batch.mask_NT, batch.advantages_N,
                         cfg.tau, form=cfg.form, **common)
  if cfg.algorithm == "rest":
    return rest_loss(logp_NT, batch.mask_NT, batch.rewards_N, threshold=cfg.rest_threshold,
                     **common)
  return ppo_clip_loss(logp_NT, batch.behaviour_logp_NT, batch.mask_NT, batch.advantages_N,
                       clip_eps=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high,
                       ref_logp=batch.ref_logp_NT if cfg.kl_coef > 0 else None,
                       kl_coef=cfg.kl_coef, **common)


def loss_weights(cfg: LossConfig, batch) -> jax.Array:
  """float32 `[N]`: the samples `policy_loss` averages over (its denominator).

  ReST averages over the selected (positive) samples only; the others over
  every valid sample. The train step weights microbatch gradients by these
  counts, so the accumulated gradient is that of the whole minibatch's mean.
  """
  if cfg.algorithm == "rest":
    return batch.sample_mask_N * (batch.rewards_N > cfg.rest_threshold).astype(jnp.float32)
  return batch.sample_mask_N
