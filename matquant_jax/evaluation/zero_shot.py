"""Zero-shot multiple-choice evaluation by log-likelihood (lm-eval-harness style).

    results = evaluate_tasks(config, params, tokenizer, PAPER_TASKS + ("kjv_next_verse",),
                             plan="ffn:int2", tfds_data_dir="~/tensorflow_datasets")
    results["piqa"]          # {'acc': 0.78, 'acc_norm': 0.79, 'n': 1838, 'skipped': 0}
    task_average(results)    # the paper's "Task Avg." (as a fraction) over the tasks given

Scoring (lm-eval-harness v0.4 `loglikelihood` requests):

- A request is (context, continuation). Trailing spaces of the context move to the start of
  the continuation; the ids are `ctx = encode(context)` and `cont = encode(context +
  continuation)[len(ctx):]` (lm-eval's `_encode_pair`: tokenizing the pair as one string keeps
  the tokenizer's merges at the seam, e.g. a SentencePiece dummy prefix is not inserted before
  the continuation), with BOS in front of the context (Gemma's evaluation adds it; so do we for
  every model, `add_bos`).
- Its log-likelihood is sum_t log p(cont_t | ctx, cont_<t) over the continuation tokens, from
  one causal forward pass over ctx + cont[:-1]. A sequence longer than `max_seq_len` + 1
  tokens keeps its last tokens (the context is cut on the left, as lm-eval does).
- An item's choices are scored independently; acc = [argmax_i ll_i == gold], acc_norm =
  [argmax_i ll_i / bytes_i == gold] with bytes_i the UTF-8 length of choice i (lm-eval divides
  by `len(choice)` in characters, identical for the ASCII text of these tasks). Ties go to the
  first choice (np.argmax).

Batching: all requests of all tasks asked for are tokenized, sorted by length (longest first)
and cut into batches of `batch_size` rows; each batch is right-padded to a length bucket (a
power of two >= 32, capped at `max_seq_len`), so the program compiles once per bucket, not
once per batch. Padding rows and tokens carry segment id 0 and never reach a real token's
attention. The batch is sharded over all devices when batch_size divides by the device count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import functools
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from matquant_jax.evaluation import perplexity
from matquant_jax.evaluation import tasks as tasks_lib
from matquant_jax.models.config import TransformerConfig
from matquant_jax.models.transformer import positions_from_segments
from matquant_jax.quant.plan import PrecisionPlan

Dtype = Any
Params = Any
Forward = perplexity.Forward

MIN_BUCKET = 32
METRICS = ("acc", "acc_norm")


# Tokenization ----------------------------------------------------------------------------------


def encode_pair(tokenizer: Any, context: str, continuation: str, *,
                add_bos: bool = True) -> tuple[list[int], list[int]]:
  """Token ids of (context, continuation) as lm-eval encodes them (module docstring).

  Returns:
    (context ids, starting with BOS when add_bos; continuation ids).
  """
  n_spaces = len(context) - len(context.rstrip())
  if n_spaces:
    continuation = context[-n_spaces:] + continuation
    context = context[:-n_spaces]
  ctx = list(tokenizer.encode(context, add_bos=add_bos, add_eos=False))
  whole = list(tokenizer.encode(context + continuation, add_bos=add_bos, add_eos=False))
  return ctx, whole[len(ctx):]


# Scoring ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _loglik_program(forward: Forward):
  """jit((params, tokens, targets, segment_ids, mask) -> [B] summed log p over mask)."""

  def run(params, tokens, targets, segment_ids, mask):
    logits = forward(params, tokens, positions_from_segments(segment_ids), segment_ids)
    logp = perplexity.target_log_probs(logits, targets)
    return jnp.sum(jnp.where(mask, logp, 0.0), axis=-1)

  return jax.jit(run)


def _bucket(length: int, max_len: int) -> int:
  return min(max(MIN_BUCKET, 1 << max(0, math.ceil(math.log2(max(length, 1))))), max_len)


def score_requests(
    config: TransformerConfig,
    params: Params,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    plan: PrecisionPlan | str | None = None,
    batch_size: int = 32,
    dtype: Dtype = jnp.float32,
    max_seq_len: int = 2048,
    pad_id: int = 0,
    forward: Forward | None = None,
) -> np.ndarray:
  """Log-likelihood of each continuation given its context, from token ids.

  Args:
    config: the architecture (its vocab_size bounds the ids).
    params: the parameter tree (no 'params' level).
    requests: [N] pairs (context ids, non-empty and starting with BOS; continuation ids).
    plan: precision plan or its string form; None = bf16.
    batch_size: rows per forward pass (a multiple of the device count shards them).
    dtype: compute dtype.
    max_seq_len: longest forward pass; longer pairs lose context tokens on the left.
    pad_id: id on padding (never scored).
    forward: replaces the Transformer: forward(params, tokens [B, L], positions [B, L],
      segment_ids [B, L]) -> logits [B, L, V]. For other models and for tests.

  Returns:
    [N] float64 sums of log p over each continuation's tokens (0.0 for an empty one).
  """
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
  if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2:
    raise ValueError(f"max_seq_len must be an integer >= 2, got {max_seq_len!r}.")
  if forward is None:
    forward = perplexity.model_forward(config, perplexity.as_plan(plan), dtype)
  fn = _loglik_program(forward)
  params = perplexity.place_params(params)

  rows = []  # (full ids [n], number of scored targets)
  for i, (ctx, cont) in enumerate(requests):
    ctx, cont = list(ctx), list(cont)
    if not ctx:
      raise ValueError(f"request {i} has an empty context: start every context with BOS, so "
                       f"the first continuation token has something to be predicted from.")
    full = (ctx + cont)[-(max_seq_len + 1):]
    rows.append((np.asarray(full, np.int64), min(len(cont), len(full) - 1)))
  if rows:
    top = max(int(r.max()) for r, _ in rows)
    if top >= config.vocab_size or min(int(r.min()) for r, _ in rows) < 0:
      raise ValueError(f"token ids reach {top} but the model's vocabulary is "
                       f"[0, {config.vocab_size}): the tokenizer does not belong to this model.")

  order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
  outputs = []
  for start in range(0, len(order), batch_size):
    idx = order[start:start + batch_size]
    length = _bucket(max(len(rows[i][0]) - 1 for i in idx), max_seq_len)
    tokens = np.full((batch_size, length), pad_id, np.int32)
    targets = np.zeros((batch_size, length), np.int32)
    segments = np.zeros((batch_size, length), np.int32)
    mask = np.zeros((batch_size, length), bool)
    for b, i in enumerate(idx):
      full, n_cont = rows[i]
      n = len(full) - 1
      tokens[b, :n] = full[:-1]
      targets[b, :n] = full[1:]
      segments[b, :n] = 1
      mask[b, n - n_cont:n] = True
    placed = perplexity.put_batch(
        {"tokens": tokens, "targets": targets, "segments": segments, "mask": mask})
    # Kept on device until the end: the host prepares the next batch while this one runs.
    outputs.append((idx, fn(params, placed["tokens"], placed["targets"], placed["segments"],
                            placed["mask"])))
  result = np.zeros(len(rows), np.float64)
  for idx, out in outputs:
    result[idx] = np.asarray(out, np.float64)[:len(idx)]
  return result


def loglikelihoods(config: TransformerConfig, params: Params, tokenizer: Any,
                   pairs: Sequence[tuple[str, str]], *, add_bos: bool = True,
                   **kwargs) -> np.ndarray:
  """[N] log-likelihoods of text (context, continuation) pairs; kwargs as `score_requests`."""
  requests = [encode_pair(tokenizer, c, x, add_bos=add_bos) for c, x in pairs]
  kwargs.setdefault("pad_id", int(getattr(tokenizer, "pad_id", 0)))
  return score_requests(config, params, requests, **kwargs)


def choice_metrics(examples: Sequence[tasks_lib.MultipleChoice],
                   logliks: Sequence[np.ndarray]) -> dict[str, float | int]:
  """acc and acc_norm of items given each item's [num_choices] log-likelihoods."""
  if len(examples) != len(logliks):
    raise ValueError(f"{len(examples)} examples but {len(logliks)} score arrays.")
  if not examples:
    return {"acc": float("nan"), "acc_norm": float("nan"), "n": 0}
  acc = acc_norm = 0
  for ex, ll in zip(examples, logliks):
    ll = np.asarray(ll, np.float64)
    acc += int(np.argmax(ll) == ex.label)
    acc_norm += int(np.argmax(ll / np.asarray(ex.norm_lengths, np.float64)) == ex.label)
  n = len(examples)
  return {"acc": acc / n, "acc_norm": acc_norm / n, "n": n}


