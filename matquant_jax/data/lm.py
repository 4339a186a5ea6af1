"""LM text pipeline: documents → SentencePiece tokens → packed [batch, seq] rows, with grain.

    source (random access: kjv | text files | TFDS array_record)
      → grain.MapDataset.source
      → shuffle(seed)            document order; each epoch reshuffled (seed + epoch)
      → repeat(num_epochs)       None = forever
      → [shard_index::shard_count]  this host's documents: disjoint across hosts, covering
      → map(tokenize)            BOS/EOS per document (add_bos/add_eos)
      → to_iter_dataset(ReadOptions)  threaded reads + tokenization, checkpointable
      → PackIterDataset(seq_len, max_tokens=per-host budget)   (lm_packing.py)
      → batch(global_batch_size // shard_count)  → pad the last short batch (or drop it)

Each batch is a dict of NumPy arrays:
  inputs      [B, T] int32    token ids (pad_id on padding)
  targets     [B, T] int32    next token of the same document (pad_id where masked)
  segment_ids [B, T] int32    1, 2, ... per document piece in a row; 0 = padding
  positions   [B, T] int32    0, 1, ... restarting at every piece
  loss_mask   [B, T] float32  1 where targets is a real next token
with B = global_batch_size // shard_count and T = seq_len; see lm_packing.py for the exact
rules (concat-then-split, continuation pieces, masking at document boundaries).

The iterator is a `grain.DatasetIterator`: `it.get_state()` is a small JSON-able dict, and
`it.set_state(state)` on a fresh iterator of the same config resumes with exactly the batches
the uninterrupted iterator would have produced (also `it.save(dir)` / `it.load(dir)`, and grain's
Orbax `grain.checkpoint` handler).

Token budget and multi-host: `max_tokens` is global; each host takes the first
`max_tokens // shard_count` tokens of its own shuffled stream. Rows are always full until the
stream ends, so every host produces exactly `budget_num_batches(config, shard_count)` batches
as long as its shard has that many tokens — which keeps the hosts in step. Without a budget
(`num_epochs=1`, `max_tokens=None`) shards hold different token counts and hosts may yield
different numbers of batches: bound the loop by a step count then. The sample depends on
(seed, shard_count): the same seed with another host count packs a different 100M tokens.

The paper's QAT data (spec §6: a fixed 100M-token C4 sample, batch 16, sequence 8192, one
epoch) is `DataConfig.paper_qat()`: 12,208 rows → 763 batches of 16 (the last row holds 256
tokens, the rest padding).
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import difflib
import functools
import math
from typing import Any, Protocol

import grain
import numpy as np

from matquant_jax.data import lm_packing
from matquant_jax.data import sources

_ROLES = ("train", "eval")


class TextEncoder(Protocol):
  """What the pipeline needs of a tokenizer (`matquant_jax.data.Tokenizer` has it)."""

  def encode(self, text: str, add_bos: bool | None = None, add_eos: bool = False) -> list[int]:
    ...


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """LM data configuration (also accepted as an ml_collections ConfigDict with these keys).

  Attributes:
    source: 'kjv' (bundled corpus), 'text:<path>[,<path>...]' (local text files, `.gz` ok) or
      'tfds:<name>' (e.g. 'tfds:c4/en'; array_record, read with tfds.data_source).
    tfds_data_dir: TFDS data dir; None = TFDS's default ($TFDS_DATA_DIR, ~/tensorflow_datasets).
    tfds_text_key: the TFDS text feature.
    text_doc_separator: documents of 'text:' files: 'blank_line', 'line' or 'file'.
    train_split: split read for role 'train' ('train' for kjv/text/c4).
    eval_split: split read for role 'eval' ('validation' for kjv/text/c4).
    seq_len: T, tokens per row.
    global_batch_size: rows per step over all hosts; each host yields global // shard_count.
    shuffle: shuffle documents (role 'train' only; eval is read in order).
    seed: shuffle seed, in [0, 2**32).
    num_epochs: passes over the train split; None repeats forever (eval: always 1).
    max_tokens: global token budget of role 'train' (first N tokens of the shuffled stream,
      padding not counted); None = no budget.
    eval_max_tokens: the same for role 'eval'.
    add_bos: BOS at the start of every document.
    add_eos: EOS at the end of every document.
    drop_remainder: drop the final short batch instead of padding it with empty rows.
    read_threads: grain reader threads (reading + tokenization); 0 reads in the main thread.
    prefetch_buffer_size: documents read ahead by those threads.
  """

  source: str = "kjv"
  tfds_data_dir: str | None = None
  tfds_text_key: str = "text"
  text_doc_separator: str = "blank_line"
  train_split: str = "train"
  eval_split: str = "validation"
  seq_len: int = 8192
  global_batch_size: int = 16
  shuffle: bool = True
  seed: int = 0
  num_epochs: int | None = 1
  max_tokens: int | None = None
  eval_max_tokens: int | None = None
  add_bos: bool = True
  add_eos: bool = True
  drop_remainder: bool = False
  read_threads: int = 8
  prefetch_buffer_size: int = 256

  def __post_init__(self):
    sources.parse_source(self.source)
    if self.text_doc_separator not in sources.DOC_SEPARATORS:
      raise ValueError(f"text_doc_separator={self.text_doc_separator!r}; use one of "
                       f"{sources.DOC_SEPARATORS}.")
    for name in ("train_split", "eval_split", "tfds_text_key"):
      if not isinstance(getattr(self, name), str) or not getattr(self, name):
        raise ValueError(f"{name} must be a non-empty string, got {getattr(self, name)!r}.")
    _check_int("seq_len", self.seq_len, minimum=2)
    _check_int("global_batch_size", self.global_batch_size, minimum=1)
    _check_int("seed", self.seed, minimum=0)
    if self.seed >= 2**32:
      raise ValueError(f"seed must be < 2**32 (grain's shuffle seed), got {self.seed}.")
    if self.num_epochs is not None:
      _check_int("num_epochs", self.num_epochs, minimum=1, extra="or None (repeat forever)")
    for name in ("max_tokens", "eval_max_tokens"):
      if getattr(self, name) is not None:
        _check_int(name, getattr(self, name), minimum=1, extra="or None (no budget)")
    _check_int("read_threads", self.read_threads, minimum=0)
    _check_int("prefetch_buffer_size", self.prefetch_buffer_size, minimum=1)
    for name in ("shuffle", "add_bos", "add_eos", "drop_remainder"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}.")

  @classmethod
  def from_config(cls, config: DataConfig | Mapping[str, Any] | Any) -> DataConfig:
    """A DataConfig from itself, a dict or an ml_collections ConfigDict.

    Raises:
      ValueError: unknown keys (a typo names its closest field) or invalid values.
    """
    if isinstance(config, cls):
      return config
    if hasattr(config, "to_dict"):
      config = config.to_dict()
    if not isinstance(config, Mapping):
      raise TypeError(f"data config must be a DataConfig, dict or ConfigDict, got "
                      f"{type(config).__name__}.")
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in config if k not in fields]
    if unknown:
      hints = []
      for k in unknown:
        close = difflib.get_close_matches(k, fields, n=1)
        hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
      raise ValueError(f"unknown data config field(s) {', '.join(hints)}; fields: {fields}.")
    return cls(**dict(config))

  @classmethod
  def paper_qat(cls, **overrides) -> DataConfig:
    """Spec §6 QAT data: a fixed 100M-token sample of C4 (c4/en), batch 16, sequence 8192,
    one epoch. (FFN + Attention runs: max_tokens=300_000_000.)"""
    base = dict(source="tfds:c4/en", train_split="train", eval_split="validation",
                seq_len=8192, global_batch_size=16, num_epochs=1, max_tokens=100_000_000)
    base.update(overrides)
    return cls(**base)


def _check_int(name: str, value: Any, *, minimum: int, extra: str = "") -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}{' ' + extra if extra else ''}, "
                     f"got {value!r}.")


class _Tokenize:
  """Document text → [doc_len] int32 token ids (picklable, for grain worker processes)."""

  def __init__(self, tokenizer: TextEncoder, add_bos: bool, add_eos: bool):
    self.tokenizer, self.add_bos, self.add_eos = tokenizer, add_bos, add_eos

  def __call__(self, text: str) -> np.ndarray:
    ids = self.tokenizer.encode(text, add_bos=self.add_bos, add_eos=self.add_eos)
    return np.asarray(ids, np.int32).reshape(-1)


def per_host_batch_size(config: DataConfig, shard_count: int) -> int:
  """global_batch_size // shard_count; ValueError if it does not divide."""
  if config.global_batch_size % shard_count:
    raise ValueError(
        f"global_batch_size={config.global_batch_size} is not divisible by shard_count="
        f"{shard_count} (the number of data-loading hosts); choose a multiple of {shard_count}.")
  return config.global_batch_size // shard_count


