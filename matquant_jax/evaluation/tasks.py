"""Zero-shot multiple-choice tasks: the paper's six (spec §8) and one built from the KJV.

Every task item becomes a `MultipleChoice`: one context per choice, the choices, and the gold
index. A choice is scored as the log-likelihood of `" " + choice` (lm-eval-harness's target
delimiter) given its context; see zero_shot.py. Prompts follow lm-eval-harness (v0.4 task
YAMLs); the paper names neither harness nor version (spec §8):

  task            TFDS name (split read)         context / continuation
  arc_challenge   ai2_arc/ARC-Challenge (test)   "Question: {question}\\nAnswer:" / " {choice}"
  arc_easy        ai2_arc/ARC-Easy (test)        same as arc_challenge
  boolq           bool_q (validation)            "{passage}\\nQuestion: {question}?\\nAnswer:"
                                                 / " no", " yes"
  hellaswag       hellaswag (validation)         "{activity_label}: {ctx}" / " {ending}", both
                                                 cleaned by `hellaswag_preprocess`
  piqa            piqa (validation)              "Question: {goal}\\nAnswer:" / " {sol1|sol2}"
  winogrande      winogrande (validation)        partial scoring: "{sentence up to _}{option}"
                                                 / " {rest of the sentence after _}"
  kjv_next_verse  bundled KJV, validation        "{verse i-2} {verse i-1}" / " {verse}"
                  chapters

Splits are lm-eval's: test for ARC (its labels are public), validation for the others (their
test labels are hidden). TFDS 4.9.10 features read (records come back decoded by TFDS, NumPy
only, no TensorFlow):

- ai2_arc/<config> 1.0.0: id, question (Text), choices = Sequence{text: Text, label:
  ClassLabel[A-E]}, answerKey (ClassLabel[A-E]); the gold is answerKey's position in
  choices.label (a few questions have 3 or 5 choices).
- bool_q 1.0.0: question, passage, title (Text), answer (bool); gold 1 = " yes".
- hellaswag 1.1.0 (registered by `import tensorflow_datasets.text`): context (the jsonl's
  `ctx`), endings (Sequence[Text], 4), activity_label, label (int32; -1 on test), split_type,
  source_id. TFDS keeps only `ctx = ctx_a + " " + ctx_b`, not the two halves, so lm-eval's
  `ctx_b.capitalize()` cannot be applied to TFDS records: the query uses `ctx` as stored (the
  first word of ctx_b stays lower-case). Records that carry ctx_a/ctx_b (the HF/jsonl form) get
  lm-eval's exact rule.
- piqa 1.0.0: id, goal, sol1, sol2 (Text), label (ClassLabel, 2).
- winogrande 1.2.0 (registered by `import tensorflow_datasets.text`): sentence, option1,
  option2 (Text), label (ClassLabel names ['1', '2'], so option1 -> 0). TFDS has no builder
  configs (no 'winogrande_xl'): the training sizes are splits train_xs..train_xl, and
  'validation' is the dev set (1,267 items) that lm-eval's winogrande_xl reads.

Records that cannot form a question (no '_' in a Winogrande sentence, a gold index outside the
choices, fewer than two choices, a test-split label of -1) are skipped and counted in
`TaskData.skipped`; real validation data has none.

HF-style dicts (`answerKey` 'A'/'1', BoolQ `label`, Winogrande `answer` '1'/'2', HellaSwag
ctx_a/ctx_b) are accepted too, so the formatting functions can be used on lm-eval's datasets.

kjv_next_verse
--------------
A 4-way task from the bundled KJV's *validation* chapters (every 20th chapter, 59 chapters,
1,573 verses; the trainer never sees them):

1. Candidate positions are every (chapter, verse i) with i >= 2 in chapter order (verses
   numbered from 0 after the heading line), 1,455 in all.
2. `np.random.default_rng(seed).permutation` orders them; the first `num_examples` are the
   items, so a smaller num_examples is a prefix of a larger one.
3. Item k (with its own generator `default_rng([seed, k])`): context = verse i-2 + " " +
   verse i-1, correct choice = verse i, three distractors drawn uniformly from the verses of
   the *other* validation chapters, distinct from each other and from the correct verse (as
   strings: the KJV repeats some verses), and the gold placed at a uniformly drawn position.

Metric choice for the task average
----------------------------------
Every task reports `acc` and `acc_norm` (log-likelihood / UTF-8 byte length of the choice). The
task average uses `TaskSpec.metric`, the common practice of LLM quantization papers
(OmniQuant, Ma et al.): acc_norm for ARC-c, ARC-e, HellaSwag and PIQA; acc for BoolQ and
Winogrande (whose choices are one word or identical continuations); acc_norm for
kjv_next_verse (verses differ a lot in length). `zero_shot.task_average` can override it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import difflib
import os
import re
from typing import Any

import numpy as np

from matquant_jax.data import sources

TARGET_DELIMITER = " "
KJV_NUM_CHOICES = 4
KJV_CONTEXT_VERSES = 2


@dataclasses.dataclass(frozen=True)
class MultipleChoice:
  """One multiple-choice item.

  Attributes:
    contexts: one context per choice ([num_choices] strings; equal except in Winogrande).
    choices: the answer texts, without the leading target delimiter; the continuation scored
      is `TARGET_DELIMITER + choice`, and acc_norm divides by the choice's UTF-8 length.
    label: index of the correct choice.
  """

  contexts: tuple[str, ...]
  choices: tuple[str, ...]
  label: int

  def __post_init__(self):
    object.__setattr__(self, "contexts", tuple(self.contexts))
    object.__setattr__(self, "choices", tuple(self.choices))
    if len(self.contexts) != len(self.choices) or len(self.choices) < 2:
      raise ValueError(f"a MultipleChoice needs >= 2 choices and one context per choice, got "
                       f"{len(self.contexts)} contexts for {len(self.choices)} choices.")
    if not 0 <= self.label < len(self.choices):
      raise ValueError(f"label {self.label} is outside the {len(self.choices)} choices.")

  @classmethod
  def shared(cls, context: str, choices: Sequence[str], label: int) -> MultipleChoice:
    """An item whose choices all follow the same context."""
    return cls((context,) * len(choices), tuple(choices), int(label))

  @property
  def continuations(self) -> tuple[str, ...]:
    """What is scored after each context: `" " + choice`."""
    return tuple(TARGET_DELIMITER + c for c in self.choices)

  @property
  def norm_lengths(self) -> tuple[int, ...]:
    """acc_norm's divisor per choice: its length in UTF-8 bytes (at least 1)."""
    return tuple(max(1, len(c.encode("utf-8"))) for c in self.choices)


