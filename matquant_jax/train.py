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

from absl import flags
from ml_collections import config_flags

from matquant_jax import cli

# This command's own flags: train and calibrate both have --config and --workdir, and tests run
# both in one process.
FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py), with --config.<field>=<value> "
    "overrides.", lock_config=True, flag_values=FLAGS)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where checkpoints, logs and exports go (default: runs/<config name>).",
    flag_values=FLAGS)
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Call jax.distributed.initialize(): auto = when the environment names several processes "
    "(TPU pod workers, SLURM, or JAX_COORDINATOR_ADDRESS).", flag_values=FLAGS)


_COORDINATOR = flags.DEFINE_string(
    "coordinator", None, "host:port of process 0, for a multi-process run outside a TPU pod "
    "or SLURM (e.g. a simulated pod on one machine: launch/local.sh with NPROC=2). Default: "
    "$JAX_COORDINATOR_ADDRESS.", flag_values=FLAGS)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run (default: "
                                      "$JAX_NUM_PROCESSES, or what the cluster reports).",
                                      flag_values=FLAGS)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (default: "
                                   "$JAX_PROCESS_ID, or what the cluster reports).",
                                   flag_values=FLAGS)


def _multi_process_env() -> bool:
  return any(os.environ.get(k) for k in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS")) or (
      os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0) or bool(_COORDINATOR.value)


def initialize_distributed(distributed: str = "auto") -> None:
  """jax.distributed.initialize() when the flags or the environment describe several processes.

  On TPU pods and SLURM, JAX finds the coordinator itself. Elsewhere (a GPU cluster, or several
  CPU processes on one machine) pass --coordinator/--num_processes/--process_id or set
  JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID. CPU processes exchange collectives
  through gloo, the one CPU collectives backend jax 0.10 ships.
  """
  import jax
  if distributed == "off" or (distributed == "auto" and not _multi_process_env()):
    return
  coordinator = _COORDINATOR.value or os.environ.get("JAX_COORDINATOR_ADDRESS")
  env_int = lambda k: int(os.environ[k]) if os.environ.get(k) else None
  num = _NUM_PROCESSES.value if _NUM_PROCESSES.value is not None else env_int("JAX_NUM_PROCESSES")
  pid = _PROCESS_ID.value if _PROCESS_ID.value is not None else env_int("JAX_PROCESS_ID")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if coordinator and num is not None and pid is not None:
    kwargs = dict(coordinator_address=coordinator, num_processes=num, process_id=pid)
  jax.distributed.initialize(**kwargs)


def main(argv: list[str] | None = None) -> int:
  """The command: `argv` is the command line after the program name (default sys.argv[1:])."""
  cli.parse_config_flags(FLAGS, argv, "train")
  import jax
  initialize_distributed(_DISTRIBUTED.value)
  from matquant_jax.training import trainer
  config = _CONFIG.value
  if config is None:
    return cli.error("train", "pass --config=configs/<experiment>.py")
  workdir = _WORKDIR.value or str(pathlib.Path("runs") /
                                  pathlib.Path(config_flags.get_config_filename(
                                      FLAGS["config"])).stem)
  try:
    summary = trainer.train(config, workdir)
  except cli.user_errors() as e:
    return cli.report(e, "train")
  except FloatingPointError as e:
    return cli.error("train", e, code=3)
  if jax.process_index() == 0:
    print(json.dumps({"workdir": workdir, **{k: v for k, v in summary.items()
                                             if k != "memory"}}, default=str))
  return 0


if __name__ == "__main__":
  cli.run_main(main)
