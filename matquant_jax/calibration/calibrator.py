"""Block-by-block OmniQuant calibration with MatQuant's objective, resumable, host-streamed.

    setup = config.resolve(cfg)                      # validated, nothing compiled
    result = calibrate_blocks(setup, params, tokens, workdir=...)
    export_calibrated(path, setup, params, result)   # the int8 MatQuant checkpoint

Memory. The model's weights and every calibration activation live in host memory (NumPy):
X_l [N, T, D] (plus one stream per width of R in "quantized" input mode) and the block's
full-precision outputs Y_l. Only the block being calibrated (its weights, the LWC/LET state and
its Adam moments) and one batch of activations are on the devices; a batch is copied to the
devices per step (asynchronously: the next copy overlaps the running step). Blocks run in
sequence; one block's steps are data-parallel over the mesh.

Order of work for layer l:
  1. Y_l = F_l(W, X_l) over the calibration set (also the next layer's input in "fp" mode);
  2. errors of plain MinMax and of the initial LWC/LET state, per width;
  3. steps_per_block AdamW steps over batches drawn epoch by epoch in a seeded order;
  4. errors after calibration; the learned state and metrics are saved to
     <workdir>/calibration/layer_<l>.npz and progress.json (atomic renames);
  5. "quantized" mode: X_{l+1}^r = F_l(S(Q_Omni(W'), r), X_l^r) for every r.
A rerun with the same config finds the finished blocks, recomputes the activations up to the
first unfinished block with the same compiled forwards (bitwise the same values as the
uninterrupted run), and continues.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from matquant_jax.calibration import block as block_lib
from matquant_jax.calibration import config as config_lib
from matquant_jax.calibration import transform
from matquant_jax.checkpoints import _common
from matquant_jax.models import layers
from matquant_jax.models.config import TransformerConfig

HOST_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
PROGRESS_FILE = "progress.json"


@dataclasses.dataclass
class CalibrationResult:
  """What calibration learned.

  Attributes:
    calib: layer index -> learnable state (numpy tree, transform.init_calib_params layout).
    metrics: layer index -> per-block metrics (errors per width before/after, timings).
    finished: every layer is calibrated (False after `stop_after_blocks`).
  """
  calib: dict[int, dict[str, Any]]
  metrics: dict[int, dict[str, float]]
  finished: bool


def sample_order(num_samples: int, batch_size: int, steps: int, seed: int, layer: int
                 ) -> np.ndarray:
  """[steps, batch_size] sample indices: consecutive epochs, each a fresh permutation."""
  rng = np.random.default_rng([seed, layer])
  per_epoch = num_samples // batch_size
  epochs = -(-steps // per_epoch)
  idx = np.concatenate([rng.permutation(num_samples)[: per_epoch * batch_size]
                        for _ in range(epochs)])
  return idx[: steps * batch_size].reshape(steps, batch_size)


def _flatten(tree) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in _common.flatten_tree(tree).items()}


def _unflatten_calib(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
  tree = _common.unflatten_tree(dict(flat))
  tree.setdefault("lwc", {})
  tree.setdefault("let", {})
  return tree


def _atomic_write(path: pathlib.Path, write) -> None:
  tmp = path.with_name(path.name + ".tmp")
  write(tmp)
  os.replace(tmp, path)


class _Store:
  """Per-block results in <workdir>/calibration: layer_<i>.npz + progress.json."""

  def __init__(self, workdir: pathlib.Path | None, fingerprint: Mapping[str, Any]):
    self.dir = None if workdir is None else pathlib.Path(workdir) / "calibration"
    self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
    self.progress: dict[str, Any] = {"fingerprint": self.fingerprint, "blocks": {}}
    if self.dir is None:
      return
    pfile = self.dir / PROGRESS_FILE
    if pfile.exists():
      stored = json.loads(pfile.read_text())
      if stored.get("fingerprint") != self.fingerprint:
        diff = sorted(k for k in set(stored.get("fingerprint", {})) | set(self.fingerprint)
                      if stored.get("fingerprint", {}).get(k) != self.fingerprint.get(k))
        raise config_lib.ConfigError(
            f"{self.dir} holds calibration results of a different run (differs in: "
            f"{', '.join(diff)}); use another --workdir or delete {self.dir} to start over.")
      self.progress = stored

  def finished(self) -> int:
    """Number of leading layers whose results are saved."""
    n = 0
    while str(n) in self.progress["blocks"] and (self.dir / f"layer_{n}.npz").exists():
      n += 1
    return n

  def load(self, layer: int) -> tuple[dict[str, Any], dict[str, float]]:
    with np.load(self.dir / f"layer_{layer}.npz", allow_pickle=False) as z:
      calib = _unflatten_calib({k: z[k] for k in z.files})
    return calib, self.progress["blocks"][str(layer)]

  def save(self, layer: int, calib, metrics: Mapping[str, float]) -> None:
    self.progress["blocks"][str(layer)] = dict(metrics)
    if self.dir is None or jax.process_index() != 0:
      return
    self.dir.mkdir(parents=True, exist_ok=True)

    def write_npz(tmp):
      with open(tmp, "wb") as f:
        np.savez(f, **_flatten(calib))
    _atomic_write(self.dir / f"layer_{layer}.npz", write_npz)
    _atomic_write(self.dir / PROGRESS_FILE,
                  lambda tmp: tmp.write_text(json.dumps(self.progress, indent=1)))


def _block_params_to_device(params: Mapping[str, Any], layer: int, sharding) -> dict[str, Any]:
  return jax.tree_util.tree_map(
      lambda x: jax.device_put(np.asarray(x, np.float32), sharding), dict(params[f"layer_{layer}"]))


def embed_tokens(model: TransformerConfig, embedder_params: Mapping[str, Any],
                 tokens: np.ndarray, *, batch_size: int, mesh, host_dtype: str,
                 compute_dtype: str = "float32") -> np.ndarray:
  """X_0 [N, T, D] in host memory: the embedded calibration tokens (×sqrt(D) for Gemma)."""
  dtype = jnp.bfloat16 if compute_dtype == "bfloat16" else jnp.float32
  emb = layers.Embedder(config=model, dtype=dtype)
  sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(block_lib.BATCH_AXES))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  fn = jax.jit(lambda p, t: emb.apply({"params": p}, t, method="encode"), out_shardings=sh)
  p = jax.tree_util.tree_map(lambda x: jax.device_put(np.asarray(x, np.float32), rep),
                             dict(embedder_params))
  n, t = tokens.shape
  out = np.empty((n, t, model.embed_dim), HOST_DTYPES[host_dtype])
  for s in range(0, n, batch_size):
    out[s:s + batch_size] = np.asarray(fn(p, jax.device_put(tokens[s:s + batch_size], sh)),
                                       out.dtype)
  return out


class _Activations:
  """The host-resident calibration activations and how batches reach the devices."""

  def __init__(self, setup: config_lib.CalibSetup, tokens: Mapping[str, np.ndarray],
               x0: np.ndarray):
    self.setup = setup
    self.positions = np.asarray(tokens["positions"], np.int32)
    self.segment_ids = np.asarray(tokens["segment_ids"], np.int32)
    self.x = x0                                   # [N, T, D] full-precision stream
    self.quantized = setup.step.input_mode != "fp"
    self.shared = setup.step.input_mode == "quantized_shared"
    self.num_widths = len(setup.objective.bits)
    # [S, N, T, D]: one stream per width (S = |R|), or one shared stream (S = 1), all starting
    # from the embeddings.
    streams = 1 if self.shared else self.num_widths
    self.xq = np.stack([x0] * streams) if self.quantized else None

  def batches(self):
    b = self.setup.batch_size
    for s in range(0, self.setup.num_samples, b):
      yield np.arange(s, min(s + b, self.setup.num_samples))

  def device_batch(self, fns: block_lib.BlockFunctions, idx: np.ndarray, y: np.ndarray | None):
    """One batch on the devices, in the step's layout (sorted indices read memory in order)."""
    idx = np.sort(idx)
    batch = {
        "positions": jax.device_put(self.positions[idx], fns.batch_sharding),
        "segment_ids": jax.device_put(self.segment_ids[idx], fns.batch_sharding),
    }
    if self.quantized:
      x = self.xq[:, idx]
      if self.shared:  # every width reads the one stream
        x = np.broadcast_to(x, (self.num_widths,) + x.shape[1:])
      batch["x"] = jax.device_put(x, fns.stacked_sharding)
    else:
      batch["x"] = jax.device_put(self.x[idx], fns.batch_sharding)
    if y is not None:
      batch["y"] = jax.device_put(y[idx], fns.batch_sharding)
    return batch


