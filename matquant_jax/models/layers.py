"""Transformer building blocks shared by Gemma-2 and Mistral/Llama (spec/models.md §1.2, §2).

Every parameter is declared with logical axis names (`nn.with_logical_partitioning`) so the
training code can map them onto a device mesh with logical axis rules:

    'vocab'     embedding rows / logits           'embed'     the model width D
    'heads'     query heads N                     'kv_heads'  key/value heads K
    'head_dim'  H                                 'mlp'       the FFN width F
    None        the stacked size-2 axes ([0] = key / gate, [1] = value / up)

Numerics follow the references where they are observable in float32 tests: norms, RoPE angles and
softmax run in float32 whatever the compute dtype; matmuls run in the compute dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from matquant_jax.models.config import Activation
from matquant_jax.models.config import NormType
from matquant_jax.models.config import TransformerConfig
from matquant_jax.quant import forward
from matquant_jax.quant import kernels as kernels_lib

Dtype = Any
Initializer = Callable[..., jax.Array]
LayerCache = dict[str, jax.Array]

# A large finite negative rather than -inf: a row with every key masked (a padding query)
# softmaxes to a harmless uniform average instead of NaN. Same constant as gemma's K_MASK.
MASK_VALUE = -2.3819763e38


@dataclasses.dataclass(frozen=True)
class WeightQuant:
  """Static fake-quantization of one kernel: the r-bit slice of a c-bit MinMax parent code."""
  bits: int
  parent_bits: int = 8
  extra_precision: bool = False


@dataclasses.dataclass(frozen=True)
class KernelQuants:
  """Per-kernel fake-quantization of one module, for plans whose kernels differ in width.

  `kernels` pairs each kernel name (quant/kernels.py) with its WeightQuant.
  """
  kernels: tuple[tuple[str, WeightQuant | None], ...]


def quant_for(quant: "WeightQuant | KernelQuants | None", name: str) -> WeightQuant | None:
  """The WeightQuant of kernel `name` under a module's quant setting."""
  if isinstance(quant, KernelQuants):
    return dict(quant.kernels).get(name)
  return quant


def _fan_in_init(in_axis, out_axis, batch_axis=()) -> Initializer:
  # Unit-variance activations at init for any einsum layout; the scale is irrelevant for
  # loaded checkpoints, it only keeps randomly initialised test models well conditioned.
  return nn.initializers.variance_scaling(
      1.0, "fan_in", "normal", in_axis=in_axis, out_axis=out_axis,
      batch_axis=batch_axis)


class Einsum(nn.Module):
  """A quantizable kernel `w` (its module name is its row of quant/kernels.py) applied with
  `jnp.einsum`, fake-quantized first when the plan quantizes it.

  Attributes:
    shape: the kernel shape.
    axes: logical axis names of the kernel, one per dimension.
    init_fn: the kernel initializer.
    quant: fake-quantize the kernel before use; None uses it as is.
    dtype: compute dtype; the (possibly quantized) kernel is cast to it.
    param_dtype: storage dtype of the kernel.
  """
  shape: tuple[int, ...]
  axes: tuple[str | None, ...]
  init_fn: Initializer
  quant: WeightQuant | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def kernel(self) -> jax.Array:
    """The kernel as the matmul sees it: fake-quantized if planned, in the compute dtype."""
    w = self.param("w", nn.with_logical_partitioning(self.init_fn, self.axes), self.shape,
                   self.param_dtype)
    if self.quant is not None:
      # Quantize from the stored (full precision) weights, then cast: the slice values are
      # exact in float32, and casting last is what a dequantize-then-matmul kernel does.
      w = forward.kernel_value(w, kernels_lib.BY_NAME[self.name], self.quant.bits,
                               self.quant.parent_bits,
                               extra_precision=self.quant.extra_precision)
    return w.astype(self.dtype)

  @nn.compact
  def __call__(self, eqn: str, x: jax.Array) -> jax.Array:
    if self.has_variable("params", "w"):
      stored = self.get_variable("params", "w")
      # Packed serving weights (matquant_jax.serving) are already at the plan's width and run
      # their own matmul from the codes; read before `param`, whose shape check they would fail.
      if getattr(stored, "is_serving_weight", False):
        return stored.einsum(eqn, x.astype(self.dtype), quant=self.quant)
    return jnp.einsum(eqn, x.astype(self.dtype), self.kernel())


