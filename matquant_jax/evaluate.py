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

import dataclasses
import pathlib
import sys
from typing import Any, Sequence

from absl import flags

from matquant_jax import cli

KINDS = ("matquant", "single_precision", "extra_precision", "baseline")  # --minmax adds MinMax
MIX_KINDS = ("matquant", "extra_precision")  # --mix plans are evaluated on these
DEFAULT_TASKS = "arc_challenge,arc_easy,boolq,hellaswag,piqa,winogrande"


def _plans_for(kind, ckpt, bits, mix):
  from matquant_jax.quant.plan import PrecisionPlan
  scope = ckpt.scope.value
  if kind == "baseline":
    own = [(str(PrecisionPlan.uniform(ckpt.parent_bits, scope, parent_bits=ckpt.parent_bits)),
            "baseline")]
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


FLAGS = flags.FlagValues()
flags.DEFINE_multi_string("checkpoint", [], f"KIND=PATH: an int8 checkpoint; KIND in {KINDS}. "
                          "Repeatable.", flag_values=FLAGS)
flags.DEFINE_string("bf16", "", "Reference weights: hf:<dir>, gemma:<dir>[:<preset>], "
                    "mistral:<dir> or run:<workdir>.", flag_values=FLAGS)
flags.DEFINE_string("tokenizer", "auto", "SentencePiece .model, HF tokenizer.json (or a "
                    "directory with one); 'auto' finds the one next to the first checkpoint or "
                    "--bf16.", flag_values=FLAGS)
flags.DEFINE_string("out", None, "Output directory (required).", flag_values=FLAGS)
flags.DEFINE_string("bits", "8,6,4,3,2", "Comma-separated slice widths.", flag_values=FLAGS)
flags.DEFINE_bool("minmax", False, "Also evaluate the --bf16 model under plain per-channel "
                  "MinMax at every --bits width, no training (Fig. 1b's MinMax rows).",
                  flag_values=FLAGS)
flags.DEFINE_enum("minmax_scope", "ffn", ["ffn", "attn", "ffn+attn"], "Kernels --minmax "
                  "quantizes.", flag_values=FLAGS)
flags.DEFINE_string("mix", "", "Mix'n'Match specs, e.g. pyramid@3.0,search@3.0 or a plan "
                    "string (see the module docstring).", flag_values=FLAGS)
flags.DEFINE_string("search_source", "", "Calibration text of search@ plans; default: "
                    "--ppl_source.", flag_values=FLAGS)
flags.DEFINE_string("search_split", "train", "Split of --search_source.", flag_values=FLAGS)
flags.DEFINE_integer("search_tokens", 8192, "Calibration tokens of the search.",
                     flag_values=FLAGS)
flags.DEFINE_enum("search_granularity", "layer", ["layer", "kernel"], "Search unit.",
                  flag_values=FLAGS)
flags.DEFINE_string("search_widths", "2,3,4,6,8", "Widths the search may assign.",
                    flag_values=FLAGS)
flags.DEFINE_integer("search_max_evals", 200, "Evaluations per budget.", flag_values=FLAGS)
flags.DEFINE_string("tasks", DEFAULT_TASKS, "Comma list of zero-shot tasks; '' for none.",
                    flag_values=FLAGS)
flags.DEFINE_string("ppl_source", "tfds:c4/en", "Text of the log-perplexity rows.",
                    flag_values=FLAGS)
flags.DEFINE_integer("ppl_seq_len", 2048, "Sequence length of perplexity.", flag_values=FLAGS)
flags.DEFINE_integer("ppl_max_documents", None, "Cap on documents.", flag_values=FLAGS)
flags.DEFINE_integer("ppl_max_tokens", None, "Cap on tokens.", flag_values=FLAGS)
flags.DEFINE_integer("task_max_examples", None, "Cap on examples per task.", flag_values=FLAGS)
flags.DEFINE_string("tfds_data_dir", None, "TFDS data directory.", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 8, "Evaluation batch size.", flag_values=FLAGS)
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Compute dtype.",
                  flag_values=FLAGS)

PROG = "evaluate"


@dataclasses.dataclass
class Request:
  """Everything `main` evaluates, checked before the first evaluation."""
  bits: list[int]
  budgets: list[float]
  search_options: Any
  entries: list  # (kind, MatQuantCheckpoint, [(plan, method)])
  bf16_source: Any
  tokenizer: Any
  options: Any


