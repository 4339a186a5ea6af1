"""Official Gemma(-2) Flax/Orbax checkpoints <-> our parameter tree.

The released checkpoints (Kaggle `google/gemma-2/flax/gemma2-{2b,9b,27b}[-it]`, spec/models.md
§3a) are Orbax PyTree checkpoints of a FLAT dict keyed by '/'-joined module paths:

    transformer/embedder                  {'input_embedding': [256128, D]}
    transformer/final_norm                {'scale': [D]}
    transformer/layer_{i}/pre_attention_norm, post_attention_norm, pre_ffw_norm, post_ffw_norm
                                          {'scale': [D]}
    transformer/layer_{i}/attn/q_einsum   {'w': [N, D, H]}
    transformer/layer_{i}/attn/kv_einsum  {'w': [2, K, D, H]}
    transformer/layer_{i}/attn/attn_vec_einsum {'w': [N, H, D]}
    transformer/layer_{i}/mlp/gating_einsum {'w': [2, D, F]} (2B) | {'w': [2, F, D]} (9B, 27B)
    transformer/layer_{i}/mlp/linear      {'w': [F, D]}

Variants this reader also accepts: the same tree nested ({'transformer': {'layer_0': ...}}),
optionally under a top-level 'params'; and the legacy "remapped" form where the mlp leaves are
bare arrays without the 'w' level (gemma's old `param_remapper`). Our tree is this tree
without the 'transformer/' prefix, with gating always [2, D, F], so the only conversions are
the gating transpose and (optionally) dropping padding rows of the embedding.

The STACKED layout of the new gemma library (`transformer/stacked_layers/...`) is not read.
"""

from __future__ import annotations

from collections.abc import Mapping
import os
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from matquant_jax.checkpoints import _common
from matquant_jax.models import config as config_lib
from matquant_jax.models.config import TransformerConfig

PathLike = str | os.PathLike

_PREFIX = "transformer/"
_GATING = "mlp/gating_einsum/w"
_MLP_BARE = ("mlp/gating_einsum", "mlp/linear")


def _restore_metadata(path: pathlib.Path):
  """The checkpoint's tree of array metadata (shape, dtype), without reading any data."""
  if not path.is_dir():
    raise FileNotFoundError(
        f"Gemma checkpoint {path} does not exist (expected the Orbax directory, e.g. "
        f"'<archive>/gemma2-2b', next to tokenizer.model).")
  try:
    meta = ocp.PyTreeCheckpointer().metadata(path)
  except Exception as e:  # pylint: disable=broad-except
    raise _common.CheckpointError(f"{path} is not a readable Orbax PyTree checkpoint "
                                  f"({type(e).__name__}: {e}).") from None
  # orbax >= 0.11 wraps the tree in StepMetadata.item_metadata.tree; older returns the tree.
  meta = getattr(meta, "item_metadata", meta)
  return getattr(meta, "tree", meta)


def _normalize_names(flat: Mapping[str, Any]) -> tuple[dict[str, str], bool]:
  """Maps each stored '/'-path to our canonical 'transformer/...' name; flags legacy mlp leaves.

  Returns:
    (canonical name -> stored name, whether the legacy bare-array mlp form was seen).
  """
  out = {}
  legacy = False
  for stored in flat:
    name = stored[len("params/"):] if stored.startswith("params/") else stored
    if name.endswith(_MLP_BARE):
      name += "/w"
      legacy = True
    out[name] = stored
  return out, legacy


def _checkpoint_shapes(path: pathlib.Path):
  """(canonical name -> (shape, dtype), canonical -> stored name, stored metadata tree)."""
  tree = _restore_metadata(path)
  flat = _common.flatten_tree(tree)
  names, _ = _normalize_names(flat)
  shapes = {c: (tuple(flat[s].shape), flat[s].dtype) for c, s in names.items()}
  if any("stacked_layers" in c for c in shapes):
    raise ValueError(f"{path} uses the STACKED layout of the new gemma library; convert it to "
                     "the flat layout (gemma `_compat` / `flatten_and_remap_params`) first.")
  return shapes, names, tree


