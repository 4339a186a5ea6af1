"""Smallest TPU v5e slice (and mesh / remat) on which each paper QAT run fits; prints JSON.

    python benchmarks/tpu_plan.py                               # every row (slow: hours on 2 CPUs)
    python benchmarks/tpu_plan.py --models=gemma2_9b --objectives=matquant
    python benchmarks/tpu_plan.py --models=mistral_7b --memory_only   # the search alone

Needs libtpu (pip install -e '.[tpu]'); no TPU: every figure is XLA's compile-time analysis
for the topology's devices (training/aot.py), i.e. XLA TPU cost-model estimates, not measured
times. Rows: model × objective {bf16, int2 baseline QAT, MatQuant R = {8, 4, 2}} at the paper's
settings (sequence 8192, global batch 16, bf16 activations, f32 master weights and Adam).

Search per row: slices from the smallest one that could hold the f32 params, grads and Adam
moments (16 bytes per parameter) upwards; on each slice, meshes with data·fsdp dividing the
batch of 16 (fsdp as large as possible, the rest on 'tensor'), remat "full" first. The first
compile whose peak leaves >= 5 % of HBM free is the row's plan; then "dots" (less recompute) is
tried on the same slice and mesh and kept if it fits too. The cost fields come from a second
compile with every scan unrolled (XLA counts a loop body once). One JSON line per row, then a
summary line with MatQuant ÷ bf16 step and MatQuant ÷ baseline peak memory per model.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

from matquant_jax.models import config as model_config_lib
from matquant_jax.models import transformer as transformer_lib
from matquant_jax.training import aot
from matquant_jax.training import trainer
from matquant_jax.training.config import paper_qat_config

SLICES = (("v5e:2x2", 4), ("v5e:2x4", 8), ("v5e:4x4", 16), ("v5e:4x8", 32), ("v5e:8x8", 64),
          ("v5e:8x16", 128), ("v5e:16x16", 256))
OBJECTIVES = {
    "bf16": dict(method="bf16"),
    "int2_baseline": dict(method="baseline", bits=(2,)),
    "matquant": dict(method="matquant"),
}
PRESET = {"gemma2_2b": "gemma2_2b", "gemma2_9b": "gemma2_9b", "gemma2_27b": "gemma2_27b",
          "mistral_7b": "mistral_7b_v0_1"}
HEADROOM = 0.05


def make_config(model: str, objective: str, topology: str, fsdp: int, tensor: int, remat: str):
  base = "mistral_7b" if model == "mistral_7b" else "gemma2_9b"
  c = paper_qat_config(base)
  c.model = PRESET[model]
  for k, v in OBJECTIVES[objective].items():
    c.objective[k] = v
  c.aot_only = True
  c.aot_topology = topology
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, fsdp, tensor
  c.remat = remat
  return c


def meshes(n: int, batch: int):
  """(fsdp, tensor) with fsdp | batch and fsdp·tensor = n, widest fsdp first."""
  out = []
  for fsdp in sorted({math.gcd(n, batch) // k for k in (1, 2, 4)}, reverse=True):
    if fsdp >= 1 and n % fsdp == 0 and n // fsdp <= 16:
      out.append((fsdp, n // fsdp))
  return out


def compile_one(c, log, with_cost=True) -> dict:
  t0 = time.time()
  try:
    rep = trainer.aot_topology_report(c, with_cost=with_cost)
  except Exception as e:  # a compile that fails for another reason: report it, go on
    rep = {"fits": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
  rep["compile_s"] = round(time.time() - t0, 1)
  log(json.dumps({"try": {"topology": c.aot_topology, "fsdp": c.mesh.fsdp,
                          "tensor": c.mesh.tensor, "remat": c.remat},
                  "fits": rep.get("fits"), "peak_gib": _gib(rep.get("peak_bytes_per_device")),
                  "compile_s": rep["compile_s"]}))
  return rep


def _gib(x):
  return None if x is None else round(x / 2**30, 3)


def _ok(rep) -> bool:
  return bool(rep.get("fits")) and rep["peak_bytes_per_device"] <= (
      (1 - HEADROOM) * rep["hbm_bytes_per_device"])


def plan_row(model: str, objective: str, log, with_cost: bool = True) -> dict:
  cfg = model_config_lib.get_config(PRESET[model])
  n_params = transformer_lib.param_count(cfg)
  state_bytes = 16.0 * n_params  # f32 params + grads + Adam mu, nu
  for topology, n in SLICES:
    if state_bytes / n > (1 - HEADROOM) * aot.HBM_BYTES[0][1]:
      continue
    for fsdp, tensor in meshes(n, 16):
      rep = compile_one(make_config(model, objective, topology, fsdp, tensor, "full"), log,
                        with_cost)
      if not _ok(rep):
        continue
      best = rep
      dots = compile_one(make_config(model, objective, topology, fsdp, tensor, "dots"), log,
                         with_cost)
      # Without cost figures, dots (less recompute) wins whenever it fits.
      if _ok(dots) and (not with_cost or (dots.get("cost_model_step_seconds") or 1e9) < (
          rep.get("cost_model_step_seconds") or 1e9)):
        best = dots
      return {"model": model, "objective": objective, "slice": topology, "chips": n,
              "mesh": best["mesh"], "remat": best["remat"],
              "gib_per_chip": _gib(best["peak_bytes_per_device"]),
              "headroom": round(1 - best["peak_bytes_per_device"] /
                                best["hbm_bytes_per_device"], 3),
              # Memory-only searches leave the cost fields out: a scanned program's counts
              # cover one loop iteration, not the step.
              "cost_model_step_seconds": best["cost_model_step_seconds"] if with_cost else None,
              "est_mfu": best["est_mfu"] if with_cost else None,
              "cost_from": best.get("cost_from") if with_cost else "none (--memory_only)",
              "params": n_params}
  return {"model": model, "objective": objective, "slice": None,
          "note": f"nothing up to {SLICES[-1][0]} fits with {HEADROOM:.0%} headroom"}


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default="gemma2_2b,gemma2_9b,gemma2_27b,mistral_7b")
  p.add_argument("--objectives", default="bf16,int2_baseline,matquant")
  p.add_argument("--log", default="", help="also append every try to this file")
  p.add_argument("--memory_only", action="store_true",
                 help="search on memory alone: skip the unrolled cost compiles (the rows' "
                      "cost fields are then null and dots is kept whenever it fits)")
  args = p.parse_args()

  def log(line):
    print(line, file=sys.stderr, flush=True)
    if args.log:
      with open(args.log, "a") as f:
        f.write(line + "\n")

  rows = []
  for model in args.models.split(","):
    for objective in args.objectives.split(","):
      row = plan_row(model, objective, log, with_cost=not args.memory_only)
      rows.append(row)
      print(json.dumps(row), flush=True)
  summary = {}
  for model in args.models.split(","):
    by = {r["objective"]: r for r in rows if r["model"] == model and r.get("slice")}
    mq, bf, b2 = by.get("matquant"), by.get("bf16"), by.get("int2_baseline")
    s = {}
    if mq and bf and mq["slice"] == bf["slice"] and mq["cost_model_step_seconds"] and \
        bf["cost_model_step_seconds"]:
      s["matquant_over_bf16_step"] = round(
          mq["cost_model_step_seconds"] / bf["cost_model_step_seconds"], 3)
    if mq and b2 and mq["slice"] == b2["slice"]:
      s["matquant_over_int2_baseline_peak"] = round(mq["gib_per_chip"] / b2["gib_per_chip"], 3)
    summary[model] = s
  print(json.dumps({"summary": summary}), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
