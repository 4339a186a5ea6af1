"""Zero-shot scoring: lm-eval pair encoding, log-likelihood = hand computation, rigged models,
acc vs acc_norm, the task registry and the task average."""

from __future__ import annotations

import gzip
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from matquant_jax.data import train_tokenizer
from matquant_jax.evaluation import tasks
from matquant_jax.evaluation import zero_shot
from matquant_jax.models import Transformer
from matquant_jax.models import get_config
from matquant_jax.models import init_params

CORPUS = pathlib.Path(__file__).resolve().parents[2] / "data" / "kjv.txt.gz"
CONFIG = get_config("tiny_gemma2")
BATCH = 8  # one batch shape for every real-model test here: compiling is the slow part


@pytest.fixture(scope="session")
def tokenizer():
  with gzip.open(CORPUS, "rt", encoding="utf-8") as fh:
    lines = [next(fh).rstrip("\n") for _ in range(3000)]
  return train_tokenizer(lines, None, 512, family="gemma")


@pytest.fixture(scope="session")
def params():
  return init_params(CONFIG, jax.random.key(1, impl="rbg"))


class ByteTokenizer:
  """UTF-8 bytes as ids 3..258; BOS 2, pad 0. Makes rigged logits easy to write."""

  pad_id, eos_id, bos_id = 0, 1, 2

  def encode(self, text, add_bos=True, add_eos=False):
    return [2] * add_bos + [b + 3 for b in text.encode("utf-8")] + [1] * add_eos

  @staticmethod
  def id(char: str) -> int:
    return ord(char) + 3


def _unigram_forward(logprobs: dict[str, float]):
  """A fake model: the same next-token distribution everywhere (given chars get the given
  log-probabilities, the rest share what is left)."""
  v = CONFIG.vocab_size
  rest = np.log((1.0 - sum(np.exp(list(logprobs.values())))) / (v - len(logprobs)))
  table = np.full((v,), rest, np.float32)
  for ch, lp in logprobs.items():
    table[ByteTokenizer.id(ch)] = lp
  table = jnp.asarray(table)

  def forward(params, tokens, positions, segment_ids):
    del params, positions, segment_ids
    return jnp.broadcast_to(table, tokens.shape + (v,))

  return forward


def _bigram_forward(params, tokens, positions, segment_ids):
  """A fake model whose 'weights' are a [V, V] table of next-token logits per current token."""
  del positions, segment_ids
  return params["table"][tokens]


def _oracle_table(examples, tokenizer):
  """Bigram logits that favour every transition of each item's correct (context, continuation),
  including the step from the context's last token to the continuation."""
  v = CONFIG.vocab_size
  table = np.zeros((v, v), np.float32)
  for ex in examples:
    ctx, cont = zero_shot.encode_pair(tokenizer, ex.contexts[ex.label],
                                      ex.continuations[ex.label])
    seq = ctx[-1:] + cont
    for a, b in zip(seq[:-1], seq[1:]):
      table[a, b] = 6.0
  return {"table": jnp.asarray(table)}


# Encoding ---------------------------------------------------------------------------------------


def test_encode_pair_follows_lm_eval(tokenizer):
  ctx, cont = zero_shot.encode_pair(tokenizer, "And God said", " Let there be light")
  assert ctx[0] == tokenizer.bos_id and ctx[1:] == tokenizer.encode("And God said", add_bos=False)
  assert ctx + cont == tokenizer.encode("And God said Let there be light", add_bos=True)
  # A trailing space of the context moves to the continuation.
  assert zero_shot.encode_pair(tokenizer, "And God said ", "Let there be light") == (ctx, cont)
  assert zero_shot.encode_pair(tokenizer, "x", "y", add_bos=False)[0] == tokenizer.encode(
      "x", add_bos=False)


# Scoring ----------------------------------------------------------------------------------------


