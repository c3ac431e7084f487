"""The loss the RL update minimises, selected by `LossConfig.algorithm`.

The one dispatcher: the train step (rl/update.py) calls `policy_loss` on
each microbatch and weights microbatch gradients by `loss_weights`.

Axis legend: N rows, T tokens per row, S sample slots per row (1 when
samples are not packed).
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
  normalised when cfg.advantage_std_norm). Samples are reduced per segment
  of the batch's rows (`segment_ids_NT`; per-sample fields `[N, S]`), so
  packed and one-sample rows give the same loss. Returns the scalar loss, or
  `(loss, aux)` when return_aux.
  """
  common = dict(normalisation=cfg.normalisation, sample_mask=batch.sample_mask_NS,
                segment_ids=batch.segment_ids_NT, return_aux=return_aux)
  if cfg.algorithm == "k15":
    return k15_surrogate(logp_NT, batch.ref_logp_NT, batch.mask_NT, batch.advantages_NS,
                         cfg.tau, form=cfg.form, **common)
  if cfg.algorithm == "rest":
    return rest_loss(logp_NT, batch.mask_NT, batch.rewards_NS, threshold=cfg.rest_threshold,
                     **common)
  return ppo_clip_loss(logp_NT, batch.behaviour_logp_NT, batch.mask_NT, batch.advantages_NS,
                       clip_eps=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high,
                       ref_logp=batch.ref_logp_NT if cfg.kl_coef > 0 else None,
                       kl_coef=cfg.kl_coef, **common)


def loss_weights(cfg: LossConfig, batch) -> jax.Array:
  """float32 `[N, S]`: the samples `policy_loss` averages over (its denominator).

  ReST averages over the selected (positive) samples only; the others over
  every valid sample. The train step weights microbatch gradients by these
  counts, so the accumulated gradient is that of the whole minibatch's mean.
  """
  if cfg.algorithm == "rest":
    return batch.sample_mask_NS * (batch.rewards_NS > cfg.rest_threshold).astype(jnp.float32)
  return batch.sample_mask_NS
