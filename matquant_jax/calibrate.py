"""Command line: OmniQuant-based MatQuant calibration (or a baseline) from an experiment config.

    python -m matquant_jax.calibrate --config=configs/tiny_omniquant.py [--workdir=runs/x] \
        [--config.calibration.steps_per_block=200 --config.objective.method=baseline \
         --config.objective.bits=(2,)]
    python -m matquant_jax.calibrate --config=configs/omniquant_matquant.py:gemma2_9b \
        --config.init=gemma:/ckpts/gemma2-9b --config.tokenizer=/ckpts/tokenizer.model

Progress is printed per block (reconstruction error per bit-width: plain MinMax, initial and
calibrated) and logged to <workdir>/tensorboard and <workdir>/metrics.jsonl. Rerunning the same
command resumes after the last finished block. `--config.aot_only=True` compiles one block step
for this host's devices and prints the memory budget without loading weights or data. The
result is <workdir>/matquant_int8, the same int8 MatQuant checkpoint QAT exports.
"""

from __future__ import annotations

import json
import os
import pathlib

from absl import flags
from ml_collections import config_flags

from matquant_jax import cli

FLAGS = flags.FlagValues()  # this command's own flags (see train.py)
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/omniquant_*.py, configs/tiny_omniquant.py) "
    "with --config.<field>=<value> overrides.", lock_config=True, flag_values=FLAGS)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where per-block results, logs and the export go (default: "
    "runs/<config name>).", flag_values=FLAGS)


def _multi_process_env() -> bool:
  """True when the environment asks for several JAX processes (pod workers, SLURM tasks)."""
  try:
    procs = int(os.environ.get("JAX_NUM_PROCESSES") or os.environ.get("SLURM_NTASKS") or 1)
  except ValueError:
    procs = 1
  return procs > 1 or bool(os.environ.get("JAX_COORDINATOR_ADDRESS")) or (
      os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0)


def main(argv: list[str] | None = None) -> int:
  """The command: `argv` is the command line after the program name (default sys.argv[1:])."""
  cli.parse_config_flags(FLAGS, argv, "calibrate")
  import jax
  from matquant_jax.calibration import pipeline
  config = _CONFIG.value
  if config is None:
    return cli.error("calibrate", "pass --config=configs/<experiment>.py")
  if _multi_process_env():
    return cli.error("calibrate", "calibration runs as one process (it streams one block at a "
                     "time through the local devices); this environment describes a "
                     "multi-process run. Run it on one host only (on a TPU pod: worker 0, e.g. "
                     "gcloud compute tpus tpu-vm ssh NAME --worker=0), or unset "
                     "JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES.")
  workdir = _WORKDIR.value or str(pathlib.Path("runs") / pathlib.Path(
      config_flags.get_config_filename(FLAGS["config"])).stem)
  try:
    summary = pipeline.run(config, workdir)
  except cli.user_errors() as e:  # ConfigError (QAT and calibration), checkpoint errors, ...
    return cli.report(e, "calibrate")
  except FloatingPointError as e:
    return cli.error("calibrate", e, code=3)
  if jax.process_index() == 0:
    print(json.dumps({"workdir": workdir, **{k: v for k, v in summary.items()
                                             if k not in ("memory", "block_metrics")}},
                     default=str))
  return 0


if __name__ == "__main__":
  cli.run_main(main)
