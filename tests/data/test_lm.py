"""LM pipeline: batches, epochs, shuffling, host shards, budget, resume, config and errors."""

from __future__ import annotations

import collections
import dataclasses
import json
import zlib

import ml_collections
import numpy as np
import pytest

from matquant_jax.data import lm
from matquant_jax.data import sources
from matquant_jax.data.lm import DataConfig
from matquant_jax.data.lm import make_lm_dataset

BOS, EOS, PAD = 1, 2, 0


class WordTokenizer:
  """Deterministic stand-in for the SentencePiece wrapper: one id per whitespace word."""

  pad_id, bos_id, eos_id = PAD, BOS, EOS

  def encode(self, text, add_bos=True, add_eos=False):
    ids = [3 + zlib.crc32(w.encode()) % 1_000_000 for w in text.split()]
    return [BOS] * add_bos + ids + [EOS] * add_eos


TOK = WordTokenizer()
NUM_DOCS = 240


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """NUM_DOCS distinct documents of 1..60 words (some longer than a row), blank-line separated."""
  rng = np.random.default_rng(0)
  docs = []
  for i in range(NUM_DOCS):
    n = int(rng.integers(0, 60))
    docs.append(" ".join([f"doc{i}"] + [f"w{int(x)}" for x in rng.integers(0, 500, n)]))
  path = tmp_path_factory.mktemp("corpus") / "docs.txt"
  path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
  return path, docs


def config(path, **kw) -> DataConfig:
  base = dict(source=f"text:{path}", train_split="all", seq_len=32, global_batch_size=4,
              read_threads=0)
  base.update(kw)
  return DataConfig(**base)


def take(it, n=None) -> list[dict[str, np.ndarray]]:
  out = []
  for batch in it:
    out.append(batch)
    if n is not None and len(out) == n:
      break
  return out


def rows_of(batches) -> dict[str, np.ndarray]:
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def documents_of(rows, eos=EOS) -> list[tuple[int, ...]]:
  """Token tuples of the documents in packed rows, in stream order (EOS ends a document)."""
  docs, current = [], []
  for r in range(rows["inputs"].shape[0]):
    seg = rows["segment_ids"][r]
    for s in range(1, seg.max() + 1):
      current.extend(rows["inputs"][r][seg == s].tolist())
      if current[-1] == eos:
        docs.append(tuple(current))
        current = []
  if current:
    docs.append(tuple(current))
  return docs


def check_batch(batch, batch_size, seq_len):
  assert set(batch) == {"inputs", "targets", "segment_ids", "positions", "loss_mask"}
  for k, v in batch.items():
    assert v.shape == (batch_size, seq_len), k
    assert v.dtype == (np.float32 if k == "loss_mask" else np.int32), k
  seg, inp, tgt, mask = (batch[k] for k in ("segment_ids", "inputs", "targets", "loss_mask"))
  same_next = np.concatenate([seg[:, 1:] == seg[:, :-1], np.zeros_like(seg[:, :1], bool)], 1)
  same_next &= seg > 0
  np.testing.assert_array_equal(mask, same_next)
  np.testing.assert_array_equal(tgt[:, :-1][same_next[:, :-1]], inp[:, 1:][same_next[:, :-1]])
  assert (tgt[mask == 0] == PAD).all() and (inp[seg == 0] == PAD).all()
  starts = np.concatenate([np.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], 1)
  assert (batch["positions"][starts & (seg > 0)] == 0).all()


def expected_docs(docs, add_bos=True, add_eos=True):
  return [tuple(TOK.encode(d, add_bos=add_bos, add_eos=add_eos)) for d in docs]


def test_batches_and_one_epoch_token_conservation(corpus):
  path, docs = corpus
  batches = take(make_lm_dataset(config(path), TOK))
  for b in batches:
    check_batch(b, 4, 32)
  rows = rows_of(batches)
  got = documents_of(rows)
  # Every document of the epoch exactly once, every token exactly once, in shuffled order.
  assert collections.Counter(got) == collections.Counter(expected_docs(docs))
  assert got != expected_docs(docs)
  assert int((rows["segment_ids"] > 0).sum()) == sum(map(len, expected_docs(docs)))
  # Only the final row of the stream has padding; later rows of the last batch are empty.
  real = (rows["segment_ids"] > 0).sum(1)
  last = int(np.nonzero(real)[0][-1])
  assert (real[:last] == 32).all() and (real[last + 1:] == 0).all()
  # BOS opens each document's first piece; EOS ends it; a continuation piece starts at pos 0.
  starts = rows["inputs"][(rows["positions"] == 0) & (rows["segment_ids"] > 0)]
  assert (starts == BOS).sum() == NUM_DOCS


