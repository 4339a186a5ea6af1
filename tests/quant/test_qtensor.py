"""QTensor: quantize, slice from the parent, dequantize, honest byte counts, pytree behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matquant_jax.quant import minmax
from matquant_jax.quant import slicing
from matquant_jax.quant.qtensor import QTensor


def _w(shape=(128, 32)):
  return jax.random.normal(jax.random.PRNGKey(1), shape)


def test_quantize_slice_dequantize():
  w = _w()
  qt = QTensor.quantize(w, 8, reduce_axes=0)
  assert qt.codes.dtype == jnp.uint8 and qt.scale.shape == (1, 32) and qt.bits == 8
  assert (np.abs(np.asarray(qt.dequantize()) - np.asarray(w)) <= np.asarray(qt.scale) / 2 + 1e-6).all()
  for r in range(1, 9):
    s = qt.slice(r)
    np.testing.assert_array_equal(s.codes, slicing.slice_codes(qt.codes, r))
    np.testing.assert_array_equal(s.dequantize(),
                                  minmax.dequantize(s.codes, qt.scale, qt.zero))
    assert set(np.unique(np.asarray(s.indices()))) <= set(range(2**r))


def test_slice_of_slice_is_refused():
  qt = QTensor.quantize(_w(), 8, 0)
  s4 = qt.slice(4)
  assert s4.slice(4) is s4
  with pytest.raises(ValueError, match="slices must be taken from the 8-bit parent"):
    s4.slice(2)
  with pytest.raises(ValueError, match="bits=9"):
    qt.slice(9)


def test_extra_precision_slice():
  qt = QTensor.quantize(_w(), 8, 0)
  ep = qt.slice(2, extra_precision=True)
  assert ep.codes.dtype == jnp.uint16 and ep.extra_precision
  frac = float(slicing.extra_bucket_fraction(qt.codes, 2))
  assert 0 < frac < 0.2
  assert ep.effective_bits() == pytest.approx(2 + frac)
  assert qt.slice(2).effective_bits() == 2.0
  assert not qt.slice(8, extra_precision=True).extra_precision  # no slice, no extra bucket


def test_byte_counts():
  qt = QTensor.quantize(jnp.zeros((256, 64)), 8, 0)
  side = 2 * 64 * 4  # α and z, float32, one per output channel
  assert qt.nbytes == 256 * 64 + side
  assert qt.packed_nbytes == 256 * 64 + side
  assert qt.slice(4).packed_nbytes == 256 * 64 // 2 + side
  assert qt.slice(2).packed_nbytes == 256 * 64 // 4 + side
  assert qt.slice(3).packed_nbytes == 256 * 64 * 3 // 8 + side
  assert qt.slice(2, extra_precision=True).packed_nbytes == 256 * 64 * 3 // 8 + side
  assert qt.slice(4).nbytes == qt.nbytes  # held as uint8 until packed: honest, not flattering


def test_pytree_jit_vmap():
  qt = QTensor.quantize(_w(), 8, 0)
  leaves, treedef = jax.tree_util.tree_flatten(qt)
  assert len(leaves) == 3
  f = jax.jit(lambda q: q.slice(2).dequantize(jnp.bfloat16))
  np.testing.assert_array_equal(f(qt), qt.slice(2).dequantize(jnp.bfloat16))
  ws = jnp.stack([_w(), 2 * _w()])
  batched = jax.vmap(lambda w: QTensor.quantize(w, 8, 0).slice(4).dequantize())(ws)
  np.testing.assert_array_equal(batched[1], QTensor.quantize(2 * _w(), 8, 0).slice(4).dequantize())


def test_multi_axis_kernels():
  w = jax.random.normal(jax.random.PRNGKey(2), (4, 8, 24))  # attn_vec_einsum (N, H, D)
  qt = QTensor.quantize(w, 8, reduce_axes=(0, 1))
  assert qt.scale.shape == (1, 1, 24) and qt.reduce_axes == (0, 1)
  assert qt.slice(2).dequantize().shape == w.shape
