"""Mistral's original params.json + consolidated.safetensors: names, RoPE permutation, config."""

from __future__ import annotations

import json

import numpy as np
import pytest

from matquant_jax.checkpoints import CheckpointMismatchError
from matquant_jax.checkpoints import safetensors_io
from matquant_jax.checkpoints.mistral_consolidated import config_from_params_json
from matquant_jax.checkpoints.mistral_consolidated import load_mistral_consolidated
from matquant_jax.checkpoints.mistral_consolidated import permute_for_rope
from matquant_jax.checkpoints.mistral_consolidated import save_mistral_consolidated
from matquant_jax.checkpoints.mistral_consolidated import unpermute_for_rope
from matquant_jax.models import hf_mapping
from matquant_jax.models.config import get_config

# The tensor names of mistral-inference (spec §3c), written out rather than derived.
_ORIG_TO_HF = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = {
    "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
}


def _hf_to_original(hf_state, config):
  """A consolidated state dict made from an HF one with the spec's inverse permutation.

  Inverse (HF -> original): w.view(n_heads, 2, hd // 2, dim2).transpose(1, 2).reshape(dim1,
  dim2), written with numpy independently of the library's helpers.
  """
  def inv(w, n_heads):
    dim1, dim2 = w.shape
    return w.reshape(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(0, 2, 1, 3).reshape(
        dim1, dim2)

  hf_to_orig = {v: k for k, v in _ORIG_TO_HF.items()}
  for i in range(config.num_layers):
    for o, h in _LAYER.items():
      hf_to_orig[f"model.layers.{i}.{h}.weight"] = f"layers.{i}.{o}.weight"
  out = {}
  for name, w in hf_state.items():
    if name.endswith("q_proj.weight"):
      w = inv(w, config.num_heads)
    elif name.endswith("k_proj.weight"):
      w = inv(w, config.num_kv_heads)
    out[hf_to_orig[name]] = w
  return out


def _write(path, state, params_json):
  path.mkdir(parents=True, exist_ok=True)
  safetensors_io.write_safetensors(path / "consolidated.safetensors", state.items())
  (path / "params.json").write_text(json.dumps(params_json))


def _params_json(config, **extra):
  d = {"dim": config.embed_dim, "n_layers": config.num_layers, "head_dim": config.head_dim,
       "hidden_dim": config.hidden_dim, "n_heads": config.num_heads,
       "n_kv_heads": config.num_kv_heads, "norm_eps": config.norm_eps,
       "vocab_size": config.vocab_size}
  d.update(extra)
  return {k: v for k, v in d.items() if v is not None}


def test_permutation_matches_spec_formula():
  n_heads, hd, dim2 = 3, 8, 5
  w = np.arange(n_heads * hd * dim2, dtype=np.float32).reshape(n_heads * hd, dim2)
  # HF permute_for_rope: w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).
  expected = w.reshape(n_heads, hd // 2, 2, dim2).transpose(0, 2, 1, 3).reshape(-1, dim2)
  np.testing.assert_array_equal(permute_for_rope(w, n_heads), expected)
  # Within each head: even rows first, then odd rows.
  np.testing.assert_array_equal(permute_for_rope(w, n_heads)[:hd], w[:hd][[0, 2, 4, 6, 1, 3, 5,
                                                                          7]])
  np.testing.assert_array_equal(unpermute_for_rope(permute_for_rope(w, n_heads), n_heads), w)


def _rope_interleaved(x, pos, theta=10_000.0):
  """Original Mistral RoPE: rotates pairs (2i, 2i+1). x: [T, H]."""
  hd = x.shape[-1]
  freqs = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
  ang = pos[:, None] * freqs[None]
  xr, xi = x[:, 0::2], x[:, 1::2]
  out = np.empty_like(x)
  out[:, 0::2] = xr * np.cos(ang) - xi * np.sin(ang)
  out[:, 1::2] = xr * np.sin(ang) + xi * np.cos(ang)
  return out


def _rope_half(x, pos, theta=10_000.0):
  """HF / our RoPE: rotates halves (i, i + H/2). x: [T, H]."""
  hd = x.shape[-1]
  freqs = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
  ang = pos[:, None] * freqs[None]
  a, b = x[:, : hd // 2], x[:, hd // 2:]
  return np.concatenate([a * np.cos(ang) - b * np.sin(ang), b * np.cos(ang) + a * np.sin(ang)],
                        -1)


def test_permutation_makes_half_split_rope_compute_the_same_scores():
  rng = np.random.default_rng(0)
  hd, d, t = 16, 24, 7
  wq, wk = rng.standard_normal((hd, d)), rng.standard_normal((hd, d))
  x, pos = rng.standard_normal((t, d)), np.arange(t, dtype=np.float64) * 3
  scores_orig = _rope_interleaved(x @ wq.T, pos) @ _rope_interleaved(x @ wk.T, pos).T
  q = _rope_half(x @ permute_for_rope(wq, 1).T, pos)
  k = _rope_half(x @ permute_for_rope(wk, 1).T, pos)
  np.testing.assert_allclose(q @ k.T, scores_orig, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("window,theta", [(8, None), (None, 1e6)])
def test_consolidated_equals_hf_layout(tmp_path, helpers, window, theta):
  base = get_config("tiny_mistral")
  params = helpers.random_params(base)
  hf_state = hf_mapping.hf_state_dict_from_params(base, params)
  orig = _hf_to_original(hf_state, base)
  assert "layers.2.feed_forward.w2.weight" in orig and len(orig) == len(hf_state)
  _write(tmp_path, orig, _params_json(base, sliding_window=window, rope_theta=theta))

  config, loaded = load_mistral_consolidated(tmp_path)
  assert config.rope_base == (theta or 10_000.0)  # absent (v0.1): 10 000
  assert config.sliding_window == window
  assert config.attention_pattern.value == ("local" if window else "global")
  assert (config.num_kv_heads, config.head_dim, config.norm_eps) == (2, 16, 1e-5)
  assert not config.tie_embeddings and (config.bos_id, config.eos_id) == (1, 2)
  helpers.assert_trees_equal(loaded, hf_mapping.params_from_hf_state_dict(config, hf_state))
  helpers.assert_trees_equal(loaded, params)
  if window:
    assert config is get_config("tiny_mistral")  # identical fields -> the preset


def test_writer_round_trip(tmp_path, helpers):
  config = get_config("tiny_mistral")
  params = helpers.random_params(config)
  save_mistral_consolidated(tmp_path, config, params, dtype="float32")
  assert json.loads((tmp_path / "params.json").read_text())["sliding_window"] == 8
  got_config, got = load_mistral_consolidated(tmp_path)
  assert got_config is config
  helpers.assert_trees_equal(got, params)
  with pytest.raises(FileExistsError):
    save_mistral_consolidated(tmp_path, config, params)
  with pytest.raises(ValueError, match="not a Mistral-style"):
    save_mistral_consolidated(tmp_path / "g", get_config("tiny_gemma2"),
                              helpers.random_params(get_config("tiny_gemma2")))


def test_released_params_json_map_to_presets():
  v01 = {"dim": 4096, "n_layers": 32, "head_dim": 128, "hidden_dim": 14336, "n_heads": 32,
         "n_kv_heads": 8, "norm_eps": 1e-05, "sliding_window": 4096, "vocab_size": 32000}
  assert config_from_params_json(v01) is get_config("mistral_7b_v0_1")
  v03 = dict(v01, vocab_size=32768, rope_theta=1000000.0)
  del v03["sliding_window"]
  assert config_from_params_json(v03) is get_config("mistral_7b_v0_3")
  with pytest.raises(ValueError, match="moe"):
    config_from_params_json(dict(v01, moe={"num_experts": 8}))
  with pytest.raises(ValueError, match="'dim'"):
    config_from_params_json({"n_layers": 2})


def test_mismatch_lists_every_difference(tmp_path, helpers):
  config = get_config("tiny_mistral")
  orig = _hf_to_original(
      hf_mapping.hf_state_dict_from_params(config, helpers.random_params(config)), config)
  del orig["layers.1.feed_forward.w3.weight"]
  orig["layers.0.attention.wk.weight"] = np.zeros((64, 64), np.float32)
  orig["layers.0.attention.wqkv.weight"] = np.zeros((3, 3), np.float32)
  _write(tmp_path, orig, _params_json(config, sliding_window=8))
  with pytest.raises(CheckpointMismatchError) as e:
    load_mistral_consolidated(tmp_path)
  msg = str(e.value)
  assert "1 missing:\n    layers.1.feed_forward.w3.weight" in msg
  assert "1 unexpected:\n    layers.0.attention.wqkv.weight" in msg
  assert "layers.0.attention.wk.weight: checkpoint (64, 64), expected (32, 64)" in msg


def test_missing_files(tmp_path, helpers):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_mistral_consolidated(tmp_path / "nope")
  (tmp_path / "consolidated.00.pth").write_bytes(b"not read")
  with pytest.raises(FileNotFoundError, match="Pickled weights"):
    load_mistral_consolidated(tmp_path)
  config = get_config("tiny_mistral")
  save_mistral_consolidated(tmp_path / "m", config, helpers.random_params(config))
  (tmp_path / "m" / "params.json").unlink()
  with pytest.raises(FileNotFoundError, match="params.json"):
    load_mistral_consolidated(tmp_path / "m")
