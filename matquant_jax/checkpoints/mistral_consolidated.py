"""Mistral's original checkpoint format (params.json + consolidated.safetensors) <-> our tree.

What mistral-inference's `Transformer.from_folder` reads (spec/models.md §3c). Names:

    tok_embeddings.weight [V, D]            -> HF model.embed_tokens.weight
    norm.weight [D]                         -> model.norm.weight
    output.weight [V, D]                    -> lm_head.weight
    layers.{i}.attention_norm.weight        -> model.layers.{i}.input_layernorm.weight
    layers.{i}.ffn_norm.weight              -> model.layers.{i}.post_attention_layernorm.weight
    layers.{i}.attention.w{q,k,v,o}.weight  -> model.layers.{i}.self_attn.{q,k,v,o}_proj.weight
    layers.{i}.feed_forward.w1 / w2 / w3    -> mlp.gate_proj / down_proj / up_proj

The original code applies RoPE to interleaved pairs (dims 2i, 2i+1); HF and our model rotate
halves (dims i, i + H/2). So wq and wk (not wv, wo) are permuted on the way in: within each
head, rows become [even rows..., odd rows...] (HF `permute_for_rope`). Reading then goes through
the HF mapping, so there is one HF -> our-tree conversion in the library.

Only safetensors files are read (`consolidated.safetensors`, or several `consolidated*.
safetensors`); the pickled `consolidated.00.pth` is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
import json
import os
import pathlib
from typing import Any

import numpy as np

from matquant_jax.checkpoints import _common
from matquant_jax.checkpoints import safetensors_io
from matquant_jax.models import config as config_lib
from matquant_jax.models.config import AttentionPattern
from matquant_jax.models.config import TransformerConfig

PathLike = str | os.PathLike

PARAMS_FILE = "params.json"
WEIGHTS_FILE = "consolidated.safetensors"

# mistral-inference / the 2023 reference used 10 000 when params.json has no rope_theta
# (v0.1); mistral-inference's newer 1e6 default is for models whose params.json states it.
DEFAULT_ROPE_THETA = 10_000.0
DEFAULT_NORM_EPS = 1e-5

# params.json keys that change the architecture in ways this model does not implement.
_UNSUPPORTED_KEYS = ("moe", "lora", "vision_encoder", "quantization", "rope_scaling",
                     "yarn", "llama_4_scaling", "mla", "attention_bias")
_KNOWN_KEYS = ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "norm_eps",
               "vocab_size", "sliding_window", "rope_theta", "max_seq_len", "max_batch_size",
               "model_type", "multiple_of", "ffn_dim_multiplier", "use_biases", "_version",
               "max_position_embeddings", "tied_embeddings")

_GLOBAL_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
}


def permute_for_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Interleaved-pair rows -> half-split rows, per head (original -> HF layout of wq / wk).

  `w.view(n_heads, hd // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)` (HF's converter).
  """
  dim1, dim2 = w.shape
  return w.reshape(n_heads, dim1 // n_heads // 2, 2, dim2).swapaxes(1, 2).reshape(dim1, dim2)


def unpermute_for_rope(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of `permute_for_rope` (HF -> original layout)."""
  dim1, dim2 = w.shape
  return w.reshape(n_heads, 2, dim1 // n_heads // 2, dim2).swapaxes(1, 2).reshape(dim1, dim2)


def original_name_to_hf(name: str) -> str | None:
  """The HF name of a consolidated tensor name, or None for names of no known module."""
  if name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[name]
  parts = name.split(".", 2)
  if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
    return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
  return None


def hf_name_to_original(name: str) -> str:
  """Inverse of `original_name_to_hf`."""
  for orig, hf in _GLOBAL_NAMES.items():
    if name == hf:
      return orig
  parts = name.split(".", 3)
  if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
    for orig, hf in _LAYER_NAMES.items():
      if parts[3] == hf:
        return f"layers.{parts[2]}.{orig}"
  raise ValueError(f"no consolidated name for HF tensor {name!r}.")


def _weight_files(path: pathlib.Path) -> list[pathlib.Path]:
  if not path.is_dir():
    raise FileNotFoundError(f"Mistral checkpoint directory {path} does not exist.")
  files = sorted(path.glob("consolidated*.safetensors"))
  if files:
    return files
  present = sorted(p.name for p in path.iterdir())
  pickled = [p for p in present if p.endswith((".pth", ".pt", ".bin"))]
  hint = (f" Pickled weights ({pickled}) are never loaded: use the consolidated.safetensors "
          "release of the model, or convert to safetensors first." if pickled else "")
  raise FileNotFoundError(f"{path} has no {WEIGHTS_FILE} (files there: {present}).{hint}")


def config_from_params_json(
    d: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]] | None = None
) -> TransformerConfig:
  """A TransformerConfig from params.json (`shapes` fill hidden_dim / vocab_size if absent).

  The preset with identical fields is returned when there is one (e.g. mistral_7b_v0_1).
  """
  problems = [f"{k}={d[k]!r}" for k in _UNSUPPORTED_KEYS if d.get(k)]
  if problems:
    raise ValueError(f"params.json uses features this model does not implement: "
                     f"{', '.join(problems)}.")
  shapes = shapes or {}
  try:
    dim, n_layers, n_heads = int(d["dim"]), int(d["n_layers"]), int(d["n_heads"])
  except KeyError as e:
    raise ValueError(f"params.json has no {e.args[0]!r}.") from None
  hidden = d.get("hidden_dim")
  if hidden is None and "layers.0.feed_forward.w1.weight" in shapes:
    hidden = shapes["layers.0.feed_forward.w1.weight"][0]
  vocab = d.get("vocab_size")
  if (vocab is None or int(vocab) <= 0) and "tok_embeddings.weight" in shapes:
    vocab = shapes["tok_embeddings.weight"][0]
  if hidden is None or vocab is None or int(vocab) <= 0:
    raise ValueError("params.json lacks hidden_dim / vocab_size and the weights do not give them.")
  window = d.get("sliding_window")
  if isinstance(window, (list, tuple)):
    raise ValueError(f"per-layer sliding_window {window!r} is not supported.")
  if d.get("tied_embeddings"):
    raise ValueError("tied_embeddings=true is not supported for the consolidated format.")
  config = TransformerConfig(
      name="mistral_consolidated", num_layers=n_layers, embed_dim=dim, hidden_dim=int(hidden),
      num_heads=n_heads, num_kv_heads=int(d.get("n_kv_heads") or n_heads),
      head_dim=int(d.get("head_dim") or dim // n_heads), vocab_size=int(vocab),
      rope_base=float(d.get("rope_theta") or DEFAULT_ROPE_THETA),
      attention_pattern=AttentionPattern.LOCAL if window else AttentionPattern.GLOBAL,
      sliding_window=int(window) if window else None,
      norm_eps=float(d.get("norm_eps", DEFAULT_NORM_EPS)), norm_type="plain", post_norms=False,
      activation="silu", scale_embeddings=False, tie_embeddings=False, bos_id=1, eos_id=2,
      pad_id=0)
  for preset in config_lib.PRESETS.values():
    if config.replace(name=preset.name) == preset:
      return preset
  return config


def params_json_from_config(config: TransformerConfig) -> dict[str, Any]:
  """params.json for `config` (a Mistral/Llama-style config)."""
  if config.post_norms or config.tie_embeddings or config.scale_embeddings or (
      config.attention_pattern == AttentionPattern.LOCAL_GLOBAL):
    raise ValueError(f"config {config.name!r} is not a Mistral-style model (needs plain norms, "
                     "no post norms, untied head, one attention pattern for all layers).")
  d = {"dim": config.embed_dim, "n_layers": config.num_layers, "head_dim": config.head_dim,
       "hidden_dim": config.hidden_dim, "n_heads": config.num_heads,
       "n_kv_heads": config.num_kv_heads, "norm_eps": config.norm_eps,
       "vocab_size": config.vocab_size, "rope_theta": config.rope_base}
  if config.attention_pattern == AttentionPattern.LOCAL:
    d["sliding_window"] = config.sliding_window
  return d


def load_mistral_consolidated(
    path: PathLike, dtype: Any = np.float32
) -> tuple[TransformerConfig, dict[str, Any]]:
  """Reads params.json + consolidated.safetensors into (config, params).

  Args:
    path: directory holding params.json and consolidated.safetensors.
    dtype: dtype of the returned arrays; None keeps the stored one.

  Returns:
    (config: the matching preset, e.g. mistral_7b_v0_1, else one built from params.json with
    rope_theta 10 000 when absent; the bare parameter tree of numpy arrays).

  Raises:
    FileNotFoundError: missing directory, params.json or weights (or only pickled weights).
    ValueError: unsupported params.json; CheckpointMismatchError listing every missing,
      unexpected, misshaped or non-float tensor, before any tensor data is read.
  """
  path = pathlib.Path(path)
  files = _weight_files(path)
  params_file = path / PARAMS_FILE
  if not params_file.is_file():
    raise FileNotFoundError(f"{path} has no {PARAMS_FILE}; the consolidated format needs it.")
  infos = safetensors_io.list_tensors(files)
  try:
    params_json = json.loads(params_file.read_text())
    if not isinstance(params_json, dict):
      raise ValueError(f"holds a JSON {type(params_json).__name__}, not an object")
    config = config_from_params_json(params_json, {n: i.shape for n, i in infos.items()})
  except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError) as e:
    if isinstance(e, _common.CheckpointError):
      raise
    raise _common.CheckpointError(f"{params_file}: {e}") from None
  if config.head_dim % 2:
    raise ValueError(f"head_dim={config.head_dim} is odd; RoPE needs an even head_dim.")
  expected = {hf_name_to_original(n): s
              for n, s in safetensors_io.expected_hf_shapes(config).items()}
  _common.check_tensor_set(
      expected, {n: (i.shape, i.dtype) for n, i in infos.items()},
      what=f"Mistral checkpoint {path} (config {config.name!r})",
      hint=f"Is {PARAMS_FILE} the one these weights were released with?")

  heads = {"attention.wq.weight": config.num_heads, "attention.wk.weight": config.num_kv_heads}
  state = {}
  for name, x in safetensors_io.read_tensors(infos, _common.as_dtype(dtype)):
    n_heads = heads.get(name.split(".", 2)[-1])
    if n_heads is not None:
      x = permute_for_rope(x, n_heads)
    state[original_name_to_hf(name)] = x
  from matquant_jax.models import hf_mapping  # pylint: disable=g-import-not-at-top
  return config, hf_mapping.params_from_hf_state_dict(config, state)


def save_mistral_consolidated(
    path: PathLike,
    config: TransformerConfig,
    params: Mapping[str, Any],
    *,
    dtype: Any = "bfloat16",
    overwrite: bool = False,
) -> pathlib.Path:
  """Writes `params` as params.json + consolidated.safetensors (mistral-inference layout).

  wq / wk are stored in the original interleaved-pair RoPE layout (the inverse permutation).
  """
  from matquant_jax.models import hf_mapping  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  np_dtype = _common.as_dtype(dtype)
  _common.check_bias_free(config, "Mistral consolidated")
  _common.check_params(config, params, what="params to save")
  params_json = params_json_from_config(config)
  if (path / WEIGHTS_FILE).exists() and not overwrite:
    raise FileExistsError(f"{path / WEIGHTS_FILE} exists; pass overwrite=True to replace it.")
  path.mkdir(parents=True, exist_ok=True)
  state = hf_mapping.hf_state_dict_from_params(config, params)
  heads = {"attention.wq.weight": config.num_heads, "attention.wk.weight": config.num_kv_heads}

  def tensors():
    for hf_name, x in state.items():
      name = hf_name_to_original(hf_name)
      n_heads = heads.get(name.split(".", 2)[-1])
      yield name, (unpermute_for_rope(np.asarray(x), n_heads) if n_heads else x)

  safetensors_io.write_safetensors(path / WEIGHTS_FILE, tensors(), dtype=np_dtype,
                                   metadata={"format": "pt"})
  (path / PARAMS_FILE).write_text(json.dumps(params_json, indent=2) + "\n")
  return path
