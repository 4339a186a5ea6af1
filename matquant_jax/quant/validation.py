"""Up-front checks shared by the quant ops: bad bit-widths and axes fail here, not inside XLA."""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

MAX_PARENT_BITS = 8


def check_bits(bits, name: str = "bits", *, low: int = 1, high: int = MAX_PARENT_BITS) -> int:
  """Returns `bits` as an int, or raises ValueError naming the argument and the valid range."""
  if isinstance(bits, bool) or not isinstance(bits, (int,)) and not hasattr(bits, "__index__"):
    raise ValueError(
        f"{name} must be a Python int in [{low}, {high}], got {bits!r} of type "
        f"{type(bits).__name__}. Bit-widths are static configuration: pass a plain int.")
  bits = int(bits)
  if not low <= bits <= high:
    raise ValueError(f"{name}={bits} is out of range: MatQuant supports {name} in [{low}, {high}].")
  return bits


def check_slice_bits(bits: int, parent_bits: int) -> tuple[int, int]:
  """Validates a slice width r against its parent width c (1 <= r <= c <= 8)."""
  parent_bits = check_bits(parent_bits, "parent_bits")
  bits = check_bits(bits, "bits")
  if bits > parent_bits:
    raise ValueError(
        f"cannot slice {bits} bits out of a {parent_bits}-bit code: the slice width r must be "
        f"<= the parent width c (got r={bits}, c={parent_bits}).")
  return bits, parent_bits


def normalize_axes(axes: int | Sequence[int], ndim: int, name: str = "reduce_axes") -> tuple[int, ...]:
  """Turns axes (possibly negative) into a sorted tuple of non-negative ints, or raises ValueError."""
  if isinstance(axes, int):
    axes = (axes,)
  try:
    if isinstance(axes, str):
      raise TypeError
    axes = tuple(int(a) for a in axes)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{name} must be an int or a sequence of ints, got {axes!r}.") from e
  if not axes:
    raise ValueError(
        f"{name} is empty: MinMax needs at least one axis to reduce over (the contracting "
        f"axes of the kernel), otherwise every weight would get its own scale.")
  out = []
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(f"{name}={axes} has axis {a}, out of range for a tensor of rank {ndim}.")
    out.append(a % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"{name}={axes} names the same axis twice (rank {ndim}).")
  return tuple(sorted(out))


def check_codes_in_range(codes, bits: int, what: str, hint: str = "") -> None:
  """Rejects concrete integer codes outside [0, 2^bits − 1]; traced values cannot be inspected.

  The message reads "codes out of range for {what}: found [lo, hi], expected [0, max].{hint}".
  """
  if isinstance(codes, jax.core.Tracer):
    return
  arr = np.asarray(codes)
  if arr.size and (arr.min() < 0 or arr.max() > 2**bits - 1):
    raise ValueError(f"codes out of range for {what}: found [{arr.min()}, {arr.max()}], "
                     f"expected [0, {2**bits - 1}].{hint}")
