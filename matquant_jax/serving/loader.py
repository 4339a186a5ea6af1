"""Serving weights from one int8 MatQuant checkpoint, streamed kernel by kernel.

    model = load_serving("ckpt/", "ffn:int2")             # any plan: int1..8, ep, mix'n'match
    out = model.generate(prompts, max_new_tokens=32)
    model.weight_bytes()                                   # what the params occupy on device

`load_serving` never holds the model in int8 or bf16: for each quantized kernel it reads that
kernel's uint8 codes, α and z from the Orbax checkpoint (a partial restore into host memory),
slices them to the plan's width for the kernel's layer, packs them (layouts.py), puts the packed
bytes on the device and drops the host copy before reading the next kernel. Float parameters
(embeddings, norms) are read one at a time the same way. Peak host memory is one kernel's codes
plus its packed copy; device memory only ever grows by what stays resident.

An exported serving checkpoint (`export_serving_checkpoint` / `load_serving_checkpoint`) stores
the packed bytes themselves (Orbax tree `packed/<kernel>/{data_i, scale, zero}` and
`float/<param>`, plus `serving.json` with the plan and each kernel's layout), so a server loads
exactly what it keeps. int4-format weights are written as a 4-bit plane (Orbax cannot store
int4) and turned back into jnp.int4 on a backend that keeps int4 packed.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from matquant_jax.checkpoints import _common
from matquant_jax.checkpoints import matquant_checkpoint as mqc
from matquant_jax.models import sampler as sampler_lib
from matquant_jax.models import transformer
from matquant_jax.models.config import TransformerConfig
from matquant_jax.quant import forward
from matquant_jax.quant import kernels as kernels_lib
from matquant_jax.quant.plan import PrecisionPlan
from matquant_jax.quant.qtensor import QTensor
from matquant_jax.serving import layouts
from matquant_jax.serving import weights as weights_lib
from matquant_jax.serving.weights import PackedWeight

SERVING_FORMAT = "matquant_jax.serving"
SERVING_VERSION = 1


def _as_plan(plan: PrecisionPlan | str) -> PrecisionPlan:
  return plan if isinstance(plan, PrecisionPlan) else PrecisionPlan.parse(plan)


def _get(tree: Mapping, path: str) -> Any:
  for part in path.split("/"):
    tree = tree[part]
  return tree


class _ArrayReader:
  """Reads single arrays of an Orbax tree into host numpy (partial restores)."""

  def __init__(self, directory: pathlib.Path):
    import orbax.checkpoint as ocp  # deferred: orbax is slow to import
    self._ocp = ocp
    self._dir = directory.absolute()
    self._ckptr = ocp.PyTreeCheckpointer()

  def read(self, paths: Sequence[str]) -> dict[str, np.ndarray]:
    """'/'-paths inside the tree -> host arrays."""
    item: dict = {}
    for p in paths:
      node = item
      *parents, leaf = p.split("/")
      for part in parents:
        node = node.setdefault(part, {})
      node[leaf] = 0
    args = jax.tree_util.tree_map(lambda _: self._ocp.RestoreArgs(restore_type=np.ndarray), item)
    try:
      restored = self._ckptr.restore(self._dir, args=self._ocp.args.PyTreeRestore(
          item=item, restore_args=args, partial_restore=True))
    except Exception as e:  # orbax reports a missing key deep in its stack
      raise ValueError(f"{self._dir}: cannot read {list(paths)} from the checkpoint: {e}") from e
    return {p: np.asarray(_get(restored, p)) for p in paths}


def _to_float(x: np.ndarray, dtype) -> np.ndarray:
  return np.asarray(x).astype(np.dtype(jnp.dtype(dtype)))


@dataclasses.dataclass
class ServingModel:
  """A model ready to serve: its config, plan and params with packed quantized kernels.

  Attributes:
    config: the architecture.
    plan: the precision plan the params were packed for.
    params: the parameter tree (config.py), PackedWeight leaves for quantized kernels.
    dtype: compute dtype (activations and float params).
    source: the checkpoint directory it came from, if any.
  """
  config: TransformerConfig
  plan: PrecisionPlan
  params: dict[str, Any]
  dtype: Any = jnp.bfloat16
  source: pathlib.Path | None = None

  def packed(self) -> dict[str, PackedWeight]:
    """Flat '/'-path -> PackedWeight."""
    return {k: v for k, v in _common.flatten_tree(self.params).items()
            if isinstance(v, PackedWeight)}

  def model(self) -> transformer.Transformer:
    """The Flax model to `apply` with {'params': self.params}."""
    return transformer.Transformer(self.config, plan=self.plan, dtype=self.dtype)

  def sampler(self, cache_dtype: Any = None) -> sampler_lib.Sampler:
    return sampler_lib.Sampler(self.config, self.plan, dtype=self.dtype, cache_dtype=cache_dtype)

  def generate(self, prompts, prompt_lengths=None, **kwargs) -> sampler_lib.SampleOutput:
    """`Sampler.__call__` on these params (same arguments)."""
    return self.sampler()(self.params, prompts, prompt_lengths, **kwargs)

  def with_path(self, path: str = "auto", interpret: bool = False) -> ServingModel:
    """Packed kernels switched to matmul `path` where their format allows (weights.set_path)."""
    return dataclasses.replace(self, params=weights_lib.set_path(self.params, path, interpret))

  def weight_bytes(self) -> dict[str, int]:
    """Device bytes of the params: total, quantized kernels (codes + α' + z'), the rest."""
    flat = _common.flatten_tree(self.params)
    quant = sum(v.nbytes for v in flat.values() if isinstance(v, PackedWeight))
    codes = sum(v.code_nbytes for v in flat.values() if isinstance(v, PackedWeight))
    other = sum(weights_lib.resident_nbytes(v) for v in flat.values()
                if not isinstance(v, PackedWeight))
    return {"total": quant + other, "quantized_kernels": quant, "quantized_codes": codes,
            "float": other}


def memory_report(params: Any = None, device: jax.Device | None = None) -> dict[str, Any]:
  """Device memory in use, measured how the backend allows.

  GPU/TPU report allocator statistics (`memory_stats()['bytes_in_use']`); the CPU client has
  none, so there it is the sum of the live arrays' buffer sizes ('source' says which).
  `params_bytes` is the resident size of `params` alone.
  """
  device = device or jax.devices()[0]
  stats = None
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    stats = None
  if stats and "bytes_in_use" in stats:
    in_use, source = int(stats["bytes_in_use"]), "memory_stats"
  else:
    in_use = sum(weights_lib.resident_nbytes(a) for a in jax.live_arrays()
                 if device in a.devices())
    source = "live_arrays"
  out = {"backend": device.platform, "device": str(device.device_kind), "source": source,
         "bytes_in_use": in_use}
  if stats and "peak_bytes_in_use" in stats:
    out["peak_bytes_in_use"] = int(stats["peak_bytes_in_use"])
  if params is not None:
    out["params_bytes"] = weights_lib.resident_nbytes(params)
  return out


def _read_metadata(path: pathlib.Path) -> tuple[dict, mqc.MatQuantCheckpoint]:
  meta = mqc.read_metadata(path)
  # An empty checkpoint object gives the plan checks and per-layer widths of the real one.
  return meta, mqc.MatQuantCheckpoint.from_metadata(path, meta)


def load_serving(path: str | pathlib.Path, plan: PrecisionPlan | str, *,
                 dtype: Any = jnp.bfloat16, device: jax.Device | None = None,
                 fmt: str = "auto", allow_clamped: bool = False) -> ServingModel:
  """Streams an int8 MatQuant checkpoint into serving weights for `plan`.

  Args:
    path: the checkpoint directory (export_matquant_checkpoint). A serving checkpoint
      (export_serving_checkpoint) is accepted too when `plan` is the plan it was packed for.
    plan: a PrecisionPlan or its string ("ffn:int4", "ffn+attn:int2:ep", "ffn:pyramid@3.0",
      "bf16", ...). Kernels the checkpoint quantized but the plan leaves unquantized are
      served at the parent width c, as in `MatQuantCheckpoint.params_for`. The bf16 plan
      dequantizes every kernel to `dtype` (the float baseline; nothing packed).
    dtype: compute dtype and the dtype of the float params.
    allow_clamped: serve clamped slices of an Extra-Precision-trained checkpoint
      (MatQuantCheckpoint.check_plan refuses them otherwise).
    device: where the params go (default: the first device).
    fmt: storage format of the packed kernels: "auto" (layouts.py rules), "planes", "u8"
      (unpacked, one byte per code) or "int4" (kernels of <= 4 stored bits; wider ones "auto").

  Returns:
    A ServingModel.
  """
  path = pathlib.Path(path)
  plan = _as_plan(plan)
  device = device or jax.devices()[0]
  if (path / "serving.json").exists():
    # An exported serving checkpoint holds one plan's packed bytes: load it as is.
    model = load_serving_checkpoint(path, device=device, dtype=dtype)
    if model.plan != plan:
      raise ValueError(
          f"{path} is a serving checkpoint packed for plan {model.plan}, not {plan}; packed "
          f"codes cannot be re-sliced. Load the int8 MatQuant checkpoint for other plans.")
    return model
  meta, shell = _read_metadata(path)
  shell.check_plan(plan, allow_clamped=allow_clamped)
  config = shell.config
  reader = _ArrayReader(path / "arrays")
  qpaths = sorted(meta["quantized"])
  shapes = _common.expected_param_shapes(config)
  flat: dict[str, Any] = {}
  for name in shapes:
    if name in meta["quantized"]:
      continue
    host = reader.read([f"float/{name}"])[f"float/{name}"]
    flat[name] = jax.device_put(_to_float(host, dtype), device)
    del host
  for name in qpaths:
    keys = [f"quantized/{name}/{f}" for f in ("codes", "scale", "zero")]
    host = reader.read(keys)
    codes, scale, zero = (host[k] for k in keys)
    if codes.shape != tuple(shapes[name]):
      raise ValueError(f"{path}: {name} has shape {codes.shape}, the config needs "
                       f"{tuple(shapes[name])}; the checkpoint is inconsistent.")
    if plan.is_quantized:
      bits = shell.slice_bits(plan, name)
      sw = layouts.storage_bits(bits, shell.parent_bits, plan.extra_precision)
      flat[name] = weights_lib.pack_kernel(
          codes, scale, zero, contract_axes=kernels_lib.lookup(name).reduce_axes,
          bits=bits, parent_bits=shell.parent_bits, extra_precision=plan.extra_precision,
          fmt="auto" if fmt == "int4" and sw > 4 else fmt, device=device)
    else:  # the float baseline: the parent codes dequantized, as params_for does
      kernel = kernels_lib.lookup(name)
      stored = QTensor(*jax.device_put((codes, scale, zero), device), kernel.reduce_axes,
                       parent_bits=shell.parent_bits, bits=shell.parent_bits)
      flat[name] = forward.kernel_value(stored, kernel, shell.parent_bits, dtype=dtype)
    del host, codes, scale, zero
  return ServingModel(config=config, plan=plan, params=_common.unflatten_tree(flat),
                      dtype=dtype, source=path)


def export_serving_checkpoint(model: ServingModel, path: str | pathlib.Path, *,
                              overwrite: bool = False) -> pathlib.Path:
  """Writes the packed serving weights of `model` (Orbax + serving.json; see module doc)."""
  path = pathlib.Path(path)
  if path.exists():
    if not overwrite:
      raise FileExistsError(f"{path} exists; pass overwrite=True or choose another path.")
    shutil.rmtree(path)
  flat = _common.flatten_tree(model.params)
  packed, floats, kernels = {}, {}, {}
  for name, v in flat.items():
    if isinstance(v, PackedWeight):
      if v.fmt == "int4":
        idx = np.asarray(v.data[0]).astype(np.int8).astype(np.int16) + 8
        data, disk_fmt, widths = layouts.pack_planes_np(idx.astype(np.uint8), (4,)), "planes", (4,)
      else:
        data, disk_fmt, widths = v.data, v.fmt, v.widths
      packed[name] = {**{f"data_{i}": a for i, a in enumerate(data)}, "scale": v.scale,
                      "zero": v.zero}
      kernels[name] = {"fmt": disk_fmt, "widths": list(widths), "bits": v.bits,
                       "parent_bits": v.parent_bits, "extra_precision": v.extra_precision,
                       "kernel_shape": list(v.kernel_shape),
                       "contract_axes": list(v.contract_axes)}
    else:
      floats[name] = v
  tree = {"packed": _common.unflatten_tree(packed), "float": _common.unflatten_tree(floats)}
  import orbax.checkpoint as ocp
  path.mkdir(parents=True)
  _common.orbax_whole_shards_on_cpu()
  ckptr = ocp.StandardCheckpointer()
  ckptr.save((path / "arrays").absolute(), tree)
  ckptr.wait_until_finished()
  meta = {"format": SERVING_FORMAT, "version": SERVING_VERSION,
          "model_config": model.config.to_dict(), "plan": str(model.plan),
          "float_dtype": jnp.dtype(model.dtype).name, "kernels": kernels,
          "source": str(model.source) if model.source else None}
  (path / "serving.json").write_text(json.dumps(meta, indent=2))
  return path


def load_serving_checkpoint(path: str | pathlib.Path, *, device: jax.Device | None = None,
                            dtype: Any = None) -> ServingModel:
  """Reads a checkpoint written by `export_serving_checkpoint`, kernel by kernel."""
  path = pathlib.Path(path)
  meta_file = path / "serving.json"
  if not meta_file.exists():
    raise FileNotFoundError(f"{path} is not a serving checkpoint: {meta_file} is missing "
                            f"(an int8 MatQuant checkpoint loads with load_serving).")
  meta = json.loads(meta_file.read_text())
  if meta.get("format") != SERVING_FORMAT or meta.get("version", 0) > SERVING_VERSION:
    raise ValueError(f"{path}: unsupported serving checkpoint {meta.get('format')!r} "
                     f"v{meta.get('version')}.")
  device = device or jax.devices()[0]
  config = TransformerConfig.from_dict(meta["model_config"])
  dtype = dtype or jnp.dtype(meta["float_dtype"])
  reader = _ArrayReader(path / "arrays")
  flat: dict[str, Any] = {}
  for name in _common.expected_param_shapes(config):
    if name not in meta["kernels"]:
      host = reader.read([f"float/{name}"])[f"float/{name}"]
      flat[name] = jax.device_put(_to_float(host, dtype), device)
      continue
    k = meta["kernels"][name]
    widths = tuple(k["widths"])
    keys = [f"packed/{name}/data_{i}" for i in range(len(widths))]
    host = reader.read(keys + [f"packed/{name}/scale", f"packed/{name}/zero"])
    data = tuple(host[key] for key in keys)
    fmt = k["fmt"]
    sw = layouts.storage_bits(k["bits"], k["parent_bits"], k["extra_precision"])
    if fmt == "planes" and widths == (4,) and weights_lib.choose_format(
        sw, device.platform) == "int4":
      kdim = int(np.prod([k["kernel_shape"][a] for a in k["contract_axes"]]))
      idx = layouts.unpack_planes_np(data, widths, kdim)
      data, fmt = ((idx.astype(np.int8) - 8).astype(ml_dtypes.int4),), "int4"
    flat[name] = PackedWeight(
        data=tuple(jax.device_put(a, device) for a in data),
        scale=jax.device_put(host[f"packed/{name}/scale"], device),
        zero=jax.device_put(host[f"packed/{name}/zero"], device),
        kernel_shape=tuple(k["kernel_shape"]), contract_axes=tuple(k["contract_axes"]),
        fmt=fmt, widths=widths, bits=int(k["bits"]), parent_bits=int(k["parent_bits"]),
        extra_precision=bool(k["extra_precision"]))
  return ServingModel(config=config, plan=PrecisionPlan.parse(meta["plan"]),
                      params=_common.unflatten_tree(flat), dtype=dtype, source=path)
