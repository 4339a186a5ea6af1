"""S(q, r) and its extra-precision variant against a plain integer reference (spec §2, §9.10)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matquant_jax.quant import slicing

ALL_CODES = np.arange(256, dtype=np.uint8)


def reference_slice(q: int, r: int, c: int = 8, clamp: bool = True) -> int:
  """Eq. 6 / Eq. 8 in exact integer arithmetic: round half up, then clamp."""
  s = c - r
  idx = (2 * q + 2**s) // (2 ** (s + 1))  # floor(q / 2^s + 1/2) without floats
  if clamp:
    idx = min(idx, 2**r - 1)
  return idx * 2**s


@pytest.mark.parametrize("r", range(1, 9))
@pytest.mark.parametrize("extra_precision", [False, True])
def test_all_codes_match_integer_reference(r, extra_precision):
  got = np.asarray(slicing.slice_codes(ALL_CODES, r, extra_precision=extra_precision))
  want = np.array([reference_slice(int(q), r, clamp=not extra_precision) for q in ALL_CODES])
  np.testing.assert_array_equal(got, want)
  # The float path (used inside fake-quant) gives the same values.
  got_f = np.asarray(slicing.slice_codes(ALL_CODES.astype(np.float32), r,
                                         extra_precision=extra_precision))
  np.testing.assert_array_equal(got_f, want)


@pytest.mark.parametrize("r", range(1, 9))
def test_value_sets(r):
  clamped = set(np.asarray(slicing.slice_codes(ALL_CODES, r)).tolist())
  assert clamped == {k * 2 ** (8 - r) for k in range(2**r)}
  unclamped = set(np.asarray(slicing.slice_codes(ALL_CODES, r, extra_precision=True)).tolist())
  n_extra = 1 if r < 8 else 0  # S(q, c) = q has no extra bucket
  assert len(unclamped) == 2**r + n_extra


@pytest.mark.parametrize("q,r,ep,want", [
    (53, 2, False, 64),     # Appendix A: 0b00110101, the 32-bit rounds up
    (234, 2, False, 192),   # 3.66 -> 4 -> clamped to 3
    (240, 2, False, 192),   # 3.75 -> 4 -> clamped to 3
    (234, 2, True, 256),    # Eq. 8: the extra bucket
    (32, 2, False, 64),     # tie 0.5 rounds up (jnp.round would give 0)
    (160, 2, False, 192),   # tie 2.5 rounds up (jnp.round would give 128)
    (223, 2, True, 192),
    (224, 2, True, 256),
    (248, 4, False, 240),
    (248, 4, True, 256),
    (200, 8, False, 200),
])
def test_spec_examples(q, r, ep, want):
  assert int(slicing.slice_codes(np.uint8(q), r, extra_precision=ep)) == want


def test_dtypes():
  assert slicing.slice_codes(ALL_CODES, 4).dtype == jnp.uint8
  assert slicing.slice_codes(ALL_CODES, 4, extra_precision=True).dtype == jnp.uint16
  assert slicing.slice_codes(ALL_CODES.astype(np.int32), 4, extra_precision=True).dtype == jnp.int32


def test_slices_come_from_the_parent_not_from_slices():
  # A property users must not rely on: slicing a slice differs from slicing the parent.
  q = np.uint8(24)
  assert int(slicing.slice_codes(slicing.slice_codes(q, 4), 2)) == 64
  assert int(slicing.slice_codes(q, 2)) == 0


def test_extra_bucket_accounting():
  q = np.array([0, 100, 223, 224, 255, 250, 10, 20], np.uint8)
  assert float(slicing.extra_bucket_fraction(q, 2)) == pytest.approx(3 / 8)
  assert float(slicing.extra_precision_effective_bits(q, 2)) == pytest.approx(2.375)
  assert float(slicing.extra_precision_effective_bits(q, 8)) == 8.0
  # int4's extra bucket starts at 248: 250 and 255.
  assert float(slicing.extra_bucket_fraction(q, 4)) == pytest.approx(2 / 8)


def test_under_jit_and_vmap():
  f = jax.jit(lambda q: slicing.slice_codes(q, 3))
  np.testing.assert_array_equal(f(ALL_CODES), slicing.slice_codes(ALL_CODES, 3))
  batch = np.stack([ALL_CODES, ALL_CODES[::-1]])
  np.testing.assert_array_equal(jax.vmap(lambda q: slicing.slice_codes(q, 2))(batch),
                                slicing.slice_codes(batch, 2))


@pytest.mark.parametrize("bits,parent,match", [
    (0, 8, "bits=0"), (9, 8, "bits=9"), (4, 9, "parent_bits=9"), (6, 4, "r must be <= the parent"),
    (2.0, 8, "Python int"), (True, 8, "Python int"),
])
def test_bad_bits(bits, parent, match):
  with pytest.raises(ValueError, match=match):
    slicing.slice_codes(ALL_CODES, bits, parent)


def test_codes_out_of_range():
  with pytest.raises(ValueError, match="codes out of range"):
    slicing.slice_codes(np.array([0, 300], np.int32), 2)
  with pytest.raises(ValueError, match="codes out of range"):
    slicing.slice_codes(np.array([16], np.int32), 2, parent_bits=4)
  with pytest.raises(ValueError, match="codes out of range"):
    slicing.slice_codes(np.array([-1], np.int32), 2)


@pytest.mark.parametrize("r", [2, 3, 4])
def test_a_dedicated_r_bit_minmax_grid_can_express_the_int8_models_r_bit_slice(r):
  """Why a converged OmniQuant int-r baseline cannot lose to MatQuant's int-r slice (the
  README's OmniQuant note, issue 15): keep β and pick γ' so that α_r = 2^(8−r)·α_8; then plain
  r-bit MinMax has exactly the slice's levels and puts every weight on the same level, except
  weights within half an int8 step below one of the 2^r − 1 rounding boundaries (the slice
  rounds twice). The baseline's clipping can reach the slice's grid; the slice has no grid the
  baseline cannot have."""
  from matquant_jax.quant import minmax
  rng = np.random.default_rng(r)
  w = jnp.asarray(rng.standard_t(4, (512, 64)), jnp.float32)  # heavy tails, per column stats
  gamma = jnp.asarray(rng.uniform(0.6, 1.0, (1, 64)), jnp.float32)
  beta = jnp.asarray(rng.uniform(0.6, 1.0, (1, 64)), jnp.float32)
  a8, z8 = minmax.minmax_params(w, 8, 0, gamma=gamma, beta=beta)
  sliced = minmax.dequantize(slicing.slice_codes(minmax.quantize(w, a8, z8, 8), r), a8, z8)
  # The slice's top level is (2^r − 1)·2^(8−r) of 255 int8 steps above the bottom one.
  top = (2**r - 1) * 2 ** (8 - r) / 255.0
  w_max, w_min = jnp.max(w, 0, keepdims=True), jnp.min(w, 0, keepdims=True)
  gamma_r = (top * (gamma * w_max - beta * w_min) + beta * w_min) / w_max
  assert bool(jnp.all((gamma_r > 0) & (gamma_r < 1)))  # inside the sigmoid's range
  ar, zr = minmax.minmax_params(w, r, 0, gamma=gamma_r, beta=beta)
  np.testing.assert_allclose(ar, a8 * 2 ** (8 - r), rtol=1e-5)
  dedicated = minmax.dequantize(minmax.quantize(w, ar, zr, r), ar, zr)
  same = np.isclose(np.asarray(dedicated), np.asarray(sliced), rtol=0,
                    atol=1e-4 * float(a8.max()))
  x = np.asarray(w / a8 + z8)  # the int8 grid coordinate
  boundaries = (np.arange(1, 2**r) - 0.5) * 2 ** (8 - r)
  band = np.any([(x >= b - 0.5) & (x < b) for b in boundaries], axis=0)
  assert np.all(same | band), np.argwhere(~(same | band))[:5]
  if r == 2:
    assert (~same).mean() < 0.01
