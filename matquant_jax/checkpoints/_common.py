"""Helpers shared by the checkpoint readers: strict tensor-set checks and dtype handling.

Every reader compares what a checkpoint holds against what the config needs *before* it reads a
single tensor, and reports every difference in one `CheckpointMismatchError`, so a user fixes a
wrong checkpoint in one round trip and never gets a half-loaded tree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from matquant_jax.quant import kernels as kernels_lib

# Floating dtypes a weight may be stored in. Integer tensors are never model weights here.
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16),
                np.dtype(np.float64))

_DTYPE_ALIASES = {
    "float32": np.float32, "f32": np.float32, "fp32": np.float32,
    "bfloat16": ml_dtypes.bfloat16, "bf16": ml_dtypes.bfloat16,
    "float16": np.float16, "f16": np.float16, "fp16": np.float16,
}

# How many names a mismatch message lists per category before it summarises the rest: a whole
# 27B model missing is 500+ names, and nobody reads past the first screen.
_MAX_LISTED = 50


class CheckpointError(ValueError):
  """A checkpoint file or directory that cannot be read as what it claims to be (malformed,
  truncated, corrupted, inconsistent metadata); the message names the file and the problem."""


class CheckpointMismatchError(CheckpointError):
  """A checkpoint's tensors (names, shapes or dtypes) differ from what the config needs."""


def as_dtype(dtype: Any) -> np.dtype | None:
  """`dtype` as a numpy dtype (bf16 via ml_dtypes); None stays None (keep the stored dtype)."""
  if dtype is None:
    return None
  if isinstance(dtype, str):
    key = dtype.lower()
    if key not in _DTYPE_ALIASES:
      raise ValueError(
          f"unsupported dtype {dtype!r}; use one of {sorted(set(_DTYPE_ALIASES))} or None.")
    return np.dtype(_DTYPE_ALIASES[key])
  d = np.dtype(dtype)
  if d not in FLOAT_DTYPES:
    raise ValueError(f"unsupported dtype {d}; weights are loaded as a floating dtype "
                     f"({', '.join(str(x) for x in FLOAT_DTYPES)}) or None.")
  return d


def cast(x: np.ndarray, dtype: np.dtype | None) -> np.ndarray:
  """`x` in `dtype` (no copy when it already is, or when `dtype` is None)."""
  x = np.asarray(x)
  if dtype is None or x.dtype == dtype:
    return x
  return x.astype(dtype)


def _listing(items: list[str]) -> str:
  shown = items[:_MAX_LISTED]
  more = f"\n    ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
  return "".join(f"\n    {s}" for s in shown) + more


def check_tensor_set(
    expected: Mapping[str, tuple[int, ...]],
    found: Mapping[str, tuple[tuple[int, ...], np.dtype | str]],
    *,
    what: str,
    hint: str = "",
    ignore_extra: Iterable[str] = (),
) -> None:
  """Raises one CheckpointMismatchError naming every missing, extra and misshaped tensor.

  Args:
    expected: name -> shape the config needs.
    found: name -> (shape, dtype) the checkpoint holds.
    what: the checkpoint, for the message (e.g. its path and the config name).
    hint: appended to the message: how to fix the usual cause.
    ignore_extra: names that may be present without being needed (e.g. a tied lm_head copy).
  """
  ignore = set(ignore_extra)
  missing = sorted(n for n in expected if n not in found)
  extra = sorted(n for n in found if n not in expected and n not in ignore)
  misshaped = sorted(
      f"{n}: checkpoint {tuple(found[n][0])}, expected {tuple(expected[n])}"
      for n in expected if n in found and tuple(found[n][0]) != tuple(expected[n]))
  bad_dtype = []
  for n, (_, dt) in sorted(found.items()):
    if n in ignore and n not in expected:
      continue
    try:
      ok = np.dtype(dt) in FLOAT_DTYPES
    except TypeError:
      ok = False
    if not ok:
      bad_dtype.append(f"{n}: {dt} (weights must be floating point)")
  if not (missing or extra or misshaped or bad_dtype):
    return
  parts = [f"{what} does not match the expected parameters:"]
  if missing:
    parts.append(f"  {len(missing)} missing:{_listing(missing)}")
  if extra:
    parts.append(f"  {len(extra)} unexpected:{_listing(extra)}")
  if misshaped:
    parts.append(f"  {len(misshaped)} with the wrong shape:{_listing(misshaped)}")
  if bad_dtype:
    parts.append(f"  {len(bad_dtype)} with an unsupported dtype:{_listing(bad_dtype)}")
  if hint:
    parts.append(hint)
  raise CheckpointMismatchError("\n".join(parts))


