"""SentencePiece tokenizer wrapper that knows the Gemma and Mistral/Llama special ids.

Special ids (spec/models.md §4), checked against the model file when it is opened:

| family  | PAD | EOS | BOS | UNK | extra stop ids                    | encode(add_bos) default |
|---------|-----|-----|-----|-----|-----------------------------------|-------------------------|
| gemma   | 0   | 1   | 2   | 3   | 107 `<end_of_turn>` (when present) | True                    |
| mistral | 0*  | 2   | 1   | 0   | -                                 | True                    |

(`llama` is an alias of `mistral`: same ids.)

BOS default: both families are trained and evaluated with BOS at the start of every sequence,
so `encode` adds it unless told otherwise. For Gemma this matches HF's GemmaTokenizer and the
legacy gemma sampler; the new gemma library's `Tokenizer.encode` defaults to add_bos=False and
leaves BOS to its sampler, so pass add_bos=False to reproduce that behaviour. EOS is never added
by default.

*Mistral has no padding token (the SentencePiece file has pad_id -1). `pad_id` is 0 (= UNK),
the pad id of the Mistral/Llama model configs: padded positions are masked out by the input
mask, so the token value there never reaches a loss or a logit that is used.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
import dataclasses
import gzip
import io
import os
import pathlib
from typing import Any

import numpy as np
import sentencepiece as spm

PathLike = str | os.PathLike


@dataclasses.dataclass(frozen=True)
class FamilySpec:
  """Special-token ids a model family's tokenizer must have."""
  name: str
  pad_id: int
  eos_id: int
  bos_id: int
  unk_id: int
  file_pad_id: int              # what the .model file says (-1: no pad piece)
  add_bos: bool                 # encode() default
  extra_stop_pieces: tuple[tuple[int, str], ...] = ()   # (id, piece) stop tokens if present
  # Trainer settings of the released tokenizers, so a small trained tokenizer behaves alike.
  pieces: tuple[tuple[str, str], ...] = ()             # (trainer option, piece text)
  add_dummy_prefix: bool = True


# Gemma's ids 4..107: the released tokenizer has <mask>, <2mass>, [@BOS@], 99 <unusedN> pieces,
# then <start_of_turn> (106) and <end_of_turn> (107). Trained tokenizers get the same pieces so
# chat-template ids and stop ids match the real ones.
_GEMMA_RESERVED = (("<mask>", "<2mass>", "[@BOS@]") + tuple(f"<unused{i}>" for i in range(99)) +
                   ("<start_of_turn>", "<end_of_turn>"))
START_OF_TURN_ID = 106
END_OF_TURN_ID = 107

FAMILIES: dict[str, FamilySpec] = {
    "gemma": FamilySpec(
        name="gemma", pad_id=0, eos_id=1, bos_id=2, unk_id=3, file_pad_id=0, add_bos=True,
        extra_stop_pieces=((END_OF_TURN_ID, "<end_of_turn>"),),
        pieces=(("pad_piece", "<pad>"), ("eos_piece", "<eos>"), ("bos_piece", "<bos>"),
                ("unk_piece", "<unk>")),
        add_dummy_prefix=False),
    "mistral": FamilySpec(
        name="mistral", pad_id=0, eos_id=2, bos_id=1, unk_id=0, file_pad_id=-1, add_bos=True,
        pieces=(("unk_piece", "<unk>"), ("bos_piece", "<s>"), ("eos_piece", "</s>")),
        add_dummy_prefix=True),
}
_ALIASES = {"llama": "mistral"}


def family_spec(family: str) -> FamilySpec:
  """The FamilySpec called `family` ('gemma', 'mistral' or 'llama')."""
  key = _ALIASES.get(family, family)
  if key not in FAMILIES:
    raise ValueError(f"unknown tokenizer family {family!r}; known: "
                     f"{sorted(list(FAMILIES) + list(_ALIASES))}.")
  return FAMILIES[key]


def _file_ids(sp: spm.SentencePieceProcessor) -> dict[str, int]:
  return dict(pad_id=sp.pad_id(), eos_id=sp.eos_id(), bos_id=sp.bos_id(), unk_id=sp.unk_id())


def _matches(spec: FamilySpec, ids: dict[str, int]) -> bool:
  return (ids["eos_id"] == spec.eos_id and ids["bos_id"] == spec.bos_id and
          ids["unk_id"] == spec.unk_id and ids["pad_id"] == spec.file_pad_id)


