"""Matmul from packed codes, y = x·α'(Q − z'), without dequantized weights in memory.

With per-output-channel α', z' the product factorizes:

    y[m, j] = α'_j · ( Σ_i x[m, i]·Q[i, j]  −  z'_j · Σ_i x[m, i] )

so the inner product runs on the integer codes (exact in bf16 for codes up to 8 bits, accumulated
in float32) and the per-channel affine map is applied once per output. The result differs from
the dequantized-weight matmul only by rounding: the reference rounds every weight α(q − z) to the
activation dtype, this path keeps the weights exact and rounds the output once.

Paths (`PATHS`), and what the guard (`select_path`) picks:

    fmt "int4"    -> "xla_int4"    jnp.int4 codes converted inside the jitted dot (XLA fuses the
                                   convert into the GEMM on GPU and TPU: the fast int4 path).
    fmt "u8"      -> "xla_u8"      uint8 codes converted inside the jitted dot.
    fmt "planes"  -> "pallas_gpu"  on a GPU backend when the shapes tile (pallas_gpu.config),
                     "pallas_tpu"  on a TPU backend when the shapes tile (pallas_tpu.config),
                     "xla_unpack"  otherwise (the fallback: shifts and masks in XLA, then a dot;
                                   the unpacked codes may be materialised by XLA).

With `path="auto"` a Pallas kernel is also compiled once per shape signature before it is used
(outside of interpret mode); if it fails to compile on this backend, the guard warns once and
falls back to "xla_unpack". A forced path that does not apply raises a ValueError naming why.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp

from matquant_jax.serving import layouts
from matquant_jax.serving import pallas_gpu
from matquant_jax.serving import pallas_tpu
from matquant_jax.serving.weights import PackedWeight

PATHS = ("xla_int4", "xla_u8", "xla_unpack", "pallas_gpu", "pallas_tpu")

_log = logging.getLogger(__name__)


def _default_backend() -> str:
  # One indirection so tests can ask what the guard does on another backend.
  return jax.default_backend()


def select_path(w: PackedWeight, m: int, *, backend: str | None = None,
                dtype: Any = jnp.bfloat16) -> str:
  """The path the guard picks for `m` rows of activations on `backend` (shape rules only)."""
  backend = backend or _default_backend()
  if w.fmt == "int4":
    return "xla_int4"
  if w.fmt == "u8":
    return "xla_u8"
  if backend in ("gpu", "cuda", "rocm") and not isinstance(pallas_gpu.config(w, m, dtype), str):
    return "pallas_gpu"
  if backend == "tpu" and not isinstance(pallas_tpu.config(w, m, dtype), str):
    return "pallas_tpu"
  return "xla_unpack"


def _signature(w: PackedWeight, m: int, dtype) -> tuple:
  return (w.fmt, w.widths, w.k, w.n, m, jnp.dtype(dtype).name)


@functools.lru_cache(maxsize=None)
def _kernel_compiles(path: str, signature: tuple) -> bool:
  """Compiles the Pallas kernel for one shape signature on this backend; False on failure."""
  fmt, widths, k, n, m, dtype = signature
  kp = layouts.padded_rows(k, widths)
  abstract_w = PackedWeight(
      data=tuple(jax.ShapeDtypeStruct((kp // (8 // wd), n), jnp.uint8) for wd in widths),
      scale=jax.ShapeDtypeStruct((n,), jnp.float32), zero=jax.ShapeDtypeStruct((n,), jnp.float32),
      kernel_shape=(k, n), contract_axes=(0,), fmt=fmt, widths=widths, bits=sum(widths),
      parent_bits=8)
  x = jax.ShapeDtypeStruct((m, k), jnp.dtype(dtype))
  impl = pallas_gpu.matmul if path == "pallas_gpu" else pallas_tpu.matmul
  try:
    jax.jit(lambda x, w: impl(x, w, interpret=False)).lower(x, abstract_w).compile()
    return True
  except Exception as e:  # pylint: disable=broad-except
    _log.warning("matquant_jax.serving: the %s kernel does not compile for %s (%s: %s); "
                 "using the xla_unpack fallback.", path, signature, type(e).__name__, e)
    return False


def resolve_path(w: PackedWeight, m: int, dtype: Any, *, path: str | None = None,
                 interpret: bool | None = None, backend: str | None = None) -> str:
  """The path that will run: a forced one (validated) or the guard's pick (compile-checked)."""
  path = w.path if path is None else path
  interpret = w.interpret if interpret is None else interpret
  if path == "auto":
    path = select_path(w, m, backend=backend, dtype=dtype)
    if path.startswith("pallas") and not interpret and not _kernel_compiles(
        path, _signature(w, m, dtype)):
      path = "xla_unpack"
    return path
  if path not in PATHS:
    raise ValueError(f"unknown matmul path {path!r}: valid paths are 'auto', "
                     f"{', '.join(repr(p) for p in PATHS)}.")
  wanted_fmt = {"xla_int4": "int4", "xla_u8": "u8"}.get(path, "planes")
  if w.fmt != wanted_fmt:
    raise ValueError(f"matmul path {path!r} needs {wanted_fmt!r} weights, but this weight is "
                     f"stored as {w.fmt!r}; use path='auto' or repack with that format.")
  if path in ("pallas_gpu", "pallas_tpu"):
    cfg = (pallas_gpu if path == "pallas_gpu" else pallas_tpu).config(w, m, dtype)
    if isinstance(cfg, str):
      raise ValueError(f"the {path} kernel cannot run this matmul ({m}x{w.k} by {w.k}x{w.n}, "
                       f"{w.storage_bits}-bit planes {w.widths}): {cfg}. Use path='auto' to fall "
                       f"back to XLA.")
  return path


