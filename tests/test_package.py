"""The public facade imports and the documented names exist."""

import matquant_jax
from matquant_jax import quant


def test_public_api():
  for name in matquant_jax.__all__:
    assert hasattr(matquant_jax, name), name
  for name in quant.__all__:
    assert hasattr(quant, name), name
  assert callable(matquant_jax.fake_quant) and callable(quant.fake_quant.fake_quant)
  plan = matquant_jax.PrecisionPlan.parse("ffn:int4")
  assert str(plan) == "ffn:int4"