class Tokenizer:
  """A SentencePiece model plus its family's special ids, BOS default and stop ids.

  Attributes:
    family: 'gemma' or 'mistral'.
    vocab_size: number of pieces in the model file.
    bos_id, eos_id, pad_id, unk_id: special ids (see the module docstring for Mistral's pad).
    stop_ids: ids that end generation (EOS, and Gemma's <end_of_turn> when the file has it).
  """

  def __init__(self, model: PathLike | bytes | spm.SentencePieceProcessor,
               family: str | None = None):
    """Opens a tokenizer.

    Args:
      model: path of a `.model` file, its serialized bytes, or a loaded processor.
      family: 'gemma', 'mistral' or 'llama'; None detects it from the file's special ids.

    Raises:
      FileNotFoundError: no such file.
      ValueError: the file's special ids are not those of `family` (or of any family).
    """
    if isinstance(model, spm.SentencePieceProcessor):
      sp, source = model, "<processor>"
    elif isinstance(model, (bytes, bytearray)):
      sp, source = spm.SentencePieceProcessor(model_proto=bytes(model)), "<bytes>"
    else:
      path = pathlib.Path(model)
      if not path.is_file():
        raise FileNotFoundError(f"tokenizer model {path} does not exist.")
      sp, source = spm.SentencePieceProcessor(model_file=str(path)), str(path)
    ids = _file_ids(sp)
    if family is None:
      found = [s for s in FAMILIES.values() if _matches(s, ids)]
      if not found:
        raise ValueError(
            f"tokenizer {source}: special ids {ids} match no known family "
            f"({', '.join(f'{s.name}: eos={s.eos_id} bos={s.bos_id} unk={s.unk_id}' for s in FAMILIES.values())}).")
      spec = found[0]
    else:
      spec = family_spec(family)
      if not _matches(spec, ids):
        want = dict(pad_id=spec.file_pad_id, eos_id=spec.eos_id, bos_id=spec.bos_id,
                    unk_id=spec.unk_id)
        raise ValueError(
            f"tokenizer {source} is not a {spec.name} tokenizer: its special ids are {ids}, a "
            f"{spec.name} tokenizer has {want}. Use the tokenizer released with the checkpoint.")
    self._sp = sp
    self._spec = spec
    self._source = source
    stops = [spec.eos_id]
    for i, piece in spec.extra_stop_pieces:
      if i < sp.get_piece_size() and sp.id_to_piece(i) == piece:
        stops.append(i)
    self._stop_ids = tuple(stops)

  # Presets -----------------------------------------------------------------------------------

  @classmethod
  def from_file(cls, path: PathLike, family: str | None = None) -> Tokenizer:
    """Opens `path`; `family` None detects it from the special ids."""
    return cls(path, family)

  @classmethod
  def gemma(cls, path: PathLike) -> Tokenizer:
    """A Gemma tokenizer (PAD 0, EOS 1, BOS 2, UNK 3; stop also on <end_of_turn> 107)."""
    return cls(path, "gemma")

  @classmethod
  def mistral(cls, path: PathLike) -> Tokenizer:
    """A Mistral/Llama tokenizer (UNK 0, BOS 1, EOS 2; no pad piece, pad_id 0)."""
    return cls(path, "mistral")

  # Properties --------------------------------------------------------------------------------

  family = property(lambda self: self._spec.name)
  bos_id = property(lambda self: self._spec.bos_id)
  eos_id = property(lambda self: self._spec.eos_id)
  pad_id = property(lambda self: self._spec.pad_id)
  unk_id = property(lambda self: self._spec.unk_id)
  stop_ids = property(lambda self: self._stop_ids)
  add_bos_default = property(lambda self: self._spec.add_bos)
  processor = property(lambda self: self._sp)
  source = property(lambda self: self._source, doc="The model file, or '<bytes>'.")

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def __repr__(self) -> str:
    return f"Tokenizer({self._source!r}, family={self.family!r}, vocab_size={self.vocab_size})"

  # Pickling keeps the serialized model, so data-loader workers get a working copy.
  def __getstate__(self) -> dict[str, Any]:
    return {"proto": self._sp.serialized_model_proto(), "family": self.family,
            "source": self._source}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__init__(state["proto"], state["family"])
    self._source = state["source"]

  # Encoding ----------------------------------------------------------------------------------

  def encode(self, text: str | Sequence[str], add_bos: bool | None = None,
             add_eos: bool = False) -> list[int] | list[list[int]]:
    """Token ids of `text` (a string, or a list of strings for a list of id lists).

    Args:
      text: input text; a list is encoded element-wise.
      add_bos: prepend BOS; None uses the family default (True for both families).
      add_eos: append EOS.
    """
    add_bos = self._spec.add_bos if add_bos is None else add_bos
    batch = not isinstance(text, str)
    pieces = self._sp.encode(list(text) if batch else [text], out_type=int)
    head = [self.bos_id] if add_bos else []
    tail = [self.eos_id] if add_eos else []
    out = [head + ids + tail for ids in pieces]
    return out if batch else out[0]

  def decode(self, ids: Iterable[int] | np.ndarray) -> str | list[str]:
    """Text of `ids`; a 2-D input gives a list of strings. Special tokens decode to ''."""
    arr = np.asarray(ids)
    if arr.ndim == 2:
      return [self.decode(row) for row in arr]
    if arr.ndim != 1:
      raise ValueError(f"decode takes a 1-D or 2-D array of ids, got shape {arr.shape}.")
    ids = [int(i) for i in arr]
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(f"ids {bad[:10]} are outside the vocabulary [0, {self.vocab_size}) "
                       "(model logits beyond the vocabulary must be sliced off first).")
    return self._sp.decode(ids)

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def piece_to_id(self, piece: str) -> int:
    return self._sp.piece_to_id(piece)


