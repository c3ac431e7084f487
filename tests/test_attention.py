"""sequence_attention: every CPU-runnable implementation equals "xla"."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimi_jax.models import attention_kernels as ak
from kimi_jax.models.attention_kernels import sequence_attention


def _segments(kind, B, T):
  """int32 `[B, T]` segment ids (None for plain causal)."""
  if kind == "causal":
    return None
  rows = []
  for b in range(B):
    if kind == "left_padded":  # a different pad length per row
      pad = 37 + 50 * b
      rows.append([0] * pad + [1] * (T - pad))
    else:  # packed: 3 then 2 segments, the second row with a padding tail
      cuts = [0, 70, 150, T] if b == 0 else [0, 101, T - 29]
      row = np.zeros(T, np.int32)
      for s, (a, e) in enumerate(zip(cuts[:-1], cuts[1:])):
        row[a:e] = s + 1
      rows.append(list(row))
  return jnp.asarray(rows, jnp.int32)


def _inputs(B, T, H, K, E, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(ks[0], (B, T, H, E)), jax.random.normal(ks[1], (B, T, K, E)),
          jax.random.normal(ks[2], (B, T, K, E)), jax.random.normal(ks[3], (B, T, H, E)))


@functools.lru_cache(maxsize=None)
def _value_and_grads(impl, block_size, kind, B, T, H, K, E):
  q, k, v, w = _inputs(B, T, H, K, E)
  seg = _segments(kind, B, T)
  # Padding query rows weigh 0 in the loss: their outputs are not compared.
  if seg is not None:
    w = w * (seg != 0)[:, :, None, None]

  def loss(q, k, v):
    out = sequence_attention(q, k, v, segment_ids_BT=seg, implementation=impl,
                             block_size=block_size)
    return jnp.sum(w * out), out

  (val, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return val, out, grads, seg


CASES = [("blockwise", 64), ("blockwise", 96), ("blockwise", 512), ("splash", 512)]


@pytest.mark.parametrize("heads", [(4, 2), (4, 4)], ids=["gqa", "mha"])
@pytest.mark.parametrize("kind", ["causal", "packed", "left_padded"])
@pytest.mark.parametrize("impl,block_size", CASES, ids=[f"{i}{b}" for i, b in CASES])
def test_matches_xla(impl, block_size, kind, heads):
  shape = (2, 256, *heads, 16)
  ref_val, ref_out, ref_grads, seg = _value_and_grads("xla", 512, kind, *shape)
  val, out, grads, _ = _value_and_grads(impl, block_size, kind, *shape)
  real = np.ones(shape[:2], bool) if seg is None else np.asarray(seg != 0)
  np.testing.assert_allclose(out[real], ref_out[real], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(val, ref_val, atol=1e-3, rtol=1e-5)
  for name, g, ref in zip("qkv", grads, ref_grads):
    assert np.all(np.isfinite(g)), name
    np.testing.assert_allclose(g, ref, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")


@pytest.mark.parametrize("impl", ["xla", "blockwise", "splash"])
def test_padding_rows_are_zero_with_zero_gradients(impl):
  q, k, v, _ = _inputs(2, 256, 4, 2, 16)
  seg = _segments("left_padded", 2, 256)
  f = lambda q, k, v: sequence_attention(q, k, v, segment_ids_BT=seg, implementation=impl,
                                         block_size=64)
  out = f(q, k, v)
  pad = np.asarray(seg == 0)
  assert np.all(np.asarray(out)[pad] == 0)
  # A loss on the padding rows alone: nothing reaches q, k or v.
  grads = jax.grad(lambda *a: jnp.sum(f(*a) * pad[:, :, None, None]), argnums=(0, 1, 2))(q, k, v)
  for g in grads:
    assert np.all(np.asarray(g) == 0)


@pytest.mark.parametrize("impl", ["blockwise", "splash"])
def test_length_not_a_multiple_of_the_tile(impl):
  """T = 200: blockwise pads to whole 64-blocks, splash to 256."""
  q, k, v, w = _inputs(1, 200, 4, 2, 16, seed=1)
  seg = jnp.asarray([[0] * 20 + [1] * 90 + [2] * 90], jnp.int32)
  w = w * (seg != 0)[:, :, None, None]

  def vg(impl):
    loss = lambda q, k, v: jnp.sum(w * sequence_attention(
        q, k, v, segment_ids_BT=seg, implementation=impl, block_size=64))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)

  (val, grads), (ref_val, ref_grads) = vg(impl), vg("xla")
  np.testing.assert_allclose(val, ref_val, atol=1e-3, rtol=1e-5)
  for g, ref in zip(grads, ref_grads):
    np.testing.assert_allclose(g, ref, atol=1e-5, rtol=1e-5)


def test_bfloat16_blockwise_close_to_xla():
  q, k, v, _ = [x.astype(jnp.bfloat16) for x in _inputs(1, 128, 4, 2, 16)]
  f = jax.jit(sequence_attention, static_argnames=("implementation", "block_size"))
  out = f(q, k, v, implementation="blockwise", block_size=32)
  ref = f(q, k, v, implementation="xla")
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(np.float32), ref.astype(np.float32), atol=3e-2)


def test_blockwise_keeps_no_T_by_T_array():
  B, T, H, K, E = 1, 4096, 2, 1, 16
  q, k, v, _ = _inputs(B, T, H, K, E)

  def temp_bytes(impl):
    loss = lambda q, k, v: jnp.sum(sequence_attention(q, k, v, implementation=impl) ** 2)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  dense = B * H * T * T * 4
  assert temp_bytes("xla") > dense  # the check sees the dense scores ...
  # ... and blockwise none: its ~12 MB are a few [H, 512, 512] float32 block
  # buffers (scores, probabilities, their gradients) and [T, E] carries.
  assert temp_bytes("blockwise") < dense / 8


def test_resolve(monkeypatch):
  assert ak.resolve("auto", ak.BLOCKWISE_MIN_LENGTH) == "blockwise"
  assert ak.resolve("auto", ak.BLOCKWISE_MIN_LENGTH - 1) == "xla"
  assert ak.resolve("splash", 8) == "splash"
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert ak.resolve("auto", 8) == "splash"
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert ak.resolve("auto", 8, dtype=jnp.bfloat16) == "cudnn"
  assert ak.resolve("auto", 8, segmented=True, dtype=jnp.bfloat16) == "xla"
  assert ak.resolve("auto", 4096, dtype=jnp.float32) == "blockwise"


def test_unknown_implementation():
  q, k, v, _ = _inputs(1, 8, 2, 1, 4)
  with pytest.raises(ValueError, match=r"'flash'.*'auto', 'xla', 'blockwise', 'splash', 'cudnn'"):
    sequence_attention(q, k, v, implementation="flash")


def test_cudnn_off_gpu_raises():
  if jax.default_backend() == "gpu":
    pytest.skip("runs on GPU")
  q, k, v, _ = _inputs(1, 8, 2, 1, 4)
  with pytest.raises(RuntimeError, match="cudnn.*needs a GPU"):
    sequence_attention(q, k, v, implementation="cudnn")