# Record field access (TFDS gives bytes/NumPy, hand-written dicts give str/int) ------------------


def _text(x: Any) -> str:
  if isinstance(x, np.ndarray) and x.ndim == 0:
    x = x.item()
  if isinstance(x, np.generic):
    x = x.item()
  if isinstance(x, bytes):
    return x.decode("utf-8")
  return str(x)


def _items(x: Any) -> list[Any]:
  if isinstance(x, np.ndarray):
    return list(x.reshape(-1))
  return list(x)


def _int(x: Any) -> int:
  if isinstance(x, np.ndarray):
    x = x.item()
  if isinstance(x, (bytes, str)):
    return int(_text(x))
  return int(x)


def _arc_label(x: Any) -> int:
  """ClassLabel index (TFDS) or a letter 'A'..'E' / digit '1'..'5' (the raw data)."""
  if isinstance(x, (bytes, str, np.str_, np.bytes_)):
    s = _text(x).strip()
    if len(s) == 1 and "A" <= s <= "E":
      return ord(s) - ord("A")
    return int(s) - 1
  return _int(x)


# Formatting (one function per task: record -> MultipleChoice, or None if malformed) -------------


def arc_example(record: Mapping[str, Any]) -> MultipleChoice | None:
  """ARC: "Question: {question}\\nAnswer:" / " {choice}"."""
  texts = [_text(t) for t in _items(record["choices"]["text"])]
  labels = [_arc_label(l) for l in _items(record["choices"]["label"])]
  key = _arc_label(record["answerKey"])
  if key not in labels or labels.index(key) >= len(texts) or len(texts) < 2:
    return None
  return MultipleChoice.shared(f"Question: {_text(record['question'])}\nAnswer:", texts,
                               labels.index(key))


