"""Pallas (Triton) GPU kernel: x [M, K] times bit-plane-packed codes, for decode-sized M.

Grid (N / bn, S): program (j, s) owns output columns [j·bn, (j+1)·bn) and the s-th of S equal
ranges of K ("split-K": a batch-1 matmul with N = 3584 has only 28 column tiles, too few to keep
132 SMs reading, so K is split until there is at least one program per SM). Each program loops
over its K steps; at step i it loads, for every plane k of width w (p = 8 / w codes per byte),
the byte tile [t_k, bn] at rows i·t_k of the planar-packed plane (layouts.py), and for each
sub-code s the matching activations x[:, s·Kp/p + i·t_k + (0..t_k)] (one contiguous slice, which
is why the layout is planar), and accumulates

    acc += 2^{o_k} · x_s · ((tile >> w·s) & (2^w − 1))        (float32, on tensor cores)

With bf16/f16 activations a code c becomes the float BIAS + c by OR-ing it into BIAS's bits
(no int -> float conversion instruction; see _MAGIC), and BIAS·Σx is subtracted at the end.
The codes never exist outside registers. Padding rows of x (M is padded to a power of two
>= 16, the smallest tensor-core tile) are masked loads, so they cost no memory traffic. Partial
sums [S, M, N] go back to XLA, which adds them and applies α'(acc − z'·Σx) in one fusion.

Triton constraints the guard (`config`) checks: every loaded tile has power-of-two sides and
t_k >= 16; bn is a power of two dividing N. Backends: CUDA (and ROCm) through Triton; run with
`interpret=True` anywhere (CPU tests).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from matquant_jax.serving import layouts

try:  # the Triton namespace of Pallas (absent from builds without it)
  from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
  plgpu = None

# A squeezed block dimension: `pl.squeezed` where this jax has it (None is the older spelling).
_SQUEEZED = getattr(pl, "squeezed", None)

MAX_M = 64  # larger M (prefill) is compute-bound: XLA's unpack + dot is as good there
TARGET_PROGRAMS = 132  # one program per SM of an H100 at least
_MAX_TILE_ROWS = 256  # rows of the largest code tile a program holds in registers
_FLOAT_DTYPES = ("bfloat16", "float16", "float32")


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def config(w, m: int, dtype: Any = jnp.bfloat16) -> dict | str:
  """Block sizes for this matmul, or a string saying why the kernel does not apply."""
  if w.fmt != "planes":
    return f"the kernel reads bit planes, this weight is stored as {w.fmt!r}"
  if plgpu is None:
    return "this jax has no Pallas Triton backend"
  if jnp.dtype(dtype).name not in _FLOAT_DTYPES:
    return f"activations must be one of {_FLOAT_DTYPES}, got {jnp.dtype(dtype).name}"
  if m > MAX_M:
    return f"M={m} rows exceeds {MAX_M} (prefill-sized; XLA is used there)"
  bn = next((b for b in (128, 64, 32, 16) if w.n % b == 0), None)
  if bn is None:
    return f"N={w.n} is not a multiple of 16"
  per_byte = [8 // wd for wd in w.widths]
  pmax, pmin = max(per_byte), min(per_byte)
  rows = w.kp // pmax
  t = next((t for t in (128, 64, 32, 16)
            if rows % t == 0 and t * pmax // pmin <= _MAX_TILE_ROWS), None)
  if t is None:
    return f"Kp/{pmax}={rows} is not a multiple of 16 (no power-of-two K tile)"
  steps_total = rows // t
  programs = w.n // bn
  splits = next((d for d in range(1, steps_total + 1)
                 if steps_total % d == 0 and programs * d >= TARGET_PROGRAMS), steps_total)
  return {
      "m_pad": max(16, _next_pow2(m)), "bn": bn,
      "tiles": tuple(t * pmax // p for p in per_byte), "splits": splits,
      "steps": steps_total // splits,
  }


# Float bits that OR with a code c < 2^7 (bf16) / 2^10 (f16) into the float value BIAS + c: the
# exponent of BIAS puts c exactly in the mantissa's last bits. Building codes this way costs one
# OR per code instead of an int -> float conversion (a quarter-rate instruction on NVIDIA GPUs,
# which would otherwise bound a 2-bit GEMV); the BIAS·Σx it adds is removed in the epilogue.
_MAGIC = {"bfloat16": (0x4300, 128.0, 7), "float16": (0x6400, 1024.0, 10)}


def _magic(dtype, widths):
  """(bits, bias) of the OR trick for these activations and planes, or None to convert."""
  entry = _MAGIC.get(jnp.dtype(dtype).name)
  if entry is None or max(widths) > entry[2]:
    return None
  return entry[0], entry[1]


def _kernel(*refs, widths, tiles, steps, m, magic):
  x_ref, w_refs, o_ref = refs[0], refs[1:-1], refs[-1]
  m_pad, bn = o_ref.shape
  kp = x_ref.shape[1]
  split = pl.program_id(1)
  offsets = layouts.plane_offsets(widths)

  def body(i, acc):
    step = split * steps + i
    for w_ref, wd, t, off in zip(w_refs, widths, tiles, offsets):
      start = pl.multiple_of(step * t, t)
      rows = jax.lax.broadcasted_iota(jnp.int32, (m_pad, t), 0)
      stride = kp // (8 // wd)  # Kp / p: sub-code s of byte row j is row s·stride + j
      if magic is None:
        q = w_ref[pl.ds(start, t), :].astype(jnp.int32)  # [t, bn] bytes
      else:
        q = w_ref[pl.ds(start, t), :].astype(jnp.uint16)
      part = None
      for s in range(8 // wd):
        xs = plgpu.load(x_ref.at[:, pl.ds(s * stride + start, t)], mask=rows < m, other=0.0)
        code = (q >> (wd * s)) & (2**wd - 1)
        if magic is None:
          code = code.astype(xs.dtype)
        else:
          code = jax.lax.bitcast_convert_type(code | magic[0], xs.dtype)  # BIAS + code
        d = jnp.dot(xs, code, preferred_element_type=jnp.float32)
        part = d if part is None else part + d
      acc = acc + (part * float(2**off) if off else part)
    return acc

  acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((m_pad, bn), jnp.float32))
  o_ref[...] = acc


@functools.partial(jax.jit, static_argnames=("interpret",))
def matmul(x: jax.Array, w, *, interpret: bool = False) -> jax.Array:
  """x [M, K] · Q -> [M, N] in x's dtype (see the module docstring)."""
  from matquant_jax.serving.matmul import epilogue  # deferred: matmul imports this module
  cfg = config(w, x.shape[0], x.dtype)
  if isinstance(cfg, str):
    raise ValueError(f"pallas_gpu kernel does not apply: {cfg}.")
  m, n, kp = x.shape[0], w.n, w.kp
  m_pad, bn, splits, steps = cfg["m_pad"], cfg["bn"], cfg["splits"], cfg["steps"]
  # Rows M..M_pad are never read (masked loads); the pad only gives the ref its tile shape.
  xp = jnp.pad(x, ((0, m_pad - m), (0, kp - x.shape[1])))
  operands = [xp, *w.data]
  in_specs = [pl.BlockSpec((m_pad, kp), lambda j, s: (0, 0))]
  in_specs += [pl.BlockSpec((plane.shape[0], bn), lambda j, s: (0, j)) for plane in w.data]
  magic = _magic(x.dtype, w.widths)
  kernel = functools.partial(_kernel, widths=w.widths, tiles=cfg["tiles"], steps=steps, m=m,
                             magic=magic)
  partial = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((splits, m_pad, n), jnp.float32),
      grid=(n // bn, splits),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((_SQUEEZED, m_pad, bn), lambda j, s: (s, 0, j)),
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=3),
      interpret=interpret,
      name=f"matquant_planes{''.join(map(str, w.widths))}_gemv",
  )(*operands)
  acc = jnp.sum(partial, axis=0)[:m]
  xsum = jnp.sum(x.astype(jnp.float32), axis=-1)
  if magic is not None:
    # Every plane added BIAS·Σx, scaled by its 2^offset.
    bias = magic[1] * sum(2.0**o for o in layouts.plane_offsets(w.widths))
    acc = acc - bias * xsum[:, None]
  return epilogue(acc, xsum, w).astype(x.dtype)
