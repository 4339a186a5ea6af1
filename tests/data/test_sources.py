"""Document sources: KJV chapters and split, local text files, TFDS array_record (no TF)."""

from __future__ import annotations

import gzip
import importlib.util
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from matquant_jax.data import sources


# KJV ------------------------------------------------------------------------------------------


def test_kjv_chapters():
  chapters = sources.kjv_chapters()
  assert len(chapters) == 1189
  assert chapters[0].startswith("Genesis 1\nIn the beginning God created the heaven")
  assert chapters[-1].split("\n")[0] == "Revelation 22"
  headings = [c.split("\n", 1)[0] for c in chapters]
  assert "Song of Solomon 8" in headings and "1 Samuel 31" in headings
  assert headings.count("Psalms 119") == 1
  assert all("\n" in c for c in chapters)   # a heading and at least one verse


def test_kjv_split_disjoint_deterministic_covering():
  chapters = sources.kjv_chapters()
  train = list(sources.kjv_documents("train"))
  val = list(sources.kjv_documents("validation"))
  assert (len(train), len(val)) == (1130, 59)
  assert list(sources.kjv_documents("train")) == train   # deterministic
  assert val == [chapters[i] for i in range(19, 1189, 20)]
  assert not set(train) & set(val)
  assert sorted(train + val) == sorted(chapters)
  assert list(sources.kjv_documents("all")) == chapters
  with pytest.raises(ValueError, match="unknown split 'test'"):
    sources.kjv_documents("test")


def test_kjv_missing_file_error(tmp_path, monkeypatch):
  missing = tmp_path / "nope" / "kjv.txt.gz"
  with pytest.raises(FileNotFoundError, match=r"kjv\.txt\.gz.*git checkout"):
    sources.kjv_documents("train", path=missing)
  monkeypatch.setenv(sources.KJV_ENV, str(missing))
  with pytest.raises(FileNotFoundError, match=str(missing)):
    sources.kjv_path()


def test_kjv_path_from_env(tmp_path, monkeypatch):
  copy = tmp_path / "bible.txt.gz"
  with gzip.open(copy, "wt", encoding="utf-8") as fh:
    fh.write("Genesis 1\nIn the beginning.\nAnd light.\n\nGenesis 2\nThus the heavens.\n")
  monkeypatch.setenv(sources.KJV_ENV, str(copy))
  assert sources.kjv_path() == copy
  assert sources.kjv_chapters() == ["Genesis 1\nIn the beginning.\nAnd light.",
                                    "Genesis 2\nThus the heavens."]


# Local text files -----------------------------------------------------------------------------


@pytest.fixture()
def text_files(tmp_path):
  a = tmp_path / "a.txt"
  a.write_text("first doc line 1\nfirst doc line 2\n\n\nsecond doc\n  \nthird doc\n",
               encoding="utf-8")
  b = tmp_path / "b.txt.gz"
  with gzip.open(b, "wt", encoding="utf-8") as fh:
    fh.write("\n".join(f"gz doc {i}\n" for i in range(40)))
  return a, b


def test_text_file_separators(text_files):
  a, b = text_files
  assert list(sources.text_file_documents(a)) == [
      "first doc line 1\nfirst doc line 2", "second doc", "third doc"]
  assert list(sources.text_file_documents(a, doc_separator="line")) == [
      "first doc line 1", "first doc line 2", "second doc", "third doc"]
  assert len(sources.text_file_documents([a, b], doc_separator="file")) == 2
  both = list(sources.text_file_documents([a, b]))
  assert len(both) == 43 and both[3] == "gz doc 0"
  train = list(sources.text_file_documents([a, b], "train"))
  val = list(sources.text_file_documents([a, b], "validation"))
  assert val == [both[19], both[39]]
  assert len(train) == 41 and not set(train) & set(val)


def test_text_file_errors(tmp_path, text_files):
  with pytest.raises(FileNotFoundError, match="missing.txt"):
    sources.text_file_documents([text_files[0], tmp_path / "missing.txt"])
  with pytest.raises(ValueError, match="doc_separator"):
    sources.text_file_documents(text_files[0], doc_separator="paragraph")


def test_parse_source(tmp_path):
  assert sources.parse_source("kjv") == ("kjv", None)
  assert sources.parse_source("text:a.txt, b.txt") == ("text", ["a.txt", "b.txt"])
  assert sources.parse_source("tfds:c4/en") == ("tfds", "c4/en")
  for bad in ("c4", "tfds:", "text:", "kjv:x", ""):
    with pytest.raises(ValueError, match="unknown data source"):
      sources.parse_source(bad)


