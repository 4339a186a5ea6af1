"""The quantized forward pass's weights: one function from a parameter tree and a plan (or a
traced width) to the tree the model multiplies by.

A kernel is served as ŵ = α·(S(q, r) − z) (spec §2). Where q comes from decides the op:
  * float weights (QAT, the model run at a plan): `fake_quant` — MinMax(c) → slice → dequantize
    in one op with the straight-through gradient; `bits` may be a traced scalar, so one compiled
    forward serves every width of the objective's scan;
  * stored codes (a `QTensor` from the int8 checkpoint): slice and dequantize them.
Both give the same numbers for the same weights (tests/quant/test_forward.py), and every path
that quantizes weights for a forward pass uses `kernel_value`: the model's einsums, the train
step's `quantized_tree`, `MatQuantCheckpoint.params_for`. The packed serving matmuls
(serving/weights.py) are their own fast path, tested bit-exact against `params_for`.

Layouts: per-layer (`layer_{i}/<module>/<kernel>/w`) and stacked (`layers/sub_{j}/...`, a
leading group axis, statistics still per layer); kernels are found by quant/kernels.py's table.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from matquant_jax.quant import kernels as kernels_lib
from matquant_jax.quant.fake_quant import fake_quant
from matquant_jax.quant.plan import PrecisionPlan
from matquant_jax.quant.plan import Scope
from matquant_jax.quant.plan import plan_kernels
from matquant_jax.quant.qtensor import QTensor


def kernel_value(w: Any, kernel: kernels_lib.Kernel, bits: int | jax.Array, parent_bits: int = 8,
                 *, extra_precision: bool = False, leading_axes: int = 0,
                 dtype: Any = None) -> jax.Array:
  """One kernel as the quantized model multiplies by it, at slice width `bits`.

  Args:
    w: float weights (fake-quantized, differentiable) or a QTensor of stored codes.
    kernel: its row of the kernel table (the contracting axes give per-channel statistics).
    bits: the slice width r; a traced int32 scalar for float weights.
    parent_bits: the code width c.
    extra_precision: the unclamped slice (Eq. 8).
    leading_axes: axes in front of the kernel's own (the stacked layout's group axis).
    dtype: cast the result to it (None keeps float32).
  """
  if isinstance(w, QTensor):
    out = _dequantize_codes(w, int(bits), bool(extra_precision),
                            jnp.dtype(dtype or jnp.float32).name)
  else:
    axes = tuple(a + leading_axes for a in kernel.reduce_axes)
    out = fake_quant(w, bits, parent_bits, axes, extra_precision=extra_precision)
  return out if dtype is None else out.astype(dtype)


_DEQUANT_CACHE: dict = {}


def _dequantize_codes(qt: QTensor, bits: int, extra_precision: bool, dtype: str) -> jax.Array:
  # One compiled slice-and-dequantize per (width, EP, dtype): loading a checkpoint at a plan
  # runs it for every kernel.
  key = (bits, extra_precision, dtype)
  fn = _DEQUANT_CACHE.get(key)
  if fn is None:
    fn = jax.jit(lambda q: q.slice(bits, extra_precision=extra_precision).dequantize(dtype))
    _DEQUANT_CACHE[key] = fn
  return fn(qt)


def _kernel_at(path) -> tuple[kernels_lib.Kernel | None, int | None, int]:
  """(table row, layer index or None for the stacked layout, leading axes) of a tree path."""
  keys = [str(getattr(k, "key", k)) for k in path]
  kernel = kernels_lib.lookup("/".join(keys))
  if kernel is None or len(keys) < 3:
    return None, None, 0
  if keys[0].startswith("layer_"):
    return kernel, int(keys[0][len("layer_"):]), 0
  if keys[0] == "layers":
    return kernel, None, 1
  return None, None, 0


def quantized_tree(params: Any, *, plan: PrecisionPlan | None = None,
                   bits: int | jax.Array | None = None, scope: Scope | str | None = None,
                   parent_bits: int | None = None, extra_precision: bool | None = None,
                   num_layers: int | None = None, dtype: Any = None) -> Any:
  """`params` with every kernel a plan quantizes replaced by `kernel_value`; other leaves kept
  (cast to `dtype` if given).

  Either `plan` (per-layer, per-kernel widths; needs `num_layers`; a kernel the plan leaves
  unquantized but stored as codes is served at the parent width) or `bits` with `scope`,
  `parent_bits` and `extra_precision` (one width for every kernel in scope, e.g. the traced
  width of the objective's scan). The stacked layout takes only one width for all layers.
  """
  if (plan is None) == (bits is None):
    raise ValueError("quantized_tree: pass either plan= or bits= (with scope=).")
  if plan is not None:
    scope, parent_bits, extra_precision = plan.scope, plan.parent_bits, plan.extra_precision
    if num_layers is None:
      raise ValueError("quantized_tree(plan=...) needs num_layers to lay the plan out.")
  elif scope is None:
    raise ValueError("quantized_tree(bits=...) needs the scope of the kernels to quantize.")
  names = {name for _, name in plan_kernels(scope)}
  parent_bits = 8 if parent_bits is None else parent_bits

  def one(path, w):
    kernel, layer, lead = _kernel_at(path)
    in_scope = kernel is not None and kernel.name in names
    if not in_scope and not isinstance(w, QTensor):
      return w if dtype is None else w.astype(dtype)
    width = bits
    if plan is not None:
      if layer is None:
        raise ValueError("quantized_tree(plan=...) needs the per-layer layout; convert a "
                         "stacked tree with models.transformer.unstack_layers first.")
      width = plan.bits_for(layer, num_layers, kernel.kind, kernel.name) if in_scope else None
      width = w.parent_bits if width is None else width
    return kernel_value(w, kernel, width, parent_bits, extra_precision=bool(extra_precision),
                        leading_axes=lead, dtype=dtype)

  return jax.tree_util.tree_map_with_path(one, params,
                                          is_leaf=lambda x: isinstance(x, QTensor))
