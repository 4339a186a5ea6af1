"""Transformer configurations: one frozen dataclass, one preset per released model.

Gemma-2 and Mistral/Llama share one decoder (transformer.py); what differs between families is
all here, as explicit fields and enums (spec/models.md §1-§2 are the source for every number).

The parameter tree every model has (the same whatever the precision plan):

    embedder/input_embedding      [num_embed, D]   (Gemma checkpoints: 256128 rows, vocab 256000)
    final_norm/scale              [D]
    lm_head/kernel                [D, vocab_size]  (only when embeddings are not tied)
    layer_{i}/pre_attention_norm/scale   [D]
    layer_{i}/post_attention_norm/scale  [D]       (Gemma-2 only: post_norms)
    layer_{i}/pre_ffw_norm/scale         [D]
    layer_{i}/post_ffw_norm/scale        [D]       (Gemma-2 only: post_norms)
    layer_{i}/attn/q_einsum/w            [N, D, H]
    layer_{i}/attn/kv_einsum/w           [2, K, D, H]   ([0] = key, [1] = value)
    layer_{i}/attn/attn_vec_einsum/w     [N, H, D]
    layer_{i}/mlp/gating_einsum/w        [2, D, F]      ([0] = gate (activated), [1] = up)
    layer_{i}/mlp/linear/w               [F, D]
    layer_{i}/pre_ffw_norm/bias          [D]            (only with ffn_shift)
    layer_{i}/mlp/gating_bias            [2, F]         (only with ffn_shift)

Norm scales are stored as the checkpoints store them: zero-centred for Gemma (applied as
1 + scale), plain multipliers for Mistral/Llama.

`ffn_shift` is not an architecture of any released model: it is where OmniQuant's LET shift δ
goes when calibration folds it exactly (calibration/transform.py): a bias added after the
pre-FFN norm's scale (−δ ⊘ s) and a bias on the gate/up outputs (δ·W). Released checkpoints
have ffn_shift=False; an int8 checkpoint calibrated with `calibration.let="scale_shift"` has it
on, and formats without biases (HF Gemma-2/Mistral, Gemma Orbax, consolidated) refuse it.
"""

from __future__ import annotations

import dataclasses
import enum
import math


from matquant_jax.quant import kernels as _kernels

# The table of quantizable kernels (name, kind, module, shape, logical axes, contracting axes).
KERNELS = _kernels.KERNELS


class AttentionPattern(enum.Enum):
  GLOBAL = "global"                # every layer attends to the whole causal context
  LOCAL = "local"                  # every layer uses the sliding window (Mistral v0.1)
  LOCAL_GLOBAL = "local_global"    # layer 0 local, 1 global, 2 local, ... (Gemma-2)


class NormType(enum.Enum):
  ZERO_CENTERED = "zero_centered"  # x·rsqrt(mean x² + eps)·(1 + scale)  (Gemma)
  PLAIN = "plain"                  # x·rsqrt(mean x² + eps)·scale        (Mistral, Llama)


