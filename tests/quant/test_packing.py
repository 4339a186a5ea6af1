"""Sub-byte packing: exact round trips for every width, documented byte layout, odd sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matquant_jax.quant import packing


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape,axis", [((7,), -1), ((3, 13), -1), ((13, 3), 0), ((2, 5, 9), 1),
                                        ((4, 16), -1), ((1,), 0)])
def test_round_trip(bits, shape, axis):
  rng = np.random.default_rng(bits * 100 + len(shape))
  codes = rng.integers(0, 2**bits, size=shape).astype(np.uint8)
  packed = packing.pack_codes(codes, bits, axis=axis)
  assert packed.dtype == jnp.uint8
  ax = axis % len(shape)
  assert packed.shape[ax] == packing.packed_length(shape[ax], bits)
  assert packed.shape[:ax] + packed.shape[ax + 1:] == shape[:ax] + shape[ax + 1:]
  np.testing.assert_array_equal(packing.unpack_codes(packed, bits, shape[ax], axis=axis), codes)


@pytest.mark.parametrize("bits,per_byte", [(1, 8), (2, 4), (4, 2), (8, 1)])
def test_really_r_bits_per_weight(bits, per_byte):
  codes = np.zeros((64, 1024), np.uint8)
  assert packing.pack_codes(codes, bits).nbytes == codes.size // per_byte
  # 3 and 6 bits: 8 codes in 3 bytes, 4 codes in 3 bytes.
  assert packing.pack_codes(np.zeros((1024,), np.uint8), 3).nbytes == 384
  assert packing.pack_codes(np.zeros((1024,), np.uint8), 6).nbytes == 768


def test_documented_layout():
  # 2-bit: byte = c0 | c1<<2 | c2<<4 | c3<<6
  assert int(packing.pack_codes(np.array([1, 2, 3, 0], np.uint8), 2)[0]) == 1 | 2 << 2 | 3 << 4
  # 4-bit: low nibble first.
  assert int(packing.pack_codes(np.array([0xA, 0x3], np.uint8), 4)[0]) == 0x3A
  # 3-bit: 8 codes form a 24-bit little-endian word, code j at bits 3j..3j+2.
  codes = np.array([1, 2, 3, 4, 5, 6, 7, 0], np.uint8)
  word = sum(int(c) << (3 * j) for j, c in enumerate(codes))
  np.testing.assert_array_equal(packing.pack_codes(codes, 3), [word & 255, word >> 8 & 255, word >> 16])
  # 6-bit: 4 codes, 24-bit word.
  codes = np.array([63, 1, 32, 7], np.uint8)
  word = sum(int(c) << (6 * j) for j, c in enumerate(codes))
  np.testing.assert_array_equal(packing.pack_codes(codes, 6), [word & 255, word >> 8 & 255, word >> 16])


def test_odd_length_is_zero_padded():
  packed = packing.pack_codes(np.array([3, 3, 3, 3, 3], np.uint8), 2)
  np.testing.assert_array_equal(packed, [255, 3])


def test_under_jit_and_vmap():
  codes = jnp.asarray(np.random.default_rng(0).integers(0, 4, size=(5, 12)), jnp.uint8)
  f = jax.jit(lambda c: packing.unpack_codes(packing.pack_codes(c, 2), 2, 12))
  np.testing.assert_array_equal(f(codes), codes)
  g = jax.vmap(lambda c: packing.pack_codes(c, 2))
  np.testing.assert_array_equal(g(codes), packing.pack_codes(codes, 2))


def test_errors():
  with pytest.raises(ValueError, match="out of range for 2-bit"):
    packing.pack_codes(np.array([4], np.uint8), 2)
  with pytest.raises(ValueError, match="integer codes"):
    packing.pack_codes(np.array([1.0]), 2)
  with pytest.raises(ValueError, match="bits=0"):
    packing.pack_codes(np.array([0], np.uint8), 0)
  with pytest.raises(ValueError, match="scalar"):
    packing.pack_codes(np.uint8(1), 2)
  with pytest.raises(ValueError, match="pack into 2 bytes"):
    packing.unpack_codes(np.zeros((3,), np.uint8), 2, 5)
  with pytest.raises(ValueError, match="uint8"):
    packing.unpack_codes(np.zeros((3,), np.int32), 2, 12)
  with pytest.raises(ValueError, match="out of range"):
    packing.pack_codes(np.zeros((4,), np.uint8), 2, axis=1)
