"""The Matryoshka slicing operator S(q^c, r) (spec §2, Eq. 6; Extra Precision Eq. 8).

    S(q, r)    = clamp(⌊q / 2^(c−r)⌉, 0, 2^r − 1) · 2^(c−r)      (MatQuant, Eq. 6)
    S_ep(q, r) =       ⌊q / 2^(c−r)⌉               · 2^(c−r)      (Extra Precision, Eq. 8)

⌊·⌉ is round-half-up: the r-th bit is rounded up when the (r+1)-th most significant bit is set
(Appendix A). In bits, with s = c − r:  (q >> s) + ((q >> (s − 1)) & 1).

Bucket edges for c = 8 (the r-bit index is S(q, r) / 2^(c−r)):

    r = 2:  q in [0, 32) -> 0 | [32, 96) -> 1 (64) | [96, 160) -> 2 (128) | [160, 224) -> 3 (192)
            [224, 256) -> 3 (192) clamped; without the clamp -> 4 (256), the "extra bucket"
    r = 4:  q in [16k - 8, 16k + 8) -> k (code 16k) for k = 0..15; [248, 256) -> 15 (240)
            clamped, 16 (256) without the clamp

The result stays on the c-bit grid (multiples of 2^(c−r)) and is dequantized with the parent α, z.
S(q, c) = q. Slices are always taken from the c-bit code itself, never from another slice:
S(S(q, 4), 2) is not S(q, 2) in general (e.g. q = 24: S(q, 4) = 32, S(32, 2) = 64, S(24, 2) = 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from matquant_jax.quant import validation


def slice_index(q: jax.Array, bits: int, parent_bits: int = 8, *,
                extra_precision: bool = False) -> jax.Array:
  """The r-bit index ⌊q / 2^(c−r)⌉ (clamped to 2^r − 1 unless `extra_precision`), as int32.

  Integer codes use the exact bit form; float codes (integer-valued, e.g. inside fake-quant)
  use floor(q / 2^s + 0.5), which is exact because 2^s is a power of two.
  """
  bits, parent_bits = validation.check_slice_bits(bits, parent_bits)
  shift = parent_bits - bits
  if jnp.issubdtype(jnp.asarray(q).dtype, jnp.integer):
    validation.check_codes_in_range(q, parent_bits, f"a {parent_bits}-bit parent")
    qi = jnp.asarray(q).astype(jnp.int32)
    if shift == 0:
      return qi
    idx = (qi >> shift) + ((qi >> (shift - 1)) & 1)
  else:
    idx = jnp.floor(jnp.asarray(q) / float(2**shift) + 0.5)
  if not extra_precision:
    idx = jnp.minimum(idx, 2**bits - 1)
  return idx


def slice_codes(q: jax.Array, bits: int, parent_bits: int = 8, *,
                extra_precision: bool = False) -> jax.Array:
  """S(q, r): the r-bit slice of c-bit codes, on the c-bit grid.

  Integer input keeps its dtype, except that an extra-precision slice of uint8 codes is returned
  as uint16 because it can reach 2^c = 256. Float input (fake-quant) stays float.
  """
  bits, parent_bits = validation.check_slice_bits(bits, parent_bits)
  q = jnp.asarray(q)
  idx = slice_index(q, bits, parent_bits, extra_precision=extra_precision)
  out = idx * (2 ** (parent_bits - bits))
  if jnp.issubdtype(q.dtype, jnp.integer):
    dtype = q.dtype
    if extra_precision and bits < parent_bits and jnp.iinfo(dtype).max < 2**parent_bits:
      dtype = jnp.uint16
    return out.astype(dtype)
  return out.astype(q.dtype)


def extra_bucket_mask(q: jax.Array, bits: int, parent_bits: int = 8) -> jax.Array:
  """True where the unclamped slice lands in the extra bucket (index 2^r, value 2^c)."""
  idx = slice_index(q, bits, parent_bits, extra_precision=True)
  return idx > 2**bits - 1


def extra_bucket_fraction(q: jax.Array, bits: int, parent_bits: int = 8) -> jax.Array:
  """Fraction of weights whose extra-precision r-bit slice needs the extra bucket."""
  return jnp.mean(extra_bucket_mask(q, bits, parent_bits).astype(jnp.float32))


def extra_precision_effective_bits(q: jax.Array, bits: int, parent_bits: int = 8) -> jax.Array:
  """Average bits per weight of an Extra Precision slice: r + (fraction in the extra bucket).

  The paper reports these averages (e.g. 2.050 bits for Gemma-2 9B int2) without a formula
  (spec §5.2, §11). r + fraction fits every reported number: each weight costs r bits, and a
  weight in the extra bucket costs one more (its overflow bit, stored sparsely). The int8
  "slice" is no slice at all, so it has no extra bucket and costs exactly c bits.
  """
  bits, parent_bits = validation.check_slice_bits(bits, parent_bits)
  if bits == parent_bits:
    return jnp.asarray(float(parent_bits), jnp.float32)
  return bits + extra_bucket_fraction(q, bits, parent_bits)
