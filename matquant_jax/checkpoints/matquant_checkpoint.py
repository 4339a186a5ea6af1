"""The int8 MatQuant checkpoint: ONE file set that serves every bit-width and plan.

Layout (format "matquant_jax.int8", version 1):

    <dir>/metadata.json   format, version, model config, quantized scope, parent bits c,
                          round_zero, the list of quantized kernels with their reduce axes,
                          float dtype, and free-form training metadata
    <dir>/arrays/         Orbax (StandardCheckpointer) tree:
        quantized/<param path>/{codes: uint8 [kernel shape], scale: f32, zero: f32}
        float/<param path>: every other parameter (embeddings, norms, unquantized kernels),
                            bfloat16 by default

So a quantized weight costs 1 byte on disk plus one (α, z) pair per output channel. Slicing
happens on load: `params_for(plan)` dequantizes each kernel at the plan's width for its layer,
α·(S(q, r) − z), from the c-bit codes (never from another slice). Kernels the checkpoint
quantized but the plan leaves unquantized are served at the parent width c, since there is no
float copy of them (e.g. "ffn:int4" on an ffn+attn checkpoint serves attention at int8).

The codes are exactly what training's fake-quant computes (same MinMax code path), so the
dequantized slice equals the training forward at that width.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import shutil
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from matquant_jax.checkpoints import _common
from matquant_jax.checkpoints._common import CheckpointError
from matquant_jax.models.config import TransformerConfig
from matquant_jax.quant import forward
from matquant_jax.quant import kernels as kernels_lib
from matquant_jax.quant import minmax
from matquant_jax.quant import validation
from matquant_jax.quant.plan import PrecisionPlan, Scope
from matquant_jax.quant.qtensor import QTensor

FORMAT = "matquant_jax.int8"
VERSION = 1


def _kind(path: str) -> str | None:
  """'ffn', 'attn' or None for a '/'-joined param path."""
  kernel = kernels_lib.lookup(path) if path.startswith("layer_") else None
  return kernel.kind if kernel is not None else None


def _reduce_axes(path: str) -> tuple[int, ...]:
  """The contracting axes of a quantized kernel's '/'-joined param path."""
  return kernels_lib.lookup(path).reduce_axes


def quantized_paths(config: TransformerConfig, scope: Scope) -> list[str]:
  """Param paths of the kernels a checkpoint of this scope stores as codes."""
  kinds = {Scope.FFN: ("ffn",), Scope.ATTN: ("attn",), Scope.FFN_ATTN: ("ffn", "attn"),
           Scope.NONE: ()}[scope]
  return [p for p in _common.expected_param_shapes(config) if _kind(p) in kinds]


def _layer_of(path: str) -> int:
  return int(path.split("/")[0][len("layer_"):])


