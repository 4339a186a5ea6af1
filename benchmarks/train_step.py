"""Train-step cost of bf16, single-precision QAT and MatQuant; prints JSON.

    python benchmarks/train_step.py                          # tiny model, CPU-friendly
    python benchmarks/train_step.py --model=gemma2_2b --seq_len=2048 --batch=8 \
        --compute_dtype=bfloat16                             # the issue's H100 setting

For each mode it compiles the real sharded train step (trainer.compile_step, random weights,
random tokens), reports XLA's per-device memory analysis, then times `--steps` steps after
`--warmup` and reports step time, tokens/s and MFU (all passes counted: one for bf16 and
single precision, |R| for MatQuant). Ratios: MatQuant step time over bf16 (target <= 3.3 on an
H100) and MatQuant peak memory over single-precision QAT (target <= 1.25).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from matquant_jax.training import aot
from matquant_jax.training import metrics as metrics_lib
from matquant_jax.training import sharding as sharding_lib
from matquant_jax.training import trainer
from matquant_jax.training.config import default_config

MODES = {
    "bf16": dict(method="bf16"),
    "single_precision_qat": dict(method="single_precision"),
    "matquant": dict(method="matquant"),
}


def run_mode(args, mode: str) -> dict:
  c = default_config()
  c.model = args.model
  c.init = "random"
  c.data.seq_len = args.seq_len
  c.data.global_batch_size = args.batch
  c.num_steps = 1000
  c.compute_dtype = args.compute_dtype
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = args.mesh_data, args.mesh_fsdp, args.mesh_tensor
  for k, v in MODES[mode].items():
    c.objective[k] = v
  setup = trainer.resolve(c)
  tx, schedule = trainer.make_optimizer(c, setup)
  t0 = time.perf_counter()
  jitted, compiled, shardings, _ = trainer.compile_step(setup, tx, schedule)
  compile_s = time.perf_counter() - t0
  mem = aot.memory_report(compiled)
  params = trainer.initial_params(c, setup, shardings.params, jax.random.key(0))
  opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
  state = trainer.TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), shardings.step),
                             params=params, opt_state=opt_state)
  rng = np.random.default_rng(0)
  shape = (args.batch, args.seq_len)
  host = {"inputs": rng.integers(0, setup.model.vocab_size, shape).astype(np.int32),
          "targets": rng.integers(0, setup.model.vocab_size, shape).astype(np.int32),
          "segment_ids": np.ones(shape, np.int32),
          "positions": np.tile(np.arange(args.seq_len, dtype=np.int32), (args.batch, 1)),
          "loss_mask": np.ones(shape, np.float32)}
  batch = trainer._to_global(host, sharding_lib.batch_sharding(setup.mesh))
  for _ in range(args.warmup):
    state, m = jitted(state, batch)
  jax.block_until_ready(m)
  times = []
  for _ in range(args.steps):
    t = time.perf_counter()
    state, m = jitted(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  step_s = statistics.median(times)
  passes = max(len(setup.objective.bits), 1)
  flops = metrics_lib.train_flops_per_token(setup.model, args.seq_len) * args.batch * args.seq_len
  peak = args.peak_flops or metrics_lib.peak_flops_per_device()
  return {
      "objective": setup.objective.describe(),
      "passes": passes,
      "compile_s": round(compile_s, 2),
      "step_time_s": step_s,
      "tokens_per_s": args.batch * args.seq_len / step_s,
      "mfu": (flops * passes / step_s / (peak * jax.device_count())) if peak else None,
      "peak_memory_bytes": mem.get("peak_estimate_bytes"),
      "temp_memory_bytes": mem.get("temp_size_in_bytes"),
      "loss": float(m["loss"]),
  }


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="tiny_gemma2")
  ap.add_argument("--seq_len", type=int, default=256)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--compute_dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--mesh_data", type=int, default=-1)
  ap.add_argument("--mesh_fsdp", type=int, default=1)
  ap.add_argument("--mesh_tensor", type=int, default=1)
  ap.add_argument("--peak_flops", type=float, default=None,
                  help="peak FLOP/s per device for MFU when the device is not in the table")
  ap.add_argument("--modes", default=",".join(MODES))
  args = ap.parse_args()
  results = {mode: run_mode(args, mode) for mode in args.modes.split(",")}
  out = {"benchmark": "train_step", "model": args.model, "seq_len": args.seq_len,
         "batch": args.batch, "compute_dtype": args.compute_dtype,
         "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
         "devices": jax.device_count(), "jax_version": jax.__version__, "modes": results}
  if "matquant" in results and "bf16" in results:
    out["matquant_over_bf16_step_time"] = (results["matquant"]["step_time_s"] /
                                           results["bf16"]["step_time_s"])
  if "matquant" in results and "single_precision_qat" in results:
    out["matquant_over_single_precision_memory"] = (
        results["matquant"]["peak_memory_bytes"] /
        results["single_precision_qat"]["peak_memory_bytes"])
    out["matquant_over_single_precision_step_time"] = (
        results["matquant"]["step_time_s"] / results["single_precision_qat"]["step_time_s"])
  print(json.dumps(out, indent=2))


if __name__ == "__main__":
  main()
