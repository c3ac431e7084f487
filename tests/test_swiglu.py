"""The hand-written SwiGLU backward equals autodiff of the same formula."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax.models.swiglu import swiglu


def _reference(x, wg, wu, wd):
  return (jax.nn.silu(x @ wg) * (x @ wu)) @ wd


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_value_and_gradients_match_autodiff(dtype, tol):
  keys = jax.random.split(jax.random.PRNGKey(0), 5)
  x = jax.random.normal(keys[0], (3, 5, 8), dtype)
  wg, wu = (0.5 * jax.random.normal(k, (8, 12), dtype) for k in keys[1:3])
  wd = 0.5 * jax.random.normal(keys[3], (12, 8), dtype)
  cot = jax.random.normal(keys[4], (3, 5, 8), dtype)
  out, vjp = jax.vjp(swiglu, x, wg, wu, wd)
  ref_out, ref_vjp = jax.vjp(_reference, x, wg, wu, wd)
  np.testing.assert_allclose(np.float32(out), np.float32(ref_out), atol=tol, rtol=tol)
  for got, want in zip(vjp(cot), ref_vjp(cot)):
    assert got.dtype == want.dtype and got.shape == want.shape
    scale = float(jnp.abs(want.astype(jnp.float32)).max())
    assert scale > 0.1  # a real gradient, not all zeros
    np.testing.assert_allclose(np.float32(got), np.float32(want), atol=tol * scale, rtol=tol)


def test_hidden_constraint_is_applied_in_both_passes():
  seen = []

  def constrain(h):
    seen.append(h.shape)
    return h

  x, wg, wu, wd = jnp.ones((1, 2, 4)), jnp.ones((4, 6)), jnp.ones((4, 6)), jnp.ones((6, 4))
  jax.grad(lambda x: swiglu(x, wg, wu, wd, constrain).sum())(x)
  assert seen == [(1, 2, 6), (1, 2, 6)]