def kernel_einsum(name: str, config: TransformerConfig, quant, dtype: Dtype,
                  param_dtype: Dtype) -> Einsum:
  """The Einsum of a quantizable kernel, its shape and axes from quant/kernels.py's table.

  Init is fan-in scaled over the contracting axes; a literal-size axis (the stacked gate/up or
  key/value pair) is a batch axis.
  """
  k = kernels_lib.BY_NAME[name]
  batch = tuple(i for i, d in enumerate(k.dims) if isinstance(d, int))
  out = tuple(i for i in range(len(k.dims)) if i not in k.reduce_axes and i not in batch)
  return Einsum(shape=k.shape(config), axes=k.logical_axes,
                init_fn=_fan_in_init(k.reduce_axes, out, batch), quant=quant_for(quant, name),
                dtype=dtype, param_dtype=param_dtype, name=name)


class RMSNorm(nn.Module):
  """RMSNorm over the last axis.

  ZERO_CENTERED (Gemma): `x·rsqrt(mean x² + eps)·(1 + scale)` all in float32, then cast to the
  input dtype (HF `Gemma2RMSNorm`). PLAIN (Mistral/Llama): the normalised value is cast to the
  input dtype *before* multiplying by `scale` (HF `LlamaRMSNorm`, mistral-inference), which only
  differs from the Gemma order below float32.

  Attributes:
    norm_type: ZERO_CENTERED (scale initialised to 0) or PLAIN (initialised to 1).
    eps: added to the mean square.
    use_bias: add a `bias` [D] after the scale (initialised to 0): where a folded LET shift
      goes (TransformerConfig.ffn_shift); released models have none.
    param_dtype: storage dtype of `scale` [D].
  """
  norm_type: NormType = NormType.ZERO_CENTERED
  eps: float = 1e-6
  use_bias: bool = False
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[..., D] -> [..., D] in the dtype of x."""
    zero_centered = self.norm_type == NormType.ZERO_CENTERED
    init = nn.initializers.zeros if zero_centered else nn.initializers.ones
    scale = self.param("scale", nn.with_logical_partitioning(init, ("embed",)), (x.shape[-1],),
                       self.param_dtype)
    bias = None
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                        (x.shape[-1],), self.param_dtype)
    xf = x.astype(jnp.float32)
    normed = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
    if zero_centered:
      y = normed * (1.0 + scale.astype(jnp.float32))
      return (y if bias is None else y + bias.astype(jnp.float32)).astype(x.dtype)
    y = normed.astype(x.dtype) * scale.astype(x.dtype)
    return y if bias is None else y + bias.astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
  """Rotary embedding, half-split (rotate_half) convention, angles computed in float32.

  Pairs dimension i with i + H/2 (not 2i with 2i+1): the layout of HF weights and of the Gemma
  checkpoints, so neither needs a permutation.

  Args:
    x: [batch, seq, heads, head_dim].
    positions: [batch, seq] integer token positions.
    base: the RoPE base (theta).

  Returns:
    [batch, seq, heads, head_dim] in the dtype of x.
  """
  head_dim = x.shape[-1]
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head_dim, got {head_dim}.")
  inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
  return out.astype(x.dtype)


def attention_mask(q_pos: jax.Array, q_seg: jax.Array, k_pos: jax.Array, k_seg: jax.Array,
                   window: int | None) -> jax.Array:
  """Which keys each query may attend to, from positions and segment ids.

  A key is allowed iff it is in the query's (non-padding) segment, not in the future
  (k_pos <= q_pos), and, with a window W, among the W most recent positions including the query
  itself (q_pos − W < k_pos). Segment 0 is padding and attends to nothing.

  Args:
    q_pos, q_seg: [batch, q_len] query positions and segment ids.
    k_pos, k_seg: [batch, k_len] key positions and segment ids.
    window: the sliding window W, or None for global attention.

  Returns:
    [batch, q_len, k_len] bool.
  """
  qp, kp = q_pos[:, :, None], k_pos[:, None, :]
  qs, ks = q_seg[:, :, None], k_seg[:, None, :]
  mask = (qs == ks) & (qs != 0) & (kp <= qp)
  if window is not None:
    mask &= kp > qp - window
  return mask


def cache_size(config: TransformerConfig, layer: int, max_len: int) -> int:
  """Slots in layer `layer`'s KV cache: the window for sliding layers, max_len otherwise."""
  if config.is_local(layer):
    return min(config.sliding_window, max_len)
  return max_len


def init_layer_cache(config: TransformerConfig, layer: int, batch: int, max_len: int,
                     dtype: Dtype = jnp.float32) -> LayerCache:
  """An empty cache for one layer (see `Attention` for the layout)."""
  size = cache_size(config, layer, max_len)
  kv_shape = (batch, size, config.num_kv_heads, config.head_dim)
  return {
      "k": jnp.zeros(kv_shape, dtype),
      "v": jnp.zeros(kv_shape, dtype),
      "positions": jnp.full((batch, size), -1, jnp.int32),
      "segment_ids": jnp.zeros((batch, size), jnp.int32),  # 0 = empty slot, never attended
  }


