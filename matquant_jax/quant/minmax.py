"""The base quantizer: asymmetric MinMax with a zero point (spec §1, Eq. 1 and Eq. 3).

    Q(w, c) = clamp(⌊w/α + z⌉, 0, 2^c − 1)      ŵ = α·(q − z)
    α = (γ·max(w) − β·min(w)) / (2^c − 1)        z = −β·min(w)/α

γ = β = 1 is plain MinMax (Eq. 1); learnable γ, β in (0, 1) are OmniQuant's Learnable Weight
Clipping (Eq. 3). The paper's α denominator typo `2^{c−1}` is read as `2^c − 1` (spec §1 caveat).

Granularity is per output channel: the statistics reduce over the kernel's *contracting* axes
(`reduce_axes`), so α and z keep the other axes with size-1 placeholders and broadcast against w.

Rounding: ⌊x⌉ is round-half-up, floor(x + 0.5), everywhere in this package. For the codes it
is applied to the exact value w/α + z (α, z as stored float32 numbers), on every path: XLA may
compute w/α as w·(1/α) or fuse differently under jit, which moves values that sit exactly on a
.5 tie (bf16 weights hit ties often: w = 0.006103515625 can give u = 127.5 exactly).
`round_codes` therefore rounds the float32 estimate and then corrects it by one where an
error-free float32 evaluation of the sign of w/α + z − (q ± 0.5) (TwoSum / TwoProduct) says the
estimate crossed a tie or a rounding boundary. Eager, jit, export and calibration agree with
an exact (float64) reference.

Degenerate channels. A constant channel (max == min), or one whose range is so small that
α = range/(2^c − 1) would underflow float32's normal range, is quantized as a constant: all
codes 0 and α = max(1, |min|·2^-64)/(2^c − 1), so z = −min/α stays finite even for huge
constants and the channel dequantizes to min (the error is below the range itself). A range
that overflows float32 (|max − min| > 3.4e38) is computed as max/(2^c−1) − min/(2^c−1).
Non-finite weights give non-finite statistics; the eager entry points (export, readers,
`QTensor.quantize` outside jit) refuse them by name (`check_finite`).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

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
  step = value_range / levels
  # A range beyond float32 (e.g. ±3e38): the same step, computed without the overflow.
  step = jnp.where(jnp.isfinite(step), step, w_max / levels - w_min / levels)
  live = step >= _TINY  # else constant, or so narrow that α would underflow (module docstring)
  constant_step = jnp.maximum(1.0, jnp.abs(w_min) * 2.0**-64) / levels
  # `where` keeps the gradient of the live branch only, so γ, β still get exact gradients.
  alpha = jnp.where(live, step, constant_step)
  zero = -w_min / alpha
  if round_zero:
    zero = round_half_up(zero)
  return alpha, zero


_TINY = float(jnp.finfo(jnp.float32).tiny)  # the smallest normal float32


def _two_sum(a, b):
  """(s, e) with s + e = a + b exactly (Knuth)."""
  s = a + b
  bb = s - a
  return s, (a - (s - bb)) + (b - bb)


def _split(a):
  """Veltkamp split of a float32 into two halves of at most 12 significant bits."""
  c = 4097.0 * a  # 2^12 + 1
  hi = c - (c - a)
  return hi, a - hi


def _two_prod(a, b):
  """(p, e) with p + e = a·b exactly (Dekker), without relying on FMA."""
  p = a * b
  ah, al = _split(a)
  bh, bl = _split(b)
  return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def _at_or_above(w, alpha, zero, t):
  """Whether w/α + z >= t for α > 0, decided exactly: the sign of w − α·(t − z)."""
  d_hi, d_lo = _two_sum(t, -zero)
  p_hi, p_lo = _two_prod(alpha, d_hi)
  return ((w - p_hi) - p_lo) - alpha * d_lo >= 0


def round_codes(w: jax.Array, alpha: jax.Array, zero: jax.Array) -> jax.Array:
  """⌊w/α + z⌉ (round-half-up of the exact value, unclamped) as float32; see the module
  docstring for why the float32 estimate is corrected."""
  wf = w.astype(jnp.float32)
  alpha = jnp.asarray(alpha, jnp.float32)
  zero = jnp.asarray(zero, jnp.float32)
  q = round_half_up(wf / alpha + zero)
  # The exact test splits α into halves with 4097·α, which overflows beyond ~8e34: scale w
  # and α by 2^-64 there (a power of two: exact, and the sign of w − α·(t − z) is unchanged).
  s = jnp.where(jnp.maximum(jnp.abs(wf), alpha) > 2.0**100, 2.0**-64, 1.0)
  ws, alphas = wf * s, alpha * s
  q = q - jnp.where(_at_or_above(ws, alphas, zero, q - 0.5), 0.0, 1.0)
  return q + jnp.where(_at_or_above(ws, alphas, zero, q + 0.5), 1.0, 0.0)


@jax.jit
def _all_finite(w) -> jax.Array:
  return jnp.all(jnp.isfinite(w))


def check_finite(w, name: str, reduce_axes: int | Sequence[int] | None = None) -> None:
  """Refuses a concrete array with NaN or ±inf, naming the tensor and the first bad entry's
  output channel (the non-reduced indices); traced arrays cannot be inspected and pass."""
  if isinstance(w, jax.core.Tracer):
    return
  if bool(_all_finite(jnp.asarray(w))):
    return
  import numpy as np  # pylint: disable=g-import-not-at-top
  arr = np.asarray(jax.device_get(w), np.float32)
  bad = np.argwhere(~np.isfinite(arr))
  first = tuple(int(i) for i in bad[0])
  where = f"entry {first}"
  if reduce_axes is not None:
    axes = validation.normalize_axes(reduce_axes, arr.ndim)
    channel = tuple(i for k, i in enumerate(first) if k not in axes)
    where = f"output channel {channel} (entry {first})"
  raise ValueError(f"{name}: {len(bad)} non-finite value(s) ({arr[first]} at {where}): "
                   f"MinMax quantization needs finite weights; fix or re-export the source "
                   f"checkpoint.")


def quantize(w: jax.Array, alpha: jax.Array, zero: jax.Array, bits: int = 8) -> jax.Array:
  """Unsigned c-bit codes clamp(⌊w/α + z⌉, 0, 2^c − 1) as uint8 (c <= 8)."""
  bits = validation.check_bits(bits)
  return jnp.clip(round_codes(w, alpha, zero), 0, 2**bits - 1).astype(jnp.uint8)


def dequantize(codes: jax.Array, alpha: jax.Array, zero: jax.Array,
               dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """ŵ = α·(q − z), computed in float32 and cast to `dtype`."""
  return (alpha * (codes.astype(jnp.float32) - zero)).astype(dtype)


def lwc_factor(logit: jax.Array, bound: float = 1.0) -> jax.Array:
  """A clipping factor from its logit: γ = bound·σ(logit) ∈ (0, bound).

  bound = 1 is OmniQuant's sigmoid parametrization (clipping can only shrink the range). A
  bound above 1 lets the range also grow, which a sliced grid needs: MatQuant's int2 slice of
  the int8 code has its top level at 192/255 of the int8 range, so with γ ≤ 1 its levels cannot
  reach the top of the weights (calibration.lwc_max). A logit ≥ NO_CLIP_LOGIT means exactly 1
  (plain MinMax) whatever the bound.
  """
  logit = logit.astype(jnp.float32)
  if bound == 1.0:
    return jax.nn.sigmoid(logit)  # σ(NO_CLIP_LOGIT) is exactly 1.0 in float32
  return jnp.where(logit >= NO_CLIP_LOGIT, 1.0, bound * jax.nn.sigmoid(logit))


def rebound_logit(logit: float, bound: float) -> float:
  """The logit whose lwc_factor(·, bound) equals σ(logit): the same clipping factor under a
  wider bound (computed in the log domain, so any finite logit works)."""
  if not (math.isfinite(bound) and bound >= 1.0):
    raise ValueError(f"a clipping bound of {bound} must be a number >= 1.")
  if bound == 1.0:
    return float(logit)
  log_q = -float(np.logaddexp(0.0, -logit)) - math.log(bound)  # log(σ(logit) / bound)
  return log_q - math.log1p(-math.exp(log_q))


# σ(4) ≈ 0.982: OmniQuant initialises its LWC logits at 4, i.e. almost no clipping at the start.
LWC_INIT_LOGIT = 4.0
# A logit whose factor is exactly 1.0 in float32: LWC "off" (plain MinMax) without a separate
# code path or compilation.
NO_CLIP_LOGIT = 40.0
