"""Device memory of block calibration: an analytic budget and XLA's analysis of the step.

The accelerator holds, during a step (everything else stays in host memory):
  * the block's frozen weights (float32 on the device; the LET fold and fake-quant make
    float32 temporaries of the quantized kernels);
  * the learnable state: LWC logits and LET log-scales, their gradients and two Adam moments
    (float32, 4 copies) — tiny next to the weights;
  * one batch of activations: x (one per width in the quantized input modes) and the target y
    [B, T, D] in the host dtype;
  * the step's working set (attention logits/probs, FFN hidden states, saved residuals for the
    backward pass of one width at a time), which XLA's memory analysis of the compiled step
    measures: `compiled_step_memory` compiles it ahead of time from shapes alone (no weights
    are allocated), for any model size and mesh.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from matquant_jax.calibration import block as block_lib
from matquant_jax.calibration import config as config_lib
from matquant_jax.calibration import transform
from matquant_jax.checkpoints import _common
from matquant_jax.models.config import TransformerConfig
from matquant_jax.training import aot

_BYTES = {"float32": 4, "bfloat16": 2}


def block_param_shapes(model: TransformerConfig, layer: int = 0) -> dict[str, Any]:
  """One layer's parameter tree as {name: shape} (nested like the model's `layer_i`)."""
  prefix = f"layer_{layer}/"
  flat = {k[len(prefix):]: v for k, v in _common.expected_param_shapes(model).items()
          if k.startswith(prefix)}
  return _common.unflatten_tree(flat)


def calib_state_count(model: TransformerConfig, options: transform.CalibOptions) -> int:
  """Number of learnable values of one block (LWC logits + LET log-scales)."""
  tree = transform.init_calib_params(model, options)
  return int(sum(np.size(x) for x in jax.tree_util.tree_leaves(tree)))


def analytic_budget(setup: config_lib.CalibSetup) -> dict[str, float]:
  """Bytes per device of the resident parts (weights, learnable state, one batch).

  Per device: the batch is split over the data-parallel devices, weights and state are
  replicated. The step's working set is not included (see `compiled_step_memory`).
  """
  model = setup.model
  n_block = sum(math.prod(s) for s in _common.flatten_tree(block_param_shapes(model)).values())
  n_state = calib_state_count(model, setup.step.calib)
  dp = int(np.prod(list(setup.mesh.shape.values())))
  streams = len(setup.objective.bits) if setup.step.input_mode != "fp" else 1
  act = (streams + 1) * setup.batch_size * setup.seq_len * model.embed_dim * _BYTES[
      setup.host_dtype] / dp
  out = {
      "block_params_bytes": 4.0 * n_block,
      "calib_state_bytes": 4.0 * 4 * n_state,   # params, grads, Adam mu and nu
      "activation_batch_bytes": float(act),
      "block_params": float(n_block),
      "calib_params": float(n_state),
  }
  out["resident_bytes"] = (out["block_params_bytes"] + out["calib_state_bytes"] +
                           out["activation_batch_bytes"])
  return out


def host_budget(setup: config_lib.CalibSetup, host_param_dtype: str = "float32"
                ) -> dict[str, float]:
  """Host memory: the model's weights and the calibration activations (X, Y, streams)."""
  model = setup.model
  n_params = sum(math.prod(s) for s in _common.expected_param_shapes(model).values())
  streams = {"fp": 0, "quantized": len(setup.objective.bits), "quantized_shared": 1}[
      setup.step.input_mode]
  one = setup.num_samples * setup.seq_len * model.embed_dim * _BYTES[setup.host_dtype]
  return {"model_params_bytes": float(n_params * _BYTES[host_param_dtype]),
          "activations_bytes": float((2 + streams) * one)}


def abstract_step_args(setup: config_lib.CalibSetup, fns: block_lib.BlockFunctions,
                       layer: int = 0):
  """ShapeDtypeStructs (with shardings) of the train step's arguments: nothing allocated."""
  model = setup.model
  rep = fns.replicated
  bp = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(tuple(s), jnp.float32, sharding=rep),
                              block_param_shapes(model, layer),
                              is_leaf=lambda x: isinstance(x, tuple))
  calib = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=rep),
      transform.init_calib_params(model, setup.step.calib))
  opt = jax.eval_shape(fns.init_opt, calib)
  opt = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep),
                               opt)
  hdt = jnp.bfloat16 if setup.host_dtype == "bfloat16" else jnp.float32
  b, t, d = setup.batch_size, setup.seq_len, model.embed_dim
  if setup.step.input_mode != "fp":
    x = jax.ShapeDtypeStruct((len(setup.objective.bits), b, t, d), hdt,
                             sharding=fns.stacked_sharding)
  else:
    x = jax.ShapeDtypeStruct((b, t, d), hdt, sharding=fns.batch_sharding)
  batch = {"x": x, "y": jax.ShapeDtypeStruct((b, t, d), hdt, sharding=fns.batch_sharding),
           "positions": jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=fns.batch_sharding),
           "segment_ids": jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=fns.batch_sharding)}
  width_scale = jax.ShapeDtypeStruct((len(setup.objective.bits),), jnp.float32, sharding=rep)
  return calib, opt, bp, batch, width_scale