def _check_numbers(f) -> list[int]:
  """Ranges of the numeric flags, and the --bits widths."""
  cli.check_minimums(PROG, f, {"batch_size": 1, "ppl_seq_len": 2, "ppl_max_tokens": 1,
                               "ppl_max_documents": 1, "task_max_examples": 1,
                               "search_tokens": 1, "search_max_evals": 1})
  if not f.out:
    cli.fail(PROG, "--out is required: the directory for table.{md,csv,json} and the plot.")
  try:
    bits = [int(b) for b in f.bits.split(",") if b.strip()]
  except ValueError:
    cli.fail(PROG, f"--bits={f.bits!r}: give comma-separated widths, e.g. 8,6,4,3,2.")
  bad = [b for b in bits if not 1 <= b <= 8]
  if bad:
    cli.fail(PROG, f"--bits={f.bits!r}: widths {bad} are outside 1..8.")
  return bits


def _search_options(f):
  from matquant_jax.evaluation import search as search_lib
  return search_lib.SearchOptions(
      granularity=f.search_granularity,
      widths=tuple(int(w) for w in f.search_widths.split(",") if w),
      source=f.search_source or f.ppl_source, split=f.search_split,
      seq_len=min(f.ppl_seq_len, 2048), batch_size=f.batch_size,
      tokens=f.search_tokens, max_evals=f.search_max_evals, tfds_data_dir=f.tfds_data_dir)


def _check_checkpoint(spec: str, bits, mix, budgets, search_options):
  """(kind, checkpoint, plans) of one --checkpoint, every plan validated."""
  from matquant_jax.checkpoints.matquant_checkpoint import MatQuantCheckpoint
  from matquant_jax.evaluation import search as search_lib
  from matquant_jax.quant.plan import PrecisionPlan
  kind, _, path = spec.partition("=")
  if kind not in KINDS or not path:
    cli.fail(PROG, f"--checkpoint {spec!r}: use KIND=PATH with KIND in {KINDS}.")
  try:
    ckpt = MatQuantCheckpoint.load(path)
  except cli.user_errors() as e:
    cli.fail(PROG, f"--checkpoint {spec!r}: {e}")
  plans = _plans_for(kind, ckpt, bits, mix)
  for p, _ in plans:  # fail before any evaluation, naming the bad plan
    try:
      ckpt.check_plan(PrecisionPlan.parse(p))
    except ValueError as e:
      cli.fail(PROG, f"--checkpoint {spec!r}: {e}")
  if kind in MIX_KINDS and budgets:
    try:
      widths = search_lib.check_widths(search_options.widths, ckpt.parent_bits)
    except ValueError as e:
      cli.fail(PROG, f"--search_widths: {e}")
    for b in budgets:
      if b < widths[0]:
        cli.fail(PROG, f"--mix search@{b:g}: the budget is below the narrowest search width "
                       f"int{widths[0]}.")
  return kind, ckpt, plans


def _tokenizer(f, entries, bf16_source):
  from matquant_jax.checkpoints import weight_source
  from matquant_jax.data import tokenizer as tokenizer_lib
  try:
    if f.tokenizer != "auto":
      tok_path = pathlib.Path(f.tokenizer)
    elif entries:
      tok_path = tokenizer_lib.find_tokenizer(pathlib.Path(f.checkpoint[0].partition("=")[2]))
    else:
      tok_path = weight_source.tokenizer_near(bf16_source)
    return tokenizer_lib.open_tokenizer(tok_path)
  except (ValueError, FileNotFoundError) as e:
    cli.fail(PROG, f"--tokenizer={f.tokenizer}: {e}")


