"""Our checkpoint files against transformers (PyTorch CPU): loading and logits parity.

Skipped when torch/transformers (the `parity` extra) are not installed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from matquant_jax.checkpoints import _common
from matquant_jax.checkpoints import load_gemma_flax_checkpoint
from matquant_jax.checkpoints import load_hf_checkpoint
from matquant_jax.checkpoints import load_mistral_consolidated
from matquant_jax.checkpoints import save_gemma_flax_checkpoint
from matquant_jax.checkpoints import save_hf_checkpoint
from matquant_jax.checkpoints import save_mistral_consolidated
from matquant_jax.models import hf_mapping

from tests.optional_import import LazyModule

torch = LazyModule("torch")
transformers = LazyModule("transformers")


FAMILIES = ["tiny_gemma2", "tiny_mistral", "tiny_llama"]
HF_CLASS = {"gemma2": "Gemma2ForCausalLM", "mistral": "MistralForCausalLM",
            "llama": "LlamaForCausalLM"}


def _from_pretrained(path, dtype=None):
  model, info = transformers.AutoModelForCausalLM.from_pretrained(
      str(path), dtype=dtype or torch.float32, attn_implementation="eager",
      output_loading_info=True)
  return model.eval(), info


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_transformers_loads_our_directory(tmp_path, helpers, name, dtype):
  config = helpers.tiny(name)
  params = helpers.random_params(config)
  save_hf_checkpoint(tmp_path, config, params, dtype=dtype,
                     max_shard_bytes=60_000 if dtype == "float32" else None)
  model, info = _from_pretrained(tmp_path, getattr(torch, dtype))
  assert type(model).__name__ == HF_CLASS[json.loads(
      (tmp_path / "config.json").read_text())["model_type"]]
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert not info.get("mismatched_keys"), info
  # The resolved HF config holds the fields our forward depends on.
  hf = model.config
  assert (hf.num_hidden_layers, hf.hidden_size, hf.num_key_value_heads, hf.head_dim) == (
      config.num_layers, config.embed_dim, config.num_kv_heads, config.head_dim)
  assert hf.rope_parameters["rope_theta"] == config.rope_base
  if name == "tiny_gemma2":
    assert hf.query_pre_attn_scalar == 24 and hf.sliding_window == 8
    assert hf.layer_types[:2] == ["sliding_attention", "full_attention"]
    assert (hf.attn_logit_softcapping, hf.final_logit_softcapping) == (2.0, 3.0)
  elif name == "tiny_mistral":
    assert hf.sliding_window == 8
  # Weights arrive unchanged (rounded to bf16 when stored so).
  sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
  ours = hf_mapping.hf_state_dict_from_params(config, params)
  for k, v in ours.items():
    want = v if dtype == "float32" else v.astype(_common.as_dtype("bfloat16")).astype(np.float32)
    np.testing.assert_array_equal(sd[k], want, err_msg=k)


def _hf_model(config):
  """A randomly initialised HF model for `config`, norms randomised (HF inits them to 0/1)."""
  d = hf_mapping.hf_config_from_config(config)
  hf_config = transformers.AutoConfig.for_model(**d)
  hf_config.initializer_range = 0.2
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(
      hf_config, dtype=torch.float32, attn_implementation="eager").eval()
  with torch.no_grad():
    for n, p in model.named_parameters():
      if "norm" in n:
        p.copy_(torch.randn_like(p) * 0.3 + (0.0 if config.post_norms else 1.0))
  return model


def _tokens(config):
  rng = np.random.default_rng(0)
  return rng.integers(0, config.vocab_size, size=(2, 20)).astype(np.int32)  # 20 > window 8


def _our_logits(config, params, tokens):
  from matquant_jax.models.transformer import Transformer  # pylint: disable=g-import-not-at-top
  return np.asarray(Transformer(config).apply({"params": params}, tokens))


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_transformers_through_hf_reader(tmp_path, helpers, name):
  config = helpers.tiny(name)
  model = _hf_model(config)
  model.save_pretrained(str(tmp_path))  # transformers' own writer, safetensors
  loaded_config, params = load_hf_checkpoint(tmp_path)
  tokens = _tokens(config)
  want = _hf_logits(model, tokens)
  got = _our_logits(loaded_config, params, tokens)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_logits_match_transformers_through_consolidated_reader(tmp_path, helpers):
  config = helpers.tiny("tiny_mistral")
  model = _hf_model(config)
  hf_state = {k: v.numpy() for k, v in model.state_dict().items()}
  # The original layout, made by our writer (inverse RoPE permutation), then read back.
  save_mistral_consolidated(tmp_path, config, hf_mapping.params_from_hf_state_dict(
      config, hf_state), dtype="float32")
  loaded_config, params = load_mistral_consolidated(tmp_path)
  tokens = _tokens(config)
  np.testing.assert_allclose(_our_logits(loaded_config, params, tokens),
                             _hf_logits(model, tokens), atol=1e-4, rtol=0)


@pytest.mark.parametrize("transpose_gating", [False, True])
def test_logits_match_transformers_through_gemma_reader(tmp_path, helpers, transpose_gating):
  config = helpers.tiny("tiny_gemma2")
  model = _hf_model(config)
  hf_state = {k: v.numpy() for k, v in model.state_dict().items()}
  params = hf_mapping.params_from_hf_state_dict(config, hf_state)
  save_gemma_flax_checkpoint(tmp_path / "c", config, params, transpose_gating, dtype=None,
                             embed_rows=config.embed_rows + 8)
  loaded = load_gemma_flax_checkpoint(tmp_path / "c", config)
  tokens = _tokens(config)
  np.testing.assert_allclose(_our_logits(config, loaded, tokens), _hf_logits(model, tokens),
                             atol=1e-4, rtol=0)
