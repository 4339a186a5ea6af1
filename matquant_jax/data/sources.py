"""Document sources for the LM pipeline: the bundled KJV corpus, local text files, TFDS.

Every source is a random-access sequence of documents (`len(src)`, `src[i] -> str`), which is
what `grain.MapDataset.source` wraps; shuffling, per-host sharding and epochs are done by grain
on indices, so no source ever has to be read in full or in order.

Sources
-------
- `kjv_documents(split)`: the King James Bible bundled as `data/kjv.txt.gz` (one verse per line,
  a heading such as "Genesis 1" or "Song of Solomon 3" before each chapter). One document per
  chapter: the heading line and its verses joined with "\\n" (1189 chapters).
- `text_file_documents(paths, split)`: local UTF-8 text files (gzip when named `*.gz`); one
  document per blank-line-separated block, per non-empty line, or per file.
- `tfds_text_source(name, split, data_dir)`: any TFDS dataset with a text feature (`c4/en`),
  read through `tfds.data_source` — random access over array_record files, no TensorFlow. It
  never downloads: a dataset missing from `data_dir` raises `FileNotFoundError` with the
  command that prepares it.

Train/validation split of the local corpora
-------------------------------------------
Documents are numbered 0, 1, 2, ... in file order (for several files, in the order given).
Document i is validation iff `i % 20 == 19` (every 20th document, 5%), else train; "all" takes
every document. The rule depends only on the file contents, so it is deterministic, the two
splits never overlap, and together they cover the corpus. For the KJV that is 59 validation
and 1130 train chapters.
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
import gzip
import os
import pathlib
import re
from typing import Any, Protocol, runtime_checkable

PathLike = str | os.PathLike

# Every VALIDATION_EVERY-th document (index % VALIDATION_EVERY == VALIDATION_EVERY - 1) is
# validation data in the local corpora.
VALIDATION_EVERY = 20
LOCAL_SPLITS = ("train", "validation", "all")
DOC_SEPARATORS = ("blank_line", "line", "file")

KJV_FILENAME = "kjv.txt.gz"
KJV_ENV = "MATQUANT_KJV_PATH"
_KJV_NUM_CHAPTERS = 1189

# "Genesis 1", "1 Samuel 3", "Song of Solomon 8": optional book number, capitalised words
# ("of" allowed), chapter number. No verse of the KJV matches (verses end in punctuation).
_KJV_HEADING = re.compile(r"^(?:[1-3] )?[A-Z][A-Za-z]*(?: (?:of|[A-Z][A-Za-z]*))* \d+$")


@runtime_checkable
class DocumentSource(Protocol):
  """Random access over documents: what `grain.MapDataset.source` needs."""

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> str:
    ...


class DocumentList(Sequence):
  """An in-memory list of documents with a name (for error messages and reprs)."""

  def __init__(self, documents: Sequence[str], name: str = "documents"):
    self._docs = list(documents)
    self.name = name

  def __len__(self) -> int:
    return len(self._docs)

  def __getitem__(self, index):
    return self._docs[index]

  def __repr__(self) -> str:
    return f"DocumentList({self.name!r}, {len(self)} documents)"


# Splits ---------------------------------------------------------------------------------------


def split_documents(documents: Sequence[str], split: str) -> list[str]:
  """The `split` ('train', 'validation' or 'all') part of `documents` (module docstring)."""
  if split not in LOCAL_SPLITS:
    raise ValueError(f"unknown split {split!r} for a local corpus; use one of {LOCAL_SPLITS} "
                     "(validation = every 20th document, train = the rest).")
  if split == "all":
    return list(documents)
  want_validation = split == "validation"
  return [d for i, d in enumerate(documents)
          if (i % VALIDATION_EVERY == VALIDATION_EVERY - 1) == want_validation]


# KJV ------------------------------------------------------------------------------------------


def kjv_path(path: PathLike | None = None) -> pathlib.Path:
  """Finds the bundled `kjv.txt.gz`.

  An explicit `path`, else `$MATQUANT_KJV_PATH`, is the only place looked at; otherwise
  `data/kjv.txt.gz` in the repository that holds this package (two levels above
  `matquant_jax/data/`), then under the current directory.

  Raises:
    FileNotFoundError: naming every place searched and how to get the file back.
  """
  if path is not None:
    candidates = [pathlib.Path(path)]
  elif os.environ.get(KJV_ENV):
    candidates = [pathlib.Path(os.environ[KJV_ENV])]
  else:
    candidates = [pathlib.Path(__file__).resolve().parents[2] / "data" / KJV_FILENAME,
                  pathlib.Path.cwd() / "data" / KJV_FILENAME]
  for candidate in candidates:
    if candidate.is_file():
      return candidate
  searched = ", ".join(str(c) for c in candidates)
  raise FileNotFoundError(
      f"the KJV corpus {KJV_FILENAME} was not found (searched: {searched}). It ships in the "
      f"repository as data/{KJV_FILENAME}: run from a git checkout (`git checkout -- data/"
      f"{KJV_FILENAME}` restores it), or set ${KJV_ENV} / pass path= to a copy.")


def kjv_chapters(path: PathLike | None = None) -> list[str]:
  """All 1189 KJV chapters in book order, each 'Heading\\nverse\\nverse...'."""
  file = kjv_path(path)
  stat = file.stat()
  # Parsing the 4 MB file takes 0.15 s, and the data pipeline, evaluation and tasks each ask for
  # it; the cache key changes whenever the file does.
  return list(_parse_kjv(str(file.absolute()), stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=4)
def _parse_kjv(path: str, mtime_ns: int, size: int) -> tuple[str, ...]:
  del mtime_ns, size  # cache key only
  file = pathlib.Path(path)
  chapters: list[list[str]] = []
  with gzip.open(file, "rt", encoding="utf-8") as fh:
    for line in fh:
      line = line.rstrip("\n")
      if not line.strip():
        continue
      if _KJV_HEADING.match(line):
        chapters.append([line])
      elif chapters:
        chapters[-1].append(line)
      else:
        raise ValueError(f"{file}: text before the first chapter heading: {line[:80]!r}.")
  if file.name == KJV_FILENAME and len(chapters) != _KJV_NUM_CHAPTERS:
    # The bundled file is fixed; a different count means it was edited or truncated.
    raise ValueError(f"{file}: found {len(chapters)} chapters, the KJV has {_KJV_NUM_CHAPTERS}; "
                     "the file is damaged (restore it with git).")
  return tuple("\n".join(c) for c in chapters)


def kjv_documents(split: str = "train", path: PathLike | None = None) -> DocumentList:
  """KJV chapters of `split` ('train', 'validation' or 'all'): chapter i is validation iff
  i % 20 == 19 (59 chapters), train otherwise (1130)."""
  return DocumentList(split_documents(kjv_chapters(path), split), f"kjv:{split}")


# Local text files -----------------------------------------------------------------------------


def _read_text(path: pathlib.Path) -> str:
  if not path.is_file():
    raise FileNotFoundError(f"text file {path} does not exist (source 'text:<path>[,<path>]').")
  if path.suffix == ".gz":
    with gzip.open(path, "rt", encoding="utf-8") as fh:
      return fh.read()
  return path.read_text(encoding="utf-8")


def text_file_documents(paths: PathLike | Sequence[PathLike], split: str = "all",
                        doc_separator: str = "blank_line") -> DocumentList:
  """Documents of local text files.

  Args:
    paths: one path or a list; `*.gz` files are read as gzip. Documents are numbered across
      the files in the order given.
    split: 'all', 'train' or 'validation' (validation = every 20th document).
    doc_separator: 'blank_line' (a document is a block of lines between blank lines, lines
      kept, joined with '\\n'), 'line' (every non-empty line), or 'file' (each whole file).

  Raises:
    FileNotFoundError: a path does not exist.
    ValueError: an unknown split or separator.
  """
  if doc_separator not in DOC_SEPARATORS:
    raise ValueError(f"unknown doc_separator {doc_separator!r}; use one of {DOC_SEPARATORS}.")
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  paths = [pathlib.Path(p) for p in paths]
  if not paths:
    raise ValueError("text_file_documents needs at least one path.")
  missing = [str(p) for p in paths if not p.is_file()]
  if missing:
    raise FileNotFoundError(f"text files not found: {missing}.")
  docs: list[str] = []
  for p in paths:
    text = _read_text(p).replace("\r\n", "\n")
    if doc_separator == "file":
      if text.strip():
        docs.append(text.strip("\n"))
    elif doc_separator == "line":
      docs.extend(line for line in text.split("\n") if line.strip())
    else:
      blocks = re.split(r"\n[ \t]*\n", text)
      docs.extend(b.strip("\n") for b in blocks if b.strip())
  name = "text:" + ",".join(str(p) for p in paths)
  return DocumentList(split_documents(docs, split), f"{name}:{split}")


# TFDS -----------------------------------------------------------------------------------------


class TfdsTextSource:
  """One text feature of a TFDS array_record split, as a random-access document source.

  Records are decoded by TFDS (`deserialize_example_np`, NumPy only); text arrives as bytes and
  is returned as str.
  """

  def __init__(self, data_source: Any, name: str, split: str, text_key: str = "text"):
    self._source = data_source
    self.name = name
    self.split = split
    self.text_key = text_key

  def __len__(self) -> int:
    return len(self._source)

  def _text(self, record: Any) -> str:
    try:
      text = record[self.text_key]
    except (KeyError, TypeError, IndexError) as e:
      keys = sorted(record) if isinstance(record, dict) else type(record).__name__
      raise KeyError(f"TFDS {self.name}[{self.split}] records have no text feature "
                     f"{self.text_key!r} (features: {keys}); set tfds_text_key.") from e
    return text.decode("utf-8") if isinstance(text, bytes) else str(text)

  def __getitem__(self, index: int) -> str:
    return self._text(self._source[index])

  def __getitems__(self, indices: Sequence[int]) -> list[str]:
    # One batched read per grain request; array_record reads several records at once.
    getitems = getattr(self._source, "__getitems__", None)
    records = getitems(indices) if getitems else [self._source[i] for i in indices]
    return [self._text(r) for r in records]

  def __repr__(self) -> str:
    return f"TfdsTextSource({self.name!r}, split={self.split!r}, {len(self)} records)"


def _import_tfds():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  # c4, hellaswag, winogrande, ... are registered by this import, not by the top-level one.
  import tensorflow_datasets.text  # pylint: disable=g-import-not-at-top,unused-import
  return tfds


def _prepare_hint(name: str, data_dir: str) -> str:
  return (f"This pipeline never downloads. Prepare it as array_record on a machine with "
          f"network access and copy it here: `tfds build {name} --data_dir={data_dir} "
          f"--file_format=array_record` (c4 needs Apache Beam and is large: build it once, or "
          f"convert an existing TFRecord copy with `tfds convert_format "
          f"--dataset_version_dir=<dir>/{name}/<version> --out_file_format=array_record`), "
          f"then copy the <name>/<config>/<version>/ folder (dataset_info.json, features.json, "
          f"*.array_record-* files) under {data_dir}, or set tfds_data_dir to where it is.")


def tfds_text_source(name: str, split: str, data_dir: PathLike | None = None,
                     text_key: str = "text") -> TfdsTextSource:
  """Random-access text of TFDS dataset `name` (e.g. 'c4/en'), split `split`.

  Args:
    name: TFDS name, with config and version if wanted ('c4/en', 'c4/en:3.1.0').
    split: a TFDS split string ('train', 'validation', 'train[:1%]').
    data_dir: TFDS data dir; None is TFDS's default ($TFDS_DATA_DIR or ~/tensorflow_datasets).
    text_key: the text feature.

  Raises:
    FileNotFoundError: the dataset is not prepared under data_dir, or the name is unknown and
      no prepared files carry it; the message names the dataset, the folder searched and how to
      prepare it.
    ValueError: it is prepared in a format without random access (TFRecord), or the split
      does not exist.
  """
  tfds = _import_tfds()
  data_dir = None if data_dir is None else os.fspath(data_dir)
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # pylint: disable=broad-except
    raise _diagnose_tfds(tfds, name, split, data_dir, e) from e
  return TfdsTextSource(source, name, split, text_key)


def _diagnose_tfds(tfds, name: str, split: str, data_dir: str | None,
                   error: Exception) -> Exception:
  """A clear error for a failed `tfds.data_source` call."""
  shown_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or str(tfds.core.constants.DATA_DIR)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    return FileNotFoundError(
        f"TFDS dataset {name!r} is neither a registered TFDS dataset nor prepared under "
        f"data_dir {shown_dir} (looked for {shown_dir}/{name.split(':')[0]}/<version>/"
        f"dataset_info.json). Check the name (C4 is 'c4/en'); a dataset without TFDS code "
        f"needs its prepared array_record files copied there (<name>/<config>/<version>/ with "
        f"dataset_info.json, features.json, *.array_record-*). This pipeline never downloads.")
  except Exception:  # pylint: disable=broad-except
    return error
  version_dir = str(builder.data_dir)
  if not builder.is_prepared():
    return FileNotFoundError(
        f"TFDS dataset {name!r} is not prepared under data_dir {shown_dir} (no "
        f"{version_dir}/dataset_info.json). " + _prepare_hint(name, shown_dir))
  file_format = builder.info.file_format
  fmt = getattr(file_format, "value", str(file_format))
  if fmt not in ("array_record", "parquet"):
    return ValueError(
        f"TFDS dataset {name!r} at {version_dir} is prepared as {fmt}, which has no random "
        f"access without TensorFlow. Convert it: `tfds convert_format --dataset_version_dir="
        f"{version_dir} --out_file_format=array_record --out_dir=<new dir>` (or rebuild with "
        f"--file_format=array_record) and point tfds_data_dir there.")
  splits = sorted(builder.info.splits)
  if isinstance(error, ValueError) or isinstance(error, KeyError):
    return ValueError(f"TFDS dataset {name!r} at {version_dir}: cannot read split {split!r} "
                      f"({error}); prepared splits: {splits}.")
  return error


# Source strings (DataConfig.source) -----------------------------------------------------------


def parse_source(spec: str) -> tuple[str, Any]:
  """Splits a source string: 'kjv' → ('kjv', None); 'text:a.txt,b.txt.gz' → ('text', [paths]);
  'tfds:c4/en' → ('tfds', 'c4/en').

  Raises:
    ValueError: any other form.
  """
  if not isinstance(spec, str):
    raise ValueError(f"source must be a string, got {type(spec).__name__}.")
  spec = spec.strip()
  kind, _, rest = spec.partition(":")
  if spec == "kjv":
    return "kjv", None
  if kind == "text" and rest:
    paths = [p.strip() for p in rest.split(",") if p.strip()]
    if paths:
      return "text", paths
  if kind == "tfds" and rest.strip():
    return "tfds", rest.strip()
  raise ValueError(f"unknown data source {spec!r}; use 'kjv', 'text:<path>[,<path>...]' or "
                   "'tfds:<name>' (e.g. 'tfds:c4/en').")


def make_source(spec: str, split: str, *, tfds_data_dir: PathLike | None = None,
                tfds_text_key: str = "text",
                text_doc_separator: str = "blank_line") -> DocumentSource:
  """The documents of source string `spec` (see `parse_source`) and split `split`.

  For 'kjv' and 'text:' the split is 'train', 'validation' or 'all' (every 20th document is
  validation); for 'tfds:' it is any TFDS split string.
  """
  kind, arg = parse_source(spec)
  if kind == "kjv":
    return kjv_documents(split)
  if kind == "text":
    return text_file_documents(arg, split, doc_separator=text_doc_separator)
  return tfds_text_source(arg, split, data_dir=tfds_data_dir, text_key=tfds_text_key)
