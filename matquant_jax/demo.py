"""The built-in demo: the paper's tables and figures in miniature, from one command.

    python -m matquant_jax.demo            # or: make demo

On the bundled KJV text (train split only; the validation chapters are held out for every
score) it:
  1. trains a 512-piece tokenizer and pretrains a tiny Gemma-2-architecture model in bf16-style
     full precision (the "bf16" reference row);
  2. runs baseline QAT at int8, int6, int4, int3 and int2 (MinMax(r), trained at r), one
     MatQuant QAT run (R = {8, 4, 2}), and OmniQuant calibrations (block-wise LWC + LET,
     weights frozen): OmniQuant-MatQuant and the OmniQuant baselines at int8, int4 and int2,
     all starting from the pretrained model;
  3. exports each as an int8-format checkpoint and evaluates it as soon as it is trained (on
     CPU two stages at a time, in worker processes; on an accelerator one at a time, in this
     process, which holds its devices): the pretrained model and plain MinMax of it at
     every width (no training, Fig. 1b), every baseline at its own width, the int8
     baseline sliced to 6/4/3/2 ("Sliced int8"), MatQuant sliced to 8/6/4/3/2 (6 and 3 were
     never trained: "interpolation"), the four Mix'n'Match strategies of MatQuant, and the
     plans `python -m matquant_jax.mixnmatch` searches for the same budgets on training-split
     text ("Mix'n'Match search", also written to results/demo/mixnmatch_search.json);
  4. prints the table, writes results/demo/table.{json,md,csv} and the plots
     results/demo/code_histograms.png, quality_vs_bits.png and mixnmatch_front.png.

Scores: log perplexity on the KJV validation chapters (mean token NLL, nats) and the
`kjv_verse_completion` 4-way multiple-choice task built from the same held-out chapters. Stages
whose outputs exist in --workdir are reused (the summary's "reused"); --fresh starts over, and
--train_only trains every stage without evaluating.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import pathlib
import shutil
import sys
import time
import types
from typing import Sequence

from absl import flags

from matquant_jax import cli

DEMO_MODEL = "demo_gemma2"
BASELINE_BITS = (8, 6, 4, 3, 2)
# OmniQuant baselines (one width each, parent = r) next to OmniQuant-MatQuant, and the bf16
# model under plain MinMax (no training) at every width: Table 1's B rows and Fig. 1b.
OMNIQUANT_BASELINE_BITS = (8, 4, 2)
MINMAX_BITS = BASELINE_BITS
MATQUANT_SLICES = (8, 6, 4, 3, 2)
MIX_BUDGETS = (3.0, 5.0)
# The searched budgets (the CLI sweeps more: `python -m matquant_jax.mixnmatch --budget=...`).
SEARCH_BUDGETS = MIX_BUDGETS
SEARCH_MAX_EVALS = 24  # per budget; 4 layers x 5 widths need few (the CLI's default is 200)
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


def _omniquant_config(*, init: str, tokenizer: str, seq_len: int, steps: int,
                      method: str = "matquant", bits: tuple[int, ...] | None = None):
  """Spec §3 OmniQuant on the demo model, weights frozen, from the bf16 pretrained model:
  MatQuant (R = {8, 4, 2}, λ = (0.1, 0.1, 1)) or the baseline at one width (parent = r,
  twice the steps at int2: the paper's 20M-token int2 budget "following OmniQuant").

  OmniQuant's procedure (calibration.paper_omniquant_config): each width its own quantized
  input stream, LWC + LET with the shift δ (Eq. 4 as written); learning rates scaled up from
  OmniQuant's 1e-2 (LWC) / 5e-3 (LET) because tiny blocks get 100 steps, not 1,221.
  """
  from matquant_jax.calibration.config import default_config
  c = default_config()
  c.model = DEMO_MODEL
  c.init = init
  c.tokenizer = tokenizer
  c.objective.method = method
  if bits is not None:
    c.objective.bits = tuple(bits)
  c.data.source = "kjv"
  c.data.num_samples = 32
  c.data.seq_len = seq_len
  c.calibration.batch_size = 4
  c.calibration.steps_per_block = steps * (2 if method == "baseline" and bits == (2,) else 1)
  c.calibration.lr = 2e-2
  c.calibration.lwc_lr = 2e-2
  c.calibration.let_lr = 1e-2
  c.calibration.input_mode = "quantized"
  c.calibration.let = "scale_shift"
  c.calibration.compute_dtype = "float32"
  c.log_every_steps = c.calibration.steps_per_block
  return c


def _stage_done(wd: pathlib.Path, method: str) -> bool:
  """Whether a stage's outputs are complete: pretraining's weights, calibration's int8 export,
  or both for QAT (Orbax renames final_params into place; the export writes metadata.json last)."""
  export = "matquant_int8/metadata.json"
  need = {"bf16": ("final_params",), "calibration": (export,)}.get(method, ("final_params", export))
  return all((wd / f).exists() for f in need)


@dataclasses.dataclass(frozen=True)
class Settings:
  """What the stages measure: the module constants (and flags) at the time the demo starts,
  passed to worker processes explicitly."""
  model: str
  baseline_bits: tuple[int, ...]
  minmax_bits: tuple[int, ...]
  matquant_slices: tuple[int, ...]
  mix_budgets: tuple[float, ...]
  search_budgets: tuple[float, ...]
  search_max_evals: int
  search_tokens: int
  seq_len: int
  pretrain: str  # the pretraining workdir: tokenizer and bf16 weights


def _stage(name: str, config, workdir: str, settings: Settings, options) -> dict:
  """Trains one stage (unless `config` is None: an earlier demo finished it), then scores its
  models (unless `options` is None). Module-level so a spawned worker process can run it."""
  t0 = time.time()
  if config is not None:
    (_calibrate if name.startswith("omniquant") else _train)(config, workdir)
  out = {"name": name, "trained": config is not None, "records": [], "search": []}
  if options is not None:
    out.update(_evaluate_stage(name, pathlib.Path(workdir), settings, options))
  out["seconds"] = round(time.time() - t0, 1)
  return out


def _evaluate_stage(name: str, wd: pathlib.Path, s: Settings, options) -> dict:
  """The table's rows that come from stage `name`'s weights (held-out chapters)."""
  from matquant_jax.checkpoints.matquant_checkpoint import MatQuantCheckpoint
  from matquant_jax.data.tokenizer import Tokenizer
  from matquant_jax.evaluation import sweep
  from matquant_jax.models import get_config
  from matquant_jax.quant.plan import PrecisionPlan
  import orbax.checkpoint as ocp

  tok = Tokenizer.from_file(pathlib.Path(s.pretrain) / "tokenizer.model")
  if name == "pretrain":
    rec = sweep.plan_record("bf16", PrecisionPlan.bf16(), 16.0)
    final = ocp.StandardCheckpointer().restore((wd / "final_params").absolute())
    rec.update(sweep.evaluate_params(get_config(s.model), final, tok, options))
    print(f"  {'bf16':>16} {'bf16':<28} log pplx {rec['log_pplx']:.4f}  task avg "
          f"{rec['task_avg']:.2f}", flush=True)
    # The same weights under plain per-channel MinMax(r), no training (Fig. 1b); scored by
    # log pplx only, like the OmniQuant baselines (the task is at chance; time budget).
    return {"records": [rec] + sweep.evaluate_minmax(
        get_config(s.model), final, tok, s.minmax_bits,
        options=dataclasses.replace(options, tasks=()))}
  ckpt = MatQuantCheckpoint.load(wd / "matquant_int8")
  if name.startswith("baseline_int"):
    r = int(name[len("baseline_int"):])
    records = sweep.evaluate_checkpoint(ckpt, [PrecisionPlan.uniform(r, parent_bits=r)],
                                        tok, method="baseline", options=options)
    if r == 8:
      records += sweep.evaluate_checkpoint(ckpt, [f"ffn:int{b}" for b in s.matquant_slices
                                                  if b < 8], tok, method="sliced_int8",
                                           options=options)
    return {"records": records}
  if name.startswith("omniquant_baseline_int"):
    r = int(name[len("omniquant_baseline_int"):])
    return {"records": sweep.evaluate_checkpoint(
        ckpt, [PrecisionPlan.uniform(r, parent_bits=r)], tok,
        method="omniquant_baseline", options=dataclasses.replace(options, tasks=()))}
  if name == "omniquant_matquant":
    return {"records": sweep.evaluate_checkpoint(ckpt, ["ffn:int8", "ffn:int4", "ffn:int2"], tok,
                                                 method="omniquant_matquant", options=options)}
  return _evaluate_matquant(ckpt, tok, s, options)


def _evaluate_matquant(mq, tok, s: Settings, options) -> dict:
  """MatQuant's slices, the fixed Mix'n'Match layouts and the searched plans."""
  from matquant_jax.evaluation import search, sweep

  n = mq.config.num_layers
  records = sweep.evaluate_checkpoint(mq, [f"ffn:int{r}" for r in s.matquant_slices], tok,
                                      method="matquant", options=options)
  # Mix'n'Match rows are compared by log pplx; the (chance-level) task is left out to keep the
  # demo within its time budget.
  ppl_only = dataclasses.replace(options, tasks=())
  records += sweep.evaluate_checkpoint(
      mq, [f"ffn:{st}@{b}" for b in s.mix_budgets for st in STRATEGIES], tok,
      method="mix_n_match", options=ppl_only,
      label_fn=lambda p: f"{p.strategy.value}@{p.budget:g} {list(p.layer_bits(n))}")
  # Searched on the training split's text; scored, like every row, on the held-out chapters.
  found, _ = search.run(mq, tok, s.search_budgets, search.SearchOptions(
      source="kjv", split="train", seq_len=s.seq_len, tokens=s.search_tokens,
      max_evals=s.search_max_evals))
  # A searched plan that is uniform is the MatQuant slice evaluated above: its scores are reused.
  by_plan = {rec["plan"]: rec for rec in records if rec["method"] == "matquant"}
  swept = []
  for r in found:
    bits = set(r.plan.layer_bits(n))
    same = by_plan.get(f"ffn:int{next(iter(bits))}") if len(bits) == 1 else None
    if same is not None:
      rec = {**same, **sweep.plan_record("mix_n_match_search", r.plan, r.effective_bits)}
    else:
      (rec,) = sweep.evaluate_checkpoint(mq, [r.plan], tok, method="mix_n_match_search",
                                         options=ppl_only)
    rec["label"] = f"search@{r.budget:g} {list(r.plan.layer_bits(n))}"
    swept.append(r.to_json() | {"held_out_log_pplx": rec["log_pplx"], "record": rec})
    if r.budget in s.mix_budgets:
      records.append(rec)
  return {"records": records, "search": swept}


# The table's row order.
METHOD_ORDER = ("bf16", "minmax", "baseline", "sliced_int8", "matquant", "omniquant_baseline",
                "omniquant_matquant", "mix_n_match", "mix_n_match_search")


def _share_compilations(cache_dir: pathlib.Path) -> None:
  """One persistent XLA compilation cache for this process and the stage workers (they inherit
  the environment): every stage evaluates the same model programs, which then compile once
  (about 5 s per stage). A cache the user configured is kept."""
  import jax
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(cache_dir))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


