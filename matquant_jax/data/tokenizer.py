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


# ----------------------------------------------------------------------------------------------
# Hugging Face `tokenizer.json` tokenizers (BPE and friends), for checkpoints that ship no
# SentencePiece model (e.g. SmolLM, Llama-3, many fine-tunes).

HF_TOKENIZER_FILE = "tokenizer.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
SENTENCEPIECE_FILE = "tokenizer.model"


def _token_text(value: Any) -> str | None:
  """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) and value else None


def _read_json(path: pathlib.Path) -> dict[str, Any]:
  import json  # pylint: disable=g-import-not-at-top
  if not path.is_file():
    return {}
  try:
    d = json.loads(path.read_text(encoding="utf-8"))
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is not valid JSON ({e}).") from None
  if not isinstance(d, dict):
    raise ValueError(f"{path} must hold a JSON object, not {type(d).__name__}.")
  return d


class HFTokenizer:
  """A `tokenizer.json` (Hugging Face `tokenizers`) with the interface of `Tokenizer`.

  Special ids come from, in order: `tokenizer_config.json` (`bos_token`, `eos_token`,
  `pad_token`, `unk_token`, looked up in the vocabulary), then `config.json` /
  `generation_config.json` next to it (`bos_token_id`, `eos_token_id`, `pad_token_id`).

  BOS: `add_bos_default` is `tokenizer_config.json`'s `add_bos_token` when it says so, else
  whether the tokenizer's own post-processor puts BOS first (Llama-2/Mistral/Gemma do; GPT-2
  style and SmolLM models add none). A tokenizer without a BOS token never adds one, even when
  asked (`add_bos=True`), since the model was never trained with it. `encode` applies no
  post-processor template: BOS/EOS are added here, explicitly, like `Tokenizer.encode`.

  Stop ids: EOS plus every id listed as `eos_token_id` in config.json / generation_config.json
  (chat models often stop on an end-of-turn token too).
  """

  family = "hf"

  def __init__(self, path: PathLike, *, config_dir: PathLike | None = None):
    """Opens `path` (a tokenizer.json file, or a directory holding one).

    Args:
      path: tokenizer.json or its directory.
      config_dir: where to look for tokenizer_config.json / config.json /
        generation_config.json (default: the tokenizer's directory).
    """
    import tokenizers  # pylint: disable=g-import-not-at-top
    path = pathlib.Path(path)
    if path.is_dir():
      path = path / HF_TOKENIZER_FILE
    if not path.is_file():
      raise FileNotFoundError(f"tokenizer {path} does not exist.")
    try:
      self._tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust library raises its own exception type
      raise ValueError(f"tokenizer {path} is not a Hugging Face tokenizer.json ({e}).") from None
    self._source = str(path)
    folder = pathlib.Path(config_dir) if config_dir is not None else path.parent
    self._configure(_read_json(folder / HF_TOKENIZER_CONFIG), _read_json(folder / "config.json"),
                    _read_json(folder / "generation_config.json"))

  def _configure(self, tok_cfg: dict[str, Any], model_cfg: dict[str, Any],
                 gen_cfg: dict[str, Any]) -> None:
    def token_id(key: str, id_key: str) -> int | None:
      text = _token_text(tok_cfg.get(key))
      if text is not None:
        i = self._tok.token_to_id(text)
        if i is not None:
          return int(i)
      for d in (model_cfg, gen_cfg):
        value = d.get(id_key)
        if isinstance(value, list):
          value = value[0] if value else None
        if isinstance(value, int) and value >= 0:
          return value
      return None

    self._bos = token_id("bos_token", "bos_token_id")
    self._eos = token_id("eos_token", "eos_token_id")
    self._unk = token_id("unk_token", "unk_token_id")
    pad = token_id("pad_token", "pad_token_id")
    # No pad token: pad with EOS (or 0); padded positions are masked out everywhere.
    self._pad = pad if pad is not None else (self._eos if self._eos is not None else 0)
    if self._eos is None:
      raise ValueError(
          f"tokenizer {self._source}: no EOS token (neither tokenizer_config.json's eos_token "
          "nor config.json's eos_token_id); put the tokenizer's files next to it.")
    stops = [self._eos]
    for d in (model_cfg, gen_cfg):
      value = d.get("eos_token_id")
      for i in (value if isinstance(value, list) else [value]):
        if isinstance(i, int) and i >= 0 and i not in stops:
          stops.append(i)
    self._stop_ids = tuple(stops)
    if isinstance(tok_cfg.get("add_bos_token"), bool):
      self._add_bos = tok_cfg["add_bos_token"] and self._bos is not None
    else:
      probe = self._tok.encode("a", add_special_tokens=True).ids
      self._add_bos = self._bos is not None and bool(probe) and probe[0] == self._bos
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
      named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
      template = named.get("default") or next(iter(named.values()), None)
    self._chat_template = template if isinstance(template, str) else None
    self._bos_text = _token_text(tok_cfg.get("bos_token"))
    self._eos_text = _token_text(tok_cfg.get("eos_token"))

  bos_id = property(lambda self: self._bos)
  eos_id = property(lambda self: self._eos)
  pad_id = property(lambda self: self._pad)
  unk_id = property(lambda self: self._unk)
  stop_ids = property(lambda self: self._stop_ids)
  add_bos_default = property(lambda self: self._add_bos)
  source = property(lambda self: self._source, doc="The tokenizer.json file.")
  chat_template = property(lambda self: self._chat_template)

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def __repr__(self) -> str:
    return f"HFTokenizer({self._source!r}, vocab_size={self.vocab_size})"

  def __getstate__(self) -> dict[str, Any]:
    return {"json": self._tok.to_str(), "source": self._source,
            "ids": (self._bos, self._eos, self._unk, self._pad, self._stop_ids, self._add_bos),
            "chat": (self._chat_template, self._bos_text, self._eos_text)}

  def __setstate__(self, state: dict[str, Any]) -> None:
    import tokenizers  # pylint: disable=g-import-not-at-top
    self._tok = tokenizers.Tokenizer.from_str(state["json"])
    self._source = state["source"]
    (self._bos, self._eos, self._unk, self._pad, self._stop_ids, self._add_bos) = state["ids"]
    self._chat_template, self._bos_text, self._eos_text = state["chat"]

  def encode(self, text: str | Sequence[str], add_bos: bool | None = None,
             add_eos: bool = False) -> list[int] | list[list[int]]:
    """Token ids of `text` (a string, or a list of strings for a list of id lists)."""
    add_bos = self._add_bos if add_bos is None else add_bos
    batch = not isinstance(text, str)
    encoded = self._tok.encode_batch(list(text) if batch else [text], add_special_tokens=False)
    head = [self._bos] if add_bos and self._bos is not None else []
    tail = [self._eos] if add_eos else []
    out = [head + e.ids + tail for e in encoded]
    return out if batch else out[0]

  def decode(self, ids: Iterable[int] | np.ndarray) -> str | list[str]:
    """Text of `ids` (2-D: a list of strings); special tokens are skipped."""
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
    return self._tok.decode(ids, skip_special_tokens=True)

  def id_to_piece(self, i: int) -> str:
    return self._tok.id_to_token(int(i))

  def piece_to_id(self, piece: str) -> int:
    i = self._tok.token_to_id(piece)
    return -1 if i is None else int(i)

  def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> str:
    """The prompt text for `messages` ([{"role": "user", "content": ...}]), ready for the
    assistant's turn; BOS is left to encode() when the template writes it as text."""
    if self._chat_template is None:
      raise ValueError(f"tokenizer {self._source} has no chat_template in "
                       f"{HF_TOKENIZER_CONFIG}; sample without --chat.")
    return render_chat_template(self._chat_template, messages, bos_token=self._bos_text or "",
                                eos_token=self._eos_text or "")


# The released Gemma chat format (<start_of_turn>/<end_of_turn> are ids 106/107 in the
# released and in trained gemma-family SentencePiece models). BOS is added by encode().
GEMMA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}<start_of_turn>model\n")
# Mistral/Llama-2 instruct format; BOS added by encode().
MISTRAL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "[INST] {{ message['content'] | trim }} [/INST]"
    "{% else %}{{ message['content'] | trim }}</s>{% endif %}{% endfor %}")


