"""Quant ops under jit on an 8-device mesh equal their unsharded results."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from matquant_jax.quant import fake_quant as fq
from matquant_jax.quant.qtensor import QTensor


@pytest.fixture(scope="module")
def mesh():
  devices = np.array(jax.devices())
  if devices.size < 8:
    pytest.skip("needs 8 devices (tests/conftest.py forces 8 host CPU devices)")
  return Mesh(devices[:8].reshape(2, 4), ("data", "model"))


@pytest.mark.parametrize("spec", [P(None, "model"), P("model", None), P("data", "model")])
def test_sharded_equals_unsharded(mesh, spec):
  w = jax.random.normal(jax.random.PRNGKey(0), (64, 32))
  ws = jax.device_put(w, NamedSharding(mesh, spec))

  def everything(w):
    qt = QTensor.quantize(w, 8, 0)
    s2 = qt.slice(2)
    return (qt.codes, s2.dequantize(), qt.slice(2, extra_precision=True).codes,
            fq.fake_quant(w, 4), jax.grad(lambda w: jnp.sum(fq.fake_quant(w, 2) ** 2))(w))

  want = jax.jit(everything)(w)
  got = jax.jit(everything)(ws)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Elementwise results keep the input's layout: the sharded path never gathers the weights.
  for a in got[1:]:
    assert a.sharding.is_equivalent_to(ws.sharding, a.ndim), (spec, a.sharding)
