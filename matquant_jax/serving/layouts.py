"""Serving layouts: r-bit codes of one kernel, packed along its contracting dimension.

The matrix a kernel sees
------------------------
Every quantizable kernel (models/config.py) is served as a matrix Q[K, N]: its contracting axes
(quant/kernels.py) are moved to the front and flattened into K, its output axes keep their
order and are flattened into N:

    q_einsum        [N_h, D, H]    -> Q[D, N_h·H]         attn_vec_einsum [N_h, H, D] -> Q[N_h·H, D]
    kv_einsum       [2, K_h, D, H] -> Q[D, 2·K_h·H]       gating_einsum   [2, D, F]   -> Q[D, 2·F]
    linear          [F, D]         -> Q[F, D]

α and z are per output channel, so they become vectors [N]. A kernel served at r bits holds the
r-bit *index* idx = S(q, r) / 2^(c−r) (0..2^r − 1; 2^r too in an extra-precision slice), with the
parent's α, z rescaled so that nothing else changes (both rescalings are exact in float32, so
the dequantized weights are bit-identical to `MatQuantCheckpoint.params_for`):

    α(S(q, r) − z) = α(2^(c−r)·idx − z) = α'(idx − z'),   α' = 2^(c−r)·α,   z' = z / 2^(c−r).

Extra precision: dense r + 1 bits
---------------------------------
An extra-precision slice needs idx = 2^r, so its codes are stored densely at r + 1 bits. This is
the *chosen* representation (not a sparse side table of the extra-bucket weights) because (a) the
same branch-free kernels serve it: r + 1 bits is just another width, split into bit planes below
(int2+EP = a 2-bit plane + a 1-bit plane, the latter being exactly the "overflow" bit);
(b) a sparse table costs ~16-32 bits per listed weight for its row index and an irregular gather
or scatter per matmul, which on a GPU/TPU costs more time than reading one dense bit-plane, and
saves memory only when fewer than ~1/16 of the weights overflow. The paper's r + fraction
"effective bits" (e.g. 2.05) is still what `MatQuantCheckpoint.effective_bits` reports; the
resident cost of EP here is exactly r + 1 bits per weight.

Storage formats (`fmt`)
-----------------------
Let sw be the stored width (r, or r + 1 with extra precision).

  "int4"    sw <= 4 on a backend that keeps `jnp.int4` packed in memory (GPU, TPU): one
            `jnp.int4` array [K, N] holding s = idx − 8 (signed int4). The shift is folded into
            the zero point at matmul time (α'(idx − z') = α'(s − (z' − 8))); z' itself is stored
            so dequantizing stays exact. XLA converts int4 -> bf16 inside the jitted dot.
  "u8"      sw = 8: one uint8 array [K, N] holding idx (no packing to do).
  "planes"  any other case (every width on CPU, where XLA stores int4 at one byte): idx is split
            into bit planes of width 4, 2 or 1, widest first, covering the low bits first:

                sw    1    2    3      4    5      6      7
                planes (1) (2)  (2,1)  (4)  (4,1)  (4,2)  (4,2,1)

            plane k holds bits [o_k, o_k + w_k) of idx, o_k = w_0 + ... + w_{k−1}, so
            idx = Σ_k plane_k << o_k and x·Q = Σ_k 2^{o_k}·(x·plane_k): every plane is a
            power-of-two width a kernel unpacks with one shift and one mask per code, and r bits
            cost exactly r bits per weight.

Packing of one plane of width w (p = 8 / w codes per byte), "planar" along K
----------------------------------------------------------------------------
K is zero-padded to Kp, a multiple of 8 / min(w) (the largest p among the planes); padded rows
hold code 0 and meet zero-padded activations, so they add nothing. The plane is uint8
[Kp / p, N] and byte j of column n holds rows j, j + Kp/p, j + 2·Kp/p, ... (one row per stride
of Kp/p), lowest bits first:

    byte[j, n] = Σ_{s < p} code[s·(Kp/p) + j, n] << (w·s)

    2-bit, Kp = 8:  byte[0] = c[0] | c[2]<<2 | c[4]<<4 | c[6]<<6
                    byte[1] = c[1] | c[3]<<2 | c[5]<<4 | c[7]<<6

Why planar rather than "byte j holds rows p·j .. p·j + p − 1" (a plain little-endian bit
stream): sub-code s of a tile of bytes is the contiguous row range s·Kp/p + [j0, j0 + t), so a
kernel computes `(tile >> w·s) & mask` and multiplies it with the matching *contiguous* slice of
x, with no interleaving shuffle in registers; the XLA fallback unpacks with p shifts and one
concatenate. The layout does not depend on any kernel block size.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from matquant_jax.quant import validation

FORMATS = ("int4", "u8", "planes")
PLANE_WIDTHS = (4, 2, 1)


def storage_bits(bits: int, parent_bits: int = 8, extra_precision: bool = False) -> int:
  """The stored width sw of an r-bit slice: r, or r + 1 for an extra-precision slice (r < c)."""
  bits, parent_bits = validation.check_slice_bits(bits, parent_bits)
  return bits + 1 if extra_precision and bits < parent_bits else bits


def plane_widths(sw: int) -> tuple[int, ...]:
  """Bit planes of a `sw`-bit code (widest first, low bits first), e.g. 6 -> (4, 2)."""
  sw = validation.check_bits(sw, "storage bits")
  if sw == 8:
    return (8,)
  out, left = [], sw
  for w in PLANE_WIDTHS:
    if left >= w:
      out.append(w)
      left -= w
  return tuple(out)


def padded_rows(k: int, widths: Sequence[int]) -> int:
  """Kp: K rounded up to a multiple of the most codes any plane packs per byte."""
  per_byte = max(8 // w for w in widths)
  return -(-k // per_byte) * per_byte


def plane_offsets(widths: Sequence[int]) -> tuple[int, ...]:
  """Bit offset o_k of each plane within the code."""
  offs, o = [], 0
  for w in widths:
    offs.append(o)
    o += w
  return tuple(offs)


# Host side (numpy): the streaming loader slices and packs one kernel at a time on the host, so
# the device only ever receives packed bytes.


def slice_index_np(q: np.ndarray, bits: int, parent_bits: int = 8, *,
                   extra_precision: bool = False) -> np.ndarray:
  """S(q, r) / 2^(c−r) on host, the same integer form as quant.slicing.slice_index (uint8)."""
  bits, parent_bits = validation.check_slice_bits(bits, parent_bits)
  q = np.asarray(q)
  if not np.issubdtype(q.dtype, np.integer):
    raise ValueError(f"slice_index_np expects integer codes, got {q.dtype}.")
  shift = parent_bits - bits
  if shift == 0:
    return q.astype(np.uint8)
  qi = q.astype(np.int16)
  idx = (qi >> shift) + ((qi >> (shift - 1)) & 1)
  if not extra_precision:
    idx = np.minimum(idx, 2**bits - 1)
  # An EP index reaches 2^r <= 128 for r < 8: still fits uint8.
  return idx.astype(np.uint8)


def kernel_to_matrix(w: np.ndarray, contract_axes: Sequence[int]) -> np.ndarray:
  """Kernel [config.py layout] -> Q[K, N]: contracting axes first (in order), then the rest."""
  w = np.asarray(w)
  contract_axes = tuple(contract_axes)
  out_axes = tuple(a for a in range(w.ndim) if a not in contract_axes)
  k = math.prod(w.shape[a] for a in contract_axes)
  return np.transpose(w, contract_axes + out_axes).reshape(k, -1)


def channel_vector(stat: np.ndarray) -> np.ndarray:
  """α or z with size-1 reduce axes -> [N] in the order of Q's columns."""
  return np.asarray(stat, np.float32).reshape(-1)