def boolq_example(record: Mapping[str, Any]) -> MultipleChoice | None:
  """BoolQ: "{passage}\\nQuestion: {question}?\\nAnswer:" / " no", " yes"."""
  answer = record["answer"] if "answer" in record else record["label"]
  if isinstance(answer, (str, bytes)):
    answer = _text(answer).strip().lower() in ("true", "yes", "1")
  label = int(bool(np.asarray(answer).item()))
  context = f"{_text(record['passage'])}\nQuestion: {_text(record['question'])}?\nAnswer:"
  return MultipleChoice.shared(context, ("no", "yes"), label)


def hellaswag_preprocess(text: str) -> str:
  """lm-eval's HellaSwag cleaning: WikiHow's " [title]" becomes ". ", other "[...]" artifacts
  ([header], [step], [substeps]) are dropped, double spaces collapsed."""
  text = text.strip()
  text = text.replace(" [title]", ". ")
  text = re.sub(r"\[.*?\]", "", text)
  return text.replace("  ", " ")


def hellaswag_example(record: Mapping[str, Any]) -> MultipleChoice | None:
  """HellaSwag: query "{activity_label}: {ctx}" / " {ending}", cleaned (module docstring)."""
  if "ctx_a" in record and "ctx_b" in record:
    ctx = _text(record["ctx_a"]) + " " + _text(record["ctx_b"]).capitalize()
  else:
    ctx = _text(record["context"] if "context" in record else record["ctx"])
  query = hellaswag_preprocess(_text(record["activity_label"]) + ": " + ctx)
  endings = [hellaswag_preprocess(_text(e)) for e in _items(record["endings"])]
  label = _int(record["label"])
  if not 0 <= label < len(endings) or len(endings) < 2:
    return None
  return MultipleChoice.shared(query, endings, label)


def piqa_example(record: Mapping[str, Any]) -> MultipleChoice | None:
  """PIQA: "Question: {goal}\\nAnswer:" / " {sol1}", " {sol2}"."""
  label = _int(record["label"])
  if label not in (0, 1):
    return None
  return MultipleChoice.shared(f"Question: {_text(record['goal'])}\nAnswer:",
                               (_text(record["sol1"]), _text(record["sol2"])), label)


def winogrande_example(record: Mapping[str, Any]) -> MultipleChoice | None:
  """Winogrande, partial scoring: context = the sentence up to "_" with the option put in,
  continuation = " " + the rest of the sentence (the same for both options)."""
  sentence = _text(record["sentence"])
  idx = sentence.find("_")
  if idx < 0:
    return None
  if "answer" in record:  # HF/jsonl: '1' or '2'
    label = _int(record["answer"]) - 1
  else:
    raw = record["label"]
    label = _int(raw) - 1 if isinstance(raw, (str, bytes)) else _int(raw)
  if label not in (0, 1):
    return None
  options = (_text(record["option1"]), _text(record["option2"]))
  rest = sentence[idx + 1:].strip()
  return MultipleChoice(tuple(sentence[:idx] + o for o in options), (rest, rest), label)


# kjv_next_verse ---------------------------------------------------------------------------------


def _kjv_verses(path) -> list[list[str]]:
  chapters = sources.kjv_documents("validation", path)
  return [[v.strip() for v in ch.split("\n")[1:] if v.strip()] for ch in chapters]


