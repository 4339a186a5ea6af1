"""Command line: the paper's result table from int8 checkpoints, with no retraining.

    python -m matquant_jax.evaluate --out=results/gemma2_9b_qat \
        --tokenizer=/ckpts/gemma2/tokenizer.model --tfds_data_dir=/data/tfds \
        --checkpoint=matquant=runs/qat_matquant/matquant_int8 \
        --checkpoint=baseline=runs/qat_baseline_int8/matquant_int8 \
        --checkpoint=baseline=runs/qat_baseline_int4/matquant_int8 \
        --checkpoint=single_precision=runs/qat_sp/matquant_int8 \
        --checkpoint=extra_precision=runs/qat_ep/matquant_int8 \
        --bf16=hf:/ckpts/gemma-2-9b --mix=pyramid@3.0,pyramid@5.0,search@3.0

Per checkpoint kind:
  matquant / single_precision   sliced to every --bits width (and the --mix plans for matquant)
  extra_precision               sliced to every --bits width with unclamped slices (":ep"), and
                                the --mix plans with ":ep" (Extra Precision Mix'n'Match, Fig. 3)
  baseline                      evaluated at its own width (from its metadata); an int8
                                baseline is also sliced to the other --bits ("Sliced int8" rows)

--mix takes strategy@BUDGET (a fixed layout), a whole plan string such as 'ffn:[3,4,4,2]' (e.g.
one printed by `python -m matquant_jax.mixnmatch`), or search@BUDGET: search a plan for the
budget on --search_source[--search_split] (matquant_jax/evaluation/search.py), then evaluate it
on the held-out --ppl_source ("Mix'n'Match search" rows). Overlapping texts are refused.
Writes <out>/table.{md,csv,json} and <out>/quality_vs_bits.png; every checkpoint and plan is
validated before the first evaluation.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

KINDS = ("matquant", "single_precision", "extra_precision", "baseline")  # --minmax adds MinMax
MIX_KINDS = ("matquant", "extra_precision")  # --mix plans are evaluated on these
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
  if kind in MIX_KINDS:
    for m in mix:
      if m.startswith("search@"):
        continue
      plan = m if ":" in m else f"{scope}:{m}"
      if ep and "ep" not in [o.strip().lower() for o in plan.split(":")[2:]]:
        plan += ep  # Extra Precision Mix'n'Match (Fig. 3): unclamped slices in every layer
      plans.append((plan, "mix_n_match"))
  return plans


def _search_budgets(mix) -> list[float]:
  out = []
  for m in mix:
    if m.startswith("search@"):
      try:
        out.append(float(m[len("search@"):]))
      except ValueError:
        raise ValueError(f"--mix {m!r}: expected search@BUDGET, e.g. search@3.0") from None
  return out


def _split_mix(text: str) -> list[str]:
  """Splits --mix at commas outside brackets, so 'ffn:[3,4,4,2]' stays one entry."""
  out, depth, cur = [], 0, ""
  for ch in text:
    depth += ch == "["
    depth -= ch == "]"
    if ch == "," and depth == 0:
      out.append(cur)
      cur = ""
    else:
      cur += ch
  return out + [cur]


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
  ap.add_argument("--minmax", action="store_true",
                  help="also evaluate the --bf16 model under plain per-channel MinMax at every "
                       "--bits width, no training (Fig. 1b's MinMax rows)")
  ap.add_argument("--minmax_scope", default="ffn", choices=("ffn", "attn", "ffn+attn"))
  ap.add_argument("--mix", default="", help="Mix'n'Match specs, e.g. pyramid@3.0,search@3.0 or "
                  "a plan string (see the module docstring)")
  ap.add_argument("--search_source", default="", help="calibration text of search@ plans; "
                  "default: --ppl_source")
  ap.add_argument("--search_split", default="train")
  ap.add_argument("--search_tokens", type=int, default=8192)
  ap.add_argument("--search_granularity", choices=("layer", "kernel"), default="layer")
  ap.add_argument("--search_widths", default="2,3,4,6,8")
  ap.add_argument("--search_max_evals", type=int, default=200)
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

  from matquant_jax import cli
  from matquant_jax.evaluation import search as search_lib
  for name, minimum in (("batch_size", 1), ("ppl_seq_len", 2), ("ppl_max_tokens", 1),
                        ("ppl_max_documents", 1), ("task_max_examples", 1),
                        ("search_tokens", 1), ("search_max_evals", 1)):
    value = getattr(args, name)
    if value is not None and value < minimum:
      ap.error(f"--{name}={value} must be >= {minimum}.")
  try:
    bits = [int(b) for b in args.bits.split(",") if b.strip()]
  except ValueError:
    ap.error(f"--bits={args.bits!r}: give comma-separated widths, e.g. 8,6,4,3,2.")
  bad = [b for b in bits if not 1 <= b <= 8]
  if bad:
    ap.error(f"--bits={args.bits!r}: widths {bad} are outside 1..8.")
  mix = [m.strip() for m in _split_mix(args.mix) if m.strip()]
  try:
    budgets = _search_budgets(mix)
    search_options = search_lib.SearchOptions(
        granularity=args.search_granularity,
        widths=tuple(int(w) for w in args.search_widths.split(",") if w),
        source=args.search_source or args.ppl_source, split=args.search_split,
        seq_len=min(args.ppl_seq_len, 2048), batch_size=args.batch_size,
        tokens=args.search_tokens, max_evals=args.search_max_evals,
        tfds_data_dir=args.tfds_data_dir)
    if budgets:
      search_lib.check_disjoint((search_options.source, search_options.split),
                                (args.ppl_source, "validation"))
  except ValueError as e:
    ap.error(str(e))
  entries = []
  for spec in args.checkpoint:
    kind, _, path = spec.partition("=")
    if kind not in KINDS or not path:
      ap.error(f"--checkpoint {spec!r}: use KIND=PATH with KIND in {KINDS}.")
    try:
      ckpt = MatQuantCheckpoint.load(path)
    except cli.user_errors() as e:
      ap.error(f"--checkpoint {spec!r}: {e}")
    plans = _plans_for(kind, ckpt, bits, mix)
    for p, _ in plans:  # fail before any evaluation, naming the bad plan
      try:
        ckpt.check_plan(PrecisionPlan.parse(p))
      except ValueError as e:
        ap.error(f"--checkpoint {spec!r}: {e}")
    if kind in MIX_KINDS and budgets:
      try:
        widths = search_lib.check_widths(search_options.widths, ckpt.parent_bits)
      except ValueError as e:
        ap.error(f"--search_widths: {e}")
      for b in budgets:
        if b < widths[0]:
          ap.error(f"--mix search@{b:g}: the budget is below the narrowest search width "
                   f"int{widths[0]}.")
    entries.append((kind, ckpt, plans))
  if not entries and not args.bf16:
    ap.error("nothing to evaluate: pass --checkpoint KIND=PATH and/or --bf16.")
  if args.minmax and not args.bf16:
    ap.error("--minmax quantizes the float model: pass it with --bf16=<weights>.")
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
    if args.minmax:
      records += sweep.evaluate_minmax(config, params, tok, bits, scope=args.minmax_scope,
                                       options=options)
    del params
  for kind, ckpt, plans in entries:
    for method in dict.fromkeys(m for _, m in plans):
      records += sweep.evaluate_checkpoint(
          ckpt, [p for p, m in plans if m == method], tok, method=method, options=options,
          label_fn=(lambda p: f"Mix'n'Match {p}") if method == "mix_n_match" else None)
    if kind in MIX_KINDS and budgets:
      found, _ = search_lib.run(ckpt, tok, budgets, dataclasses.replace(
          search_options, extra_precision=kind == "extra_precision"))
      records += sweep.evaluate_checkpoint(
          ckpt, [r.plan for r in found], tok, method="mix_n_match_search", options=options,
          label_fn=lambda p: f"Mix'n'Match search {p}")
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
