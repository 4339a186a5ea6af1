"""Parity with Hugging Face transformers (PyTorch, float32, eager attention) on tiny random models.

Every branch of the numerics is exercised: GQA, N·H != D, query_pre_attn_scalar != head_dim,
sliding window shorter than the sequence, soft-caps that bite, randomised norm weights, both RoPE
bases, tied and untied heads, right padding.
"""

from __future__ import annotations

import numpy as np
import pytest

import jax.numpy as jnp

from matquant_jax.models import AttentionPattern
from matquant_jax.models import Transformer
from matquant_jax.models import config_from_hf_config
from matquant_jax.models import get_config
from matquant_jax.models import hf_config_from_config
from matquant_jax.models import hf_mapping
from matquant_jax.models import hf_state_dict_from_params
from matquant_jax.models import layers
from matquant_jax.models import params_from_hf_state_dict

from tests.optional_import import LazyModule

torch = LazyModule("torch")
transformers = LazyModule("transformers")


SEQ = 24
TOL = 1e-4
_HF_CLASSES = {"gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
               "mistral": ("MistralConfig", "MistralForCausalLM"),
               "llama": ("LlamaConfig", "LlamaForCausalLM")}


def _tiny_llama(tied: bool):
  return get_config("tiny_mistral").replace(
      name="tiny_llama", attention_pattern=AttentionPattern.GLOBAL, sliding_window=None,
      num_kv_heads=4, tie_embeddings=tied)


