"""Memory of the jitted RL functions at shapes too big to run: compile only.

Each function lowers and compiles one of the project's own jitted functions
with abstract arguments (`jax.ShapeDtypeStruct`: nothing is allocated) and
returns XLA's `memory_analysis()` in bytes:

  temp      the temporary buffers of the program (activations, what
            autodiff keeps for the backward pass, gradient accumulators)
  argument  its inputs (params, optimizer state, batch / cache)
  output    its outputs
  alias     output bytes that reuse donated inputs

Used by `bench/long_context.py` (how memory grows with the sequence) and by
tests/test_recipe_memory.py (each real-model recipe's train step compiled
SPMD under its mesh against the per-device memory the recipe states). XLA
reports a peak over the program, so compare whole programs: differences of
two peaks do not split memory into parts.
"""
from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Optional

import jax
import jax.numpy as jnp

from kimi_jax.models.transformer import ModelConfig, init_cache, init_params
from kimi_jax.rl import losses
from kimi_jax.rl.batch import Batch
from kimi_jax.rl.update import (TrainState, UpdateConfig, make_optimizer, make_ref_logprobs,
                                make_train_step)

if TYPE_CHECKING:
  from kimi_jax.parallel import Layout


@dataclasses.dataclass(frozen=True)
class Memory:
  """Bytes of one compiled program (see the module docstring)."""
  temp: int
  argument: int
  output: int
  alias: int
  compile_s: float

  @property
  def peak(self) -> int:
    """What the program needs live at once, at most: inputs + outputs not
    aliased onto inputs + temporaries."""
    return self.argument + self.output - self.alias + self.temp

  def as_dict(self) -> dict:
    return dict(temp=self.temp, argument=self.argument, output=self.output, alias=self.alias,
                peak=self.peak, compile_s=round(self.compile_s, 2))


def _analyse(lowered) -> Memory:
  t = time.perf_counter()
  compiled = lowered.compile()
  seconds = time.perf_counter() - t
  m = compiled.memory_analysis()
  return Memory(temp=int(m.temp_size_in_bytes), argument=int(m.argument_size_in_bytes),
                output=int(m.output_size_in_bytes), alias=int(m.alias_size_in_bytes),
                compile_s=seconds)


def abstract_params(cfg: ModelConfig):
  """`jax.ShapeDtypeStruct` params of `cfg` (nothing allocated)."""
  return jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))


def abstract_batch(rows: int, length: int, samples_per_row: int = 1) -> Batch:
  """A `Batch` of `jax.ShapeDtypeStruct`s: `rows` rows of `length` tokens."""
  def tok(dtype):
    return jax.ShapeDtypeStruct((rows, length), dtype)

  def per_sample(dtype):
    return jax.ShapeDtypeStruct((rows, samples_per_row), dtype)
  return Batch(tokens_NT=tok(jnp.int32), positions_NT=tok(jnp.int32),
               segment_ids_NT=tok(jnp.int32), mask_NT=tok(jnp.float32),
               ref_logp_NT=tok(jnp.float32), behaviour_logp_NT=tok(jnp.float32),
               rewards_NS=per_sample(jnp.float32), advantages_NS=per_sample(jnp.float32),
               sample_mask_NS=per_sample(jnp.float32))


def train_step_memory(cfg: ModelConfig, length: int, *, rows: int = 1,
                      loss_cfg: Optional[losses.LossConfig] = None,
                      update_cfg: Optional[UpdateConfig] = None,
                      layout: Optional["Layout"] = None) -> Memory:
  """`make_train_step` (one microbatch of `rows` x `length` tokens unless
  `update_cfg` says otherwise), compiled for abstract state and batch.

  layout: a training `parallel.Layout`: the step is compiled SPMD over its
  mesh and the numbers are those of ONE device (its shards of params,
  optimizer state and rows)."""
  loss_cfg = loss_cfg or losses.LossConfig()
  update_cfg = update_cfg or UpdateConfig(microbatch_size=rows)
  optimizer = make_optimizer(update_cfg)
  step = make_train_step(cfg, loss_cfg, update_cfg, optimizer, layout)
  params = abstract_params(cfg)
  scalar = jax.ShapeDtypeStruct((), jnp.int32)
  state = TrainState(params=params, opt_state=jax.eval_shape(optimizer.init, params),
                     step=scalar, skipped=scalar)
  return _analyse(step.lower(state, abstract_batch(rows, length)))


def ref_logprobs_memory(cfg: ModelConfig, length: int, *, rows: int = 1) -> Memory:
  """`make_ref_logprobs` (the reference pass: forward only) on one microbatch."""
  fn = make_ref_logprobs(cfg, rows)
  b = abstract_batch(rows, length)
  return _analyse(fn.lower(abstract_params(cfg), b.tokens_NT, b.positions_NT,
                           b.segment_ids_NT))


def prefill_memory(cfg: ModelConfig, length: int, *, rows: int = 1) -> Memory:
  """`sampling.sampler.prefill` of `rows` prompts of `length` tokens into a
  cache of `length` slots (`cfg.prefill_chunk` tokens at a time)."""
  from kimi_jax.models.transformer import Transformer  # pylint: disable=import-outside-toplevel
  from kimi_jax.sampling import sampler  # pylint: disable=import-outside-toplevel
  model = Transformer(cfg)
  cache = jax.eval_shape(lambda: init_cache(cfg, rows, length))
  tokens = jax.ShapeDtypeStruct((rows, length), jnp.int32)
  fn = jax.jit(lambda p, t, c: sampler.prefill(model, p, t, c), donate_argnums=(2,))
  return _analyse(fn.lower(abstract_params(cfg), tokens, cache))
