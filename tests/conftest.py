"""Test-wide setup. Runs before any test module imports jax."""
import os

# Multi-device code is tested on one CPU with 8 fake devices; this must be
# set before jax initialises its backends. Appended, so that XLA flags given
# by the caller (e.g. a thread-count variant of the suite) keep the 8 devices.
_xla_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _xla_flags:
  os.environ["XLA_FLAGS"] = f"{_xla_flags} --xla_force_host_platform_device_count=8".strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Shape bugs should fail loudly, not broadcast silently.
jax.config.update("jax_numpy_rank_promotion", "raise")
