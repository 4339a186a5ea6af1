"""Greedy decoding on packed weights equals decoding on dequantized weights of the same plan."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from matquant_jax.models import Sampler
from matquant_jax.quant.plan import PrecisionPlan
from matquant_jax.serving import loader

# Two right-padded prompts; 7 tokens overrun tiny_gemma2's sliding window of 8 with the output.
_PROMPTS = np.array([[2, 5, 17, 33, 9, 0, 0], [2, 44, 3, 8, 100, 7, 12]], np.int32)
_NEW = 10


@functools.lru_cache(maxsize=None)
def _reference_sampler(config, dtype):
  # The plain (bf16-plan) model on dequantized params: one compiled program for every plan.
  return Sampler(config, PrecisionPlan.bf16(), dtype=dtype)


def _reference_tokens(tiny_checkpoint, plan: str, dtype) -> np.ndarray:
  out = _reference_sampler(tiny_checkpoint.config, dtype)(
      tiny_checkpoint.params_for(plan, dtype), _PROMPTS, max_new_tokens=_NEW, eos_ids=())
  return np.asarray(out.tokens)


@pytest.mark.parametrize("plan,dtype", [
    ("ffn:int2", jnp.float32), ("ffn+attn:int4:ep", jnp.float32),
    ("ffn+attn:pyramid@3.0", jnp.bfloat16),
])
def test_greedy_decoding_matches_dequantized_weights(tiny_checkpoint, plan, dtype):
  model = loader.load_serving(tiny_checkpoint.path, plan, dtype=dtype)
  assert model.packed()
  out = model.generate(_PROMPTS, max_new_tokens=_NEW, eos_ids=())
  np.testing.assert_array_equal(np.asarray(out.tokens),
                                _reference_tokens(tiny_checkpoint, plan, dtype))


def test_greedy_decoding_through_the_pallas_kernel(tiny_checkpoint):
  # Every packed kernel forced through the GPU kernel (interpret mode), prefill and decode.
  plan = "ffn+attn:int2"
  model = loader.load_serving(tiny_checkpoint.path, plan, dtype=jnp.float32)
  model = model.with_path("pallas_gpu", interpret=True)
  out = model.generate(_PROMPTS, max_new_tokens=_NEW, eos_ids=())
  np.testing.assert_array_equal(np.asarray(out.tokens),
                                _reference_tokens(tiny_checkpoint, plan, jnp.float32))
