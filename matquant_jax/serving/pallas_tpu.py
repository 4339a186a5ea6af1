"""Pallas (Mosaic) TPU kernel: x [M, K] times bit-plane-packed codes.

Grid (N / bn, nk), K innermost and sequential ("arbitrary"), N parallel (split over the two
TensorCores of a megacore chip). Step (j, i) receives, for every plane k of width w
(p = 8 / w codes per byte), the byte tile [t_k, bn] at rows i·t_k of the planar-packed plane and
the activation view [p, M_pad, t_k] (sub-code s of the tile pairs with x[:, s·Kp/p + i·t_k + ...],
a contiguous slice: layouts.py), and accumulates in a float32 VMEM scratch

    acc += 2^{o_k} · x_s · ((tile >> w·s) & (2^w − 1))            (on the MXU, bf16 x bf16)

At the last K step the epilogue α'(acc − z'·Σx) is applied and the [M_pad, bn] tile written.
The bytes are read as int8 (a free bitcast) and widened to int32 before shifting; the mask
drops the sign-extension bits, so the codes are the same as from uint8.

Mosaic tiling rules the guard (`config`) checks: x's last block dim t_k is a multiple of 128
(or the whole Kp / p_k when nk = 1); the byte tile [t_k, bn] is a multiple of (32, 128) or
whole; bn is a multiple of 128 or the whole N; one code tile stays under a VMEM budget.
Run with `interpret=True` on CPU.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from matquant_jax.serving import layouts

try:
  from jax.experimental.pallas import tpu as pltpu
except ImportError:  # pragma: no cover
  pltpu = None

MAX_M = 256
_TILE_BYTES = 1 << 20  # one byte tile; double-buffered it stays well inside 16 MiB scoped VMEM
_FLOAT_DTYPES = ("bfloat16", "float32")


def config(w, m: int, dtype: Any = jnp.bfloat16) -> dict | str:
  """Block sizes for this matmul, or a string saying why the kernel does not apply."""
  if w.fmt != "planes":
    return f"the kernel reads bit planes, this weight is stored as {w.fmt!r}"
  if pltpu is None:
    return "this jax has no Pallas TPU backend"
  if jnp.dtype(dtype).name not in _FLOAT_DTYPES:
    return f"activations must be one of {_FLOAT_DTYPES}, got {jnp.dtype(dtype).name}"
  if m > MAX_M:
    return f"M={m} rows exceeds {MAX_M}"
  bn = next((b for b in (512, 256, 128) if w.n % b == 0), None)
  if bn is None:
    if w.n > 2048:
      return f"N={w.n} is not a multiple of 128"
    bn = w.n
  per_byte = [8 // wd for wd in w.widths]
  pmax, pmin = max(per_byte), min(per_byte)
  rows_min = w.kp // pmax  # the fewest byte rows of any plane
  chosen = None
  for nk in range(1, rows_min + 1):
    if rows_min % nk:
      continue
    t = rows_min // nk
    if nk > 1 and t % 128:
      continue
    if (t * pmax // pmin) * bn <= _TILE_BYTES:
      chosen = nk
      break
  if chosen is None:
    return (f"no K tiling of Kp={w.kp} fits: tiles must be multiples of 128 byte rows "
            f"(or the whole K) and under {_TILE_BYTES} bytes")
  return {
      "m_pad": -(-m // 16) * 16, "bn": bn, "nk": chosen,
      "tiles": tuple(rows_min // chosen * pmax // p for p in per_byte),
  }


def _kernel(*refs, widths, nk):
  n_planes = len(widths)
  x_refs, w_refs = refs[0:2 * n_planes:2], refs[1:2 * n_planes:2]
  scale_ref, zero_ref, xsum_ref, o_ref, acc_ref = refs[2 * n_planes:]
  i = pl.program_id(1)

  @pl.when(i == 0)
  def _init():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  acc = acc_ref[...]
  for x_ref, w_ref, wd, off in zip(x_refs, w_refs, widths, layouts.plane_offsets(widths)):
    q = w_ref[...].astype(jnp.int32)  # [t, bn], sign-extended bytes
    part = None
    for s in range(8 // wd):
      xs = x_ref[s]  # [M_pad, t]
      codes = ((q >> (wd * s)) & (2**wd - 1)).astype(jnp.float32).astype(xs.dtype)
      # Precision pinned, not taken from jax_default_matmul_precision: Mosaic rejects an fp32
      # contract precision on bf16 operands ("Bad lhs type"); f32 activations need it.
      precision = (jax.lax.Precision.HIGHEST if xs.dtype == jnp.float32
                   else jax.lax.Precision.DEFAULT)
      d = jnp.dot(xs, codes, preferred_element_type=jnp.float32, precision=precision)
      part = d if part is None else part + d
    acc = acc + (part * float(2**off) if off else part)
  acc_ref[...] = acc

  @pl.when(i == nk - 1)
  def _finish():
    out = scale_ref[...] * (acc_ref[...] - zero_ref[...] * xsum_ref[...])
    o_ref[...] = out.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret",))
def matmul(x: jax.Array, w, *, interpret: bool = False) -> jax.Array:
  """x [M, K] · Q -> [M, N] in x's dtype (see the module docstring)."""
  cfg = config(w, x.shape[0], x.dtype)
  if isinstance(cfg, str):
    raise ValueError(f"pallas_tpu kernel does not apply: {cfg}.")
  m, n, kp = x.shape[0], w.n, w.kp
  m_pad, bn, nk = cfg["m_pad"], cfg["bn"], cfg["nk"]
  xp = jnp.pad(x, ((0, m_pad - m), (0, kp - x.shape[1])))
  operands, in_specs = [], []
  for wd, plane, t in zip(w.widths, w.data, cfg["tiles"]):
    p = 8 // wd
    view = jnp.transpose(xp.reshape(m_pad, p, kp // p), (1, 0, 2))  # [p, M_pad, Kp/p]
    operands += [view, jax.lax.bitcast_convert_type(plane, jnp.int8)]
    in_specs += [pl.BlockSpec((p, m_pad, t), lambda j, i: (0, 0, i)),
                 pl.BlockSpec((t, bn), lambda j, i: (i, j))]
  zero = (w.zero - w.code_offset)[None, :]
  xsum = jnp.sum(xp.astype(jnp.float32), axis=-1, keepdims=True)  # [M_pad, 1]
  operands += [w.scale[None, :], zero, xsum]
  in_specs += [pl.BlockSpec((1, bn), lambda j, i: (0, j)),
               pl.BlockSpec((1, bn), lambda j, i: (0, j)),
               pl.BlockSpec((m_pad, 1), lambda j, i: (0, 0))]
  out = pl.pallas_call(
      functools.partial(_kernel, widths=w.widths, nk=nk),
      out_shape=jax.ShapeDtypeStruct((m_pad, n), x.dtype),
      grid=(n // bn, nk),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((m_pad, bn), lambda j, i: (0, j)),
      scratch_shapes=[pltpu.VMEM((m_pad, bn), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
      interpret=interpret,
      name=f"matquant_planes{''.join(map(str, w.widths))}_matmul",
  )(*operands)
  return out[:m]