def export_matquant_checkpoint(
    path: str | pathlib.Path,
    config: TransformerConfig,
    params: Mapping[str, Any],
    *,
    scope: Scope | str = Scope.FFN,
    parent_bits: int = 8,
    round_zero: bool = False,
    float_dtype: Any = jnp.bfloat16,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    clipping: Mapping[str, tuple[Any, Any]] | None = None,
) -> pathlib.Path:
  """Quantizes `params` to c-bit codes (kernels in `scope`) and writes the checkpoint.

  Kernels are quantized one at a time, so peak memory is the params plus one kernel's codes.

  `clipping` (optional) maps a quantized kernel's '/'-path (e.g. 'layer_0/mlp/linear/w') to
  the Learnable Weight Clipping factors (γ, β) in (0, 1), shaped like that kernel's α (reduced
  axes of size 1), as OmniQuant calibration learns them (matquant_jax.calibration): the codes,
  α and z are then those of Q_Omni (spec Eq. 3) instead of plain MinMax. Kernels not listed
  use plain MinMax. The stored format is unchanged: α and z already carry the clipping.

  Long: argument checks, then quantize, then write and describe: one linear export a reader
  follows top to bottom.
  """
  path = pathlib.Path(path)
  scope = Scope(scope) if not isinstance(scope, Scope) else scope
  parent_bits = validation.check_bits(parent_bits, "parent_bits")
  _common.check_params(config, params)
  # Multi-process runs: every process quantizes its shards and Orbax writes them together, but
  # only process 0 touches the directory itself (removal, metadata.json).
  primary = jax.process_index() == 0
  qpaths = set(quantized_paths(config, scope))
  flat = _common.flatten_tree(params)
  for name, w in flat.items():  # refuse NaN/inf by name before anything is written or removed
    minmax.check_finite(w, f"param {name!r}",
                        _reduce_axes(name) if name in qpaths else None)
  if path.exists():
    if not overwrite:
      raise FileExistsError(f"{path} exists; pass overwrite=True or choose another path.")
    if primary:
      shutil.rmtree(path)
  _sync_processes(f"matquant_jax export {path}: cleared")
  clipping = dict(clipping or {})
  unknown = sorted(set(clipping) - qpaths)
  if unknown:
    raise ValueError(f"clipping names kernels that scope {scope.value!r} does not quantize for "
                     f"model {config.name!r}: {unknown[:5]}; keys are quantized param paths "
                     f"such as 'layer_0/mlp/linear/w'.")
  quantized, floats = {}, {}
  for name, w in flat.items():
    if name in qpaths:
      axes = _reduce_axes(name)
      gamma, beta = clipping.get(name, (None, None))
      qt = _quantize(w, parent_bits, axes, round_zero, gamma, beta)
      quantized[name] = {"codes": qt.codes, "scale": qt.scale, "zero": qt.zero}
    else:
      floats[name] = jnp.asarray(w).astype(float_dtype)
  tree = {"quantized": _common.unflatten_tree(quantized), "float": _common.unflatten_tree(floats)}
  import orbax.checkpoint as ocp  # deferred: orbax is slow to import
  if primary:
    path.mkdir(parents=True)
  _sync_processes(f"matquant_jax export {path}: created")
  _common.orbax_whole_shards_on_cpu()
  ckptr = ocp.StandardCheckpointer()
  ckptr.save((path / "arrays").absolute(), tree)
  ckptr.wait_until_finished()
  meta = {
      "format": FORMAT,
      "version": VERSION,
      "model_config": config.to_dict(),
      "scope": scope.value,
      "parent_bits": parent_bits,
      "round_zero": bool(round_zero),
      "float_dtype": jnp.dtype(float_dtype).name,
      "quantized": {n: list(_reduce_axes(n)) for n in sorted(qpaths)},
      "metadata": dict(metadata or {}),
      # Per-array digests of the bytes written, verified on load (array_checksums).
      "checksums": _gathered_checksums(path, tree, primary),
  }
  if primary:
    (path / "metadata.json").write_text(json.dumps(meta, indent=2, default=str))
  _sync_processes(f"matquant_jax export {path}: done")
  return path


def _sync_processes(name: str) -> None:
  """A barrier across processes (no-op for one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


_QUANTIZE_CACHE: dict = {}


def _quantize(w, bits, axes, round_zero, gamma=None, beta=None) -> QTensor:
  clipped = gamma is not None or beta is not None
  key = (bits, tuple(axes), round_zero, clipped)
  fn = _QUANTIZE_CACHE.get(key)
  if fn is None:
    if clipped:
      fn = jax.jit(lambda w, g, b: QTensor.quantize(w, bits, axes, round_zero=round_zero,
                                                    gamma=g, beta=b))
    else:
      fn = jax.jit(lambda w: QTensor.quantize(w, bits, axes, round_zero=round_zero))
    _QUANTIZE_CACHE[key] = fn
  if clipped:
    one = np.ones((), np.float32)
    return fn(jnp.asarray(w), jnp.asarray(one if gamma is None else gamma, jnp.float32),
              jnp.asarray(one if beta is None else beta, jnp.float32))
  return fn(jnp.asarray(w))


CHECKSUM = "blake2b-128"
FLOAT_DTYPES = ("bfloat16", "float16", "float32")


def _digest(x) -> str:
  """blake2b-128 over an array's dtype, shape and bytes (C order), streamed from host memory."""
  arr = np.ascontiguousarray(np.asarray(jax.device_get(x)))
  return _host_digest(arr)


def _host_digest(arr: np.ndarray) -> str:
  h = hashlib.blake2b(digest_size=16)
  h.update(f"{arr.dtype.name}{list(arr.shape)}".encode())
  h.update(memoryview(arr.reshape(-1).view(np.uint8)))
  return h.hexdigest()


