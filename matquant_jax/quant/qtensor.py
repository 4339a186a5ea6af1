"""QTensor: a quantized weight as a pytree of uint8 codes, per-channel α and z.

Invariants:
  * `codes` has the weight's shape and holds values on the parent grid (0..2^c − 1, multiples
    of 2^(c − bits) once sliced). dtype uint8, or uint16 for an extra-precision slice (it can
    reach 2^c).
  * `scale` (α) and `zero` (z) are float32 with the weight's rank; `reduce_axes` are size 1.
  * `bits` is the width of the values held: c for the parent, r after `.slice(r)`. Slices are
    always taken from the parent (bits == parent_bits): S(S(q, 4), 2) != S(q, 2).
Static fields (axes, widths, extra_precision) are pytree metadata, so a QTensor passes through
jit, vmap and sharding like its arrays do.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from matquant_jax.quant import minmax
from matquant_jax.quant import slicing
from matquant_jax.quant import validation


@functools.partial(jax.jit, static_argnames=("bits", "axes", "round_zero"))
def _minmax_codes(w, gamma, beta, *, bits: int, axes: tuple[int, ...], round_zero: bool):
  """(codes, α, z) of MinMax(bits) as one compiled program per shape: run eagerly, each of its
  ~40 operations compiles on its own for every new kernel shape (most of an export's time on
  CPU)."""
  alpha, zero = minmax.minmax_params(w, bits, axes, gamma=gamma, beta=beta, round_zero=round_zero)
  return minmax.quantize(w, alpha, zero, bits), alpha, zero


@struct.dataclass
class QTensor:
  codes: jax.Array
  scale: jax.Array
  zero: jax.Array
  reduce_axes: tuple[int, ...] = struct.field(pytree_node=False)
  parent_bits: int = struct.field(pytree_node=False, default=8)
  bits: int = struct.field(pytree_node=False, default=8)
  extra_precision: bool = struct.field(pytree_node=False, default=False)

  @classmethod
  def quantize(cls, w: jax.Array, bits: int = 8, reduce_axes: int | Sequence[int] = 0, *,
               round_zero: bool = False, gamma=None, beta=None) -> "QTensor":
    """MinMax-quantizes float weights `w` to `bits`-bit codes (the parent of every slice).

    Concrete (non-traced) weights with NaN or ±inf are refused (minmax.check_finite)."""
    bits = validation.check_bits(bits)
    axes = validation.normalize_axes(reduce_axes, jnp.ndim(w))
    minmax.check_finite(w, "QTensor.quantize weights", axes)
    codes, alpha, zero = _minmax_codes(w, gamma, beta, bits=bits, axes=axes,
                                       round_zero=round_zero)
    return cls(codes=codes, scale=alpha, zero=zero, reduce_axes=axes, parent_bits=bits,
               bits=bits, extra_precision=False)

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.codes.shape)

  @property
  def ndim(self) -> int:
    return len(self.codes.shape)

  @property
  def size(self) -> int:
    return int(np.prod(self.codes.shape))

  def slice(self, bits: int, *, extra_precision: bool = False) -> "QTensor":
    """The r-bit Matryoshka slice S(q, r), still dequantized with the parent α and z."""
    bits, _ = validation.check_slice_bits(bits, self.parent_bits)
    if self.bits != self.parent_bits:
      if bits == self.bits and extra_precision == self.extra_precision:
        return self
      raise ValueError(
          f"this QTensor already holds a {self.bits}-bit slice; slices must be taken from the "
          f"{self.parent_bits}-bit parent codes (S(S(q, 4), 2) != S(q, 2)). Slice the parent.")
    codes = slicing.slice_codes(self.codes, bits, self.parent_bits,
                                extra_precision=extra_precision)
    return self.replace(codes=codes, bits=bits,
                        extra_precision=bool(extra_precision) and bits < self.parent_bits)

  def dequantize(self, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """ŵ = α·(q − z)."""
    return minmax.dequantize(self.codes, self.scale, self.zero, dtype)

  def indices(self) -> jax.Array:
    """The r-bit indices codes / 2^(c − r) (0..2^r − 1, or 2^r for an extra-precision bucket)."""
    shift = self.parent_bits - self.bits
    return (self.codes.astype(jnp.int32) >> shift).astype(self.codes.dtype)

  @property
  def nbytes(self) -> int:
    """Bytes the arrays occupy as held now (codes at their dtype, α and z in float32)."""
    return int(self.codes.size * self.codes.dtype.itemsize + self.scale.size *
               self.scale.dtype.itemsize + self.zero.size * self.zero.dtype.itemsize)

  @property
  def packed_nbytes(self) -> int:
    """Bytes when the codes are packed at their width, plus α and z.

    ⌈size · w / 8⌉ code bytes for w = r (r + 1 for an extra-precision slice): what the serving
    layout (serving/layouts.py) stores, up to its padding of the contraction axis to whole bytes.
    An extra-precision slice is counted densely at r + 1 bits per weight: the paper's
    r + (fraction in the extra bucket) needs a sparse side table (see effective_bits).
    """
    width = self.bits + (1 if self.extra_precision else 0)
    code_bytes = -(-self.size * width // 8)
    return int(code_bytes + self.scale.size * self.scale.dtype.itemsize +
               self.zero.size * self.zero.dtype.itemsize)

  def effective_bits(self) -> float:
    """Average bits per weight of the codes: r, or r + extra-bucket fraction (spec §5.2)."""
    if not self.extra_precision:
      return float(self.bits)
    frac = float(jnp.mean((self.indices() > 2**self.bits - 1).astype(jnp.float32)))
    return self.bits + frac
