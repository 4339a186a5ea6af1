"""The base quantizer (spec §1): α, z, codes, round trip, axes and constant channels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matquant_jax.quant import minmax


def _w(shape, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def test_alpha_and_zero_formulas():
  w = np.array([[-1.0, 0.5], [3.0, 2.5], [1.0, 4.5]], np.float32)  # [in=3, out=2]
  alpha, zero = minmax.minmax_params(w, 8, reduce_axes=0)
  np.testing.assert_allclose(alpha, [[4.0 / 255, 4.0 / 255]], rtol=1e-6)
  np.testing.assert_allclose(zero, [[1.0 / (4.0 / 255), -0.5 / (4.0 / 255)]], rtol=1e-6)
  # z is not rounded by default (Eq. 1); OmniQuant's rounded zero point is an option.
  assert not np.allclose(zero, np.round(zero))
  _, zr = minmax.minmax_params(w, 8, 0, round_zero=True)
  np.testing.assert_array_equal(zr, np.floor(np.asarray(zero) + 0.5))


def test_min_and_max_map_to_the_ends_of_the_grid():
  w = _w((64, 16))
  for bits in (2, 4, 8):
    alpha, zero = minmax.minmax_params(w, bits, 0)
    q = np.asarray(minmax.quantize(w, alpha, zero, bits))
    assert (q.min(axis=0) == 0).all() and (q.max(axis=0) == 2**bits - 1).all()


@pytest.mark.parametrize("shape,axes", [
    ((32, 48), (0,)),            # Dense [in, out]
    ((2, 24, 40), (1,)),         # Gemma 2B gating (2, D, F)
    ((2, 40, 24), (2,)),         # Gemma 9B/27B gating (2, F, D)
    ((40, 24), (0,)),            # FFN linear (F, D)
    ((4, 24, 8), (1,)),          # q_einsum (N, D, H)
    ((4, 8, 24), (0, 1)),        # attn_vec_einsum (N, H, D)
    ((2, 2, 24, 8), (2,)),       # kv_einsum (2, K, D, H)
])
def test_int8_round_trip_error_within_half_step(shape, axes):
  w = _w(shape, seed=len(shape))
  alpha, zero = minmax.minmax_params(w, 8, axes)
  assert alpha.shape == tuple(1 if i in axes else s for i, s in enumerate(shape))
  what = minmax.dequantize(minmax.quantize(w, alpha, zero), alpha, zero)
  err = np.abs(np.asarray(what) - np.asarray(w))
  assert (err <= np.asarray(alpha) / 2 * (1 + 1e-5)).all()
  # Statistics really are per output channel: each slice along the kept axes has its own α.
  assert len(np.unique(np.asarray(alpha))) == np.prod(alpha.shape)


def test_constant_channel_does_not_divide_by_zero():
  w = np.array([[1.5, -2.0], [1.5, 3.0], [1.5, 0.0]], np.float32)  # channel 0 is constant
  alpha, zero = minmax.minmax_params(w, 8, 0)
  q = minmax.quantize(w, alpha, zero)
  what = np.asarray(minmax.dequantize(q, alpha, zero))
  assert np.isfinite(np.asarray(alpha)).all() and np.isfinite(np.asarray(zero)).all()
  np.testing.assert_allclose(what[:, 0], 1.5, rtol=1e-6)
  zeros = np.zeros((4, 3), np.float32)
  a0, z0 = minmax.minmax_params(zeros, 4, 0)
  np.testing.assert_array_equal(minmax.dequantize(minmax.quantize(zeros, a0, z0, 4), a0, z0), zeros)


def test_lwc_clipping_factors():
  w = _w((64, 8))
  gamma = jnp.full((1, 8), 0.9)
  beta = jnp.full((1, 8), 0.8)
  alpha, zero = minmax.minmax_params(w, 8, 0, gamma=gamma, beta=beta)
  wmax, wmin = np.asarray(w).max(0), np.asarray(w).min(0)
  np.testing.assert_allclose(alpha[0], (0.9 * wmax - 0.8 * wmin) / 255, rtol=1e-6)
  np.testing.assert_allclose(zero[0], -0.8 * wmin / np.asarray(alpha[0]), rtol=1e-5)
  assert float(minmax.lwc_factor(jnp.asarray(minmax.LWC_INIT_LOGIT))) == pytest.approx(0.982, abs=1e-3)


def test_round_half_up_is_not_bankers_rounding():
  x = jnp.array([0.5, 1.5, 2.5, -0.5, -1.5])
  np.testing.assert_array_equal(minmax.round_half_up(x), [1, 2, 3, 0, -1])


@pytest.mark.parametrize("axes,match", [
    ((), "empty"), ((2,), "out of range"), ((0, 0), "same axis twice"), ((-3,), "out of range"),
    ("a", "int or a sequence"),
])
def test_bad_axes(axes, match):
  with pytest.raises(ValueError, match=match):
    minmax.minmax_params(_w((4, 4)), 8, axes)


@pytest.mark.parametrize("bits", [0, 9, -1])
def test_bad_bits(bits):
  with pytest.raises(ValueError, match=f"bits={bits}"):
    minmax.minmax_params(_w((4, 4)), bits, 0)
  with pytest.raises(ValueError, match=f"bits={bits}"):
    minmax.quantize(_w((4, 4)), jnp.ones((1, 4)), jnp.zeros((1, 4)), bits)
