"""Test setup: 8 host CPU devices, set before jax is imported anywhere; fast compiles."""

import os
import shutil
import tempfile

# Most of the suite's time is XLA compiling tiny programs. LLVM at -O0 compiles them faster than
# it runs them slower; the HLO passes (and so the numerics) do not depend on it. XLA's older
# elemental fusion emitters (instead of the MLIR fusion emitters, jax 0.10's default on CPU)
# halve the compile time of small programs (30 -> 12 ms per eager op here; whole test files
# 25-40 % less CPU); the suite's numerical checks hold under both.
# Tests that start subprocesses with their own device count pass the same flags on
# ($MATQUANT_TEST_CPU_FLAGS).
os.environ["MATQUANT_TEST_CPU_FLAGS"] = (
    "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 "
    + os.environ["MATQUANT_TEST_CPU_FLAGS"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache per test run, shared by the xdist workers and every
# subprocess a test starts (they inherit the environment): identical programs compile once. The
# first process of a run (xdist's controller, or plain pytest) makes it and removes it at the end.
# Every program is cached, however fast it compiled: most of the suite's compiles are small
# programs that many tests rebuild from fresh closures (same HLO, new jit object), which only the
# persistent cache recognises. Against a 0.2 s floor, paired runs of five test directories on
# 2 cores took 8 % less CPU (230-261 vs 258-277 user s).
_OWNS_CACHE = "MATQUANT_TEST_XLA_CACHE" not in os.environ
if _OWNS_CACHE:
  os.environ["MATQUANT_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="matquant_jax_xla_cache_")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["MATQUANT_TEST_XLA_CACHE"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# With libtpu installed (the [tpu] extra) the suite still runs on CPU; libtpu is only used to
# compile for TPU topologies, without querying a GCE metadata server this host does not have.
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: no lockfile needed

import jax  # noqa: E402  (must follow the XLA_FLAGS assignment)

jax.config.update("jax_default_matmul_precision", "highest")


# The slowest files first: pytest-xdist (--dist loadfile) hands out files in collection order, so
# the long ones start at once instead of ending a run on one busy worker.
SLOW_FIRST = ("test_demo.py", "training/test_multihost.py", "training/test_tpu_aot.py",
              "test_own_checkpoint.py", "models/test_scan_layers.py", "training/test_trainer.py",
              "training/test_pod_scale.py", "serving/test_sample_cli.py",
              "evaluation/test_report.py", "calibration/test_calibration.py")


def pytest_collection_modifyitems(session, config, items):
  def rank(item):
    path = item.nodeid.split("::")[0].removeprefix("tests/")
    return SLOW_FIRST.index(path) if path in SLOW_FIRST else len(SLOW_FIRST)
  items.sort(key=rank)  # stable: the order within a file is kept


def pytest_sessionfinish(session, exitstatus):
  if _OWNS_CACHE:
    shutil.rmtree(os.environ["MATQUANT_TEST_XLA_CACHE"], ignore_errors=True)
