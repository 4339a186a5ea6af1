"""Hugging Face <-> matquant_jax: parameter names/layouts and config.json (spec/models.md §3b).

Parameters. A torch `nn.Linear.weight` is [out, in]; our kernels are einsum layouts:

    model.embed_tokens.weight        [V, D]    embedder/input_embedding [embed_rows, D]
                                               (rows beyond V zero-padded; sliced off on export)
    model.norm.weight                [D]       final_norm/scale
    lm_head.weight                   [V, D]    lm_head/kernel [D, V] = weight.T (untied only)
    model.layers.{i}.
      input_layernorm.weight         [D]       layer_{i}/pre_attention_norm/scale
      post_attention_layernorm       [D]       Gemma-2: post_attention_norm/scale
                                               Mistral/Llama: pre_ffw_norm/scale (it is the
                                               pre-FFN norm there)
      pre_feedforward_layernorm      [D]       pre_ffw_norm/scale        (Gemma-2 only)
      post_feedforward_layernorm     [D]       post_ffw_norm/scale       (Gemma-2 only)
      self_attn.q_proj.weight        [N·H, D]  attn/q_einsum/w [N, D, H]
      self_attn.k_proj / v_proj      [K·H, D]  attn/kv_einsum/w [2, K, D, H] ([0] k, [1] v)
      self_attn.o_proj.weight        [D, N·H]  attn/attn_vec_einsum/w [N, H, D]
      mlp.gate_proj / up_proj        [F, D]    mlp/gating_einsum/w [2, D, F] ([0] gate, [1] up)
      mlp.down_proj.weight           [D, F]    mlp/linear/w [F, D]

Both sides use the half-split RoPE layout, so no head permutation; norm weights are copied as is
(zero-centred for Gemma on both sides). Conversions are strict: a missing or unexpected name, or
a wrong shape, raises one ValueError listing every difference.

Config. `hf_config_from_config` writes a transformers config.json dict for Gemma2ForCausalLM,
MistralForCausalLM or LlamaForCausalLM. transformers 5.x keeps the RoPE base in
`rope_parameters = {"rope_type": "default", "rope_theta": ...}` and Gemma-2's per-layer attention
in `layer_types`; 4.x used a top-level `rope_theta` and an implicit even-layers-local rule. Both
are written, and `config_from_hf_config` reads either.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from matquant_jax.models.config import Activation
from matquant_jax.models.config import AttentionPattern
from matquant_jax.models.config import NormType
from matquant_jax.models.config import TransformerConfig

Params = dict[str, Any]

_GEMMA2 = "gemma2"
_MISTRAL = "mistral"
_LLAMA = "llama"
_ARCHITECTURES = {_GEMMA2: "Gemma2ForCausalLM", _MISTRAL: "MistralForCausalLM",
                  _LLAMA: "LlamaForCausalLM"}


def _layer_norm_names(config: TransformerConfig) -> dict[str, str]:
  """HF norm name (under model.layers.{i}.) -> our norm module name."""
  if config.post_norms:
    return {"input_layernorm": "pre_attention_norm",
            "post_attention_layernorm": "post_attention_norm",
            "pre_feedforward_layernorm": "pre_ffw_norm",
            "post_feedforward_layernorm": "post_ffw_norm"}
  return {"input_layernorm": "pre_attention_norm", "post_attention_layernorm": "pre_ffw_norm"}


def hf_shapes(config: TransformerConfig) -> dict[str, tuple[int, ...]]:
  """Every HF state-dict name this config has, with its shape (no tied `lm_head.weight`)."""
  d, f, n, k, h, v = (config.embed_dim, config.hidden_dim, config.num_heads,
                      config.num_kv_heads, config.head_dim, config.vocab_size)
  shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
  if not config.tie_embeddings:
    shapes["lm_head.weight"] = (v, d)
  for i in range(config.num_layers):
    p = f"model.layers.{i}."
    for hf_name in _layer_norm_names(config):
      shapes[p + hf_name + ".weight"] = (d,)
    shapes.update({
        p + "self_attn.q_proj.weight": (n * h, d),
        p + "self_attn.k_proj.weight": (k * h, d),
        p + "self_attn.v_proj.weight": (k * h, d),
        p + "self_attn.o_proj.weight": (d, n * h),
        p + "mlp.gate_proj.weight": (f, d),
        p + "mlp.up_proj.weight": (f, d),
        p + "mlp.down_proj.weight": (d, f),
    })
  return shapes


def _param_shapes(config: TransformerConfig) -> dict[str, tuple[int, ...]]:
  """Our parameter tree as {'a/b/c': shape} (the tree documented in config.py)."""
  d, f, n, k, h = (config.embed_dim, config.hidden_dim, config.num_heads, config.num_kv_heads,
                   config.head_dim)
  shapes = {"embedder/input_embedding": (config.embed_rows, d), "final_norm/scale": (d,)}
  if not config.tie_embeddings:
    shapes["lm_head/kernel"] = (d, config.vocab_size)
  for i in range(config.num_layers):
    p = f"layer_{i}/"
    for norm in _layer_norm_names(config).values():
      shapes[p + norm + "/scale"] = (d,)
    shapes.update({
        p + "attn/q_einsum/w": (n, d, h),
        p + "attn/kv_einsum/w": (2, k, d, h),
        p + "attn/attn_vec_einsum/w": (n, h, d),
        p + "mlp/gating_einsum/w": (2, d, f),
        p + "mlp/linear/w": (f, d),
    })
  return shapes


def _check_names_and_shapes(what: str, got: Mapping[str, Any],
                            expected: Mapping[str, tuple[int, ...]], hint: str) -> None:
  problems = []
  for name in sorted(set(expected) - set(got)):
    problems.append(f"missing {name} {tuple(expected[name])}")
  for name in sorted(set(got) - set(expected)):
    problems.append(f"unexpected {name} {tuple(np.shape(got[name]))}")
  for name in sorted(set(got) & set(expected)):
    if tuple(np.shape(got[name])) != tuple(expected[name]):
      problems.append(f"{name}: shape {tuple(np.shape(got[name]))}, expected "
                      f"{tuple(expected[name])}")
  if problems:
    raise ValueError(f"{what} does not match the config: {len(problems)} difference(s):\n  "
                     + "\n  ".join(problems) + f"\n{hint}")


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f"{prefix}{key}/"))
    else:
      flat[prefix + key] = value
  return flat


def _unflatten(flat: Mapping[str, Any]) -> Params:
  tree: Params = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def params_from_hf_state_dict(config: TransformerConfig,
                              state_dict: Mapping[str, np.ndarray]) -> Params:
  """Our parameter tree (numpy arrays, dtypes kept) from an HF *ForCausalLM state dict.

  Args:
    config: the architecture the weights are for.
    state_dict: HF name -> array (numpy, or anything `np.asarray` takes). With tied embeddings a
      `lm_head.weight` may be present (torch's `state_dict()` lists the tied tensor) but must
      then equal `model.embed_tokens.weight`.

  Returns:
    The nested tree of config.py; the embedding is zero-padded to `config.embed_rows` rows.

  Raises:
    ValueError: listing every missing/unexpected name and wrong shape.
  """
  sd = dict(state_dict)
  if config.tie_embeddings and "lm_head.weight" in sd:
    head = np.asarray(sd.pop("lm_head.weight"))
    embed = sd.get("model.embed_tokens.weight")
    if embed is not None and (head.shape != np.shape(embed) or
                              not np.array_equal(head, np.asarray(embed))):
      raise ValueError(
          f"config {config.name!r} ties embeddings, but lm_head.weight differs from "
          f"model.embed_tokens.weight; use a config with tie_embeddings=False.")
  _check_names_and_shapes(
      "HF state dict", sd, hf_shapes(config),
      f"(config {config.name!r}: D={config.embed_dim}, F={config.hidden_dim}, "
      f"N={config.num_heads}, K={config.num_kv_heads}, H={config.head_dim}, "
      f"V={config.vocab_size}, layers={config.num_layers}, tied={config.tie_embeddings})")
  a = {name: np.asarray(value) for name, value in sd.items()}
  n, k, h, d = config.num_heads, config.num_kv_heads, config.head_dim, config.embed_dim

  embed = a["model.embed_tokens.weight"]
  if config.embed_rows > config.vocab_size:
    pad = np.zeros((config.embed_rows - config.vocab_size, d), embed.dtype)
    embed = np.concatenate([embed, pad], axis=0)
  flat = {"embedder/input_embedding": embed, "final_norm/scale": a["model.norm.weight"]}
  if not config.tie_embeddings:
    flat["lm_head/kernel"] = a["lm_head.weight"].T
  for i in range(config.num_layers):
    p, q = f"model.layers.{i}.", f"layer_{i}/"
    for hf_name, norm in _layer_norm_names(config).items():
      flat[q + norm + "/scale"] = a[p + hf_name + ".weight"]
    flat[q + "attn/q_einsum/w"] = a[p + "self_attn.q_proj.weight"].reshape(n, h, d).transpose(
        0, 2, 1)
    flat[q + "attn/kv_einsum/w"] = np.stack([
        a[p + f"self_attn.{c}_proj.weight"].reshape(k, h, d).transpose(0, 2, 1) for c in "kv"])
    flat[q + "attn/attn_vec_einsum/w"] = a[p + "self_attn.o_proj.weight"].T.reshape(n, h, d)
    flat[q + "mlp/gating_einsum/w"] = np.stack(
        [a[p + "mlp.gate_proj.weight"].T, a[p + "mlp.up_proj.weight"].T])
    flat[q + "mlp/linear/w"] = a[p + "mlp.down_proj.weight"].T
  return _unflatten({name: np.ascontiguousarray(value) for name, value in flat.items()})


def hf_state_dict_from_params(config: TransformerConfig,
                              params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The HF *ForCausalLM state dict (numpy, dtypes kept) of our parameter tree.

  Embedding rows beyond `config.vocab_size` are dropped; tied models get no `lm_head.weight`
  (what `save_pretrained` writes).

  Raises:
    ValueError: listing every missing/unexpected parameter and wrong shape.
  """
  flat = _flatten(params)
  _check_names_and_shapes("parameter tree", flat, _param_shapes(config),
                          f"(config {config.name!r}; the tree is documented in "
                          f"matquant_jax/models/config.py)")
  a = {name: np.asarray(value) for name, value in flat.items()}
  n, k, h, d = config.num_heads, config.num_kv_heads, config.head_dim, config.embed_dim
  sd = {"model.embed_tokens.weight": a["embedder/input_embedding"][: config.vocab_size],
        "model.norm.weight": a["final_norm/scale"]}
  if not config.tie_embeddings:
    sd["lm_head.weight"] = a["lm_head/kernel"].T
  for i in range(config.num_layers):
    p, q = f"model.layers.{i}.", f"layer_{i}/"
    for hf_name, norm in _layer_norm_names(config).items():
      sd[p + hf_name + ".weight"] = a[q + norm + "/scale"]
    sd[p + "self_attn.q_proj.weight"] = a[q + "attn/q_einsum/w"].transpose(0, 2, 1).reshape(
        n * h, d)
    kv = a[q + "attn/kv_einsum/w"]
    sd[p + "self_attn.k_proj.weight"] = kv[0].transpose(0, 2, 1).reshape(k * h, d)
    sd[p + "self_attn.v_proj.weight"] = kv[1].transpose(0, 2, 1).reshape(k * h, d)
    sd[p + "self_attn.o_proj.weight"] = a[q + "attn/attn_vec_einsum/w"].reshape(n * h, d).T
    gating = a[q + "mlp/gating_einsum/w"]
    sd[p + "mlp.gate_proj.weight"] = gating[0].T
    sd[p + "mlp.up_proj.weight"] = gating[1].T
    sd[p + "mlp.down_proj.weight"] = a[q + "mlp/linear/w"].T
  return {name: np.ascontiguousarray(value) for name, value in sd.items()}


# config.json


def hf_model_type(config: TransformerConfig) -> str:
  """'gemma2' for Gemma-style configs, 'llama' if the name says so, else 'mistral'."""
  if config.post_norms or config.norm_type == NormType.ZERO_CENTERED:
    return _GEMMA2
  return _LLAMA if "llama" in config.name.lower() else _MISTRAL


def _scalar_for_query_scale(scale: float) -> int | float:
  """HF's query_pre_attn_scalar s, with scale = s ** -0.5 (an int when it is one)."""
  s = scale ** -2
  return int(round(s)) if math.isclose(s, round(s), rel_tol=1e-9) else s


def hf_config_from_config(config: TransformerConfig, model_type: str | None = None
                          ) -> dict[str, Any]:
  """A transformers config.json dict (readable by transformers 4.4x and 5.x).

  Args:
    config: the architecture.
    model_type: 'gemma2', 'mistral' or 'llama'; default from `hf_model_type(config)`.

  Raises:
    ValueError: when the architecture cannot be expressed by that HF model class.

  Long: a field-by-field mapping to transformers' config.json for both architectures.
  """
  model_type = model_type or hf_model_type(config)
  if model_type not in _ARCHITECTURES:
    raise ValueError(f"unknown HF model_type {model_type!r}; choose one of "
                     f"{', '.join(_ARCHITECTURES)}.")
  problems = []

  def need(field, value, expected):
    if value != expected:
      problems.append(f"{field}={value!r} (HF {model_type} needs {expected!r})")

  d = {
      "architectures": [_ARCHITECTURES[model_type]],
      "model_type": model_type,
      "vocab_size": config.vocab_size,
      "hidden_size": config.embed_dim,
      "intermediate_size": config.hidden_dim,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim,
      "rms_norm_eps": config.norm_eps,
      "rope_theta": config.rope_base,
      "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_base},
      "tie_word_embeddings": config.tie_embeddings,
      "bos_token_id": config.bos_id,
      "eos_token_id": config.eos_id,
      "pad_token_id": config.pad_id,
      "attention_bias": False,
  }
  if model_type == _GEMMA2:
    need("norm_type", config.norm_type, NormType.ZERO_CENTERED)
    need("post_norms", config.post_norms, True)
    need("activation", config.activation, Activation.GELU_TANH)
    need("scale_embeddings", config.scale_embeddings, True)
    d["hidden_activation"] = "gelu_pytorch_tanh"
    d["query_pre_attn_scalar"] = _scalar_for_query_scale(config.resolved_query_scale)
    d["attn_logit_softcapping"] = config.attn_logit_softcap
    d["final_logit_softcapping"] = config.final_logit_softcap
    d["sliding_window"] = config.sliding_window
    d["layer_types"] = ["sliding_attention" if config.is_local(i) else "full_attention"
                        for i in range(config.num_layers)]
    if config.attention_pattern == AttentionPattern.LOCAL_GLOBAL:
      d["cache_implementation"] = "hybrid"
  else:
    need("norm_type", config.norm_type, NormType.PLAIN)
    need("post_norms", config.post_norms, False)
    need("activation", config.activation, Activation.SILU)
    need("scale_embeddings", config.scale_embeddings, False)
    need("attn_logit_softcap", config.attn_logit_softcap, None)
    need("final_logit_softcap", config.final_logit_softcap, None)
    if not math.isclose(config.resolved_query_scale, config.head_dim ** -0.5, rel_tol=1e-12):
      problems.append(f"query_scale={config.query_scale!r} (HF {model_type} uses head_dim**-0.5)")
    d["hidden_act"] = "silu"
    if model_type == _MISTRAL:
      if config.attention_pattern == AttentionPattern.LOCAL_GLOBAL:
        problems.append("attention_pattern=local_global (HF mistral has one window for all "
                        "layers)")
      d["sliding_window"] = (config.sliding_window
                             if config.attention_pattern == AttentionPattern.LOCAL else None)
    else:
      need("attention_pattern", config.attention_pattern, AttentionPattern.GLOBAL)
      d["mlp_bias"] = False
  if problems:
    raise ValueError(f"config {config.name!r} cannot be written as an HF {model_type} config: "
                     + "; ".join(problems) + ".")
  return d


def _rope_base(d: Mapping[str, Any]) -> float:
  rope = d.get("rope_parameters") or {}
  if "full_attention" in rope and isinstance(rope["full_attention"], Mapping):
    # transformers 5.x per-layer-type RoPE (Gemma-3 style): one base must serve every layer.
    bases = {r.get("rope_theta") for r in rope.values() if isinstance(r, Mapping)}
    types = {r.get("rope_type", "default") for r in rope.values() if isinstance(r, Mapping)}
    if len(bases) != 1 or types != {"default"}:
      raise ValueError(f"per-layer-type rope_parameters {rope!r} are not supported.")
    rope = next(iter(rope.values()))
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  scaling = d.get("rope_scaling")
  if rope_type != "default" or (scaling and scaling.get("rope_type",
                                                        scaling.get("type")) != "default"):
    raise ValueError(f"RoPE scaling ({rope or scaling!r}) is not supported; only the default "
                     f"RoPE is.")
  theta = rope.get("rope_theta", d.get("rope_theta"))
  return float(theta) if theta is not None else 10_000.0


def _first_id(value, default: int) -> int:
  if value is None:
    return default
  if isinstance(value, (list, tuple)):
    return int(value[0]) if value else default
  return int(value)


def _int_field(d: Mapping[str, Any], key: str, default: int | None = None) -> int:
  """A positive integer field of config.json, or ValueError naming it."""
  value = d.get(key)
  if value is None:
    if default is None:
      raise ValueError(f"config.json lacks {key!r}.")
    return default
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f"config.json field {key}={value!r} must be a positive integer.")
  return value