def kjv_next_verse_examples(num_examples: int | None = 500, *, seed: int = 0,
                            path: str | os.PathLike | None = None) -> list[MultipleChoice]:
  """The kjv_next_verse items (construction in the module docstring).

  Args:
    num_examples: number of items (at most 1,455); None = all.
    seed: the construction's seed.
    path: another copy of kjv.txt.gz (default: the bundled one).

  Returns:
    [num_examples] MultipleChoice items with 4 distinct choices each.
  """
  chapters = _kjv_verses(path)
  candidates = [(c, i) for c, verses in enumerate(chapters)
                for i in range(KJV_CONTEXT_VERSES, len(verses))]
  if num_examples is not None and (isinstance(num_examples, bool) or num_examples < 1):
    raise ValueError(f"num_examples must be a positive integer or None, got {num_examples!r}.")
  order = np.random.default_rng(seed).permutation(len(candidates))
  if num_examples is not None:
    order = order[:num_examples]
  pool = [(c, v) for c, verses in enumerate(chapters) for v in verses]
  items = []
  for k, idx in enumerate(order):
    c, i = candidates[idx]
    verses = chapters[c]
    rng = np.random.default_rng([seed, k])
    correct = verses[i]
    picked: list[str] = []
    while len(picked) < KJV_NUM_CHOICES - 1:
      oc, text = pool[int(rng.integers(len(pool)))]
      if oc != c and text != correct and text not in picked:
        picked.append(text)
    gold = int(rng.integers(KJV_NUM_CHOICES))
    choices = picked[:gold] + [correct] + picked[gold:]
    context = " ".join(verses[i - KJV_CONTEXT_VERSES:i])
    items.append(MultipleChoice.shared(context, choices, gold))
  return items


def kjv_verse_completion_examples(num_examples: int | None = 500, *, seed: int = 0,
                                  path: str | os.PathLike | None = None) -> list[MultipleChoice]:
  """kjv_verse_completion: finish a held-out verse from its first half, 4-way.

  A verse of at least 8 words from a validation chapter is cut after half its words; the
  correct continuation is its second half, the 3 distractors are second halves of verses from
  other validation chapters (seeded). Shorter than kjv_next_verse (no preceding verses), and
  within-verse grammar gives even a tiny model a signal, so it is the demo's task.
  """
  if num_examples is not None and (isinstance(num_examples, bool) or num_examples < 1):
    raise ValueError(f"num_examples must be a positive integer or None, got {num_examples!r}.")
  chapters = _kjv_verses(path)
  halves = []  # (chapter, first half, second half)
  for c, verses in enumerate(chapters):
    for v in verses:
      words = v.split()
      if len(words) >= 8:
        cut = len(words) // 2
        halves.append((c, " ".join(words[:cut]), " ".join(words[cut:])))
  order = np.random.default_rng(seed).permutation(len(halves))
  if num_examples is not None:
    order = order[:num_examples]
  items = []
  for k, idx in enumerate(order):
    c, first, correct = halves[idx]
    rng = np.random.default_rng([seed, k, 1])
    picked: list[str] = []
    while len(picked) < KJV_NUM_CHOICES - 1:
      oc, _, text = halves[int(rng.integers(len(halves)))]
      if oc != c and text != correct and text not in picked:
        picked.append(text)
    gold = int(rng.integers(KJV_NUM_CHOICES))
    items.append(MultipleChoice.shared(first, picked[:gold] + [correct] + picked[gold:], gold))
  return items