def _write_cache(cache: LayerCache, k: jax.Array, v: jax.Array, positions: jax.Array,
                 segment_ids: jax.Array) -> LayerCache:
  """Writes a chunk of keys/values into a (ring) cache at slot = position % size.

  Padding tokens are not written. When the chunk is longer than the ring, only its last `size`
  positions are written, so no two written tokens share a slot (XLA leaves the order of
  duplicate scatter indices unspecified).
  """
  size = cache["k"].shape[1]
  valid = segment_ids != 0
  last = jnp.max(jnp.where(valid, positions, -1), axis=1, keepdims=True)
  write = valid & (positions > last - size)
  slot = jnp.where(write, positions % size, size)  # size is out of bounds: dropped
  rows = jnp.broadcast_to(jnp.arange(k.shape[0])[:, None], slot.shape)
  return {
      "k": cache["k"].at[rows, slot].set(k.astype(cache["k"].dtype), mode="drop"),
      "v": cache["v"].at[rows, slot].set(v.astype(cache["v"].dtype), mode="drop"),
      "positions": cache["positions"].at[rows, slot].set(positions.astype(jnp.int32),
                                                         mode="drop"),
      "segment_ids": cache["segment_ids"].at[rows, slot].set(segment_ids.astype(jnp.int32),
                                                             mode="drop"),
  }


