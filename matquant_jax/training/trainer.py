"""The QAT training loop: validated setup, sharded jitted step, Orbax checkpoints, export.

    setup = resolve(config)            # every check, no compilation, no allocation
    train(config, workdir)             # runs (or resumes) the job, exports the int8 checkpoint

One step runs every bit-width of the objective (objectives.loss_and_grads) with f32 master
weights and `compute_dtype` activations, under `jit` with NamedShardings over a
('data', 'fsdp', 'tensor') mesh and the state donated. The same code runs on one CPU, 8 forced
CPU devices, a GPU and a TPU pod (`jax.distributed.initialize()` is called by the CLI on pods).

Resuming: an Orbax CheckpointManager keeps the last K (train state, data-iterator state) pairs;
restarting the same command restores the latest one and continues exactly where it stopped.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import pathlib
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct

from matquant_jax.models import config as model_config_lib
from matquant_jax.models import splash_attention as splash_lib
from matquant_jax.models import transformer as transformer_lib
from matquant_jax.quant import forward as forward_lib
from matquant_jax.quant.plan import PrecisionPlan
from matquant_jax.quant.plan import Scope
from matquant_jax.quant.plan import plan_kernels
from matquant_jax.training import aot
from matquant_jax.training import config as config_lib
from matquant_jax.training import metrics as metrics_lib
from matquant_jax.training import objectives as objectives_lib
from matquant_jax.training import optimizer as optimizer_lib
from matquant_jax.training import sharding as sharding_lib
from matquant_jax.training.config import ConfigError
from matquant_jax.training.config import check_inputs

COMPUTE_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything derived from the config, validated."""
  model: model_config_lib.TransformerConfig
  objective: objectives_lib.Objective
  mesh: jax.sharding.Mesh
  compute_dtype: Any
  num_steps: int
  seq_len: int
  global_batch_size: int
  train_scope: str
  scan_layers: bool = False       # params in the stacked layout, the stack run as one nn.scan
  remat: str = "none"             # transformer.REMAT_POLICIES
  loss_chunk_size: int = 0        # sequence tokens per loss chunk; 0 = full logits
  unroll_scans: bool = False      # unroll every scan in HLO (only for XLA's cost analysis)
  attention_kernel: str = "xla"   # xla | splash (resolved from config.attention_kernel)
  width_loop: str = "scan"        # scan | unrolled (objectives.WIDTH_LOOPS)
  fake_quant_at: str = "tree"     # layers | tree (resolved from config.fake_quant_at)
  accumulate_grads: str = "add"   # in_place | add (resolved from config.accumulate_grads)


def resolve(config: ml_collections.ConfigDict, *, devices=None) -> Setup:
  """Validates `config` and derives the run's setup; raises ConfigError naming the problem."""
  model = resolve_model(config)
  o = config.objective
  try:
    objective = objectives_lib.make_objective(
        o.method, bits=o.bits, weights=o.weights, codistill=o.codistill, scope=o.scope,
        extra_precision=o.extra_precision, distill_loss=o.distill_loss,
        stop_teacher_grad=o.stop_teacher_grad, family=_lambda_family(o.family, model))
  except ValueError as e:
    raise ConfigError(f"config.objective: {e}") from None
  if config.compute_dtype not in COMPUTE_DTYPES:
    raise ConfigError(f"config.compute_dtype={config.compute_dtype!r}; choose one of "
                      f"{sorted(COMPUTE_DTYPES)}.")
  if config.train_scope not in ("all", "quantized"):
    raise ConfigError(f"config.train_scope={config.train_scope!r}; choose 'all' or 'quantized'.")
  if config.train_scope == "quantized" and objective.method == "bf16":
    raise ConfigError("config.train_scope='quantized' needs a quantized objective, not bf16.")
  try:
    mesh = sharding_lib.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor,
                                  devices=devices)
  except ValueError as e:
    raise ConfigError(f"config.mesh: {e}") from None
  _check_data(config, mesh)
  _check_optimizer(config.optimizer)
  num_steps = _num_steps(config)
  _check_run(config, model)
  d = config.data
  at = _fake_quant_at(config, objective)
  return Setup(model=model, objective=objective, mesh=mesh,
               compute_dtype=COMPUTE_DTYPES[config.compute_dtype], num_steps=num_steps,
               seq_len=int(d.seq_len), global_batch_size=int(d.global_batch_size),
               train_scope=config.train_scope, scan_layers=bool(config.scan_layers),
               remat=config.remat, loss_chunk_size=int(config.loss_chunk_size),
               attention_kernel=_attention_kernel(config, model, mesh),
               width_loop=config.width_loop, fake_quant_at=at,
               accumulate_grads=_accumulate_grads(config, objective, at))


FAKE_QUANT_AT = ("auto", "layers", "tree")


