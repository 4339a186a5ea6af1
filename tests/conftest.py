"""Test setup: 8 host CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# With libtpu installed (the [tpu] extra) the suite still runs on CPU; libtpu is only used to
# compile for TPU topologies, without querying a GCE metadata server this host does not have.
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: no lockfile needed

import jax  # noqa: E402  (must follow the XLA_FLAGS assignment)

jax.config.update("jax_default_matmul_precision", "highest")