def _forward_fp(fns, bp, acts: _Activations) -> tuple[np.ndarray, float]:
  """Y = F_l(W, X) over the calibration set, and mean((Y − X)²) (the block's own signal)."""
  y = np.empty_like(acts.x)
  sse = 0.0
  tokens = 0.0
  for idx in acts.batches():
    out, e = fns.fp_forward(bp, jax.device_put(acts.x[idx], fns.batch_sharding),
                            jax.device_put(acts.positions[idx], fns.batch_sharding),
                            jax.device_put(acts.segment_ids[idx], fns.batch_sharding))
    y[idx] = np.asarray(out, y.dtype)
    sse += float(e)
    tokens += float(np.sum(acts.segment_ids[idx] != 0))
  return y, sse / max(tokens * y.shape[-1], 1.0)


def _propagate_quantized(fns, bp, calib, acts: _Activations, bits: tuple[int, ...]) -> None:
  """X_{l+1}^r = F_l(S(Q_Omni(W'), r), X_l^r) for every stream: one per width ("quantized"),
  or the narrowest width's alone ("quantized_shared")."""
  dev_calib = jax.device_put(calib, fns.replicated)
  for i, r in enumerate([min(bits)] if acts.shared else bits):
    for idx in acts.batches():
      out = fns.quant_forward(bp, dev_calib, jax.device_put(acts.xq[i, idx], fns.batch_sharding),
                              jax.device_put(acts.positions[idx], fns.batch_sharding),
                              jax.device_put(acts.segment_ids[idx], fns.batch_sharding),
                              jnp.asarray(r, jnp.int32))
      acts.xq[i, idx] = np.asarray(out, acts.xq.dtype)