def _fake_quant_at(config, objective) -> str:
  """config.fake_quant_at resolved to "layers" or "tree" (see training/config.py)."""
  choice = config.get("fake_quant_at", "auto")
  if choice not in FAKE_QUANT_AT:
    raise ConfigError(f"config.fake_quant_at={choice!r}; choose one of {FAKE_QUANT_AT} (where "
                      f"a step fake-quantizes the kernels).")
  if choice != "auto":
    return choice
  scanned = config.width_loop == "scan" and len(objective.bits) > 1
  return "layers" if scanned else "tree"


ACCUMULATE_GRADS = ("auto", "in_place", "add")


def _accumulate_grads(config, objective, fake_quant_at: str) -> str:
  """config.accumulate_grads resolved to "in_place" or "add" (see training/config.py)."""
  choice = config.get("accumulate_grads", "auto")
  if choice not in ACCUMULATE_GRADS:
    raise ConfigError(f"config.accumulate_grads={choice!r}; choose one of {ACCUMULATE_GRADS} "
                      f"(how a step sums its widths' gradients).")
  needs = {
      "a scan over widths (config.width_loop='scan', several widths, at most one teacher)":
          objectives_lib.scans_widths(objective, config.width_loop == "scan"),
      "objective.stop_teacher_grad=True": not objectives_lib.teacher_needs_grad(objective),
      "config.scan_layers=True": bool(config.scan_layers),
      "config.remat='full'": config.remat == "full",
      "config.fake_quant_at='layers'": fake_quant_at == "layers",
  }
  missing = [k for k, ok in needs.items() if not ok]
  if choice == "auto":
    return "add" if missing else "in_place"
  if choice == "in_place" and missing:
    raise ConfigError(f"config.accumulate_grads='in_place' needs {', '.join(missing)}; or set "
                      f"--config.accumulate_grads=auto.")
  return choice


def _attention_kernel(config, model, mesh) -> str:
  """config.attention_kernel resolved to "xla" or "splash"; refuses what splash cannot run."""
  choice = config.get("attention_kernel", "auto")
  if choice not in ("auto", "xla", "splash"):
    raise ConfigError(f"config.attention_kernel={choice!r}; choose auto, xla or splash.")
  if choice == "xla":
    return "xla"
  on_tpu = mesh.devices.flat[0].platform == "tpu"
  # Off TPU the kernel is interpreted, which takes any shape.
  why = splash_lib.check_shapes(int(config.data.seq_len), model.head_dim) if on_tpu else None
  tensor = mesh.shape["tensor"]
  if why is None and model.num_kv_heads % tensor:
    why = (f"{model.name} has {model.num_kv_heads} key/value heads, which the tensor axis "
           f"({tensor}) does not divide")
  if choice == "auto":
    return "splash" if on_tpu and why is None else "xla"
  if why is not None:
    raise ConfigError(f"config.attention_kernel='splash': {why}; use "
                      f"--config.attention_kernel=xla.")
  return "splash"


def _check_data(config, mesh) -> None:
  """Sequence length, and a global batch that splits over devices, hosts and data shards."""
  d = config.data
  if d.seq_len <= 1:
    raise ConfigError(f"config.data.seq_len={d.seq_len} must be > 1.")
  dp = sharding_lib.data_parallel_size(mesh)
  if d.global_batch_size <= 0 or d.global_batch_size % dp:
    raise ConfigError(
        f"config.data.global_batch_size={d.global_batch_size} is not divisible by the "
        f"{dp} data-parallel devices of mesh {dict(mesh.shape)}; use a multiple of {dp}.")
  if d.global_batch_size % jax.process_count():
    raise ConfigError(f"config.data.global_batch_size={d.global_batch_size} is not divisible "
                      f"by the {jax.process_count()} hosts.")
  shards = data_num_shards(config)
  if d.num_shards < 0 or shards % jax.process_count():
    raise ConfigError(f"config.data.num_shards={d.num_shards} must be 0 (one per process) or a "
                      f"positive multiple of the {jax.process_count()} processes.")
  if d.global_batch_size % shards:
    raise ConfigError(f"config.data.global_batch_size={d.global_batch_size} is not divisible "
                      f"by config.data.num_shards={shards}.")


def _num_steps(config) -> int:
  """config.num_steps, or (0) the batches the data pipeline yields under data.max_tokens."""
  d = config.data
  num_steps = int(config.num_steps)
  if num_steps < 0:
    raise ConfigError(f"config.num_steps={num_steps} must be >= 0 (0 = derive the step count "
                      f"from config.data.max_tokens).")
  if num_steps == 0:
    if not d.max_tokens:
      raise ConfigError("config.num_steps=0 derives the step count from config.data.max_tokens, "
                        "which is 0 too; set one of them.")
    # One source for the step count: the data pipeline's own count of the batches it yields
    # under the token budget (the last, partly filled row counts: 100M tokens -> 763 steps).
    from matquant_jax.data import lm
    num_steps = lm.budget_num_batches(data_config(config), data_num_shards(config)) or 0
    if num_steps <= 0:
      raise ConfigError(f"config.data.max_tokens={d.max_tokens} is less than one batch "
                        f"({d.global_batch_size}×{d.seq_len} tokens).")
  return num_steps