def _stage_workers(requested: int) -> int:
  """How many stages run at once: `requested` on CPU. On an accelerator one, in this process:
  a TPU opens in one process only (a worker would fall back to the CPU), and every GPU process
  reserves most of the memory for itself."""
  if requested <= 1:
    return 1
  import jax
  backend = jax.default_backend()
  if backend == "cpu":
    return requested
  print(f"[demo] --jobs={requested}: on {backend} the stages run one at a time in this process "
        f"(worker processes cannot share its devices)", flush=True)
  return 1


def _run_stages(jobs: list[tuple], workers: int) -> list[dict]:
  """Every stage job, `workers` at a time (tiny models leave a core idle during a step).

  A failed stage stops the demo as soon as it fails (the others are cancelled; finished stages
  stay in --workdir and are reused by the next run)."""
  if workers <= 1:
    return [_stage(*job) for job in jobs]
  # Configs are built here, so the workers only import the library.
  ctx = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
    futures = {pool.submit(_stage, *job): job[0] for job in jobs}
    for f in concurrent.futures.as_completed(futures):
      if f.exception() is not None:
        for other in futures:
          other.cancel()
        raise RuntimeError(f"demo stage {futures[f]!r} failed (its traceback is above); "
                           f"rerun the demo to reuse the stages that finished") from f.exception()
    return [f.result() for f in futures]


