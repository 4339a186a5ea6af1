"""Compile a step for a TPU topology from any host, and report whether it fits.

    devices = topology_devices("v5e:8x8")           # 64 abstract "TPU v5 lite" devices
    report = compile_report(lambda: jitted.lower(...).compile(), devices, model_flops)

Needs libtpu (`pip install -e '.[tpu]'`, pinned to the project's jax); no TPU is used: XLA
compiles for the topology's devices and reports per-device memory and its TPU cost model.
`TPU_SKIP_MDS_QUERY=1` silences libtpu's metadata-server lookups on a machine that is not a TPU
VM. The figures are XLA estimates, not measured times.

Report fields (one JSON object, the last line the CLIs print):
  topology, mesh, device_kind, num_devices
  peak_bytes_per_device    arguments + outputs − aliased (donated) + temporaries + program
  hbm_bytes_per_device     what XLA may allocate on one chip (HBM_BYTES; from XLA's own
                           out-of-memory message when it has one)
  fits                     peak <= hbm; a compile that runs out of memory reports false with
                           XLA's figure (its temporaries: a lower bound of the peak) and
                           xla_error instead of raising
  flops_per_device, bytes_accessed_per_device, cost_model_step_seconds (XLA's optimal_seconds;
                           when XLA returns a non-positive one, as it does for large programs,
                           the roofline max(flops / peak, bytes / HBM bandwidth) of XLA's own
                           counts: seconds_from says which)
  model_flops_per_device   the model's FLOPs per step (every bit-width pass counted) / devices
  est_mfu                  model_flops_per_device / (cost_model_step_seconds × chip peak)
  cost_from                how the cost fields were obtained. XLA's cost analysis counts a while
                           loop's body once, so the scanned program under-reports by the trip
                           counts. "unrolled": a second compile of the same step with every
                           scan unrolled; "unrolled, depth-extrapolated": unrolled compiles of
                           the model cut to 1 and 2 layer groups, extrapolated linearly to the
                           full depth (what the trainer does: a full-depth unrolled program
                           need not fit, and compiles slowly); "scanned": loop bodies counted
                           once (under-estimates)
  kernel_calls             Pallas kernel calls (e.g. splash attention) in the costed program;
                           XLA counts them as free, so each adds its roofline cost to the flops
                           and bytes above (collectives are in neither figure)
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

import jax

from matquant_jax.training import metrics as metrics_lib

GiB = 2 ** 30
# Bytes XLA may allocate per chip, by device_kind substring (first match wins). v5e: 16 GiB of
# HBM of which XLA reports 15.75 GiB usable in its out-of-memory messages; the others are the
# chips' nominal HBM less the same 0.25 GiB.
HBM_BYTES = (
    ("TPU v5 lite", 15.75 * GiB), ("TPU v5e", 15.75 * GiB), ("TPU v5p", 94.75 * GiB),
    ("TPU v5", 94.75 * GiB), ("TPU v6", 31.75 * GiB), ("TPU v4", 31.75 * GiB),
)

_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
# XLA's out-of-memory messages: "... required for HLO temporaries (30.9G) exceeds available HBM
# (15.75G)" (a lower bound on the peak: arguments come on top) or "Used 30.9G of 15.75G hbm".
_OOM = (
    re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT]?)i?B?\) exceeds available HBM "
               r"\(([\d.]+)([KMGT]?)i?B?\)", re.I),
    re.compile(r"Used\s+([\d.]+)([KMGT]?)i?B?\s+of\s+([\d.]+)([KMGT]?)i?B?\s+hbm", re.I),
)


class TopologyError(ValueError):
  """The topology cannot be targeted here (no libtpu, or a name jax does not know)."""


def topology_devices(name: str) -> list[jax.Device]:
  """The devices of a TPU topology such as "v5e:8x8", for compiling without a TPU."""
  import os
  # Off a TPU VM, libtpu would query the GCE metadata server (slow, noisy); it is not needed.
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  # Compiling touches no TPU: let several processes (tests, a benchmark) load libtpu at once
  # instead of failing on its single-user lockfile.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    from jax.experimental import topologies
    topo = topologies.get_topology_desc(platform="tpu", topology_name=name)
  except Exception as e:  # jax raises RuntimeError/ValueError with libtpu's message
    raise TopologyError(
        f"cannot compile for TPU topology {name!r}: {type(e).__name__}: {e}. It needs libtpu "
        f"(pip install -e '.[tpu]') and a topology name jax accepts, e.g. v5e:2x2, v5e:8x8, "
        f"v4:2x2x1.") from None
  return list(topo.devices)


# HBM bandwidth, bytes/s per chip (for the roofline fallback of cost_model_step_seconds).
HBM_BANDWIDTH = (("TPU v5 lite", 819e9), ("TPU v5e", 819e9), ("TPU v5p", 2765e9),
                 ("TPU v5", 2765e9), ("TPU v6", 1640e9), ("TPU v4", 1228e9))


def hbm_bandwidth(device: jax.Device) -> float | None:
  kind = device.device_kind.lower()
  for key, bw in HBM_BANDWIDTH:
    if key.lower() in kind:
      return bw
  return None


def hbm_bytes(device: jax.Device) -> float | None:
  kind = device.device_kind.lower()
  for key, size in HBM_BYTES:
    if key.lower() in kind:
      return size
  return None


def _oom_figures(message: str) -> tuple[float, float] | None:
  m = _OOM[0].search(message) or _OOM[1].search(message)
  if not m:
    return None
  used = float(m.group(1)) * _UNITS[m.group(2).upper()]
  limit = float(m.group(3)) * _UNITS[m.group(4).upper()]
  return used, limit


def cost_dict(compiled, kernel_costs: Mapping[str, Mapping[str, float]] | None = None
              ) -> dict[str, float]:
  """XLA's cost analysis of a compiled program: flops, bytes accessed, optimal_seconds.

  XLA counts a Pallas kernel's custom call as free. `kernel_costs` maps a kernel's HLO
  instruction-name prefix (e.g. splash_attention.FWD_KERNEL) to its cost per call; every call
  in the compiled program adds it, `kernel_calls:<prefix>` records the count, and XLA's
  optimal_seconds (blind to the kernels) is dropped for the roofline.
  """
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  cost = cost or {}
  out = {k: float(cost[k]) for k in ("flops", "bytes accessed", "optimal_seconds")
         if k in cost}
  if kernel_costs:
    names = re.findall(r"^\s*%?([\w.\-]+) = [^\n]*custom-call\(", compiled.as_text(),
                       flags=re.MULTILINE)
    for prefix, per_call in kernel_costs.items():
      calls = sum(name.startswith(prefix) for name in names)
      out[f"kernel_calls:{prefix}"] = float(calls)
      for k in ("flops", "bytes accessed"):
        out[k] = out.get(k, 0.0) + calls * float(per_call.get(k, 0.0))
    out.pop("optimal_seconds", None)
  return out


def extrapolate_depth(cost_1: dict[str, float], cost_2: dict[str, float],
                      groups: int) -> dict[str, float]:
  """Costs at `groups` layer groups from those at 1 and 2 (linear in depth)."""
  out = {k: cost_1[k] + (groups - 1) * (cost_2[k] - cost_1[k]) for k in cost_1 if k in cost_2}
  if min(cost_1.get("optimal_seconds", -1), cost_2.get("optimal_seconds", -1)) <= 0:
    out.pop("optimal_seconds", None)  # XLA's figure is invalid: use the roofline
  return out


def compile_report(compile_fn: Callable[[], Any], devices: Sequence[jax.Device],
                   model_flops_per_device: float, *, cost_fn=None, cost_label="unrolled",
                   **fields) -> dict[str, Any]:
  """Compiles (compile_fn() -> jax.stages.Compiled) and reports memory, cost and MFU.

  cost_fn: optional () -> cost_dict(...) of the same computation with its loops unrolled,
  used for the cost fields instead of the scanned program's (cost_from = cost_label).
  `fields` (topology, mesh, ...) are copied into the report first.

  Long: compile, then memory, cost model and MFU fields of the one JSON report, in the order
  they are printed.
  """
  device = devices[0]
  hbm = hbm_bytes(device)
  peak_flops = metrics_lib.peak_flops_per_device(device)
  out: dict[str, Any] = dict(fields)
  out.update(device_kind=device.device_kind, num_devices=len(devices))
  try:
    compiled = compile_fn()
  except Exception as e:  # XlaRuntimeError: RESOURCE_EXHAUSTED ... Used X of Y hbm
    figures = _oom_figures(str(e))
    if figures is None:
      raise
    used, limit = figures
    out.update(peak_bytes_per_device=used, hbm_bytes_per_device=limit, fits=False,
               flops_per_device=None, bytes_accessed_per_device=None,
               cost_model_step_seconds=None, model_flops_per_device=model_flops_per_device,
               est_mfu=None, xla_error=str(e).splitlines()[0][:300])
    return out
  m = compiled.memory_analysis()
  peak = float(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes +
               m.temp_size_in_bytes + m.generated_code_size_in_bytes)
  cost_from = "scanned"
  cost = cost_dict(compiled)
  if cost_fn is not None:
    try:
      cost = cost_fn()
      cost_from = cost_label
    except Exception as e:  # the unrolled program may not fit where the scanned one does
      if _oom_figures(str(e)) is None:
        raise
      # The scanned program's counts would under-report by the loops' trip counts: none.
      cost, cost_from = {}, "none"
      out["cost_note"] = ("the unrolled program for the cost analysis ran out of memory "
                          "(e.g. Gemma-2 2B MatQuant on v5e-16): no cost figures")
  out["cost_from"] = cost_from
  calls = {k.split(":", 1)[1]: v for k, v in cost.items() if k.startswith("kernel_calls:")}
  if calls:
    out["kernel_calls"] = calls  # Pallas calls whose roofline cost was added to XLA's counts
  seconds = cost.get("optimal_seconds")
  out["seconds_from"] = "xla_optimal_seconds"
  if seconds is None or seconds <= 0:
    # XLA's optimal_seconds comes back negative for large programs (seen with libtpu 0.0.42);
    # fall back to the roofline of XLA's own flops and bytes accessed.
    flops, nbytes = cost.get("flops"), cost.get("bytes accessed")
    bandwidth = hbm_bandwidth(device)
    seconds = None
    if flops and nbytes and peak_flops and bandwidth:
      seconds = max(flops / peak_flops, nbytes / bandwidth)
      out["seconds_from"] = "roofline: max(flops / peak, bytes accessed / HBM bandwidth)"
      out["roofline_compute_seconds"] = flops / peak_flops
      out["roofline_memory_seconds"] = nbytes / bandwidth
  out.update(
      peak_bytes_per_device=peak, hbm_bytes_per_device=hbm,
      fits=None if hbm is None else bool(peak <= hbm),
      flops_per_device=float(cost.get("flops", 0.0)) or None,
      bytes_accessed_per_device=float(cost.get("bytes accessed", 0.0)) or None,
      cost_model_step_seconds=seconds, model_flops_per_device=model_flops_per_device,
      est_mfu=(model_flops_per_device / (seconds * peak_flops)
               if seconds and peak_flops else None),
      argument_bytes_per_device=float(m.argument_size_in_bytes),
      temp_bytes_per_device=float(m.temp_size_in_bytes))
  return out


def memory_report(compiled) -> dict[str, float]:
  """Bytes per device of the compiled step (XLA's memory analysis)."""
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = {k: float(getattr(m, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                            "temp_size_in_bytes", "alias_size_in_bytes",
                                            "generated_code_size_in_bytes") if hasattr(m, k)}
  out["peak_estimate_bytes"] = (out.get("argument_size_in_bytes", 0) +
                                out.get("output_size_in_bytes", 0) -
                                out.get("alias_size_in_bytes", 0) +
                                out.get("temp_size_in_bytes", 0))
  return out
