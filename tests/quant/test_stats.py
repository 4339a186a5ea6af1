"""Code histograms for a tensor and for a params tree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matquant_jax.quant import stats
from matquant_jax.quant.qtensor import QTensor


def test_histogram_counts_slice_indices():
  codes = np.array([0, 31, 32, 95, 96, 159, 160, 223, 224, 255], np.uint8)
  np.testing.assert_array_equal(stats.code_histogram(codes, 2), [2, 2, 2, 4])
  np.testing.assert_array_equal(stats.code_histogram(codes, 2, extra_precision=True), [2, 2, 2, 2, 2])
  np.testing.assert_array_equal(stats.code_histogram(codes, 8), np.bincount(codes, minlength=256))
  assert stats.code_histogram(codes, 4).sum() == len(codes)


def test_tree_histograms_sum_over_selected_leaves():
  w1 = jax.random.normal(jax.random.PRNGKey(0), (32, 16))
  w2 = jax.random.normal(jax.random.PRNGKey(1), (16, 32))
  tree = {"mlp": {"linear": {"w": w1}}, "attn": {"q": {"w": w2}}, "norm": {"scale": jnp.ones(16)},
          "qt": QTensor.quantize(w2, 8, 0)}
  pick = lambda path, leaf: (0,) if path.startswith("mlp") else None
  h = stats.tree_code_histograms(tree, bits=(8, 4, 2), reduce_axes_for=pick)
  assert set(h) == {8, 4, 2}
  assert h[2].sum() == w1.size + w2.size  # the mlp kernel and the QTensor leaf
  want = stats.code_histogram(QTensor.quantize(w1, 8, 0), 2) + stats.code_histogram(tree["qt"], 2)
  np.testing.assert_array_equal(h[2], want)
  s = stats.histogram_summary(h[2])
  assert s["total"] == h[2].sum() and 0 <= s["mean_index"] <= 3
  assert sum(s["fractions"]) == pytest.approx(1.0)


def test_errors():
  with pytest.raises(ValueError, match="no quantized weight"):
    stats.tree_code_histograms({"a": jnp.ones((2, 2))})
  qt = QTensor.quantize(jnp.ones((4, 4)), 8, 0)
  with pytest.raises(ValueError, match="parent codes"):
    stats.code_histogram(qt.slice(4), 2)
