"""MatQuant QAT: objectives, the sharded train loop, TPU ahead-of-time compilation.

Public API (everything else in this package is internal):
  train(config, workdir)        run QAT from a config (the `train` CLI's body)
  resolve(config)               the run's Setup (model, objective, mesh, steps) without training
  aot_topology_report(config)   compile the step for a TPU topology; memory, cost, est. MFU
  default_config()              the QAT config every experiment in configs/ starts from
  paper_qat_config(model)       the paper's hyperparameters for gemma2_2b/9b, mistral_7b
  make_objective(...), Objective, METHODS   the training objectives (spec §3-§4)
  ConfigError                   raised for any bad config field, with the fix in its message

Names resolve lazily, so importing `matquant_jax.training.config` (as calibration does) does
not import the train loop.
"""

import importlib

_EXPORTS = {
    "train": "trainer", "resolve": "trainer", "aot_topology_report": "trainer",
    "TrainState": "trainer", "Setup": "trainer",
    "default_config": "config", "paper_qat_config": "config", "ConfigError": "config",
    "make_objective": "objectives", "Objective": "objectives", "METHODS": "objectives",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(__all__))