def _dims_from_shapes(path, shapes) -> dict[str, int]:
  """Model dimensions read off the stored shapes (used to pick a preset)."""
  try:
    rows, d = shapes[_PREFIX + "embedder/input_embedding"][0]
    n, _, h = shapes[_PREFIX + "layer_0/attn/q_einsum/w"][0]
    _, k, _, _ = shapes[_PREFIX + "layer_0/attn/kv_einsum/w"][0]
    f, _ = shapes[_PREFIX + "layer_0/mlp/linear/w"][0]
  except (KeyError, ValueError) as e:
    raise ValueError(
        f"{path}: cannot read the model size off the checkpoint ({e!r} missing or misshaped); "
        "is this a Gemma Flax checkpoint?") from None
  layers = {c.split("/")[1] for c in shapes if c.startswith(_PREFIX + "layer_")}
  post = any(c.endswith("post_attention_norm/scale") for c in shapes)
  return dict(num_layers=len(layers), embed_dim=d, hidden_dim=f, num_heads=n, num_kv_heads=k,
              head_dim=h, embed_rows=rows, post_norms=post)


def gemma_config_from_checkpoint(path: PathLike) -> TransformerConfig:
  """The preset whose shapes match the checkpoint at `path` (e.g. gemma2_9b).

  Only shapes are read. Shapes fix every dimension but not the query scale, soft-caps or
  window, so the answer is a preset with identical dimensions, never a guessed config.
  """
  path = pathlib.Path(path)
  shapes, _, _ = _checkpoint_shapes(path)
  dims = _dims_from_shapes(path, shapes)
  matches = []
  for preset in config_lib.PRESETS.values():
    if not preset.tie_embeddings or preset.post_norms != dims["post_norms"]:
      continue
    if all(getattr(preset, k) == v for k, v in dims.items() if k not in ("embed_rows",
                                                                        "post_norms")):
      if dims["embed_rows"] >= preset.embed_rows:
        matches.append(preset)
  if len(matches) != 1:
    found = ", ".join(f"{k}={v}" for k, v in dims.items())
    raise ValueError(
        f"{path}: shapes ({found}) match " +
        (f"several presets ({[c.name for c in matches]})" if matches else "no preset") +
        "; pass the TransformerConfig explicitly.")
  return matches[0]


def _resolve_config(path, config) -> TransformerConfig:
  if config is None:
    return gemma_config_from_checkpoint(path)
  if isinstance(config, str):
    return config_lib.get_config(config)
  if not isinstance(config, TransformerConfig):
    raise TypeError(f"config must be a preset name or a TransformerConfig, got {type(config)}.")
  return config


def _gating_layout(path, config, shapes, transpose_gating: bool | None) -> bool:
  """Whether the stored gating is [2, F, D] (True) or [2, D, F] (False), from the shapes."""
  if transpose_gating is not None:
    return transpose_gating
  d, f = config.embed_dim, config.hidden_dim
  gating = [shapes[n][0] for n in shapes if n.endswith(_GATING)]
  if d == f and gating and all(s == (2, d, f) for s in gating):
    raise ValueError(f"{path}: embed_dim == hidden_dim == {d}, so the gating layout cannot be "
                     "read off the shapes; pass transpose_gating=True ([2, F, D]) or False.")
  # With mixed or wrong shapes, the majority layout is the one the mismatch report uses.
  n_transposed = sum(s == (2, f, d) for s in gating)
  n_plain = sum(s == (2, d, f) for s in gating)
  return n_transposed > n_plain


