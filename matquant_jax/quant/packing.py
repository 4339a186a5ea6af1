"""Sub-byte packing of r-bit codes into uint8 (r = 1..8), exact and jit-friendly.

Orbax/tensorstore store int4/int2 at one byte per element and cannot store uint4 at all, so the
library packs codes itself. One layout serves every width: codes are packed along one axis
(`axis`, default the last) in *groups* of g = 8 / gcd(r, 8) codes that fill exactly
B = r·g / 8 bytes, as a little-endian bit stream:

    r   g codes -> B bytes    bits per byte
    1   8       -> 1          code j at bit j
    2   4       -> 1          code j at bits 2j..2j+1       (byte = c0 | c1<<2 | c2<<4 | c3<<6)
    3   8       -> 3          24-bit little-endian word, code j at bits 3j..3j+2
    4   2       -> 1          byte = c0 | c1<<4             (low nibble first)
    5   8       -> 5          40-bit little-endian word, code j at bits 5j..5j+4
    6   4       -> 3          24-bit little-endian word, code j at bits 6j..6j+5
    7   8       -> 7          56-bit little-endian word
    8   1       -> 1          identity

Bit k of a group's word lives in byte k // 8 at bit k % 8. A length along `axis` that is not a
multiple of g is zero-padded to one; `unpack_codes` takes the original length and drops the pad.
The packed array has ceil(n / g)·B bytes along `axis`, i.e. r bits per code plus < 1 group of pad.

These arrays hold r-bit *indices* (0..2^r − 1), i.e. S(q, r) >> (c − r), not parent-grid codes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from matquant_jax.quant import validation


def group_layout(bits: int) -> tuple[int, int]:
  """(codes per group, bytes per group) for r-bit codes."""
  bits = validation.check_bits(bits)
  g = 8 // math.gcd(bits, 8)
  return g, bits * g // 8


def packed_length(length: int, bits: int) -> int:
  """Bytes along the packed axis for `length` r-bit codes."""
  g, nbytes = group_layout(bits)
  return -(-length // g) * nbytes


def _check_pack_input(codes, bits: int) -> None:
  if not jnp.issubdtype(jnp.asarray(codes).dtype, jnp.integer):
    raise ValueError(f"pack_codes expects integer codes, got dtype {jnp.asarray(codes).dtype}.")
  validation.check_codes_in_range(
      codes, bits, f"{bits}-bit packing",
      " Pack r-bit indices (slice_index), not parent-grid codes.")


def pack_codes(codes: jax.Array, bits: int, axis: int = -1) -> jax.Array:
  """Packs r-bit codes (values 0..2^r − 1) along `axis` into uint8 (layout in module doc)."""
  bits = validation.check_bits(bits)
  _check_pack_input(codes, bits)
  codes = jnp.asarray(codes)
  if codes.ndim == 0:
    raise ValueError("pack_codes needs at least one axis to pack along; got a scalar.")
  axis = validation.normalize_axes(axis, codes.ndim, "axis")[0]
  x = jnp.moveaxis(codes, axis, -1).astype(jnp.uint32)
  n = x.shape[-1]
  g, nbytes = group_layout(bits)
  pad = -n % g
  if pad:
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
  x = x.reshape(*x.shape[:-1], -1, g)
  # Expand every code into its r bits (LSB first): [..., groups, g, r] -> [..., groups, B, 8].
  bit_pos = jnp.arange(bits, dtype=jnp.uint32)
  stream = (x[..., None] >> bit_pos) & 1
  stream = stream.reshape(*x.shape[:-1], nbytes, 8)
  weights = (1 << jnp.arange(8, dtype=jnp.uint32))
  packed = jnp.sum(stream * weights, axis=-1).astype(jnp.uint8)
  packed = packed.reshape(*packed.shape[:-2], -1)
  return jnp.moveaxis(packed, -1, axis)


def unpack_codes(packed: jax.Array, bits: int, length: int, axis: int = -1,
                 dtype: jnp.dtype = jnp.uint8) -> jax.Array:
  """Inverse of pack_codes: `length` r-bit codes along `axis`, as `dtype`."""
  bits = validation.check_bits(bits)
  packed = jnp.asarray(packed)
  if packed.dtype != jnp.uint8:
    raise ValueError(f"unpack_codes expects uint8 packed bytes, got {packed.dtype}.")
  if packed.ndim == 0:
    raise ValueError("unpack_codes needs at least one axis; got a scalar.")
  axis = validation.normalize_axes(axis, packed.ndim, "axis")[0]
  g, nbytes = group_layout(bits)
  expected = packed_length(length, bits)
  if packed.shape[axis] != expected:
    raise ValueError(
        f"packed axis {axis} has {packed.shape[axis]} bytes, but {length} codes of {bits} bits "
        f"pack into {expected} bytes; check `length` and `bits`.")
  x = jnp.moveaxis(packed, axis, -1).astype(jnp.uint32)
  x = x.reshape(*x.shape[:-1], -1, nbytes)
  stream = (x[..., None] >> jnp.arange(8, dtype=jnp.uint32)) & 1
  stream = stream.reshape(*x.shape[:-1], g, bits)
  codes = jnp.sum(stream << jnp.arange(bits, dtype=jnp.uint32), axis=-1)
  codes = codes.reshape(*codes.shape[:-2], -1)[..., :length]
  return jnp.moveaxis(codes.astype(dtype), -1, axis)
