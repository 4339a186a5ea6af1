"""The decoder-only transformer shared by Gemma-2 and Mistral/Llama (Flax linen).

One module, configured by `TransformerConfig` (config.py, which also pins the parameter tree),
served at any `PrecisionPlan`: the plan only decides which kernels go through `fake_quant` and at
which bit-width, so every plan reads the same parameters.

    params = init_params(config, jax.random.key(0))
    model = Transformer(config, plan=PrecisionPlan.parse("ffn:int4"))
    logits = model.apply({"params": params}, tokens)                      # [B, T, vocab]
    cache = init_cache(config, batch=B, max_len=64)
    logits, cache = model.apply({"params": params}, prompt, positions, segment_ids, cache)

Layers are separate submodules `layer_{i}` by default: their bit-widths differ under
Mix'n'Match plans, and the released checkpoints are laid out per layer. For pod-scale training,
`scan_layers=True` runs the decoder stack as one `nn.scan` over groups of `layer_period(config)`
layers (Gemma-2: a (local, global) pair), with stacked params `layers/sub_{j}/...` whose leading
axis is the group index, and an optional rematerialization policy (`remat`, see REMAT_POLICIES).
`stack_layers` / `unstack_layers` convert between the two layouts; every reader, writer, the
int8 export and serving use the per-layer layout, so convert at that boundary.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from matquant_jax.models import layers
from matquant_jax.models.config import TransformerConfig
from matquant_jax.quant.plan import KIND_KERNELS, PrecisionPlan

Dtype = Any
Cache = dict[str, layers.LayerCache]


def _layer_quant(plan: PrecisionPlan, layer: int, num_layers: int,
                 kind: str) -> layers.WeightQuant | layers.KernelQuants | None:
  def quant(bits):
    return None if bits is None else layers.WeightQuant(
        bits=bits, parent_bits=plan.parent_bits, extra_precision=plan.extra_precision)

  per_kernel = {name: quant(plan.bits_for(layer, num_layers, kind, name))
                for name in KIND_KERNELS[kind]}
  if len(set(per_kernel.values())) == 1:
    return next(iter(per_kernel.values()))
  return layers.KernelQuants(tuple(per_kernel.items()))


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
  """Positions that restart at 0 at the start of every segment.

  Args:
    segment_ids: [batch, seq] int.

  Returns:
    [batch, seq] int32; for a single right-padded sequence, arange over the real tokens.
  """
  seq = segment_ids.shape[1]
  idx = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), segment_ids.shape)
  starts = jnp.concatenate(
      [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
      axis=1)
  return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


# What the backward pass of a scanned layer keeps from its forward pass (jax.checkpoint):
#   none  everything (no rematerialization; fastest, most memory: every layer's activations)
#   dots  the outputs of matmuls against weights (no batch dims: projections and FFN), and
#         recomputes the rest (norms, RoPE, softmax, attention scores, activations)
#   full  only each layer group's input; the whole group is recomputed in the backward pass
REMAT_POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "full": jax.checkpoint_policies.nothing_saveable,
}


def layer_period(config: TransformerConfig) -> int:
  """Layers per scanned group: 2 for Gemma-2's local/global alternation, else 1."""
  return 2 if config.attention_pattern.value == "local_global" else 1


def stack_layers(params: dict[str, Any], config: TransformerConfig) -> dict[str, Any]:
  """Per-layer params (`layer_{i}`) -> the scanned layout (`layers/sub_{j}`, leading axis g).

  Layer i = g * period + j. Works on arrays and on jax.ShapeDtypeStruct-free pytrees of arrays.
  """
  period = layer_period(config)
  if config.num_layers % period:
    raise ValueError(f"{config.name}: {config.num_layers} layers do not split into groups of "
                     f"{period}; use scan_layers=False.")
  missing = [f"layer_{i}" for i in range(config.num_layers) if f"layer_{i}" not in params]
  if missing:
    raise ValueError(f"stack_layers: params lack {', '.join(missing[:3])}; they are not in the "
                     f"per-layer layout of {config.name}.")
  groups = config.num_layers // period
  out = {k: v for k, v in params.items() if not k.startswith("layer_")}
  out["layers"] = {
      f"sub_{j}": jax.tree_util.tree_map(
          lambda *xs: jnp.stack(xs), *[params[f"layer_{g * period + j}"] for g in range(groups)])
      for j in range(period)}
  return out


