"""OmniQuant's learnable parameters for one block: LWC clipping and the equivalent transform.

What is learned per layer (spec §3, Eq. 3-5), everything else frozen:

    lwc/<module>/<kernel>/{gamma, beta}   logits, shaped like the kernel's α ([2, 1, F] for
                                          gating_einsum, [1, D] for linear, ...): one clipping
                                          pair per output channel per quantized kernel;
                                          γ = σ(gamma), β = σ(beta) (minmax.lwc_factor)
    let/ffn_in    [D]     log s of the FFN input channels   (gate and up projections)
    let/ffn_mid   [F]     log s of the down projection's input channels
    let/attn_in   [D]     log s of the q/k/v input channels          (only when attention is
    let/attn_out  [K, H]  log s of the output projection's input     quantized)

Initialisation: LWC logits at OmniQuant's 4.0 (σ(4) ≈ 0.982, almost no clipping at first;
`minmax.LWC_INIT_LOGIT`); LET log-scales at 0 (s = 1, the identity). s = exp(log s) keeps every
scale positive whatever the optimizer does (OmniQuant stores s directly; with Adam at lr 1e-3
over ~1200 steps a raw scale could cross zero).

LET placement (`let` option; the paper's Eq. 4 has a shift δ and a scale s, but says nothing
about gated FFNs, and our architectures have no biases):

  "scale" (default) — a scale-only equivalent transform, folded exactly into existing weights:
    * FFN input: y = (x̂ ⊙ (1+g)) W  = ((x̂ ⊙ (1+g)) ⊘ s)(s ⊙ W) for both gate and up
      (they read the same normed x), folded into the pre-FFN RMSNorm scale — (1+g)/s − 1 for
      Gemma's ZERO_CENTERED norm, g/s for a PLAIN norm — and into the rows of gating_einsum.
    * Down projection input: act(x W_gate) ⊙ (x W_up) is linear in the up projection's output,
      so h ⊘ s is obtained by dividing up's output columns (gating_einsum[1]) by s, and the
      down projection's rows (linear) are multiplied by s. The gate column cannot carry it
      (GELU/SiLU are not homogeneous), which fixes the placement for GeGLU and SwiGLU alike.
    * Attention (scope ffn+attn): the input scale folds into the pre-attention norm and the
      rows of q_einsum and kv_einsum; the output projection's input (per (kv head, head_dim))
      folds into the value columns (kv_einsum[1]) and the rows of attn_vec_einsum, shared by
      the G query heads of a KV group (probs·V is linear in V). No q/k scale: RoPE mixes
      dimension i with i + H/2, and weight-only quantization gains nothing from it.
  "scale_shift" — "scale" plus Eq. 4's shift δ [D] on the FFN input, learned from δ = 0:
      x̂ W → ((x̂ − δ) ⊘ s) · Q(s ⊙ W) + δ·W.
    Neither Gemma-2 nor Mistral has a bias to absorb it, so the folded model gains two
    full-precision parameters per layer (TransformerConfig.ffn_shift): pre_ffw_norm/bias
    = −δ ⊘ s, added after the norm's scale, and mlp/gating_bias [2, F] = δ·W with the
    unscaled, unquantized W (the gate and up outputs; the up half is divided by the down
    projection's scale like its columns). The exported int8 checkpoint stores both in its
    float part and records ffn_shift in its model config; the int8 loader, evaluation and
    serving run it, while HF/Gemma/Mistral writers refuse it (their formats have no biases).
    The down projection's input and the attention inputs keep scale-only LET: a shift there
    would need biases inside the gated product or on q/k/v before RoPE.
  "none" — LWC only.

All folds are exact in real arithmetic; in float32 they agree to rounding (tests check it).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from matquant_jax.models.config import NormType
from matquant_jax.models.config import TransformerConfig
from matquant_jax.quant import fake_quant as fake_quant_lib
from matquant_jax.quant import kernels as kernels_lib
from matquant_jax.quant import minmax
from matquant_jax.quant.plan import Scope
from matquant_jax.quant.plan import plan_kernels

LET_MODES = ("scale", "scale_shift", "none")

NO_CLIP_LOGIT = minmax.NO_CLIP_LOGIT


@dataclasses.dataclass(frozen=True)
class CalibOptions:
  """Static options of the learnable quantizer of a block (hashable: a jit cache key).

  Attributes:
    scope: which kernels are quantized (and get LWC/LET): Scope.FFN (paper) or FFN_ATTN.
    lwc: learn the clipping factors γ, β (Eq. 3); False keeps plain MinMax.
    lwc_init_logit: σ(lwc_init_logit) is their initial value (σ(4) ≈ 0.982, OmniQuant's
      init), whatever lwc_max.
    lwc_max: their upper bound, γ = lwc_max·σ(logit): 1 is OmniQuant's (clipping only shrinks
      the range); above 1 the range may also grow (minmax.lwc_factor says why a sliced grid
      wants that).
    let: "scale" (default), "scale_shift" or "none", see the module docstring.
    round_zero: round the zero point (OmniQuant) instead of the paper's unrounded z.
  """
  scope: Scope = Scope.FFN
  lwc: bool = True
  lwc_init_logit: float = minmax.LWC_INIT_LOGIT
  lwc_max: float = 1.0
  let: str = "scale"
  round_zero: bool = False

  def __post_init__(self):
    if not isinstance(self.scope, Scope):
      object.__setattr__(self, "scope", Scope(self.scope))
    if self.scope not in (Scope.FFN, Scope.FFN_ATTN, Scope.ATTN):
      raise ValueError(f"calibration scope must be ffn, attn or ffn+attn, got "
                       f"{self.scope.value!r}.")
    if self.let not in LET_MODES:
      raise ValueError(f"let={self.let!r}; choose one of {LET_MODES}.")
    if not (math.isfinite(self.lwc_max) and self.lwc_max >= 1.0):
      raise ValueError(f"lwc_max={self.lwc_max} must be a number >= 1 (1 = OmniQuant's bound).")
    if self.let == "scale_shift" and not self.quantizes_ffn:
      raise ValueError(f"let='scale_shift' shifts the FFN input, and scope "
                       f"{self.scope.value!r} quantizes no FFN kernel; use let='scale'.")

  @property
  def kernel_paths(self) -> tuple[tuple[str, str], ...]:
    """(module, kernel) of every kernel in scope; the block param path is <module>/<kernel>/w."""
    return tuple((kernels_lib.BY_NAME[name].module, name) for _, name in plan_kernels(self.scope))

  @property
  def shifts_ffn(self) -> bool:
    """Whether the FFN input gets a learned shift δ (folded into new biases)."""
    return self.let == "scale_shift" and self.quantizes_ffn

  @property
  def quantizes_ffn(self) -> bool:
    return self.scope in (Scope.FFN, Scope.FFN_ATTN)

  @property
  def quantizes_attn(self) -> bool:
    return self.scope in (Scope.ATTN, Scope.FFN_ATTN)


def let_shapes(config: TransformerConfig, options: CalibOptions) -> dict[str, tuple[int, ...]]:
  """The LET log-scales of one block and their shapes (empty when let == 'none')."""
  if options.let == "none":
    return {}
  out = {}
  if options.quantizes_attn:
    out["attn_in"] = (config.embed_dim,)
    out["attn_out"] = (config.num_kv_heads, config.head_dim)
  if options.quantizes_ffn:
    out["ffn_in"] = (config.embed_dim,)
    out["ffn_mid"] = (config.hidden_dim,)
  if options.shifts_ffn:
    out["ffn_shift"] = (config.embed_dim,)
  return out


def folded_config(config: TransformerConfig, options: CalibOptions) -> TransformerConfig:
  """The architecture of the folded (and exported) model: with the shift's biases when the
  FFN input is shifted."""
  return config.replace(ffn_shift=True) if options.shifts_ffn else config


def init_calib_params(config: TransformerConfig, options: CalibOptions) -> dict[str, Any]:
  """The initial learnable state of one block (float32 numpy; see the module docstring).

  Returns:
    {'lwc': {module: {kernel: {'gamma', 'beta'}}}, 'let': {name: log_s}}; a part is an empty
    dict when its option is off.
  """
  lwc: dict[str, Any] = {}
  logit = minmax.rebound_logit(options.lwc_init_logit, options.lwc_max)  # factor σ(init logit)
  if options.lwc:
    for module, kernel in options.kernel_paths:
      shp = kernels_lib.BY_NAME[kernel].stat_shape(config)
      lwc.setdefault(module, {})[kernel] = {
          "gamma": np.full(shp, logit, np.float32),
          "beta": np.full(shp, logit, np.float32)}
  let = {name: np.zeros(shp, np.float32) for name, shp in let_shapes(config, options).items()}
  return {"lwc": lwc, "let": let}


def minmax_calib_params(config: TransformerConfig, options: CalibOptions) -> dict[str, Any]:
  """A calib state that reproduces plain MinMax exactly: γ = β = 1 and s = 1 (identity)."""
  c = init_calib_params(config, options)
  c["lwc"] = jax.tree_util.tree_map(lambda x: np.full_like(x, NO_CLIP_LOGIT), c["lwc"])
  return c


def clipping_factors(calib: Mapping[str, Any], module: str, kernel: str, lwc_max: float = 1.0):
  """(γ, β) in (0, lwc_max) of one kernel (exactly 1 at NO_CLIP_LOGIT), or (None, None)
  without LWC."""
  entry = calib.get("lwc", {}).get(module, {}).get(kernel)
  if entry is None:
    return None, None
  return (minmax.lwc_factor(jnp.asarray(entry["gamma"]), lwc_max),
          minmax.lwc_factor(jnp.asarray(entry["beta"]), lwc_max))


def _fold_norm(scale: jax.Array, s: jax.Array, norm_type: NormType) -> jax.Array:
  """The norm scale whose output is the old output divided by s (exact for both norm types)."""
  scale = scale.astype(jnp.float32)
  if norm_type == NormType.ZERO_CENTERED:
    return (1.0 + scale) / s - 1.0
  return scale / s


def _copy_dicts(tree):
  """New dicts at every level, same leaves: callers' trees are never mutated."""
  return {k: _copy_dicts(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def fold_let(config: TransformerConfig, block_params: Mapping[str, Any],
             let: Mapping[str, Any]) -> dict[str, Any]:
  """Block params with the equivalent transformation folded in (float32 where touched).

  Args:
    config: the architecture (norm type, heads).
    block_params: one `layer_i` subtree (pre_attention_norm, attn, pre_ffw_norm, mlp, ...).
    let: {'ffn_in' [D], 'ffn_mid' [F], 'attn_in' [D], 'attn_out' [K, H]} log-scales and
      'ffn_shift' [D] (δ); missing names are the identity.

  Returns:
    A new subtree computing the same function (up to float rounding) whose quantized kernels
    are W ⊙ s: the weights OmniQuant quantizes (Eq. 4). With 'ffn_shift' (or biases already in
    `block_params`) it has pre_ffw_norm/bias and mlp/gating_bias: run it with
    config.ffn_shift=True (`folded_config`).
  """
  p = _copy_dicts(block_params)

  def f32(x):
    return jnp.asarray(x).astype(jnp.float32)

  if "ffn_in" in let or "ffn_shift" in let:
    s = jnp.exp(f32(let["ffn_in"])) if "ffn_in" in let else jnp.ones((config.embed_dim,))
    norm = p["pre_ffw_norm"]
    w = f32(p["mlp"]["gating_einsum"]["w"])                             # [2, D, F]
    p["pre_ffw_norm"] = {"scale": _fold_norm(f32(norm["scale"]), s, config.norm_type)}
    if "ffn_shift" in let or "bias" in norm:
      delta = f32(let["ffn_shift"]) if "ffn_shift" in let else jnp.zeros_like(s)   # [D]
      bias = f32(norm["bias"]) if "bias" in norm else jnp.zeros_like(s)
      p["pre_ffw_norm"]["bias"] = (bias - delta) / s                   # (x̂ − δ) ⊘ s
      gating_bias = (f32(p["mlp"]["gating_bias"]) if "gating_bias" in p["mlp"]
                     else jnp.zeros((2, config.hidden_dim), jnp.float32))
      p["mlp"]["gating_bias"] = gating_bias + jnp.einsum("d,cdf->cf", delta, w)   # + δ·W
    p["mlp"]["gating_einsum"]["w"] = w * s[None, :, None]
  if "ffn_mid" in let:
    s = jnp.exp(f32(let["ffn_mid"]))                                    # [F]
    w = f32(p["mlp"]["gating_einsum"]["w"])                             # [2, D, F]
    p["mlp"]["gating_einsum"]["w"] = w.at[1].divide(s[None, :])        # up columns ⊘ s
    if "gating_bias" in p["mlp"]:                                       # up's bias too
      p["mlp"]["gating_bias"] = f32(p["mlp"]["gating_bias"]).at[1].divide(s)
    p["mlp"]["linear"]["w"] = f32(p["mlp"]["linear"]["w"]) * s[:, None]
  if "attn_in" in let:
    s = jnp.exp(f32(let["attn_in"]))                                    # [D]
    p["pre_attention_norm"] = {"scale": _fold_norm(f32(p["pre_attention_norm"]["scale"]), s,
                                                   config.norm_type)}
    p["attn"]["q_einsum"]["w"] = f32(p["attn"]["q_einsum"]["w"]) * s[None, :, None]
    p["attn"]["kv_einsum"]["w"] = f32(p["attn"]["kv_einsum"]["w"]) * s[None, None, :, None]
  if "attn_out" in let:
    s = jnp.exp(f32(let["attn_out"]))                                   # [K, H]
    groups = config.num_heads // config.num_kv_heads
    w = f32(p["attn"]["kv_einsum"]["w"])                                # [2, K, D, H]
    p["attn"]["kv_einsum"]["w"] = w.at[1].divide(s[:, None, :])        # value columns ⊘ s
    s_q = jnp.repeat(s, groups, axis=0)                                 # [N, H]: head n -> n//G
    p["attn"]["attn_vec_einsum"]["w"] = f32(p["attn"]["attn_vec_einsum"]["w"]) * s_q[:, :, None]
  return p


def quantized_block_params(config: TransformerConfig, block_params: Mapping[str, Any],
                           calib: Mapping[str, Any], bits, *, options: CalibOptions,
                           parent_bits: int = 8, extra_precision: bool = False
                           ) -> dict[str, Any]:
  """F_l's params with LET folded and every quantized kernel replaced by S(Q_Omni(W'), r).

  `bits` may be a traced int32 scalar (one compiled forward for every width of R). The
  gradient reaches γ, β through α and z, and s through W' = W ⊙ s (both through the STE and
  through max/min, so `stop_weight_grad=False`); nothing here is differentiated w.r.t. the
  model weights, which callers pass as constants.
  """
  p = fold_let(config, block_params, calib.get("let", {}))
  for module, kernel in options.kernel_paths:
    gamma, beta = clipping_factors(calib, module, kernel, options.lwc_max)
    w = p[module][kernel]["w"]
    p[module][kernel] = {"w": fake_quant_lib.fake_quant(
        jnp.asarray(w).astype(jnp.float32), bits, parent_bits,
        kernels_lib.BY_NAME[kernel].reduce_axes,
        extra_precision=extra_precision, gamma=gamma, beta=beta,
        round_zero=options.round_zero, stop_weight_grad=False)}
  return p


def fold_model_params(config: TransformerConfig, params: Mapping[str, Any],
                      calib_per_layer: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
  """The whole model's params with every layer's LET folded in (host numpy, float32 where
  touched). Layers without an entry are left as they are."""
  out = dict(params)
  # On the host: the folded model is written out from host memory, and nothing here needs
  # the accelerator (which may hold only one block).
  fold = jax.jit(functools.partial(fold_let, config))  # one compilation for every layer
  with jax.default_device(jax.local_devices(backend="cpu")[0]):
    for i, calib in calib_per_layer.items():
      name = f"layer_{i}"
      if calib.get("let"):
        out[name] = jax.tree_util.tree_map(np.asarray, fold(params[name], calib["let"]))
  return out


def export_clipping(calib_per_layer: Mapping[int, Mapping[str, Any]], lwc_max: float = 1.0
                    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{'layer_i/<module>/<kernel>/w': (γ, β)} for export_matquant_checkpoint(clipping=...)."""
  out = {}
  for i, calib in calib_per_layer.items():
    for module, kernels in calib.get("lwc", {}).items():
      for kernel in kernels:
        g, b = clipping_factors(calib, module, kernel, lwc_max)
        out[f"layer_{i}/{module}/{kernel}/w"] = (np.asarray(g), np.asarray(b))
  return out