def _check_run(config, model) -> None:
  """Required paths, logging/checkpoint cadence, remat, scanned layers and loss chunks."""
  if not config.aot_only:
    for f, example in (("init", "gemma:/ckpts/gemma2-9b"), ("tokenizer", "/ckpts/tokenizer.model")):
      if config[f] == "required":
        raise ConfigError(f"config.{f} must be set for this experiment, e.g. "
                          f"--config.{f}={example} (only --config.aot_only=True runs without it).")
  for f in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
    if config[f] <= 0:
      raise ConfigError(f"config.{f}={config[f]} must be positive.")
  if config.remat not in transformer_lib.REMAT_POLICIES:
    raise ConfigError(f"config.remat={config.remat!r}; choose one of "
                      f"{sorted(transformer_lib.REMAT_POLICIES)} (what the backward pass keeps).")
  if config.remat != "none" and not config.scan_layers:
    raise ConfigError(f"config.remat={config.remat!r} needs config.scan_layers=True.")
  period = transformer_lib.layer_period(model)
  if config.scan_layers and model.num_layers % period:
    raise ConfigError(f"config.scan_layers=True: {model.name} has {model.num_layers} layers, "
                      f"not a multiple of its {period}-layer local/global group; set "
                      f"--config.scan_layers=False.")
  if config.loss_chunk_size < 0:
    raise ConfigError(f"config.loss_chunk_size={config.loss_chunk_size} must be >= 0 "
                      f"(0 = whole-sequence logits).")
  if config.width_loop not in objectives_lib.WIDTH_LOOPS:
    raise ConfigError(f"config.width_loop={config.width_loop!r}; choose one of "
                      f"{objectives_lib.WIDTH_LOOPS} (how a step runs the objective's widths).")


def _check_optimizer(o: ml_collections.ConfigDict) -> None:
  """Every optimizer field in its range: a negative learning rate or clip norm would train
  silently in the wrong direction."""
  def finite(name):
    v = o[name]
    if not math.isfinite(float(v)):
      raise ConfigError(f"config.optimizer.{name}={v} must be a finite number.")
    return float(v)

  checks = (
      ("peak_lr", lambda v: v > 0, "> 0 (e.g. 1e-5, the paper's QAT learning rate)"),
      ("final_lr_fraction", lambda v: 0 <= v <= 1, "in [0, 1] (a fraction of peak_lr)"),
      ("weight_decay", lambda v: v >= 0, ">= 0"),
      ("b1", lambda v: 0 <= v < 1, "in [0, 1) (Adam's first-moment decay, e.g. 0.9)"),
      ("b2", lambda v: 0 <= v < 1, "in [0, 1) (Adam's second-moment decay, e.g. 0.999)"),
      ("eps", lambda v: v > 0, "> 0 (e.g. 1e-8)"),
  )
  for name, ok, rule in checks:
    if not ok(finite(name)):
      raise ConfigError(f"config.optimizer.{name}={o[name]} must be {rule}.")
  if o.warmup_steps < 0:
    raise ConfigError(f"config.optimizer.warmup_steps={o.warmup_steps} must be >= 0.")
  if o.grad_clip_norm is not None and not (finite("grad_clip_norm") > 0):
    raise ConfigError(f"config.optimizer.grad_clip_norm={o.grad_clip_norm} must be > 0, or "
                      f"unset (None) for no clipping.")


def resolve_model(config: ml_collections.ConfigDict) -> model_config_lib.TransformerConfig:
  """config.model as a TransformerConfig: a preset name, or 'auto' / 'from_init' for the
  architecture of the checkpoint config.init names (read from its config files only)."""
  from matquant_jax.checkpoints import weight_source
  try:
    return weight_source.model_config(config.model, config.init)
  except ValueError as e:
    raise ConfigError(f"config.model={config.model!r}: {e}") from None


def _lambda_family(family: str, model: model_config_lib.TransformerConfig) -> str:
  from matquant_jax.checkpoints import weight_source
  return weight_source.lambda_family(model) if family == "auto" else family


def fake_quant_params(params, objective: objectives_lib.Objective, bits):
  """The param tree with every kernel in the objective's scope fake-quantized at `bits`.

  `bits` may be traced (the objective's scan over widths). Running the model's bf16 plan on
  these params is the same computation as running it with a uniform plan at `bits`: both go
  through quant/forward.py's `kernel_value` just before the matmul.
  """
  return forward_lib.quantized_tree(params, bits=bits, scope=objective.scope,
                                    parent_bits=objective.parent_bits,
                                    extra_precision=objective.extra_precision)