class Activation(enum.Enum):
  GELU_TANH = "gelu_tanh"          # GeGLU with tanh-approximate GELU (Gemma-2)
  SILU = "silu"                    # SwiGLU (Mistral, Llama)


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Architecture of a decoder-only transformer (all sizes static)."""
  name: str
  num_layers: int
  embed_dim: int                   # D
  hidden_dim: int                  # F (FFN)
  num_heads: int                   # N
  num_kv_heads: int                # K (GQA groups N / K)
  head_dim: int                    # H (N·H need not equal D)
  vocab_size: int                  # logits returned / tokenizer size
  num_embed: int | None = None     # embedding rows stored (>= vocab_size); None = vocab_size
  query_scale: float | None = None  # multiplies q after RoPE; None = head_dim ** -0.5
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
  attention_pattern: AttentionPattern = AttentionPattern.GLOBAL
  sliding_window: int | None = None  # W keys including self (q − W < k <= q)
  rope_base: float = 10_000.0
  norm_eps: float = 1e-6
  norm_type: NormType = NormType.ZERO_CENTERED
  post_norms: bool = False         # Gemma-2's post-attention / post-FFN norms
  activation: Activation = Activation.GELU_TANH
  scale_embeddings: bool = False   # x *= sqrt(D), the scalar rounded to the activation dtype
  tie_embeddings: bool = True
  bos_id: int = 2
  eos_id: int = 1
  pad_id: int = 0
  ffn_shift: bool = False          # the LET shift's biases (see the module docstring)

  def __post_init__(self):
    # Accept enum values as strings (configs, JSON metadata) and store the enums.
    for f, enum_type in (("attention_pattern", AttentionPattern), ("norm_type", NormType),
                         ("activation", Activation)):
      if not isinstance(getattr(self, f), enum_type):
        object.__setattr__(self, f, enum_type(getattr(self, f)))
    for f in ("num_layers", "embed_dim", "hidden_dim", "num_heads", "num_kv_heads", "head_dim",
              "vocab_size"):
      v = getattr(self, f)
      if not isinstance(v, int) or v <= 0:
        raise ValueError(f"TransformerConfig({self.name!r}).{f} must be a positive int, got {v!r}.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"TransformerConfig({self.name!r}): num_heads={self.num_heads} is not a multiple of "
          f"num_kv_heads={self.num_kv_heads} (GQA needs N = K·G).")
    if self.num_embed is not None and self.num_embed < self.vocab_size:
      raise ValueError(
          f"TransformerConfig({self.name!r}): num_embed={self.num_embed} < vocab_size="
          f"{self.vocab_size}; the embedding must hold every token.")
    if self.sliding_window is not None and (
        isinstance(self.sliding_window, bool) or not isinstance(self.sliding_window, int) or
        self.sliding_window <= 0):
      raise ValueError(
          f"TransformerConfig({self.name!r}).sliding_window must be a positive int or None, got "
          f"{self.sliding_window!r}.")
    for f in ("norm_eps", "rope_base"):
      v = getattr(self, f)
      if not isinstance(v, (int, float)) or isinstance(v, bool) or not (
          math.isfinite(v) and v > 0):
        raise ValueError(f"TransformerConfig({self.name!r}).{f} must be a positive number, got "
                         f"{v!r}.")
    for f in ("attn_logit_softcap", "final_logit_softcap", "query_scale"):
      v = getattr(self, f, None)
      if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
        raise ValueError(f"TransformerConfig({self.name!r}).{f} must be a positive number or "
                         f"None, got {v!r}.")
    if not isinstance(self.ffn_shift, bool):
      raise ValueError(f"TransformerConfig({self.name!r}).ffn_shift must be a bool, got "
                       f"{self.ffn_shift!r}.")
    if self.attention_pattern != AttentionPattern.GLOBAL and not self.sliding_window:
      raise ValueError(
          f"TransformerConfig({self.name!r}): attention_pattern={self.attention_pattern.value} "
          f"needs a positive sliding_window.")

  @property
  def embed_rows(self) -> int:
    return self.num_embed or self.vocab_size

  @property
  def resolved_query_scale(self) -> float:
    return self.query_scale if self.query_scale is not None else self.head_dim ** -0.5

  def is_local(self, layer: int) -> bool:
    """Whether `layer` uses the sliding window."""
    if self.attention_pattern == AttentionPattern.LOCAL:
      return True
    if self.attention_pattern == AttentionPattern.LOCAL_GLOBAL:
      return layer % 2 == 0
    return False

  def replace(self, **changes) -> "TransformerConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    """JSON-ready fields (enums as their values); `from_dict` inverts it."""
    return {f.name: (v.value if isinstance(v, enum.Enum) else v)
            for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}

  @classmethod
  def from_dict(cls, d: dict) -> "TransformerConfig":
    """Rebuilds a config saved by `to_dict`; unknown fields are an error (a newer format)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"TransformerConfig.from_dict: unknown fields {unknown}; the checkpoint "
                       f"may come from a newer matquant_jax.")
    return cls(**d)


def _gemma2(name, num_layers, d, f, n, k, h, query_scale):
  return TransformerConfig(
      name=name, num_layers=num_layers, embed_dim=d, hidden_dim=f, num_heads=n, num_kv_heads=k,
      head_dim=h, vocab_size=256_000, num_embed=256_128, query_scale=query_scale,
      attn_logit_softcap=50.0, final_logit_softcap=30.0,
      attention_pattern=AttentionPattern.LOCAL_GLOBAL, sliding_window=4096, rope_base=10_000.0,
      norm_eps=1e-6, norm_type=NormType.ZERO_CENTERED, post_norms=True,
      activation=Activation.GELU_TANH, scale_embeddings=True, tie_embeddings=True,
      bos_id=2, eos_id=1, pad_id=0)