def _role_settings(config: DataConfig, split: str) -> dict[str, Any]:
  if split not in _ROLES:
    raise ValueError(f"split must be 'train' or 'eval' (the split names read are "
                     f"config.train_split={config.train_split!r} and config.eval_split="
                     f"{config.eval_split!r}), got {split!r}.")
  if split == "train":
    return dict(split_name=config.train_split, shuffle=config.shuffle,
                num_epochs=config.num_epochs, max_tokens=config.max_tokens)
  return dict(split_name=config.eval_split, shuffle=False, num_epochs=1,
              max_tokens=config.eval_max_tokens)


def budget_num_batches(config: DataConfig | Any, shard_count: int = 1,
                       split: str = "train") -> int | None:
  """Batches each host yields under the token budget (None without one).

  Exact whenever every host's shard holds at least its budget of tokens within num_epochs;
  the number of steps for the LR schedule (spec §6: 763).
  """
  config = DataConfig.from_config(config)
  role = _role_settings(config, split)
  if role["max_tokens"] is None:
    return None
  rows = math.ceil((role["max_tokens"] // shard_count) / config.seq_len)
  batch = per_host_batch_size(config, shard_count)
  return rows // batch if config.drop_remainder else math.ceil(rows / batch)


def lm_dataset(config: DataConfig | Any, tokenizer: TextEncoder, *, split: str = "train",
               shard_index: int = 0, shard_count: int = 1) -> grain.IterDataset:
  """The packed, batched LM dataset of this host (see the module docstring).

  Args:
    config: a DataConfig, or a dict / ConfigDict with its fields.
    tokenizer: has `encode(text, add_bos=..., add_eos=...) -> list[int]`; its `pad_id`
      (default 0) fills padding.
    split: role 'train' (config.train_split, shuffled, num_epochs, max_tokens) or 'eval'
      (config.eval_split, in order, one epoch, eval_max_tokens).
    shard_index: this host's index, in [0, shard_count) (`jax.process_index()`).
    shard_count: number of hosts reading disjoint parts (`jax.process_count()`).

  Returns:
    A grain.IterDataset of dicts {inputs, targets, segment_ids, positions, loss_mask}, each
    [global_batch_size // shard_count, seq_len].

  Raises:
    ValueError: invalid config, shards, or a batch that does not divide over the hosts.
    FileNotFoundError: missing corpus file, text file, or TFDS dataset/data_dir.
  """
  config = DataConfig.from_config(config)
  _check_int("shard_count", shard_count, minimum=1)
  _check_int("shard_index", shard_index, minimum=0)
  if shard_index >= shard_count:
    raise ValueError(f"shard_index={shard_index} must be < shard_count={shard_count}.")
  batch_size = per_host_batch_size(config, shard_count)
  role = _role_settings(config, split)
  host_budget = None
  if role["max_tokens"] is not None:
    host_budget = role["max_tokens"] // shard_count
    if host_budget < 1:
      raise ValueError(f"{'max_tokens' if split == 'train' else 'eval_max_tokens'}="
                       f"{role['max_tokens']} is less than one token per host "
                       f"(shard_count={shard_count}).")
  if not callable(getattr(tokenizer, "encode", None)):
    raise TypeError(f"tokenizer must have encode(text, add_bos=, add_eos=), got "
                    f"{type(tokenizer).__name__}.")
  pad_id = int(getattr(tokenizer, "pad_id", 0))

  source = sources.make_source(
      config.source, role["split_name"], tfds_data_dir=config.tfds_data_dir,
      tfds_text_key=config.tfds_text_key, text_doc_separator=config.text_doc_separator)
  if len(source) < shard_count:
    raise ValueError(f"source {config.source!r} split {role['split_name']!r} has "
                     f"{len(source)} documents, fewer than shard_count={shard_count}.")

  ds = grain.MapDataset.source(source)
  if role["shuffle"]:
    # Shuffle before repeat: grain's shuffle reseeds every epoch (seed + epoch).
    ds = ds.shuffle(seed=config.seed)
  ds = ds.repeat(role["num_epochs"])
  # Strided over the shuffled global stream: hosts get disjoint documents that together cover
  # each epoch, and each host's budget is (about) its share of the global stream's head.
  ds = ds[shard_index::shard_count]
  ds = ds.map(_Tokenize(tokenizer, config.add_bos, config.add_eos))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                            prefetch_buffer_size=config.prefetch_buffer_size))
  it = lm_packing.PackIterDataset(it, seq_len=config.seq_len, pad_id=pad_id,
                                  max_tokens=host_budget)
  it = it.batch(batch_size, drop_remainder=config.drop_remainder)
  if not config.drop_remainder:
    it = it.map(functools.partial(lm_packing.pad_batch, batch_size=batch_size, pad_id=pad_id))
  return it


