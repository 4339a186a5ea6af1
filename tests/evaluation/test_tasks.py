"""Task formatting (lm-eval prompts), TFDS reading without TensorFlow, and kjv_next_verse."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow_datasets as tfds

from matquant_jax.data import sources
from matquant_jax.evaluation import tasks

# Formatting on hand-written records --------------------------------------------------------------


def test_arc_tfds_and_hf_forms():
  tfds_record = {
      "id": b"Mercury_7175875", "question": b"Which gas do plants absorb?",
      "choices": {"text": np.array([b"oxygen", b"carbon dioxide", b"helium", b"neon"]),
                  "label": np.array([0, 1, 2, 3])},
      "answerKey": np.int64(1)}
  ex = tasks.arc_example(tfds_record)
  assert ex.contexts == ("Question: Which gas do plants absorb?\nAnswer:",) * 4
  assert ex.choices == ("oxygen", "carbon dioxide", "helium", "neon") and ex.label == 1
  assert ex.continuations[1] == " carbon dioxide"
  # HF/jsonl form: letter or digit keys, and a question with three choices.
  hf = {"question": "Q?", "choices": {"text": ["a", "b", "c"], "label": ["1", "2", "3"]},
        "answerKey": "3"}
  assert tasks.arc_example(hf).label == 2
  hf_letters = {"question": "Q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]},
                "answerKey": "B"}
  assert tasks.arc_example(hf_letters).label == 1
  assert tasks.arc_example({**hf, "answerKey": "E"}) is None  # gold not among the choices


def test_boolq_prompt():
  ex = tasks.boolq_example({"question": b"is the sky blue", "passage": b"The sky is blue.",
                            "title": b"Sky", "answer": np.bool_(True)})
  assert ex.contexts == ("The sky is blue.\nQuestion: is the sky blue?\nAnswer:",) * 2
  assert ex.continuations == (" no", " yes") and ex.label == 1
  assert tasks.boolq_example({"question": "q", "passage": "p", "label": 0}).label == 0


def test_hellaswag_preprocessing():
  # WikiHow artifacts, exactly as lm-eval's `preprocess` (which collapses each "  " once).
  assert tasks.hellaswag_preprocess(" How to cook [title] Boil water. [step] Add salt. ") == (
      "How to cook. Boil water. Add salt.")
  assert tasks.hellaswag_preprocess("[header] Make tea [substeps] Pour") == " Make tea Pour"
  # lm-eval's rule on records with ctx_a / ctx_b: ctx_b capitalised.
  hf = {"activity_label": "Baking cookies", "ctx_a": "A woman mixes dough.",
        "ctx_b": "then she", "endings": ["bakes it.", "eats [title] it.", "x", "y"],
        "label": "1"}
  ex = tasks.hellaswag_example(hf)
  assert ex.contexts[0] == "Baking cookies: A woman mixes dough. Then she"
  assert ex.choices == ("bakes it.", "eats. it.", "x", "y") and ex.label == 1
  # The TFDS record keeps only `context` (= ctx), used as stored.
  tfds_record = {"activity_label": b"Baking cookies", "context": b"A woman mixes dough. then she",
                 "endings": np.array([b"a", b"b", b"c", b"d"]), "label": np.int32(3),
                 "split_type": b"indomain", "source_id": b"x"}
  ex = tasks.hellaswag_example(tfds_record)
  assert ex.contexts == ("Baking cookies: A woman mixes dough. then she",) * 4
  assert ex.label == 3 and ex.continuations[0] == " a"
  assert tasks.hellaswag_example({**tfds_record, "label": np.int32(-1)}) is None  # test split


def test_piqa_prompt():
  ex = tasks.piqa_example({"id": b"1", "goal": b"Open a jar", "sol1": b"Twist the lid.",
                           "sol2": b"Hit it.", "label": np.int64(0)})
  assert ex.contexts == ("Question: Open a jar\nAnswer:",) * 2
  assert ex.continuations == (" Twist the lid.", " Hit it.") and ex.label == 0


def test_winogrande_partial_scoring():
  record = {"sentence": b"The trophy didn't fit in the suitcase because _ was too big.",
            "option1": b"the trophy", "option2": b"the suitcase", "label": np.int64(0)}
  ex = tasks.winogrande_example(record)
  assert ex.contexts == ("The trophy didn't fit in the suitcase because the trophy",
                         "The trophy didn't fit in the suitcase because the suitcase")
  # One continuation, scored after each option.
  assert ex.continuations == (" was too big.", " was too big.") and ex.label == 0
  hf = {"sentence": "Sam gave _ a gift.", "option1": "Ann", "option2": "Bob", "answer": "2"}
  ex = tasks.winogrande_example(hf)
  assert ex.contexts == ("Sam gave Ann", "Sam gave Bob") and ex.label == 1
  assert ex.choices == ("a gift.", "a gift.")
  assert tasks.winogrande_example({**hf, "sentence": "No blank here."}) is None


def test_multiple_choice_checks_and_norm_lengths():
  ex = tasks.MultipleChoice.shared("ctx", ["café", "ab"], 0)
  assert ex.norm_lengths == (5, 2)  # UTF-8 bytes, not characters
  with pytest.raises(ValueError, match="label 2"):
    tasks.MultipleChoice.shared("ctx", ["a", "b"], 2)
  with pytest.raises(ValueError, match="one context per choice"):
    tasks.MultipleChoice(("a",), ("x", "y"), 0)


# TFDS ---------------------------------------------------------------------------------------------


def _check_form(name, ex):
  if name in ("arc_challenge", "arc_easy"):
    assert all(c.startswith("Question: ") and c.endswith("\nAnswer:") for c in ex.contexts)
  elif name == "boolq":
    assert ex.contexts[0].endswith("?\nAnswer:") and "\nQuestion: " in ex.contexts[0]
    assert ex.choices == ("no", "yes")
  elif name == "hellaswag":
    assert ": " in ex.contexts[0]
  elif name == "piqa":
    assert ex.contexts[0].startswith("Question: ") and len(ex.choices) == 2
  elif name == "winogrande":
    assert ex.choices[0] == ex.choices[1] and ex.contexts[0] != ex.contexts[1]
  assert len(set(ex.contexts)) == 1 or name == "winogrande"
  assert all(c.startswith(" ") for c in ex.continuations)


@pytest.mark.parametrize("name", [n for n, s in tasks.TASKS.items() if s.tfds_name])
def test_tfds_tasks_read_through_mock_data(name):
  spec = tasks.TASKS[name]
  with tfds.testing.mock_data(num_examples=4, max_value=2):
    data = tasks.load_task(name, max_examples=3)
  # Random mock strings have no Winogrande blank and ARC labels that may miss the key:
  # such records are skipped and counted, never silently mis-scored.
  assert data.name == name and len(data.examples) + data.skipped == 3
  if name not in ("winogrande", "hellaswag"):
    assert data.examples
  for ex in data.examples:
    _check_form(name, ex)
  assert spec.split == ("test" if name.startswith("arc") else "validation")


# Records as `tfds.data_source` returns them (bytes text, NumPy scalars and arrays), served
# through mock_data's `as_data_source_fn` so the whole TFDS read path runs.
RECORDS = {
    "ai2_arc": [{"id": b"q1", "question": b"What melts ice?",
                 "choices": {"text": np.array([b"heat", b"cold", b"dark"]),
                             "label": np.array([0, 1, 2])},
                 "answerKey": np.int64(0)}],
    "bool_q": [{"question": b"is water wet", "passage": b"Water is a liquid.",
                "title": b"Water", "answer": np.bool_(True)}],
    "hellaswag": [{"activity_label": b"Cooking", "context": b"A man cuts onions. he",
                   "endings": np.array([b"cries [title] a lot.", b"sings.", b"runs.", b"sits."]),
                   "label": np.int32(0), "split_type": b"indomain", "source_id": b"a"}],
    "piqa": [{"id": b"p1", "goal": b"Dry hands", "sol1": b"Use a towel.", "sol2": b"Use water.",
              "label": np.int64(0)}],
    "winogrande": [{"sentence": b"Tom thanked Al because _ helped.", "option1": b"Tom",
                    "option2": b"Al", "label": np.int64(1)}],
}
EXPECTED = {
    "arc_challenge": (("Question: What melts ice?\nAnswer:",) * 3, (" heat", " cold", " dark"), 0),
    "boolq": (("Water is a liquid.\nQuestion: is water wet?\nAnswer:",) * 2, (" no", " yes"), 1),
    "hellaswag": (("Cooking: A man cuts onions. he",) * 4,
                  (" cries. a lot.", " sings.", " runs.", " sits."), 0),
    "piqa": (("Question: Dry hands\nAnswer:",) * 2, (" Use a towel.", " Use water."), 0),
    "winogrande": (("Tom thanked Al because Tom", "Tom thanked Al because Al"),
                   (" helped.", " helped."), 1),
}


def _as_data_source(self, split, **kwargs):
  del split, kwargs
  return RECORDS[self.name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_tfds_tasks_documented_form(name):
  with tfds.testing.mock_data(as_data_source_fn=_as_data_source):
    data = tasks.load_task(name)
  assert data.skipped == 0 and len(data.examples) == 1
  ex = data.examples[0]
  assert (ex.contexts, ex.continuations, ex.label) == EXPECTED[name]
  _check_form(name, ex)


class Winogrande(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """The registered winogrande builder's features, prepared from hand-written rows: real
  array_record files under a test data_dir, read back by the task loader by name."""

  VERSION = tfds.core.Version("1.2.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "sentence": tfds.features.Text(), "option1": tfds.features.Text(),
        "option2": tfds.features.Text(), "label": tfds.features.ClassLabel(names=["1", "2"])}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"validation": self._generate_examples()}

  def _generate_examples(self):
    rows = [("Ann helped Bea because _ was kind.", "Ann", "Bea", "1"),
            ("The cup fell off the shelf so _ broke.", "the shelf", "the cup", "2"),
            ("Café owners like _ and tourists.", "Zoë", "Émile", "1")]
    for i, (s, o1, o2, answer) in enumerate(rows):
      yield i, {"sentence": s, "option1": o1, "option2": o2, "label": answer}


def test_winogrande_from_prepared_array_record(tmp_path):
  Winogrande(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  data = tasks.load_task("winogrande", tfds_data_dir=tmp_path)
  assert data.skipped == 0 and len(data.examples) == 3
  # TFDS stores records in hashed-key order: look them up by content.
  by_start = {ex.contexts[0].split()[0]: ex for ex in data.examples}
  assert by_start["Ann"].label == 0 and by_start["The"].label == 1
  assert by_start["The"].contexts == ("The cup fell off the shelf so the shelf",
                                      "The cup fell off the shelf so the cup")
  assert by_start["The"].continuations == (" broke.",) * 2
  assert by_start["Café"].contexts[0] == "Café owners like Zoë"  # UTF-8 decoded
  assert len(tasks.load_task("winogrande", tfds_data_dir=tmp_path, max_examples=2).examples) == 2


def test_missing_dataset_error(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    tasks.load_task("piqa", tfds_data_dir=tmp_path)
  msg = str(e.value)
  assert "'piqa'" in msg and str(tmp_path) in msg and "tfds build piqa" in msg
  with pytest.raises(FileNotFoundError, match="tfds build ai2_arc/ARC-Challenge"):
    tasks.load_task("arc_challenge", tfds_data_dir=tmp_path)
  with pytest.raises(ValueError, match="did you mean 'hellaswag'"):
    tasks.load_task("helaswag")


# kjv_next_verse -----------------------------------------------------------------------------------


def test_kjv_next_verse_construction():
  a = tasks.kjv_next_verse_examples(60, seed=0)
  b = tasks.kjv_next_verse_examples(60, seed=0)
  assert a == b and len(a) == 60
  assert tasks.kjv_next_verse_examples(20, seed=0) == a[:20]  # prefix-stable
  assert tasks.kjv_next_verse_examples(20, seed=1) != a[:20]
  val = sources.kjv_documents("validation")
  val_verses = {v for ch in val for v in ch.split("\n")[1:]}
  train_only = ({v for ch in sources.kjv_documents("train") for v in ch.split("\n")[1:]}
                - val_verses)
  chapter_of = {}
  for c, ch in enumerate(val):
    for v in ch.split("\n")[1:]:
      chapter_of.setdefault(v, set()).add(c)
  for ex in a:
    assert len(ex.choices) == 4 and len(set(ex.choices)) == 4
    assert set(ex.choices) <= val_verses and not set(ex.choices) & train_only
    assert len(set(ex.contexts)) == 1
    # The context is two consecutive verses of the gold's chapter, right before it.
    gold = ex.choices[ex.label]
    assert any(ex.contexts[0] + " " + gold in " ".join(ch.split("\n")[1:])
               for ch in val)
    # Distractors come from other chapters than the one the item is taken from.
    item_chapters = {c for c in chapter_of[gold]
                     if ex.contexts[0] + " " + gold in " ".join(val[c].split("\n")[1:])}
    for i, choice in enumerate(ex.choices):
      if i != ex.label:
        assert chapter_of[choice] - item_chapters
  assert len({ex.label for ex in a}) == 4  # the gold position varies
  assert len(tasks.load_task("kjv_next_verse", max_examples=5).examples) == 5


def test_kjv_verse_completion_is_held_out_and_deterministic():
  from matquant_jax.data import sources
  a = tasks.kjv_verse_completion_examples(20, seed=3)
  b = tasks.kjv_verse_completion_examples(20, seed=3)
  assert [(x.contexts, x.choices, x.label) for x in a] == [(x.contexts, x.choices, x.label) for x in b]
  train_text = "\n".join(sources.kjv_documents("train"))
  valid_text = "\n".join(sources.kjv_documents("validation"))
  for item in a:
    assert len(set(item.choices)) == 4 and 0 <= item.label < 4
    whole = item.contexts[0] + " " + item.choices[item.label]
    assert whole in valid_text  # the first half and its true ending form a held-out verse
    assert all(c not in train_text or c in valid_text for c in item.choices)
