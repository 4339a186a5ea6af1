"""Hugging Face checkpoint directories (config.json + safetensors) <-> our parameter tree.

Supported architectures: `Gemma2ForCausalLM`, `MistralForCausalLM`, `LlamaForCausalLM`.
A directory holds `config.json` and either `model.safetensors` or the sharded
`model-0000i-of-0000n.safetensors` files listed by `model.safetensors.index.json`
(pickled `pytorch_model.bin` files are refused: this library never unpickles).

Loading is strict and two-phase: the headers of every file are read first (names, shapes,
dtypes; no tensor data) and compared with what the config needs, so a wrong checkpoint fails
with one error that lists every difference and nothing is half-loaded. Tensors are then read
one at a time and cast to the requested dtype, so peak host memory is about the size of the
result, not twice it.

HF names <-> our tree (and HF config.json <-> TransformerConfig) live in
`matquant_jax.models.hf_mapping`; this module only does the file IO.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
import dataclasses
import json
import math
import os
import pathlib
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np
import safetensors

from matquant_jax.checkpoints import _common
from matquant_jax.checkpoints._common import CheckpointError
from matquant_jax.checkpoints._common import CheckpointMismatchError
from matquant_jax.models import config as config_lib
from matquant_jax.models.config import TransformerConfig

PathLike = str | os.PathLike

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# model_type -> the one architecture we accept for it.
SUPPORTED_ARCHITECTURES = {
    "gemma2": "Gemma2ForCausalLM",
    "mistral": "MistralForCausalLM",
    "llama": "LlamaForCausalLM",
}

# safetensors dtype tags (https://github.com/huggingface/safetensors, `Dtype`). Little-endian.
_ST_TO_NP = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype(bool),
}
_NP_TO_ST = {v: k for k, v in _ST_TO_NP.items()}


# --------------------------------------------------------------------------------------------
# safetensors files: headers, reading, writing.


class TensorInfo(NamedTuple):
  """Where one stored tensor lives and what it is (from the file header alone)."""
  file: pathlib.Path
  shape: tuple[int, ...]
  dtype: Any                  # numpy dtype, or the raw tag when numpy has no such dtype
  offsets: tuple[int, int]    # byte range within the data section
  data_start: int             # where the data section begins in the file


def read_header(file: PathLike) -> tuple[dict[str, Any], int]:
  """The JSON header of a safetensors file and the byte offset where its data begins.

  Reads only the header, so listing a 50 GB shard costs a few kilobytes of IO.
  """
  file = pathlib.Path(file)
  with open(file, "rb") as fh:
    raw_len = fh.read(8)
    if len(raw_len) != 8:
      raise CheckpointError(f"{file}: not a safetensors file (shorter than its 8-byte header "
                            f"length).")
    n = int.from_bytes(raw_len, "little")
    if n > 100 * 2**20 or n > file.stat().st_size - 8:
      raise CheckpointError(f"{file}: not a safetensors file or truncated (header length {n} "
                            f"is impossible for a {file.stat().st_size}-byte file).")
    try:
      header = json.loads(fh.read(n).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise CheckpointError(f"{file}: not a safetensors file (the header is not UTF-8 JSON: "
                            f"{e}).") from None
  if not isinstance(header, dict):
    raise CheckpointError(f"{file}: the safetensors header is a JSON {type(header).__name__}, "
                          f"not an object of tensor entries.")
  return header, 8 + n


def _tensor_info(file: pathlib.Path, name: str, info: Any, start: int, size: int) -> TensorInfo:
  """One header entry, checked: dtype, shape and a data range inside the file."""
  where = f"{file}: tensor {name!r}"
  if not isinstance(info, dict):
    raise CheckpointError(f"{where}: the header entry is a {type(info).__name__}, not an "
                          f"object with dtype, shape and data_offsets.")
  missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
  if missing:
    raise CheckpointError(f"{where}: the header entry lacks {missing}.")
  shape, offsets, tag = info["shape"], info["data_offsets"], info["dtype"]
  if not isinstance(tag, str):
    raise CheckpointError(f"{where}: dtype {tag!r} is not a safetensors dtype tag.")
  if not isinstance(shape, list) or not all(
      isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
    raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative ints.")
  if (not isinstance(offsets, list) or len(offsets) != 2 or not all(
      isinstance(o, int) and not isinstance(o, bool) for o in offsets) or
      not 0 <= offsets[0] <= offsets[1]):
    raise CheckpointError(f"{where}: data_offsets {offsets!r} is not a [begin, end] pair.")
  if start + offsets[1] > size:
    raise CheckpointError(f"{where}: its data ends at byte {start + offsets[1]}, past the end "
                          f"of the {size}-byte file; the file is truncated.")
  dtype = _ST_TO_NP.get(tag, tag)
  if isinstance(dtype, np.dtype) and offsets[1] - offsets[0] != math.prod(shape) * dtype.itemsize:
    raise CheckpointError(f"{where}: {offsets[1] - offsets[0]} data bytes for shape {shape} of "
                          f"{tag} ({math.prod(shape) * dtype.itemsize} expected).")
  return TensorInfo(file, tuple(shape), dtype, tuple(offsets), start)


def list_tensors(files: Iterable[PathLike]) -> dict[str, TensorInfo]:
  """name -> TensorInfo over all `files`; a name stored twice is an error."""
  out: dict[str, TensorInfo] = {}
  dupes = []
  for file in files:
    file = pathlib.Path(file)
    header, start = read_header(file)
    size = file.stat().st_size
    for name, info in header.items():
      if name == "__metadata__":
        continue
      if name in out:
        dupes.append(f"{name} (in {out[name].file.name} and {file.name})")
        continue
      out[name] = _tensor_info(file, name, info, start, size)
  if dupes:
    raise CheckpointMismatchError("tensors stored more than once:\n    " + "\n    ".join(dupes))
  return out


def _read_raw(info: TensorInfo) -> np.ndarray:
  """Reads a tensor from the byte range its header gives (no framework involved)."""
  begin, end = info.offsets
  count = (end - begin) // info.dtype.itemsize
  with open(info.file, "rb") as fh:
    fh.seek(info.data_start + begin)
    arr = np.fromfile(fh, dtype=info.dtype, count=count)
  if arr.size != math.prod(info.shape):
    raise CheckpointError(f"{info.file}: truncated tensor data ({arr.size} of "
                          f"{math.prod(info.shape)} elements).")
  return arr.reshape(info.shape)


def read_tensors(
    infos: Mapping[str, TensorInfo], dtype: np.dtype | None = None
) -> Iterable[tuple[str, np.ndarray]]:
  """Yields (name, array) one tensor at a time, cast to `dtype` (None keeps the stored one).

  Uses `safetensors.safe_open(framework="numpy")`. Releases of safetensors without ml_dtypes
  support cannot return bf16 through numpy; those tensors are read from their byte range and
  viewed as `ml_dtypes.bfloat16` instead, which is exactly what the format stores.
  """
  by_file: dict[pathlib.Path, list[str]] = {}
  for name, info in infos.items():
    by_file.setdefault(info.file, []).append(name)
  for file, names in by_file.items():
    try:
      handle_ctx = safetensors.safe_open(str(file), framework="numpy")
    except Exception as e:  # safetensors' own SafetensorError names no file
      raise CheckpointError(f"{file}: cannot open as safetensors ({type(e).__name__}: {e}).") \
          from None
    with handle_ctx as handle:
      for name in names:
        try:
          arr = handle.get_tensor(name)
        except (TypeError, ValueError):
          if infos[name].dtype != np.dtype(ml_dtypes.bfloat16):
            raise
          arr = _read_raw(infos[name])
        except Exception as e:  # pylint: disable=broad-except
          raise CheckpointError(f"{file}: cannot read tensor {name!r} ({type(e).__name__}: "
                                f"{e}).") from None
        floating = arr.dtype.kind == "f" or arr.dtype == np.dtype(ml_dtypes.bfloat16)
        if floating and not np.isfinite(arr).all():
          raise CheckpointError(f"{file}: tensor {name!r} holds NaN or infinite values; "
                                f"quantization needs finite weights (fix the source "
                                f"checkpoint).")
        yield name, _common.cast(arr, dtype)


def write_safetensors(
    file: PathLike,
    tensors: Iterable[tuple[str, Any]],
    *,
    dtype: np.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
) -> int:
  """Writes `tensors` ((name, array) pairs) to one safetensors file; returns the data bytes.

  Written here rather than with `safetensors.numpy.save_file` so that each tensor is converted
  and written on its own (save_file wants every converted tensor in memory at once) and bf16
  works whatever the installed safetensors release. Layout per the format spec: u64 header
  length, JSON header padded with spaces to 8 bytes, then the tensors back to back.
  """
  items = []
  header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
  offset = 0
  for name, arr in tensors:
    shape = tuple(int(s) for s in np.shape(arr))
    out_dtype = np.dtype(dtype) if dtype is not None else np.dtype(np.asarray(arr).dtype)
    out_dtype = out_dtype.newbyteorder("<") if out_dtype.byteorder == ">" else out_dtype
    tag = _NP_TO_ST.get(out_dtype)
    if tag is None:
      raise ValueError(f"{name}: dtype {out_dtype} cannot be stored in safetensors.")
    nbytes = math.prod(shape) * out_dtype.itemsize
    header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
    items.append((name, arr, out_dtype))
    offset += nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  file = pathlib.Path(file)
  with open(file, "wb") as fh:
    fh.write(len(raw).to_bytes(8, "little"))
    fh.write(raw)
    for _, arr, out_dtype in items:
      # np.asarray pulls a jax array to host one tensor at a time.
      fh.write(np.ascontiguousarray(np.asarray(arr).astype(out_dtype, copy=False)).tobytes())
  return offset


# --------------------------------------------------------------------------------------------
# HF directories.


def _hf_mapping():
  # Imported lazily: the mapping module belongs to the models package, and only the two
  # directory-level functions need it.
  from matquant_jax.models import hf_mapping  # pylint: disable=g-import-not-at-top
  return hf_mapping


def read_hf_config(path: PathLike) -> dict[str, Any]:
  """config.json of an HF directory, after checking the architecture is one we support."""
  path = pathlib.Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"HF checkpoint directory {path} does not exist.")
  cfg_file = path / CONFIG_FILE
  if not cfg_file.is_file():
    raise FileNotFoundError(
        f"{path} has no {CONFIG_FILE}; an HF checkpoint directory needs it (files there: "
        f"{sorted(p.name for p in path.iterdir())}).")
  try:
    d = json.loads(cfg_file.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{cfg_file}: not valid JSON ({e}).") from None
  if not isinstance(d, dict):
    raise CheckpointError(f"{cfg_file}: holds a JSON {type(d).__name__}, not an object.")
  model_type = d.get("model_type")
  archs = d.get("architectures") or []
  problems = []
  if model_type not in SUPPORTED_ARCHITECTURES:
    problems.append(f"model_type {model_type!r} is not supported")
  else:
    want = SUPPORTED_ARCHITECTURES[model_type]
    if archs and list(archs) != [want]:
      problems.append(f"architectures {archs} do not match model_type {model_type!r} "
                      f"(expected [{want!r}])")
  problems += unsupported_features(d)
  if problems:
    raise CheckpointError(
        f"{cfg_file}: " + "; ".join(problems) + ". Supported: " +
        ", ".join(f"{t} ({a})" for t, a in SUPPORTED_ARCHITECTURES.items()) + ".")
  return d


# config.json keys of features this library's decoder does not implement; a checkpoint that
# uses them is refused by name before any tensor is read (loading it would run a different model).
_UNSUPPORTED_KEYS = {
    "num_local_experts": "mixture-of-experts layers (num_local_experts)",
    "num_experts": "mixture-of-experts layers (num_experts)",
    "quantization_config": "pre-quantized weights (quantization_config); load the float model",
    "attention_bias": "attention biases (attention_bias=true)",
    "mlp_bias": "MLP biases (mlp_bias=true)",
}


def unsupported_features(d: Mapping[str, Any]) -> list[str]:
  """Names of features in an HF config.json that the decoder does not implement."""
  found = []
  for key, what in _UNSUPPORTED_KEYS.items():
    value = d.get(key)
    experts = key in ("num_local_experts", "num_experts")
    if (experts and isinstance(value, int) and value > 1) or (not experts and value):
      found.append(what)
  scaling = d.get("rope_scaling")
  if isinstance(scaling, Mapping) and scaling.get("rope_type", scaling.get("type")) not in (
      None, "default"):
    found.append(f"RoPE scaling {scaling.get('rope_type', scaling.get('type'))!r} "
                 "(rope_scaling); only the default RoPE is implemented")
  rope = d.get("rope_parameters")
  if isinstance(rope, Mapping) and rope.get("rope_type", "default") not in ("default",):
    found.append(f"RoPE type {rope.get('rope_type')!r} (rope_parameters); only the default "
                 "RoPE is implemented")
  return found


def hf_weight_files(path: PathLike) -> list[pathlib.Path]:
  """The safetensors files of an HF directory (single file or the shards of the index)."""
  path = pathlib.Path(path)
  index = path / INDEX_FILE
  if index.is_file():
    weight_map = json.loads(index.read_text()).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise ValueError(f"{index} has no 'weight_map'.")
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not (path / f).is_file()]
    if missing:
      raise FileNotFoundError(
          f"{index} lists shards that are not in {path}: {missing}. Re-download the checkpoint.")
    return [path / f for f in files]
  if (path / SINGLE_FILE).is_file():
    return [path / SINGLE_FILE]
  present = sorted(p.name for p in path.iterdir())
  pickled = [p for p in present if p.endswith((".bin", ".pt", ".pth", ".ckpt"))]
  hint = (f" Pickled weights ({pickled}) are never loaded: convert them to safetensors with "
          "transformers (`save_pretrained(dir, safe_serialization=True)`)." if pickled else "")
  raise FileNotFoundError(
      f"{path} has neither {SINGLE_FILE} nor {INDEX_FILE} (files there: {present}).{hint}")


def _index_weight_map(path: pathlib.Path) -> dict[str, str] | None:
  index = path / INDEX_FILE
  return json.loads(index.read_text())["weight_map"] if index.is_file() else None


def expected_hf_shapes(config: TransformerConfig) -> dict[str, tuple[int, ...]]:
  """HF tensor name -> shape for `config`, without any weight data (tied: no lm_head)."""
  return {n: tuple(s) for n, s in _hf_mapping().hf_shapes(config).items()}


def _matching_preset(config: TransformerConfig) -> TransformerConfig:
  """The preset that differs from `config` at most in name and padding rows, else `config`.

  A checkpoint that matches no preset (a user's own model) keeps the config its config.json
  describes: every field is read from the file, nothing is borrowed from a preset.
  """
  mine = dataclasses.asdict(config)
  for preset in config_lib.PRESETS.values():
    theirs = dataclasses.asdict(preset)
    if all(mine[k] == theirs[k] for k in mine if k not in ("name", "num_embed")):
      if preset.embed_rows >= config.vocab_size:
        return preset
  return config


def load_hf_checkpoint(
    path: PathLike, dtype: Any = np.float32, *, match_preset: bool = True
) -> tuple[TransformerConfig, dict[str, Any]]:
  """Reads an HF checkpoint directory into (config, params).

  Args:
    path: directory with config.json and model.safetensors or sharded safetensors + index.
    dtype: dtype of the returned arrays (np.float32, "bfloat16", ...); None keeps the stored one.
    match_preset: return the preset whose architecture config.json describes (e.g.
      gemma2_2b, whose embedding has the 256128 rows of the Flax checkpoints; padding rows are
      zero) instead of a config named after the model type.

  Returns:
    (TransformerConfig from config.json, the bare parameter tree
    {'embedder': ..., 'final_norm': ..., 'layer_0': ..., ...} of numpy arrays on host).

  Raises:
    FileNotFoundError: the directory, config.json or a weight file is missing.
    ValueError: unsupported architecture or config; CheckpointMismatchError (a ValueError)
      listing every missing / unexpected / misshaped / non-float tensor. Raised before any
      tensor data is read.
  """
  path = pathlib.Path(path)
  dtype = _common.as_dtype(dtype)
  mapping = _hf_mapping()
  hf_cfg = read_hf_config(path)
  try:
    config = mapping.config_from_hf_config(hf_cfg)
  except (KeyError, TypeError, ValueError) as e:
    what = f"lacks the field {e}" if isinstance(e, KeyError) else str(e)
    raise CheckpointError(f"{path / CONFIG_FILE}: {what}") from None
  if match_preset:
    config = _matching_preset(config)
  files = hf_weight_files(path)
  infos = list_tensors(files)

  problems = []
  weight_map = _index_weight_map(path)
  if weight_map is not None:
    for name, fname in sorted(weight_map.items()):
      if name in infos and infos[name].file.name != fname:
        problems.append(f"{name}: index says {fname}, found in {infos[name].file.name}")
      elif name not in infos:
        problems.append(f"{name}: index says {fname}, but no shard holds it")
    for name in sorted(set(infos) - set(weight_map)):
      problems.append(f"{name}: stored in {infos[name].file.name} but absent from the index")
  if problems:
    raise CheckpointMismatchError(
        f"{path / INDEX_FILE} disagrees with the shards:\n    " + "\n    ".join(problems))

  expected = expected_hf_shapes(config)
  # A tied model may still carry lm_head.weight (some exporters write the copy); it is ignored.
  ignore = ("lm_head.weight",) if config.tie_embeddings else ()
  _common.check_tensor_set(
      expected, {n: (i.shape, i.dtype) for n, i in infos.items()},
      what=f"HF checkpoint {path} ({hf_cfg.get('model_type')}, config {config.name!r})",
      hint="Is config.json the one these weights were saved with?", ignore_extra=ignore)

  state = dict(read_tensors({n: infos[n] for n in expected}, dtype))
  params = mapping.params_from_hf_state_dict(config, state)
  del state
  return config, params


def _shard_plan(sizes: list[tuple[str, int]], max_shard_bytes: int | None) -> list[list[str]]:
  """Greedy, order-keeping split of (name, bytes) into shards of at most max_shard_bytes.

  A tensor bigger than the limit gets a shard of its own (as transformers does).
  """
  if not max_shard_bytes:
    return [[n for n, _ in sizes]]
  shards: list[list[str]] = [[]]
  used = 0
  for name, nbytes in sizes:
    if shards[-1] and used + nbytes > max_shard_bytes:
      shards.append([])
      used = 0
    shards[-1].append(name)
    used += nbytes
  return shards


def save_hf_checkpoint(
    path: PathLike,
    config: TransformerConfig,
    params: Mapping[str, Any],
    *,
    max_shard_bytes: int | None = None,
    dtype: Any = "bfloat16",
    overwrite: bool = False,
    model_type: str | None = None,
) -> pathlib.Path:
  """Writes config.json + safetensors that transformers' `from_pretrained(path)` loads.

  Args:
    path: output directory (created).
    config: the model's config.
    params: bare parameter tree for `config` (numpy or jax arrays; a leading {'params': ...}
      wrapper is not accepted).
    max_shard_bytes: split into `model-0000i-of-0000n.safetensors` + index when the weights
      exceed this many bytes; None writes one `model.safetensors`.
    dtype: "bfloat16" (the released checkpoints' dtype) or "float32" (exact round trip of f32).
    overwrite: replace an existing checkpoint in `path` (its weight files are removed first,
      so no stale shard survives); otherwise an existing one is an error.
    model_type: 'gemma2', 'mistral' or 'llama'; None lets the mapping choose (Gemma-style
      configs are gemma2; others are llama when the config name says so, else mistral).

  Returns:
    The directory written.
  """
  path = pathlib.Path(path)
  np_dtype = _common.as_dtype(dtype)
  mapping = _hf_mapping()
  _common.check_bias_free(config, "Hugging Face safetensors")
  _common.check_params(config, params, what="params to save")

  existing = ([p for p in path.iterdir() if p.name == CONFIG_FILE or p.name == INDEX_FILE or
               (p.name.startswith("model") and p.name.endswith(".safetensors"))]
              if path.is_dir() else [])
  if existing and not overwrite:
    raise FileExistsError(
        f"{path} already holds a checkpoint ({sorted(p.name for p in existing)}); pass "
        "overwrite=True to replace it.")
  path.mkdir(parents=True, exist_ok=True)
  for p in existing:
    p.unlink()

  hf_cfg = dict(mapping.hf_config_from_config(config, model_type))
  # transformers 5 reads `dtype`, 4.x `torch_dtype`: both name the dtype actually stored.
  hf_cfg["dtype"] = hf_cfg["torch_dtype"] = (
      "bfloat16" if np_dtype == np.dtype(ml_dtypes.bfloat16) else str(np_dtype))
  model_type = hf_cfg.get("model_type")
  if model_type not in SUPPORTED_ARCHITECTURES:
    raise ValueError(f"hf_config_from_config gave model_type {model_type!r}; supported: "
                     f"{sorted(SUPPORTED_ARCHITECTURES)}.")
  hf_cfg.setdefault("architectures", [SUPPORTED_ARCHITECTURES[model_type]])

  state = mapping.hf_state_dict_from_params(config, params)
  sizes = [(n, math.prod(np.shape(v)) * np_dtype.itemsize) for n, v in state.items()]
  shards = _shard_plan(sizes, max_shard_bytes)
  total = sum(s for _, s in sizes)
  if len(shards) == 1:
    write_safetensors(path / SINGLE_FILE, ((n, state[n]) for n in shards[0]), dtype=np_dtype)
  else:
    weight_map = {}
    for i, names in enumerate(shards):
      fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      write_safetensors(path / fname, ((n, state[n]) for n in names), dtype=np_dtype)
      weight_map.update({n: fname for n in names})
    (path / INDEX_FILE).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
  # Written last: a directory with config.json is a complete one.
  (path / CONFIG_FILE).write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
  return path