def load_gemma_flax_checkpoint(
    path: PathLike,
    config: str | TransformerConfig | None = None,
    *,
    dtype: Any = np.float32,
    transpose_gating: bool | None = None,
) -> dict[str, Any]:
  """Reads an official Gemma Flax/Orbax checkpoint into our parameter tree.

  Args:
    path: the Orbax checkpoint directory (e.g. `.../gemma2-2b/gemma2-2b`).
    config: a preset name, a TransformerConfig, or None to pick the preset whose shapes match.
    dtype: dtype of the returned arrays; None keeps the stored one (bf16 for released weights).
    transpose_gating: the stored gating layout, [2, F, D] (True) or [2, D, F] (False); None
      reads it off the shapes (2B stores [2, D, F], 9B and 27B [2, F, D]).

  Returns:
    The bare tree {'embedder': ..., 'final_norm': ..., 'layer_0': ..., ...} of numpy arrays,
    gating always [2, D, F]. Embedding rows beyond `config.embed_rows` are dropped (they are
    padding above the vocabulary, e.g. 256128 stored rows for a config with num_embed=None).

  Raises:
    FileNotFoundError / ValueError: not an Orbax checkpoint, or a STACKED one.
    CheckpointMismatchError: every missing, unexpected, misshaped or non-float tensor, before
      any tensor data is read.
  """
  path = pathlib.Path(path).resolve()
  np_dtype = _common.as_dtype(dtype)
  shapes, names, tree = _checkpoint_shapes(path)
  config = _resolve_config(path, config)
  if not config.tie_embeddings:
    raise ValueError(f"config {config.name!r} has untied embeddings; Gemma checkpoints have no "
                     "lm_head. Use the Gemma config this checkpoint belongs to.")
  transposed = _gating_layout(path, config, shapes, transpose_gating)

  expected = {_PREFIX + n: s for n, s in _common.expected_param_shapes(config).items()}
  d, f = config.embed_dim, config.hidden_dim
  for n in expected:
    if n.endswith(_GATING) and transposed:
      expected[n] = (2, f, d)
  emb = _PREFIX + "embedder/input_embedding"
  stored_rows = shapes.get(emb, ((0, 0),))[0][0]
  if emb in shapes and stored_rows >= config.embed_rows and len(shapes[emb][0]) == 2:
    expected[emb] = (stored_rows, d)  # padding rows are allowed; dropped below
  _common.check_tensor_set(
      expected, shapes,
      what=f"Gemma checkpoint {path} (config {config.name!r}, gating "
           f"{'[2, F, D]' if transposed else '[2, D, F]'})",
      hint="Check the config (gemma2_2b / gemma2_9b / gemma2_27b) matches the checkpoint size.")

  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  try:
    restored = _common.flatten_tree(
        ocp.PyTreeCheckpointer().restore(path, restore_args=restore_args))
  except Exception as e:  # pylint: disable=broad-except
    raise _common.CheckpointError(f"{path}: cannot read the arrays; the checkpoint is "
                                  f"incomplete or corrupted ({type(e).__name__}: {e}).") from None
  flat = {}
  for canonical, stored in names.items():
    x = np.asarray(restored.pop(stored))
    if x.dtype.kind in "fV" and not np.isfinite(x).all():
      raise _common.CheckpointError(f"{path}: tensor {stored!r} holds NaN or infinite values.")
    if canonical.endswith(_GATING) and transposed:
      x = np.swapaxes(x, 1, 2)
    if canonical == emb:
      x = x[:config.embed_rows]
    flat[canonical[len(_PREFIX):]] = np.ascontiguousarray(_common.cast(x, np_dtype))
  return _common.unflatten_tree(flat)


def save_gemma_flax_checkpoint(
    path: PathLike,
    config: TransformerConfig,
    params: Mapping[str, Any],
    transpose_gating: bool,
    *,
    legacy_mlp: bool = False,
    embed_rows: int | None = None,
    dtype: Any = "bfloat16",
    overwrite: bool = False,
) -> pathlib.Path:
  """Writes `params` as an official-layout Gemma Flax checkpoint (FLAT dict, Orbax PyTree).

  Used to synthesise checkpoints in the released layout for tests, and to hand a model back
  to the gemma library.

  Args:
    path: output directory (must not exist unless overwrite=True).
    config: the model's config (tied embeddings).
    params: our bare parameter tree for `config`.
    transpose_gating: store gating as [2, F, D] (how 9B/27B were released) instead of [2, D, F].
    legacy_mlp: store the mlp leaves as bare arrays without the 'w' level (old remapped form).
    embed_rows: pad the embedding with zero rows up to this many (released: 256128).
    dtype: stored dtype; None keeps the params' dtype.
    overwrite: replace an existing checkpoint at `path`.

  Returns:
    The checkpoint directory.
  """
  path = pathlib.Path(path).resolve()
  np_dtype = _common.as_dtype(dtype)
  _common.check_bias_free(config, "Gemma Orbax")
  _common.check_params(config, params, what="params to save")
  if not config.tie_embeddings:
    raise ValueError(f"config {config.name!r} has untied embeddings; the Gemma format has no "
                     "lm_head.")
  tree: dict[str, Any] = {}
  for name, x in _common.flatten_tree(params).items():
    x = np.asarray(x)
    if name.endswith(_GATING) and transpose_gating:
      x = np.swapaxes(x, 1, 2)
    if name == "embedder/input_embedding" and embed_rows is not None:
      if embed_rows < x.shape[0]:
        raise ValueError(f"embed_rows={embed_rows} < the {x.shape[0]} embedding rows held.")
      x = np.concatenate([x, np.zeros((embed_rows - x.shape[0], x.shape[1]), x.dtype)])
    x = np.ascontiguousarray(_common.cast(x, np_dtype))
    module, leaf = name.rsplit("/", 1)
    if legacy_mlp and module.endswith(_MLP_BARE):
      tree[_PREFIX + module] = x
    else:
      tree.setdefault(_PREFIX + module, {})[leaf] = x
  _common.orbax_whole_shards_on_cpu()
  ocp.PyTreeCheckpointer().save(path, tree, force=overwrite)
  return path