def _hf_model(config, seed=0, model_type=None, **overrides):
  """A random HF model for `config`, with weights large enough that every branch matters."""
  d = hf_config_from_config(config, model_type)
  d.update(overrides)
  config_cls, model_cls = (getattr(transformers, n) for n in _HF_CLASSES[d["model_type"]])
  # Mistral/Llama have no soft-caps: at 0.5 their attention logits reach ~100 and float32
  # rounding alone (ours and HF's alike, checked against float64) moves the logits by ~1e-4.
  init_range = 0.5 if config.post_norms else 0.3
  hf_config = config_cls(**d, initializer_range=init_range, attn_implementation="eager")
  torch.manual_seed(seed)
  model = model_cls(hf_config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        # HF initialises Gemma norms to 0 and Llama norms to 1: randomise both.
        p.copy_(torch.randn_like(p) * 0.5 + (0.0 if config.post_norms else 1.0))
  return model


def _state_dict(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _hf_logits(model, tokens, mask=None):
  with torch.no_grad():
    kwargs = {} if mask is None else {"attention_mask": torch.tensor(mask)}
    return model(torch.tensor(tokens), **kwargs).logits.numpy()


def _tokens(config, batch=2, seq=SEQ, seed=0):
  return np.random.RandomState(seed).randint(0, config.vocab_size, (batch, seq))


def _check_parity(config, model, lengths=(SEQ, 17)):
  params = params_from_hf_state_dict(config, _state_dict(model))
  tokens = _tokens(config)
  ours = Transformer(config)
  # Unpadded batch.
  ref = _hf_logits(model, tokens)
  out = np.asarray(ours.apply({"params": params}, jnp.asarray(tokens)))
  assert out.shape == ref.shape == (2, SEQ, config.vocab_size)
  np.testing.assert_allclose(out, ref, atol=TOL, rtol=0)
  # Right padding: HF attention_mask vs our segment ids, compared on the real tokens.
  mask = (np.arange(SEQ)[None] < np.asarray(lengths)[:, None]).astype(np.int64)
  tokens = np.where(mask, tokens, config.pad_id)
  ref = _hf_logits(model, tokens, mask)
  out = np.asarray(ours.apply({"params": params}, jnp.asarray(tokens),
                              segment_ids=jnp.asarray(mask, jnp.int32)))
  for row, n in enumerate(lengths):
    np.testing.assert_allclose(out[row, :n], ref[row, :n], atol=TOL, rtol=0)
  return params


@pytest.mark.parametrize("caps", [(2.0, 3.0), (50.0, 30.0)])
def test_gemma2_logits_match(caps):
  config = get_config("tiny_gemma2").replace(attn_logit_softcap=caps[0],
                                             final_logit_softcap=caps[1])
  model = _hf_model(config)
  assert model.config.layer_types == ["sliding_attention", "full_attention"] * 2
  assert model.config.sliding_window == 8 and model.config.query_pre_attn_scalar == 24
  assert model.model.layers[0].self_attn.sliding_window == 8
  assert model.model.layers[1].self_attn.sliding_window is None
  _check_parity(config, model)


def test_gemma2_sliding_window_bites():
  """transformers' eager Gemma-2 must really apply the window, or parity proves nothing."""
  config = get_config("tiny_gemma2").replace(rope_base=1e6)
  model = _hf_model(config)
  wide = _hf_model(config, sliding_window=4096)  # same seed: same weights, no effective window
  tokens = _tokens(config)
  windowed, unwindowed = _hf_logits(model, tokens), _hf_logits(wide, tokens)
  # Identical within the first W tokens, different beyond.
  np.testing.assert_allclose(windowed[:, :8], unwindowed[:, :8], atol=1e-6)
  assert np.abs(windowed[:, 8:] - unwindowed[:, 8:]).max() > 1e-2
  _check_parity(config, model)
  params = params_from_hf_state_dict(config, _state_dict(wide))
  global_config = config.replace(attention_pattern=AttentionPattern.GLOBAL)
  out = Transformer(global_config).apply({"params": params}, jnp.asarray(tokens))
  np.testing.assert_allclose(np.asarray(out), unwindowed, atol=TOL, rtol=0)


@pytest.mark.parametrize("window,rope_base", [(8, 1e4), (None, 1e6)])
def test_mistral_logits_match(window, rope_base):
  config = get_config("tiny_mistral").replace(
      sliding_window=window, rope_base=rope_base,
      attention_pattern=AttentionPattern.LOCAL if window else AttentionPattern.GLOBAL)
  model = _hf_model(config)
  assert model.config.sliding_window == window
  assert model.config.rope_parameters["rope_theta"] == rope_base
  _check_parity(config, model)


def test_mistral_sliding_window_bites():
  config = get_config("tiny_mistral")
  tokens = _tokens(config)
  windowed = _hf_logits(_hf_model(config), tokens)
  unwindowed = _hf_logits(_hf_model(config, sliding_window=None), tokens)
  assert np.abs(windowed[:, 8:] - unwindowed[:, 8:]).max() > 1e-2


@pytest.mark.parametrize("tied", [True, False])
def test_llama_logits_match(tied):
  config = _tiny_llama(tied)
  model = _hf_model(config, model_type="llama")
  assert model.config.model_type == "llama"
  assert model.config.tie_word_embeddings == tied
  params = _check_parity(config, model, lengths=(11, SEQ))
  assert ("lm_head" in params) == (not tied)


def test_rms_norm_matches_hf():
  from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
  from transformers.models.llama.modeling_llama import LlamaRMSNorm
  x = np.random.RandomState(0).randn(3, 5, 64).astype(np.float32) * 3
  scale = np.random.RandomState(1).randn(64).astype(np.float32)
  for hf_cls, norm_type, eps in ((Gemma2RMSNorm, "zero_centered", 1e-6),
                                 (LlamaRMSNorm, "plain", 1e-5)):
    hf = hf_cls(64, eps=eps)
    with torch.no_grad():
      hf.weight.copy_(torch.tensor(scale))
      ref = hf(torch.tensor(x)).numpy()
    norm = layers.RMSNorm(norm_type=layers.NormType(norm_type), eps=eps)
    out = norm.apply({"params": {"scale": jnp.asarray(scale)}}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=1e-6)


def test_rope_matches_hf():
  from transformers.models.gemma2 import modeling_gemma2 as hf
  config = get_config("tiny_gemma2").replace(rope_base=1e6)
  hf_config = transformers.Gemma2Config(**hf_config_from_config(config))
  rotary = hf.Gemma2RotaryEmbedding(hf_config)
  rng = np.random.RandomState(0)
  q = rng.randn(2, 4, 7, 32).astype(np.float32)  # HF layout [B, N, T, H]
  positions = np.stack([np.arange(7), np.arange(100, 107) * 3])
  cos, sin = rotary(torch.tensor(q), torch.tensor(positions))
  ref, _ = hf.apply_rotary_pos_emb(torch.tensor(q), torch.tensor(q), cos, sin)
  out = layers.apply_rope(jnp.asarray(q.transpose(0, 2, 1, 3)), jnp.asarray(positions), 1e6)
  np.testing.assert_allclose(np.asarray(out).transpose(0, 2, 1, 3), ref.numpy(), atol=2e-5)


# --- parameter and config mapping ---------------------------------------------------------


def test_state_dict_round_trip_and_padding_rows():
  config = get_config("tiny_gemma2")
  model = _hf_model(config)
  sd = _state_dict(model)
  assert "lm_head.weight" in sd  # torch lists the tied tensor; the reader accepts it
  params = params_from_hf_state_dict(config, sd)
  emb = params["embedder"]["input_embedding"]
  assert emb.shape == (config.embed_rows, config.embed_dim) == (520, 64)
  assert not emb[config.vocab_size:].any()
  back = hf_state_dict_from_params(config, params)
  assert set(back) == set(sd) - {"lm_head.weight"}
  for name, value in back.items():
    np.testing.assert_array_equal(value, sd[name], err_msg=name)


def test_state_dict_mapping_is_strict():
  config = get_config("tiny_mistral")
  sd = {k: np.zeros(s, np.float32) for k, s in hf_mapping.hf_shapes(config).items()}
  params_from_hf_state_dict(config, sd)  # complete: no error
  bad = dict(sd)
  del bad["model.layers.1.mlp.up_proj.weight"]
  bad["model.layers.9.mlp.up_proj.weight"] = np.zeros((128, 64), np.float32)
  bad["model.layers.0.self_attn.k_proj.weight"] = np.zeros((64, 64), np.float32)
  with pytest.raises(ValueError) as e:
    params_from_hf_state_dict(config, bad)
  msg = str(e.value)
  assert "3 difference(s)" in msg
  assert "missing model.layers.1.mlp.up_proj.weight" in msg
  assert "unexpected model.layers.9.mlp.up_proj.weight" in msg
  assert "model.layers.0.self_attn.k_proj.weight: shape (64, 64), expected (32, 64)" in msg
  params = params_from_hf_state_dict(config, sd)
  del params["lm_head"]
  params["layer_0"]["mlp"]["linear"]["w"] = np.zeros((3, 3))
  with pytest.raises(ValueError, match=r"(?s)2 difference.*missing lm_head/kernel.*"
                                       r"layer_0/mlp/linear/w: shape \(3, 3\)"):
    hf_state_dict_from_params(config, params)
  tied = get_config("tiny_gemma2")
  sd = {k: np.zeros(s, np.float32) for k, s in hf_mapping.hf_shapes(tied).items()}
  sd["lm_head.weight"] = np.ones((512, 64), np.float32)
  with pytest.raises(ValueError, match="lm_head.weight differs"):
    params_from_hf_state_dict(tied, sd)


@pytest.mark.parametrize("name,model_type", [
    ("tiny_gemma2", None), ("gemma2_27b", None), ("gemma2_9b", None), ("tiny_mistral", None),
    ("mistral_7b_v0_3", None), ("llama2_7b", "llama")])
def test_config_round_trip_through_hf(name, model_type):
  config = get_config(name)
  d = hf_config_from_config(config, model_type)
  assert config_from_hf_config(d, name=name, num_embed=config.num_embed) == config
  # Through the transformers class itself (5.x field names, to_dict()).
  config_cls = getattr(transformers, _HF_CLASSES[d["model_type"]][0])
  hf_dict = config_cls(**d).to_dict()
  assert config_from_hf_config(hf_dict, name=name, num_embed=config.num_embed) == config


def test_config_from_transformers_4x_dict():
  # A Gemma-2 9B config.json as written by transformers 4.4x (no layer_types/rope_parameters).
  d = {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "vocab_size": 256000,
       "hidden_size": 3584, "intermediate_size": 14336, "num_hidden_layers": 42,
       "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256,
       "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
       "query_pre_attn_scalar": 256, "sliding_window": 4096, "rope_theta": 10000.0,
       "rms_norm_eps": 1e-6, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
       "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "cache_implementation": "hybrid"}
  assert config_from_hf_config(d, name="gemma2_9b", num_embed=256128) == get_config("gemma2_9b")
  mistral = {"model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096,
             "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "hidden_act": "silu", "rms_norm_eps": 1e-5,
             "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
             "bos_token_id": 1, "eos_token_id": 2}
  assert (config_from_hf_config(mistral, name="mistral_7b_v0_1")
          == get_config("mistral_7b_v0_1"))


def test_config_mapping_rejects_what_hf_cannot_express():
  with pytest.raises(ValueError, match="attn_logit_softcap"):
    hf_config_from_config(get_config("tiny_mistral").replace(attn_logit_softcap=5.0))
  with pytest.raises(ValueError, match="attention_pattern"):
    hf_config_from_config(get_config("tiny_mistral"), "llama")
  with pytest.raises(ValueError, match="RoPE scaling"):
    d = hf_config_from_config(get_config("llama2_7b"), "llama")
    d["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}
    config_from_hf_config(d)
  with pytest.raises(ValueError, match="unsupported HF model_type"):
    config_from_hf_config({"model_type": "gemma3"})
