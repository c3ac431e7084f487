"""Policy losses: the k1.5 mirror-descent surrogate and its comparisons.

`from kimi_jax.rl import losses`; `losses.k15_loss(...)`, `losses.dpo_loss(...)`.
One module per job:
  config.py    LossConfig (which loss, its options)
  reduce.py    per-sample reductions of token terms, masks, group statistics
  policy.py    k15_loss (report §2.3.2), rest_loss, ppo_clip_loss
  dpo.py       dpo_loss (long2short)
  dispatch.py  policy_loss: the loss `LossConfig.algorithm` selects

Axis legend: N samples in the batch (N = G * K when grouped), T tokens per
sample, G prompts (groups), K samples per prompt, P preference pairs.

All functions are pure and jittable; string / bool options are Python values
(close over them or mark them static). Log-probs are per token, float32,
`logp[n, t] = log pi(token t of sample n | prefix)`; `mask[n, t]` (bool or
float) selects the tokens that enter the loss. Nothing here reads the group
structure except `group_baseline` / `group_advantages`, which run on the host
(numpy) when the batch is built: the baseline and advantages are computed
there once and reach the jitted losses per sample.

Masks and partial rollouts: the caller decides which tokens count. The
trainer's rule is `rl.loss_segments` (`batch.loss_mask`, the one
implementation); masked-out tokens get zero gradient and do not enter the
sequence log-ratio either.

Packed rows: every loss also takes `segment_ids` int `[N, T]` (s + 1 on the
tokens of sample slot s of row n, 0 = padding) with per-sample arguments
`[N, S]`: several samples share a row instead of each being padded to T
(`rl.samples_per_row`). Per-sample sums become per-segment sums
(`reduce_tokens`); nothing else changes.

Normalisation (how token terms become one number per sample), shared by all
losses here:
  'sequence': sum over the sample's masked tokens (the report: log pi(y, z|x)
              is the whole-sequence log-prob). Default for k15 and ReST.
  'token':    that sum divided by the sample's number of masked tokens
              (max 1), i.e. the per-sample token mean (GRPO style).
  'fixed':    that sum divided by T, the static width of the batch (the
              rollout max length in the trainer, packed or not), a
              length-independent constant (Dr. GRPO style).
"""
from kimi_jax.rl.losses.config import ALGORITHMS, FORMS, NORMALISATIONS, LossConfig
from kimi_jax.rl.losses.dispatch import loss_weights, policy_loss
from kimi_jax.rl.losses.dpo import dpo_loss
from kimi_jax.rl.losses.policy import k15_loss, k15_surrogate, ppo_clip_loss, rest_loss
from kimi_jax.rl.losses.reduce import (group_advantages, group_baseline, per_sample_sum,
                                       reduce_tokens, sample_mean)

__all__ = ["ALGORITHMS", "FORMS", "NORMALISATIONS", "LossConfig", "dpo_loss", "group_advantages",
           "group_baseline", "k15_loss", "k15_surrogate", "loss_weights", "policy_loss",
           "per_sample_sum", "ppo_clip_loss", "reduce_tokens", "rest_loss", "sample_mean"]
