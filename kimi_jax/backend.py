"""The one backend-dispatch point: which accelerator the model code targets.

The model and sampler have one layout, shaped for TPU / GPU kernels (splash,
cuDNN, blockwise attention; keys and values of one forward `[B, T, K, E]`).
A few forms exist only because they measured faster on the 2-core CPU this
project is tested on: RoPE tables materialised once per forward, the
chunked q.k / p.v of a one-token decode step over the KV cache, Eigen
instead of YNNPACK matmuls for `generate`'s decode program, and
`generate`'s feature-major step. Each asks here, and nowhere else, whether
it runs on a CPU; the attention implementation for "auto" is chosen by
`attention_kernels.resolve`, which asks here too.
"""
from __future__ import annotations

import jax


def platform() -> str:
  """"cpu", "gpu" or "tpu": jax's default backend (the one jitted code runs on)."""
  return jax.default_backend()


def is_cpu() -> bool:
  """Whether the CPU-only forms (see the module docstring) apply."""
  return platform() == "cpu"
