"""Log-perplexity of a model on held-out text (the paper's C4 "log pplx", spec §8).

    result = log_perplexity(config, params, tokenizer, "tfds:c4/en", plan="ffn:int4",
                            seq_len=2048, batch_size=8, max_documents=2000)
    result["log_pplx"]   # mean next-token NLL in nats, lower is better
    result["tokens"]     # number of predicted tokens it averages over

The model is `Transformer(config, plan, dtype)` applied to `params`; for a MatQuant checkpoint
pass `ckpt.params_for(plan)` (the dequantized slice) with the bf16 plan, or the int8 params
with the slicing plan: this module does not care which.

Protocol (the paper states none, spec §8/§11; these are our documented choices):

- Source: 'tfds:c4/en' (split 'validation'; C4 has no public test split), 'kjv' (the bundled
  corpus's validation chapters), 'text:<path>[,<path>]' (every 20th blank-line-separated block
  is validation; pass split='all' to read whole files), or an in-memory sequence of documents.
  Documents are read in order (no shuffling), so a prefix (`max_documents`, `max_tokens`) is
  the same sample on every run and for every plan.
- Tokens: each document is encoded with BOS and EOS (`add_bos`, `add_eos`), as the training
  pipeline does, so the number matches the trainer's eval loss.
- Packing: the data pipeline's concat-then-split packing (`lm_packing.Packer`): documents are
  laid end to end and cut every `seq_len` tokens, with segment ids so attention never crosses
  documents and positions restarting at 0 in every piece. A document longer than what is left
  of a row continues (without its earlier context) at the start of the next row and loses the
  one prediction at the cut; targets across document boundaries are masked out.
- Metric: sum of NLL over every predicted token / number of predicted tokens (loss mask 1),
  accumulated exactly over the whole sample (not a mean of per-batch means). A document of n
  tokens that is not cut contributes n - 1 predictions.
- `max_documents` reads the first N documents; `max_tokens` stops after the first N tokens of
  the packed stream (padding not counted; the document it cuts is evaluated up to the cut).

Execution: one jitted program per (config, plan, dtype) and batch shape, reused across batches
and calls; every batch has the same [batch_size, seq_len] shape (the last one is padded with
empty rows). On several devices the batch is sharded over all of them along its first axis,
padded with empty rows to a multiple of the device count when batch_size does not divide
(`put_batch`); params that are not already laid out over those devices are replicated.
Single-host only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
import functools
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from matquant_jax.data import lm_packing
from matquant_jax.data import sources
from matquant_jax.models.config import TransformerConfig
from matquant_jax.models.transformer import Transformer
from matquant_jax.quant.plan import PrecisionPlan

Dtype = Any
Params = Any
# forward(params, tokens [B, T], positions [B, T], segment_ids [B, T]) -> logits [B, T, V].
Forward = Callable[[Params, jax.Array, jax.Array, jax.Array], jax.Array]

_TOKENIZE_CHUNK = 64  # documents per batched tokenizer call


# Plans, forwards and device placement (shared with zero_shot.py) ------------------------------


def as_plan(plan: PrecisionPlan | str | None) -> PrecisionPlan:
  """A PrecisionPlan from itself, its string form ('ffn:int4') or None (the bf16 plan)."""
  if plan is None:
    return PrecisionPlan.bf16()
  if isinstance(plan, str):
    return PrecisionPlan.parse(plan)
  if not isinstance(plan, PrecisionPlan):
    raise TypeError(f"plan must be a PrecisionPlan, its string form or None, got "
                    f"{type(plan).__name__}.")
  return plan


@functools.lru_cache(maxsize=64)
def model_forward(config: TransformerConfig, plan: PrecisionPlan,
                  dtype: Dtype = jnp.float32) -> Forward:
  """The Transformer forward of (config, plan, dtype) as a `Forward` function.

  Cached, so the same arguments give the same function object, and the jitted programs built
  on it (keyed by that object) are built and compiled once.
  """
  model = Transformer(config, plan=plan, dtype=dtype)

  def forward(params, tokens, positions, segment_ids):
    return model.apply({"params": params}, tokens, positions=positions,
                       segment_ids=segment_ids)

  return forward


def target_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log p(targets) under `logits`, in float32.

  Args:
    logits: [..., V] unnormalised scores.
    targets: [...] int ids in [0, V).

  Returns:
    [...] float32: logits[target] - logsumexp(logits) (never materialises log_softmax).
  """
  logits = logits.astype(jnp.float32)
  picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return picked - jax.nn.logsumexp(logits, axis=-1)


