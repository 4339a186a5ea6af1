"""Command line: search a Mix'n'Match plan for a memory budget, from one int8 checkpoint.

    python -m matquant_jax.mixnmatch --checkpoint=runs/qat_matquant/matquant_int8 --budget=3.0
    python -m matquant_jax.mixnmatch --checkpoint=<dir> --budget=2.5,3,3.5,4,5,6 \
        --granularity=kernel --widths=2,3,4,6,8 --out=results/mixnmatch \
        --eval_source=kjv --eval_split=validation

Prints, per budget, the plan string (`PrecisionPlan.parse` accepts it: pass it to `evaluate
--mix`, `sample --plan` or `load_serving`) and one JSON line: plan, effective bits, kernel
bytes, calibration KL to the int8 model, the fixed strategies' KL at the same budget, and the
number of model evaluations. The number of evaluations is printed before the first one.

With --out it writes <out>/search.json and, for several budgets, <out>/pareto.png: the searched
plans and the four fixed strategies against effective bits, with the Pareto front. With
--eval_source the plans (and the fixed strategies) are also scored by held-out log perplexity;
the command refuses an evaluation text that overlaps the calibration text.
See `matquant_jax/evaluation/search.py` for the method. --dry_run prints the evaluation count
from the checkpoint's metadata alone.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys


def _floats(text: str) -> list[float]:
  try:
    out = [float(t) for t in text.split(",") if t.strip()]
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of numbers, e.g. 3.0,4.5")
  if not out:
    raise argparse.ArgumentTypeError("give at least one budget, e.g. --budget=3.0")
  return out


def _ints(text: str) -> tuple[int, ...]:
  try:
    return tuple(int(t) for t in text.split(",") if t.strip())
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of widths, e.g. 2,3,4,6,8")


def parser() -> argparse.ArgumentParser:
  from matquant_jax.evaluation import search
  d = search.SearchOptions()
  ap = argparse.ArgumentParser(prog="python -m matquant_jax.mixnmatch",
                               description=__doc__.splitlines()[0])
  ap.add_argument("--checkpoint", required=True, help="an int8 MatQuant checkpoint directory")
  ap.add_argument("--budget", type=_floats, required=True,
                  help="budget(s), comma separated: effective bits per quantized parameter, or "
                       "bytes of the quantized kernels with --unit=bytes")
  ap.add_argument("--unit", choices=search.UNITS, default=d.unit)
  ap.add_argument("--granularity", choices=search.GRANULARITIES, default=d.granularity)
  ap.add_argument("--widths", type=_ints, default=d.widths)
  ap.add_argument("--ep", action="store_true", help="search over Extra Precision slices")
  ap.add_argument("--tokenizer", default="auto", help="tokenizer file; 'auto' finds the one "
                  "next to the checkpoint")
  ap.add_argument("--calib_source", default=d.source, help="calibration text: kjv, "
                  "tfds:c4/en, text:<path>")
  ap.add_argument("--calib_split", default=d.split)
  ap.add_argument("--calib_tokens", type=int, default=d.tokens)
  ap.add_argument("--seq_len", type=int, default=d.seq_len)
  ap.add_argument("--batch_size", type=int, default=d.batch_size)
  ap.add_argument("--max_evals", type=int, default=d.max_evals,
                  help="model evaluations per budget, everything included")
  ap.add_argument("--seed", type=int, default=d.seed)
  ap.add_argument("--tfds_data_dir", default=None)
  ap.add_argument("--eval_source", default="", help="also score plans by held-out log pplx")
  ap.add_argument("--eval_split", default="validation")
  ap.add_argument("--eval_tokens", type=int, default=30_000)
  ap.add_argument("--out", default="", help="write search.json (and pareto.png) here")
  ap.add_argument("--dry_run", action="store_true",
                  help="print the number of model evaluations and exit")
  return ap


def _fail(ap, message: str) -> None:
  ap.exit(2, f"{ap.prog}: error: {message}\n")


def main(argv=None) -> int:
  ap = parser()
  args = ap.parse_args(argv)
  from matquant_jax.checkpoints import matquant_checkpoint as mqc
  from matquant_jax.evaluation import search

  for name in ("calib_tokens", "seq_len", "batch_size", "max_evals", "eval_tokens"):
    if getattr(args, name) < 1:
      _fail(ap, f"--{name}={getattr(args, name)} must be >= 1.")
  if args.seq_len < 2:
    _fail(ap, f"--seq_len={args.seq_len} must be >= 2.")
  try:
    meta = mqc.read_metadata(args.checkpoint)
    shell = mqc.MatQuantCheckpoint.from_metadata(args.checkpoint, meta)
    widths = search.check_widths(args.widths, shell.parent_bits)
    if args.eval_source:
      search.check_disjoint((args.calib_source, args.calib_split),
                            (args.eval_source, args.eval_split))
  except (ValueError, FileNotFoundError) as e:
    _fail(ap, str(e))
  count = search.evaluation_count(shell.config.num_layers, widths, shell.parent_bits,
                                  args.max_evals, args.granularity)
  if args.dry_run:
    print(json.dumps({"checkpoint": args.checkpoint, "model": shell.config.name,
                      "num_layers": shell.config.num_layers, "granularity": args.granularity,
                      "widths": list(widths), "evaluations_per_budget": count}))
    return 0

  from matquant_jax.data import tokenizer as tokenizer_lib
  try:
    tok_path = (pathlib.Path(args.tokenizer) if args.tokenizer != "auto"
                else tokenizer_lib.find_tokenizer(pathlib.Path(args.checkpoint)))
    tok = tokenizer_lib.open_tokenizer(tok_path)
  except (ValueError, FileNotFoundError) as e:
    _fail(ap, f"--tokenizer={args.tokenizer}: {e}")
  ckpt = mqc.MatQuantCheckpoint.load(args.checkpoint)
  options = search.SearchOptions(
      unit=args.unit, granularity=args.granularity, widths=widths, extra_precision=args.ep,
      source=args.calib_source, split=args.calib_split, seq_len=args.seq_len,
      batch_size=args.batch_size, tokens=args.calib_tokens, max_evals=args.max_evals,
      seed=args.seed, tfds_data_dir=args.tfds_data_dir)
  try:
    results, _ = search.run(ckpt, tok, args.budget, options)
  except (ValueError, FileNotFoundError) as e:
    _fail(ap, str(e))
  rows = [r.to_json() for r in results]
  if args.eval_source:
    _held_out(ckpt, tok, results, rows, args)
  for r, row in zip(results, rows):
    print(str(r.plan))
    print(json.dumps(row))
  if args.out:
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "search.json").write_text(json.dumps(
        {"checkpoint": str(args.checkpoint), "options": vars(args) | {"budget": args.budget},
         "results": rows}, indent=2, default=str))
    if len(results) > 1:
      _plot(rows, out / "pareto.png", "held_out_log_pplx" if args.eval_source else
            "calibration_kl")
    print(f"wrote {out / 'search.json'}")
  return 0


def _held_out(ckpt, tok, results, rows, args) -> None:
  """Held-out log pplx of each searched plan and of the fixed strategies at its budget."""
  from matquant_jax.evaluation import sweep
  from matquant_jax.quant.plan import MIX_N_MATCH, PrecisionPlan
  options = sweep.EvalOptions(ppl_source=args.eval_source, ppl_split=args.eval_split,
                              ppl_seq_len=args.seq_len, ppl_max_tokens=args.eval_tokens,
                              tasks=(), batch_size=args.batch_size,
                              tfds_data_dir=args.tfds_data_dir)
  for r, row in zip(results, rows):
    plans = [r.plan]
    if r.unit == "bits":
      plans += [PrecisionPlan.mix_n_match(s, budget=r.budget, scope=ckpt.scope,
                                          extra_precision=r.plan.extra_precision)
                for s in MIX_N_MATCH]
    recs = sweep.evaluate_checkpoint(ckpt, plans, tok, method="mix_n_match", options=options)
    row["held_out_log_pplx"] = recs[0]["log_pplx"]
    row["fixed_strategies_held_out"] = {p.strategy.value: rec["log_pplx"]
                                        for p, rec in zip(plans[1:], recs[1:])}
    row["fixed_strategies_bits"] = {p.strategy.value: rec["effective_bits"]
                                    for p, rec in zip(plans[1:], recs[1:])}


def _plot(rows, path: pathlib.Path, key: str) -> None:
  from matquant_jax.evaluation import plots
  fixed_key = "fixed_strategies_held_out" if key == "held_out_log_pplx" else "fixed_strategies_kl"
  points = [{"method": "Mix'n'Match search", "label": f"@{r['budget']:g}",
             "effective_bits": r["effective_bits"], "value": r[key]} for r in rows]
  for r in rows:
    for strategy, value in r.get(fixed_key, {}).items():
      bits = r.get("fixed_strategies_bits", {}).get(strategy, r["budget"])
      points.append({"method": "Mix'n'Match", "label": f"{strategy}@{r['budget']:g}",
                     "effective_bits": bits, "value": value})
  metric = "log_pplx" if key == "held_out_log_pplx" else "kl"
  plots.plot_quality_vs_bits(points, path, metric=metric, annotate=False,
                             title="Mix'n'Match: searched plans vs the four fixed strategies")


if __name__ == "__main__":
  sys.exit(main())
