"""Evaluate slices of int8 checkpoints: one record per (method, plan), in the paper's layout.

    records = evaluate_checkpoint("runs/x/matquant_int8", ["ffn:int8", "ffn:int4", "ffn:int2"],
                                  tokenizer, method="matquant", tasks=["kjv_next_verse"])

Each checkpoint is loaded once; each plan's slice α·(S(q, r) − z) is dequantized from the
parent codes, evaluated, and dropped before the next plan, so at most one sliced copy exists
beside the int8 codes. Log perplexity and zero-shot tasks use `perplexity.py` / `zero_shot.py`.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from matquant_jax.checkpoints.matquant_checkpoint import MatQuantCheckpoint
from matquant_jax.evaluation import perplexity as ppl_lib
from matquant_jax.evaluation import zero_shot
from matquant_jax.quant.plan import PrecisionPlan, Strategy


@dataclasses.dataclass(frozen=True)
class EvalOptions:
  """What every record measures (documented defaults)."""
  ppl_source: str = "tfds:c4/en"     # 'tfds:c4/en' (validation), 'kjv', 'text:<path>'
  ppl_split: str = "validation"
  ppl_seq_len: int = 2048
  ppl_max_tokens: int | None = None
  ppl_max_documents: int | None = None
  tasks: tuple[str, ...] = ("arc_challenge", "arc_easy", "boolq", "hellaswag", "piqa",
                            "winogrande")
  task_max_examples: int | None = None
  kjv_num_examples: int = 500
  tfds_data_dir: str | None = None
  batch_size: int = 8
  dtype: Any = jnp.float32


def evaluate_params(config, params, tokenizer, options: EvalOptions) -> dict[str, Any]:
  """log pplx and task scores of one parameter tree (served with the bf16 plan)."""
  out: dict[str, Any] = {}
  if options.ppl_source:
    r = ppl_lib.log_perplexity(
        config, params, tokenizer, options.ppl_source, seq_len=options.ppl_seq_len,
        batch_size=options.batch_size, max_documents=options.ppl_max_documents,
        max_tokens=options.ppl_max_tokens, dtype=options.dtype, split=options.ppl_split,
        tfds_data_dir=options.tfds_data_dir)
    out["log_pplx"] = float(r["log_pplx"])
    out["ppl_tokens"] = int(r["tokens"])
  if options.tasks:
    res = zero_shot.evaluate_tasks(
        config, params, tokenizer, list(options.tasks), tfds_data_dir=options.tfds_data_dir,
        max_examples=options.task_max_examples, batch_size=max(options.batch_size, 8),
        dtype=options.dtype, kjv_num_examples=options.kjv_num_examples)
    out["tasks"] = {t: {k: float(v) for k, v in m.items()} for t, m in res.items()}
    out["task_avg"] = 100 * float(zero_shot.task_average(res))
  return out


def plan_record(method: str, plan: PrecisionPlan, effective_bits: float, label: str | None = None
                ) -> dict[str, Any]:
  """The identifying fields of a record."""
  uniform = plan.is_quantized and plan.strategy == Strategy.UNIFORM
  return {
      "method": method,
      "label": label,
      "plan": str(plan),
      "bits": plan.bits if uniform else (None if plan.is_quantized else 16),
      "effective_bits": float(effective_bits),
      "extra_precision": bool(plan.extra_precision),
  }


def evaluate_checkpoint(checkpoint: str | MatQuantCheckpoint, plans: Sequence[str | PrecisionPlan],
                        tokenizer, *, method: str, options: EvalOptions = EvalOptions(),
                        label_fn: Callable[[PrecisionPlan], str | None] | None = None,
                        log: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """One record per plan, all sliced from one loaded int8 checkpoint."""
  ckpt = checkpoint if isinstance(checkpoint, MatQuantCheckpoint) else MatQuantCheckpoint.load(
      checkpoint)
  plans = [p if isinstance(p, PrecisionPlan) else PrecisionPlan.parse(p) for p in plans]
  for p in plans:  # every plan is checked before any evaluation starts
    ckpt.check_plan(p)
  records = []
  for plan in plans:
    t0 = time.time()
    params = ckpt.params_for(plan, options.dtype)
    rec = plan_record(method, plan, ckpt.effective_bits(plan), label_fn(plan) if label_fn else None)
    rec.update(evaluate_params(ckpt.config, params, tokenizer, options))
    nbytes = _tree_nbytes(params)
    del params
    _collect_if_large(nbytes)
    _log_record(log, method, plan, rec, t0)
    records.append(rec)
  return records


def _log_record(log, method: str, plan, rec: dict[str, Any], t0: float) -> None:
  log(f"  {method:>16} {str(plan):<28} eff. bits {rec['effective_bits']:.3f}  " +
      (f"log pplx {rec['log_pplx']:.4f}  " if "log_pplx" in rec else "") +
      (f"task avg {rec['task_avg']:.2f}  " if "task_avg" in rec else "") +
      f"({time.time() - t0:.1f}s)")


def minmax_params(config, params, bits: int, scope: str = "ffn", dtype=jnp.float32):
  """The float model with every `scope` kernel replaced by its plain per-channel MinMax(r)
  quantization, dequantized (Fig. 1b's "MinMax" curve: no training, no slicing)."""
  from matquant_jax.checkpoints import _common
  from matquant_jax.checkpoints.matquant_checkpoint import quantized_paths
  from matquant_jax.quant import kernels as kernels_lib
  from matquant_jax.quant.plan import Scope
  from matquant_jax.quant.qtensor import QTensor
  flat = _common.flatten_tree(params)
  for name in quantized_paths(config, Scope(scope)):
    qt = QTensor.quantize(jnp.asarray(flat[name], jnp.float32), bits,
                          kernels_lib.lookup(name).reduce_axes)
    flat[name] = qt.dequantize(dtype)
  return _common.unflatten_tree(flat)


def evaluate_minmax(config, params, tokenizer, bits: Sequence[int], *, scope: str = "ffn",
                    options: EvalOptions = EvalOptions(),
                    log: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """One "minmax" record per width: the float model under plain MinMax(r), evaluated."""
  records = []
  nbytes = _tree_nbytes(params)  # each width's MinMax tree is this size
  for r in bits:
    t0 = time.time()
    plan = PrecisionPlan.uniform(r, scope, parent_bits=r)
    rec = plan_record("minmax", plan, float(r))
    rec.update(evaluate_params(config, minmax_params(config, params, r, scope, options.dtype),
                               tokenizer, options))
    _log_record(log, "minmax", plan, rec, t0)
    records.append(rec)
    _collect_if_large(nbytes)
  return records


# A full garbage collection takes ~0.3 s once jax's tracing caches are alive (6 s of the demo
# test's 18 plans); it is only worth it to free a large dequantized tree before the next plan.
_COLLECT_BYTES = 1 << 30


def _tree_nbytes(tree) -> int:
  return sum(int(getattr(x, "nbytes", 0)) for x in jax.tree_util.tree_leaves(tree))


def _collect_if_large(nbytes: int) -> None:
  if nbytes >= _COLLECT_BYTES:
    gc.collect()