@functools.lru_cache(maxsize=64)
def _nll_program(forward: Forward):
  """jit((params, inputs, targets, positions, segment_ids, loss_mask) -> (sum NLL, count))."""

  def run(params, inputs, targets, positions, segment_ids, loss_mask):
    logits = forward(params, inputs, positions, segment_ids)
    mask = loss_mask.astype(jnp.float32)
    nll = -target_log_probs(logits, targets)
    # Masked-out targets may be padding ids; `where` keeps a stray inf/nan there out of the sum.
    return jnp.sum(jnp.where(mask > 0, nll * mask, 0.0)), jnp.sum(mask)

  return jax.jit(run)


@functools.lru_cache(maxsize=8)
def _mesh(devices: tuple[jax.Device, ...]) -> jax.sharding.Mesh:
  return jax.sharding.Mesh(np.asarray(devices), ("data",))


def data_mesh() -> jax.sharding.Mesh:
  """A 1-D mesh ('data',) over every device."""
  return _mesh(tuple(jax.devices()))


def batch_sharding(batch_size: int) -> jax.sharding.NamedSharding:
  """Shards the leading (batch) axis over all devices when it divides, else replicates."""
  mesh = data_mesh()
  if batch_size % mesh.size == 0:
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def put_batch(arrays: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
  """Places host arrays ([batch, ...] each) sharded over all devices, padding the batch.

  A batch the device count does not divide gets zero rows appended up to the next multiple
  (zero is every evaluation's "not scored": loss_mask 0, segment 0), so each device computes
  its share, not the whole batch: a batch of 4 on 8 devices, replicated, made every device run
  all 4 rows. Per-row outputs then have the padded length; callers keep the first rows.
  """
  n = next(iter(arrays.values())).shape[0]
  devices = data_mesh().size
  padded = -(-n // devices) * devices
  sharding = batch_sharding(padded)

  def pad(v):
    v = np.asarray(v)
    return v if padded == n else np.concatenate([v, np.zeros((padded - n,) + v.shape[1:],
                                                             v.dtype)])

  return {k: jax.device_put(pad(v), sharding) for k, v in arrays.items()}


def place_params(params: Params) -> Params:
  """Leaves already laid out over all devices stay put; every other leaf is replicated.

  Params sharded by the caller (FSDP, tensor parallel) over the same devices are used as they
  are; host arrays and single-device arrays are copied to every device, so the jitted program
  sees one device set whatever the batch sharding.
  """
  mesh = data_mesh()
  devices = set(mesh.devices.flat)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def place(x):
    if isinstance(x, jax.Array) and set(x.sharding.device_set) == devices:
      return x
    return jax.device_put(x, replicated)

  return jax.tree_util.tree_map(place, params)


# Low level -------------------------------------------------------------------------------------


def token_nll(config: TransformerConfig, params: Params, plan: PrecisionPlan | str | None,
              batch: Mapping[str, Any], *, dtype: Dtype = jnp.float32
              ) -> tuple[jax.Array, jax.Array]:
  """Summed next-token NLL and number of predicted tokens of one packed batch.

  Args:
    config: the architecture.
    params: the parameter tree (no 'params' level).
    plan: the precision plan (None = bf16).
    batch: the LM pipeline's batch: inputs, targets, segment_ids, positions [B, T] int and
      loss_mask [B, T] (1 where targets is a real next token).
    dtype: compute dtype.

  Returns:
    (sum of -log p(target) over loss_mask, sum of loss_mask): float32 scalars on device, so a
    loop can keep dispatching batches and read them back once.
  """
  fn = _nll_program(model_forward(config, as_plan(plan), dtype))
  host = {k: np.asarray(batch[k]) for k in lm_packing.FEATURES}
  _check_ids(host["inputs"], config.vocab_size)
  placed = put_batch(host)
  return fn(place_params(params), placed["inputs"], placed["targets"], placed["positions"],
            placed["segment_ids"], placed["loss_mask"])


def _check_ids(ids: np.ndarray, vocab_size: int) -> None:
  if ids.size and (ids.max() >= vocab_size or ids.min() < 0):
    raise ValueError(
        f"token ids span [{ids.min()}, {ids.max()}] but the model's vocabulary is "
        f"[0, {vocab_size}): the tokenizer does not belong to this model.")


# Documents -------------------------------------------------------------------------------------


def _documents(source: str | Sequence[str], split: str, tfds_data_dir, tfds_text_key: str,
               text_doc_separator: str) -> tuple[Sequence[str], str]:
  if isinstance(source, str):
    docs = sources.make_source(source, split, tfds_data_dir=tfds_data_dir,
                               tfds_text_key=tfds_text_key,
                               text_doc_separator=text_doc_separator)
    return docs, f"{source}[{split}]"
  if not isinstance(source, Sequence) or isinstance(source, bytes):
    raise TypeError(f"source must be a source string ('tfds:c4/en', 'kjv', 'text:<path>') or "
                    f"a sequence of document strings, got {type(source).__name__}.")
  return source, getattr(source, "name", "documents")


def _encode_all(tokenizer, texts: list[str], add_bos: bool, add_eos: bool) -> list[list[int]]:
  # matquant_jax's Tokenizer encodes a list in one call (much faster than one by one).
  try:
    out = tokenizer.encode(texts, add_bos=add_bos, add_eos=add_eos)
    if len(out) == len(texts) and all(isinstance(o, list) for o in out):
      return out
  except (TypeError, AttributeError):
    pass
  return [list(tokenizer.encode(t, add_bos=add_bos, add_eos=add_eos)) for t in texts]


def _token_stream(docs: Sequence[str], count: int, tokenizer, add_bos: bool, add_eos: bool,
                  counter: list[int]) -> Iterator[np.ndarray]:
  for start in range(0, count, _TOKENIZE_CHUNK):
    texts = [docs[i] for i in range(start, min(start + _TOKENIZE_CHUNK, count))]
    for t in texts:
      if not isinstance(t, str):
        raise TypeError(f"documents must be strings, got {type(t).__name__}.")
    for ids in _encode_all(tokenizer, texts, add_bos, add_eos):
      counter[0] += 1
      yield np.asarray(ids, np.int32)


# Log-perplexity --------------------------------------------------------------------------------


def log_perplexity(
    config: TransformerConfig,
    params: Params,
    tokenizer: Any,
    source: str | Sequence[str],
    *,
    plan: PrecisionPlan | str | None = None,
    seq_len: int = 2048,
    batch_size: int = 8,
    max_documents: int | None = None,
    max_tokens: int | None = None,
    dtype: Dtype = jnp.float32,
    split: str = "validation",
    tfds_data_dir: str | None = None,
    tfds_text_key: str = "text",
    text_doc_separator: str = "blank_line",
    add_bos: bool = True,
    add_eos: bool = True,
) -> dict[str, Any]:
  """Mean next-token NLL (nats) of `Transformer(config, plan, dtype)` on held-out documents.

  Args:
    config: the architecture.
    params: the parameter tree (no 'params' level).
    tokenizer: has `encode(text, add_bos=, add_eos=)` and `pad_id` (`matquant_jax.data.
      Tokenizer`).
    source: 'tfds:c4/en', 'kjv', 'text:<path>[,<path>]', or a sequence of document strings.
    plan: precision plan or its string form; None = bf16.
    seq_len: T, tokens per packed row (the evaluation context length).
    batch_size: rows per forward pass (a multiple of the device count shards them).
    max_documents: evaluate only the first N documents; None = all of the split.
    max_tokens: stop after the first N tokens of the packed stream; None = no limit.
    dtype: compute dtype (float32 or bfloat16).
    split: split of a source string: 'validation' (default; kjv/text hold out every 20th
      document, c4 has a 'validation' split), 'train', 'all' (kjv/text) or any TFDS split.
    tfds_data_dir: TFDS data dir of 'tfds:' sources (None = TFDS's default); never downloads.
    tfds_text_key: the text feature of 'tfds:' sources.
    text_doc_separator: documents of 'text:' files: 'blank_line', 'line' or 'file'.
    add_bos, add_eos: BOS / EOS around every document.

  Returns:
    {'log_pplx': sum NLL / tokens, 'tokens': predicted tokens, 'documents': documents read,
     'rows': packed rows, 'seq_len', 'source'}.

  Raises:
    ValueError: bad sizes, an empty sample, token ids outside the model's vocabulary.
    FileNotFoundError: a missing corpus, text file or TFDS dataset (with the fix).
  """
  for name, value, minimum in (("seq_len", seq_len, 2), ("batch_size", batch_size, 1)):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
      raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
  for name, value in (("max_documents", max_documents), ("max_tokens", max_tokens)):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
      raise ValueError(f"{name} must be a positive integer or None, got {value!r}.")
  docs, name = _documents(source, split, tfds_data_dir, tfds_text_key, text_doc_separator)
  count = len(docs) if max_documents is None else min(len(docs), max_documents)
  if count == 0:
    raise ValueError(f"log_perplexity: source {name} has no documents.")

  fn = _nll_program(model_forward(config, as_plan(plan), dtype))
  params = place_params(params)
  read, rows = [0], [0]
  sums = []
  for batch in _packed_batches(docs, count, tokenizer, seq_len, batch_size, max_tokens,
                               add_bos, add_eos, read, rows):
    _check_ids(batch["inputs"], config.vocab_size)
    placed = put_batch(batch)
    # Device scalars: reading them back only at the end lets tokenization overlap compute.
    sums.append(fn(params, placed["inputs"], placed["targets"], placed["positions"],
                   placed["segment_ids"], placed["loss_mask"]))
  totals = np.asarray(jax.device_get(sums), np.float64).reshape(-1, 2) if sums else np.zeros((0, 2))
  nll, tokens = totals.sum(axis=0) if len(totals) else (0.0, 0.0)
  if tokens == 0:
    raise ValueError(f"log_perplexity: no predicted tokens in {name} (documents of one token, "
                     f"or max_tokens={max_tokens} too small).")
  return {"log_pplx": float(nll / tokens), "tokens": int(round(tokens)), "documents": read[0],
          "rows": rows[0], "seq_len": seq_len, "source": name}


def _packed_batches(docs, count, tokenizer, seq_len, batch_size, max_tokens, add_bos, add_eos,
                    read: list[int], rows: list[int]) -> Iterator[dict[str, np.ndarray]]:
  """[batch_size, seq_len] packed batches of the first `count` documents (the last padded)."""
  pad_id = int(getattr(tokenizer, "pad_id", 0))
  stream = _token_stream(docs, count, tokenizer, add_bos, add_eos, read)
  packer = lm_packing.Packer(seq_len, pad_id=pad_id, max_tokens=max_tokens)
  row_iter = iter(lambda: packer.next_row(lambda: next(stream, None)), None)
  while chunk := list(itertools.islice(row_iter, batch_size)):
    rows[0] += len(chunk)
    batch = {k: np.stack([r[k] for r in chunk]) for k in lm_packing.FEATURES}
    yield lm_packing.pad_batch(batch, batch_size, pad_id)


def packed_sample(tokenizer, source: str | Sequence[str], *, split: str, seq_len: int,
                  batch_size: int, max_tokens: int, vocab_size: int,
                  tfds_data_dir: str | None = None, tfds_text_key: str = "text",
                  text_doc_separator: str = "blank_line") -> tuple[list[dict], str]:
  """The first `max_tokens` tokens of a source as packed batches, with the sample's name
  (e.g. 'kjv[train]'): the same packing, BOS/EOS and order as `log_perplexity`."""
  docs, name = _documents(source, split, tfds_data_dir, tfds_text_key, text_doc_separator)
  batches = list(_packed_batches(docs, len(docs), tokenizer, seq_len, batch_size, max_tokens,
                                 True, True, [0], [0]))
  if not batches:
    raise ValueError(f"source {name} has no documents.")
  for b in batches:
    _check_ids(b["inputs"], vocab_size)
  return batches, name
