"""Tokenizer wrapper: family ids, BOS/EOS behaviour, stop ids, training a small model."""

from __future__ import annotations

import gzip
import io
import pathlib
import pickle

import numpy as np
import pytest
import sentencepiece as spm

from matquant_jax.data import Tokenizer
from matquant_jax.data import train_tokenizer

# The corpus bundled with the repository (data/README.md).
CORPUS = pathlib.Path(__file__).resolve().parents[2] / "data" / "kjv.txt.gz"


@pytest.fixture(scope="module")
def lines():
  """A few thousand lines of the bundled corpus."""
  with gzip.open(CORPUS, "rt", encoding="utf-8") as fh:
    return [next(fh).rstrip("\n") for _ in range(4000)]


@pytest.fixture(scope="module")
def gemma(lines, tmp_path_factory):
  prefix = tmp_path_factory.mktemp("tok") / "gemma"
  return train_tokenizer(iter(lines), prefix, 512, family="gemma")


@pytest.fixture(scope="module")
def mistral(lines):
  return train_tokenizer(lines, None, 512, family="mistral", byte_fallback=True)


def test_gemma_ids(gemma):
  assert gemma.family == "gemma" and gemma.vocab_size == 512
  assert (gemma.pad_id, gemma.eos_id, gemma.bos_id, gemma.unk_id) == (0, 1, 2, 3)
  assert [gemma.id_to_piece(i) for i in range(4)] == ["<pad>", "<eos>", "<bos>", "<unk>"]
  assert gemma.id_to_piece(106) == "<start_of_turn>" and gemma.id_to_piece(107) == "<end_of_turn>"
  assert gemma.stop_ids == (1, 107)


def test_gemma_bos_eos(gemma):
  ids = gemma.encode("In the beginning")
  assert ids[0] == 2 and 1 not in ids  # BOS by default, no EOS
  plain = gemma.encode("In the beginning", add_bos=False)
  assert plain == ids[1:]
  assert gemma.encode("In the beginning", add_eos=True) == ids + [1]
  assert gemma.decode(ids) == "In the beginning" == gemma.decode(ids + [1, 0, 0])
  # Chat-template pieces are single tokens, as in the released tokenizer (no dummy prefix).
  turn = gemma.encode("<start_of_turn>user\nhi<end_of_turn>\n", add_bos=False)
  assert turn[0] == 106 and 107 in turn


def test_mistral_ids_and_bos(mistral):
  assert mistral.family == "mistral"
  assert (mistral.unk_id, mistral.bos_id, mistral.eos_id) == (0, 1, 2)
  assert mistral.processor.pad_id() == -1 and mistral.pad_id == 0  # no pad piece; documented
  assert [mistral.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
  assert mistral.stop_ids == (2,)
  ids = mistral.encode("And God said")
  assert ids[0] == 1 and ids[-1] != 2
  assert mistral.encode("And God said", add_bos=False, add_eos=True) == ids[1:] + [2]
  assert mistral.decode(ids) == "And God said"
  # byte fallback: characters unseen in training survive a round trip.
  assert mistral.decode(mistral.encode("naïve €")) == "naïve €"


def test_batch_encode_decode(gemma):
  texts = ["And God saw the light", "that it was good"]
  batch = gemma.encode(texts)
  assert batch == [gemma.encode(t) for t in texts]
  width = max(map(len, batch))
  padded = np.array([b + [gemma.pad_id] * (width - len(b)) for b in batch])
  assert gemma.decode(padded) == texts
  with pytest.raises(ValueError, match="outside the vocabulary"):
    gemma.decode([5, 600])


def test_family_is_checked_and_detected(gemma, mistral, tmp_path):
  path = tmp_path / "g.model"
  path.write_bytes(gemma.processor.serialized_model_proto())
  assert Tokenizer.from_file(path).family == "gemma"
  assert Tokenizer.gemma(path).stop_ids == (1, 107)
  with pytest.raises(ValueError, match="not a mistral tokenizer"):
    Tokenizer.mistral(path)
  proto = mistral.processor.serialized_model_proto()
  assert Tokenizer(proto).family == "mistral" and Tokenizer(proto, "llama").bos_id == 1
  with pytest.raises(ValueError, match="not a gemma tokenizer.*eos_id"):
    Tokenizer(proto, "gemma")
  with pytest.raises(ValueError, match="unknown tokenizer family"):
    Tokenizer(proto, "gpt2")
  with pytest.raises(FileNotFoundError):
    Tokenizer(tmp_path / "missing.model")


def test_unknown_ids_are_rejected(lines):
  writer = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(lines[:500]), model_writer=writer,
                                 vocab_size=200, unk_id=1, bos_id=0, eos_id=2, minloglevel=2)
  with pytest.raises(ValueError, match="match no known family"):
    Tokenizer(writer.getvalue())


def test_trained_files_and_pickle(gemma, tmp_path):
  model = pathlib.Path(gemma.source)
  assert model.name == "gemma.model" and model.with_suffix(".vocab").exists()
  again = pickle.loads(pickle.dumps(gemma))
  assert again.encode("the earth") == gemma.encode("the earth") and again.stop_ids == (1, 107)


def test_train_from_gzip_file_and_small_vocab_error(lines, tmp_path):
  corpus = tmp_path / "c.txt.gz"
  with gzip.open(corpus, "wt", encoding="utf-8") as fh:
    fh.write("\n".join(lines[:1500]) + "\n")
  tok = train_tokenizer(corpus, tmp_path / "m", 300, family="mistral")
  assert tok.vocab_size == 300 and (tmp_path / "m.model").exists()
  with pytest.raises(ValueError, match="too small"):
    train_tokenizer(lines, None, 100, family="gemma")
  with pytest.raises(FileNotFoundError):
    train_tokenizer(tmp_path / "none.txt", None, 300)
