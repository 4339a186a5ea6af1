"""log_perplexity: hand computation, attention isolation under packing, exact token counts,
sources (KJV, text files, TFDS through mock_data), sharded == replicated."""

from __future__ import annotations

import gzip
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from matquant_jax.data import lm_packing
from matquant_jax.data import train_tokenizer
from matquant_jax.evaluation import perplexity
from matquant_jax.models import Transformer
from matquant_jax.models import get_config
from matquant_jax.models import init_params

CORPUS = pathlib.Path(__file__).resolve().parents[2] / "data" / "kjv.txt.gz"
CONFIG = get_config("tiny_gemma2")
SEQ, BATCH = 64, 8  # one program shape for most tests: compiling is the slow part

DOCS = [
    "In the beginning God created the heaven and the earth.",
    "And God said, Let there be light: and there was light. And God saw the light, that it "
    "was good: and God divided the light from the darkness.",
    "Jesus wept.",
    "And the evening and the morning were the first day.",
    "The LORD is my shepherd; I shall not want. He maketh me to lie down in green pastures: he "
    "leadeth me beside the still waters. He restoreth my soul.",
]


@pytest.fixture(scope="session")
def tokenizer():
  with gzip.open(CORPUS, "rt", encoding="utf-8") as fh:
    lines = [next(fh).rstrip("\n") for _ in range(3000)]
  return train_tokenizer(lines, None, 512, family="gemma")


@pytest.fixture(scope="session")
def params():
  return init_params(CONFIG, jax.random.key(1, impl="rbg"))


@pytest.fixture(scope="session")
def forward():
  return jax.jit(Transformer(CONFIG).apply)


def _hand_nll(forward, params, rows, segment_ids=None):
  """Full forward of packed rows, log_softmax, NLL summed under loss_mask; and the count."""
  seg = rows["segment_ids"] if segment_ids is None else segment_ids
  logits = forward({"params": params}, jnp.asarray(rows["inputs"]),
                   positions=jnp.asarray(rows["positions"]), segment_ids=jnp.asarray(seg))
  logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)), np.float64)
  picked = np.take_along_axis(logp, rows["targets"][..., None], axis=-1)[..., 0]
  mask = rows["loss_mask"].astype(np.float64)
  return float(-(picked * mask).sum()), float(mask.sum())


def _ids(tokenizer, docs):
  return [tokenizer.encode(d, add_bos=True, add_eos=True) for d in docs]


def test_matches_hand_computation(tokenizer, params, forward):
  res = perplexity.log_perplexity(CONFIG, params, tokenizer, DOCS, seq_len=SEQ, batch_size=BATCH)
  rows = lm_packing.pack_documents(_ids(tokenizer, DOCS), SEQ, pad_id=tokenizer.pad_id)
  assert rows["inputs"].shape[0] < BATCH  # one batch: pad it like the evaluator does
  rows = lm_packing.pad_batch(rows, BATCH, tokenizer.pad_id)
  nll, count = _hand_nll(forward, params, rows)
  assert res["tokens"] == count and res["documents"] == len(DOCS)
  np.testing.assert_allclose(res["log_pplx"], nll / count, rtol=1e-5)
  # token_nll on the same packed batch gives the (sum, count) pair.
  s, c = perplexity.token_nll(CONFIG, params, None, rows)
  np.testing.assert_allclose([float(s), float(c)], [nll, count], rtol=1e-5)


def test_packing_isolates_documents(tokenizer, params, forward):
  short = [DOCS[0], DOCS[2], DOCS[3]]
  ids = _ids(tokenizer, short)
  assert sum(len(i) for i in ids) <= SEQ  # packed together into one row, nothing is cut
  packed = perplexity.log_perplexity(CONFIG, params, tokenizer, short, seq_len=SEQ,
                                     batch_size=BATCH)
  alone = [perplexity.log_perplexity(CONFIG, params, tokenizer, [d], seq_len=SEQ,
                                     batch_size=BATCH) for d in short]
  assert packed["tokens"] == sum(a["tokens"] for a in alone) == sum(len(i) - 1 for i in ids)
  total = sum(a["log_pplx"] * a["tokens"] for a in alone)
  np.testing.assert_allclose(packed["log_pplx"] * packed["tokens"], total, rtol=1e-5)
  # The isolation is what makes them equal: one segment for the whole row changes the NLL.
  rows = lm_packing.pad_batch(
      lm_packing.pack_documents(ids, SEQ, pad_id=tokenizer.pad_id), BATCH, tokenizer.pad_id)
  leaky, _ = _hand_nll(forward, params, rows, np.where(rows["segment_ids"] > 0, 1, 0))
  assert abs(leaky - total) > 1e-3 * total


