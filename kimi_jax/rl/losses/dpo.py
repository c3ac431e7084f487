"""DPO (long2short, report §2.4) on sequence log-probs.

Axis legend: P preference pairs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from kimi_jax.rl.losses.reduce import check_shapes


def dpo_loss(policy_chosen_logp, policy_rejected_logp, ref_chosen_logp,
             ref_rejected_logp, beta, *, return_aux: bool = False):
  """DPO loss (long2short, report §2.4) on sequence log-probs `[P]`.

  loss = mean_p -log sigmoid(beta * ((pc - rc) - (pr - rr))), where pc/pr are
  the policy's and rc/rr the frozen reference's summed log-probs of the chosen
  (shortest correct) and rejected responses. The reference gets no gradient.
  From token log-probs of packed rows (several responses per row, segment
  ids), `reduce_tokens(logp_NT, response_mask_NT, segment_ids=...,
  num_samples=S)` gives each response's sum `[N, S]`; pick the pairs' entries
  from it (tests/test_packing.py checks packed = unpacked).
  """
  pc_P = jnp.asarray(policy_chosen_logp)
  pr_P = jnp.asarray(policy_rejected_logp)
  rc_P = jax.lax.stop_gradient(jnp.asarray(ref_chosen_logp))
  rr_P = jax.lax.stop_gradient(jnp.asarray(ref_rejected_logp))
  check_shapes(policy_chosen_logp=pc_P, policy_rejected_logp=pr_P,
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
