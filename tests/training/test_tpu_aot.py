"""Compiling the train step for a TPU topology on this (CPU) host: --config.aot_topology.

Needs libtpu (the [tpu] extra, installed by `make test`); skipped without it. Tiny models only.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

from matquant_jax.training import aot
from matquant_jax.training import trainer
from matquant_jax.training.config import ConfigError
from tests.training.test_trainer import tiny_config

REPO = pathlib.Path(__file__).resolve().parents[2]
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install -e '.[tpu]')")
FIELDS = ("topology", "mesh", "peak_bytes_per_device", "hbm_bytes_per_device", "fits",
          "flops_per_device", "bytes_accessed_per_device", "cost_model_step_seconds", "est_mfu")


def test_aot_topology_needs_aot_only():
  with pytest.raises(ConfigError, match="aot_only=True"):
    trainer.train(tiny_config(aot_topology="v5e:2x2"), "/nonexistent")


def test_xla_out_of_memory_messages_parse():
  assert aot._oom_figures("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory "
                          "required for HLO temporaries (30.9G) exceeds available HBM "
                          "(15.75G).") == (30.9 * 2**30, 15.75 * 2**30)
  assert aot._oom_figures("Used 1.5G of 15.75G hbm. Exceeded hbm capacity") == (
      1.5 * 2**30, 15.75 * 2**30)
  assert aot._oom_figures("INTERNAL: something else") is None


@needs_libtpu
def test_train_cli_compiles_for_a_v5e_topology_and_prints_the_report_last(tmp_path):
  env = dict(os.environ, TPU_SKIP_MDS_QUERY="1", JAX_PLATFORMS="cpu")
  r = subprocess.run(
      [sys.executable, "-m", "matquant_jax.train", "--config=configs/tiny_qat.py",
       f"--workdir={tmp_path}", "--config.aot_only=True", "--config.aot_topology=v5e:2x2",
       "--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.remat=full",
       # One pass and small shapes keep the three compiles (step + two cost programs) short
       # (libtpu's compile time grows with the shapes: 38 -> 25 CPU-s for the command);
       # MatQuant's three-width step goes through XLA's TPU pipeline below (to its
       # out-of-memory verdict).
       "--config.objective.method=bf16", "--config.data.seq_len=32",
       "--config.data.global_batch_size=4"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  report = json.loads(r.stdout.strip().splitlines()[-1])
  for f in FIELDS:
    assert report[f] is not None, f
  assert report["topology"] == "v5e:2x2" and report["mesh"] == {"data": 1, "fsdp": 4,
                                                                "tensor": 1}
  assert report["device_kind"] == "TPU v5 lite" and report["num_devices"] == 4
  assert report["fits"] is True and report["hbm_bytes_per_device"] == 15.75 * 2**30
  assert 0 < report["peak_bytes_per_device"] < 2**30
  # Costs come from unrolled programs (1 and 2 layer groups, extrapolated to the full depth):
  # at least the model's FLOPs (3 passes, remat on top).
  assert report["cost_from"] == "unrolled, depth-extrapolated"
  assert report["flops_per_device"] >= report["model_flops_per_device"]
  assert 0 < report["est_mfu"] < 1


@needs_libtpu
def test_a_step_that_does_not_fit_reports_fits_false():
  c = tiny_config(**{"mesh.data": 1, "mesh.fsdp": 4, "aot_only": True,
                     "aot_topology": "v5e:2x2", "data.seq_len": 32768,
                     "data.global_batch_size": 64, "scan_layers": False,
                     "loss_chunk_size": 0})
  report = trainer.aot_topology_report(c)
  assert report["fits"] is False
  assert report["peak_bytes_per_device"] > report["hbm_bytes_per_device"] == 15.75 * 2**30
  assert "RESOURCE_EXHAUSTED" in report["xla_error"]


@needs_libtpu
def test_unknown_topology_is_a_config_error():
  with pytest.raises(ConfigError, match="v5e:8x8"):
    trainer.aot_topology_report(tiny_config(aot_only=True, aot_topology="v5e:3x7x9x2"))


@needs_libtpu
def test_calibration_block_step_compiles_for_a_v5e_topology():
  from matquant_jax.calibration import pipeline
  import runpy
  c = runpy.run_path(str(REPO / "configs" / "tiny_omniquant.py"))["get_config"]()
  c.aot_only = True
  c.aot_topology = "v5e:2x2"
  report = pipeline.run(c, "/nonexistent")
  for f in FIELDS:
    assert report[f] is not None, f
  assert report["fits"] is True and report["num_devices"] == report["mesh"]["data"]


def test_depth_extrapolation_is_linear_and_drops_invalid_optimal_seconds():
  one = {"flops": 10.0, "bytes accessed": 100.0, "optimal_seconds": 1.0}
  two = {"flops": 16.0, "bytes accessed": 130.0, "optimal_seconds": 1.5}
  assert aot.extrapolate_depth(one, two, 21) == {"flops": 130.0, "bytes accessed": 700.0,
                                                 "optimal_seconds": 11.0}
  # libtpu's optimal_seconds comes back negative for large programs: the roofline is used.
  assert "optimal_seconds" not in aot.extrapolate_depth(one, dict(two, optimal_seconds=-86.5),
                                                        21)