def render_chat_template(template: str, messages: Sequence[dict[str, str]], *,
                         bos_token: str = "", eos_token: str = "") -> str:
  """Renders a Jinja chat template the way transformers does (add_generation_prompt=True).

  A leading BOS written by the template as text is dropped: encode() adds BOS as an id, and
  doing both would give the model two.
  """
  try:
    import jinja2  # pylint: disable=g-import-not-at-top
    from jinja2 import sandbox  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError("chat templates need jinja2 (pip install jinja2).") from None
  bad = [m for m in messages if not isinstance(m, dict) or "role" not in m or "content" not in m]
  if bad:
    raise ValueError(f"chat messages need 'role' and 'content', got {bad[:2]}.")

  def raise_exception(message):
    raise ValueError(f"chat template: {message}")

  env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  env.globals["raise_exception"] = raise_exception
  try:
    text = env.from_string(template).render(
        messages=list(messages), add_generation_prompt=True, bos_token=bos_token,
        eos_token=eos_token)
  except jinja2.TemplateError as e:
    raise ValueError(f"chat template could not be rendered: {e}") from None
  if bos_token and text.startswith(bos_token):
    text = text[len(bos_token):]
  return text


def _sentencepiece_chat(tok: Tokenizer, messages: Sequence[dict[str, str]]) -> str:
  template = GEMMA_CHAT_TEMPLATE if tok.family == "gemma" else MISTRAL_CHAT_TEMPLATE
  return render_chat_template(template, messages)


