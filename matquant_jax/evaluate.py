"""Command line: the paper's result table from int8 checkpoints, with no retraining.

    python -m matquant_jax.evaluate --out=results/gemma2_9b_qat \
        --tokenizer=/ckpts/gemma2/tokenizer.model --tfds_data_dir=/data/tfds \
        --checkpoint=matquant=runs/qat_matquant/matquant_int8 \
        --checkpoint=baseline=runs/qat_baseline_int8/matquant_int8 \
        --checkpoint=baseline=runs/qat_baseline_int4/matquant_int8 \
        --checkpoint=single_precision=runs/qat_sp/matquant_int8 \
        --checkpoint=extra_precision=runs/qat_ep/matquant_int8 \
        --bf16=hf:/ckpts/gemma-2-9b --mix=pyramid@3.0,pyramid@5.0

Per checkpoint kind:
  matquant / single_precision   sliced to every --bits width (and the --mix plans for matquant)
  extra_precision               sliced to every --bits width with unclamped slices (":ep")
  baseline                      evaluated at its own width (from its metadata); an int8
                                baseline is also sliced to the other --bits ("Sliced int8" rows)
Writes <out>/table.{md,csv,json} and <out>/quality_vs_bits.png; every checkpoint and plan is
validated before the first evaluation.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

KINDS = ("matquant", "single_precision", "extra_precision", "baseline")
DEFAULT_TASKS = "arc_challenge,arc_easy,boolq,hellaswag,piqa,winogrande"


def _plans_for(kind, ckpt, bits, mix):
  scope = ckpt.scope.value
  if kind == "baseline":
    own = [(f"{scope}:int{ckpt.parent_bits}" +
            (f":parent={ckpt.parent_bits}" if ckpt.parent_bits != 8 else ""), "baseline")]
    if ckpt.parent_bits == 8:
      own += [(f"{scope}:int{r}", "sliced_int8") for r in bits if r < 8]
    return own
  ep = ":ep" if kind == "extra_precision" else ""
  plans = [(f"{scope}:int{r}{ep}", kind) for r in bits]
  if kind == "matquant":
    plans += [(f"{scope}:{m}", "mix_n_match") for m in mix]
  return plans


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--checkpoint", action="append", default=[], metavar="KIND=PATH",
                  help=f"an int8 checkpoint; KIND in {KINDS}. Repeatable.")
  ap.add_argument("--bf16", default="", help="reference weights: hf:<dir>, gemma:<dir>[:<preset>], "
                  "mistral:<dir> or run:<workdir>")
  ap.add_argument("--tokenizer", default="auto",
                  help="SentencePiece .model, HF tokenizer.json (or a directory with one); "
                       "'auto' (default) finds the one next to the first checkpoint or --bf16")
  ap.add_argument("--out", required=True)
  ap.add_argument("--bits", default="8,6,4,3,2")
  ap.add_argument("--mix", default="", help="Mix'n'Match specs, e.g. pyramid@3.0,decreasing@5.0")
  ap.add_argument("--tasks", default=DEFAULT_TASKS, help="comma list; '' for none")
  ap.add_argument("--ppl_source", default="tfds:c4/en")
  ap.add_argument("--ppl_seq_len", type=int, default=2048)
  ap.add_argument("--ppl_max_documents", type=int, default=None)
  ap.add_argument("--ppl_max_tokens", type=int, default=None)
  ap.add_argument("--task_max_examples", type=int, default=None)
  ap.add_argument("--tfds_data_dir", default=None)
  ap.add_argument("--batch_size", type=int, default=8)
  ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  args = ap.parse_args(argv)

  import jax.numpy as jnp
  from matquant_jax.checkpoints.matquant_checkpoint import MatQuantCheckpoint
  from matquant_jax.checkpoints import weight_source
  from matquant_jax.data import tokenizer as tokenizer_lib
  from matquant_jax.evaluation import plots, report, sweep
  from matquant_jax.quant.plan import PrecisionPlan

  bits = [int(b) for b in args.bits.split(",") if b]
  mix = [m for m in args.mix.split(",") if m]
  entries = []
  for spec in args.checkpoint:
    kind, _, path = spec.partition("=")
    if kind not in KINDS or not path:
      ap.error(f"--checkpoint {spec!r}: use KIND=PATH with KIND in {KINDS}.")
    ckpt = MatQuantCheckpoint.load(path)
    plans = _plans_for(kind, ckpt, bits, mix)
    for p, _ in plans:  # fail before any evaluation, naming the bad plan
      try:
        ckpt.check_plan(PrecisionPlan.parse(p))
      except ValueError as e:
        ap.error(f"--checkpoint {spec!r}: {e}")
    entries.append((kind, ckpt, plans))
  if not entries and not args.bf16:
    ap.error("nothing to evaluate: pass --checkpoint KIND=PATH and/or --bf16.")
  bf16_source = None
  if args.bf16:
    try:
      bf16_source = weight_source.parse(args.bf16)
      weight_source.architecture(bf16_source)  # config errors before any evaluation
    except (ValueError, FileNotFoundError) as e:
      ap.error(f"--bf16 {args.bf16!r}: {e}")
  try:
    if args.tokenizer != "auto":
      tok_path = pathlib.Path(args.tokenizer)
    elif entries:
      tok_path = tokenizer_lib.find_tokenizer(pathlib.Path(args.checkpoint[0].partition("=")[2]))
    else:
      tok_path = weight_source.tokenizer_near(bf16_source)
    tok = tokenizer_lib.open_tokenizer(tok_path)
  except (ValueError, FileNotFoundError) as e:
    ap.error(f"--tokenizer={args.tokenizer}: {e}")
  options = sweep.EvalOptions(
      ppl_source=args.ppl_source, ppl_seq_len=args.ppl_seq_len,
      ppl_max_tokens=args.ppl_max_tokens, ppl_max_documents=args.ppl_max_documents,
      tasks=tuple(t for t in args.tasks.split(",") if t), task_max_examples=args.task_max_examples,
      tfds_data_dir=args.tfds_data_dir, batch_size=args.batch_size,
      dtype=jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32)

  records = []
  if args.bf16:
    config, params = weight_source.load(bf16_source)
    rec = sweep.plan_record("bf16", PrecisionPlan.bf16(), 16.0)
    rec.update(sweep.evaluate_params(config, params, tok, options))
    records.append(rec)
    del params
  for kind, ckpt, plans in entries:
    for method in dict.fromkeys(m for _, m in plans):
      records += sweep.evaluate_checkpoint(ckpt, [p for p, m in plans if m == method], tok,
                                           method=method, options=options)
  paths = report.write_tables(records, args.out)
  print(paths["md"].read_text())
  metric = "task_avg" if options.tasks else "log_pplx"
  points = [{"method": report.METHOD_LABELS.get(r["method"], r["method"]),
             "label": r.get("label") or (f"int{r['bits']}" if r.get("bits") else r["plan"]),
             "effective_bits": r["effective_bits"], "value": r[metric]}
            for r in records if r["method"] != "bf16" and r.get(metric) is not None]
  if points:
    plots.plot_quality_vs_bits(points, pathlib.Path(args.out) / "quality_vs_bits.png", metric=metric)
  return 0


if __name__ == "__main__":
  sys.exit(main())
