"""compile_count: backend compiles and persistent-cache loads both count."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp

from kimi_jax.compile_count import CompileCounter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One program, produced twice: compiled, then (in-memory caches cleared) loaded
# from the persistent cache. Both times jax had to produce it.
_TWICE = """
import jax, jax.numpy as jnp
from kimi_jax.compile_count import CompileCounter, total_compiles
f = lambda x: jnp.sin(x) * 3.0 + 1.0
with CompileCounter() as first:
  jax.jit(f)(jnp.ones(5)).block_until_ready()
jax.clear_caches()
with CompileCounter() as second:
  jax.jit(f)(jnp.ones(5)).block_until_ready()
print(first.count, second.count)
"""


def test_a_new_program_counts_and_a_cached_call_does_not():
  f = jax.jit(lambda x: x * 2.0 + 7.0)
  with CompileCounter() as first:
    f(jnp.ones(3)).block_until_ready()
  with CompileCounter() as again:
    f(jnp.ones(3)).block_until_ready()
  assert first.count >= 1 and again.count == 0


def test_a_load_from_the_persistent_cache_counts(tmp_path):
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
         "JAX_COMPILATION_CACHE_DIR": str(tmp_path),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  out = subprocess.run([sys.executable, "-c", _TWICE], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  first, second = map(int, out.stdout.split())
  assert os.listdir(tmp_path), "nothing was written to the persistent cache"
  assert first >= 1 and second == first, (first, second)