def epilogue(acc: jax.Array, xsum: jax.Array, w: PackedWeight) -> jax.Array:
  """α'(acc − (z' − offset)·Σx) in float32; acc [M, N], xsum [M]."""
  zero = w.zero - w.code_offset
  return w.scale[None, :] * (acc - zero[None, :] * xsum[:, None])


def _xla_codes(w: PackedWeight, dtype) -> jax.Array:
  """The stored code values (idx − offset) [K, N] in the activation dtype (exact)."""
  if w.fmt == "planes":
    return layouts.unpack_planes(w.data, w.widths, w.k).astype(dtype)
  return w.data[0].astype(dtype)


def packed_matmul(x: jax.Array, w: PackedWeight, *, path: str | None = None,
                  interpret: bool | None = None) -> jax.Array:
  """x [M, K] (float32/bfloat16) times the packed weight's Q[K, N] -> [M, N] in x's dtype.

  Args:
    x: activations [M, K].
    w: the packed weight.
    path: override the weight's path ("auto" = the guard).
    interpret: override the weight's interpret flag (Pallas kernels on CPU).
  """
  if x.ndim != 2 or x.shape[1] != w.k:
    raise ValueError(f"packed_matmul needs x [M, {w.k}], got {x.shape}.")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"packed_matmul needs float activations, got {x.dtype}.")
  interpret = w.interpret if interpret is None else interpret
  path = resolve_path(w, x.shape[0], x.dtype, path=path, interpret=interpret)
  if path == "pallas_gpu":
    return pallas_gpu.matmul(x, w, interpret=interpret)
  if path == "pallas_tpu":
    return pallas_tpu.matmul(x, w, interpret=interpret)
  acc = jnp.dot(x, _xla_codes(w, x.dtype), preferred_element_type=jnp.float32)
  xsum = jnp.sum(x.astype(jnp.float32), axis=-1)
  return epilogue(acc, xsum, w).astype(x.dtype)


def _parse_einsum(eqn: str, x_ndim: int, w: PackedWeight):
  """Checks `eqn` contracts exactly the weight's contracting axes; returns the index plan."""
  eqn = eqn.replace(" ", "")
  try:
    inputs, out = eqn.split("->")
    xs, ws = inputs.split(",")
  except ValueError:
    raise ValueError(f"packed einsum needs an explicit two-operand equation 'x,w->out', got "
                     f"{eqn!r}.") from None
  if len(ws) != len(w.kernel_shape) or len(xs) != x_ndim:
    raise ValueError(f"einsum {eqn!r} does not match x of rank {x_ndim} and a kernel of shape "
                     f"{w.kernel_shape}.")
  if len(set(xs)) != len(xs) or len(set(ws)) != len(ws) or len(set(out)) != len(out):
    raise ValueError(f"einsum {eqn!r}: repeated indices are not supported by packed weights.")
  contract = [ws[a] for a in w.contract_axes]
  kernel_out = [c for i, c in enumerate(ws) if i not in w.contract_axes]
  batch = [c for c in xs if c not in contract]
  ok = (all(c in xs and c not in out for c in contract)
        and all(c not in xs and c in out for c in kernel_out)
        and all(c not in ws and c in out for c in batch)
        and sorted(out) == sorted(batch + kernel_out))
  if not ok:
    raise ValueError(
        f"einsum {eqn!r} is not a matmul over this kernel's contracting axes "
        f"{w.contract_axes} (indices {''.join(contract)!r}); packed weights serve only the "
        f"layer's own equation.")
  return xs, out, batch, contract, kernel_out


def packed_einsum(eqn: str, x: jax.Array, w: PackedWeight, *, path: str | None = None,
                  interpret: bool | None = None) -> jax.Array:
  """`jnp.einsum(eqn, x, dequantized w)` from packed codes, e.g. "BTD,CDF->CBTF".

  x is brought to [M, K] (batch indices first, then the contracting ones in the kernel's
  order), multiplied by Q[K, N], and the result reshaped and transposed to `out`.
  """
  xs, out, batch, contract, kernel_out = _parse_einsum(eqn, x.ndim, w)
  sizes = dict(zip(xs, x.shape))
  ws = eqn.replace(" ", "").split("->")[0].split(",")[1]
  kernel_sizes = dict(zip(ws, w.kernel_shape))
  for c in contract:
    if sizes[c] != kernel_sizes[c]:
      raise ValueError(f"einsum {eqn!r}: x has {sizes[c]} along {c!r}, the kernel "
                       f"{kernel_sizes[c]}.")
  perm = [xs.index(c) for c in batch + contract]
  x2 = jnp.transpose(x, perm).reshape(-1, w.k)
  y = packed_matmul(x2, w, path=path, interpret=interpret)
  y = y.reshape([sizes[c] for c in batch] + [kernel_sizes[c] for c in kernel_out])
  have = batch + kernel_out
  return jnp.transpose(y, [have.index(c) for c in out])