# Registry ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """A registered task.

  Attributes:
    name: registry key.
    tfds_name: TFDS dataset (with config), or None for a task built from the bundled corpus.
    split: the split read (lm-eval's).
    to_example: record -> MultipleChoice, or None for a malformed record.
    metric: 'acc' or 'acc_norm', the one the task average uses by default.
    description: one line for reports.
  """

  name: str
  tfds_name: str | None
  split: str
  to_example: Callable[[Mapping[str, Any]], MultipleChoice | None] | None
  metric: str
  description: str


TASKS: dict[str, TaskSpec] = {
    "arc_challenge": TaskSpec("arc_challenge", "ai2_arc/ARC-Challenge", "test", arc_example,
                              "acc_norm", "ARC-Challenge, 4-5 way science questions"),
    "arc_easy": TaskSpec("arc_easy", "ai2_arc/ARC-Easy", "test", arc_example, "acc_norm",
                         "ARC-Easy, 4-5 way science questions"),
    "boolq": TaskSpec("boolq", "bool_q", "validation", boolq_example, "acc",
                      "BoolQ, yes/no questions about a passage"),
    "hellaswag": TaskSpec("hellaswag", "hellaswag", "validation", hellaswag_example, "acc_norm",
                          "HellaSwag, 4-way sentence completion"),
    "piqa": TaskSpec("piqa", "piqa", "validation", piqa_example, "acc_norm",
                     "PIQA, 2-way physical commonsense"),
    "winogrande": TaskSpec("winogrande", "winogrande", "validation", winogrande_example, "acc",
                           "Winogrande, 2-way pronoun resolution (partial scoring)"),
    "kjv_next_verse": TaskSpec("kjv_next_verse", None, "validation", None, "acc_norm",
                               "KJV next verse, 4-way, from held-out chapters"),
    "kjv_verse_completion": TaskSpec("kjv_verse_completion", None, "validation", None,
                                     "acc_norm", "KJV verse completion, 4-way, held-out chapters"),
}
_BUNDLED_BUILDERS = {"kjv_next_verse": kjv_next_verse_examples,
                     "kjv_verse_completion": kjv_verse_completion_examples}

# The six tasks of the paper's "Task Avg." (spec §7-§8).
PAPER_TASKS = ("arc_challenge", "arc_easy", "boolq", "hellaswag", "piqa", "winogrande")


def get_task(name: str) -> TaskSpec:
  """The registered task `name`; a ValueError names the closest match otherwise."""
  try:
    return TASKS[name]
  except (KeyError, TypeError):
    close = difflib.get_close_matches(str(name), TASKS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"unknown task {name!r}{hint}; registered tasks: "
                     f"{', '.join(TASKS)}.") from None


@dataclasses.dataclass(frozen=True)
class TaskData:
  """The items of one task. `skipped` counts records that could not form an item."""

  name: str
  examples: list[MultipleChoice]
  skipped: int = 0


def read_tfds_records(tfds_name: str, split: str, *, data_dir: str | os.PathLike | None = None,
                      max_examples: int | None = None) -> list[Mapping[str, Any]]:
  """The first `max_examples` records (all if None) of a prepared TFDS dataset.

  Read with `tfds.data_source` (array_record random access, NumPy decoding, no TensorFlow);
  never downloads.

  Raises:
    FileNotFoundError: the dataset is not prepared under data_dir; the message gives the
      `tfds build ... --file_format=array_record` command that prepares it.
    ValueError: it is prepared without random access (TFRecord), or the split is missing.
  """
  tfds = sources._import_tfds()  # pylint: disable=protected-access
  data_dir = None if data_dir is None else os.fspath(data_dir)
  try:
    source = tfds.data_source(tfds_name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # pylint: disable=broad-except
    raise sources._diagnose_tfds(  # pylint: disable=protected-access
        tfds, tfds_name, split, data_dir, e) from e
  n = len(source) if max_examples is None else min(len(source), max_examples)
  # One record at a time: mocked sources (tfds.testing) lack a working __getitems__.
  return [source[i] for i in range(n)]


def load_task(name: str, *, tfds_data_dir: str | os.PathLike | None = None,
              split: str | None = None, max_examples: int | None = None,
              kjv_num_examples: int = 500, seed: int = 0) -> TaskData:
  """The items of task `name`.

  Args:
    name: a key of TASKS.
    tfds_data_dir: where the TFDS datasets are prepared (None = TFDS's default).
    split: override the task's split (e.g. 'validation' for ARC).
    max_examples: the first N records (lm-eval's --limit); None = the whole split.
    kjv_num_examples: items of a bundled KJV task (before max_examples caps it).
    seed: the bundled KJV tasks' construction seed.

  Returns:
    TaskData with the items in dataset order.
  """
  spec = get_task(name)
  if max_examples is not None and (isinstance(max_examples, bool) or max_examples < 1):
    raise ValueError(f"max_examples must be a positive integer or None, got {max_examples!r}.")
  if spec.tfds_name is None:
    n = kjv_num_examples if max_examples is None else min(kjv_num_examples, max_examples)
    return TaskData(name, _BUNDLED_BUILDERS[name](n, seed=seed))
  records = read_tfds_records(spec.tfds_name, split or spec.split, data_dir=tfds_data_dir,
                              max_examples=max_examples)
  examples = []
  for r in records:
    ex = spec.to_example(r)
    if ex is not None:
      examples.append(ex)
  return TaskData(name, examples, len(records) - len(examples))