def _example_requests(tokenizer, examples, add_bos):
  requests, sizes = [], []
  for ex in examples:
    for context, continuation in zip(ex.contexts, ex.continuations):
      requests.append(encode_pair(tokenizer, context, continuation, add_bos=add_bos))
    sizes.append(len(ex.choices))
  return requests, sizes


def _split(scores: np.ndarray, sizes: Sequence[int]) -> list[np.ndarray]:
  return np.split(scores, np.cumsum(sizes)[:-1]) if sizes else []


def evaluate_examples(config: TransformerConfig, params: Params, tokenizer: Any,
                      examples: Sequence[tasks_lib.MultipleChoice], *, add_bos: bool = True,
                      **kwargs) -> dict[str, float | int]:
  """{'acc', 'acc_norm', 'n'} of items; kwargs as `score_requests` (plan, batch_size, ...)."""
  requests, sizes = _example_requests(tokenizer, examples, add_bos)
  kwargs.setdefault("pad_id", int(getattr(tokenizer, "pad_id", 0)))
  scores = score_requests(config, params, requests, **kwargs)
  return choice_metrics(examples, _split(scores, sizes))


def evaluate_tasks(
    config: TransformerConfig,
    params: Params,
    tokenizer: Any,
    task_names: str | Sequence[str],
    *,
    plan: PrecisionPlan | str | None = None,
    tfds_data_dir: str | None = None,
    max_examples: int | None = None,
    batch_size: int = 32,
    dtype: Dtype = jnp.float32,
    max_seq_len: int = 2048,
    kjv_num_examples: int = 500,
    seed: int = 0,
    add_bos: bool = True,
    forward: Forward | None = None,
) -> dict[str, dict[str, float | int]]:
  """Zero-shot acc and acc_norm of `Transformer(config, plan, dtype)` on registered tasks.

  Every dataset is read before any scoring, so a missing one fails fast; then the requests of
  all tasks are scored together in bucketed batches.

  Args:
    config: the architecture.
    params: the parameter tree (no 'params' level).
    tokenizer: the model's tokenizer (`encode(text, add_bos=, add_eos=)`, `pad_id`).
    task_names: a name or names from `tasks.TASKS`.
    plan: precision plan or its string form; None = bf16.
    tfds_data_dir: where the TFDS datasets are prepared (None = TFDS's default).
    max_examples: the first N items of each task (None = the full split).
    batch_size: rows per forward pass.
    dtype: compute dtype.
    max_seq_len: longest forward pass (longer prompts are cut on the left).
    kjv_num_examples: items of kjv_next_verse; seed: its construction seed.
    add_bos: BOS before every context.
    forward: replaces the Transformer forward (see `score_requests`).

  Returns:
    {task: {'acc', 'acc_norm', 'n', 'skipped'}} in the order asked; accuracies are fractions.

  Raises:
    ValueError: an unknown task name (with the closest match).
    FileNotFoundError: a TFDS dataset that is not prepared (with the `tfds build` command).
  """
  names = [task_names] if isinstance(task_names, str) else list(task_names)
  if not names:
    raise ValueError("evaluate_tasks: no task names given; choose from "
                     f"{', '.join(tasks_lib.TASKS)}.")
  for name in names:
    tasks_lib.get_task(name)
  data = [tasks_lib.load_task(n, tfds_data_dir=tfds_data_dir, max_examples=max_examples,
                              kjv_num_examples=kjv_num_examples, seed=seed) for n in names]
  requests, per_task = [], []
  for d in data:
    reqs, sizes = _example_requests(tokenizer, d.examples, add_bos)
    requests.extend(reqs)
    per_task.append(sizes)
  scores = score_requests(config, params, requests, plan=plan, batch_size=batch_size,
                          dtype=dtype, max_seq_len=max_seq_len,
                          pad_id=int(getattr(tokenizer, "pad_id", 0)), forward=forward)
  results, offset = {}, 0
  for d, sizes in zip(data, per_task):
    count = int(sum(sizes))
    metrics = choice_metrics(d.examples, _split(scores[offset:offset + count], sizes))
    offset += count
    metrics["skipped"] = d.skipped
    results[d.name] = metrics
    logging.info("zero-shot %s (plan %s): acc %.4f acc_norm %.4f over %d items", d.name,
                 perplexity.as_plan(plan), metrics["acc"], metrics["acc_norm"], metrics["n"])
  return results