def matrix_to_kernel(m: jax.Array, kernel_shape: Sequence[int],
                     contract_axes: Sequence[int]) -> jax.Array:
  """Inverse of `kernel_to_matrix` (jnp): Q[K, N] -> the kernel's own layout."""
  contract_axes = tuple(contract_axes)
  out_axes = tuple(a for a in range(len(kernel_shape)) if a not in contract_axes)
  perm = contract_axes + out_axes
  m = m.reshape(tuple(kernel_shape[a] for a in perm))
  return jnp.transpose(m, np.argsort(perm))


def pack_planes_np(idx: np.ndarray, widths: Sequence[int]) -> tuple[np.ndarray, ...]:
  """idx [K, N] (values < 2^Σw) -> one planar-packed uint8 array [Kp / p_k, N] per plane."""
  idx = np.asarray(idx)
  if idx.ndim != 2:
    raise ValueError(f"pack_planes_np packs a [K, N] matrix, got shape {idx.shape}.")
  total = sum(widths)
  if idx.size and int(idx.max()) >= 2**total:
    raise ValueError(f"codes reach {int(idx.max())}, which does not fit {total} bits.")
  k, n = idx.shape
  kp = padded_rows(k, widths)
  codes = np.zeros((kp, n), np.uint8)
  codes[:k] = idx
  planes = []
  for w, o in zip(widths, plane_offsets(widths)):
    p = 8 // w
    bits = ((codes >> o) & (2**w - 1)).reshape(p, kp // p, n)
    packed = np.zeros((kp // p, n), np.uint8)
    for s in range(p):
      packed |= (bits[s] << (w * s)).astype(np.uint8)
    planes.append(packed)
  return tuple(planes)


def unpack_planes_np(planes: Sequence[np.ndarray], widths: Sequence[int], k: int) -> np.ndarray:
  """Host inverse of `pack_planes_np`: idx [K, N] uint8."""
  codes = None
  for plane, w, o in zip(planes, widths, plane_offsets(widths)):
    q = np.asarray(plane, np.uint8)
    part = np.concatenate([(q >> (w * s)) & (2**w - 1) for s in range(8 // w)], axis=0) << o
    codes = part if codes is None else codes | part
  return codes[:k].astype(np.uint8)


# Device side (jnp, jit-friendly).


def unpack_plane(packed: jax.Array, width: int) -> jax.Array:
  """One planar-packed plane [Kp / p, N] uint8 -> its codes [Kp, N] int32."""
  p = 8 // width
  q = packed.astype(jnp.int32)
  return jnp.concatenate([(q >> (width * s)) & (2**width - 1) for s in range(p)], axis=0)


def unpack_planes(planes: Sequence[jax.Array], widths: Sequence[int], k: int) -> jax.Array:
  """All planes -> idx [K, N] int32 (padding rows dropped)."""
  if len(planes) != len(widths):
    raise ValueError(f"{len(planes)} planes but {len(widths)} widths.")
  codes = None
  for plane, w, o in zip(planes, widths, plane_offsets(widths)):
    part = unpack_plane(plane, w) << o
    codes = part if codes is None else codes | part
  return codes[:k]
