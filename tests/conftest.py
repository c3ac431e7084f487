"""Test-wide setup. Runs before any test module imports jax."""
import os

# Multi-device code is tested on one CPU with 8 fake devices; this must be
# set before jax initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Shape bugs should fail loudly, not broadcast silently.
jax.config.update("jax_numpy_rank_promotion", "raise")