def task_average(results: Mapping[str, Mapping[str, float]],
                 metric_choice: str | Mapping[str, str] = "default") -> float:
  """Unweighted mean accuracy over the tasks in `results` (spec §8's "Task Avg.").

  Args:
    results: `evaluate_tasks`'s output (or any {task: {'acc', 'acc_norm'}}).
    metric_choice: 'default' (each task's `TaskSpec.metric`: acc_norm for ARC-c, ARC-e,
      HellaSwag, PIQA and kjv_next_verse, acc for BoolQ and Winogrande; acc for unregistered
      names), 'acc' or 'acc_norm' for every task, or a {task: metric} mapping (missing tasks
      use the default).

  Returns:
    The mean, a fraction in [0, 1] (the paper prints percentages).
  """
  if not results:
    raise ValueError("task_average: no task results.")
  values = []
  for name, metrics in results.items():
    if isinstance(metric_choice, Mapping):
      metric = metric_choice.get(name) or _default_metric(name)
    elif metric_choice == "default":
      metric = _default_metric(name)
    else:
      metric = metric_choice
    if metric not in METRICS:
      raise ValueError(f"unknown metric {metric!r} for task {name!r}; use 'acc' or "
                       f"'acc_norm' (or metric_choice='default').")
    values.append(float(metrics[metric]))
  return float(np.mean(values))


def _default_metric(name: str) -> str:
  spec = tasks_lib.TASKS.get(name)
  return spec.metric if spec else "acc"
