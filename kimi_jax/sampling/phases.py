"""Decode loops over a KV cache grown in phases.

A decode step's attention reads every slot of the cache, filled or not. Run
the loop in phases instead, each over a cache just large enough for the
tokens it writes, and early tokens attend over fewer slots. Used by the
rollout segment (`segment.sample_segment`) and by `sampler.decode`.
"""
from __future__ import annotations

from typing import Callable

import jax


def phase_slots(width: int, new_slots: int, phases: int) -> tuple[int, ...]:
  """Cache sizes of the decode phases: `W + ceil(N * j / phases)` for j = 1..phases.

  Phase j decodes while the next token's slot is below its size, so early
  tokens attend over a short cache and only the last phase over all W + N
  slots: with W << N about (phases - 1) / (2 * phases) of the attention
  reads are saved. Each phase costs one copy of the cache when it grows and
  one more copy of the decode body in the compiled program.
  """
  if phases < 1:
    raise ValueError(f"decode_phases must be >= 1, got {phases}")
  return tuple(sorted({width + -(-new_slots * j // phases) for j in range(1, phases + 1)}))


def phased_while_loop(cond: Callable, body: Callable, carry: tuple, bounds: tuple[int, ...],
                      place: Callable = lambda cache: cache) -> tuple:
  """`lax.while_loop(cond, body, carry)` run once per cache size in `bounds`.

  `carry[1]` is the `KVCache`, already `bounds[0]` slots long; between phases
  it is resized to the next size and passed through `place` (e.g. a sharding
  constraint). Every phase but the last also stops once the next token's
  slot falls outside its cache.
  """
  for j, slots in enumerate(bounds):
    if j:
      first, cache, *rest = carry
      carry = (first, place(cache.resize(slots)), *rest)
    phase_cond = cond if slots == bounds[-1] else (
        lambda c, slots=slots: cond(c) & (c[1].index < slots))
    carry = jax.lax.while_loop(phase_cond, body, carry)
  return carry
