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


def test_lwc_factor_under_a_wider_bound():
  # γ = bound·σ(logit): rebound_logit keeps a factor under a wider bound, the range may grow
  # past 1, and the "no clipping" logit is exactly 1 (plain MinMax) under any bound.
  for bound in (1.0, 1.25, 2.0):
    logit = minmax.rebound_logit(minmax.LWC_INIT_LOGIT, bound)
    assert float(minmax.lwc_factor(jnp.float32(logit), bound)) == pytest.approx(
        1 / (1 + np.exp(-minmax.LWC_INIT_LOGIT)), rel=1e-6)
    assert float(minmax.lwc_factor(jnp.float32(minmax.NO_CLIP_LOGIT), bound)) == 1.0
    assert float(minmax.lwc_factor(jnp.float32(30.0), bound)) == pytest.approx(bound, rel=1e-6)
  assert minmax.rebound_logit(minmax.LWC_INIT_LOGIT, 1.0) == minmax.LWC_INIT_LOGIT
  assert minmax.rebound_logit(-710.0, 2.0) == pytest.approx(-710.0 - np.log(2.0))
  with pytest.raises(ValueError, match="bound"):
    minmax.rebound_logit(4.0, 0.9)


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


# Exact round-half-up at ties on every path, degenerate channels, non-finite weights.


def _bf16_weights(shape=(256, 512), seed=0):
  import ml_dtypes
  return (np.random.default_rng(seed).standard_normal(shape) * 0.02).astype(ml_dtypes.bfloat16)


def _reference_codes(w, alpha, zero, bits=8):
  """The spec's codes from the exact value w/α + z (float64 holds every tie exactly)."""
  u = np.asarray(w, np.float64) / np.asarray(alpha, np.float64) + np.asarray(zero, np.float64)
  return np.clip(np.floor(u + 0.5), 0, 2**bits - 1).astype(np.uint8), u


def test_codes_are_exact_at_ties_on_every_path(tmp_path):
  import jax
  from matquant_jax.checkpoints.matquant_checkpoint import _quantize
  from matquant_jax.quant.qtensor import QTensor
  w = jnp.asarray(_bf16_weights())
  alpha, zero = minmax.minmax_params(w, 8, 0)
  ref, u = _reference_codes(w, alpha, zero)
  assert np.sum(u - np.floor(u) == 0.5) > 50  # bf16 weights put many codes on a tie
  paths = {
      "eager": minmax.quantize(w, alpha, zero, 8),
      "jit": jax.jit(lambda w, a, z: minmax.quantize(w, a, z, 8))(w, alpha, zero),
      "qtensor jit": jax.jit(lambda w: QTensor.quantize(w, 8, 0).codes)(w),
      "export": _quantize(w, 8, (0,), False).codes,
  }
  for name, codes in paths.items():
    np.testing.assert_array_equal(np.asarray(codes), ref, err_msg=name)


def test_the_reported_tie_rounds_up():
  # One channel where w = 0.006103515625 lands exactly on u = 127.5: the spec says 128.
  w = jnp.asarray(np.array([[-0.0244140625], [0.0244140625 + 2 * 0.006103515625 - 0.0244140625],
                            [0.0244140625]], np.float32))
  alpha, zero = minmax.minmax_params(w, 8, 0)
  _, u = _reference_codes(w, alpha, zero)
  codes = np.asarray(minmax.quantize(w, alpha, zero, 8))[:, 0]
  np.testing.assert_array_equal(codes, np.floor(u[:, 0] + 0.5))


def test_fake_quant_uses_the_exact_codes():
  from matquant_jax.quant import fake_quant
  w = jnp.asarray(_bf16_weights((64, 128), seed=1)).astype(jnp.float32)
  alpha, zero = minmax.minmax_params(w, 8, 0)
  ref, _ = _reference_codes(w, alpha, zero)
  got = fake_quant.fake_quant_with_params(w, alpha, zero, 8)
  np.testing.assert_allclose(np.asarray(got), np.asarray(alpha) * (ref - np.asarray(zero)),
                             rtol=0, atol=1e-7)


@pytest.mark.parametrize("values", [
    [1e-40, 1e-40 + 1e-44, 1e-40],         # a range so tiny that α would underflow
    [3e38, 3e38, 3e38],                     # a huge constant: z = −min/α used to overflow
    [-3e38, 3e38, 0.0],                     # a range beyond float32
    [-2.5, -2.5, -2.5],                     # an ordinary constant
])
def test_degenerate_channels_are_finite(values):
  w = jnp.asarray(np.array(values, np.float32)[:, None])
  alpha, zero = minmax.minmax_params(w, 8, 0)
  codes = minmax.quantize(w, alpha, zero, 8)
  deq = np.asarray(minmax.dequantize(codes, alpha, zero))
  assert np.all(np.isfinite(np.asarray(alpha))) and np.all(np.asarray(alpha) > 0)
  assert np.all(np.isfinite(np.asarray(zero))) and np.all(np.isfinite(deq))
  span = max(values) - min(values)
  # Subnormal inputs may be flushed to zero by XLA: within the smallest normal float32.
  np.testing.assert_allclose(deq[:, 0], values, rtol=1e-6,
                             atol=max(span / 255 * 1.01, 1.2e-38))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused_by_channel(bad):
  from matquant_jax.quant.qtensor import QTensor
  w = np.ones((4, 6), np.float32)
  w[2, 3] = bad
  with pytest.raises(ValueError, match=r"non-finite.*output channel \(3,\)"):
    QTensor.quantize(jnp.asarray(w), 8, 0)


def test_huge_channels_match_the_reference():
  # Values near float32's maximum: the exact tie test must not overflow (found by review).
  w = jnp.asarray(np.random.default_rng(3).uniform(-3.3e38, 3.3e38, (128, 128)).astype(np.float32))
  alpha, zero = minmax.minmax_params(w, 8, 0)
  ref, _ = _reference_codes(w, alpha, zero)
  np.testing.assert_array_equal(np.asarray(minmax.quantize(w, alpha, zero, 8)), ref)