def _iter_lines(inputs: PathLike | Iterable[PathLike] | Iterable[str]) -> Iterator[str]:
  """Non-empty lines of text files (gzip when named *.gz), or the strings of an iterator."""
  if isinstance(inputs, (str, os.PathLike)):
    if not os.path.isfile(inputs):
      raise FileNotFoundError(f"training text {inputs} does not exist.")
    inputs = [inputs]
  for item in inputs:
    is_path = isinstance(item, os.PathLike) or (
        isinstance(item, str) and "\n" not in item and len(item) < 4096 and os.path.isfile(item))
    if not is_path:
      if item.strip():
        yield item
      continue
    opener = gzip.open if str(item).endswith(".gz") else open
    with opener(item, "rt", encoding="utf-8") as fh:
      for line in fh:
        line = line.rstrip("\n")
        if line.strip():
          yield line


def train_tokenizer(
    inputs: PathLike | Iterable[PathLike] | Iterable[str],
    model_prefix: PathLike | None,
    vocab_size: int,
    family: str = "gemma",
    *,
    model_type: str = "bpe",
    byte_fallback: bool = False,
    input_sentence_size: int = 200_000,
    character_coverage: float = 1.0,
    num_threads: int | None = None,
    seed: int = 0,
) -> Tokenizer:
  """Trains a small SentencePiece model with `family`'s special ids.

  Gemma-family models also get the reserved pieces 4..107 of the released tokenizer, so
  <start_of_turn> is 106 and <end_of_turn> 107 (needs vocab_size well above 108). Normalisation
  follows the released tokenizers: identity rules, no whitespace collapsing, digits split,
  and a dummy leading space for Mistral only.

  Args:
    inputs: a text file, a list of text files (`.gz` read as gzip), or an iterator of strings
      (one sentence or line each).
    model_prefix: writes `<prefix>.model` and `<prefix>.vocab`; None keeps it in memory.
    vocab_size: number of pieces.
    family: 'gemma', 'mistral' or 'llama'.
    model_type: 'bpe' (what both families use) or 'unigram'.
    byte_fallback: map unknown characters to <0xNN> byte pieces (costs 256 pieces).
    input_sentence_size: at most this many lines are sampled for training; keeps training to
      seconds on large corpora.
    character_coverage: fraction of characters covered by pieces.
    num_threads: trainer threads (default: the CPU count).
    seed: random seed of the sentence sampling.

  Returns:
    The trained Tokenizer.
  """
  spec = family_spec(family)
  reserved = _GEMMA_RESERVED if spec.name == "gemma" else ()
  min_vocab = 4 + len(reserved) + (256 if byte_fallback else 0) + 8
  if vocab_size < min_vocab:
    raise ValueError(f"vocab_size={vocab_size} is too small for a {spec.name} tokenizer "
                     f"(needs > {min_vocab} for its special/reserved pieces).")
  options: dict[str, Any] = dict(
      vocab_size=vocab_size, model_type=model_type, byte_fallback=byte_fallback,
      pad_id=spec.file_pad_id, eos_id=spec.eos_id, bos_id=spec.bos_id, unk_id=spec.unk_id,
      normalization_rule_name="identity", remove_extra_whitespaces=False,
      add_dummy_prefix=spec.add_dummy_prefix, split_digits=True,
      character_coverage=character_coverage, input_sentence_size=input_sentence_size,
      shuffle_input_sentence=True, num_threads=num_threads or os.cpu_count() or 1,
      minloglevel=2, **dict(spec.pieces))
  if reserved:
    # user-defined (not control) so chat templates written as text encode to these ids.
    options["user_defined_symbols"] = list(reserved)
  spm.set_random_generator_seed(seed)
  writer = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=_iter_lines(inputs), model_writer=writer,
                                 **options)
  proto = writer.getvalue()
  if model_prefix is not None:
    prefix = pathlib.Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(f"{prefix}.model").write_bytes(proto)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    pathlib.Path(f"{prefix}.vocab").write_text("".join(
        f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n" for i in range(sp.get_piece_size())),
        encoding="utf-8")
    return Tokenizer(pathlib.Path(f"{prefix}.model"), spec.name)
  return Tokenizer(proto, spec.name)