def make_lm_dataset(config: DataConfig | Any, tokenizer: TextEncoder, *, split: str = "train",
                    shard_index: int = 0, shard_count: int = 1) -> grain.DatasetIterator:
  """A fresh, checkpointable iterator over `lm_dataset(...)` (same arguments).

  `get_state()` / `set_state()` (or `save(dir)` / `load(dir)`) resume exactly.
  """
  return iter(lm_dataset(config, tokenizer, split=split, shard_index=shard_index,
                         shard_count=shard_count))


class HostBatches:
  """This process's rows of every global batch, read from `num_shards` logical data shards.

  The data is split into `num_shards` logical shards (`lm_dataset(shard_index=s,
  shard_count=num_shards)`), independent of how many processes read them: process p of P reads
  shards [p·k, (p+1)·k) with k = num_shards / P and yields their batches concatenated along
  rows. A global batch is therefore the same for every P that divides num_shards (rows in
  shard order), so a 2-host run and a 1-host run with num_shards=2 train on identical batches,
  and a run can resume on a different host count.

  State (`get_state`) is a dict {str(shard): that shard's iterator state}; `set_state` takes
  a dict holding at least this process's shards (e.g. every process's, merged).
  """

  def __init__(self, config: DataConfig | Any, tokenizer: TextEncoder, *, split: str = "train",
               num_shards: int = 1, process_index: int = 0, process_count: int = 1):
    _check_int("num_shards", num_shards, minimum=1)
    _check_int("process_count", process_count, minimum=1)
    if num_shards % process_count:
      raise ValueError(f"num_shards={num_shards} must be a multiple of the {process_count} "
                       f"processes (each reads the same number of logical shards).")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} must be in [0, {process_count}).")
    per = num_shards // process_count
    self.shards = tuple(range(process_index * per, (process_index + 1) * per))
    self._iters = [make_lm_dataset(config, tokenizer, split=split, shard_index=s,
                                   shard_count=num_shards) for s in self.shards]

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    parts = [next(it) for it in self._iters]
    if len(parts) == 1:
      return parts[0]
    return {k: np.concatenate([np.asarray(p[k]) for p in parts], axis=0) for k in parts[0]}

  def get_state(self) -> dict[str, Any]:
    return {str(s): it.get_state() for s, it in zip(self.shards, self._iters)}

  def set_state(self, state: Mapping[str, Any]) -> None:
    if len(self._iters) == 1 and not all(str(k).isdigit() for k in state):
      state = {str(self.shards[0]): state}  # a single iterator's state (older checkpoints)
    missing = [s for s in self.shards if str(s) not in state]
    if missing:
      raise ValueError(f"data state has no entry for shards {missing} (it holds "
                       f"{sorted(state)}); was the run restarted with another "
                       f"config.data.num_shards?")
    for s, it in zip(self.shards, self._iters):
      it.set_state(state[str(s)])
