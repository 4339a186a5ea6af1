"""The Mosaic (Pallas TPU) kernels compiled by XLA for a real TPU v5e, not only interpreted.

Needs libtpu (the `tpu` extra, which `make test` installs); skipped cleanly without it. No TPU
is used. Compiling (not only lowering) runs Mosaic's own checks, e.g. it rejects an fp32
contract precision on bf16 operands, which lowering and interpret mode accept: jax.experimental.topologies gives v5e devices to compile for from this CPU host.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matquant_jax.quant.qtensor import QTensor
from matquant_jax.serving import pallas_tpu
from matquant_jax.serving import weights


def _v5e_device():
  pytest.importorskip("libtpu")
  from matquant_jax.training import aot
  try:
    return aot.topology_devices("v5e:2x2")[0]
  except aot.TopologyError as e:
    pytest.skip(str(e))


@pytest.mark.parametrize("bits,ep,m,dtype", [
    (2, False, 8, jnp.bfloat16), (4, False, 8, jnp.bfloat16), (2, True, 1, jnp.bfloat16),
    (3, False, 16, jnp.float32)])
def test_mosaic_kernels_compile_for_v5e(bits, ep, m, dtype):
  device = _v5e_device()
  w = np.random.default_rng(bits).normal(size=(512, 256)).astype(np.float32)
  qt = QTensor.quantize(jnp.asarray(w), 8, (0,))
  packed = weights.pack_kernel(np.asarray(qt.codes), np.asarray(qt.scale), np.asarray(qt.zero),
                               contract_axes=(0,), bits=bits, extra_precision=ep)
  assert isinstance(pallas_tpu.config(packed, m, dtype), dict), pallas_tpu.config(packed, m, dtype)
  sharding = jax.sharding.SingleDeviceSharding(device)
  abstract = lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype, sharding=sharding)
  x = jax.ShapeDtypeStruct((m, 512), dtype, sharding=sharding)
  compiled = jax.jit(pallas_tpu.matmul).lower(
      x, jax.tree_util.tree_map(abstract, packed)).compile()
  # XLA accepted the Mosaic custom call: it is in the TPU executable, with the output shape.
  assert "tpu_custom_call" in compiled.as_text()
  out = compiled.out_info
  assert tuple(out.shape) == (m, 256)