def make_apply_fn(model: model_config_lib.TransformerConfig, objective, compute_dtype, *,
                  scan_layers: bool = False, remat: str = "none", mesh=None,
                  return_hidden: bool = False, unroll_scan: bool = False,
                  attention_kernel: str = "xla", quantize_in_layers: bool = False):
  """(params, batch, bits, grad_acc=None) -> logits (or final hidden states), for
  objectives.loss_and_grads; with grad_acc (objectives' in-place accumulation), (out, grad_acc).

  With a mesh, activations are pinned to the logical axes of sharding.DEFAULT_RULES. With
  `quantize_in_layers` each layer fake-quantizes its own kernels at the (traced) width inside
  the layer stack; otherwise `fake_quant_params` quantizes the whole tree first (same numbers;
  config.fake_quant_at says which is smaller when).
  """
  rules = None if mesh is None else sharding_lib.DEFAULT_RULES
  kernel = None
  if attention_kernel == "splash":
    kernel = splash_lib.SplashAttention(softcap=model.attn_logit_softcap, mesh=mesh,
                                        axis_rules=rules)
  module = transformer_lib.Transformer(
      model, dtype=compute_dtype, scan_layers=scan_layers, remat=remat, mesh=mesh,
      axis_rules=rules, unroll_scan=unroll_scan, attention_kernel=kernel)
  # The objective's scope, parent width and Extra Precision; the width itself is traced.
  scope_plan = None
  if quantize_in_layers and objective.method != "bf16":
    scope_plan = PrecisionPlan.uniform(objective.parent_bits, objective.scope,
                                       parent_bits=objective.parent_bits,
                                       extra_precision=objective.extra_precision)

  def apply_fn(params, batch, bits, grad_acc=None):
    m = module
    if bits is not None:
      if scope_plan is not None:
        m = module.clone(plan=scope_plan, traced_bits=bits)
      elif grad_acc is not None:
        raise ValueError("grad_acc needs quantize_in_layers: quantizing the tree first would "
                         "hide the params from the stack's gradient accumulation.")
      else:
        params = fake_quant_params(params, objective, bits)
    return m.apply({"params": params}, batch["inputs"], positions=batch.get("positions"),
                   segment_ids=batch.get("segment_ids"), return_hidden=return_hidden,
                   grad_acc=grad_acc)
  return apply_fn


def trainable_mask(model: model_config_lib.TransformerConfig, scope: Scope, train_scope: str,
                   scan_layers: bool = False):
  """True for the params that train: all, or only the quantized kernels."""
  shapes = transformer_lib.param_shapes(model, scan_layers=scan_layers)
  if train_scope == "all":
    return jax.tree_util.tree_map(lambda _: True, shapes)
  names = {name for _, name in plan_kernels(scope)}
  return jax.tree_util.tree_map_with_path(
      lambda path, _: len(path) >= 2 and getattr(path[-2], "key", None) in names, shapes)


def make_optimizer(config, setup: Setup):
  o = config.optimizer
  return optimizer_lib.make_optimizer(
      peak_lr=o.peak_lr, warmup_steps=o.warmup_steps, total_steps=setup.num_steps,
      final_lr_fraction=o.final_lr_fraction, weight_decay=o.weight_decay, b1=o.b1, b2=o.b2,
      eps=o.eps, grad_clip_norm=o.grad_clip_norm,
      trainable_mask=(None if setup.train_scope == "all" else
                      trainable_mask(setup.model, setup.objective.scope, setup.train_scope,
                                     setup.scan_layers)))


def build_train_step(setup: Setup, tx: optax.GradientTransformation, schedule):
  """The (unjitted) step: (state, batch) -> (state, metrics)."""
  chunked = setup.loss_chunk_size > 0
  apply_fn = make_apply_fn(setup.model, setup.objective, setup.compute_dtype,
                           scan_layers=setup.scan_layers, remat=setup.remat, mesh=setup.mesh,
                           return_hidden=chunked, unroll_scan=setup.unroll_scans,
                           attention_kernel=setup.attention_kernel,
                           quantize_in_layers=setup.fake_quant_at == "layers")
  head = None
  if chunked:
    def head(params, hidden):
      return transformer_lib.head_logits(setup.model, params, hidden, setup.compute_dtype)
  p_shard, _ = param_shardings(setup)

  def step(state: TrainState, batch):
    loss, grads, metrics = objectives_lib.loss_and_grads(
        setup.objective, apply_fn, state.params, batch, head=head,
        chunk=setup.loss_chunk_size, grad_shardings=p_shard, unroll=setup.unroll_scans,
        scan=setup.width_loop == "scan", in_place=setup.accumulate_grads == "in_place")
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics)
    metrics["grad_norm"] = grad_norm
    metrics["learning_rate"] = schedule(state.step)
    metrics["finite"] = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return step