def config_from_hf_config(d: Mapping[str, Any], *, name: str | None = None,
                          num_embed: int | None = None) -> TransformerConfig:
  """A TransformerConfig from a transformers config.json dict (Gemma2, Mistral, Llama).

  Reads transformers 5.x (`rope_parameters`, `layer_types`) and 4.x (`rope_theta`) fields.

  Args:
    d: the config.json contents.
    name: the config name; default `_name_or_path` or the model type.
    num_embed: embedding rows to allocate (e.g. 256128 to match Gemma's Flax checkpoints).

  Raises:
    ValueError: for other model types or features this model does not implement.
  """
  model_type = d.get("model_type")
  if model_type not in _ARCHITECTURES:
    raise ValueError(f"unsupported HF model_type {model_type!r}: expected one of "
                     f"{', '.join(_ARCHITECTURES)}.")
  heads = _int_field(d, "num_attention_heads")
  hidden = _int_field(d, "hidden_size")
  layers = _int_field(d, "num_hidden_layers")
  common = dict(
      name=name or d.get("_name_or_path") or model_type,
      num_layers=layers, embed_dim=hidden, hidden_dim=_int_field(d, "intermediate_size"),
      num_heads=heads, num_kv_heads=_int_field(d, "num_key_value_heads", heads),
      head_dim=_int_field(d, "head_dim", hidden // heads), vocab_size=_int_field(d, "vocab_size"),
      num_embed=num_embed, rope_base=_rope_base(d), norm_eps=float(d.get("rms_norm_eps", 1e-6)),
      bos_id=_first_id(d.get("bos_token_id"), 2 if model_type == _GEMMA2 else 1),
      eos_id=_first_id(d.get("eos_token_id"), 1 if model_type == _GEMMA2 else 2),
      pad_id=_first_id(d.get("pad_token_id"), 0),
  )
  if d.get("attention_bias") or d.get("mlp_bias"):
    raise ValueError("attention/MLP biases are not supported.")

  if model_type == _GEMMA2:
    act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
      raise ValueError(f"Gemma-2 hidden_activation {act!r} is not supported (tanh-approximate "
                       f"GELU only).")
    window = d.get("sliding_window", 4096)
    layer_types = d.get("layer_types")
    if layer_types is None:
      # transformers 4.x: even layers slide (`sliding_window if not bool(layer_idx % 2)`).
      layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention"
                     for i in range(layers)]
    pattern = _pattern_from_layer_types(layer_types, layers, window)
    softcap = d.get("attn_logit_softcapping", 50.0)
    final_cap = d.get("final_logit_softcapping", 30.0)
    return TransformerConfig(
        **common, query_scale=float(d.get("query_pre_attn_scalar", 256)) ** -0.5,
        attn_logit_softcap=None if softcap is None else float(softcap),
        final_logit_softcap=None if final_cap is None else float(final_cap),
        attention_pattern=pattern,
        sliding_window=None if pattern == AttentionPattern.GLOBAL else int(window),
        norm_type=NormType.ZERO_CENTERED, post_norms=True, activation=Activation.GELU_TANH,
        scale_embeddings=True, tie_embeddings=bool(d.get("tie_word_embeddings", True)))

  act = d.get("hidden_act", "silu")
  if act != "silu":
    raise ValueError(f"{model_type} hidden_act {act!r} is not supported (SiLU only).")
  # MistralConfig (4.x and 5.x) defaults an absent sliding_window to 4096; null means none.
  window = d.get("sliding_window", 4096) if model_type == _MISTRAL else None
  if model_type == _MISTRAL and d.get("layer_types") is not None:
    if any(t != "full_attention" for t in d["layer_types"]) and window is None:
      raise ValueError(f"layer_types {d['layer_types']} need a sliding_window.")
  return TransformerConfig(
      **common, attention_pattern=AttentionPattern.LOCAL if window else AttentionPattern.GLOBAL,
      sliding_window=int(window) if window else None, norm_type=NormType.PLAIN,
      post_norms=False, activation=Activation.SILU, scale_embeddings=False,
      tie_embeddings=bool(d.get("tie_word_embeddings", False)))


def _pattern_from_layer_types(layer_types, num_layers: int, window) -> AttentionPattern:
  layer_types = list(layer_types)
  if len(layer_types) != num_layers:
    raise ValueError(f"layer_types has {len(layer_types)} entries for {num_layers} layers.")
  local = [t == "sliding_attention" for t in layer_types]
  unknown = sorted({t for t in layer_types} - {"sliding_attention", "full_attention"})
  if unknown:
    raise ValueError(f"unsupported layer_types {unknown}.")
  if any(local) and not window:
    raise ValueError("layer_types has sliding layers but sliding_window is not set.")
  if not any(local):
    return AttentionPattern.GLOBAL
  if all(local):
    return AttentionPattern.LOCAL
  if local == [i % 2 == 0 for i in range(num_layers)]:
    return AttentionPattern.LOCAL_GLOBAL
  raise ValueError(f"layer_types {layer_types} is neither all-global, all-sliding nor "
                   f"alternating sliding/full starting with sliding.")
