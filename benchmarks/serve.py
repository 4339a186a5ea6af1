"""Serving benchmark: packed FFN matmuls and batch-1 decode per precision; prints JSON.

    python benchmarks/serve.py                                   # GPU/TPU: Gemma-2 9B FFN + 2B decode
    python benchmarks/serve.py --model=tiny_gemma2 --ffn_dims=256,1024 --decode_steps=16   # CPU

Matmul: one FFN of a Gemma-2 9B layer (d = 3584, hidden = 14336): gate/up x[B, d]·Q[d, 2·hidden]
and down x[B, hidden]·Q[hidden, d], at batch 1 and 8, for bf16 weights and packed int8, int4,
int2 codes (plus int4 through the Pallas kernel where the default int4 path is XLA's). Each is
one jitted call, timed after a compiling warm-up (median of --repeats).

Decode: tokens/s at batch 1 of the KV-cache sampler on a model of --model's architecture with
random weights (Gemma-2 2B by default), for the bf16 model and the plans ffn:int8, ffn:int4,
ffn:int2 and a Mix'n'Match plan. The weights are built kernel by kernel (random codes packed
like a checkpoint's), so the reported resident bytes are what each plan really keeps on device.

HBM fraction = bytes of weights read / time / peak bandwidth, with the peak from a small table
(H100 3.35e12 B/s, H200 4.8e12, TPU v5e 8.2e11; null elsewhere, e.g. CPU). Decode counts every
weight once per token (KV-cache and activation traffic ignored, prefill included in the time).
Numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from matquant_jax.checkpoints import _common
from matquant_jax.models import get_config
from matquant_jax.quant.kernels import BY_NAME as KERNEL
from matquant_jax.quant.plan import PrecisionPlan
from matquant_jax.serving import loader
from matquant_jax.serving import matmul as mm
from matquant_jax.serving import weights as weights_lib

# Peak HBM bandwidth (bytes/s) by a substring of jax's device_kind.
PEAK_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "TPU v5 lite": 8.2e11, "TPU v5e": 8.2e11}


def peak_bandwidth(device) -> float | None:
  kind = str(device.device_kind)
  for key, bw in PEAK_BANDWIDTH.items():
    if key.lower() in kind.lower():
      return bw
  return None


def _time_us(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm up
  runs = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    runs.append((time.perf_counter() - t0) * 1e6)
  return statistics.median(runs)


def _random_packed(rng, k: int, n: int, bits: int, fmt: str = "auto") -> weights_lib.PackedWeight:
  codes = rng.integers(0, 256, (k, n), dtype=np.uint8)
  scale = rng.uniform(1e-3, 2e-3, (1, n)).astype(np.float32)
  zero = rng.uniform(120, 136, (1, n)).astype(np.float32)
  return weights_lib.pack_kernel(codes, scale, zero, contract_axes=(0,), bits=bits, fmt=fmt)


def bench_matmul(d: int, hidden: int, batches, repeats: int, dtype) -> dict:
  """FFN matmul times per precision and batch."""
  rng = np.random.default_rng(0)
  device = jax.devices()[0]
  peak = peak_bandwidth(device)
  shapes = {"gate_up": (d, 2 * hidden), "down": (hidden, d)}
  variants = [("bf16", None, None), ("int8", 8, "auto"), ("int4", 4, "auto"),
              ("int2", 2, "auto")]
  if weights_lib.choose_format(4, device.platform) != "planes":
    variants.insert(3, ("int4_planes", 4, "planes"))
  dot_bf16 = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(
      x.dtype))
  packed = jax.jit(lambda x, w: mm.packed_matmul(x, w))
  out: dict = {}
  for name, bits, fmt in variants:
    ws = {}
    for part, (k, n) in shapes.items():
      if bits is None:
        ws[part] = jax.random.normal(jax.random.key(1), (k, n), dtype) * 0.02
      else:
        ws[part] = _random_packed(rng, k, n, bits, fmt)
    entry: dict = {}
    for b in batches:
      row: dict = {}
      total_us = total_bytes = 0.0
      for part, (k, n) in shapes.items():
        x = jax.random.normal(jax.random.key(2), (b, k), dtype)
        w = ws[part]
        if bits is None:
          us = _time_us(dot_bf16, x, w, repeats=repeats)
          nbytes, path = weights_lib.resident_nbytes(w), "xla_bf16"
        else:
          us = _time_us(packed, x, w, repeats=repeats)
          nbytes, path = w.nbytes, mm.resolve_path(w, b, dtype)
        row[f"{part}_us"] = round(us, 2)
        row[f"{part}_path"] = path
        total_us += us
        total_bytes += nbytes
      row["ffn_us"] = round(total_us, 2)
      row["weight_bytes"] = int(total_bytes)
      row["hbm_fraction"] = (round(total_bytes / (total_us * 1e-6) / peak, 4) if peak else None)
      entry[f"batch_{b}"] = row
    out[name] = entry
    del ws
    gc.collect()
  for name, entry in out.items():
    for b in batches:
      key = f"batch_{b}"
      entry[key]["speedup_vs_bf16"] = round(out["bf16"][key]["ffn_us"] / entry[key]["ffn_us"], 3)
  return out


def random_serving_params(config, plan: PrecisionPlan, dtype, seed: int = 0) -> dict:
  """Random params for `config`, built one array at a time; kernels packed as `plan` says."""
  rng = np.random.default_rng(seed)
  key = jax.random.key(seed)
  device = jax.devices()[0]
  flat = {}
  for i, (name, shape) in enumerate(_common.expected_param_shapes(config).items()):
    parts = name.split("/")
    kind = None
    if parts[0].startswith("layer_") and parts[-2] in KERNEL:
      kind = "ffn" if parts[-2] in ("gating_einsum", "linear") else "attn"
    bits = plan.bits_for(int(parts[0][6:]), config.num_layers, kind) if kind else None
    if bits is None:
      flat[name] = (jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32) *
                    0.02).astype(dtype)
      continue
    axes = KERNEL[parts[-2]].reduce_axes
    stat_shape = tuple(1 if a in axes else s for a, s in enumerate(shape))
    flat[name] = weights_lib.pack_kernel(
        rng.integers(0, 256, shape, dtype=np.uint8),
        rng.uniform(1e-3, 2e-3, stat_shape).astype(np.float32),
        rng.uniform(120, 136, stat_shape).astype(np.float32),
        contract_axes=axes, bits=bits, extra_precision=plan.extra_precision, device=device)
  return _common.unflatten_tree(flat)


def bench_decode(model_name: str, plans, steps: int, prompt_len: int, repeats: int,
                 dtype) -> dict:
  config = get_config(model_name)
  device = jax.devices()[0]
  peak = peak_bandwidth(device)
  out: dict = {}
  baseline = None
  for plan_str in plans:
    plan = PrecisionPlan.parse(plan_str)
    gc.collect()
    before = loader.memory_report(device=device)["bytes_in_use"]
    params = random_serving_params(config, plan, dtype)
    model = loader.ServingModel(config=config, plan=plan, params=params, dtype=dtype)
    mem = loader.memory_report(params, device=device)
    sample = model.sampler()
    prompts = jnp.asarray(
        np.random.default_rng(1).integers(3, config.vocab_size, (1, prompt_len)), jnp.int32)
    run = lambda: sample(params, prompts, max_new_tokens=steps, eos_ids=()).tokens
    t0 = time.perf_counter()
    jax.block_until_ready(run())
    compile_s = time.perf_counter() - t0
    runs = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(run())
      runs.append(time.perf_counter() - t0)
    seconds = statistics.median(runs)
    wb = model.weight_bytes()
    packed = model.packed()
    ffn_paths = sorted({mm.resolve_path(w, 1, dtype) for n, w in packed.items()
                        if "/mlp/" in n})
    entry = {
        "tokens_per_s": round(steps / seconds, 2),
        "compile_and_first_run_s": round(compile_s, 2),
        "weight_bytes": wb,
        "device_bytes_added": mem["bytes_in_use"] - before,
        "memory_source": mem["source"],
        "ffn_matmul_paths_batch1": ffn_paths,
        "hbm_fraction": (round(wb["total"] * steps / seconds / peak, 4) if peak else None),
    }
    if baseline is None:
      baseline = entry["tokens_per_s"]
    entry["speedup_vs_first_plan"] = round(entry["tokens_per_s"] / baseline, 3)
    out[plan_str] = entry
    del params, model, sample
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="gemma2_2b", help="architecture for the decode benchmark")
  ap.add_argument("--ffn_dims", default="3584,14336", help="d,hidden of the FFN matmuls")
  ap.add_argument("--batches", default="1,8")
  ap.add_argument("--plans", default="bf16,ffn:int8,ffn:int4,ffn:int2,ffn:pyramid@3.0")
  ap.add_argument("--decode_steps", type=int, default=128)
  ap.add_argument("--prompt_len", type=int, default=16)
  ap.add_argument("--repeats", type=int, default=20, help="timed matmul runs (decode: 3)")
  ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  ap.add_argument("--skip_matmul", action="store_true")
  ap.add_argument("--skip_decode", action="store_true")
  args = ap.parse_args()
  dtype = jnp.dtype(args.dtype)
  d, hidden = (int(v) for v in args.ffn_dims.split(","))
  device = jax.devices()[0]
  result = {
      "benchmark": "serve",
      "backend": jax.default_backend(),
      "device": str(device.device_kind),
      "peak_bandwidth_bytes_per_s": peak_bandwidth(device),
      "machine": platform.machine(),
      "jax_version": jax.__version__,
      "dtype": dtype.name,
  }
  if not args.skip_matmul:
    result["ffn_matmul"] = {
        "dims": {"d": d, "hidden": hidden},
        "results": bench_matmul(d, hidden, [int(b) for b in args.batches.split(",")],
                                args.repeats, dtype),
    }
  if not args.skip_decode:
    result["decode"] = {
        "model": args.model, "batch": 1, "steps": args.decode_steps,
        "prompt_len": args.prompt_len,
        "results": bench_decode(args.model, args.plans.split(","), args.decode_steps,
                                args.prompt_len, max(1, min(args.repeats, 3)), dtype),
    }
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  main()
