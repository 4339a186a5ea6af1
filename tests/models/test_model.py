"""Shapes, parameter counts, logical axes and layer-level numerics (no torch needed)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matquant_jax.models import Transformer
from matquant_jax.models import get_config
from matquant_jax.models import init_cache
from matquant_jax.models import layers
from matquant_jax.models import logical_axes
from matquant_jax.models import param_count
from matquant_jax.models import param_shapes
from matquant_jax.models import transformer

# Published sizes (HF model cards / papers); ours include Gemma's 128 padding embedding rows.
PUBLISHED = {"gemma2_2b": 2.61e9, "gemma2_9b": 9.24e9, "gemma2_27b": 27.2e9,
             "mistral_7b_v0_1": 7.24e9, "llama2_7b": 6.74e9}

# Logical axes of every parameter kind, by the last two path components.
EXPECTED_AXES = {
    ("embedder", "input_embedding"): ("vocab", "embed"),
    ("lm_head", "kernel"): ("embed", "vocab"),
    ("q_einsum", "w"): ("heads", "embed", "head_dim"),
    ("kv_einsum", "w"): (None, "kv_heads", "embed", "head_dim"),
    ("attn_vec_einsum", "w"): ("heads", "head_dim", "embed"),
    ("gating_einsum", "w"): (None, "embed", "mlp"),
    ("linear", "w"): ("mlp", "embed"),
}


def _formula(c) -> int:
  """Parameter count from the config alone (the tree documented in config.py)."""
  d, f, n, k, h = c.embed_dim, c.hidden_dim, c.num_heads, c.num_kv_heads, c.head_dim
  norms = 4 if c.post_norms else 2
  per_layer = norms * d + n * d * h + 2 * k * d * h + n * h * d + 2 * d * f + f * d
  head = 0 if c.tie_embeddings else d * c.vocab_size
  return c.embed_rows * d + d + head + c.num_layers * per_layer


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_full_size_param_counts(name):
  config = get_config(name)
  count = param_count(config)  # jax.eval_shape: nothing is allocated
  assert count == _formula(config)
  assert abs(count / PUBLISHED[name] - 1) < 0.01, (name, count)
  shapes = param_shapes(config)
  assert len([k for k in shapes if k.startswith("layer_")]) == config.num_layers
  q = shapes["layer_0"]["attn"]["q_einsum"]["w"]
  assert q.shape == (config.num_heads, config.embed_dim, config.head_dim)
  assert ("lm_head" in shapes) == (not config.tie_embeddings)


def test_gemma2_2b_exact_count():
  # HF's 2,614,341,888 (256000 rows) plus 128 padding rows of 2304.
  assert param_count(get_config("gemma2_2b")) == 2_614_341_888 + 128 * 2304


@pytest.mark.parametrize("name", ["tiny_gemma2", "tiny_mistral", "gemma2_9b"])
def test_every_param_has_logical_axes(name):
  config = get_config(name)
  boxed = jax.eval_shape(Transformer(config).init, jax.random.key(0),
                         jax.ShapeDtypeStruct((1, 1), jnp.int32))["params"]
  leaves = jax.tree_util.tree_leaves_with_path(
      boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves
  allowed = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", None}
  for path, leaf in leaves:
    keys = tuple(p.key for p in path)
    assert isinstance(leaf, nn.LogicallyPartitioned), keys
    names = tuple(leaf.names)
    assert len(names) == leaf.value.ndim and set(names) <= allowed, (keys, names)
    expected = ("embed",) if keys[-1] == "scale" else EXPECTED_AXES[keys[-2:]]
    assert names == expected, keys
  specs = logical_axes(config)
  assert tuple(specs["layer_0"]["attn"]["kv_einsum"]["w"]) == (None, "kv_heads", "embed",
                                                               "head_dim")


def test_positions_from_segments():
  seg = jnp.array([[1, 1, 1, 0, 0], [1, 1, 2, 2, 2]])
  np.testing.assert_array_equal(transformer.positions_from_segments(seg),
                                [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]])


def test_sliding_window_mask_keeps_w_keys_including_self():
  pos = jnp.arange(12)[None]
  seg = jnp.ones((1, 12), jnp.int32)
  mask = np.asarray(layers.attention_mask(pos, seg, pos, seg, window=4))[0]
  for q in range(12):
    np.testing.assert_array_equal(np.flatnonzero(mask[q]), np.arange(max(0, q - 3), q + 1))
  # Segments and padding.
  seg = jnp.array([[1, 1, 2, 2, 0]])
  pos = jnp.array([[0, 1, 0, 1, 0]])
  mask = np.asarray(layers.attention_mask(pos, seg, pos, seg, window=None))[0]
  np.testing.assert_array_equal(mask.astype(int), [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0],
                                                   [0, 0, 1, 0, 0], [0, 0, 1, 1, 0],
                                                   [0, 0, 0, 0, 0]])


def test_rope_depends_on_relative_position():
  rng = np.random.RandomState(0)
  q = jnp.asarray(rng.randn(1, 1, 1, 16), jnp.float32)
  k = jnp.asarray(rng.randn(1, 1, 1, 16), jnp.float32)

  def score(pq, pk):
    rq = layers.apply_rope(q, jnp.array([[pq]]), 1e4)
    rk = layers.apply_rope(k, jnp.array([[pk]]), 1e4)
    return float(jnp.sum(rq * rk))

  assert score(5, 2) == pytest.approx(score(103, 100), abs=1e-4)
  assert score(0, 0) == pytest.approx(float(jnp.sum(q * k)), abs=1e-5)
  # Half-split pairing: dimension i rotates with i + H/2 (position 1, lowest frequency = 1 rad).
  e0 = jnp.zeros((1, 1, 1, 16)).at[..., 0].set(1.0)
  out = np.asarray(layers.apply_rope(e0, jnp.array([[1]]), 1e4))[0, 0, 0]
  np.testing.assert_allclose(out[[0, 8]], [np.cos(1.0), np.sin(1.0)], atol=1e-6)
  assert np.abs(np.delete(out, [0, 8])).max() == 0


def test_embedding_scale_is_rounded_to_the_activation_dtype():
  config = get_config("tiny_gemma2").replace(embed_dim=3584, num_heads=1, num_kv_heads=1)
  table = jnp.ones((config.embed_rows, config.embed_dim), jnp.float32)
  emb = layers.Embedder(config=config, dtype=jnp.bfloat16)
  x = emb.apply({"params": {"input_embedding": table}}, jnp.array([[3]]), method="encode")
  assert x.dtype == jnp.bfloat16 and float(x[0, 0, 0]) == 59.75  # sqrt(3584) = 59.87
  x = layers.Embedder(config=config).apply({"params": {"input_embedding": table}},
                                           jnp.array([[3]]), method="encode")
  assert float(x[0, 0, 0]) == pytest.approx(3584 ** 0.5)


def test_bf16_compute_is_close_to_float32(tiny_models):
  name = "tiny_gemma2"
  config = get_config(name)
  tokens = np.random.RandomState(0).randint(0, config.vocab_size, (2, 32))
  ref = tiny_models.logits(name, tokens)
  out = tiny_models.logits(name, tokens, dtype=jnp.bfloat16)
  p, q = jax.nn.softmax(ref), jax.nn.softmax(out)
  kl = jnp.sum(p * (jnp.log(p) - jnp.log(q)), -1)
  assert 0 < float(kl.max()) < 1e-2


def test_cache_requires_positions(tiny_models):
  config = get_config("tiny_mistral")
  with pytest.raises(ValueError, match="positions"):
    Transformer(config).apply({"params": tiny_models.params("tiny_mistral")},
                              jnp.zeros((1, 1), jnp.int32), cache=init_cache(config, 1, 4))