def _mistral(name, vocab, rope_base, sliding_window):
  return TransformerConfig(
      name=name, num_layers=32, embed_dim=4096, hidden_dim=14336, num_heads=32, num_kv_heads=8,
      head_dim=128, vocab_size=vocab, rope_base=rope_base,
      attention_pattern=AttentionPattern.LOCAL if sliding_window else AttentionPattern.GLOBAL,
      sliding_window=sliding_window, norm_eps=1e-5, norm_type=NormType.PLAIN, post_norms=False,
      activation=Activation.SILU, scale_embeddings=False, tie_embeddings=False,
      bos_id=1, eos_id=2, pad_id=0)


PRESETS: dict[str, TransformerConfig] = {
    # Query scale: 1/sqrt(head_dim) for 2B/9B (256, never 224), 1/sqrt(D/N) = 1/12 for 27B.
    "gemma2_2b": _gemma2("gemma2_2b", 26, 2304, 9216, 8, 4, 256, 256 ** -0.5),
    "gemma2_9b": _gemma2("gemma2_9b", 42, 3584, 14336, 16, 8, 256, 256 ** -0.5),
    "gemma2_27b": _gemma2("gemma2_27b", 46, 4608, 36864, 32, 16, 128, 144 ** -0.5),
    "mistral_7b_v0_1": _mistral("mistral_7b_v0_1", 32000, 10_000.0, 4096),
    "mistral_7b_v0_2": _mistral("mistral_7b_v0_2", 32000, 1_000_000.0, None),
    "mistral_7b_v0_3": _mistral("mistral_7b_v0_3", 32768, 1_000_000.0, None),
    "llama2_7b": TransformerConfig(
        name="llama2_7b", num_layers=32, embed_dim=4096, hidden_dim=11008, num_heads=32,
        num_kv_heads=32, head_dim=128, vocab_size=32000, rope_base=10_000.0, norm_eps=1e-5,
        norm_type=NormType.PLAIN, activation=Activation.SILU, tie_embeddings=False,
        bos_id=1, eos_id=2, pad_id=0),
    # Tiny configs for tests and the demo: every Gemma-2 branch is exercised (GQA, N·H != D,
    # query scale != 1/sqrt(H), a window shorter than test sequences, caps that bite).
    "tiny_gemma2": TransformerConfig(
        name="tiny_gemma2", num_layers=4, embed_dim=64, hidden_dim=128, num_heads=4,
        num_kv_heads=2, head_dim=32, vocab_size=512, num_embed=520, query_scale=24 ** -0.5,
        attn_logit_softcap=2.0, final_logit_softcap=3.0,
        attention_pattern=AttentionPattern.LOCAL_GLOBAL, sliding_window=8, norm_eps=1e-6,
        norm_type=NormType.ZERO_CENTERED, post_norms=True, activation=Activation.GELU_TANH,
        scale_embeddings=True, tie_embeddings=True),
    # The built-in demo's model: tiny_gemma2 with a 4x wider FFN, so the int8 parent has room
    # to absorb what the int2 slice needs (the paper's over-parameterization argument, §9.1).
    "demo_gemma2": TransformerConfig(
        name="demo_gemma2", num_layers=4, embed_dim=64, hidden_dim=512, num_heads=4,
        num_kv_heads=2, head_dim=32, vocab_size=512, query_scale=32 ** -0.5,
        attn_logit_softcap=50.0, final_logit_softcap=30.0,
        attention_pattern=AttentionPattern.LOCAL_GLOBAL, sliding_window=64, norm_eps=1e-6,
        norm_type=NormType.ZERO_CENTERED, post_norms=True, activation=Activation.GELU_TANH,
        scale_embeddings=True, tie_embeddings=True),
    "tiny_mistral": TransformerConfig(
        name="tiny_mistral", num_layers=3, embed_dim=64, hidden_dim=128, num_heads=4,
        num_kv_heads=2, head_dim=16, vocab_size=512, attention_pattern=AttentionPattern.LOCAL,
        sliding_window=8, rope_base=10_000.0, norm_eps=1e-5, norm_type=NormType.PLAIN,
        activation=Activation.SILU, tie_embeddings=False, bos_id=1, eos_id=2, pad_id=0),
}


def get_config(name: str) -> TransformerConfig:
  """The preset called `name`, or a ValueError listing the known presets."""
  try:
    return PRESETS[name]
  except KeyError:
    raise ValueError(
        f"unknown model {name!r}; known presets: {', '.join(sorted(PRESETS))}.") from None
