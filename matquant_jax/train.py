"""Command line: train (or resume) a MatQuant / baseline QAT run from an experiment config.

    python -m matquant_jax.train --config=configs/tiny_qat.py [--workdir=runs/tiny_qat] \
        [--config.num_steps=400 --config.objective.method=baseline --config.objective.bits=(4,)]

Rerunning the same command resumes from the workdir's latest checkpoint. `--config.aot_only=True`
compiles the train step for this host's devices and reports its memory without training; with
`--config.aot_topology=v5e:8x8` (needs libtpu, no TPU) it compiles for that TPU topology and
prints one JSON report as the last line (training/aot.py).
On a TPU pod, run the same command on every worker (see launch/); `jax.distributed` is
initialised automatically when the environment describes several processes.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py), with --config.<field>=<value> "
    "overrides.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where checkpoints, logs and exports go (default: runs/<config name>).")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Call jax.distributed.initialize(): auto = when the environment names several processes "
    "(TPU pod workers, SLURM, or JAX_COORDINATOR_ADDRESS).")


def _multi_process_env() -> bool:
  return any(os.environ.get(k) for k in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS")) or (
      os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0)


def main(argv) -> int:
  del argv
  import jax
  if _DISTRIBUTED.value == "on" or (_DISTRIBUTED.value == "auto" and _multi_process_env()):
    jax.distributed.initialize()
  from matquant_jax.training import trainer
  config = _CONFIG.value
  if config is None:
    print("error: pass --config=configs/<experiment>.py", file=sys.stderr)
    return 2
  workdir = _WORKDIR.value or str(pathlib.Path("runs") /
                                  pathlib.Path(config_flags.get_config_filename(
                                      flags.FLAGS["config"])).stem)
  try:
    summary = trainer.train(config, workdir)
  except trainer.ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    return 2
  except FloatingPointError as e:
    print(f"error: {e}", file=sys.stderr)
    return 3
  if jax.process_index() == 0:
    print(json.dumps({"workdir": workdir, **{k: v for k, v in summary.items()
                                             if k != "memory"}}, default=str))
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