def unstack_layers(params: dict[str, Any], config: TransformerConfig) -> dict[str, Any]:
  """The scanned layout (`layers/sub_{j}`) -> per-layer params (`layer_{i}`); see stack_layers."""
  if "layers" not in params:
    raise ValueError("unstack_layers: params have no 'layers' entry; they are not in the "
                     "scanned layout.")
  period = layer_period(config)
  out = {k: v for k, v in params.items() if k != "layers"}
  for g in range(config.num_layers // period):
    for j in range(period):
      out[f"layer_{g * period + j}"] = jax.tree_util.tree_map(
          lambda x, g=g: x[g], params["layers"][f"sub_{j}"])
  return out


def is_stacked(params: dict[str, Any]) -> bool:
  """Whether `params` are in the scanned layout."""
  return "layers" in params


class Block(nn.Module):
  """One decoder layer.

  Gemma-2 (post_norms): `h = x + post_attn_norm(attn(pre_attn_norm(x)))`,
  `y = h + post_ffw_norm(mlp(pre_ffw_norm(h)))`. Mistral/Llama: the same without post norms.

  Attributes:
    config: the model configuration.
    layer: index of this layer (decides local/global attention).
    attn_quant, ffn_quant: fake-quantization of the attention / FFN kernels, or None.
    dtype: compute dtype.
    param_dtype: storage dtype.
    attention_kernel: layers.Attention.kernel.
  """
  config: TransformerConfig
  layer: int
  attn_quant: layers.WeightQuant | None = None
  ffn_quant: layers.WeightQuant | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_kernel: Any = None

  def _norm(self, name: str, use_bias: bool = False) -> layers.RMSNorm:
    return layers.RMSNorm(norm_type=self.config.norm_type, eps=self.config.norm_eps,
                          use_bias=use_bias, param_dtype=self.param_dtype, name=name)

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array,
               cache: layers.LayerCache | None = None
               ) -> tuple[jax.Array, layers.LayerCache | None]:
    """[batch, seq, D] -> ([batch, seq, D], updated layer cache or None)."""
    cfg = self.config
    attn_out, cache = layers.Attention(
        config=cfg, is_local=cfg.is_local(self.layer), quant=self.attn_quant, dtype=self.dtype,
        param_dtype=self.param_dtype, kernel=self.attention_kernel, name="attn")(
            self._norm("pre_attention_norm")(x), positions, segment_ids, cache)
    if cfg.post_norms:
      attn_out = self._norm("post_attention_norm")(attn_out)
    x = x + attn_out
    ffw_out = layers.FeedForward(config=cfg, quant=self.ffn_quant, dtype=self.dtype,
                                 param_dtype=self.param_dtype, name="mlp")(
                                     self._norm("pre_ffw_norm", cfg.ffn_shift)(x))
    if cfg.post_norms:
      ffw_out = self._norm("post_ffw_norm")(ffw_out)
    return x + ffw_out, cache


class _LayerGroup(nn.Module):
  """`layer_period` consecutive Blocks: the body of the layer scan (carry = activations)."""
  config: TransformerConfig
  quants: tuple  # ((attn_quant, ffn_quant), ...) per layer of the group
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  mesh: Any = None
  axis_rules: Any = None
  attention_kernel: Any = None

  @nn.compact
  def __call__(self, x, positions, segment_ids):
    for j, (attn_quant, ffn_quant) in enumerate(self.quants):
      x, _ = Block(config=self.config, layer=j, attn_quant=attn_quant, ffn_quant=ffn_quant,
                   dtype=self.dtype, param_dtype=self.param_dtype,
                   attention_kernel=self.attention_kernel, name=f"sub_{j}")(
                       x, positions, segment_ids, None)
      x = constrain_activations(x, self.mesh, self.axis_rules)
    return x, None


