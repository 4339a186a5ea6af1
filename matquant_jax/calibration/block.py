"""One block's OmniQuant-MatQuant step, evaluation and forwards (jitted, data-parallel).

The objective of layer l (spec §3 Eq. 5 with MatQuant's Eq. 7 and §4 co-distillation):

    L_l = Σ_{r∈R} λ_r · [ gt_r · ‖Y − F_l(S(Q_Omni(W'), r), X_r)‖²
                        + dist_r · ‖sg(Y_t) − F_l(S(Q_Omni(W'), r), X_r)‖² ]

  Y    = F_l(W, X)  the full-precision block output on the full-precision input X (the target)
  X_r  = X ("fp" input mode, default) or the r-bit quantized model's own activations
         ("quantized" mode, OmniQuant's `quant_inps`)
  Y_t  = the teacher slice's output (int8 in "[8,4,2,8->4;2]"), a constant target: the
         gradient is stopped, like OmniQuant's full-precision target
  ‖·‖² = mean squared error over the real (non-padding) tokens and the D output features

Only the learnable state (transform.py: LWC logits, LET log-scales) is differentiated; the
block's weights are an argument of the step that is never differentiated, never returned and
never updated. Bit-widths run as a `lax.scan` over a traced width, the teacher (widest)
first, so a MatQuant step keeps about one width's activations alive (as in QAT,
training/objectives.py). `num_microbatches` > 1 splits the batch and accumulates gradients,
dividing the activation memory of a step by that factor.

Every array whose leading axis is the calibration batch is sharded over the mesh's
data-parallel axes; block weights and the learnable state are replicated. XLA inserts the
gradient all-reduce.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from matquant_jax.calibration import transform
from matquant_jax.models import transformer as transformer_lib
from matquant_jax.models.config import TransformerConfig
from matquant_jax.training import objectives as objectives_lib

# fp: the full-precision model's activations; quantized: each width r of R its own quantized
# model's stream (OmniQuant's procedure, per width); quantized_shared: one stream, the narrowest
# width's quantized model, fed to every width (calibrator.py documents the three).
INPUT_MODES = ("fp", "quantized", "quantized_shared")
LOSS_NORMALIZATIONS = ("none", "minmax")  # StepOptions.loss_normalization
BATCH_AXES = ("data", "fsdp")


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """Static settings of the block step (hashable: part of the compilation cache key).

  Attributes:
    calib: the learnable quantizer's options.
    input_mode: "fp" (default) or "quantized", see the module docstring.
    compute_dtype: activation dtype name of the block forward ("float32" / "bfloat16").
    num_microbatches: gradient-accumulation splits of a batch.
    lr, b1, b2, eps, weight_decay: AdamW (weight_decay 0 makes it Adam), constant lr.
    lwc_lr, let_lr: separate constant learning rates of the LWC logits / LET log-scales
      (None = lr). The paper uses one (1e-3); OmniQuant's code uses 1e-2 / 5e-3.
    loss_normalization: "none" (the paper's Eq. 5/7 as written: Σ_r λ_r · MSE_r) or
      "minmax": each width's terms divided by that width's MinMax block error, measured once
      per block before training (`width_scale` of the step). Raw block errors differ by about
      4^(8−r) between widths, so as written λ8 = 0.1 weighs int8 ~10⁻⁴ of int2 and nothing
      stops clipping for int2 from costing int8 50-400× its MinMax error; normalized, every
      term starts at 1 as the cross-entropies of QAT do, and λ means what it means there.
  """
  calib: transform.CalibOptions = transform.CalibOptions()
  input_mode: str = "fp"
  compute_dtype: str = "float32"
  num_microbatches: int = 1
  lr: float = 1e-3
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0
  lwc_lr: float | None = None
  let_lr: float | None = None
  loss_normalization: str = "none"

  def __post_init__(self):
    if self.input_mode not in INPUT_MODES:
      raise ValueError(f"input_mode={self.input_mode!r}; choose one of {INPUT_MODES}.")
    if self.compute_dtype not in ("float32", "bfloat16"):
      raise ValueError(f"compute_dtype={self.compute_dtype!r}; use float32 or bfloat16.")
    if self.num_microbatches < 1:
      raise ValueError(f"num_microbatches={self.num_microbatches} must be >= 1.")
    if self.loss_normalization not in LOSS_NORMALIZATIONS:
      raise ValueError(f"loss_normalization={self.loss_normalization!r}; choose one of "
                       f"{LOSS_NORMALIZATIONS}.")


def make_optimizer(options: StepOptions) -> optax.GradientTransformation:
  """AdamW at a constant learning rate (spec §6: constant 1e-3; OmniQuant uses AdamW)."""
  def adamw(lr):
    return optax.adamw(lr, b1=options.b1, b2=options.b2, eps=options.eps,
                       weight_decay=options.weight_decay)

  if options.lwc_lr is None and options.let_lr is None:
    return adamw(options.lr)
  lrs = {"lwc": options.lwc_lr or options.lr, "let": options.let_lr or options.lr}
  return optax.multi_transform(
      {k: adamw(v) for k, v in lrs.items()},
      lambda tree: {k: jax.tree_util.tree_map(lambda _, k=k: k, v) for k, v in tree.items()})


def representative_layer(config: TransformerConfig, layer: int) -> int:
  """The first layer with the same attention locality: all layers with one locality share a
  compiled block (the params tree is the same; only local vs global attention differs)."""
  want = config.is_local(layer)
  return next(j for j in range(config.num_layers) if config.is_local(j) == want)


def _block_module(config: TransformerConfig, layer: int, compute_dtype: str):
  dtype = jnp.bfloat16 if compute_dtype == "bfloat16" else jnp.float32
  return transformer_lib.Block(config=config, layer=layer, dtype=dtype)


def _sq_err(a: jax.Array, b: jax.Array, mask: jax.Array) -> jax.Array:
  """Σ mask·(a − b)² in float32; a, b [B, T, D], mask [B, T]."""
  d = a.astype(jnp.float32) - b.astype(jnp.float32)
  return jnp.sum(jnp.square(d) * mask[..., None])


def _mse(a, b, mask):
  count = jnp.maximum(jnp.sum(mask), 1.0) * a.shape[-1]
  return _sq_err(a, b, mask) / count


@dataclasses.dataclass(frozen=True)
class BlockFunctions:
  """Jitted functions of one block shape (one locality); see `block_functions`.

  fp_forward(block_params, x, positions, segment_ids) -> (y, Σ mask·(y − x)²)
  quant_forward(block_params, calib, x, positions, segment_ids, bits) -> y_r
  evaluate(block_params, calib, batch) -> (Σ sq. error per width [R], Σ mask · D)
  train_step(calib, opt_state, block_params, batch, width_scale) -> (calib, opt_state, metrics)
  init_opt(calib) -> opt_state

  `batch`: 'x' [B, T, D] ("fp") or [R, B, T, D] ("quantized", one input per width of R),
  'y' [B, T, D] the full-precision target, 'positions', 'segment_ids' [B, T] int32.
  `width_scale` [R]: each width's loss multiplier (1, or 1 / its MinMax error with
  loss_normalization="minmax").
  """
  fp_forward: Callable
  quant_forward: Callable
  evaluate: Callable
  train_step: Callable
  init_opt: Callable
  loss_and_grads: Callable  # unjitted, for tests and AOT analysis
  batch_sharding: Any
  stacked_sharding: Any
  replicated: Any


def _per_width_inputs(objective: objectives_lib.Objective) -> dict[str, jax.Array]:
  bits = objective.bits
  teacher = objective.teachers[0] if objective.teachers else None
  students = {s for _, s in objective.distill}
  return {
      "bits": jnp.asarray(bits, jnp.int32),
      "lam": jnp.asarray(objective.weights, jnp.float32),
      "gt": jnp.asarray([float(r in objective.ground_truth) for r in bits], jnp.float32),
      "dist": jnp.asarray([float(r in students) for r in bits], jnp.float32),
      "is_teacher": jnp.asarray([r == teacher for r in bits]),
  }


@dataclasses.dataclass
class _Block:
  """The unjitted computations of one block shape: forwards, the loss over R, the step."""
  config: TransformerConfig
  module: Any
  objective: objectives_lib.Objective
  options: StepOptions
  tx: Any
  q_module: Any  # the block of the folded params (with the LET shift's biases, if any)

  @property
  def quantized_inputs(self) -> bool:
    return self.options.input_mode != "fp"

  def apply(self, params, x, positions, segment_ids, module=None):
    y, _ = (module or self.module).apply({"params": params}, x, positions, segment_ids)
    return y

  def q_apply(self, block_params, calib, bits, x, positions, segment_ids):
    qp = transform.quantized_block_params(
        self.config, block_params, calib, bits, options=self.options.calib,
        parent_bits=self.objective.parent_bits, extra_precision=self.objective.extra_precision)
    return self.apply(qp, x, positions, segment_ids, self.q_module)

  def fp_forward(self, block_params, x, positions, segment_ids):
    y = self.apply(block_params, x, positions, segment_ids)
    mask = (segment_ids != 0).astype(jnp.float32)
    return y.astype(x.dtype), _sq_err(y, x, mask)

  def quant_forward(self, block_params, calib, x, positions, segment_ids, bits):
    return self.q_apply(block_params, calib, bits, x, positions, segment_ids).astype(x.dtype)

  def micro_loss_and_grads(self, calib, block_params, batch, width_scale=None):
    """Loss, grads and per-width errors of one (micro-)batch: a scan over R."""
    mask = (batch["segment_ids"] != 0).astype(jnp.float32)
    has_distill = bool(self.objective.distill)
    xs = _per_width_inputs(self.objective)
    if width_scale is not None:
      xs["lam"] = xs["lam"] * width_scale
    if self.quantized_inputs:
      xs["x"] = batch["x"]
    y = batch["y"]

    def body(carry, xr):
      grads, total, y_t = carry
      x_in = xr["x"] if self.quantized_inputs else batch["x"]

      def loss_fn(c):
        y_r = self.q_apply(block_params, c, xr["bits"], x_in, batch["positions"],
                           batch["segment_ids"])
        e_gt = _mse(y_r, y, mask)
        e_t = _mse(y_r, jax.lax.stop_gradient(y_t), mask) if has_distill else jnp.zeros(())
        loss = xr["lam"] * (xr["gt"] * e_gt + xr["dist"] * e_t)
        return loss, (e_gt, e_t, y_r)

      (loss, (e_gt, e_t, y_r)), g = jax.value_and_grad(loss_fn, has_aux=True)(calib)
      grads = jax.tree_util.tree_map(jnp.add, grads, g)
      if has_distill:
        y_t = jnp.where(xr["is_teacher"], jax.lax.stop_gradient(y_r).astype(y_t.dtype), y_t)
      return (grads, total + loss, y_t), (e_gt, e_t)

    zeros = jax.tree_util.tree_map(jnp.zeros_like, calib)
    y_t0 = jnp.zeros(y.shape, jnp.float32) if has_distill else None
    (grads, total, _), (e_gt, e_t) = jax.lax.scan(body, (zeros, jnp.zeros(()), y_t0), xs)
    return total, grads, e_gt, e_t

  def loss_and_grads(self, calib, block_params, batch, width_scale=None):
    """micro_loss_and_grads averaged over options.num_microbatches (a scan)."""
    m = self.options.num_microbatches
    if m == 1:
      return self.micro_loss_and_grads(calib, block_params, batch, width_scale)
    micro = _split_microbatches(batch, m, self.quantized_inputs)

    def body(carry, mb):
      grads, total, e_gt, e_t = carry
      t, g, a, b = self.micro_loss_and_grads(calib, block_params, mb, width_scale)
      return (jax.tree_util.tree_map(jnp.add, grads, g), total + t, e_gt + a, e_t + b), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, calib)
    nb = len(self.objective.bits)
    (grads, total, e_gt, e_t), _ = jax.lax.scan(
        body, (zeros, jnp.zeros(()), jnp.zeros((nb,)), jnp.zeros((nb,))), micro)
    scale = 1.0 / m
    return (total * scale, jax.tree_util.tree_map(lambda g: g * scale, grads), e_gt * scale,
            e_t * scale)

  def train_step(self, calib, opt_state, block_params, batch, width_scale):
    loss, grads, e_gt, e_t = self.loss_and_grads(calib, block_params, batch, width_scale)
    updates, opt_state = self.tx.update(grads, opt_state, calib)
    calib = optax.apply_updates(calib, updates)
    gnorm = optax.global_norm(grads)
    metrics = {"loss": loss, "grad_norm": gnorm, "mse": e_gt, "distill": e_t,
               "finite": jnp.isfinite(loss) & jnp.isfinite(gnorm)}
    return calib, opt_state, metrics

  def evaluate(self, block_params, calib, batch):
    mask = (batch["segment_ids"] != 0).astype(jnp.float32)
    xs = {"bits": jnp.asarray(self.objective.bits, jnp.int32)}
    if self.quantized_inputs:
      xs["x"] = batch["x"]

    def body(_, xr):
      x_in = xr["x"] if self.quantized_inputs else batch["x"]
      y_r = self.q_apply(block_params, calib, xr["bits"], x_in, batch["positions"],
                         batch["segment_ids"])
      return None, _sq_err(y_r, batch["y"], mask)

    _, sse = jax.lax.scan(body, None, xs)
    return sse, jnp.sum(mask) * batch["y"].shape[-1]


def _split_microbatches(batch, m: int, quantized_inputs: bool):
  """[.., B, ..] -> [M, .., B/M, ..] per array, keeping each device's rows together: row b goes
  to micro-batch b % M, so a batch sharded over devices splits without communication."""
  def split(v, axis):
    v = jnp.moveaxis(v, axis, 0)
    b = v.shape[0]
    v = v.reshape((b // m, m) + v.shape[1:]).swapaxes(0, 1)
    return jnp.moveaxis(v, 1, axis + 1)

  return {k: split(v, 1 if (k == "x" and quantized_inputs) else 0) for k, v in batch.items()}


@functools.lru_cache(maxsize=64)
def block_functions(config: TransformerConfig, layer: int,
                    objective: objectives_lib.Objective, options: StepOptions,
                    mesh: jax.sharding.Mesh) -> BlockFunctions:
  """Builds (and caches per locality) the jitted functions of a block.

  Args:
    config: the model.
    layer: any layer index; functions are shared by all layers of the same locality.
    objective: R, λ, ground-truth / distillation terms, extra precision, parent bits.
    options: static step options.
    mesh: the device mesh; batches are split over its ('data', 'fsdp') axes.
  """
  rep = representative_layer(config, layer)
  if rep != layer:
    return block_functions(config, rep, objective, options, mesh)
  tx = make_optimizer(options)
  blk = _Block(config, _block_module(config, layer, options.compute_dtype), objective, options,
               tx, _block_module(transform.folded_config(config, options.calib), layer,
                                 options.compute_dtype))
  quantized_inputs = blk.quantized_inputs
  replicated = NamedSharding(mesh, P())
  batch_sh = NamedSharding(mesh, P(BATCH_AXES))
  stacked_sh = NamedSharding(mesh, P(None, BATCH_AXES))
  x_sh = stacked_sh if quantized_inputs else batch_sh
  batch_shardings = {"x": x_sh, "y": batch_sh, "positions": batch_sh, "segment_ids": batch_sh}
  return BlockFunctions(
      fp_forward=jax.jit(blk.fp_forward, out_shardings=(batch_sh, replicated)),
      quant_forward=jax.jit(blk.quant_forward, out_shardings=batch_sh),
      evaluate=jax.jit(blk.evaluate, out_shardings=replicated),
      train_step=jax.jit(blk.train_step, in_shardings=(replicated, replicated, replicated,
                                                       batch_shardings, replicated),
                         out_shardings=(replicated, replicated, replicated),
                         donate_argnums=(0, 1)),
      init_opt=jax.jit(tx.init, out_shardings=replicated),
      loss_and_grads=blk.loss_and_grads,
      batch_sharding=batch_sh, stacked_sharding=stacked_sh, replicated=replicated)