def param_shardings(setup: Setup, scan_layers: bool | None = None):
  """(NamedShardings of the params from their logical axes, notes); the setup's layout unless
  scan_layers says which."""
  scan = setup.scan_layers if scan_layers is None else scan_layers
  return sharding_lib.param_shardings(
      transformer_lib.logical_axes(setup.model, scan_layers=scan),
      transformer_lib.param_shapes(setup.model, scan_layers=scan), setup.mesh)


def state_shardings(setup: Setup, tx):
  """Shardings of TrainState: params from logical axes, optimizer state exactly like them."""
  shapes = transformer_lib.param_shapes(setup.model, scan_layers=setup.scan_layers)
  p_shard, notes = param_shardings(setup)
  abstract = jax.tree_util.tree_map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, jnp.float32, sharding=sh), shapes, p_shard)
  replicated = jax.sharding.NamedSharding(setup.mesh, jax.sharding.PartitionSpec())
  # Adam's moments sharded exactly like their params (ZeRO-3); counts replicated.
  opt_shard = sharding_lib.state_shardings_like_params(
      jax.eval_shape(tx.init, abstract), abstract, p_shard, setup.mesh)
  return TrainState(step=replicated, params=p_shard, opt_state=opt_shard), abstract, notes


def abstract_batch(setup: Setup):
  sh = sharding_lib.batch_sharding(setup.mesh)
  shape = (setup.global_batch_size, setup.seq_len)
  b = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sh)
       for k in ("inputs", "targets", "segment_ids", "positions")}
  b["loss_mask"] = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sh)
  return b


def compile_step(setup: Setup, tx, schedule):
  """Lowers and compiles the jitted step for the setup's mesh without running it."""
  shardings, abstract_params, notes = state_shardings(setup, tx)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  abstract_opt = jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_opt,
      shardings.opt_state)
  abstract_state = TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32, sharding=shardings.step),
      params=abstract_params, opt_state=abstract_opt)
  replicated = jax.sharding.NamedSharding(setup.mesh, jax.sharding.PartitionSpec())
  jitted = jax.jit(build_train_step(setup, tx, schedule),
                   in_shardings=(shardings, sharding_lib.batch_sharding(setup.mesh)),
                   out_shardings=(shardings, replicated), donate_argnums=0)
  compiled = jitted.lower(abstract_state, abstract_batch(setup)).compile()
  return jitted, compiled, shardings, notes


# ---------------------------------------------------------------------------------------------
# The loop.


def data_config(config):
  """The data pipeline's DataConfig from the experiment config (0 / "" mean unset)."""
  from matquant_jax.data import lm
  d = config.data
  return lm.DataConfig(
      source=d.source, tfds_data_dir=d.tfds_data_dir or None, train_split=d.train_split,
      eval_split=d.eval_split, seq_len=int(d.seq_len), global_batch_size=int(d.global_batch_size),
      seed=int(d.seed), num_epochs=int(d.num_epochs) or None, max_tokens=int(d.max_tokens) or None,
      add_bos=bool(d.add_bos), add_eos=bool(d.add_eos))


def initial_params(config, setup: Setup, shardings, rng):
  """Starting weights, placed with `shardings` (random init happens directly sharded)."""
  spec = config.init
  model = setup.model
  if spec == "random":
    module = transformer_lib.Transformer(model, scan_layers=setup.scan_layers)
    init = jax.jit(lambda key: jax.tree_util.tree_map(
        lambda x: x.astype(jnp.float32),
        __import__("flax").linen.meta.unbox(module.init(key, jnp.zeros((1, 1), jnp.int32)))["params"]),
        out_shardings=shardings)
    return init(rng)
  if setup.scan_layers:
    # Every reader yields the per-layer layout: load it sharded, then stack on the devices.
    per_layer = initial_params(config, dataclasses.replace(setup, scan_layers=False),
                               param_shardings(setup, scan_layers=False)[0], rng)
    # Only the layers change layout. The other entries keep their buffers (through a jitted
    # identity they would be copied); donating the per-layer buffers, which cannot become the
    # stacked outputs, freed nothing and made jax warn on every run.
    layers = {k: per_layer.pop(k) for k in list(per_layer) if k.startswith("layer_")}
    shardings = shardings or {}
    out = {k: jax.device_put(v, shardings[k]) if k in shardings else v
           for k, v in per_layer.items()}
    out["layers"] = jax.jit(lambda p: transformer_lib.stack_layers(p, model)["layers"],
                            out_shardings=shardings.get("layers"))(layers)
    return out
  from matquant_jax.checkpoints import weight_source
  try:
    return weight_source.load(spec, model, shardings=shardings)[1]
  except (ValueError, FileNotFoundError) as e:
    raise ConfigError(f"config.init={spec!r}: {e}") from None