def constrain_activations(x: jax.Array, mesh, axis_rules) -> jax.Array:
  """Pins [batch, seq, D] activations to logical axes ('batch', 'seq', None) on `mesh`.

  A no-op without a mesh (single device, tests): then XLA chooses as before.
  """
  if mesh is None or axis_rules is None:
    return x
  return nn.with_logical_constraint(x, ("batch", "seq", None), rules=axis_rules, mesh=mesh)


class Transformer(nn.Module):
  """Decoder-only language model.

  Attributes:
    config: the architecture.
    plan: which kernels are fake-quantized at which bit-width; the bf16 plan is the plain model.
    dtype: compute (activation) dtype.
    param_dtype: dtype parameters are created in by `init`.
  """
  config: TransformerConfig
  plan: PrecisionPlan = PrecisionPlan.bf16()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  scan_layers: bool = False   # stacked params, one nn.scan over layer groups (no cache)
  remat: str = "none"         # with scan_layers: a key of REMAT_POLICIES
  mesh: Any = None            # with axis_rules: sharding constraints on the activations
  axis_rules: Any = None
  unroll_scan: bool = False   # unroll the layer scan in HLO (XLA's cost model counts a loop
                              # body once; training/aot.py unrolls to count every layer)
  attention_kernel: Any = None  # layers.Attention.kernel (e.g. splash on TPU), used without cache
  # A traced slice width for every kernel the plan's scope quantizes (the training objective's
  # scan over widths; the plan then gives only the scope, parent width and Extra Precision).
  # Each layer fake-quantizes its own kernels inside the layer stack, so a scanned, remat'ed
  # stack never holds every layer's quantized kernels at once.
  traced_bits: Any = None

  def _quant(self, layer: int, kind: str):
    if self.traced_bits is None:
      return _layer_quant(self.plan, layer, self.config.num_layers, kind)
    if not self.plan.quantizes(kind):
      return None
    # One width for every kernel in scope. A fresh object per call still compares equal to the
    # others: dataclass equality compares the identical tracer by identity.
    return layers.WeightQuant(bits=self.traced_bits, parent_bits=self.plan.parent_bits,
                              extra_precision=self.plan.extra_precision)

  def _group_quants(self) -> tuple:
    """((attn_quant, ffn_quant), ...) per position in a layer group; the same for every group."""
    cfg = self.config
    period = layer_period(cfg)
    if cfg.num_layers % period:
      raise ValueError(f"{cfg.name}: {cfg.num_layers} layers do not split into groups of "
                       f"{period}; use scan_layers=False.")
    quants = []
    for j in range(period):
      q = (self._quant(j, "attn"), self._quant(j, "ffn"))
      for i in range(j, cfg.num_layers, period):
        if (self._quant(i, "attn"), self._quant(i, "ffn")) != q:
          raise ValueError(f"plan {self.plan} quantizes layer {i} unlike layer {j}; a scanned "
                           f"stack needs one plan per group position: use scan_layers=False.")
      quants.append(q)
    return tuple(quants)

  def _scanned_stack(self, x, positions, segment_ids):
    cfg = self.config
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r}; choose one of {sorted(REMAT_POLICIES)}.")
    quants = self._group_quants()
    group = _LayerGroup
    if self.remat != "none":
      group = nn.remat(group, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
    groups = cfg.num_layers // layer_period(cfg)
    scanned = nn.scan(group, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(nn.broadcast, nn.broadcast), length=groups,
                      unroll=groups if self.unroll_scan else 1,
                      metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = scanned(config=cfg, quants=quants, dtype=self.dtype,
                   param_dtype=self.param_dtype, mesh=self.mesh, axis_rules=self.axis_rules,
                   attention_kernel=self.attention_kernel, name="layers")(
                       x, positions, segment_ids)
    return x

  def _accumulating_stack(self, x, positions, segment_ids, grad_acc):
    """The scanned stack run by `accumulating_scan`: the same output, with remat "full"; its
    backward pass adds the stacked params' gradient into `grad_acc` (returned beside x)."""
    if self.remat != "full":
      raise ValueError(f"grad_acc needs remat='full' (the stack's backward pass recomputes "
                       f"each layer group), not {self.remat!r}.")
    cfg = self.config
    group = _LayerGroup(config=cfg, quants=self._group_quants(), dtype=self.dtype,
                        param_dtype=self.param_dtype, mesh=self.mesh, axis_rules=self.axis_rules,
                        attention_kernel=self.attention_kernel, parent=None)
    groups = cfg.num_layers // layer_period(cfg)

    def group_fn(p, h, pos, seg):
      return group.apply({"params": p}, h, pos, seg)[0]

    return accumulating_scan(group_fn, groups if self.unroll_scan else 1,
                             self.variables["params"]["layers"], x, grad_acc,
                             (positions, segment_ids))

  @nn.compact
  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None, cache: Cache | None = None,
               return_hidden: bool = False, grad_acc: Any = None) -> Any:
    """Logits for every input token.

    Args:
      tokens: [batch, seq] int32 token ids.
      positions: [batch, seq] int positions. Default: restart at 0 in every segment. Required
        with a cache (the positions of the new tokens).
      segment_ids: [batch, seq] int; tokens attend only within their segment; 0 = padding.
        Default: all ones. With a cache, every non-padding token of a row must use the same
        segment id as the row's cached tokens (one sequence per row).
      cache: from `init_cache` (or a previous call), or None for a plain forward pass. With a
        cache the call attends to the cached keys plus its own tokens, then stores its tokens:
        a prompt in one call (prefill), then one token per call.
      return_hidden: return the final-normed hidden states [batch, seq, D] instead of the
        logits (`head_logits` turns them into logits, e.g. a chunk at a time).
      grad_acc: with scan_layers and remat "full", a tree like params["layers"] (f32): the stack
        then runs as `accumulating_scan`, whose backward pass adds the layers' gradient into
        it in place (see there); differentiate w.r.t. grad_acc, not the params.

    Returns:
      logits [batch, seq, vocab_size] in the compute dtype (final soft-cap applied), and the
      updated cache when one was given, or grad_acc (passed through) when one was given.
    """
    cfg = self.config
    if segment_ids is None:
      segment_ids = jnp.ones(tokens.shape, jnp.int32)
    if positions is None:
      if cache is not None:
        raise ValueError("Transformer: pass explicit `positions` with a cache (the positions "
                         "of the new tokens in their sequences).")
      positions = positions_from_segments(segment_ids)
    self._check_cache_and_acc(cache, grad_acc)

    embedder = layers.Embedder(config=cfg, dtype=self.dtype, param_dtype=self.param_dtype,
                               name="embedder")
    x = embedder.encode(tokens)
    x = constrain_activations(x, self.mesh, self.axis_rules)
    new_cache = {} if cache is not None else None
    for i in range(0 if self.scan_layers else cfg.num_layers):
      name = f"layer_{i}"
      x, layer_cache = Block(
          config=cfg, layer=i,
          attn_quant=self._quant(i, "attn"),
          ffn_quant=self._quant(i, "ffn"),
          dtype=self.dtype, param_dtype=self.param_dtype,
          attention_kernel=self.attention_kernel, name=name)(
              x, positions, segment_ids, None if cache is None else cache[name])
      if cache is not None:
        new_cache[name] = layer_cache
    if grad_acc is not None:
      x, grad_acc = self._accumulating_stack(x, positions, segment_ids, grad_acc)
    elif self.scan_layers:
      x = self._scanned_stack(x, positions, segment_ids)
    x = layers.RMSNorm(norm_type=cfg.norm_type, eps=cfg.norm_eps, param_dtype=self.param_dtype,
                       name="final_norm")(x)
    if return_hidden:
      if self.is_initializing() and not cfg.tie_embeddings:
        self._lm_head(x)  # create lm_head's params at init
      if grad_acc is not None:
        return x, grad_acc
      return x if cache is None else (x, new_cache)

    if cfg.tie_embeddings:
      logits = embedder.decode(x)
    else:
      logits = self._lm_head(x)
    if cfg.final_logit_softcap is not None:
      cap = cfg.final_logit_softcap
      logits = jnp.tanh(logits / cap) * cap
    if grad_acc is not None:
      return logits, grad_acc
    if cache is None:
      return logits
    return logits, new_cache


  def _check_cache_and_acc(self, cache, grad_acc) -> None:
    if cache is not None and self.scan_layers:
      raise ValueError("Transformer(scan_layers=True) has no KV cache; decode with the "
                       "per-layer layout (unstack_layers(params, config), scan_layers=False).")
    if grad_acc is not None and (not self.scan_layers or self.is_initializing()):
      raise ValueError("Transformer: grad_acc needs scan_layers=True and initialized params.")
    if cache is not None:
      n = self.config.num_layers
      missing = [f"layer_{i}" for i in range(n) if f"layer_{i}" not in cache]
      if missing:
        raise ValueError(f"cache has no entry for {', '.join(missing)}; build it with "
                         f"init_cache(config, batch, max_len).")

  def _lm_head(self, x):
    return nn.Dense(
        self.config.vocab_size, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1.0, "fan_in", "normal"), ("embed", "vocab")),
        name="lm_head")(x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def accumulating_scan(group_fn, unroll: int, stacked, x: jax.Array, acc, extras: tuple):
  """x_G = group_fn(stacked[G-1], ... group_fn(stacked[0], x, *extras) ..., *extras), a scan
  over the stacked params' leading axis whose backward pass adds each group's parameter
  gradient into `acc` (a tree like `stacked`) in place; returns (x_G, acc).

  Why: a multi-width training step sums every width's gradient. Differentiating the model and
  then adding holds the running sum and a fresh full-size gradient at once; here the caller
  differentiates w.r.t. `acc`, seeding its cotangent with the running sum, and each group's
  gradient is added into its slice as soon as it exists. The params' own cotangent is never
  formed (differentiate w.r.t. acc and whatever feeds x, not w.r.t. `stacked`).

  Memory and compute are those of remat "full": the forward pass keeps each group's input; the
  backward pass recomputes one group at a time (jax.vjp). `extras` (positions, segment ids)
  get no gradient. `unroll` as in lax.scan.
  """
  return _run_groups(group_fn, unroll, stacked, x, extras)[0], acc


def _run_groups(group_fn, unroll, stacked, x, extras):
  def body(h, p):
    return group_fn(p, h, *extras), h
  return jax.lax.scan(body, x, stacked, unroll=unroll)


def _accumulating_scan_fwd(group_fn, unroll, stacked, x, acc, extras):
  out, inputs = _run_groups(group_fn, unroll, stacked, x, extras)
  return (out, acc), (stacked, inputs, extras)


def _accumulating_scan_bwd(group_fn, unroll, residuals, cotangents):
  stacked, inputs, extras = residuals
  ct_out, acc = cotangents

  def body(carry, g):
    ct_h, acc = carry
    p = jax.tree_util.tree_map(lambda a: a[g], stacked)
    _, vjp = jax.vjp(lambda p, h: group_fn(p, h, *extras), p, inputs[g])
    ct_p, ct_h = vjp(ct_h)
    acc = jax.tree_util.tree_map(
        lambda a, c: jax.lax.dynamic_update_index_in_dim(a, a[g] + c.astype(a.dtype), g, 0),
        acc, ct_p)
    return (ct_h, acc), None

  (ct_x, acc), _ = jax.lax.scan(body, (ct_out.astype(inputs.dtype), acc),
                                jnp.arange(inputs.shape[0]), reverse=True, unroll=unroll)
  return None, ct_x, acc, None


accumulating_scan.defvjp(_accumulating_scan_fwd, _accumulating_scan_bwd)


def head_logits(config: TransformerConfig, params: dict[str, Any], hidden: jax.Array,
                dtype: Dtype = jnp.float32) -> jax.Array:
  """Logits from final-normed hidden states (`return_hidden=True`), as the model computes them.

  The output projection (tied embedding or lm_head) and the final soft-cap, in `dtype`; used to
  compute the loss a sequence chunk at a time without materializing [B, T, V].
  """
  x = hidden.astype(dtype)
  if config.tie_embeddings:
    table = params["embedder"]["input_embedding"][: config.vocab_size].astype(dtype)
    logits = jnp.einsum("BTD,VD->BTV", x, table)
  else:
    logits = jnp.einsum("BTD,DV->BTV", x, params["lm_head"]["kernel"].astype(dtype))
  if config.final_logit_softcap is not None:
    cap = config.final_logit_softcap
    logits = jnp.tanh(logits / cap) * cap
  return logits


def init_cache(config: TransformerConfig, batch: int, max_len: int,
               dtype: Dtype = jnp.float32) -> Cache:
  """An empty KV cache: {'layer_i': {'k', 'v', 'positions', 'segment_ids'}}.

  Global layers get [batch, max_len, K, H] keys/values; sliding-window layers a ring buffer of
  [batch, min(W, max_len), K, H]. Positions fed with this cache must stay below max_len.
  """
  if batch <= 0 or max_len <= 0:
    raise ValueError(f"init_cache needs batch > 0 and max_len > 0, got {batch}, {max_len}.")
  return {f"layer_{i}": layers.init_layer_cache(config, i, batch, max_len, dtype)
          for i in range(config.num_layers)}


@functools.lru_cache(maxsize=32)
def _abstract_variables(config: TransformerConfig, dtype: Dtype = jnp.float32,
                        scan_layers: bool = False):
  model = Transformer(config, param_dtype=dtype, scan_layers=scan_layers)
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  return jax.eval_shape(model.init, jax.random.key(0), tokens)


def init_params(config: TransformerConfig, rng: jax.Array, dtype: Dtype = jnp.float32
                ) -> dict[str, Any]:
  """Randomly initialised parameters (the tree of config.py, plain arrays, no 'params' level).

  Use as `Transformer(config, plan).apply({"params": params}, tokens)`.
  """
  model = Transformer(config, param_dtype=dtype)
  init = jax.jit(lambda key: model.init(key, jnp.zeros((1, 1), jnp.int32)))
  return nn.meta.unbox(init(rng))["params"]


def param_shapes(config: TransformerConfig, dtype: Dtype = jnp.float32,
                 scan_layers: bool = False) -> dict[str, Any]:
  """The parameter tree as jax.ShapeDtypeStruct leaves, without allocating anything.

  scan_layers: the stacked layout (`layers/sub_{j}`) instead of `layer_{i}`.
  """
  return nn.meta.unbox(_abstract_variables(config, dtype, scan_layers))["params"]


def logical_axes(config: TransformerConfig, scan_layers: bool = False) -> dict[str, Any]:
  """The parameter tree with a `jax.sharding.PartitionSpec` of logical axis names per leaf.

  In the stacked layout the leading (group) axis is named 'layers'.
  """
  return nn.get_partition_spec(_abstract_variables(config, jnp.float32, scan_layers))["params"]


def param_count(config: TransformerConfig) -> int:
  """Number of parameters (embedding rows beyond the vocabulary included)."""
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(param_shapes(config))))