def test_exact_token_count_and_limits(tokenizer, params):
  ids = _ids(tokenizer, DOCS)
  res = perplexity.log_perplexity(CONFIG, params, tokenizer, DOCS, seq_len=SEQ, batch_size=BATCH)
  pieces = lm_packing.pack_documents(ids, SEQ)["segment_ids"]
  num_pieces = sum(len(set(r[r > 0])) for r in pieces)
  assert num_pieces > len(DOCS)  # some documents were cut at a row boundary
  assert res["tokens"] == sum(len(i) for i in ids) - num_pieces
  two = perplexity.log_perplexity(CONFIG, params, tokenizer, DOCS, seq_len=SEQ,
                                  batch_size=BATCH, max_documents=2)
  assert two["documents"] == 2
  assert two["tokens"] == len(ids[0]) + len(ids[1]) - 2 - (len(ids[0]) + len(ids[1]) > SEQ)
  capped = perplexity.log_perplexity(CONFIG, params, tokenizer, DOCS, seq_len=SEQ,
                                     batch_size=BATCH, max_tokens=50)
  rows = lm_packing.pack_documents(ids, SEQ, max_tokens=50)
  assert capped["tokens"] == rows["loss_mask"].sum() == 50 - 2  # doc 0 whole + part of doc 1
  assert capped["documents"] == 2


def test_sharded_equals_replicated(tokenizer, params):
  assert jax.device_count() == 8
  assert perplexity.batch_sharding(BATCH).spec == jax.sharding.PartitionSpec("data")
  assert perplexity.batch_sharding(3).spec == jax.sharding.PartitionSpec()
  sharded = perplexity.log_perplexity(CONFIG, params, tokenizer, DOCS, seq_len=SEQ,
                                      batch_size=BATCH)
  # 3 rows do not divide over 8 devices: each batch is padded with unscored zero rows to 8
  # and sharded (not replicated: that made every device run all 3 rows), and several batches.
  placed = perplexity.put_batch({"loss_mask": np.ones((3, SEQ), np.int32)})
  assert placed["loss_mask"].shape == (8, SEQ)
  assert placed["loss_mask"].sharding.spec == jax.sharding.PartitionSpec("data")
  assert np.asarray(placed["loss_mask"]).sum(axis=1).tolist() == [SEQ] * 3 + [0] * 5
  replicated = perplexity.log_perplexity(CONFIG, params, tokenizer, DOCS, seq_len=SEQ,
                                         batch_size=3)
  assert replicated["tokens"] == sharded["tokens"] and replicated["rows"] == sharded["rows"]
  np.testing.assert_allclose(replicated["log_pplx"], sharded["log_pplx"], rtol=1e-5)


def test_sources(tokenizer, params, tmp_path):
  kjv = perplexity.log_perplexity(CONFIG, params, tokenizer, "kjv", seq_len=SEQ,
                                  batch_size=BATCH, max_tokens=3 * SEQ)
  assert kjv["source"] == "kjv[validation]" and kjv["documents"] == 1
  assert kjv["tokens"] == 3 * SEQ - 3 and np.isfinite(kjv["log_pplx"])
  path = tmp_path / "docs.txt"
  path.write_text("\n\n".join(DOCS) + "\n")
  text = perplexity.log_perplexity(CONFIG, params, tokenizer, f"text:{path}", split="all",
                                   seq_len=SEQ, batch_size=BATCH)
  listed = perplexity.log_perplexity(CONFIG, params, tokenizer, DOCS, seq_len=SEQ,
                                     batch_size=BATCH)
  assert text["documents"] == len(DOCS) and text["tokens"] == listed["tokens"]
  np.testing.assert_allclose(text["log_pplx"], listed["log_pplx"], rtol=1e-6)
  with tfds.testing.mock_data(num_examples=5):
    c4 = perplexity.log_perplexity(CONFIG, params, tokenizer, "tfds:c4/en", seq_len=SEQ,
                                   batch_size=BATCH)
  assert c4["documents"] == 5 and c4["source"] == "tfds:c4/en[validation]"
  assert np.isfinite(c4["log_pplx"])


def test_errors(tokenizer, params, tmp_path):
  with pytest.raises(FileNotFoundError, match="tfds build c4/en"):
    perplexity.log_perplexity(CONFIG, params, tokenizer, "tfds:c4/en", tfds_data_dir=tmp_path)
  with pytest.raises(ValueError, match="seq_len"):
    perplexity.log_perplexity(CONFIG, params, tokenizer, DOCS, seq_len=1)
  with pytest.raises(ValueError, match="no documents"):
    perplexity.log_perplexity(CONFIG, params, tokenizer, [])
  small = CONFIG.replace(vocab_size=100, num_embed=None)
  with pytest.raises(ValueError, match="vocabulary"):
    perplexity.log_perplexity(small, params, tokenizer, DOCS, seq_len=SEQ)
