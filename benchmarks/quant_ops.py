"""Times MinMax quantize, slice and dequantize of a Gemma-2 9B FFN matrix; prints JSON.

    python benchmarks/quant_ops.py [--rows 14336 --cols 3584 --repeats 10]

Defaults: the FFN `linear` kernel of Gemma-2 9B, (F, D) = (14336, 3584), per output channel.
Each op is jitted and timed after a warm-up compile; medians of `repeats` runs in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from matquant_jax.quant import fake_quant as fq
from matquant_jax.quant.qtensor import QTensor
from matquant_jax.serving import layouts


def _time(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm up
  runs = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    runs.append((time.perf_counter() - t0) * 1e3)
  return statistics.median(runs)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--rows", type=int, default=14336)
  ap.add_argument("--cols", type=int, default=3584)
  ap.add_argument("--repeats", type=int, default=10)
  args = ap.parse_args()

  w = jax.random.normal(jax.random.PRNGKey(0), (args.rows, args.cols), jnp.float32)
  qt = jax.jit(lambda w: QTensor.quantize(w, 8, 0))(w)
  results = {
      "quantize_int8_ms": _time(jax.jit(lambda w: QTensor.quantize(w, 8, 0)), w,
                                repeats=args.repeats),
  }
  for r in (6, 4, 3, 2):
    results[f"slice_int{r}_ms"] = _time(jax.jit(lambda q, r=r: q.slice(r)), qt, repeats=args.repeats)
  results["slice_int2_ep_ms"] = _time(jax.jit(lambda q: q.slice(2, extra_precision=True)), qt,
                                      repeats=args.repeats)
  results["dequantize_int8_bf16_ms"] = _time(
      jax.jit(lambda q: q.dequantize(jnp.bfloat16)), qt, repeats=args.repeats)
  results["slice_dequantize_int2_bf16_ms"] = _time(
      jax.jit(lambda q: q.slice(2).dequantize(jnp.bfloat16)), qt, repeats=args.repeats)
  results["fake_quant_int2_fwd_bwd_ms"] = _time(
      jax.jit(jax.grad(lambda w: jnp.sum(fq.fake_quant(w, 2)))), w, repeats=args.repeats)
  # The serving loader packs on the host (numpy), one kernel at a time.
  idx = np.asarray(qt.slice(2).indices())
  results["pack_int2_host_ms"] = _time(lambda i: layouts.pack_planes_np(i, (2,)), idx,
                                       repeats=args.repeats)
  print(json.dumps({
      "benchmark": "quant_ops",
      "shape": [args.rows, args.cols],
      "reduce_axes": [0],
      "backend": jax.default_backend(),
      "device": str(jax.devices()[0].device_kind),
      "num_cpus_visible": len(jax.devices("cpu")),
      "machine": platform.machine(),
      "jax_version": jax.__version__,
      "repeats": args.repeats,
      "median_ms": {k: round(v, 3) for k, v in results.items()},
  }, indent=2))


if __name__ == "__main__":
  main()