def test_unshuffled_order_and_bos_eos_flags(corpus):
  path, docs = corpus
  rows = rows_of(take(make_lm_dataset(config(path, shuffle=False, add_bos=False), TOK)))
  assert documents_of(rows) == expected_docs(docs, add_bos=False)
  rows = rows_of(take(make_lm_dataset(config(path, shuffle=False, add_eos=False), TOK)))
  flat = rows["inputs"][rows["segment_ids"] > 0]
  assert (flat == EOS).sum() == 0 and (flat == BOS).sum() == NUM_DOCS


def test_seed_determinism(corpus):
  path, _ = corpus
  a = rows_of(take(make_lm_dataset(config(path, seed=7), TOK), 5))
  b = rows_of(take(make_lm_dataset(config(path, seed=7), TOK), 5))
  c = rows_of(take(make_lm_dataset(config(path, seed=8), TOK), 5))
  np.testing.assert_array_equal(a["inputs"], b["inputs"])
  assert not np.array_equal(a["inputs"], c["inputs"])


def test_host_shards_disjoint_and_covering(corpus):
  path, docs = corpus
  cfg = config(path, global_batch_size=6)
  per_host = []
  for shard in range(3):
    batches = take(make_lm_dataset(cfg, TOK, shard_index=shard, shard_count=3))
    assert all(b["inputs"].shape == (2, 32) for b in batches)
    per_host.append(documents_of(rows_of(batches)))
  for i in range(3):
    assert len(per_host[i]) == NUM_DOCS // 3
    for j in range(i):
      assert not set(per_host[i]) & set(per_host[j])
  assert collections.Counter(sum(per_host, [])) == collections.Counter(expected_docs(docs))


def test_epochs(corpus):
  path, docs = corpus
  got = documents_of(rows_of(take(make_lm_dataset(config(path, num_epochs=2), TOK))))
  want = collections.Counter(expected_docs(docs))
  assert collections.Counter(got) == want + want
  # Each epoch is a full pass, reshuffled.
  assert collections.Counter(got[:NUM_DOCS]) == want
  assert got[:NUM_DOCS] != got[NUM_DOCS:]
  one_epoch_batches = len(take(make_lm_dataset(config(path), TOK)))
  forever = take(make_lm_dataset(config(path, num_epochs=None), TOK), 3 * one_epoch_batches)
  assert len(forever) == 3 * one_epoch_batches


@pytest.mark.parametrize("read_threads,num_epochs,max_tokens,skip", [
    (0, None, None, 7),      # mid-epoch
    (2, None, None, 7),      # threaded reads: the state still points at the consumed data
    (0, 2, None, 95),        # across the epoch boundary
    (2, 1, 1000, 6),         # near the end of a budget
])
def test_resume_from_saved_state(corpus, read_threads, num_epochs, max_tokens, skip):
  path, _ = corpus
  cfg = config(path, read_threads=read_threads, num_epochs=num_epochs, max_tokens=max_tokens,
               prefetch_buffer_size=8)
  kw = dict(shard_index=1, shard_count=2)
  it = make_lm_dataset(cfg, TOK, **kw)
  take(it, skip)
  state = json.loads(json.dumps(it.get_state()))   # what a checkpoint stores
  expected = take(it, 20)
  resumed = make_lm_dataset(cfg, TOK, **kw)
  resumed.set_state(state)
  got = take(resumed, 20)
  assert len(got) == len(expected) > 0
  for a, b in zip(got, expected):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_max_tokens_budget(corpus):
  path, _ = corpus
  cfg = config(path, max_tokens=1001, num_epochs=None)
  counts = []
  unbudgeted = dataclasses.replace(cfg, max_tokens=None)
  head = rows_of(take(make_lm_dataset(unbudgeted, TOK, shard_index=0, shard_count=2), 10))
  for shard in range(2):
    batches = take(make_lm_dataset(cfg, TOK, shard_index=shard, shard_count=2))
    rows = rows_of(batches)
    assert int((rows["segment_ids"] > 0).sum()) == 500   # 1001 // 2 per host
    assert all(b["inputs"].shape == (2, 32) for b in batches)
    counts.append(len(batches))
    if shard == 0:
      # The budget takes the head of the same stream.
      n_full = 500 // 32
      np.testing.assert_array_equal(rows["inputs"][:n_full], head["inputs"][:n_full])
  assert counts == [lm.budget_num_batches(cfg, 2)] * 2 == [8, 8]   # ceil(ceil(500/32)/2)
  # 961 // 2 = 480 tokens = 15 rows per host: 8 batches with the last padded, or 7.
  padded = take(make_lm_dataset(config(path, max_tokens=961), TOK, shard_index=0, shard_count=2))
  assert len(padded) == lm.budget_num_batches(config(path, max_tokens=961), 2) == 8
  assert (padded[-1]["segment_ids"][1] == 0).all() and (padded[-1]["loss_mask"][1] == 0).all()
  dropped = config(path, max_tokens=961, drop_remainder=True)
  assert len(take(make_lm_dataset(dropped, TOK, shard_index=0, shard_count=2))) == 7
  assert lm.budget_num_batches(dropped, 2) == 7
  assert lm.budget_num_batches(config(path)) is None


