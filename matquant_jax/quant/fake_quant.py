"""Fake quantization with a straight-through estimator, for QAT and OmniQuant (spec §1, §3).

Forward (exactly the integer pipeline, in float32):
    q  = clamp(⌊w/α + z⌉, 0, 2^c − 1)          the c-bit parent code
    qs = S(q, r)                               the r-bit slice (Eq. 6, or Eq. 8 if extra precision)
    ŵ  = α·(qs − z)

Backward (STE): both roundings pass the gradient unchanged; each clamp passes it only where its
rounded argument lies inside the clamp's range (boundaries included) and blocks it outside. With
u = w/α + z and m = [0 <= ⌊u⌉ <= 2^c − 1] · [⌊⌊u⌉/2^(c−r)⌉ <= 2^r − 1 (always true with extra
precision)],
the surrogate is ŵ ≈ α·(m·u + (1 − m)·qs − z), so

    ∂ŵ/∂w = m                                   (1 inside the grid, 0 for clipped weights)
    ∂ŵ/∂α = (qs − z) − m·w/α                    (= rounding error inside, the clipped value outside)
    ∂ŵ/∂z = −α·(1 − m)                          (zero inside the grid)

The vjp is written by hand (jax.custom_vjp) so a training step keeps nothing but w, α and z
between forward and backward: one fake-quant per bit-width costs no extra activation memory,
which is what lets a MatQuant step over R = {8, 4, 2} stay close to a single-precision step.

Where the gradient reaches α and z from depends on how the caller built them (minmax.py): with
`stop_weight_grad=True` (the QAT default) only the direct term m reaches w; OmniQuant's clipping
factors γ, β receive ∂L/∂α and ∂L/∂z through max/min as usual autodiff.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from matquant_jax.quant import minmax
from matquant_jax.quant import validation


def _pow2(n):
  """2^n for a non-negative int (or traced int32) n, exactly, as float32 (an integer shift:
  jnp.exp2 need not be exact on every backend)."""
  return jnp.left_shift(jnp.int32(1), jnp.asarray(n, jnp.int32)).astype(jnp.float32)


def _slice_float(q, bits, parent_bits, extra_precision):
  """S(q, r) on integer-valued float codes; `bits` may be a traced int32 scalar."""
  r = jnp.asarray(bits, jnp.int32)
  step = _pow2(parent_bits - r)  # 2^(c−r)
  idx = jnp.floor(q / step + 0.5)
  if not extra_precision:
    idx = jnp.minimum(idx, _pow2(r) - 1)
  return idx, idx * step


def _forward(w, alpha, zero, bits, parent_bits, extra_precision):
  u = w.astype(jnp.float32) / alpha + zero
  q = jnp.clip(minmax.round_codes(w, alpha, zero), 0, 2**parent_bits - 1)
  _, qs = _slice_float(q, bits, parent_bits, extra_precision)
  return u, q, qs


def _in_range(ru, q, bits, parent_bits, extra_precision):
  # The clamps act on rounded values, so the mask tests ⌊u⌉, not u: a channel's max sits at
  # u = 2^c − 1 + ε after float error and must keep its gradient.
  m = (ru >= 0) & (ru <= 2**parent_bits - 1)
  if not extra_precision:
    r = jnp.asarray(bits, jnp.int32)
    idx = jnp.floor(q / _pow2(parent_bits - r) + 0.5)
    m = m & (idx <= _pow2(r) - 1)
  return m


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fake_quant(w, alpha, zero, bits, parent_bits, extra_precision):
  _, _, qs = _forward(w, alpha, zero, bits, parent_bits, extra_precision)
  return (alpha * (qs - zero)).astype(w.dtype)


def _fake_quant_fwd(w, alpha, zero, bits, parent_bits, extra_precision):
  return (_fake_quant(w, alpha, zero, bits, parent_bits, extra_precision),
          (w, alpha, zero, bits))


def _reduce_to(x, shape):
  """Sums a broadcast gradient back to the shape of a broadcast operand."""
  axes = tuple(i for i, (a, b) in enumerate(zip(x.shape, shape)) if b == 1 and a != 1)
  return jnp.sum(x, axis=axes, keepdims=True).reshape(shape)


def _fake_quant_bwd(parent_bits, extra_precision, res, g):
  w, alpha, zero, bits = res
  _, q, qs = _forward(w, alpha, zero, bits, parent_bits, extra_precision)
  ru = minmax.round_codes(w, alpha, zero)
  m = _in_range(ru, q, bits, parent_bits, extra_precision).astype(jnp.float32)
  g = g.astype(jnp.float32)
  wf = w.astype(jnp.float32)
  g_w = (g * m).astype(w.dtype)
  g_alpha = _reduce_to(g * ((qs - zero) - m * wf / alpha), jnp.shape(alpha))
  g_zero = _reduce_to(g * (-alpha * (1.0 - m)), jnp.shape(zero))
  # The bit-width is an integer: it has no cotangent.
  g_bits = np.zeros(np.shape(bits), dtype=jax.dtypes.float0)
  return (g_w, g_alpha.astype(jnp.result_type(alpha)), g_zero.astype(jnp.result_type(zero)),
          g_bits)


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def _bits_operand(bits, parent_bits: int):
  """A concrete bit-width (Python int, NumPy or concrete JAX integer) is validated; a traced
  one is clipped into [1, c], since its value cannot be inspected."""
  if isinstance(bits, (jax.core.Tracer, jax.Array, np.ndarray, np.generic)):
    if not jnp.issubdtype(jnp.asarray(bits).dtype, jnp.integer) or jnp.ndim(bits) != 0:
      raise ValueError(f"a bit-width array must be an integer scalar, got {bits!r}.")
    validation.check_bits(parent_bits, "parent_bits")
    if not isinstance(bits, jax.core.Tracer):
      validation.check_slice_bits(int(bits), parent_bits)
      return jnp.asarray(bits, jnp.int32)
    return jnp.clip(jnp.asarray(bits, jnp.int32), 1, parent_bits)
  bits, _ = validation.check_slice_bits(bits, parent_bits)
  return np.int32(bits)


def fake_quant_with_params(w: jax.Array, alpha: jax.Array, zero: jax.Array, bits: int,
                           parent_bits: int = 8, *, extra_precision: bool = False) -> jax.Array:
  """ŵ = α·(S(Q(w), r) − z) for given α, z, with the STE backward described above.

  `bits` is a Python int (validated) or a traced int32 scalar, which lets one compiled
  forward serve every width inside a `lax.scan` over R (see training/objectives.py).
  """
  parent_bits = validation.check_bits(parent_bits, "parent_bits")
  bits = _bits_operand(bits, parent_bits)
  if alpha.ndim != w.ndim or zero.ndim != w.ndim:
    raise ValueError(
        f"alpha/zero must keep the reduced axes as size 1 (rank {w.ndim}); got shapes "
        f"{alpha.shape} and {zero.shape} for weights of shape {w.shape}.")
  return _fake_quant(w, alpha.astype(jnp.float32), zero.astype(jnp.float32),
                     bits, parent_bits, bool(extra_precision))


def fake_quant(
    w: jax.Array,
    bits: int | jax.Array,
    parent_bits: int = 8,
    reduce_axes: int | Sequence[int] = 0,
    *,
    extra_precision: bool = False,
    gamma: jax.Array | None = None,
    beta: jax.Array | None = None,
    round_zero: bool = False,
    stop_weight_grad: bool = True,
) -> jax.Array:
  """Quantize-slice-dequantize `w` in one differentiable op (MinMax or LWC parameters).

  Args:
    w: float weights.
    bits: the slice width r served in the forward pass (r = c means no slicing).
    parent_bits: the code width c the slice is taken from (8 for MatQuant; r for a baseline
      trained directly at r bits with MinMax(r)).
    reduce_axes: contracting axes of the kernel (see minmax.minmax_params).
    extra_precision: use the unclamped slice (Eq. 8).
    gamma, beta: LWC clipping factors in (0, 1) (see minmax.lwc_factor); None for plain MinMax.
    round_zero: OmniQuant's rounded zero point.
    stop_weight_grad: keep the gradient from flowing into w through max/min (QAT default).
  """
  alpha, zero = minmax.minmax_params(
      w, parent_bits, reduce_axes, gamma=gamma, beta=beta, round_zero=round_zero,
      stop_weight_grad=stop_weight_grad)
  return fake_quant_with_params(w, alpha, zero, bits, parent_bits, extra_precision=extra_precision)