def _evaluate(fns, bp, calib, acts: _Activations, y: np.ndarray) -> np.ndarray:
  """Mean squared error per width of R over the whole calibration set."""
  dev_calib = jax.device_put(calib, fns.replicated)
  sse, count = 0.0, 0.0
  for idx in acts.batches():
    s, c = fns.evaluate(bp, dev_calib, acts.device_batch(fns, idx, y))
    sse = sse + np.asarray(s, np.float64)
    count += float(c)
  return np.asarray(sse) / max(count, 1.0)


def calibrate_blocks(setup: config_lib.CalibSetup, params: Mapping[str, Any],
                     tokens: Mapping[str, np.ndarray], *, workdir: str | pathlib.Path | None = None,
                     logger=None, stop_after_blocks: int = 0,
                     fingerprint_extra: Mapping[str, Any] | None = None) -> CalibrationResult:
  """Calibrates every layer in sequence (resuming finished ones from `workdir`).

  Args:
    setup: from config.resolve.
    params: the model's parameter tree in host memory (numpy; never modified).
    tokens: 'inputs', 'positions', 'segment_ids' [num_samples, seq_len] int32.
    workdir: where per-block results go; None keeps nothing on disk (no resume).
    logger: a training.metrics.MetricsLogger (console, TensorBoard, JSONL), or None.
    stop_after_blocks: > 0 stops after that many blocks are finished (in total).
    fingerprint_extra: more settings a resumed run must share (data source, weights).

  Returns:
    The learned state and metrics of every finished layer.
  """
  model, objective = setup.model, setup.objective
  n_layers = model.num_layers
  for k in ("inputs", "positions", "segment_ids"):
    if np.shape(tokens[k]) != (setup.num_samples, setup.seq_len):
      raise ValueError(f"tokens[{k!r}] has shape {np.shape(tokens[k])}; the setup expects "
                       f"[num_samples, seq_len] = [{setup.num_samples}, {setup.seq_len}].")
  store = _Store(workdir, {**setup.fingerprint(), **dict(fingerprint_extra or {})})
  start = store.finished()
  say = logger.text if logger is not None else (lambda s: None)
  if start:
    say(f"resuming: layers 0..{start - 1} are calibrated in {store.dir}")

  x0 = embed_tokens(model, params["embedder"], np.asarray(tokens["inputs"], np.int32),
                    batch_size=setup.batch_size, mesh=setup.mesh, host_dtype=setup.host_dtype,
                    compute_dtype=setup.step.compute_dtype)
  acts = _Activations(setup, tokens, x0)
  result = CalibrationResult(calib={}, metrics={}, finished=False)
  bits = objective.bits
  total_steps = n_layers * setup.steps_per_block

  for layer in range(n_layers):
    if stop_after_blocks and layer >= stop_after_blocks:
      say(f"stopping after {layer} blocks (stop_after_blocks); rerun to resume.")
      return result
    t0 = time.time()
    fns = block_lib.block_functions(model, layer, objective, setup.step, setup.mesh)
    bp = _block_params_to_device(params, layer, fns.replicated)
    y, energy = _forward_fp(fns, bp, acts)

    if layer < start:
      calib, metrics = store.load(layer)
    else:
      calib, metrics = _calibrate_one(setup, fns, bp, acts, y, energy, layer, logger,
                                      total_steps)
      metrics["seconds"] = time.time() - t0
      store.save(layer, calib, metrics)
      say(_block_line(layer, n_layers, model, bits, metrics))
    result.calib[layer] = calib
    result.metrics[layer] = metrics

    if acts.quantized:
      _propagate_quantized(fns, bp, calib, acts, bits)
    acts.x = y  # the next layer's full-precision input
    del bp
  result.finished = True
  return result