def data_num_shards(config) -> int:
  """config.data.num_shards, 0 meaning one logical shard per process."""
  n = int(config.data.num_shards)
  return n if n > 0 else jax.process_count()


def gather_data_state(local: dict[str, Any]) -> dict[str, Any]:
  """Every process's data-iterator states merged into one dict (keyed by logical shard).

  Orbax writes a JSON item from the primary process only, so each process's state is
  all-gathered first; on restore every process picks its own shards from the merged dict.
  """
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils
  raw = np.frombuffer(json.dumps(local).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([raw.size], np.int64)))
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:raw.size] = raw
  every = np.asarray(multihost_utils.process_allgather(padded))
  merged: dict[str, Any] = {}
  for p in range(every.shape[0]):
    merged.update(json.loads(every[p, :int(sizes.reshape(-1)[p])].tobytes().decode()))
  return merged


def _to_global(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
          devices: Sequence[jax.Device] | None = None) -> dict[str, Any]:
  """Runs (or resumes) the experiment in `workdir`; returns a summary dict.

  `devices`: the devices the mesh spans (default: every device of every process). A subset,
  e.g. `jax.devices()[:1]`, leaves the others to other work in the same process (a tiny model
  also steps faster on one device than split over many); a multi-process run needs them all.
  """
  import orbax.checkpoint as ocp
  from matquant_jax.data import lm

  if config.aot_topology:
    return aot_topology_report(config)
  workdir = pathlib.Path(workdir).absolute()
  if devices is not None and jax.process_count() > 1 and set(devices) != set(jax.devices()):
    raise ConfigError(f"a {jax.process_count()}-process run trains on every device of every "
                      f"process: leave `devices` unset (got {len(devices)} of "
                      f"{jax.device_count()}).")
  setup = resolve(config, devices=devices)
  if not config.aot_only:
    check_inputs(config, setup.model)  # before any file is written
  dcfg = data_config(config)
  workdir.mkdir(parents=True, exist_ok=True)
  log = metrics_lib.MetricsLogger(workdir, setup.num_steps, prefix=config.run_name)
  _write_run_files(config, setup, workdir, log)

  tx, schedule = make_optimizer(config, setup)
  t0 = time.time()
  jitted, compiled, shardings, notes = compile_step(setup, tx, schedule)
  mem = aot.memory_report(compiled)
  log.text(f"compiled the train step in {time.time() - t0:.1f}s; per-device memory: "
           f"{mem.get('peak_estimate_bytes', float('nan')) / 2**20:,.1f} MiB peak estimate")
  for n in notes[:5]:
    log.text(f"  sharding note: {n}")
  if config.aot_only:
    # XLA compiles for the devices this process sees: a TPU topology can only be targeted from
    # a machine with libtpu, so on a pod this mode runs on the workers (launch/tpu_pod.sh aot).
    log.text(f"aot_only: compiled for the local {setup.mesh.size} {jax.default_backend()} "
             f"device(s), mesh {dict(setup.mesh.shape)}; memory per device: " +
             ", ".join(f"{k} {v / 2**20:,.1f} MiB" for k, v in mem.items()))
    log.close()
    return {"aot_only": True, "memory": mem}

  tokenizer = config_lib.resolve_tokenizer(config, workdir, setup.model)
  data_iter = lm.HostBatches(dcfg, tokenizer, split="train", num_shards=data_num_shards(config),
                             process_index=jax.process_index(),
                             process_count=jax.process_count())
  from matquant_jax.checkpoints._common import orbax_whole_shards_on_cpu
  orbax_whole_shards_on_cpu()
  mngr = ocp.CheckpointManager(
      workdir / "checkpoints",
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True),
      item_names=("state", "data"))
  try:
    state = _initial_state(config, setup, tx, shardings, mngr, data_iter, log)
    state, step, last_metrics = _train_loop(config, setup, jitted, state, data_iter, mngr, log)
    mngr.wait_until_finished()
  finally:
    mngr.close()
  summary = {"steps": step, "final_metrics": last_metrics, "memory": mem,
             **_save_final(config, setup, state, step, workdir, log)}
  log.close()
  return summary


def _write_run_files(config, setup: Setup, workdir: pathlib.Path, log) -> None:
  log.text(f"matquant_jax train: {setup.model.name} | {setup.objective.describe()} | "
           f"{setup.num_steps} steps of {setup.global_batch_size}×{setup.seq_len} tokens | "
           f"mesh {dict(setup.mesh.shape)} | {setup.mesh.size} {jax.default_backend()} devices")
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    # The architecture itself, so run:<workdir> works whatever config.model said ('auto').
    (workdir / "model_config.json").write_text(json.dumps(setup.model.to_dict(), indent=2))


