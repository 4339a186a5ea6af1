"""The base quantizer: asymmetric MinMax with a zero point (spec §1, Eq. 1 and Eq. 3).

    Q(w, c) = clamp(⌊w/α + z⌉, 0, 2^c − 1)      ŵ = α·(q − z)
    α = (γ·max(w) − β·min(w)) / (2^c − 1)        z = −β·min(w)/α

γ = β = 1 is plain MinMax (Eq. 1); learnable γ, β in (0, 1) are OmniQuant's Learnable Weight
Clipping (Eq. 3). The paper's α denominator typo `2^{c−1}` is read as `2^c − 1` (spec §1 caveat).

Granularity is per output channel: the statistics reduce over the kernel's *contracting* axes
(`reduce_axes`), so α and z keep the other axes with size-1 placeholders and broadcast against w.

Rounding: ⌊x⌉ is round-half-up, floor(x + 0.5), everywhere in this package. Ties are a
measure-zero event for float weights but not for integer codes (see slicing.py), and one rule
for both keeps the numerics easy to state.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from matquant_jax.quant import validation


def round_half_up(x: jax.Array) -> jax.Array:
  """⌊x⌉ with ties rounded toward +inf (not jnp.round's half-to-even)."""
  return jnp.floor(x + 0.5)


def minmax_params(
    w: jax.Array,
    bits: int = 8,
    reduce_axes: int | Sequence[int] = 0,
    *,
    gamma: jax.Array | float | None = None,
    beta: jax.Array | float | None = None,
    round_zero: bool = False,
    stop_weight_grad: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """Per-channel MinMax scale α and zero point z for c-bit unsigned codes.

  Args:
    w: float weights, any shape.
    bits: the code width c (1..8).
    reduce_axes: the axes the statistics reduce over (the contracting axes of the kernel):
      0 for a Dense kernel [in, out]; 1 for Gemma's (2, D, F) gating einsum, 2 for (2, F, D);
      0 for the (F, D) FFN `linear`; (1, 2) for attention `attn_vec_einsum` (N, H, D).
    gamma, beta: LWC clipping factors multiplying max(w) and min(w) (already in (0, 1) if
      sigmoid-parametrized by the caller); broadcastable to the statistics' shape. None means 1.
    round_zero: round z to an integer (OmniQuant's convention). The paper's Eq. 1 does not
      round z, so the default is False.
    stop_weight_grad: stop the gradient from α, z back into w through max/min. The clipping
      factors γ, β still receive gradients.

  Returns:
    (alpha, zero), float32, with the reduced axes kept as size 1 so they broadcast against w.
    A constant channel (max == min) gets α = 1/(2^c − 1) instead of 0: its codes are all 0 and
    it dequantizes exactly to its constant, with no division by zero.
  """
  bits = validation.check_bits(bits)
  axes = validation.normalize_axes(reduce_axes, w.ndim)
  levels = float(2**bits - 1)
  wf = w.astype(jnp.float32)
  if stop_weight_grad:
    wf = jax.lax.stop_gradient(wf)
  w_max = jnp.max(wf, axis=axes, keepdims=True)
  w_min = jnp.min(wf, axis=axes, keepdims=True)
  if gamma is not None:
    w_max = w_max * jnp.asarray(gamma, jnp.float32)
  if beta is not None:
    w_min = w_min * jnp.asarray(beta, jnp.float32)
  value_range = w_max - w_min
  # `where` keeps the gradient of the live branch only, so γ, β still get exact gradients.
  alpha = jnp.where(value_range > 0, value_range, 1.0) / levels
  zero = -w_min / alpha
  if round_zero:
    zero = round_half_up(zero)
  return alpha, zero


def quantize(w: jax.Array, alpha: jax.Array, zero: jax.Array, bits: int = 8) -> jax.Array:
  """Unsigned c-bit codes clamp(⌊w/α + z⌉, 0, 2^c − 1) as uint8 (c <= 8)."""
  bits = validation.check_bits(bits)
  q = round_half_up(w.astype(jnp.float32) / alpha + zero)
  return jnp.clip(q, 0, 2**bits - 1).astype(jnp.uint8)


def dequantize(codes: jax.Array, alpha: jax.Array, zero: jax.Array,
               dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """ŵ = α·(q − z), computed in float32 and cast to `dtype`."""
  return (alpha * (codes.astype(jnp.float32) - zero)).astype(dtype)


def lwc_factor(logit: jax.Array) -> jax.Array:
  """OmniQuant's sigmoid parametrization of a clipping factor: γ = σ(logit) ∈ (0, 1)."""
  return jax.nn.sigmoid(logit.astype(jnp.float32))


# σ(4) ≈ 0.982: OmniQuant initialises its LWC logits at 4, i.e. almost no clipping at the start.
LWC_INIT_LOGIT = 4.0
