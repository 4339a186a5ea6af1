"""Token packing for LM training: documents → fixed-length rows with segment ids.

(Not to be confused with `matquant_jax/quant/packing.py`, which packs sub-byte weight codes.)

Conventions (one row = `seq_len` slots, every array [seq_len]):

- Concat-then-split. Tokenized documents are laid end to end and cut every `seq_len` tokens,
  so every row is full except the last row of the stream, which is right-padded. A document
  that does not fit in what is left of a row continues at the start of the next row.
- `segment_ids`: 1, 2, 3, ... for the document pieces of a row, in order; 0 on padding. A
  continuation piece starts a fresh segment (it is segment 1 of its new row).
- `positions`: 0, 1, 2, ... within each segment, restarting at 0 for a continuation piece too:
  every row is a self-contained batch of sequences starting at position 0, so RoPE positions
  never exceed seq_len - 1 (Gemma-2 is trained at 8192). Padding has position 0.
- `inputs`: token ids; padding is `pad_id`.
- `targets[t]`: `inputs[t + 1]` when slot t + 1 is in the same segment, else `pad_id` with
  loss_mask 0. So the last token of every segment has no target: at a document's end (its EOS
  when add_eos) the next token belongs to another document, and at a row boundary the
  continuation lies in another row. Every target belongs to the same segment as its input;
  targets are a pure function of (inputs, segment_ids) of the row. A document split across
  rows loses the one prediction at the cut (one per seq_len tokens at most).
- `loss_mask` (float32): 1 where the target is a real next token, else 0 (padding, segment
  ends). Per row, sum(loss_mask) = number of real tokens - number of segments.

Token budget: `max_tokens` emits exactly the first `max_tokens` tokens of the document stream
(padding not counted), then stops; the cut document's remaining tokens are dropped.

`PackIterDataset` is a grain `IterDataset` over a parent that yields 1-D int token arrays.
Its iterator's state is the parent's state before the document being split, plus the offset
into that document and the token count, so `set_state` re-reads that one document and resumes
exactly where `get_state` was taken.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
import copy
from typing import Any

import grain
import numpy as np

FEATURES = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def _empty_row(seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  return {
      "inputs": np.full((seq_len,), pad_id, np.int32),
      "targets": np.full((seq_len,), pad_id, np.int32),
      "segment_ids": np.zeros((seq_len,), np.int32),
      "positions": np.zeros((seq_len,), np.int32),
      "loss_mask": np.zeros((seq_len,), np.float32),
  }


class Packer:
  """Concat-then-split packing state machine, independent of grain (module docstring).

  Feed documents with `next_row(fetch)`: `fetch()` returns the next document's tokens (1-D
  int array) or None at the end of the stream.
  """

  def __init__(self, seq_len: int, *, pad_id: int = 0, max_tokens: int | None = None):
    if seq_len < 2:
      raise ValueError(f"seq_len must be >= 2, got {seq_len}.")
    if max_tokens is not None and max_tokens < 1:
      raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}.")
    self.seq_len = int(seq_len)
    self.pad_id = int(pad_id)
    self.max_tokens = None if max_tokens is None else int(max_tokens)
    self.reset()

  def reset(self) -> None:
    self.doc: np.ndarray | None = None   # the document being placed, [doc_len]
    self.offset = 0                      # its next token to place
    self.tokens = 0                      # tokens emitted so far (padding not counted)
    self.done = False

  def _budget_left(self) -> int | None:
    return None if self.max_tokens is None else self.max_tokens - self.tokens

  def next_row(self, fetch) -> dict[str, np.ndarray] | None:
    """The next packed row ({feature: [seq_len]}), or None when the stream is exhausted."""
    if self.done:
      return None
    row = _empty_row(self.seq_len, self.pad_id)
    filled, segment = 0, 0
    while filled < self.seq_len:
      left = self._budget_left()
      if left is not None and left <= 0:
        self.done = True
        break
      if self.doc is None:
        doc = fetch()
        if doc is None:
          self.done = True
          break
        doc = np.asarray(doc, np.int32).reshape(-1)
        if doc.size == 0:
          continue
        self.doc, self.offset = doc, 0
      doc, start = self.doc, self.offset
      n = min(self.seq_len - filled, doc.size - start)
      if left is not None:
        n = min(n, left)
      end = start + n
      sl = slice(filled, filled + n)
      segment += 1
      row["inputs"][sl] = doc[start:end]
      row["segment_ids"][sl] = segment
      row["positions"][sl] = np.arange(n, dtype=np.int32)
      # The last token of a piece has no target inside the row (module docstring).
      row["targets"][filled:filled + n - 1] = doc[start + 1:end]
      row["loss_mask"][filled:filled + n - 1] = 1.0
      filled += n
      self.tokens += n
      if end >= doc.size:
        self.doc, self.offset = None, 0
      else:
        self.offset = end
    return row if filled else None


class _PackIterator(grain.DatasetIterator):
  """grain iterator over packed rows; checkpointable (see module docstring)."""

  def __init__(self, parent: grain.DatasetIterator, packer: Packer):
    super().__init__(parent)
    self._packer = packer
    # Parent state from just before the current (partly placed) document was read.
    self._doc_state: dict[str, Any] | None = None

  def _fetch(self):
    state = self._parent.get_state()
    try:
      doc = next(self._parent)
    except StopIteration:
      return None
    self._doc_state = state
    return doc

  def __next__(self) -> dict[str, np.ndarray]:
    row = self._packer.next_row(self._fetch)
    if row is None:
      raise StopIteration
    return row

  def get_state(self) -> dict[str, Any]:
    p = self._packer
    pending = p.doc is not None
    return {
        # Where to resume reading: before the pending document, or where the parent is now.
        "parent": copy.deepcopy(self._doc_state) if pending else self._parent.get_state(),
        "doc_offset": int(p.offset) if pending else -1,
        "tokens": int(p.tokens),
        "done": bool(p.done),
    }

  def set_state(self, state: dict[str, Any]) -> None:
    p = self._packer
    p.reset()
    self._parent.set_state(state["parent"])
    p.tokens = int(state["tokens"])
    p.done = bool(state["done"])
    if int(state["doc_offset"]) >= 0:
      self._doc_state = state["parent"]
      doc = next(self._parent, None)
      if doc is None:
        raise ValueError("cannot restore the packing state: the parent iterator has no "
                         f"document at the saved position {state['parent']}; was the state "
                         "saved from a different pipeline?")
      p.doc = np.asarray(doc, np.int32).reshape(-1)
      p.offset = int(state["doc_offset"])


class PackIterDataset(grain.IterDataset):
  """Packs a parent of 1-D token arrays into rows {inputs, targets, segment_ids, positions,
  loss_mask}, each [seq_len] (module docstring)."""

  def __init__(self, parent: grain.IterDataset, *, seq_len: int, pad_id: int = 0,
               max_tokens: int | None = None):
    super().__init__(parent)
    Packer(seq_len, pad_id=pad_id, max_tokens=max_tokens)  # validates the arguments
    self._seq_len, self._pad_id, self._max_tokens = seq_len, pad_id, max_tokens

  def __iter__(self) -> _PackIterator:
    return _PackIterator(self._parent.__iter__(),
                         Packer(self._seq_len, pad_id=self._pad_id, max_tokens=self._max_tokens))

  def __str__(self) -> str:
    return (f"PackIterDataset(seq_len={self._seq_len}, pad_id={self._pad_id}, "
            f"max_tokens={self._max_tokens})")


def pack_documents(documents: Iterable[Any], seq_len: int, *, pad_id: int = 0,
                   max_tokens: int | None = None) -> dict[str, np.ndarray]:
  """Packs token lists in memory (same rules as `PackIterDataset`).

  Returns:
    {feature: [num_rows, seq_len]}; num_rows may be 0.
  """
  packer = Packer(seq_len, pad_id=pad_id, max_tokens=max_tokens)
  it: Iterator[Any] = iter(documents)
  rows = []
  while (row := packer.next_row(lambda: next(it, None))) is not None:
    rows.append(row)
  if not rows:
    return {k: v[:0].reshape(0, seq_len) for k, v in _empty_row(seq_len, pad_id).items()}
  return {k: np.stack([r[k] for r in rows]) for k in FEATURES}


def pad_batch(batch: dict[str, np.ndarray], batch_size: int,
              pad_id: int = 0) -> dict[str, np.ndarray]:
  """Appends all-padding rows (loss_mask 0) so each array has `batch_size` rows: the final,
  short batch of a stream keeps the shape of every other batch (no recompilation)."""
  n = next(iter(batch.values())).shape[0]
  if n == batch_size:
    return batch
  out = {}
  for k, v in batch.items():
    fill = pad_id if k in ("inputs", "targets") else 0
    pad = np.full((batch_size - n,) + v.shape[1:], fill, v.dtype)
    out[k] = np.concatenate([v, pad])
  return out