def array_checksums(tree: Mapping[str, Any]) -> dict[str, Any]:
  """{'quantized/<path>/codes': digest, ..., 'float/<path>': digest} of an arrays tree.

  An array this process does not hold whole (a pod's sharded array) gets the list of its
  shards' [region, digest] pairs instead (shard_digests): this process's part of the list,
  which merge_checksums joins with the other processes' parts.
  """
  return {k: _digest(v) if getattr(v, "is_fully_addressable", True) else shard_digests(v)
          for k, v in sorted(_common.flatten_tree(tree).items())}


def shard_digests(x: jax.Array) -> list[list]:
  """[[region, digest], ...] for the shards of `x` this process holds (one copy of each:
  replica 0); region is [[start, stop], ...] per dimension, digest as `_host_digest` of the
  region's contents, so a reader holding the whole array checks each region by slicing."""
  out = []
  for shard in x.addressable_shards:
    if shard.replica_id == 0:
      region = [[0 if i.start is None else int(i.start), n if i.stop is None else int(i.stop)]
                for i, n in zip(shard.index, x.shape)]
      out.append([region, _digest(shard.data)])
  return out


def _region_elements(regions) -> int:
  """Elements in a list of [[start, stop], ...] regions (their sum: they must not overlap)."""
  return sum(int(np.prod([b - a for a, b in region])) for region in regions)


