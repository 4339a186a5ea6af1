"""A tiny int8 MatQuant checkpoint (FFN + attention quantized) shared by the serving tests."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from matquant_jax.checkpoints.matquant_checkpoint import MatQuantCheckpoint
from matquant_jax.checkpoints.matquant_checkpoint import export_matquant_checkpoint
from matquant_jax.models import get_config
from matquant_jax.models import init_params
from matquant_jax.quant.plan import PrecisionPlan


class TinyCheckpoint:
  """The checkpoint directory, its loaded form, and cached dequantized params per plan."""

  def __init__(self, path):
    self.path = path
    self.config = get_config("tiny_gemma2")
    self.ckpt = MatQuantCheckpoint.load(path)

  @functools.lru_cache(maxsize=None)
  def params_for(self, plan: str, dtype=jnp.float32):
    return self.ckpt.params_for(PrecisionPlan.parse(plan), dtype=dtype)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> TinyCheckpoint:
  config = get_config("tiny_gemma2")
  # rbg compiles faster than threefry on CPU; the values do not matter.
  params = init_params(config, jax.random.key(3, impl="rbg"))
  path = export_matquant_checkpoint(tmp_path_factory.mktemp("serving") / "export", config,
                                    params, scope="ffn+attn")
  return TinyCheckpoint(path)
