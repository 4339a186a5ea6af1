"""Official Gemma Flax/Orbax checkpoints: both gating layouts, padded embedding, strictness."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest

from matquant_jax.checkpoints import CheckpointMismatchError
from matquant_jax.checkpoints import _common
from matquant_jax.checkpoints.gemma_orbax import gemma_config_from_checkpoint
from matquant_jax.checkpoints.gemma_orbax import load_gemma_flax_checkpoint
from matquant_jax.checkpoints.gemma_orbax import save_gemma_flax_checkpoint
from matquant_jax.models.config import get_config


def _stored(path):
  """The stored tree, as the gemma library sees it: {flat key: {leaf: array} | array}."""
  return ocp.PyTreeCheckpointer().restore(path)


@pytest.mark.parametrize("transpose_gating", [False, True])
@pytest.mark.parametrize("legacy_mlp", [False, True])
def test_round_trip_both_gating_layouts(tmp_path, helpers, transpose_gating, legacy_mlp):
  config = get_config("tiny_gemma2")  # D=64, F=128, 520 embedding rows for a 512 vocabulary
  params = helpers.random_params(config)
  path = save_gemma_flax_checkpoint(tmp_path / "ckpt", config, params, transpose_gating,
                                    legacy_mlp=legacy_mlp, embed_rows=640)

  stored = _stored(path)
  # The released FLAT layout: '/'-joined module paths, one level of leaf dict.
  assert stored["transformer/embedder"]["input_embedding"].shape == (640, 64)
  assert stored["transformer/embedder"]["input_embedding"].dtype == ml_dtypes.bfloat16
  assert stored["transformer/layer_3/attn/kv_einsum"]["w"].shape == (2, 2, 64, 32)
  gating = stored["transformer/layer_0/mlp/gating_einsum"]
  gating = gating if legacy_mlp else gating["w"]
  assert gating.shape == ((2, 128, 64) if transpose_gating else (2, 64, 128))
  assert isinstance(stored["transformer/layer_0/mlp/linear"], np.ndarray) == legacy_mlp

  loaded = load_gemma_flax_checkpoint(path, "tiny_gemma2")
  bf16 = _common.unflatten_tree({k: v.astype(ml_dtypes.bfloat16).astype(np.float32)
                                 for k, v in _common.flatten_tree(params).items()})
  helpers.assert_trees_equal(loaded, bf16)  # all 520 rows: the 120 padding rows are dropped
  assert loaded["layer_1"]["mlp"]["gating_einsum"]["w"].shape == (2, 64, 128)
  assert loaded["layer_1"]["mlp"]["gating_einsum"]["w"].flags.c_contiguous

  # Layout read off the shapes agrees with the explicit flag, and the wrong flag is caught.
  explicit = load_gemma_flax_checkpoint(path, config, transpose_gating=transpose_gating)
  helpers.assert_trees_equal(explicit, loaded)
  with pytest.raises(CheckpointMismatchError, match="gating_einsum/w: checkpoint"):
    load_gemma_flax_checkpoint(path, config, transpose_gating=not transpose_gating)


def test_exact_f32_and_stored_dtype(tmp_path, helpers):
  config = get_config("tiny_gemma2")
  params = helpers.random_params(config)
  path = save_gemma_flax_checkpoint(tmp_path / "c", config, params, True, dtype=None)
  helpers.assert_trees_equal(load_gemma_flax_checkpoint(path, config), params)
  path = save_gemma_flax_checkpoint(tmp_path / "b", config, params, True)
  kept = load_gemma_flax_checkpoint(path, config, dtype=None)
  assert all(v.dtype == ml_dtypes.bfloat16 for v in _common.flatten_tree(kept).values())


def test_released_embedding_padding_is_dropped_for_hf_style_config(tmp_path, helpers):
  # Like loading the 256128-row release with a config made from HF's config.json (256000).
  padded = get_config("tiny_gemma2")
  params = helpers.random_params(padded)
  path = save_gemma_flax_checkpoint(tmp_path / "c", padded, params, False, dtype=None)
  hf_style = padded.replace(num_embed=None)
  loaded = load_gemma_flax_checkpoint(path, hf_style)
  np.testing.assert_array_equal(loaded["embedder"]["input_embedding"],
                                params["embedder"]["input_embedding"][:512])
  # Fewer rows than the config needs is an error, not silent padding.
  with pytest.raises(CheckpointMismatchError, match="input_embedding: checkpoint \\(520, 64\\)"):
    load_gemma_flax_checkpoint(path, padded.replace(num_embed=600))


def test_config_detected_from_shapes(tmp_path, helpers):
  config = get_config("tiny_gemma2")
  path = save_gemma_flax_checkpoint(tmp_path / "c", config, helpers.random_params(config), True,
                                    embed_rows=600)
  assert gemma_config_from_checkpoint(path) is config
  helpers.assert_trees_equal(load_gemma_flax_checkpoint(path),
                             load_gemma_flax_checkpoint(path, config))
  other = config.replace(name="x", num_layers=2)
  path = save_gemma_flax_checkpoint(tmp_path / "d", other, helpers.random_params(other), False)
  with pytest.raises(ValueError, match="num_layers=2.*match no preset"):
    gemma_config_from_checkpoint(path)


def test_nested_layout_is_read(tmp_path, helpers):
  """The same tree nested under 'transformer' (gemma's `nest_params`), optionally in 'params'."""
  config = get_config("tiny_gemma2")
  params = helpers.random_params(config)
  for name, tree in [("nested", {"transformer": params}),
                     ("wrapped", {"params": {"transformer": params}})]:
    ocp.PyTreeCheckpointer().save((tmp_path / name).resolve(), tree)
    helpers.assert_trees_equal(load_gemma_flax_checkpoint(tmp_path / name, config), params)


def test_mismatch_lists_every_difference(tmp_path, helpers):
  config = get_config("tiny_gemma2")
  path = save_gemma_flax_checkpoint(tmp_path / "c", config, helpers.random_params(config), False)
  bigger = config.replace(num_layers=5, hidden_dim=96)
  with pytest.raises(CheckpointMismatchError) as e:
    load_gemma_flax_checkpoint(path, bigger)
  msg = str(e.value)
  assert "9 missing" in msg and "transformer/layer_4/attn/q_einsum/w" in msg
  assert "8 with the wrong shape" in msg
  assert "transformer/layer_3/mlp/linear/w: checkpoint (128, 64), expected (96, 64)" in msg

  # A tree with a stray leaf and a missing one.
  tree = _stored(path)
  tree["transformer/layer_0/attn/_query_norm"] = {"scale": np.zeros(32, np.float32)}
  del tree["transformer/final_norm"]
  ocp.PyTreeCheckpointer().save((tmp_path / "bad").resolve(), tree)
  with pytest.raises(CheckpointMismatchError) as e:
    load_gemma_flax_checkpoint(tmp_path / "bad", config)
  msg = str(e.value)
  assert "transformer/final_norm/scale" in msg
  assert "1 unexpected" in msg and "transformer/layer_0/attn/_query_norm/scale" in msg


def test_errors(tmp_path, helpers):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_gemma_flax_checkpoint(tmp_path / "nope", "tiny_gemma2")
  config = get_config("tiny_gemma2")
  path = save_gemma_flax_checkpoint(tmp_path / "c", config, helpers.random_params(config), False)
  with pytest.raises(ValueError, match="untied"):
    load_gemma_flax_checkpoint(path, "tiny_mistral")
  with pytest.raises(ValueError, match="unknown model"):
    load_gemma_flax_checkpoint(path, "gemma2_3b")
  square = config.replace(hidden_dim=64)
  sq_path = save_gemma_flax_checkpoint(tmp_path / "sq", square, helpers.random_params(square),
                                       True)
  with pytest.raises(ValueError, match="transpose_gating"):
    load_gemma_flax_checkpoint(sq_path, square)
  assert load_gemma_flax_checkpoint(sq_path, square, transpose_gating=True) is not None
