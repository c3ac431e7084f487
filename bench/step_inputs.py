"""The inputs of one RL train step, shared by bench/train_step.py and
bench/long_context.py (a module without flags, so both can import it)."""
from __future__ import annotations


def step_and_inputs(cfg, rows: int, length: int, *, prompt_tokens: int, rewards=None):
  """`(train_step, state, batch)`: one jitted `make_train_step` (k1.5 loss,
  AdamW, one microbatch of all `rows`), fresh state, and a device batch of
  random tokens, one sample a row, the first `prompt_tokens` outside the
  loss; `rewards` `[rows]` default random 0 / 1 (advantages r - mean)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from kimi_jax.models.transformer import init_params
  from kimi_jax.rl import losses
  from kimi_jax.rl.batch import Batch
  from kimi_jax.rl.update import TrainState, UpdateConfig, make_optimizer, make_train_step

  B, T = rows, length
  ucfg = UpdateConfig(microbatch_size=B)
  opt = make_optimizer(ucfg)
  step = make_train_step(cfg, losses.LossConfig(), ucfg, opt)
  params = init_params(cfg, jax.random.PRNGKey(0))
  state = TrainState(params=params, opt_state=opt.init(params), step=jnp.zeros((), jnp.int32),
                     skipped=jnp.zeros((), jnp.int32))
  rng = np.random.default_rng(0)
  mask = np.ones((B, T), np.float32)
  mask[:, :prompt_tokens] = 0.0
  if rewards is None:
    rewards = rng.integers(0, 2, B).astype(np.float32)
  rewards = np.asarray(rewards, np.float32)
  batch = jax.device_put(Batch(
      tokens_NT=rng.integers(3, cfg.vocab_size, (B, T)).astype(np.int32),
      positions_NT=np.tile(np.arange(T, dtype=np.int32), (B, 1)),
      segment_ids_NT=np.ones((B, T), np.int32), mask_NT=mask,
      ref_logp_NT=np.full((B, T), -3.0, np.float32),
      behaviour_logp_NT=np.full((B, T), -3.0, np.float32), rewards_NS=rewards[:, None],
      advantages_NS=(rewards - rewards.mean())[:, None], sample_mask_NS=np.ones((B, 1), np.float32)))
  return step, state, batch
