"""Fixtures shared by the checkpoint tests: tiny configs and random parameter trees."""

from __future__ import annotations

import types

import numpy as np
import pytest

from matquant_jax.checkpoints import _common
from matquant_jax.models.config import AttentionPattern
from matquant_jax.models.config import get_config


def tiny_llama():
  # Llama-2 shape: full attention, MHA (K == N); the name makes the HF mapping pick llama.
  return get_config("tiny_mistral").replace(
      name="tiny_llama", attention_pattern=AttentionPattern.GLOBAL, sliding_window=None,
      num_kv_heads=4)


def tiny(name: str):
  return tiny_llama() if name == "tiny_llama" else get_config(name)


def random_params(config, seed: int = 0, dtype=np.float32):
  """Our tree for `config`, every leaf (norms included) random, so no mapping bug hides."""
  rng = np.random.default_rng(seed)
  return _common.unflatten_tree({
      n: (rng.standard_normal(s) * 0.5).astype(dtype)
      for n, s in _common.expected_param_shapes(config).items()})


def assert_trees_equal(a, b, *, rows: int | None = None):
  """Exact equality of two trees; embeddings compared on their first `rows` rows if given."""
  fa, fb = _common.flatten_tree(a), _common.flatten_tree(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    x, y = np.asarray(fa[k]), np.asarray(fb[k])
    if rows is not None and k == "embedder/input_embedding":
      x, y = x[:rows], y[:rows]
    assert x.shape == y.shape, k
    np.testing.assert_array_equal(x, y, err_msg=k)


@pytest.fixture
def helpers():
  # Test modules are imported with --import-mode=importlib and cannot import a sibling module,
  # so the helpers travel as a fixture.
  return types.SimpleNamespace(tiny=tiny, tiny_llama=tiny_llama, random_params=random_params,
                               assert_trees_equal=assert_trees_equal)
