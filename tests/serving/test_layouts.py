"""Serving layouts: bit planes, planar packing round trips, host slicing, kernel <-> matrix."""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from matquant_jax.quant.kernels import BY_NAME as KERNEL
from matquant_jax.quant import slicing
from matquant_jax.serving import layouts


def test_plane_widths_table():
  assert [layouts.plane_widths(sw) for sw in range(1, 9)] == [
      (1,), (2,), (2, 1), (4,), (4, 1), (4, 2), (4, 2, 1), (8,)]
  assert layouts.plane_offsets((4, 2, 1)) == (0, 4, 6)
  assert layouts.storage_bits(2, 8, extra_precision=True) == 3
  assert layouts.storage_bits(8, 8, extra_precision=True) == 8  # the parent is never sliced
  with pytest.raises(ValueError, match="bits"):
    layouts.plane_widths(9)


@pytest.mark.parametrize("sw", range(1, 9))
@pytest.mark.parametrize("k,n", [(1, 1), (3, 5), (13, 2), (64, 3)])
def test_pack_round_trip_every_width_and_odd_shapes(sw, k, n):
  rng = np.random.default_rng(sw * 100 + k)
  idx = rng.integers(0, 2**sw, (k, n)).astype(np.uint8)
  widths = layouts.plane_widths(sw)
  planes = layouts.pack_planes_np(idx, widths)
  kp = layouts.padded_rows(k, widths)
  assert kp >= k and kp % max(8 // w for w in widths) == 0
  # r bits per weight (over the padded rows): nothing beyond the code bits is stored.
  assert sum(p.nbytes for p in planes) * 8 == kp * n * sw
  assert all(p.dtype == np.uint8 for p in planes)
  np.testing.assert_array_equal(layouts.unpack_planes_np(planes, widths, k), idx)
  np.testing.assert_array_equal(
      np.asarray(layouts.unpack_planes([jnp.asarray(p) for p in planes], widths, k)), idx)


def test_planar_2bit_byte_layout_as_documented():
  codes = np.array([[0], [1], [2], [3], [3], [2], [1], [0]], np.uint8)  # K = 8, one column
  (plane,) = layouts.pack_planes_np(codes, (2,))
  c = codes[:, 0].astype(int)
  assert plane.shape == (2, 1)
  assert plane[0, 0] == c[0] | c[2] << 2 | c[4] << 4 | c[6] << 6
  assert plane[1, 0] == c[1] | c[3] << 2 | c[5] << 4 | c[7] << 6


def test_pack_rejects_codes_wider_than_the_planes():
  with pytest.raises(ValueError, match="does not fit 2 bits"):
    layouts.pack_planes_np(np.array([[4]], np.uint8), (2,))


def test_host_slice_index_matches_quant_slicing():
  q = np.arange(256, dtype=np.uint8)
  for bits, ep in itertools.product(range(1, 9), (False, True)):
    want = np.asarray(slicing.slice_index(jnp.asarray(q), bits, 8, extra_precision=ep))
    np.testing.assert_array_equal(layouts.slice_index_np(q, bits, 8, extra_precision=ep), want)


@pytest.mark.parametrize("name,shape", [
    ("q_einsum", (4, 6, 3)), ("kv_einsum", (2, 2, 6, 3)), ("attn_vec_einsum", (4, 3, 6)),
    ("gating_einsum", (2, 6, 5)), ("linear", (5, 6))])
def test_kernel_matrix_round_trip(name, shape):
  w = np.arange(np.prod(shape)).reshape(shape)
  axes = KERNEL[name].reduce_axes
  m = layouts.kernel_to_matrix(w, axes)
  assert m.shape[0] == np.prod([shape[a] for a in axes])
  np.testing.assert_array_equal(np.asarray(layouts.matrix_to_kernel(jnp.asarray(m), shape, axes)),
                                w)