def _initial_state(config, setup: Setup, tx, shardings, mngr, data_iter, log) -> TrainState:
  """The latest checkpoint's state (and the data iterator's position), else a fresh state."""
  import orbax.checkpoint as ocp
  latest = mngr.latest_step()
  if latest is not None:
    abstract_state = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=s.sharding),
        _abstract_state(setup, tx, shardings))
    restored = mngr.restore(latest, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    data_iter.set_state(restored["data"])
    log.text(f"resumed from {mngr.directory} at step {latest}")
    return restored["state"]
  params = initial_params(config, setup, shardings.params, jax.random.key(config.seed))
  opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
  return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), shardings.step),
                    params=params, opt_state=opt_state)


def _train_loop(config, setup: Setup, jitted, state: TrainState, data_iter, mngr, log):
  """Steps to config's end (or the data's); logs every log_every_steps, checkpoints every
  checkpoint_every_steps. Returns (state, step, last logged metrics)."""
  import orbax.checkpoint as ocp
  flops_per_step = (metrics_lib.train_flops_per_token(setup.model, setup.seq_len) *
                    setup.global_batch_size * setup.seq_len * max(len(setup.objective.bits), 1))
  peak = config.peak_flops_per_device or metrics_lib.peak_flops_per_device()
  bsh = sharding_lib.batch_sharding(setup.mesh)
  step = int(state.step)
  pending = None  # (step, metrics) of the last dispatched step, checked one step later
  window_start, window_steps = time.time(), 0
  last_metrics: dict[str, float] = {}
  while step < setup.num_steps:
    try:
      batch = next(data_iter)
    except StopIteration:
      log.text(f"data exhausted after step {step} (num_epochs/max_tokens); stopping early.")
      break
    state, m = jitted(state, _to_global(batch, bsh))
    step += 1
    window_steps += 1
    if pending is not None:
      _check_finite(*pending)
    pending = (step, m)
    if step % config.log_every_steps == 0 or step == setup.num_steps:
      _check_finite(step, m)
      host = {k: float(v) for k, v in jax.device_get(m).items() if k != "finite"}
      dt = time.time() - window_start
      host["step_time_s"] = dt / window_steps
      host["tokens_per_s"] = setup.global_batch_size * setup.seq_len * window_steps / dt
      if peak:
        host["mfu"] = flops_per_step * window_steps / dt / (peak * setup.mesh.size)
      log.log(step, host)
      last_metrics = host
      window_start, window_steps = time.time(), 0
    if step % config.checkpoint_every_steps == 0 or step == setup.num_steps:
      _check_finite(step, m)
      mngr.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=ocp.args.JsonSave(gather_data_state(data_iter.get_state()))))
  if pending is not None:
    _check_finite(*pending)
  return state, step, last_metrics


def _save_final(config, setup: Setup, state: TrainState, step: int, workdir: pathlib.Path,
                log) -> dict[str, str]:
  """final_params (per-layer layout, what every reader and the export take) and, unless the
  objective is bf16, the int8 MatQuant checkpoint."""
  import orbax.checkpoint as ocp
  from matquant_jax.checkpoints.matquant_checkpoint import export_matquant_checkpoint
  final = workdir / "final_params"
  ckptr = ocp.StandardCheckpointer()
  final_params = state.params
  if setup.scan_layers:
    final_params = jax.jit(lambda p: transformer_lib.unstack_layers(p, setup.model),
                           out_shardings=param_shardings(setup, scan_layers=False)[0])(
                               state.params)
  ckptr.save(final, final_params, force=True)
  ckptr.wait_until_finished()
  out = {"final_params": str(final)}
  if config.export and setup.objective.method != "bf16":
    path = export_matquant_checkpoint(
        workdir / "matquant_int8", setup.model, final_params, scope=setup.objective.scope,
        parent_bits=setup.objective.parent_bits, overwrite=True,
        metadata={"objective": setup.objective.describe(), "steps": step,
                  "extra_precision": setup.objective.extra_precision,
                  "config": json.loads(config.to_json_best_effort())})
    log.text(f"exported the int8 MatQuant checkpoint to {path}")
    out["export"] = str(path)
  return out