# TFDS -----------------------------------------------------------------------------------------


class TinyText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A tiny text dataset prepared locally (no download); read back by name from its files."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {"text": tfds.features.Text(), "id": np.int64}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(30, 0), "validation": self._generate_examples(6, 100)}

  def _generate_examples(self, n, offset):
    for i in range(n):
      yield i, {"text": f"document {i + offset} " + "word " * (i % 7) + "end", "id": i + offset}


@pytest.fixture(scope="module")
def tiny_tfds_dir(tmp_path_factory):
  """data_dir holding tiny_text/1.0.0/ as array_record: what `tfds build` would leave."""
  data_dir = tmp_path_factory.mktemp("tfds")
  TinyText(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return data_dir


def test_tfds_array_record_source(tiny_tfds_dir):
  src = sources.tfds_text_source("tiny_text", "train", data_dir=tiny_tfds_dir)
  assert isinstance(src, sources.DocumentSource)
  assert len(src) == 30
  texts = {src[i] for i in range(30)}
  assert texts == {f"document {i} " + "word " * (i % 7) + "end" for i in range(30)}
  assert all(isinstance(t, str) for t in texts)
  assert src.__getitems__([0, 1]) == [src[0], src[1]]
  val = sources.make_source("tfds:tiny_text", "validation[:4]", tfds_data_dir=tiny_tfds_dir)
  assert len(val) == 4 and all(val[i].startswith("document 10") for i in range(4))


def test_tfds_errors(tiny_tfds_dir, tmp_path):
  empty = tmp_path / "empty_tfds"
  empty.mkdir()
  with pytest.raises(FileNotFoundError) as e:
    sources.tfds_text_source("c4/en", "train", data_dir=empty)
  msg = str(e.value)
  assert "'c4/en'" in msg and str(empty) in msg and "tfds build c4/en" in msg
  assert "never downloads" in msg
  with pytest.raises(FileNotFoundError, match=r"'no_such_dataset_xyz'.*data_dir"):
    sources.tfds_text_source("no_such_dataset_xyz", "train", data_dir=empty)
  with pytest.raises(ValueError, match=r"split 'test'.*\['train', 'validation'\]"):
    sources.tfds_text_source("tiny_text", "test", data_dir=tiny_tfds_dir)
  src = sources.tfds_text_source("tiny_text", "train", data_dir=tiny_tfds_dir, text_key="body")
  with pytest.raises(KeyError, match="'body'.*tfds_text_key"):
    src[0]
  # Nothing was written (no download attempt) into the empty data_dir's dataset folder.
  assert not (empty / "c4" / "en" / "3.1.0" / "dataset_info.json").exists()


def test_tfds_mock_c4_without_tensorflow():
  with tfds.testing.mock_data(num_examples=7, policy=tfds.testing.MockPolicy.USE_CODE):
    src = sources.tfds_text_source("c4/en", "train")
    assert len(src) == 7
    assert all(isinstance(src[i], str) for i in range(7))
  if importlib.util.find_spec("tensorflow") is None:
    assert "tensorflow" not in sys.modules


class CharTokenizer:
  pad_id, bos_id, eos_id = 0, 1, 2

  def encode(self, text, add_bos=True, add_eos=False):
    return [1] * add_bos + [ord(c) for c in text] + [2] * add_eos


def test_tfds_through_lm_pipeline(tiny_tfds_dir):
  from matquant_jax.data import lm  # pylint: disable=g-import-not-at-top
  cfg = lm.DataConfig(source="tfds:tiny_text", tfds_data_dir=str(tiny_tfds_dir), seq_len=16,
                      global_batch_size=2, read_threads=2)
  src = sources.tfds_text_source("tiny_text", "train", data_dir=tiny_tfds_dir)
  for split, n_docs in (("train", 30), ("eval", 6)):
    batches = list(lm.make_lm_dataset(cfg, CharTokenizer(), split=split))
    inputs = np.concatenate([b["inputs"] for b in batches])
    segs = np.concatenate([b["segment_ids"] for b in batches])
    assert (inputs[segs > 0] == 1).sum() == n_docs == (inputs[segs > 0] == 2).sum()
    if split == "train":
      assert (segs > 0).sum() == sum(len(src[i]) + 2 for i in range(30))
