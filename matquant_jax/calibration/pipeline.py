"""A calibration run from an experiment config: weights, data, blocks, export.

    summary = run(config, workdir)      # what `python -m matquant_jax.calibrate` does

Rerunning the same command in the same workdir resumes after the last finished block.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np

from matquant_jax.calibration import calibrator
from matquant_jax.calibration import config as config_lib
from matquant_jax.calibration import memory
from matquant_jax.models import transformer as transformer_lib
from matquant_jax.models.config import TransformerConfig
from matquant_jax.training import metrics as metrics_lib
from matquant_jax.training.config import resolve_tokenizer


def calibration_tokens(config: ml_collections.ConfigDict, tokenizer) -> dict[str, np.ndarray]:
  """`data.num_samples` rows of `data.seq_len` tokens from the LM pipeline (host numpy).

  Documents are shuffled with `data.seed`, tokenized, concatenated and split into full rows
  (data/lm.py); a row may hold pieces of several documents, which attend only within their own
  segment. The corpus repeats if it is shorter than the sample (tiny corpora only).
  """
  from matquant_jax.data import lm
  d = config.data
  dcfg = lm.DataConfig(
      source=d.source, tfds_data_dir=d.tfds_data_dir or None, train_split=d.train_split,
      seq_len=int(d.seq_len), global_batch_size=int(d.num_samples), seed=int(d.seed),
      num_epochs=None, max_tokens=int(d.num_samples) * int(d.seq_len),
      add_bos=bool(d.add_bos), add_eos=bool(d.add_eos))
  batch = next(lm.make_lm_dataset(dcfg, tokenizer, split="train"))
  return {k: np.asarray(batch[k], np.int32) for k in ("inputs", "positions", "segment_ids")}


def host_params(config: ml_collections.ConfigDict, model: TransformerConfig,
                dtype: str = "float32") -> dict[str, Any]:
  """The weights to calibrate, in host memory (numpy), never on the accelerator as a whole."""
  np_dtype = calibrator.HOST_DTYPES[dtype]
  spec = config.init
  cpu = jax.local_devices(backend="cpu")[0]
  if spec == "random":
    with jax.default_device(cpu):
      params = transformer_lib.init_params(model, jax.random.key(config.seed))
    return jax.tree_util.tree_map(lambda x: np.asarray(x, np_dtype), params)
  from matquant_jax.checkpoints import weight_source
  try:
    return weight_source.load(spec, model, dtype=np_dtype)[1]
  except (ValueError, FileNotFoundError) as e:
    raise config_lib.ConfigError(f"config.init={spec!r}: {e}") from None


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
  """Calibrates (or resumes, or with aot_only just compiles) and exports; returns a summary."""
  if config.aot_topology:
    return memory.aot_topology_report(config)
  workdir = pathlib.Path(workdir).absolute()
  setup = config_lib.resolve(config)
  if not config.aot_only:
    from matquant_jax.training.config import check_inputs
    check_inputs(config, setup.model)
  workdir.mkdir(parents=True, exist_ok=True)
  total = setup.model.num_layers * setup.steps_per_block
  log = metrics_lib.MetricsLogger(workdir, total, prefix=config.run_name)
  try:
    log.text(f"matquant_jax calibrate: {setup.describe()} | {jax.device_count()} "
             f"{jax.default_backend()} devices")
    t0 = time.time()
    rep = memory.report(setup, host_param_dtype=config.calibration.host_param_dtype)
    log.text(f"memory (compiled in {time.time() - t0:.1f}s):\n" + memory.format_report(rep))
    if config.aot_only:
      return {"aot_only": True, "memory": rep}
    if jax.process_index() == 0:
      (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

    tokenizer = resolve_tokenizer(config, workdir, setup.model)
    tokens = calibration_tokens(config, tokenizer)
    pad = float(np.mean(tokens["segment_ids"] == 0))
    if pad > 0:
      log.text(f"note: {pad:.1%} of the calibration tokens are padding (corpus too short).")
    params = host_params(config, setup.model, config.calibration.host_param_dtype)
    extra = {"data": config.data.to_dict(), "init": config.init,
             "tokenizer": config.tokenizer}
    result = calibrator.calibrate_blocks(
        setup, params, tokens, workdir=workdir, logger=log,
        stop_after_blocks=int(config.stop_after_blocks), fingerprint_extra=extra)
    summary: dict[str, Any] = {"finished": result.finished,
                               "blocks": len(result.metrics), "memory": rep,
                               "mean": summarize(result.metrics, setup.objective.bits),
                               "block_metrics": {str(k): v for k, v in result.metrics.items()}}
    if result.finished and config.export:
      path = calibrator.export_calibrated(
          workdir / "matquant_int8", setup, params, result,
          metadata={"config": json.loads(config.to_json_best_effort())})
      log.text(f"exported the int8 MatQuant checkpoint to {path}")
      summary["export"] = str(path)
    return summary
  finally:
    log.close()


def summarize(metrics: Mapping[int, Mapping[str, float]], bits) -> dict[str, float]:
  """Mean over layers of the normalized errors before (MinMax, init) and after calibration."""
  out = {}
  for r in bits:
    for name in ("minmax", "init", "final"):
      vals = [m[f"nmse_{name}_int{r}"] for m in metrics.values()]
      out[f"nmse_{name}_int{r}"] = float(np.mean(vals)) if vals else float("nan")
  return out
