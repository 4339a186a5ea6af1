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

import json
import pathlib
import sys
from typing import Sequence

from absl import flags

from matquant_jax import cli

PROG = "mixnmatch"
FLAGS = flags.FlagValues()


def _define_flags() -> None:
  """Defines the flags once, on first use: their defaults come from search.SearchOptions,
  which imports jax, and importing this module should not."""
  if "checkpoint" in FLAGS:
    return
  from matquant_jax.evaluation import search
  d = search.SearchOptions()
  f = dict(flag_values=FLAGS)
  flags.DEFINE_string("checkpoint", None, "An int8 MatQuant checkpoint directory (required).",
                      **f)
  flags.DEFINE_list("budget", None, "Budget(s), comma separated: effective bits per quantized "
                    "parameter, or bytes of the quantized kernels with --unit=bytes (required).",
                    **f)
  flags.DEFINE_enum("unit", d.unit, list(search.UNITS), "Unit of --budget.", **f)
  flags.DEFINE_enum("granularity", d.granularity, list(search.GRANULARITIES),
                    "Search unit: a layer or a kernel.", **f)
  flags.DEFINE_list("widths", [str(w) for w in d.widths], "Widths the search may assign.", **f)
  flags.DEFINE_bool("ep", False, "Search over Extra Precision slices.", **f)
  flags.DEFINE_string("tokenizer", "auto", "Tokenizer file; 'auto' finds the one next to the "
                      "checkpoint.", **f)
  flags.DEFINE_string("calib_source", d.source, "Calibration text: kjv, tfds:c4/en, "
                      "text:<path>.", **f)
  flags.DEFINE_string("calib_split", d.split, "Split of --calib_source.", **f)
  flags.DEFINE_integer("calib_tokens", d.tokens, "Calibration tokens.", **f)
  flags.DEFINE_integer("seq_len", d.seq_len, "Sequence length.", **f)
  flags.DEFINE_integer("batch_size", d.batch_size, "Batch size.", **f)
  flags.DEFINE_integer("max_evals", d.max_evals, "Model evaluations per budget, everything "
                       "included.", **f)
  flags.DEFINE_integer("seed", d.seed, "Seed of the refinement.", **f)
  flags.DEFINE_string("tfds_data_dir", None, "TFDS data directory.", **f)
  flags.DEFINE_string("eval_source", "", "Also score plans by held-out log pplx on this text.",
                      **f)
  flags.DEFINE_string("eval_split", "validation", "Split of --eval_source.", **f)
  flags.DEFINE_integer("eval_tokens", 30_000, "Held-out tokens.", **f)
  flags.DEFINE_string("out", "", "Write search.json (and pareto.png) here.", **f)
  flags.DEFINE_bool("dry_run", False, "Print the number of model evaluations and exit.", **f)


def _numbers(f) -> tuple[list[float], tuple[int, ...]]:
  """--budget and --widths as numbers; every count flag in range."""
  if not f.checkpoint or not f.budget:
    cli.fail(PROG, "--checkpoint=<int8 checkpoint dir> and --budget=<bits>[,...] are required.")
  cli.check_minimums(PROG, f, {"calib_tokens": 1, "seq_len": 2, "batch_size": 1,
                               "max_evals": 1, "eval_tokens": 1})
  try:
    budgets = [float(t) for t in f.budget if t.strip()]
  except ValueError:
    cli.fail(PROG, f"--budget={','.join(f.budget)!r} is not a comma list of numbers, e.g. "
                   f"3.0,4.5")
  try:
    widths = tuple(int(t) for t in f.widths if t.strip())
  except ValueError:
    cli.fail(PROG, f"--widths={','.join(f.widths)!r} is not a comma list of widths, e.g. "
                   f"2,3,4,6,8")
  return budgets, widths


def main(argv: Sequence[str] | None = None) -> int:
  _define_flags()
  cli.parse_flags(FLAGS, argv, PROG)
  f = FLAGS
  budgets, widths = _numbers(f)
  from matquant_jax.checkpoints import matquant_checkpoint as mqc
  from matquant_jax.evaluation import search
  try:
    meta = mqc.read_metadata(f.checkpoint)
    shell = mqc.MatQuantCheckpoint.from_metadata(f.checkpoint, meta)
    widths = search.check_widths(widths, shell.parent_bits)
    if f.eval_source:
      search.check_disjoint((f.calib_source, f.calib_split), (f.eval_source, f.eval_split))
  except (ValueError, FileNotFoundError) as e:
    cli.fail(PROG, str(e))
  count = search.evaluation_count(shell.config.num_layers, widths, shell.parent_bits,
                                  f.max_evals, f.granularity)
  if f.dry_run:
    print(json.dumps({"checkpoint": f.checkpoint, "model": shell.config.name,
                      "num_layers": shell.config.num_layers, "granularity": f.granularity,
                      "widths": list(widths), "evaluations_per_budget": count}))
    return 0

  from matquant_jax.data import tokenizer as tokenizer_lib
  try:
    tok_path = (pathlib.Path(f.tokenizer) if f.tokenizer != "auto"
                else tokenizer_lib.find_tokenizer(pathlib.Path(f.checkpoint)))
    tok = tokenizer_lib.open_tokenizer(tok_path)
  except (ValueError, FileNotFoundError) as e:
    cli.fail(PROG, f"--tokenizer={f.tokenizer}: {e}")
  ckpt = mqc.MatQuantCheckpoint.load(f.checkpoint)
  options = search.SearchOptions(
      unit=f.unit, granularity=f.granularity, widths=widths, extra_precision=f.ep,
      source=f.calib_source, split=f.calib_split, seq_len=f.seq_len,
      batch_size=f.batch_size, tokens=f.calib_tokens, max_evals=f.max_evals,
      seed=f.seed, tfds_data_dir=f.tfds_data_dir)
  try:
    results, _ = search.run(ckpt, tok, budgets, options)
  except (ValueError, FileNotFoundError) as e:
    cli.fail(PROG, str(e))
  rows = [r.to_json() for r in results]
  if f.eval_source:
    _held_out(ckpt, tok, results, rows, f)
  for r, row in zip(results, rows):
    print(str(r.plan))
    print(json.dumps(row))
  if f.out:
    _write(rows, budgets, f)
  return 0


def _write(rows, budgets, f) -> None:
  out = pathlib.Path(f.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "search.json").write_text(json.dumps(
      {"checkpoint": str(f.checkpoint), "options": f.flag_values_dict() | {"budget": budgets},
       "results": rows}, indent=2, default=str))
  if len(rows) > 1:
    _plot(rows, out / "pareto.png", "held_out_log_pplx" if f.eval_source else "calibration_kl")
  print(f"wrote {out / 'search.json'}")


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
