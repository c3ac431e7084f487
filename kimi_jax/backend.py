"""The one backend-dispatch point: which accelerator the model code targets.

The model and sampler have one layout, shaped for TPU / GPU kernels (splash,
cuDNN, blockwise attention; keys and values of one forward `[B, T, K, E]`).
A few forms exist only because they measured faster on the 2-core CPU this
project is tested on: RoPE tables materialised once per forward, the
chunked q.k / p.v of a one-token decode step over the KV cache, Eigen
instead of YNNPACK matmuls for `generate`'s decode program, and
`generate`'s feature-major step. Each asks here, and nowhere else, whether
it runs on a CPU; the attention implementation for "auto" is chosen by
`attention_kernels.resolve`, which asks here too. The KV-cache layout is
one of these forms (`kv_cache.KVCache.cpu_layout`): keys `[B, K, E, S]` and
values `[B, K, S, E]` on CPU, both `[B, S, K, E]` elsewhere.

`accelerator_forms()` traces the accelerator forms on a CPU, so that the
tests run the layouts a TPU / GPU gets (kernels that need the hardware,
splash's compiled mode and cuDNN, still look at `platform()`).
"""
from __future__ import annotations

import contextlib
import contextvars

import jax

_ACCELERATOR_FORMS = contextvars.ContextVar("kimi_jax_accelerator_forms", default=False)


def platform() -> str:
  """"cpu", "gpu" or "tpu": jax's default backend (the one jitted code runs on)."""
  return jax.default_backend()


def is_cpu() -> bool:
  """Whether the CPU-only forms (see the module docstring) apply."""
  return platform() == "cpu" and not _ACCELERATOR_FORMS.get()


@contextlib.contextmanager
def accelerator_forms():
  """While active, `is_cpu()` is False: code traced inside takes the TPU / GPU
  forms. jit caches do not know about it: trace under it only functions that
  were not compiled outside it with the same static arguments (tests call
  `jax.clear_caches()` around it)."""
  token = _ACCELERATOR_FORMS.set(True)
  try:
    yield
  finally:
    _ACCELERATOR_FORMS.reset(token)
