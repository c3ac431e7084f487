"""`jax.jit` for token-by-token decode programs, with XLA options chosen per backend.

XLA's CPU backend hands matmuls to YNNPACK by default. That is the faster
choice for training-sized matmuls (bench/train_step.py: 640 vs 620 tok/s), but
a decode step multiplies a few rows by every weight matrix ([B, D] x [D, F]
with B = 16..32), and there Eigen is 1.3-1.8x faster on the 2-core CPU this
project is developed on: the matmuls of one decode step of the 20.6M Llama in
bench/decode.py took 12.1 ms with Eigen vs 16.8 ms with YNNPACK at B=32 (9.3 vs
12.9 ms at B=16), and a full step at a 384-slot cache 36 vs 42 ms. So
`sampling.sampler.decode` (`generate`) compiles with YNNPACK switched off for
its program only; nothing else in the process changes. The programs it compiles
are traced under `attention.cpu_decode_program()`, which selects the forms
measured fastest with Eigen: the chunked attention products
(`attention.decode_step_cpu`) and the feature-major decode step
(`models.feature_major`). Not the rollout sampler
(`sampling.segment`): with 128 slots of the 3.16M model its rollouts measured
faster with YNNPACK (2.5-2.7 s vs 3.6-3.8 s in bench/rl_iteration.py). On TPU
and GPU no option is passed.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import jax

from kimi_jax import backend as backend_lib
from kimi_jax.models import attention

# An empty fusion-type list keeps every op out of YNNPACK; dots go to Eigen.
CPU_DECODE_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def compiler_options(backend: Optional[str] = None) -> Optional[dict]:
  """XLA options for a decode program on `backend` (default: jax's default backend)."""
  backend = backend or backend_lib.platform()
  return dict(CPU_DECODE_OPTIONS) if backend == "cpu" else None


class DecodeJit:
  """`jax.jit(fun, **jit_kwargs)` plus `compiler_options()`, built on first use.

  Built lazily so that importing a module that defines one does not start a
  jax backend (tests set XLA_FLAGS before the first backend call).
  """

  def __init__(self, fun: Callable, **jit_kwargs):
    self._fun = fun
    self._jit_kwargs = jit_kwargs
    functools.update_wrapper(self, fun)

    @functools.wraps(fun)  # keeps the signature that static_argnames refer to
    def traced(*args, **kwargs):
      if not backend_lib.is_cpu():  # e.g. under backend.accelerator_forms()
        return fun(*args, **kwargs)
      with attention.cpu_decode_program():
        return fun(*args, **kwargs)
    self._traced = traced

  @functools.cached_property
  def jitted(self):
    return jax.jit(self._traced, compiler_options=compiler_options(), **self._jit_kwargs)

  def __call__(self, *args, **kwargs):
    return self.jitted(*args, **kwargs)

  def lower(self, *args, **kwargs):
    return self.jitted.lower(*args, **kwargs)


def decode_jit(**jit_kwargs) -> Callable[[Callable], DecodeJit]:
  """Decorator: `@decode_jit(static_argnames=...)` (keyword arguments of `jax.jit`)."""
  return lambda fun: DecodeJit(fun, **jit_kwargs)
