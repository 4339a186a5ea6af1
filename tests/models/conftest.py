"""Shared tiny models and compiled forward passes (compiling is most of this folder's runtime)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matquant_jax.models import Transformer
from matquant_jax.models import get_config
from matquant_jax.models import init_params
from matquant_jax.quant.plan import PrecisionPlan


class TinyModels:
  """Random params per tiny preset, and one jitted forward per (preset, plan), reused."""

  @functools.lru_cache(maxsize=None)
  def params(self, name: str):
    # The rbg PRNG compiles in about half the time of threefry on CPU; values do not matter.
    return init_params(get_config(name), jax.random.key(1, impl="rbg"))

  @functools.lru_cache(maxsize=None)
  def _forward(self, name: str, plan: str, dtype=jnp.float32):
    return jax.jit(Transformer(get_config(name), plan=PrecisionPlan.parse(plan), dtype=dtype).apply)

  def logits(self, name: str, tokens, segment_ids=None, plan: str = "bf16",
             dtype=jnp.float32) -> np.ndarray:
    """Full forward pass: [batch, seq] -> [batch, seq, vocab] numpy (segment ids default 1)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if segment_ids is None:
      segment_ids = jnp.ones_like(tokens)
    fn = self._forward(name, plan, dtype)
    out = fn({"params": self.params(name)}, tokens, segment_ids=jnp.asarray(segment_ids, jnp.int32))
    return np.asarray(out.astype(jnp.float32))

  def step_fn(self, name: str, plan: str = "bf16"):
    return self._forward(name, plan)


@pytest.fixture(scope="session")
def tiny_models() -> TinyModels:
  return TinyModels()