def flatten_tree(tree: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x} (leaves are anything that is not a Mapping)."""
  out: dict[str, Any] = {}

  def rec(prefix: str, node: Any) -> None:
    if isinstance(node, Mapping):
      for k, v in node.items():
        rec(f"{prefix}{sep}{k}" if prefix else str(k), v)
    else:
      out[prefix] = node

  rec("", tree)
  return out


def unflatten_tree(flat: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
  """Inverse of `flatten_tree`."""
  out: dict[str, Any] = {}
  for key, value in flat.items():
    node = out
    *parents, leaf = key.split(sep)
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def expected_param_shapes(config) -> dict[str, tuple[int, ...]]:
  """'/'-joined name -> shape of every leaf of our parameter tree for `config`.

  The tree is the one documented in `matquant_jax.models.config`.
  """
  c = config
  d = c.embed_dim
  shapes = {
      "embedder/input_embedding": (c.embed_rows, d),
      "final_norm/scale": (d,),
  }
  if not c.tie_embeddings:
    shapes["lm_head/kernel"] = (d, c.vocab_size)
  for i in range(c.num_layers):
    p = f"layer_{i}"
    shapes[f"{p}/pre_attention_norm/scale"] = (d,)
    shapes[f"{p}/pre_ffw_norm/scale"] = (d,)
    if c.post_norms:
      shapes[f"{p}/post_attention_norm/scale"] = (d,)
      shapes[f"{p}/post_ffw_norm/scale"] = (d,)
    # Attention before FFN: the order every listing and export has always used.
    for kernel in kernels_lib.of_kinds(["attn"]) + kernels_lib.of_kinds(["ffn"]):
      shapes[f"{p}/{kernel.path}"] = kernel.shape(c)
    if c.ffn_shift:  # a folded LET shift (models/config.py)
      shapes[f"{p}/pre_ffw_norm/bias"] = (d,)
      shapes[f"{p}/mlp/gating_bias"] = (2, c.hidden_dim)
  return shapes


def check_bias_free(config, fmt: str) -> None:
  """Formats of released models have no biases: a model with folded LET shifts cannot be
  written to them (it would silently drop δ)."""
  if getattr(config, "ffn_shift", False):
    raise CheckpointError(
        f"{config.name}: this model carries folded LET shift biases (pre_ffw_norm/bias, "
        f"mlp/gating_bias; calibration.let='scale_shift'), which the {fmt} format cannot "
        f"represent. Serve it from the int8 MatQuant checkpoint, or calibrate with "
        f"--config.calibration.let=scale to get a bias-free model.")


def check_params(config, params: Mapping[str, Any], *, what: str = "params") -> None:
  """Raises CheckpointMismatchError unless `params` is exactly our tree for `config`."""
  flat = flatten_tree(params)
  found = {n: (tuple(np.shape(v)), getattr(v, "dtype", np.asarray(v).dtype))
           for n, v in flat.items()}
  check_tensor_set(
      expected_param_shapes(config), found, what=f"{what} (config {config.name!r})",
      hint="Pass the bare parameter tree ({'embedder': ..., 'layer_0': ...}), not "
           "{'params': ...}, built for this config.")


def orbax_whole_shards_on_cpu() -> None:
  """On a CPU backend, has Orbax write each array's shards whole.

  Orbax's default (replica-parallel saving) splits every replicated array among its replicas so
  that several hosts share the writing; on CPU all replicas are this one host, and each split
  is an eager slice that XLA compiles once per shape (about 130 compiles, 8 s, per tiny demo
  run). TPU and GPU backends keep Orbax's default. Call before the first save; it only
  changes how arrays are written, never what is written.
  """
  import jax
  import orbax.checkpoint as ocp
  if jax.default_backend() != "cpu":
    return
  handler = ocp.type_handlers.get_type_handler(jax.Array)
  if getattr(handler, "_matquant_whole_shards", False):
    return
  whole = ocp.type_handlers.ArrayHandler(use_replica_parallel=False)
  whole._matquant_whole_shards = True
  ocp.type_handlers.register_type_handler(jax.Array, whole, override=True)
