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
import json
import pathlib
import shutil
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from matquant_jax.checkpoints import _common
from matquant_jax.models.config import ATTN_KERNELS, FFN_KERNELS, QUANT_REDUCE_AXES
from matquant_jax.models.config import TransformerConfig
from matquant_jax.quant import validation
from matquant_jax.quant.plan import PrecisionPlan, Scope
from matquant_jax.quant.qtensor import QTensor

FORMAT = "matquant_jax.int8"
VERSION = 1


def _kind(path: str) -> str | None:
  """'ffn', 'attn' or None for a '/'-joined param path."""
  parts = path.split("/")
  if len(parts) >= 3 and parts[0].startswith("layer_"):
    if parts[-2] in FFN_KERNELS:
      return "ffn"
    if parts[-2] in ATTN_KERNELS:
      return "attn"
  return None


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
  """
  path = pathlib.Path(path)
  scope = Scope(scope) if not isinstance(scope, Scope) else scope
  parent_bits = validation.check_bits(parent_bits, "parent_bits")
  _common.check_params(config, params)
  # Multi-process runs: every process quantizes its shards and Orbax writes them together, but
  # only process 0 touches the directory itself (removal, metadata.json).
  primary = jax.process_index() == 0
  if path.exists():
    if not overwrite:
      raise FileExistsError(f"{path} exists; pass overwrite=True or choose another path.")
    if primary:
      shutil.rmtree(path)
  _sync_processes(f"matquant_jax export {path}: cleared")
  qpaths = set(quantized_paths(config, scope))
  clipping = dict(clipping or {})
  unknown = sorted(set(clipping) - qpaths)
  if unknown:
    raise ValueError(f"clipping names kernels that scope {scope.value!r} does not quantize for "
                     f"model {config.name!r}: {unknown[:5]}; keys are quantized param paths "
                     f"such as 'layer_0/mlp/linear/w'.")
  flat = _common.flatten_tree(params)
  quantized, floats = {}, {}
  for name, w in flat.items():
    if name in qpaths:
      axes = QUANT_REDUCE_AXES[name.split("/")[-2]]
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
      "quantized": {n: list(QUANT_REDUCE_AXES[n.split("/")[-2]]) for n in sorted(qpaths)},
      "metadata": dict(metadata or {}),
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


def read_metadata(path: str | pathlib.Path) -> dict[str, Any]:
  """The validated metadata.json of an int8 MatQuant checkpoint (format and version checked)."""
  path = pathlib.Path(path)
  meta_file = path / "metadata.json"
  if not meta_file.exists():
    raise FileNotFoundError(
        f"{path} is not a MatQuant checkpoint: {meta_file} is missing. Export one with "
        f"export_matquant_checkpoint (training does this at the end of a run).")
  meta = json.loads(meta_file.read_text())
  fmt = meta.get("format")
  if fmt != FORMAT:
    hint = (" (a serving checkpoint: load it with matquant_jax.serving.load_serving_checkpoint)"
            if str(fmt).startswith("matquant_jax.serving") else "")
    raise ValueError(f"{path}: format {fmt!r} is not {FORMAT!r}{hint}.")
  if meta.get("version", 0) > VERSION:
    raise ValueError(f"{path}: format version {meta['version']} is newer than this library "
                     f"({VERSION}); upgrade matquant_jax.")
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
  def load(cls, path: str | pathlib.Path, *, shardings: Mapping[str, Any] | None = None
           ) -> "MatQuantCheckpoint":
    """Reads a checkpoint; `shardings` maps '/'-paths of params to a Sharding (optional).

    A kernel's codes, α and z are placed with its param's sharding, so a checkpoint restores
    on any mesh or device count.
    """
    path = pathlib.Path(path)
    meta = read_metadata(path)
    config = TransformerConfig.from_dict(meta["model_config"])
    scope = Scope(meta["scope"])
    qpaths = quantized_paths(config, scope)
    if sorted(qpaths) != sorted(meta["quantized"]):
      raise ValueError(f"{path}: metadata lists quantized kernels that do not match scope "
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
      shape = shapes[name]
      axes = QUANT_REDUCE_AXES[name.split("/")[-2]]
      stat_shape = tuple(1 if i in axes else s for i, s in enumerate(shape))
      quantized[name] = {
          "codes": abstract(shape, jnp.uint8, name),
          "scale": abstract(stat_shape, jnp.float32, name, stat=True),
          "zero": abstract(stat_shape, jnp.float32, name, stat=True),
      }
    floats = {n: abstract(s, fdtype, n) for n, s in shapes.items() if n not in set(qpaths)}
    target = {"quantized": _common.unflatten_tree(quantized),
              "float": _common.unflatten_tree(floats)}
    import orbax.checkpoint as ocp
    try:
      restored = ocp.StandardCheckpointer().restore((path / "arrays").absolute(), target)
    except Exception as e:  # orbax reports tree mismatches deep in its stack
      raise ValueError(f"{path}: the stored arrays do not match the metadata's model "
                       f"{config.name!r} / scope {scope.value!r}: {e}") from e
    rq = _common.flatten_tree(restored["quantized"])
    qtensors = {}
    for name in qpaths:
      axes = tuple(QUANT_REDUCE_AXES[name.split("/")[-2]])
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

  def check_plan(self, plan: PrecisionPlan) -> None:
    """Raises ValueError if `plan` cannot be served from this checkpoint."""
    if not plan.is_quantized:
      return
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

  def qtensors_for(self, plan: PrecisionPlan) -> dict[str, QTensor]:
    """Each quantized kernel's QTensor at the plan's width for its layer."""
    self.check_plan(plan)
    return {n: qt.slice(self.slice_bits(plan, n), extra_precision=plan.extra_precision)
            for n, qt in self.qtensors.items()}

  def params_for(self, plan: PrecisionPlan, dtype: Any = jnp.bfloat16) -> dict[str, Any]:
    """The model's param tree with every quantized kernel dequantized at the plan's width."""
    self.check_plan(plan)
    flat = {n: v.astype(dtype) for n, v in self.floats.items()}
    for name in self.qtensors:
      flat[name] = self.kernel_at(name, self.slice_bits(plan, name),
                                  extra_precision=plan.extra_precision, dtype=dtype)
    return _common.unflatten_tree(flat)

  def kernel_at(self, name: str, bits: int, *, extra_precision: bool = False,
                dtype: Any = jnp.bfloat16) -> jax.Array:
    """Kernel `name` (a '/'-joined param path) dequantized at slice width `bits`."""
    return _dequantize(self.qtensors[name], bits, extra_precision, dtype)

  def effective_bits(self, plan: PrecisionPlan) -> float:
    """Average bits per quantized parameter under `plan`, extra-bucket bits included."""
    self.check_plan(plan)
    total_bits = total = 0.0
    for name, qt in self.qtensors.items():
      s = qt.slice(self.slice_bits(plan, name), extra_precision=plan.extra_precision)
      total_bits += s.effective_bits() * qt.size
      total += qt.size
    return total_bits / total if total else 16.0

  @property
  def stored_bytes(self) -> int:
    """Bytes of the arrays (codes, α, z and floats) as stored."""
    q = sum(qt.nbytes for qt in self.qtensors.values())
    f = sum(int(v.size) * v.dtype.itemsize for v in self.floats.values())
    return q + f


_DEQUANT_CACHE: dict = {}


def _dequantize(qt: QTensor, bits: int, ep: bool, dtype) -> jax.Array:
  key = (bits, ep, jnp.dtype(dtype).name)
  fn = _DEQUANT_CACHE.get(key)
  if fn is None:
    fn = jax.jit(lambda q: q.slice(bits, extra_precision=ep).dequantize(dtype))
    _DEQUANT_CACHE[key] = fn
  return fn(qt)


def _replicated(sharding):
  if sharding is None:
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
