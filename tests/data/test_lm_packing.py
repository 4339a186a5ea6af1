"""Token packing: exact rows, invariants, token conservation, budget, checkpoint/restore."""

from __future__ import annotations

import json

import grain
import numpy as np
import pytest

from matquant_jax.data import lm_packing
from matquant_jax.data.lm_packing import PackIterDataset
from matquant_jax.data.lm_packing import pack_documents

PAD = 0


def random_docs(seed: int, n: int, max_len: int) -> list[np.ndarray]:
  """Documents of random lengths (some empty, some longer than a row); tokens >= 1."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(0, max_len, size=n)
  return [rng.integers(1, 1000, size=k).astype(np.int32) for k in lengths]


def pieces_of(rows: dict[str, np.ndarray]) -> list[tuple[int, np.ndarray]]:
  """(row index, tokens) of every segment, in stream order."""
  out = []
  for r in range(rows["inputs"].shape[0]):
    seg = rows["segment_ids"][r]
    for s in range(1, seg.max() + 1):
      out.append((r, rows["inputs"][r][seg == s]))
  return out


def check_row_invariants(rows: dict[str, np.ndarray], seq_len: int) -> None:
  """Segment ids, positions, targets, loss mask of every row (lm_packing docstring)."""
  assert set(rows) == set(lm_packing.FEATURES)
  for k in ("inputs", "targets", "segment_ids", "positions"):
    assert rows[k].dtype == np.int32, k
  assert rows["loss_mask"].dtype == np.float32
  for r in range(rows["inputs"].shape[0]):
    inp, tgt, seg, pos, mask = (rows[k][r] for k in lm_packing.FEATURES)
    assert inp.shape == (seq_len,)
    real = seg > 0
    n_real = int(real.sum())
    # Real tokens first, padding only at the end.
    assert real[:n_real].all() and not real[n_real:].any()
    assert n_real > 0
    # Segments 1, 2, ... in order, each contiguous.
    assert seg[0] == 1
    steps = np.diff(seg[:n_real])
    assert set(np.unique(steps)) <= {0, 1}
    # Positions restart at 0 at each segment start and count up inside it.
    starts = np.r_[True, steps == 1]
    assert (pos[:n_real][starts] == 0).all()
    assert (pos[:n_real][~starts] == pos[:n_real - 1][~starts[1:]] + 1).all()
    assert (pos[~real] == 0).all() and (inp[~real] == PAD).all()
    # Targets: next input of the same segment; segment ends and padding are masked.
    same_next = np.r_[seg[1:] == seg[:-1], False] & real
    np.testing.assert_array_equal(mask, same_next.astype(np.float32))
    np.testing.assert_array_equal(tgt[:-1][same_next[:-1]], inp[1:][same_next[:-1]])
    assert (tgt[mask == 0] == PAD).all()
    # Every loss-bearing target belongs to the same segment as its input.
    idx = np.nonzero(mask)[0]
    assert (seg[idx + 1] == seg[idx]).all()
    assert mask.sum() == n_real - seg.max()


def test_exact_rows():
  docs = [[2, 5, 6, 1], [2, 7, 1], [2, 8, 9, 10, 11, 12, 1], [2, 3]]
  rows = pack_documents(docs, 4)
  np.testing.assert_array_equal(rows["inputs"], [[2, 5, 6, 1], [2, 7, 1, 2],
                                                 [8, 9, 10, 11], [12, 1, 2, 3]])
  np.testing.assert_array_equal(rows["segment_ids"], [[1, 1, 1, 1], [1, 1, 1, 2],
                                                      [1, 1, 1, 1], [1, 1, 2, 2]])
  np.testing.assert_array_equal(rows["positions"], [[0, 1, 2, 3], [0, 1, 2, 0],
                                                    [0, 1, 2, 3], [0, 1, 0, 1]])
  np.testing.assert_array_equal(rows["targets"], [[5, 6, 1, 0], [7, 1, 0, 0],
                                                  [9, 10, 11, 0], [1, 0, 3, 0]])
  np.testing.assert_array_equal(rows["loss_mask"], [[1, 1, 1, 0], [1, 1, 0, 0],
                                                    [1, 1, 1, 0], [1, 0, 1, 0]])


def test_last_row_padded_and_pad_id():
  rows = pack_documents([[5, 6, 7], [8, 9]], 4, pad_id=-1)
  np.testing.assert_array_equal(rows["inputs"], [[5, 6, 7, 8], [9, -1, -1, -1]])
  np.testing.assert_array_equal(rows["segment_ids"], [[1, 1, 1, 2], [1, 0, 0, 0]])
  np.testing.assert_array_equal(rows["targets"], [[6, 7, -1, -1], [-1, -1, -1, -1]])
  np.testing.assert_array_equal(rows["loss_mask"], [[1, 1, 0, 0], [0, 0, 0, 0]])


@pytest.mark.parametrize("seq_len", [2, 7, 64])
def test_invariants_and_token_conservation(seq_len):
  docs = random_docs(seq_len, 60, 3 * seq_len)
  rows = pack_documents(docs, seq_len)
  check_row_invariants(rows, seq_len)
  # Rows are full except the last.
  real = (rows["segment_ids"] > 0).sum(axis=1)
  assert (real[:-1] == seq_len).all()
  # Joining the pieces back (a piece that fills a row to its end continues in the next row)
  # gives exactly the non-empty documents, in order, each token once.
  pieces = pieces_of(rows)
  rebuilt, current = [], []
  nonempty = [d for d in docs if len(d)]
  for i, (r, toks) in enumerate(pieces):
    current.extend(toks.tolist())
    doc_len = len(nonempty[len(rebuilt)])
    if len(current) == doc_len:
      rebuilt.append(current)
      current = []
    else:
      # An unfinished document only ever stops at the end of a row.
      assert len(current) < doc_len
      seg = rows["segment_ids"][r]
      assert (seg == seg.max()).sum() == len(toks) and seg[-1] == seg.max()
      assert pieces[i + 1][0] == r + 1
  assert current == []
  assert rebuilt == [d.tolist() for d in nonempty]
  assert int((rows["segment_ids"] > 0).sum()) == sum(len(d) for d in docs)


def test_max_tokens_takes_stream_head():
  docs = random_docs(1, 40, 50)
  stream = np.concatenate(docs)
  full = pack_documents(docs, 16)
  for budget in (1, 15, 16, 17, 100, len(stream) - 1, len(stream), len(stream) + 50):
    rows = pack_documents(docs, 16, max_tokens=budget)
    check_row_invariants(rows, 16)
    real = rows["segment_ids"] > 0
    n = min(budget, len(stream))
    assert real.sum() == n
    assert rows["inputs"].shape[0] == -(-n // 16)
    np.testing.assert_array_equal(rows["inputs"][real], stream[:n])
    # Identical to the unbudgeted rows up to the cut.
    k = n // 16
    for key in lm_packing.FEATURES:
      np.testing.assert_array_equal(rows[key][:k], full[key][:k])


def test_empty_stream_and_bad_args():
  rows = pack_documents([[], []], 8)
  assert rows["inputs"].shape == (0, 8)
  with pytest.raises(ValueError, match="seq_len"):
    pack_documents([[1, 2]], 1)
  with pytest.raises(ValueError, match="max_tokens"):
    pack_documents([[1, 2]], 4, max_tokens=0)


def _token_dataset(docs):
  return grain.MapDataset.source(docs).to_iter_dataset(
      grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))


@pytest.mark.parametrize("max_tokens", [None, 555])
def test_iter_dataset_matches_and_restores(max_tokens):
  docs = random_docs(3, 50, 40)
  ds = PackIterDataset(_token_dataset(docs), seq_len=16, max_tokens=max_tokens)
  expected = pack_documents(docs, 16, max_tokens=max_tokens)
  rows = list(ds)
  assert len(rows) == expected["inputs"].shape[0]
  for key in lm_packing.FEATURES:
    np.testing.assert_array_equal(np.stack([r[key] for r in rows]), expected[key])
  # Restoring a state taken after any number of rows resumes with exactly the remaining rows.
  for stop in (0, 1, 7, len(rows) - 1, len(rows)):
    it = iter(ds)
    for _ in range(stop):
      next(it)
    state = json.loads(json.dumps(it.get_state()))
    fresh = iter(ds)
    fresh.set_state(state)
    rest = list(fresh)
    assert len(rest) == len(rows) - stop
    for a, b in zip(rest, rows[stop:]):
      for key in lm_packing.FEATURES:
        np.testing.assert_array_equal(a[key], b[key])


def test_pad_batch():
  batch = pack_documents([[1, 2, 3, 4, 5]], 4)
  padded = lm_packing.pad_batch(batch, 3, pad_id=9)
  assert padded["inputs"].shape == (3, 4)
  assert (padded["inputs"][2:] == 9).all() and (padded["loss_mask"][2:] == 0).all()
  assert (padded["segment_ids"][2:] == 0).all()
  assert lm_packing.pad_batch(padded, 3) is padded