def _calibrate_one(setup, fns, bp, acts, y, energy, layer, logger, total_steps):
  model, objective = setup.model, setup.objective
  bits = objective.bits
  init = transform.init_calib_params(model, setup.step.calib)
  mse_minmax = _evaluate(fns, bp, transform.minmax_calib_params(model, setup.step.calib), acts, y)
  mse_init = _evaluate(fns, bp, init, acts, y)

  calib = jax.device_put(init, fns.replicated)
  opt_state = fns.init_opt(calib)
  width_scale = jax.device_put(_width_scale(setup.step, mse_minmax), fns.replicated)
  order = sample_order(setup.num_samples, setup.batch_size, setup.steps_per_block, setup.seed,
                       layer)
  first_loss = None
  last = None
  host: dict[str, float] = {}
  for s in range(setup.steps_per_block):
    batch = acts.device_batch(fns, order[s], y)
    calib, opt_state, m = fns.train_step(calib, opt_state, bp, batch, width_scale)
    step = s + 1
    final_step = step == setup.steps_per_block
    if step % setup.log_every_steps == 0 or final_step or s == 0:
      m = jax.device_get(m)
      if not bool(m["finite"]):
        raise FloatingPointError(
            f"calibration of layer {layer} diverged at step {step}: loss={float(m['loss'])}, "
            f"grad_norm={float(m['grad_norm'])}. Lower calibration.lr or check the weights; "
            f"layers before {layer} are saved and a rerun resumes here.")
      if first_loss is None:
        first_loss = float(m["loss"])
      last = m
      host = {"loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
              "layer": float(layer)}
      for i, r in enumerate(bits):
        host[f"mse_int{r}"] = float(m["mse"][i])
      # The final step is logged below, together with the block's summary.
      if logger is not None and step % setup.log_every_steps == 0 and not final_step:
        logger.log(layer * setup.steps_per_block + step, host)
  calib = jax.tree_util.tree_map(np.asarray, jax.device_get(calib))
  mse_final = _evaluate(fns, bp, calib, acts, y)
  metrics: dict[str, float] = {"block_energy": energy, "loss_first": first_loss,
                               "loss_last": float(last["loss"]) if last is not None else None}
  for i, r in enumerate(bits):
    for name, v in (("minmax", mse_minmax), ("init", mse_init), ("final", mse_final)):
      metrics[f"mse_{name}_int{r}"] = float(v[i])
      metrics[f"nmse_{name}_int{r}"] = float(v[i]) / energy if energy > 0 else float("nan")
  if logger is not None:
    logger.log((layer + 1) * setup.steps_per_block,
               {**host, **{f"block/{k}": v for k, v in metrics.items() if v is not None}})
  return calib, metrics


