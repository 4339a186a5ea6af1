"""Code statistics: per-bit-width histograms of quantized codes (the analysis behind Fig. 1c).

A histogram at width r counts the r-bit indices S(q, r) / 2^(c − r) of the parent codes q:
2^r buckets, or 2^r + 1 with extra precision (the last one is the extra bucket). MatQuant's
signature (spec §9.1) is mass shifted toward the higher buckets compared with a baseline.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from matquant_jax.quant import slicing
from matquant_jax.quant import validation
from matquant_jax.quant.qtensor import QTensor


def code_histogram(codes: jax.Array | QTensor, bits: int, parent_bits: int = 8, *,
                   extra_precision: bool = False) -> np.ndarray:
  """Counts of the r-bit slice indices of parent codes, as int64 numpy [2^r (+1)]."""
  if isinstance(codes, QTensor):
    if codes.bits != codes.parent_bits:
      raise ValueError("code_histogram needs the parent codes, not a slice; pass the parent QTensor.")
    parent_bits, codes = codes.parent_bits, codes.codes
  bits, parent_bits = validation.check_slice_bits(bits, parent_bits)
  idx = slicing.slice_index(codes, bits, parent_bits, extra_precision=extra_precision)
  nbins = 2**bits + (1 if extra_precision and bits < parent_bits else 0)
  return np.asarray(jnp.bincount(idx.reshape(-1), length=nbins), dtype=np.int64)


def tree_code_histograms(
    tree,
    bits: Iterable[int] = (8, 4, 2),
    *,
    parent_bits: int = 8,
    extra_precision: bool = False,
    reduce_axes_for: Callable[[str, jax.Array], tuple[int, ...] | None] | None = None,
) -> dict[int, np.ndarray]:
  """Histograms summed over every quantized weight in a params tree.

  QTensor leaves are used as they are. Float leaves are MinMax-quantized to `parent_bits` when
  `reduce_axes_for(path, leaf)` returns their contracting axes, and skipped when it returns None
  (or when no callable is given). `path` is the '/'-joined key path, e.g. 'layer_0/mlp/linear/w'.
  """
  bits = tuple(bits)
  totals = {r: None for r in bits}
  found = 0
  leaves = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, QTensor))[0]
  for path, leaf in leaves:
    if isinstance(leaf, QTensor):
      qt = leaf
    else:
      axes = reduce_axes_for(_path_str(path), leaf) if reduce_axes_for else None
      if axes is None:
        continue
      qt = QTensor.quantize(leaf, parent_bits, axes)
    found += 1
    for r in bits:
      h = code_histogram(qt, r, extra_precision=extra_precision)
      totals[r] = h if totals[r] is None else totals[r] + h
  if not found:
    raise ValueError(
        "tree_code_histograms found no quantized weight: the tree has no QTensor leaves and "
        "reduce_axes_for selected no float leaf.")
  return totals


def histogram_summary(counts: np.ndarray) -> Mapping[str, float]:
  """Fractions per bucket, mean bucket index and the mass in the top bucket."""
  counts = np.asarray(counts, np.float64)
  total = counts.sum()
  frac = counts / total if total else counts
  return {
      "total": float(total),
      "mean_index": float((frac * np.arange(len(counts))).sum()),
      "top_bucket_fraction": float(frac[-1]) if len(frac) else 0.0,
      "fractions": frac.tolist(),
  }


def _path_str(path) -> str:
  parts = []
  for p in path:
    key = getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))
    parts.append(str(key))
  return "/".join(parts)