def aot_topology_report(config: ml_collections.ConfigDict, *,
                        with_cost: bool = True) -> dict[str, Any]:
  """Compiles the train step for `config.aot_topology` (e.g. "v5e:8x8") and reports it.

  No TPU is needed, only libtpu (training/aot.py). Returns the report (aot.compile_report's
  fields plus the run's shape); a step that does not fit has fits=False, not an exception.
  with_cost=False skips the unrolled compiles behind the cost fields (they then count loop
  bodies once: cost_from "scanned"); memory figures are the same.
  """
  if not config.aot_only:
    raise ConfigError(f"config.aot_topology={config.aot_topology!r} compiles for a topology "
                      f"this host does not have: add --config.aot_only=True.")
  try:
    devices = aot.topology_devices(config.aot_topology)
  except aot.TopologyError as e:
    raise ConfigError(f"config.aot_topology: {e}") from None
  setup = resolve(config, devices=devices)
  tx, schedule = make_optimizer(config, setup)
  passes = max(len(setup.objective.bits), 1)
  model_flops = (metrics_lib.train_flops_per_token(setup.model, setup.seq_len) *
                 setup.global_batch_size * setup.seq_len * passes / len(devices))
  return aot.compile_report(
      lambda: compile_step(setup, tx, schedule)[1], devices, model_flops,
      cost_fn=(lambda: _unrolled_cost(config, setup)) if with_cost else None,
      cost_label="unrolled" if not setup.scan_layers else "unrolled, depth-extrapolated",
      topology=config.aot_topology, mesh=dict(setup.mesh.shape), model=setup.model.name,
      objective=setup.objective.describe(), seq_len=setup.seq_len,
      global_batch_size=setup.global_batch_size, scan_layers=setup.scan_layers,
      remat=setup.remat, loss_chunk_size=setup.loss_chunk_size)


def _unrolled_cost(config, setup: Setup) -> dict[str, float]:
  """XLA's cost of the step with every scan unrolled (aot.compile_report's cost_fn).

  XLA counts a loop body once. With scanned layers, the unrolled step is compiled for the model
  cut to 1 and 2 layer groups and extrapolated linearly to the full depth (aot.cost_dict); the
  loss-chunk loop stays a loop and its other chunks are added from a compile at half the chunk.
  """
  unrolled = dataclasses.replace(setup, unroll_scans=True)
  if not setup.scan_layers:
    programs = [unrolled]
  else:
    period = transformer_lib.layer_period(setup.model)
    groups = setup.model.num_layers // period
    programs = [dataclasses.replace(unrolled, model=setup.model.replace(num_layers=g * period))
                for g in (1, 2)]
  first = programs[0]
  # The loss-chunk loop stays a loop (counted once): add the other chunks. A chunk's cost is
  # linear in its length, so halving it measures half a chunk.
  c = setup.loss_chunk_size and objectives_lib.chunk_length(setup.seq_len, setup.loss_chunk_size)
  add_chunks = bool(c and setup.seq_len // c > 1 and c % 2 == 0)
  if add_chunks:
    programs.append(dataclasses.replace(first, loss_chunk_size=c // 2))

  kernels = _kernel_costs(setup)

  def cost(s):
    return aot.cost_dict(compile_step(s, *make_optimizer(config, s))[1], kernels)

  # XLA compiles without the GIL: the (independent) programs compile side by side.
  with concurrent.futures.ThreadPoolExecutor(min(len(programs), os.cpu_count() or 1)) as pool:
    costs = list(pool.map(cost, programs))
  if not setup.scan_layers:
    total = costs[0]
  else:
    total = aot.extrapolate_depth(costs[0], costs[1], groups)
  if add_chunks:
    full, half = costs[0], costs[-1]
    total = {k: total[k] + (setup.seq_len // c - 1) * 2 * (full[k] - half[k])
             for k in total if k in half}
    if "optimal_seconds" in total and min(full.get("optimal_seconds", -1),
                                          half.get("optimal_seconds", -1)) <= 0:
      total.pop("optimal_seconds")
  return total


def _kernel_costs(setup: Setup) -> dict[str, dict[str, float]] | None:
  """Per-call cost of the Pallas kernels in the step, for aot.cost_dict (None: no kernels)."""
  if setup.attention_kernel != "splash":
    return None
  shape = setup.mesh.shape
  model = setup.model
  windows = [model.sliding_window if model.is_local(i) else None
             for i in range(model.num_layers)]
  return splash_lib.kernel_costs(
      batch=setup.global_batch_size // (shape["data"] * shape["fsdp"]),
      heads=model.num_heads // shape["tensor"], seq_len=setup.seq_len,
      head_dim=model.head_dim, windows=windows)


def _abstract_state(setup: Setup, tx, shardings: TrainState) -> TrainState:
  shapes = transformer_lib.param_shapes(setup.model, scan_layers=setup.scan_layers)
  params = jax.tree_util.tree_map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, jnp.float32, sharding=sh), shapes,
      shardings.params)
  opt = jax.eval_shape(tx.init, params)
  opt = jax.tree_util.tree_map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                               opt, shardings.opt_state)
  return TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=shardings.step),
                    params=params, opt_state=opt)


def _check_finite(step: int, metrics) -> None:
  if not bool(metrics["finite"]):
    loss = float(metrics["loss"])
    gnorm = float(metrics["grad_norm"])
    raise FloatingPointError(
        f"training diverged at step {step}: loss={loss}, grad_norm={gnorm} (non-finite). "
        f"The last checkpoint before it is intact; lower optimizer.peak_lr, set "
        f"optimizer.grad_clip_norm, or check the data, then rerun to resume from it.")
