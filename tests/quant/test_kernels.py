"""The kernel table against spec/models.md, and the model, readers and plans against the table."""

import jax
import pytest

from matquant_jax.checkpoints import _common
from matquant_jax.models import config as mc
from matquant_jax.models import transformer as T
from matquant_jax.quant import kernels
from matquant_jax.quant.plan import KIND_KERNELS
from matquant_jax.quant.plan import plan_kernels


def test_table_matches_the_spec():
  # spec/models.md §1: [2,D,F] gate/up, [F,D] down, [N,D,H] q, [2,K,D,H] k/v, [N,H,D] out;
  # one (α, z) per output channel, so the contracting axes are reduced.
  cfg = mc.get_config("tiny_gemma2")
  d, f, n, k, h = cfg.embed_dim, cfg.hidden_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  want = {"mlp/gating_einsum/w": ((2, d, f), (1,)), "mlp/linear/w": ((f, d), (0,)),
          "attn/q_einsum/w": ((n, d, h), (1,)), "attn/kv_einsum/w": ((2, k, d, h), (2,)),
          "attn/attn_vec_einsum/w": ((n, h, d), (0, 1))}
  assert {kk.path: (kk.shape(cfg), kk.reduce_axes) for kk in kernels.KERNELS} == want
  assert kernels.BY_NAME["kv_einsum"].stat_shape(cfg) == (2, k, 1, h)
  assert KIND_KERNELS == {"ffn": ("gating_einsum", "linear"),
                          "attn": ("q_einsum", "kv_einsum", "attn_vec_einsum")}
  assert [name for _, name in plan_kernels("ffn+attn")] == [kk.name for kk in kernels.KERNELS]


def test_lookup_finds_kernels_only():
  assert kernels.lookup("layer_3/mlp/linear/w").name == "linear"
  assert kernels.lookup("layers/sub_1/attn/kv_einsum").kind == "attn"
  for other in ("layer_0/pre_ffw_norm/scale", "embedder/input_embedding", "layer_0/attn/linear/w",
                "w", ""):
    assert kernels.lookup(other) is None, other
  with pytest.raises(ValueError, match="unknown kernel kind"):
    kernels.of_kinds(["mlp"])


@pytest.mark.parametrize("name", ["tiny_gemma2", "tiny_mistral"])
def test_model_and_readers_build_their_trees_from_the_table(name):
  cfg = mc.get_config(name)
  shapes = T.param_shapes(cfg)
  axes = T.logical_axes(cfg)
  expected = _common.expected_param_shapes(cfg)
  for i in range(cfg.num_layers):
    for kk in kernels.KERNELS:
      leaf = shapes[f"layer_{i}"][kk.module][kk.name]["w"]
      assert leaf.shape == kk.shape(cfg) == expected[f"layer_{i}/{kk.path}"]
      assert axes[f"layer_{i}"][kk.module][kk.name]["w"] == jax.sharding.PartitionSpec(
          *kk.logical_axes)