def check_request(f) -> Request:
  """Every flag, checkpoint, plan, weight source and the tokenizer, before any evaluation."""
  import jax.numpy as jnp
  from matquant_jax.checkpoints import weight_source
  from matquant_jax.evaluation import search as search_lib
  from matquant_jax.evaluation import sweep
  bits = _check_numbers(f)
  mix = [m.strip() for m in _split_mix(f.mix) if m.strip()]
  try:
    budgets = _search_budgets(mix)
    search_options = _search_options(f)
    if budgets:
      search_lib.check_disjoint((search_options.source, search_options.split),
                                (f.ppl_source, "validation"))
  except ValueError as e:
    cli.fail(PROG, str(e))
  entries = [_check_checkpoint(spec, bits, mix, budgets, search_options)
             for spec in f.checkpoint]
  if not entries and not f.bf16:
    cli.fail(PROG, "nothing to evaluate: pass --checkpoint KIND=PATH and/or --bf16.")
  if f.minmax and not f.bf16:
    cli.fail(PROG, "--minmax quantizes the float model: pass it with --bf16=<weights>.")
  bf16_source = None
  if f.bf16:
    try:
      bf16_source = weight_source.parse(f.bf16)
      weight_source.architecture(bf16_source)  # config errors before any evaluation
    except (ValueError, FileNotFoundError) as e:
      cli.fail(PROG, f"--bf16 {f.bf16!r}: {e}")
  options = sweep.EvalOptions(
      ppl_source=f.ppl_source, ppl_seq_len=f.ppl_seq_len,
      ppl_max_tokens=f.ppl_max_tokens, ppl_max_documents=f.ppl_max_documents,
      tasks=tuple(t for t in f.tasks.split(",") if t), task_max_examples=f.task_max_examples,
      tfds_data_dir=f.tfds_data_dir, batch_size=f.batch_size,
      dtype=jnp.bfloat16 if f.dtype == "bfloat16" else jnp.float32)
  return Request(bits, budgets, search_options, entries, bf16_source,
                 _tokenizer(f, entries, bf16_source), options)


def run(req: Request) -> list[dict]:
  """The records of every row: the bf16 (and MinMax) model, then each checkpoint's plans."""
  from matquant_jax.checkpoints import weight_source
  from matquant_jax.evaluation import search as search_lib
  from matquant_jax.evaluation import sweep
  from matquant_jax.quant.plan import PrecisionPlan
  records, tok, options = [], req.tokenizer, req.options
  if req.bf16_source is not None:
    config, params = weight_source.load(req.bf16_source)
    rec = sweep.plan_record("bf16", PrecisionPlan.bf16(), 16.0)
    rec.update(sweep.evaluate_params(config, params, tok, options))
    records.append(rec)
    if FLAGS.minmax:
      records += sweep.evaluate_minmax(config, params, tok, req.bits, scope=FLAGS.minmax_scope,
                                       options=options)
    del params
  for kind, ckpt, plans in req.entries:
    for method in dict.fromkeys(m for _, m in plans):
      records += sweep.evaluate_checkpoint(
          ckpt, [p for p, m in plans if m == method], tok, method=method, options=options,
          label_fn=(lambda p: f"Mix'n'Match {p}") if method == "mix_n_match" else None)
    if kind in MIX_KINDS and req.budgets:
      found, _ = search_lib.run(ckpt, tok, req.budgets, dataclasses.replace(
          req.search_options, extra_precision=kind == "extra_precision"))
      records += sweep.evaluate_checkpoint(
          ckpt, [r.plan for r in found], tok, method="mix_n_match_search", options=options,
          label_fn=lambda p: f"Mix'n'Match search {p}")
  return records


def write_report(records: list[dict], out: str, tasks: bool) -> None:
  """table.{md,csv,json} and the quality-vs-bits plot under `out`; prints the table."""
  from matquant_jax.evaluation import plots, report
  paths = report.write_tables(records, out)
  print(paths["md"].read_text())
  metric = "task_avg" if tasks else "log_pplx"
  points = [{"method": report.METHOD_LABELS.get(r["method"], r["method"]),
             "label": r.get("label") or (f"int{r['bits']}" if r.get("bits") else r["plan"]),
             "effective_bits": r["effective_bits"], "value": r[metric]}
            for r in records if r["method"] != "bf16" and r.get(metric) is not None]
  if points:
    plots.plot_quality_vs_bits(points, pathlib.Path(out) / "quality_vs_bits.png", metric=metric)


def main(argv: Sequence[str] | None = None) -> int:
  cli.parse_flags(FLAGS, argv, PROG)
  req = check_request(FLAGS)
  write_report(run(req), FLAGS.out, bool(req.options.tasks))
  return 0


if __name__ == "__main__":
  sys.exit(main())