Tokenizer.apply_chat_template = _sentencepiece_chat  # same interface as HFTokenizer


# Files that define a Hugging Face tokenizer's behaviour (copied together into a run).
HF_TOKENIZER_FILES = (HF_TOKENIZER_FILE, HF_TOKENIZER_CONFIG, "special_tokens_map.json",
                      "generation_config.json", "config.json")
# A run keeps a copied HF tokenizer in <workdir>/tokenizer/: the run's own config.json must not
# be mistaken for the model's (which holds the special ids).
HF_COPY_DIR = "tokenizer"


def copy_tokenizer(tok: Tokenizer | HFTokenizer, workdir: PathLike) -> pathlib.Path:
  """Copies `tok`'s files into a run directory; returns the tokenizer file there."""
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = pathlib.Path(workdir)
  if isinstance(tok, HFTokenizer):
    src_dir = pathlib.Path(tok.source).parent
    dst_dir = workdir / HF_COPY_DIR
    if src_dir.resolve() == dst_dir.resolve():
      return dst_dir / HF_TOKENIZER_FILE
    dst_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tok.source, dst_dir / HF_TOKENIZER_FILE)
    for name in HF_TOKENIZER_FILES[1:]:
      if (src_dir / name).is_file():
        shutil.copyfile(src_dir / name, dst_dir / name)
    return dst_dir / HF_TOKENIZER_FILE
  dst = workdir / SENTENCEPIECE_FILE
  if not dst.exists():
    dst.write_bytes(tok.processor.serialized_model_proto())
  return dst


def find_tokenizer(directory: PathLike) -> pathlib.Path:
  """The tokenizer file in a checkpoint directory: tokenizer.model (SentencePiece) first,
  else tokenizer.json (Hugging Face). Looks in the directory and its parent (an int8 export
  sits in the run directory next to the run's tokenizer)."""
  directory = pathlib.Path(directory)
  for folder in (directory, directory.parent, directory.parent / HF_COPY_DIR):
    for name in (SENTENCEPIECE_FILE, HF_TOKENIZER_FILE):
      if (folder / name).is_file():
        return folder / name
  raise FileNotFoundError(
      f"no tokenizer next to {directory}: expected {SENTENCEPIECE_FILE} (SentencePiece) or "
      f"{HF_TOKENIZER_FILE} (Hugging Face) in it or its parent; pass the tokenizer's path.")


def open_tokenizer(path: PathLike, family: str | None = None) -> Tokenizer | HFTokenizer:
  """Opens a tokenizer by file type: a SentencePiece `.model`, a Hugging Face `tokenizer.json`,
  or a directory holding one of them (tokenizer.model preferred).

  Args:
    path: the file or directory.
    family: SentencePiece family ('gemma', 'mistral', 'llama'; None detects it); ignored for
      tokenizer.json files, whose special tokens come from their own config files.

  Raises:
    FileNotFoundError: nothing there. ValueError: a file that is neither format.
  """
  path = pathlib.Path(path)
  if path.is_dir():
    path = find_tokenizer(path) if any(
        (path / n).is_file() for n in (SENTENCEPIECE_FILE, HF_TOKENIZER_FILE)) else path
    if path.is_dir():
      raise FileNotFoundError(f"{path} holds neither {SENTENCEPIECE_FILE} nor "
                              f"{HF_TOKENIZER_FILE}.")
  if not path.is_file():
    raise FileNotFoundError(f"tokenizer {path} does not exist.")
  if path.suffix == ".json":
    return HFTokenizer(path)
  with open(path, "rb") as fh:
    head = fh.read(64).lstrip()
  if head.startswith(b"{"):
    return HFTokenizer(path)
  try:
    return Tokenizer(path, family)
  except RuntimeError as e:  # sentencepiece: "could not parse ModelProto"
    raise ValueError(f"tokenizer {path} is neither a SentencePiece model nor a Hugging Face "
                     f"tokenizer.json ({e}).") from None