def compiled_step_memory(setup: config_lib.CalibSetup, layer: int = 0) -> dict[str, float]:
  """XLA's per-device memory analysis of the compiled block step (compile only).

  Returns aot.memory_report's keys: argument/output/temp/alias sizes and
  'peak_estimate_bytes' = arguments + outputs − aliased + temporaries.
  """
  fns = block_lib.block_functions(setup.model, layer, setup.objective, setup.step, setup.mesh)
  compiled = fns.train_step.lower(*abstract_step_args(setup, fns, layer)).compile()
  return aot.memory_report(compiled)


def report(setup: config_lib.CalibSetup, *, compile_step: bool = True,
           host_param_dtype: str = "float32") -> dict[str, float]:
  """The analytic budget, the host budget and (optionally) XLA's measurement, merged."""
  out = dict(analytic_budget(setup))
  out.update(host_budget(setup, host_param_dtype))
  if compile_step:
    layers = sorted({block_lib.representative_layer(setup.model, i)
                     for i in range(setup.model.num_layers)})
    peaks = {}
    for layer in layers:
      mem = compiled_step_memory(setup, layer)
      kind = "local" if setup.model.is_local(layer) else "global"
      peaks[kind] = mem
    worst = max(peaks.values(), key=lambda m: m.get("peak_estimate_bytes", 0.0))
    out.update({f"xla_{k}": v for k, v in worst.items()})
    for kind, mem in peaks.items():
      out[f"xla_peak_{kind}_bytes"] = mem.get("peak_estimate_bytes", float("nan"))
  return out


def _size(n: float) -> str:
  for unit, scale in (("GiB", 2.0**30), ("MiB", 2.0**20), ("KiB", 2.0**10)):
    if n >= scale:
      return f"{n / scale:,.2f} {unit}"
  return f"{n:,.0f} B"


def format_report(rep: dict[str, float]) -> str:
  """Human-readable lines of `report`."""
  lines = [
      f"device: block params {rep['block_params'] / 1e6:,.2f}M ({_size(rep['block_params_bytes'])}"
      f" f32) + learnable LWC/LET {rep['calib_params'] / 1e3:,.1f}K with grads and Adam "
      f"({_size(rep['calib_state_bytes'])}) + one batch of activations "
      f"({_size(rep['activation_batch_bytes'])}) = {_size(rep['resident_bytes'])} resident "
      f"per device",
      f"host: weights {_size(rep['model_params_bytes'])}, calibration activations "
      f"{_size(rep['activations_bytes'])}"]
  if "xla_peak_estimate_bytes" in rep:
    lines.append(
        f"XLA, compiled block step: peak {_size(rep['xla_peak_estimate_bytes'])} per device "
        f"(arguments {_size(rep.get('xla_argument_size_in_bytes', 0))}, temporaries "
        f"{_size(rep.get('xla_temp_size_in_bytes', 0))})")
  return "\n".join(lines)


def aot_topology_report(config) -> dict[str, Any]:
  """Compiles one block step for `config.aot_topology` (e.g. "v5e:2x2") and reports it.

  training/aot.py's fields. The block step's scans (bit-widths, micro-batches) stay loops and
  XLA's cost analysis counts a loop body once, so every cost figure is for ONE bit-width pass
  of one micro-batch (cost_from "scanned"): model_flops_per_device (forward + backward of one
  layer) and est_mfu are per pass too, and a whole step takes about `passes` times
  cost_model_step_seconds. The model FLOPs use QAT's 6N accounting, although the block step
  computes no weight gradients (only LWC/LET and activation gradients): est_mfu is optimistic.
  """
  from matquant_jax.training import metrics as metrics_lib
  if not config.aot_only:
    raise config_lib.ConfigError(
        f"config.aot_topology={config.aot_topology!r} compiles for a topology this host does "
        f"not have: add --config.aot_only=True.")
  try:
    devices = aot.topology_devices(config.aot_topology)
  except aot.TopologyError as e:
    raise config_lib.ConfigError(f"config.aot_topology: {e}") from None
  setup = config_lib.resolve(config, devices=devices)
  model = setup.model
  used = list(setup.mesh.devices.flat)
  one_layer = model.replace(num_layers=1)
  per_token = (metrics_lib.train_flops_per_token(one_layer, setup.seq_len) -
               6.0 * model.embed_dim * model.vocab_size)
  micro = setup.batch_size // setup.step.num_microbatches
  model_flops = per_token * micro * setup.seq_len / len(used)
  passes = len(setup.objective.bits) * setup.step.num_microbatches
  fns = block_lib.block_functions(model, 0, setup.objective, setup.step, setup.mesh)
  return aot.compile_report(
      lambda: fns.train_step.lower(*abstract_step_args(setup, fns, 0)).compile(), used,
      model_flops, topology=config.aot_topology, mesh=dict(setup.mesh.shape),
      model=model.name, objective=setup.objective.describe(), seq_len=setup.seq_len,
      batch_size=setup.batch_size, passes=passes,
      step="one calibration block step (layer 0); costs per pass")
