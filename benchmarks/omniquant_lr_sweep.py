"""OmniQuant-MatQuant vs the OmniQuant baselines across clipping learning rates, on the demo.

    python -m matquant_jax.demo --train_only          # once: runs/demo/pretrain
    python benchmarks/omniquant_lr_sweep.py --lrs=1e-3/1e-3,1e-2/5e-3,2e-2/1e-2
    python benchmarks/omniquant_lr_sweep.py --lrs=1e-3/1e-3 --steps=1221   # the paper's budget
    python benchmarks/omniquant_lr_sweep.py --lrs=2e-2/1e-2 --codistill='[8,4,2,8->2]'

For each "LWC/LET" learning-rate pair it calibrates the demo's pretrained model with the demo's
OmniQuant settings (quantized inputs, LET with the shift, 100 steps per block; the int2 baseline
twice that) as MatQuant R = {8, 4, 2} and as the int2 baseline (plus int8/int4 baselines with
--with_int8_int4), scores each slice's log pplx on the demo's held-out text, and prints one JSON
line per run with the median clipping factor γ, β after calibration: how far the clipping
travelled from its initial 0.982 (README, OmniQuant section). About 30 s per run on 2 cores.
"""

from __future__ import annotations

import argparse
import glob
import json
import pathlib
import tempfile
import time

import numpy as np


def clipping_factors(workdir: pathlib.Path, lwc_max: float) -> np.ndarray:
  """Every learned γ and β of every calibrated block, as the quantizer applies them."""
  from matquant_jax.quant import minmax
  logits = []
  for f in sorted(glob.glob(str(workdir / "calibration" / "layer_*.npz"))):
    with np.load(f) as z:
      logits += [z[k].ravel() for k in z.files if k.startswith("lwc/")]
  return np.asarray(minmax.lwc_factor(np.concatenate(logits), lwc_max))


def run_one(pretrained: str, method: str, bits: int | None, steps: int, lwc_lr: float,
            let_lr: float, lwc_max: float, eval_tokens: int, root: pathlib.Path, *,
            round_zero: bool = False, codistill: str | None = None,
            single_precision: bool = False) -> dict:
  """One calibration and its scores. codistill and single_precision apply to MatQuant only."""
  from matquant_jax import demo
  from matquant_jax.calibration import pipeline
  from matquant_jax.checkpoints.matquant_checkpoint import MatQuantCheckpoint
  from matquant_jax.data.tokenizer import Tokenizer
  from matquant_jax.evaluation import sweep
  from matquant_jax.quant.plan import PrecisionPlan
  c = demo._omniquant_config(init=f"run:{pretrained}", tokenizer=f"run:{pretrained}",
                             seq_len=128, steps=steps, method=method,
                             bits=None if bits is None else (bits,))
  c.calibration.lr = c.calibration.lwc_lr = lwc_lr
  c.calibration.let_lr = let_lr
  c.calibration.lwc_max = lwc_max
  c.calibration.round_zero = round_zero
  variant = {"round_zero": round_zero}
  if method == "matquant":
    if codistill:
      c.objective.codistill = variant["codistill"] = codistill
    if single_precision:  # R = {2} of the same int8 parameterization (spec §5.1)
      c.objective.method = "single_precision"
      variant["single_precision"] = True
  tag = "".join(f"_{k}={v}" for k, v in variant.items() if v)
  name = f"{method}{bits or ''}_lwc{lwc_lr:g}_let{let_lr:g}_max{lwc_max:g}{tag}"
  name = "".join(ch if ch.isalnum() or ch in "._=-" else "_" for ch in name)
  workdir = root / name
  t0 = time.time()
  pipeline.run(c, str(workdir))
  tok = Tokenizer.from_file(pathlib.Path(pretrained) / "tokenizer.model")
  options = sweep.EvalOptions(ppl_source="kjv", ppl_seq_len=128,
                              ppl_max_tokens=eval_tokens, tasks=(), batch_size=32)
  plans = ([PrecisionPlan.uniform(r) for r in (8, 4, 2)] if bits is None else
           [PrecisionPlan.uniform(bits, parent_bits=bits)])
  records = sweep.evaluate_checkpoint(MatQuantCheckpoint.load(workdir / "matquant_int8"), plans,
                                      tok, method=method, options=options)
  factors = clipping_factors(workdir, lwc_max)
  return {"method": method, "bits": bits, "lwc_lr": lwc_lr, "let_lr": let_lr,
          "lwc_max": lwc_max, **variant, "steps_per_block": c.calibration.steps_per_block,
          "log_pplx": {r["plan"]: round(r["log_pplx"], 4) for r in records},
          "clipping_median": round(float(np.median(factors)), 3),
          "seconds": round(time.time() - t0, 1)}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--pretrained", default="runs/demo/pretrain")
  p.add_argument("--lrs", default="1e-3/1e-3,5e-3/2.5e-3,1e-2/5e-3,2e-2/1e-2,4e-2/2e-2",
                 help="comma-separated LWC/LET learning-rate pairs")
  p.add_argument("--steps", type=int, default=100, help="steps per block (int2 baseline: 2x)")
  p.add_argument("--lwc_max", type=float, default=1.0)
  p.add_argument("--round_zero", action="store_true",
                 help="OmniQuant's rounded zero point (integer z) for every run")
  p.add_argument("--codistill", default=None,
                 help="MatQuant's co-distillation variant, e.g. '[8,4,2,8->2]' (spec §4)")
  p.add_argument("--single_precision", action="store_true",
                 help="MatQuant trains its int2 slice only, R = {2} (spec §5.1)")
  p.add_argument("--eval_tokens", type=int, default=16_000, help="as the demo's table")
  p.add_argument("--with_int8_int4", action="store_true", help="also the int8/int4 baselines")
  p.add_argument("--workdir", default=None, help="where calibrations go (default: a temp dir)")
  args = p.parse_args()
  if not (pathlib.Path(args.pretrained) / "final_params").is_dir():
    raise SystemExit(f"{args.pretrained} has no final_params: run `python -m matquant_jax.demo "
                     f"--train_only` first, or pass --pretrained=<a demo pretrain run>.")
  try:  # every pair checked before the first calibration starts
    pairs = [tuple(float(v) for v in pair.split("/", 1)) for pair in args.lrs.split(",")]
  except ValueError:
    pairs = []
  if not pairs or any(len(pr) != 2 or min(pr) <= 0 for pr in pairs):
    raise SystemExit(f"--lrs={args.lrs!r}: give comma-separated LWC/LET pairs of positive "
                     f"learning rates, e.g. --lrs=1e-3/1e-3,2e-2/1e-2.")
  if args.codistill or args.single_precision:  # the MatQuant objective, before any calibration
    from matquant_jax.calibration.config import make_calib_objective
    try:
      make_calib_objective("single_precision" if args.single_precision else "matquant",
                           codistill=args.codistill or "")
    except ValueError as e:
      raise SystemExit(f"--codistill={args.codistill!r} --single_precision="
                       f"{args.single_precision}: {e}") from None
  root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="omniquant_lr_sweep_"))
  runs = [("matquant", None), ("baseline", 2)] + (
      [("baseline", 8), ("baseline", 4)] if args.with_int8_int4 else [])
  for lwc_lr, let_lr in pairs:
    for method, bits in runs:
      print(json.dumps(run_one(args.pretrained, method, bits, args.steps, lwc_lr, let_lr,
                               args.lwc_max, args.eval_tokens, root,
                               round_zero=args.round_zero, codistill=args.codistill,
                               single_precision=args.single_precision)),
            flush=True)


if __name__ == "__main__":
  main()