def test_loglikelihood_equals_hand_computation(tokenizer, params):
  pairs = [("In the beginning", " God created the heaven"),
           ("And the earth was", " without form"),
           ("Question: Who?\nAnswer:", " Moses")]
  got = zero_shot.loglikelihoods(CONFIG, params, tokenizer, pairs, batch_size=BATCH)
  # By hand: one forward over the right-padded pairs (causal: padding after a pair cannot
  # change its logits), log_softmax, sum over each continuation's positions.
  encoded = [zero_shot.encode_pair(tokenizer, c, x) for c, x in pairs]
  ids = np.zeros((len(pairs), 32), np.int32)
  for i, (ctx, cont) in enumerate(encoded):
    ids[i, :len(ctx) + len(cont)] = ctx + cont
  logits = jax.jit(Transformer(CONFIG).apply)({"params": params}, jnp.asarray(ids))
  logp = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32)))
  for i, ((ctx, cont), value) in enumerate(zip(encoded, got)):
    want = sum(logp[i, len(ctx) - 1 + j, cont[j]] for j in range(len(cont)))
    np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-5)
  # Order and batch composition do not matter.
  np.testing.assert_allclose(
      zero_shot.loglikelihoods(CONFIG, params, tokenizer, pairs[::-1], batch_size=BATCH),
      got[::-1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      zero_shot.loglikelihoods(CONFIG, params, tokenizer, pairs[1:2], batch_size=BATCH),
      got[1:2], rtol=1e-5, atol=1e-6)


def test_truncation_keeps_the_continuation():
  tok = ByteTokenizer()
  fwd = _unigram_forward({"a": np.log(0.5), "b": np.log(0.25)})
  long_ctx = tok.encode("x" * 40)
  cont = tok.encode("ab", add_bos=False)
  got = zero_shot.score_requests(CONFIG, None, [(long_ctx, cont)], batch_size=2,
                                 max_seq_len=16, forward=fwd)
  np.testing.assert_allclose(got, [np.log(0.5) + np.log(0.25)], rtol=1e-6)
  with pytest.raises(ValueError, match="empty context"):
    zero_shot.score_requests(CONFIG, None, [([], cont)], forward=fwd)
  with pytest.raises(ValueError, match="vocabulary"):
    zero_shot.score_requests(CONFIG, None, [([1, 9999], cont)], forward=fwd)


def test_rigged_model_picks_the_right_answer_and_acc_norm_differs():
  tok = ByteTokenizer()
  # A model that loves 'z' (and spaces, so every continuation's delimiter costs the same).
  fwd = _unigram_forward({"z": np.log(0.6), "a": np.log(0.3), " ": np.log(0.05)})
  right = [tasks.MultipleChoice.shared("Q1:", ["zzz", "bcd", "qqq"], 0),
           tasks.MultipleChoice.shared("Q2:", ["bq", "zz"], 1),
           tasks.MultipleChoice.shared("Q3:", ["bb", "cc", "dd", "z"], 3)]
  res = zero_shot.evaluate_examples(CONFIG, None, tok, right, forward=fwd, batch_size=4)
  assert res == {"acc": 1.0, "acc_norm": 1.0, "n": 3}
  # Eight likely bytes against one less likely byte: the short one wins on total
  # log-likelihood, the long one per byte.
  lengths = [tasks.MultipleChoice.shared("Q:", ["zzzzzzzz", "a"], 0)]
  res = zero_shot.evaluate_examples(CONFIG, None, tok, lengths, forward=fwd, batch_size=4)
  assert res["acc"] == 0.0 and res["acc_norm"] == 1.0
  lls = zero_shot.loglikelihoods(CONFIG, None, tok, [("Q:", " zzzzzzzz"), ("Q:", " a")],
                                 forward=fwd, batch_size=4)
  np.testing.assert_allclose(lls, [np.log(0.05) + 8 * np.log(0.6), np.log(0.05) + np.log(0.3)],
                             rtol=1e-5)


# Records as tfds.data_source returns them; correct answers use letters the wrong ones never do,
# so an oracle bigram table separates them.
RECORDS = {
    "ai2_arc": [{"id": b"1", "question": b"Pick one", "answerKey": np.int64(1),
                 "choices": {"text": np.array([b"bob", b"zyx", b"cab"]),
                             "label": np.array([0, 1, 2])}}],
    "bool_q": [{"question": b"is it", "passage": b"It is.", "title": b"t",
                "answer": np.bool_(True)}],
    "hellaswag": [{"activity_label": b"Act", "context": b"Then", "label": np.int32(2),
                   "endings": np.array([b"abc", b"bca", b"zzy", b"cab"]),
                   "split_type": b"indomain", "source_id": b"s"}],
    "piqa": [{"id": b"1", "goal": b"Do", "sol1": b"cab", "sol2": b"yzz", "label": np.int64(1)}],
    "winogrande": [{"sentence": b"Then _ won.", "option1": b"Baq", "option2": b"Xyz",
                    "label": np.int64(1)}],
}


def _as_data_source(self, split, **kwargs):
  del split, kwargs
  return RECORDS[self.name]


def test_evaluate_tasks_with_an_oracle_model():
  tok = ByteTokenizer()
  names = ["arc_easy", "boolq", "hellaswag", "piqa", "winogrande"]
  with tfds.testing.mock_data(as_data_source_fn=_as_data_source):
    examples = [ex for n in names for ex in tasks.load_task(n).examples]
    results = zero_shot.evaluate_tasks(CONFIG, _oracle_table(examples, tok), tok, names,
                                       forward=_bigram_forward, batch_size=8)
  assert list(results) == names
  for name in names:
    assert results[name]["acc"] == 1.0 and results[name]["n"] == 1, name
    assert results[name]["skipped"] == 0
  assert zero_shot.task_average(results) == 1.0


def test_evaluate_tasks_kjv_and_errors():
  tok = ByteTokenizer()
  fwd = _unigram_forward({"e": np.log(0.2)})
  res = zero_shot.evaluate_tasks(CONFIG, None, tok, "kjv_next_verse", kjv_num_examples=12,
                                 forward=fwd, batch_size=16, max_seq_len=1024)
  assert res["kjv_next_verse"]["n"] == 12
  assert 0.0 <= res["kjv_next_verse"]["acc"] <= 1.0
  with pytest.raises(ValueError, match="did you mean 'piqa'"):
    zero_shot.evaluate_tasks(CONFIG, None, tok, ["kjv_next_verse", "pika"], forward=fwd)


def test_task_average():
  results = {"arc_challenge": {"acc": 0.4, "acc_norm": 0.5},
             "boolq": {"acc": 0.7, "acc_norm": 0.1},
             "piqa": {"acc": 0.6, "acc_norm": 0.8}}
  # Default: acc_norm for ARC/HellaSwag/PIQA, acc for BoolQ/Winogrande.
  assert zero_shot.task_average(results) == pytest.approx((0.5 + 0.7 + 0.8) / 3)
  assert zero_shot.task_average(results, "acc") == pytest.approx((0.4 + 0.7 + 0.6) / 3)
  assert zero_shot.task_average(results, "acc_norm") == pytest.approx((0.5 + 0.1 + 0.8) / 3)
  assert zero_shot.task_average(results, {"piqa": "acc"}) == pytest.approx((0.5 + 0.7 + 0.6) / 3)
  assert {n: s.metric for n, s in tasks.TASKS.items()} == {
      "arc_challenge": "acc_norm", "arc_easy": "acc_norm", "boolq": "acc",
      "hellaswag": "acc_norm", "piqa": "acc_norm", "winogrande": "acc",
      "kjv_next_verse": "acc_norm", "kjv_verse_completion": "acc_norm"}
  with pytest.raises(ValueError, match="unknown metric"):
    zero_shot.task_average(results, "f1")
  with pytest.raises(ValueError, match="no task results"):
    zero_shot.task_average({})