class Attention(nn.Module):
  """Multi-head attention with GQA, RoPE, query scaling, logit soft-cap and sliding window.

  Parameters: `q_einsum/w` [N, D, H], `kv_einsum/w` [2, K, D, H] ([0] = key, [1] = value),
  `attn_vec_einsum/w` [N, H, D]. Query head n reads kv head n // (N / K).

  KV cache (one dict per layer): `k`, `v` [batch, size, K, H], `positions` [batch, size] int32
  and `segment_ids` [batch, size] int32 (0 = empty). Global layers have size = max_len; sliding
  layers keep a ring buffer of size min(W, max_len). A token at position p lives in slot
  p % size; the stored positions, not the slot order, drive the mask. A call attends to the
  cached keys *and* to its own chunk, then writes the chunk, so a prompt longer than the ring
  still sees every key in its window. Cached keys at positions >= the chunk's first position
  are treated as stale (re-feeding a position replaces it).

  Attributes:
    config: the model configuration.
    is_local: use the sliding window (config.sliding_window).
    quant: fake-quantization of q/kv/attn_vec kernels, or None.
    dtype: compute dtype.
    param_dtype: storage dtype of the kernels.
    kernel: computes softmax(mask(softcap(qkᵀ)))·v instead of XLA when there is no cache
      (splash_attention.SplashAttention), or None.
  """
  config: TransformerConfig
  is_local: bool = False
  quant: WeightQuant | KernelQuants | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel: Any = None

  def _einsum(self, name: str) -> Einsum:
    return kernel_einsum(name, self.config, self.quant, self.dtype, self.param_dtype)

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array,
               cache: LayerCache | None = None) -> tuple[jax.Array, LayerCache | None]:
    """Attends within segments, causally.

    Args:
      x: [batch, seq, D] normalised inputs.
      positions: [batch, seq] int positions (RoPE and masks).
      segment_ids: [batch, seq] int; 0 = padding.
      cache: this layer's KV cache, or None.

    Returns:
      ([batch, seq, D] output, updated cache or None).
    """
    cfg = self.config
    n, k_heads, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    batch, seq = x.shape[:2]
    q = self._einsum("q_einsum")("BTD,NDH->BTNH", x)
    kv = self._einsum("kv_einsum")("BSD,CKDH->CBSKH", x)
    q = apply_rope(q, positions, cfg.rope_base)
    k = apply_rope(kv[0], positions, cfg.rope_base)
    v = kv[1]
    # Scaling q after RoPE (gemma) rather than the logits (HF) is the same up to rounding.
    q = q * jnp.asarray(cfg.resolved_query_scale, self.dtype)

    window = cfg.sliding_window if self.is_local else None
    if self.kernel is not None and cache is None:
      encoded = self.kernel(q, k, v, segment_ids, window)
      return self._einsum("attn_vec_einsum")("BTNH,NHD->BTD", encoded), None

    keys, values, k_pos, k_seg = k, v, positions, segment_ids
    new_cache = None
    if cache is not None:
      first = jnp.min(jnp.where(segment_ids != 0, positions, jnp.iinfo(jnp.int32).max), axis=1,
                      keepdims=True)
      cached_seg = jnp.where(cache["positions"] < first, cache["segment_ids"], 0)
      keys = jnp.concatenate([cache["k"].astype(self.dtype), k], axis=1)
      values = jnp.concatenate([cache["v"].astype(self.dtype), v], axis=1)
      k_pos = jnp.concatenate([cache["positions"], positions.astype(jnp.int32)], axis=1)
      k_seg = jnp.concatenate([cached_seg, segment_ids.astype(jnp.int32)], axis=1)
      new_cache = _write_cache(cache, k, v, positions, segment_ids)

    mask = attention_mask(positions, segment_ids, k_pos, k_seg, window)  # [B, T, S]

    groups = n // k_heads
    qg = q.reshape(batch, seq, k_heads, groups, h)
    logits = jnp.einsum("BTKGH,BSKH->BTKGS", qg, keys, preferred_element_type=jnp.float32)
    if cfg.attn_logit_softcap is not None:
      # Soft-cap before masking (gemma and HF eager agree).
      cap = cfg.attn_logit_softcap
      logits = jnp.tanh(logits / cap) * cap
    logits = jnp.where(mask[:, :, None, None, :], logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    encoded = jnp.einsum("BTKGS,BSKH->BTKGH", probs, values).reshape(batch, seq, n, h)
    out = self._einsum("attn_vec_einsum")("BTNH,NHD->BTD", encoded)
    return out, new_cache


class FeedForward(nn.Module):
  """Gated FFN: `linear(act(x·gate) ⊙ (x·up))`, GeGLU (tanh GELU) or SwiGLU.

  Parameters: `gating_einsum/w` [2, D, F] ([0] = gate, the activated half; [1] = up) and
  `linear/w` [F, D]; with config.ffn_shift also `gating_bias` [2, F], added to the gate and up
  outputs (a folded LET shift δ·W, full precision).

  Attributes:
    config: the model configuration (embed_dim, hidden_dim, activation).
    quant: fake-quantization of both kernels, or None.
    dtype: compute dtype.
    param_dtype: storage dtype of the kernels.
  """
  config: TransformerConfig
  quant: WeightQuant | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[batch, seq, D] -> [batch, seq, D]."""
    def einsum(name):
      return kernel_einsum(name, self.config, self.quant, self.dtype, self.param_dtype)

    gate = einsum("gating_einsum")("BTD,CDF->CBTF", x)
    if self.config.ffn_shift:
      bias = self.param("gating_bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                    (None, "mlp")),
                        (2, self.config.hidden_dim), self.param_dtype)
      gate = gate + bias[:, None, None, :].astype(gate.dtype)
    if self.config.activation == Activation.GELU_TANH:
      act = jax.nn.gelu(gate[0], approximate=True)
    elif self.config.activation == Activation.SILU:
      act = jax.nn.silu(gate[0])
    else:
      raise ValueError(f"unsupported activation {self.config.activation!r}.")
    hidden = act * gate[1]
    return einsum("linear")("BTF,FD->BTD", hidden)


class Embedder(nn.Module):
  """Token embedding `input_embedding` [embed_rows, D], also the tied output projection.

  Attributes:
    config: the model configuration (vocab_size, embed_rows, embed_dim, scale_embeddings).
    dtype: compute dtype.
    param_dtype: storage dtype of the table.
  """
  config: TransformerConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    cfg = self.config
    init = nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=1, out_axis=0)
    self.input_embedding = self.param(
        "input_embedding", nn.with_logical_partitioning(init, ("vocab", "embed")),
        (cfg.embed_rows, cfg.embed_dim), self.param_dtype)

  def encode(self, tokens: jax.Array) -> jax.Array:
    """[batch, seq] int -> [batch, seq, D], times sqrt(D) for Gemma."""
    x = jnp.take(self.input_embedding, tokens, axis=0).astype(self.dtype)
    if self.config.scale_embeddings:
      # The scalar is rounded to the activation dtype first (gemma, HF PR #29402):
      # in bf16 sqrt(3584) becomes 59.75.
      x = x * jnp.asarray(self.config.embed_dim ** 0.5, self.dtype)
    return x

  def decode(self, x: jax.Array) -> jax.Array:
    """[batch, seq, D] -> [batch, seq, vocab_size]; padding rows beyond the vocab dropped."""
    table = self.input_embedding[: self.config.vocab_size].astype(self.dtype)
    return jnp.einsum("BTD,VD->BTV", x, table)