def test_paper_qat_config():
  cfg = DataConfig.paper_qat()
  assert (cfg.source, cfg.seq_len, cfg.global_batch_size, cfg.num_epochs, cfg.max_tokens) == (
      "tfds:c4/en", 8192, 16, 1, 100_000_000)
  assert lm.budget_num_batches(cfg) == 763
  assert lm.budget_num_batches(cfg, shard_count=4) == 763
  assert DataConfig.paper_qat(max_tokens=300_000_000).max_tokens == 300_000_000


def test_config_dict_and_typos(corpus):
  path, _ = corpus
  cd = ml_collections.ConfigDict(dataclasses.asdict(config(path)))
  assert DataConfig.from_config(cd) == config(path)
  it = make_lm_dataset(cd, TOK)
  assert next(it)["inputs"].shape == (4, 32)
  with pytest.raises(ValueError, match="'seq_length' \\(did you mean 'seq_len'\\?\\)"):
    DataConfig.from_config({"seq_length": 128})


@pytest.mark.parametrize("kw,match", [
    (dict(seq_len=1), "seq_len must be an integer >= 2"),
    (dict(num_epochs=0), "num_epochs must be an integer >= 1"),
    (dict(max_tokens=0), "max_tokens must be an integer >= 1"),
    (dict(global_batch_size=0), "global_batch_size"),
    (dict(seed=2**32), "seed must be < 2\\*\\*32"),
    (dict(source="c4"), "unknown data source 'c4'"),
    (dict(text_doc_separator="para"), "text_doc_separator"),
    (dict(shuffle="yes"), "shuffle must be a bool"),
])
def test_config_validation(kw, match):
  with pytest.raises(ValueError, match=match):
    DataConfig(**kw)


def test_pipeline_errors(corpus, tmp_path, monkeypatch):
  path, _ = corpus
  with pytest.raises(ValueError, match="global_batch_size=4 is not divisible by shard_count=3"):
    make_lm_dataset(config(path), TOK, shard_index=0, shard_count=3)
  with pytest.raises(ValueError, match="shard_index=2 must be < shard_count=2"):
    make_lm_dataset(config(path), TOK, shard_index=2, shard_count=2)
  with pytest.raises(ValueError, match="split must be 'train' or 'eval'"):
    make_lm_dataset(config(path), TOK, split="validation")
  with pytest.raises(FileNotFoundError, match="missing.txt"):
    make_lm_dataset(config(tmp_path / "missing.txt"), TOK)
  with pytest.raises(TypeError, match="encode"):
    make_lm_dataset(config(path), object())
  with pytest.raises(FileNotFoundError, match=r"'c4/en' is not prepared.*tfds build"):
    make_lm_dataset(DataConfig(source="tfds:c4/en", tfds_data_dir=str(tmp_path)), TOK)
  monkeypatch.setenv(sources.KJV_ENV, str(tmp_path / "kjv.txt.gz"))
  with pytest.raises(FileNotFoundError, match="kjv.txt.gz"):
    make_lm_dataset(DataConfig(), TOK)


def test_kjv_with_sentencepiece_tokenizer():
  data = pytest.importorskip("matquant_jax.data")
  train_lines = [line for doc in sources.kjv_documents("train")[:150]
                 for line in doc.split("\n")]
  # byte_fallback: pieces are trained on lines, so "\n" between verses needs byte pieces.
  tok = data.train_tokenizer(train_lines, None, 512, family="gemma", byte_fallback=True)
  cfg = DataConfig(source="kjv", seq_len=512, global_batch_size=2, read_threads=2)
  rows = rows_of(take(make_lm_dataset(cfg, tok, split="eval")))
  docs = documents_of(rows, eos=tok.eos_id)
  validation = sources.kjv_documents("validation")
  assert len(docs) == len(validation) == 59
  # Eval reads in order; each document is BOS + text + EOS and decodes back to the chapter.
  first = np.array(docs[0])
  assert first[0] == tok.bos_id and first[-1] == tok.eos_id
  assert tok.decode(first) == validation[0]
  train_batch = next(make_lm_dataset(cfg, tok))
  check_batch(train_batch, 2, 512)
