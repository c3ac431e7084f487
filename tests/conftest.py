"""Test-wide setup. Runs before any test module imports jax."""
import os
import shutil
import tempfile

# Multi-device code is tested on one CPU with 8 fake devices; this must be
# set before jax initialises its backends. Appended, so that XLA flags given
# by the caller (e.g. a thread-count variant of the suite) keep the 8 devices.
_xla_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _xla_flags:
  os.environ["XLA_FLAGS"] = f"{_xla_flags} --xla_force_host_platform_device_count=8".strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent compilation cache for the whole session, this process and
# every launcher the end-to-end tests start: those run the same smoke configs
# again and again (a reference run, then a killed one and its resume), and
# compiling is most of their time. Fresh per session, so no test sees another
# session's programs; kimi_jax.compile_count counts cache hits as compiles, so
# the no-recompile checks keep their meaning. A caller's own cache dir wins.
_SESSION_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _SESSION_CACHE = tempfile.mkdtemp(prefix="kimi_jax_tests_jax_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_CACHE

import jax  # noqa: E402

# Shape bugs should fail loudly, not broadcast silently.
jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  if _SESSION_CACHE:
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)