def merge_checksums(parts: Sequence[Mapping[str, Any]],
                    shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
  """Joins the processes' array_checksums: each array's shard regions, sorted; an array whose
  one region is the whole array gets its plain digest (what one process would have written).
  Raises ValueError if the regions do not tile an array exactly once."""
  merged = {}
  for name, shape in sorted(shapes.items()):
    whole = [[0, n] for n in shape]
    entries = {}
    for part in parts:
      value = part[name]
      for region, digest in ([[whole, value]] if isinstance(value, str) else value):
        entries[json.dumps(region)] = digest  # a replicated array: every process sends it
    regions = sorted((json.loads(r), d) for r, d in entries.items())
    covered = _region_elements(r for r, _ in regions)
    if covered != int(np.prod(shape)):
      raise ValueError(f"checksums of {name!r}: the shards' regions cover {covered} of "
                       f"{int(np.prod(shape))} elements.")
    merged[name] = (regions[0][1] if len(regions) == 1 and regions[0][0] == whole
                    else [[r, d] for r, d in regions])
  return merged


def _gathered_checksums(path: pathlib.Path, tree, primary: bool) -> dict[str, Any] | None:
  """The export's checksums: this process's own, or on a pod every process's shard digests,
  passed through files next to the checkpoint (its directory is shared: Orbax writes there)
  and merged by process 0 (None on the others, which do not write metadata.json)."""
  own = array_checksums(tree)
  if jax.process_count() == 1:
    return own
  (path / f"checksums.{jax.process_index()}.json").write_text(json.dumps(own))
  _sync_processes(f"matquant_jax export {path}: checksums written")
  if not primary:
    return None
  files = sorted(path.glob("checksums.*.json"))
  parts = [json.loads(f.read_text()) for f in files]
  shapes = {k: tuple(v.shape) for k, v in _common.flatten_tree(tree).items()}
  for f in files:
    f.unlink()
  return merge_checksums(parts, shapes)


def _is_checksum(value) -> bool:
  """A digest, or a non-empty list of [region, digest] with region [[start, stop], ...]."""
  if isinstance(value, str):
    return True
  return isinstance(value, list) and bool(value) and all(
      isinstance(e, list) and len(e) == 2 and isinstance(e[1], str) and isinstance(e[0], list)
      and all(isinstance(d, list) and len(d) == 2 and all(
          isinstance(i, int) and not isinstance(i, bool) for i in d) for d in e[0])
      for e in value)


def _checksum_matches(x: np.ndarray, expected) -> bool:
  if isinstance(expected, str):
    return _host_digest(x) == expected
  if _region_elements(region for region, _ in expected) != x.size:
    return False  # the regions must cover the array (merge_checksums wrote them so)
  for region, digest in expected:
    if len(region) != x.ndim:
      return False
    part = x[tuple(slice(a, b) for a, b in region)]
    if _host_digest(np.ascontiguousarray(part)) != digest:
      return False
  return True


def _schema_error(path, field, value, rule) -> CheckpointError:
  return CheckpointError(f"{path}/metadata.json: {field}={value!r} {rule}; the metadata is "
                         f"corrupted or was not written by export_matquant_checkpoint.")


def _validate_metadata(path: pathlib.Path, meta: Any) -> None:
  """Types and ranges of every metadata field, checked before any array is read."""
  if not isinstance(meta, dict):
    raise CheckpointError(f"{path}/metadata.json holds a {type(meta).__name__}, not an object.")
  for field, kind in (("model_config", dict), ("scope", str), ("parent_bits", int),
                      ("round_zero", bool), ("float_dtype", str), ("quantized", dict)):
    if field not in meta:
      raise CheckpointError(f"{path}/metadata.json lacks {field!r}; re-export the checkpoint.")
    value = meta[field]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
      raise _schema_error(path, field, value, f"is not a {kind.__name__}")
  if not isinstance(meta.get("version"), int) or meta["version"] < 1:
    raise _schema_error(path, "version", meta.get("version"), "is not a positive int")
  if meta["scope"] not in {s.value for s in Scope if s is not Scope.NONE}:
    raise _schema_error(path, "scope", meta["scope"], "is not one of ffn, attn, ffn+attn")
  if not 1 <= meta["parent_bits"] <= validation.MAX_PARENT_BITS:
    raise _schema_error(path, "parent_bits", meta["parent_bits"],
                        f"is outside 1..{validation.MAX_PARENT_BITS} (codes are uint8)")
  if meta["float_dtype"] not in FLOAT_DTYPES:
    raise _schema_error(path, "float_dtype", meta["float_dtype"],
                        f"is not one of {', '.join(FLOAT_DTYPES)}")
  for name, axes in meta["quantized"].items():
    kernel = kernels_lib.lookup(str(name))
    if not isinstance(axes, list) or kernel is None or list(kernel.reduce_axes) != axes:
      raise _schema_error(path, f"quantized[{name!r}]", axes,
                          "does not match the kernel's contracting axes")
  checksums = meta.get("checksums")
  if checksums is not None and (not isinstance(checksums, dict) or not all(
      isinstance(k, str) and _is_checksum(v) for k, v in checksums.items())):
    raise _schema_error(path, "checksums", type(checksums).__name__,
                        "is not a mapping of array names to digests (or to [region, digest] "
                        "lists)")
  if not isinstance(meta.get("metadata", {}), dict):
    raise _schema_error(path, "metadata", type(meta["metadata"]).__name__, "is not an object")
  try:
    TransformerConfig.from_dict(meta["model_config"])
  except (TypeError, ValueError, KeyError) as e:
    raise CheckpointError(f"{path}/metadata.json: model_config is invalid: {e}") from None


def read_metadata(path: str | pathlib.Path) -> dict[str, Any]:
  """The validated metadata.json of an int8 MatQuant checkpoint (format, version and schema)."""
  path = pathlib.Path(path)
  meta_file = path / "metadata.json"
  if not meta_file.exists():
    raise FileNotFoundError(
        f"{path} is not a MatQuant checkpoint: {meta_file} is missing. Export one with "
        f"export_matquant_checkpoint (training does this at the end of a run).")
  try:
    meta = json.loads(meta_file.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{meta_file} is not valid JSON ({e}); the checkpoint is "
                          f"corrupted.") from None
  fmt = meta.get("format") if isinstance(meta, dict) else None
  if fmt != FORMAT:
    hint = (" (a serving checkpoint: load it with matquant_jax.serving.load_serving_checkpoint)"
            if str(fmt).startswith("matquant_jax.serving") else "")
    raise CheckpointError(f"{path}: format {fmt!r} is not {FORMAT!r}{hint}.")
  if isinstance(meta.get("version"), int) and meta["version"] > VERSION:
    raise CheckpointError(f"{path}: format version {meta['version']} is newer than this "
                          f"library ({VERSION}); upgrade matquant_jax.")
  _validate_metadata(path, meta)
  return meta


@dataclasses.dataclass
class MatQuantCheckpoint:
  """A loaded int8 MatQuant checkpoint; slice it with `params_for(plan)`."""
  config: TransformerConfig
  scope: Scope
  parent_bits: int
  round_zero: bool
  qtensors: dict[str, QTensor]     # flat '/'-path -> parent-width QTensor
  floats: dict[str, jax.Array]     # flat '/'-path -> float param
  metadata: dict[str, Any]
  path: pathlib.Path | None = None

  @classmethod
  def load(cls, path: str | pathlib.Path, *, shardings: Mapping[str, Any] | None = None,
           verify: bool = True) -> "MatQuantCheckpoint":
    """Reads a checkpoint; `shardings` maps '/'-paths of params to a Sharding (optional).

    A kernel's codes, α and z are placed with its param's sharding, so a checkpoint restores
    on any mesh or device count. Before reading, the metadata is checked against its schema
    and the stored arrays' names, shapes and dtypes against it; after reading (`verify`), the
    per-array checksums, the codes' range [0, 2^c − 1], finite positive α, finite z and
    finite floats. Any failure is a CheckpointError naming the array.
    """
    path = pathlib.Path(path)
    meta = read_metadata(path)
    config = TransformerConfig.from_dict(meta["model_config"])
    scope = Scope(meta["scope"])
    qpaths = quantized_paths(config, scope)
    if sorted(qpaths) != sorted(meta["quantized"]):
      raise CheckpointError(f"{path}: metadata lists quantized kernels that do not match scope "
                       f"{scope.value!r} for model {config.name!r}; the file is inconsistent.")
    shapes = _common.expected_param_shapes(config)
    fdtype = jnp.dtype(meta["float_dtype"])
    shardings = dict(shardings or {})

    def abstract(shape, dtype, name, stat=False):
      sh = shardings.get(name)
      if stat or sh is None:
        sh = _replicated(sh)
      return jax.ShapeDtypeStruct(shape, dtype, sharding=sh)

    quantized = {}
    for name in qpaths:
      stat_shape = kernels_lib.lookup(name).stat_shape(config)
      quantized[name] = {
          "codes": abstract(shapes[name], jnp.uint8, name),
          "scale": abstract(stat_shape, jnp.float32, name, stat=True),
          "zero": abstract(stat_shape, jnp.float32, name, stat=True),
      }
    floats = {n: abstract(s, fdtype, n) for n, s in shapes.items() if n not in set(qpaths)}
    target = {"quantized": _common.unflatten_tree(quantized),
              "float": _common.unflatten_tree(floats)}
    import orbax.checkpoint as ocp
    _check_stored_arrays(path, target)
    try:
      restored = ocp.StandardCheckpointer().restore((path / "arrays").absolute(), target)
    except Exception as e:  # orbax reports unreadable data deep in its stack
      raise CheckpointError(f"{path}: cannot read the arrays (model {config.name!r}, scope "
                            f"{scope.value!r}); the checkpoint is incomplete or corrupted: "
                            f"{e}") from e
    if verify:
      _verify_arrays(path, meta, restored)
    rq = _common.flatten_tree(restored["quantized"])
    qtensors = {}
    for name in qpaths:
      axes = _reduce_axes(name)
      qtensors[name] = QTensor(codes=rq[f"{name}/codes"], scale=rq[f"{name}/scale"],
                               zero=rq[f"{name}/zero"], reduce_axes=axes,
                               parent_bits=int(meta["parent_bits"]),
                               bits=int(meta["parent_bits"]))
    return cls(config=config, scope=scope, parent_bits=int(meta["parent_bits"]),
               round_zero=bool(meta["round_zero"]), qtensors=qtensors,
               floats=_common.flatten_tree(restored["float"]), metadata=meta["metadata"],
               path=path)

  @classmethod
  def from_metadata(cls, path: str | pathlib.Path, meta: Mapping[str, Any]
                    ) -> "MatQuantCheckpoint":
    """A checkpoint with no arrays loaded: plan checks and per-layer widths without the data
    (what a streaming loader needs before it reads kernels one by one)."""
    return cls(config=TransformerConfig.from_dict(meta["model_config"]), scope=Scope(meta["scope"]),
               parent_bits=int(meta["parent_bits"]), round_zero=bool(meta["round_zero"]),
               qtensors={}, floats={}, metadata=dict(meta.get("metadata", {})),
               path=pathlib.Path(path))

  @property
  def trained_extra_precision(self) -> bool:
    """Whether training (QAT or calibration) used the unclamped Extra Precision slices."""
    if "extra_precision" in self.metadata:
      return bool(self.metadata["extra_precision"])
    return str(self.metadata.get("objective", "")).endswith(" ep")  # older exports

  def check_plan(self, plan: PrecisionPlan, *, allow_clamped: bool = False) -> None:
    """Raises ValueError if `plan` cannot be served from this checkpoint.

    A checkpoint trained with Extra Precision learned its low widths as unclamped slices
    (Eq. 8); serving them clamped is a different model nobody trained, so it needs
    `allow_clamped=True` (the CLIs' --allow_clamped)."""
    if not plan.is_quantized:
      return
    if (self.trained_extra_precision and not plan.extra_precision and not allow_clamped and
        any(b < self.parent_bits for b in _flat_widths(plan, self.config.num_layers))):
      raise ValueError(
          f"plan {plan} serves clamped slices, but this checkpoint was trained with Extra "
          f"Precision (unclamped slices, Eq. 8): add ':ep' to the plan, or opt in to the "
          f"clamped slices it was not trained for (allow_clamped=True, --allow_clamped).")
    kinds = {"ffn", "attn"} if self.scope == Scope.FFN_ATTN else (
        {"ffn"} if self.scope == Scope.FFN else ({"attn"} if self.scope == Scope.ATTN else set()))
    wanted = {k for k in ("ffn", "attn") if plan.quantizes(k)}
    if not wanted <= kinds:
      raise ValueError(
          f"plan {plan} quantizes {sorted(wanted - kinds)}, but this checkpoint stores only "
          f"{self.scope.value!r} kernels as codes (the rest are float and were never trained "
          f"for slicing); use a plan with scope {self.scope.value!r}.")
    if plan.parent_bits != self.parent_bits:
      raise ValueError(
          f"plan {plan} slices from {plan.parent_bits}-bit codes, but this checkpoint holds "
          f"{self.parent_bits}-bit codes; add ':parent={self.parent_bits}' to the plan.")
    plan.layer_bits(self.config.num_layers)  # validates the depth of explicit plans

  def slice_bits(self, plan: PrecisionPlan, name: str) -> int:
    """The width kernel `name` is served at under `plan`."""
    bits = plan.bits_for(_layer_of(name), self.config.num_layers, _kind(name),
                         name.split("/")[-2])
    return self.parent_bits if bits is None else bits

  def params_for(self, plan: PrecisionPlan, dtype: Any = jnp.bfloat16, *,
                 allow_clamped: bool = False) -> dict[str, Any]:
    """The model's param tree with every quantized kernel dequantized at the plan's width
    (quant/forward.py's `quantized_tree` over the stored codes)."""
    self.check_plan(plan, allow_clamped=allow_clamped)
    tree = _common.unflatten_tree({**self.floats, **self.qtensors})
    return forward.quantized_tree(tree, plan=plan, num_layers=self.config.num_layers,
                                  dtype=dtype)

  def kernel_at(self, name: str, bits: int, *, extra_precision: bool = False,
                dtype: Any = jnp.bfloat16) -> jax.Array:
    """Kernel `name` (a '/'-joined param path) dequantized at slice width `bits`."""
    return forward.kernel_value(self.qtensors[name], kernels_lib.lookup(name), bits,
                                extra_precision=extra_precision, dtype=dtype)

  def effective_bits(self, plan: PrecisionPlan, *, allow_clamped: bool = False) -> float:
    """Average bits per quantized parameter under `plan`, extra-bucket bits included."""
    self.check_plan(plan, allow_clamped=allow_clamped)
    total_bits = total = 0.0
    for name, qt in self.qtensors.items():
      s = qt.slice(self.slice_bits(plan, name), extra_precision=plan.extra_precision)
      total_bits += s.effective_bits() * qt.size
      total += qt.size
    return total_bits / total if total else 16.0

def _flat_widths(plan: PrecisionPlan, num_layers: int) -> list[int]:
  out = []
  for entry in plan.layer_bits(num_layers):
    out += list(entry) if isinstance(entry, tuple) else [entry]
  return out


def _check_stored_arrays(path: pathlib.Path, target) -> None:
  """Names, shapes and dtypes on disk against what the metadata implies (no data read)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  try:
    stored = ocp.StandardCheckpointer().metadata((path / "arrays").absolute())
    stored = getattr(stored, "item_metadata", stored)
    stored = {"/".join(str(getattr(k, "key", k)) for k in p): m
              for p, m in jax.tree_util.tree_flatten_with_path(stored)[0]}
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f"{path}/arrays is missing or unreadable ({type(e).__name__}: "
                          f"{e}); the checkpoint is incomplete.") from None
  want = {"/".join(str(getattr(k, "key", k)) for k in p): a
          for p, a in jax.tree_util.tree_flatten_with_path(target)[0]}
  missing, extra = sorted(set(want) - set(stored)), sorted(set(stored) - set(want))
  if missing or extra:
    raise CheckpointError(f"{path}: stored arrays differ from the metadata: missing "
                          f"{missing[:5]}, unexpected {extra[:5]}.")
  for name, a in want.items():
    m = stored[name]
    shape, dtype = tuple(getattr(m, "shape", ())), getattr(m, "dtype", None)
    if shape != tuple(a.shape) or dtype is None or jnp.dtype(dtype) != jnp.dtype(a.dtype):
      raise CheckpointError(
          f"{path}: array {name!r} is stored as {jnp.dtype(dtype).name if dtype else '?'}"
          f"{list(shape)}, but the metadata implies {jnp.dtype(a.dtype).name}"
          f"{list(a.shape)} (codes are uint8, α and z float32, floats the metadata's "
          f"float_dtype); the metadata or the arrays were altered.")


def _verify_arrays(path: pathlib.Path, meta: Mapping[str, Any], restored) -> None:
  """Checksums (when the export wrote them) and value ranges of the restored arrays."""
  import warnings  # pylint: disable=g-import-not-at-top
  flat = _common.flatten_tree(restored)
  sums = meta.get("checksums")
  if sums is None:
    warnings.warn(f"{path} has no array checksums (written by an older matquant_jax): its "
                  f"arrays cannot be verified against corruption; re-export it to add them.",
                  stacklevel=3)
  elif set(sums) != set(flat):
    raise CheckpointError(f"{path}: metadata checksums list {sorted(set(sums) ^ set(flat))[:5]} "
                          f"that do not match the stored arrays.")
  c_max = 2 ** int(meta["parent_bits"]) - 1
  for name, x in sorted(flat.items()):
    # An array this process holds whole is checked on the host copy its checksum reads (numpy:
    # no XLA program per array shape); a pod's sharded array, on the devices.
    if getattr(x, "is_fully_addressable", True):
      x = np.ascontiguousarray(np.asarray(jax.device_get(x)))
      if sums is not None and not _checksum_matches(x, sums[name]):
        raise CheckpointError(f"{path}: array {name!r} does not match its checksum: the file "
                              f"is corrupted (a changed or truncated byte). Re-export or "
                              f"re-copy the checkpoint.")
      xp = np  # numpy's isfinite and comparisons take bfloat16 as is: no float32 copy
    else:
      xp = jnp
    leaf = name.rsplit("/", 1)[-1]
    if name.startswith("quantized/") and leaf == "codes":
      top = int(xp.max(x))
      if top > c_max:
        raise CheckpointError(f"{path}: array {name!r} holds code {top}, above the "
                              f"{meta['parent_bits']}-bit range [0, {c_max}] the metadata "
                              f"declares (parent_bits={meta['parent_bits']}).")
    elif name.startswith("quantized/") and leaf == "scale":
      if not bool(xp.all(xp.isfinite(x) & (x > 0))):
        raise CheckpointError(f"{path}: array {name!r} has non-finite or non-positive scales "
                              f"α; the checkpoint is corrupted.")
    elif not bool(xp.all(xp.isfinite(x))):
      raise CheckpointError(f"{path}: array {name!r} has non-finite values; the checkpoint "
                            f"is corrupted.")


def _replicated(sharding):
  if sharding is None:
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
