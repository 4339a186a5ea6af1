"""The built-in demo: the paper's tables and figures in miniature, from one command.

    python -m matquant_jax.demo            # or: make demo

On the bundled KJV text (train split only; the validation chapters are held out for every
score) it:
  1. trains a 512-piece tokenizer and pretrains a tiny Gemma-2-architecture model in bf16-style
     full precision (the "bf16" reference row);
  2. runs baseline QAT at int8, int6, int4, int3 and int2 (MinMax(r), trained at r), one
     MatQuant QAT run (R = {8, 4, 2}) and one OmniQuant-MatQuant calibration (block-wise
     LWC + LET, weights frozen), all starting from the pretrained model;
  3. exports each as an int8-format checkpoint and evaluates: every baseline at its own width,
     the int8 baseline sliced to 6/4/3/2 ("Sliced int8"), MatQuant sliced to 8/6/4/3/2 (6 and 3
     were never trained: "interpolation"), the four Mix'n'Match strategies of MatQuant, and the
     plans `python -m matquant_jax.mixnmatch` searches for the same budgets on training-split
     text ("Mix'n'Match search", also written to results/demo/mixnmatch_search.json);
  4. prints the table, writes results/demo/table.{json,md,csv} and the plots
     results/demo/code_histograms.png and results/demo/quality_vs_bits.png.

Scores: log perplexity on the KJV validation chapters (mean token NLL, nats) and the
`kjv_verse_completion` 4-way multiple-choice task built from the same held-out chapters. Stages whose
outputs exist in --workdir are reused; --fresh starts over.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import multiprocessing
import pathlib
import shutil
import sys
import time

import jax
import jax.numpy as jnp

DEMO_MODEL = "demo_gemma2"
BASELINE_BITS = (8, 6, 4, 3, 2)
MATQUANT_SLICES = (8, 6, 4, 3, 2)
MIX_BUDGETS = (3.0, 5.0)
# The searched budgets (the CLI sweeps more: `python -m matquant_jax.mixnmatch --budget=...`).
SEARCH_BUDGETS = MIX_BUDGETS
SEARCH_MAX_EVALS = 40  # per budget; 4 layers x 5 widths need few (the CLI's default is 200)
STRATEGIES = ("pyramid", "reverse_pyramid", "increasing", "decreasing")


def _config(*, method: str, bits=None, weights=None, steps: int, lr: float, warmup: int,
            init: str, tokenizer: str, seq_len: int, batch: int):
  from matquant_jax.training.config import default_config
  c = default_config()
  c.model = DEMO_MODEL
  c.init = init
  c.tokenizer = tokenizer
  c.objective.method = method
  if bits is not None:
    c.objective.bits = tuple(bits)
  if weights is not None:
    c.objective.weights = tuple(weights)
  c.data.source = "kjv"
  c.data.seq_len = seq_len
  c.data.global_batch_size = batch
  c.data.num_epochs = 0
  c.data.max_tokens = 0
  c.num_steps = steps
  c.optimizer.peak_lr = lr
  c.optimizer.warmup_steps = warmup
  c.optimizer.final_lr_fraction = 0.1
  c.optimizer.grad_clip_norm = 1.0
  c.compute_dtype = "float32"  # XLA on CPU emulates bf16 slowly; the numerics are the same
  # Scanned layers and chunked logits are for pod-scale memory; on a 4-layer CPU model the
  # scan costs a third of the step time (1.07 vs 0.80 s per MatQuant step).
  c.scan_layers = False
  c.loss_chunk_size = 0
  c.mesh.data = -1
  c.log_every_steps = max(steps // 4, 1)
  c.checkpoint_every_steps = steps
  c.keep_checkpoints = 1
  return c


def _banner(text: str) -> None:
  print(f"\n=== {text} ===", flush=True)


def _train(config, workdir: str) -> str:
  """One training stage (module-level so a spawned worker process can run it)."""
  from matquant_jax.training import trainer
  trainer.train(config, workdir)
  return workdir


def _calibrate(config, workdir: str) -> str:
  """OmniQuant calibration stage (module-level for a spawned worker process)."""
  from matquant_jax.calibration import pipeline
  pipeline.run(config, workdir)
  return workdir


def _omniquant_config(*, init: str, tokenizer: str, seq_len: int, steps: int):
  """Spec §3 OmniQuant-MatQuant on the demo model: LWC + scale-only LET, λ = (0.1, 0.1, 1)."""
  from matquant_jax.calibration.config import default_config
  c = default_config()
  c.model = DEMO_MODEL
  c.init = init
  c.tokenizer = tokenizer
  c.data.source = "kjv"
  c.data.num_samples = 32
  c.data.seq_len = seq_len
  c.calibration.batch_size = 4
  c.calibration.steps_per_block = steps
  c.calibration.lr = 2e-2  # tiny blocks converge in a few hundred steps (configs/tiny_omniquant.py)
  c.calibration.compute_dtype = "float32"
  c.log_every_steps = steps
  return c


def _stage_done(wd: pathlib.Path, method: str) -> bool:
  return (wd / "final_params").exists() and (method == "bf16" or (wd / "matquant_int8").exists())


def run(args) -> dict:
  from matquant_jax.checkpoints.matquant_checkpoint import MatQuantCheckpoint
  from matquant_jax.data.tokenizer import Tokenizer
  from matquant_jax.evaluation import plots, report, search, sweep
  from matquant_jax.models import get_config
  from matquant_jax.quant import stats
  from matquant_jax.quant.plan import PrecisionPlan
  from matquant_jax.training import trainer
  import orbax.checkpoint as ocp

  t_start = time.time()
  work = pathlib.Path(args.workdir).absolute()
  out = pathlib.Path(args.out).absolute()
  if args.fresh and work.exists():
    shutil.rmtree(work)
  work.mkdir(parents=True, exist_ok=True)
  out.mkdir(parents=True, exist_ok=True)
  common = dict(seq_len=args.seq_len, batch=args.batch)

  def stage_config(name: str, **kw):
    c = _config(**kw, **common)
    c.run_name = name
    return c

  def prepare(name: str, method: str) -> pathlib.Path | None:
    """The stage's workdir, or None when an earlier demo already finished it."""
    wd = work / name
    if _stage_done(wd, method):
      print(f"[{name}] reusing {wd}", flush=True)
      return None
    if wd.exists():
      shutil.rmtree(wd)  # a half-finished stage from an interrupted demo: redo it
    return wd

  _banner(f"1/4 tokenizer + pretraining ({args.pretrain_steps} steps, full precision)")
  pre = work / "pretrain"
  if prepare("pretrain", "bf16") is not None:
    _train(stage_config("pretrain", method="bf16", steps=args.pretrain_steps, lr=3e-3,
                        warmup=max(args.pretrain_steps // 10, 1), init="random",
                        tokenizer="train:512"), str(pre))
  qat = dict(steps=args.qat_steps, lr=args.qat_lr, warmup=max(args.qat_steps // 10, 1),
             init=f"run:{pre}", tokenizer=f"run:{pre}")
  stages = {"matquant": dict(method="matquant", weights=args.lambdas)}
  stages.update({f"baseline_int{r}": dict(method="baseline", bits=(r,)) for r in BASELINE_BITS})
  _banner(f"2/4 QAT from the pretrained model: MatQuant R = {{8, 4, 2}} and baselines at "
          f"int{', int'.join(map(str, BASELINE_BITS))} ({args.jobs} at a time)")
  todo = {name: wd for name, kw in stages.items()
          if (wd := prepare(name, kw["method"])) is not None}
  runs = {name: work / name for name in stages}
  omni = work / "omniquant_matquant"
  runs["omniquant_matquant"] = omni
  omni_todo = prepare("omniquant_matquant", "matquant") is not None
  jobs = [(_train, stage_config(name, **stages[name], **qat), str(wd)) for name, wd in todo.items()]
  if omni_todo:
    oc = _omniquant_config(init=f"run:{pre}", tokenizer=f"run:{pre}", seq_len=args.seq_len,
                           steps=args.omniquant_steps)
    oc.run_name = "omniquant_matquant"
    jobs.append((_calibrate, oc, str(omni)))
  if args.jobs <= 1:
    for fn, cfg, wd in jobs:
      fn(cfg, wd)
  elif jobs:
    # Tiny models leave a core idle during a step; two runs at a time use both. Configs are
    # built here, so the workers only import the library.
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
      for f in concurrent.futures.as_completed([pool.submit(*job) for job in jobs]):
        f.result()  # re-raise a failed stage here, naming it in its traceback

  _banner("3/4 evaluation on the held-out KJV chapters")
  config = get_config(DEMO_MODEL)
  tok = Tokenizer.from_file(pre / "tokenizer.model")
  options = sweep.EvalOptions(ppl_source="kjv", ppl_seq_len=args.seq_len,
                              ppl_max_tokens=args.eval_tokens, tasks=("kjv_verse_completion",),
                              kjv_num_examples=args.task_examples, batch_size=32)
  records = []
  final = ocp.StandardCheckpointer().restore((pre / "final_params").absolute())
  rec = sweep.plan_record("bf16", PrecisionPlan.bf16(), 16.0)
  rec.update(sweep.evaluate_params(config, final, tok, options))
  print(f"  {'bf16':>16} {'bf16':<28} log pplx {rec['log_pplx']:.4f}  task avg "
        f"{rec['task_avg']:.2f}", flush=True)
  records.append(rec)
  del final
  for r in BASELINE_BITS:
    records += sweep.evaluate_checkpoint(runs[f"baseline_int{r}"] / "matquant_int8",
                                         [f"ffn:int{r}:parent={r}" if r < 8 else "ffn:int8"],
                                         tok, method="baseline", options=options)
  records += sweep.evaluate_checkpoint(runs["baseline_int8"] / "matquant_int8",
                                       [f"ffn:int{r}" for r in MATQUANT_SLICES if r < 8], tok,
                                       method="sliced_int8", options=options)
  mq = MatQuantCheckpoint.load(runs["matquant"] / "matquant_int8")
  records += sweep.evaluate_checkpoint(mq, [f"ffn:int{r}" for r in MATQUANT_SLICES], tok,
                                       method="matquant", options=options)
  records += sweep.evaluate_checkpoint(omni / "matquant_int8", ["ffn:int8", "ffn:int4", "ffn:int2"],
                                       tok, method="omniquant_matquant", options=options)
  mix_plans = [f"ffn:{s}@{b}" for b in MIX_BUDGETS for s in STRATEGIES]
  # Mix'n'Match rows are compared by log pplx; the (chance-level) task is left out to keep the
  # demo within its time budget.
  ppl_only = dataclasses.replace(options, tasks=())
  records += sweep.evaluate_checkpoint(
      mq, mix_plans, tok, method="mix_n_match", options=ppl_only,
      label_fn=lambda p: f"{p.strategy.value}@{p.budget:g} {list(p.layer_bits(config.num_layers))}")
  # Searched on the training split's text; scored, like every row, on the held-out chapters.
  found, _ = search.run(mq, tok, SEARCH_BUDGETS, search.SearchOptions(
      source="kjv", split="train", seq_len=args.seq_len, tokens=args.search_tokens,
      max_evals=SEARCH_MAX_EVALS))
  # Table budgets get every score; the rest of the front only log pplx. A searched plan that
  # is uniform is the MatQuant slice already evaluated above: its scores are reused.
  by_plan = {rec["plan"]: rec for rec in records if rec["method"] == "matquant"}
  searched = []
  for r in found:
    bits = set(r.plan.layer_bits(config.num_layers))
    same = by_plan.get(f"ffn:int{next(iter(bits))}") if len(bits) == 1 else None
    if same is not None:
      rec = {**same, **sweep.plan_record("mix_n_match_search", r.plan, r.effective_bits)}
    else:
      (rec,) = sweep.evaluate_checkpoint(mq, [r.plan], tok, method="mix_n_match_search",
                                         options=ppl_only)
    rec["label"] = f"search@{r.budget:g} {list(r.plan.layer_bits(config.num_layers))}"
    searched.append(rec)
  records += [rec for r, rec in zip(found, searched) if r.budget in MIX_BUDGETS]
  (out / "mixnmatch_search.json").write_text(json.dumps(
      [r.to_json() | {"held_out_log_pplx": rec["log_pplx"]} for r, rec in zip(found, searched)],
      indent=2))

  _banner("4/4 tables and plots")
  paths = report.write_tables(records, out, name="table",
                              title=f"matquant_jax demo: {DEMO_MODEL} on KJV (held-out chapters)")
  print(paths["md"].read_text())
  hist = {}
  base8 = MatQuantCheckpoint.load(runs["baseline_int8"] / "matquant_int8")
  for name, ck in (("MatQuant", mq), ("Baseline int8", base8)):
    hist[name] = stats.tree_code_histograms(ck.qtensors, bits=(8, 4, 2))
  plots.plot_code_histograms(hist, out / "code_histograms.png",
                             title="FFN code histograms: MatQuant vs int8 baseline (Fig. 1c)")
  points = []
  for rec in records:
    if rec["method"] == "bf16":
      continue
    method = {"matquant": "MatQuant", "mix_n_match": "Mix'n'Match", "baseline": "Baseline",
              "mix_n_match_search": "Mix'n'Match search",
              "sliced_int8": "Sliced int8",
              "omniquant_matquant": "OmniQuant MatQuant"}[rec["method"]]
    if rec["method"] == "matquant" and rec["bits"] in (6, 3):
      method = "MatQuant-Interp."
    label = rec.get("label") or f"int{rec['bits']}"
    points.append({"method": method, "label": label.split(" ")[0],
                   "effective_bits": rec["effective_bits"], "value": rec["log_pplx"]})
  plots.plot_quality_vs_bits(points, out / "quality_vs_bits.png", metric="log_pplx",
                             title="log pplx vs effective bits per FFN parameter (Fig. 2)")
  # One checkpoint's models only: MatQuant's slices, the fixed layouts and the searched front.
  front = [p for p in points if p["method"] in ("MatQuant", "MatQuant-Interp.", "Mix'n'Match",
                                                "Mix'n'Match search")]
  front = [p for p in front if p["method"] != "Mix'n'Match search"] + [
      {"method": "Mix'n'Match search", "label": rec["label"].split(" ")[0],
       "effective_bits": rec["effective_bits"], "value": rec["log_pplx"]} for rec in searched]
  plots.plot_quality_vs_bits(front, out / "mixnmatch_front.png", metric="log_pplx",
                             title="One MatQuant checkpoint: slices, fixed Mix'n'Match layouts "
                                   "and searched plans")
  summary = {"table": str(paths["json"]), "plots": [str(out / "code_histograms.png"),
                                                    str(out / "quality_vs_bits.png"),
                                                    str(out / "mixnmatch_front.png")],
             "seconds": round(time.time() - t_start, 1)}
  (out / "demo_settings.json").write_text(json.dumps(vars(args), indent=2))
  print(json.dumps(summary), flush=True)
  return summary


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description="matquant_jax built-in demo (see module docstring).")
  ap.add_argument("--out", default="results/demo")
  ap.add_argument("--workdir", default="runs/demo")
  ap.add_argument("--pretrain_steps", type=int, default=500)
  ap.add_argument("--qat_steps", type=int, default=150)
  # Below pretraining's final LR (3e-4): QAT is a light touch on a trained model, as in the
  # paper (1e-5 on released weights); at 5e-4 it turns into continued pretraining, which
  # rewards the λ = 1 int8 baseline and hides the quantization effects (see README).
  ap.add_argument("--qat_lr", type=float, default=1e-4)
  ap.add_argument("--seq_len", type=int, default=128)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--eval_tokens", type=int, default=30_000)
  ap.add_argument("--task_examples", type=int, default=150)
  ap.add_argument("--lambdas", type=lambda t: tuple(float(x) for x in t.split(",")),
                  default=(0.1, 0.1, 1.0), help="MatQuant λ for (int8, int4, int2)")
  ap.add_argument("--jobs", type=int, default=2, help="QAT runs trained at the same time")
  ap.add_argument("--omniquant_steps", type=int, default=100,
                  help="OmniQuant calibration steps per block")
  ap.add_argument("--search_tokens", type=int, default=8192,
                  help="calibration tokens (training split) of the Mix'n'Match search")
  ap.add_argument("--fresh", action="store_true", help="discard earlier demo runs in --workdir")
  args = ap.parse_args(argv)
  run(args)
  return 0


if __name__ == "__main__":
  sys.exit(main())