def _width_scale(step: block_lib.StepOptions, mse_minmax: np.ndarray) -> np.ndarray:
  """Each width's loss multiplier (block.StepOptions.loss_normalization)."""
  if step.loss_normalization == "minmax":
    # A width MinMax already represents exactly (error 0) gets the scale of the smallest
    # nonzero error rather than an infinite one.
    positive = mse_minmax[mse_minmax > 0]
    floor = positive.min() if positive.size else 1.0
    return (1.0 / np.maximum(mse_minmax, floor)).astype(np.float32)
  return np.ones(len(mse_minmax), np.float32)


def _block_line(layer, n_layers, model, bits, m) -> str:
  kind = "local" if model.is_local(layer) else "global"
  parts = [f"block {layer + 1}/{n_layers} ({kind})"]
  for r in bits:
    parts.append(f"int{r} mse {m[f'mse_init_int{r}']:.3e} -> {m[f'mse_final_int{r}']:.3e} "
                 f"(MinMax {m[f'mse_minmax_int{r}']:.3e}, {m[f'nmse_final_int{r}']:.1%} of the "
                 f"block's signal)")
  parts.append(f"{m.get('seconds', 0):.1f}s")
  return " | ".join(parts)


def fold_and_clipping(setup: config_lib.CalibSetup, params: Mapping[str, Any],
                      result: CalibrationResult):
  """(folded params, clipping) of a calibrated model: what the exported codes are made from."""
  folded = transform.fold_model_params(setup.model, params, result.calib)
  return folded, transform.export_clipping(result.calib, setup.step.calib.lwc_max)


def export_calibrated(path: str | pathlib.Path, setup: config_lib.CalibSetup,
                      params: Mapping[str, Any], result: CalibrationResult, *,
                      metadata: Mapping[str, Any] | None = None, overwrite: bool = True,
                      float_dtype: Any = jnp.bfloat16) -> pathlib.Path:
  """Writes the calibrated model as THE int8 MatQuant checkpoint (same format as QAT).

  LET is folded into the weights and norms, and the codes, α, z are computed with the learned
  clipping (Q_Omni, Eq. 3), so MatQuantCheckpoint.params_for(plan) serves every slice and plan
  exactly as for a QAT export. Baselines are stored with parent = their own width r.
  `float_dtype` is the storage dtype of the unquantized params (bf16, as QAT exports).
  """
  from matquant_jax.checkpoints.matquant_checkpoint import export_matquant_checkpoint
  if not result.finished:
    raise ValueError("calibration has not finished every layer; rerun it to resume before "
                     "exporting.")
  folded, clipping = fold_and_clipping(setup, params, result)
  meta = {"objective": setup.objective.describe(), "calibration": "omniquant",
          "extra_precision": setup.objective.extra_precision,
          "let": setup.step.calib.let, "lwc": setup.step.calib.lwc,
          "input_mode": setup.step.input_mode, "steps_per_block": setup.steps_per_block,
          **dict(metadata or {})}
  return export_matquant_checkpoint(
      path, transform.folded_config(setup.model, setup.step.calib), folded,
      scope=setup.objective.scope,
      parent_bits=setup.objective.parent_bits, round_zero=setup.step.calib.round_zero,
      metadata=meta, overwrite=overwrite, clipping=clipping, float_dtype=float_dtype)