def run(args) -> dict:
  """The demo (see the module docstring); returns the summary it prints last.

  Long: the demo's stages in the order they run (tokenizer, pretraining, QAT and OmniQuant
  stages, evaluation, report).
  """
  t_start = time.time()
  work = pathlib.Path(args.workdir).absolute()
  out = pathlib.Path(args.out).absolute()
  if args.fresh and work.exists():
    shutil.rmtree(work)
  work.mkdir(parents=True, exist_ok=True)
  _share_compilations(work / ".xla_cache")
  pre = work / "pretrain"
  s = Settings(model=DEMO_MODEL, baseline_bits=tuple(BASELINE_BITS),
               minmax_bits=tuple(MINMAX_BITS),
               matquant_slices=tuple(MATQUANT_SLICES), mix_budgets=tuple(MIX_BUDGETS),
               search_budgets=tuple(SEARCH_BUDGETS), search_max_evals=SEARCH_MAX_EVALS,
               search_tokens=args.search_tokens, seq_len=args.seq_len, pretrain=str(pre))

  def stage_config(name: str, **kw):
    c = _config(**kw, seq_len=args.seq_len, batch=args.batch)
    c.run_name = name
    return c

  def todo(name: str, method: str) -> bool:
    """Whether the stage must (re)train: an earlier demo may have finished it."""
    wd = work / name
    if _stage_done(wd, method):
      print(f"[{name}] reusing {wd}", flush=True)
      return False
    if wd.exists():
      shutil.rmtree(wd)  # a half-finished stage from an interrupted demo: redo it
    return True

  _banner(f"1/3 tokenizer + pretraining ({args.pretrain_steps} steps, full precision)")
  trained = {"pretrain": todo("pretrain", "bf16")}
  if trained["pretrain"]:
    _train(stage_config("pretrain", method="bf16", steps=args.pretrain_steps, lr=3e-3,
                        warmup=max(args.pretrain_steps // 10, 1), init="random",
                        tokenizer="train:512"), str(pre))
  qat = dict(steps=args.qat_steps, lr=args.qat_lr, warmup=max(args.qat_steps // 10, 1),
             init=f"run:{pre}", tokenizer=f"run:{pre}")
  stages = {"matquant": dict(method="matquant", weights=args.lambdas)}
  stages.update({f"baseline_int{r}": dict(method="baseline", bits=(r,)) for r in BASELINE_BITS})
  configs = {name: stage_config(name, **kw, **qat) if todo(name, kw["method"]) else None
             for name, kw in stages.items()}
  calibrations = {"omniquant_matquant": dict(method="matquant")}
  calibrations.update({f"omniquant_baseline_int{r}": dict(method="baseline", bits=(r,))
                       for r in OMNIQUANT_BASELINE_BITS})
  for name, kw in calibrations.items():
    configs[name] = None
    if todo(name, "calibration"):
      configs[name] = _omniquant_config(init=f"run:{pre}", tokenizer=f"run:{pre}",
                                        seq_len=args.seq_len, steps=args.omniquant_steps, **kw)
      configs[name].run_name = name
  # Longest first (MatQuant trains three widths and runs the search), so two workers end together.
  order = (["matquant", "omniquant_matquant"] + [n for n in stages if n != "matquant"]
           + [n for n in calibrations if n != "omniquant_matquant"])
  options = None if args.train_only else _eval_options(args)
  jobs = [(n, configs[n], str(work / n), s, options) for n in order]
  if options is not None:
    jobs.append(("pretrain", None, str(pre), s, options))
  workers = _stage_workers(args.jobs)
  _banner(f"2/3 QAT from the pretrained model (MatQuant R = {{8, 4, 2}}, baselines at "
          f"int{', int'.join(map(str, BASELINE_BITS))}), OmniQuant (MatQuant, baselines at "
          f"int{', int'.join(map(str, OMNIQUANT_BASELINE_BITS))})"
          + ("" if options is None else " and evaluation on the held-out KJV chapters")
          + f", {workers} at a time")
  results = _run_stages(jobs, workers)
  trained.update({r["name"]: r["trained"] for r in results if r["name"] != "pretrain"})
  summary = {"trained": sorted(k for k, v in trained.items() if v),
             "reused": sorted(k for k, v in trained.items() if not v),
             "stage_seconds": {r["name"]: r["seconds"] for r in results}}
  if options is not None:
    out.mkdir(parents=True, exist_ok=True)
    _banner("3/3 tables and plots")
    summary.update(_report(results, work, out, s))
    (out / "demo_settings.json").write_text(json.dumps(vars(args), indent=2))
  summary["seconds"] = round(time.time() - t_start, 1)
  print(json.dumps(summary), flush=True)
  return summary


def _eval_options(args):
  from matquant_jax.evaluation import sweep
  return sweep.EvalOptions(ppl_source="kjv", ppl_seq_len=args.seq_len,
                           ppl_max_tokens=args.eval_tokens, tasks=("kjv_verse_completion",),
                           kjv_num_examples=args.task_examples, batch_size=32)


def _report(results: list[dict], work: pathlib.Path, out: pathlib.Path, s: Settings) -> dict:
  """Writes the table (JSON/MD/CSV), the search sweep and the three plots."""
  from matquant_jax.checkpoints.matquant_checkpoint import MatQuantCheckpoint
  from matquant_jax.evaluation import plots, report
  from matquant_jax.quant import stats

  records = sorted((rec for r in results for rec in r["records"]),
                   key=lambda rec: METHOD_ORDER.index(rec["method"]))  # stable within a method
  swept = [sw for r in results for sw in r["search"]]
  (out / "mixnmatch_search.json").write_text(json.dumps(
      [{k: v for k, v in sw.items() if k != "record"} for sw in swept], indent=2))
  paths = report.write_tables(records, out, name="table",
                              title=f"matquant_jax demo: {s.model} on KJV (held-out chapters)")
  print(paths["md"].read_text())
  hist = {name: stats.tree_code_histograms(MatQuantCheckpoint.load(
      work / run / "matquant_int8").qtensors, bits=(8, 4, 2))
          for name, run in (("MatQuant", "matquant"), ("Baseline int8", "baseline_int8"))}
  plots.plot_code_histograms(hist, out / "code_histograms.png",
                             title="FFN code histograms: MatQuant vs int8 baseline (Fig. 1c)")
  points = [_point(rec) for rec in records if rec["method"] != "bf16"]
  plots.plot_quality_vs_bits(points, out / "quality_vs_bits.png", metric="log_pplx",
                             title="log pplx vs effective bits per FFN parameter (Fig. 2)")
  # One checkpoint's models only: MatQuant's slices, the fixed layouts and the searched front.
  front = [p for p in points if p["method"] in ("MatQuant", "MatQuant-Interp.", "Mix'n'Match")]
  front += [_point(sw["record"]) for sw in swept]
  plots.plot_quality_vs_bits(front, out / "mixnmatch_front.png", metric="log_pplx",
                             title="One MatQuant checkpoint: slices, fixed Mix'n'Match layouts "
                                   "and searched plans")
  return {"table": str(paths["json"]),
          "plots": [str(out / f) for f in ("code_histograms.png", "quality_vs_bits.png",
                                           "mixnmatch_front.png")]}


_LEGEND = {"matquant": "MatQuant", "mix_n_match": "Mix'n'Match", "baseline": "Baseline",
           "mix_n_match_search": "Mix'n'Match search", "sliced_int8": "Sliced int8",
           "omniquant_matquant": "OmniQuant MatQuant", "minmax": "MinMax",
           "omniquant_baseline": "OmniQuant Baseline"}


def _point(rec: dict) -> dict:
  """A record as a point of the quality-vs-bits plots."""
  method = _LEGEND[rec["method"]]
  if rec["method"] == "matquant" and rec["bits"] in (6, 3):
    method = "MatQuant-Interp."
  label = rec.get("label") or f"int{rec['bits']}"
  return {"method": method, "label": label.split(" ")[0], "effective_bits": rec["effective_bits"],
          "value": rec["log_pplx"]}


FLAGS = flags.FlagValues()
_F = dict(flag_values=FLAGS)
flags.DEFINE_string("out", "results/demo", "Where the table, plots and JSON go.", **_F)
flags.DEFINE_string("workdir", "runs/demo", "Where the stages train (reused when finished).",
                    **_F)
flags.DEFINE_integer("pretrain_steps", 400, "Full-precision pretraining steps.", **_F)
flags.DEFINE_integer("qat_steps", 64, "QAT steps of each quantized stage.", **_F)
# Below pretraining's final LR (3e-4): QAT is a light touch on a trained model, as in the
# paper (1e-5 on released weights); at 5e-4 it turns into continued pretraining, which
# rewards the λ = 1 int8 baseline and hides the quantization effects (see README).
flags.DEFINE_float("qat_lr", 1e-4, "QAT peak learning rate.", **_F)
flags.DEFINE_integer("seq_len", 128, "Training and evaluation sequence length.", **_F)
flags.DEFINE_integer("batch", 16, "Training batch size.", **_F)
flags.DEFINE_integer("eval_tokens", 16_000, "Held-out tokens of the log-perplexity rows.", **_F)
flags.DEFINE_integer("task_examples", 150, "Examples of the KJV verse-completion task.", **_F)
flags.DEFINE_list("lambdas", ["0.1", "0.1", "1.0"], "MatQuant λ for (int8, int4, int2).", **_F)
flags.DEFINE_integer("jobs", 2, "Stages trained at the same time, in worker processes (on CPU; "
                     "on an accelerator they run one at a time).", **_F)
flags.DEFINE_integer("omniquant_steps", 100, "OmniQuant calibration steps per block.", **_F)
flags.DEFINE_integer("search_tokens", 8192, "Calibration tokens (training split) of the "
                     "Mix'n'Match search.", **_F)
flags.DEFINE_bool("fresh", False, "Discard earlier demo runs in --workdir.", **_F)
flags.DEFINE_bool("train_only", False, "Train (or reuse) every stage and stop: no evaluation, "
                  "no table.", **_F)


def main(argv: Sequence[str] | None = None) -> int:
  cli.parse_flags(FLAGS, argv, "demo")
  args = types.SimpleNamespace(**FLAGS.flag_values_dict())
  try:
    args.lambdas = tuple(float(x) for x in args.lambdas)
  except ValueError:
    cli.fail("demo", f"--lambdas={','.join(args.lambdas)}: give three numbers, e.g. 0.1,0.1,1.0")
  cli.check_minimums("demo", args, dict.fromkeys(
      ("pretrain_steps", "qat_steps", "seq_len", "batch", "eval_tokens", "task_examples", "jobs",
       "omniquant_steps", "search_tokens"), 1))
  if len(args.lambdas) != 3:
    cli.fail("demo", f"--lambdas needs three weights (int8, int4, int2), got {args.lambdas}.")
  run(args)
  return 0


if __name__ == "__main__":
  sys.exit(main())
