"""The splash attention kernel (models/splash_attention.py) against the model's XLA attention.

Off TPU the kernel runs in Pallas' interpret mode (exact, slow), so the shapes stay small.
"""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matquant_jax.models import config as model_config
from matquant_jax.models import layers
from matquant_jax.models import splash_attention as splash
from matquant_jax.models import transformer
from matquant_jax.training import aot
from matquant_jax.training import trainer
from matquant_jax.training.config import ConfigError
from tests.training.test_trainer import tiny_config

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install -e '.[tpu]')")


@pytest.mark.parametrize("is_local", [True, False])
def test_attention_with_splash_equals_xla_attention(is_local):
  # One Gemma-2 attention layer, local (window 48 < 128 tokens) or global: soft-capped logits,
  # GQA (4 query heads on 2 kv heads), two packed segments and trailing padding.
  cfg = model_config.get_config("demo_gemma2").replace(sliding_window=48)
  seg = jnp.concatenate([jnp.ones((2, 70), jnp.int32), jnp.full((2, 50), 2, jnp.int32),
                         jnp.zeros((2, 8), jnp.int32)], axis=1)
  pos = transformer.positions_from_segments(seg)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 128, cfg.embed_dim))
  cot = jax.random.normal(jax.random.PRNGKey(2), x.shape) * (seg > 0)[..., None]
  xla = layers.Attention(cfg, is_local=is_local)
  params = xla.init(jax.random.PRNGKey(0), x, pos, seg)["params"]
  kernel = layers.Attention(cfg, is_local=is_local,
                            kernel=splash.SplashAttention(softcap=cfg.attn_logit_softcap))

  def run(module):
    def f(p, x):
      out, _ = module.apply({"params": p}, x, pos, seg)
      return jnp.sum(out * cot), out
    return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(params, x)

  (_, out_xla), grads_xla = run(xla)
  (_, out_splash), grads_splash = run(kernel)
  valid = (seg > 0)[..., None]
  np.testing.assert_allclose(np.where(valid, out_splash, 0), np.where(valid, out_xla, 0),
                             atol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(grads_splash), jax.tree_util.tree_leaves(grads_xla)):
    np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.max(jnp.abs(b))) + 1e-7)


@pytest.mark.parametrize("seq,window,block", [(1024, None, 128), (1024, 300, 128),
                                              (2048, 512, 512), (512, 128, 128)])
def test_visible_tiles_counts_the_tiles_the_dense_mask_touches(seq, window, block):
  q = np.arange(seq)[:, None]
  k = np.arange(seq)[None, :]
  dense = k <= q
  if window is not None:
    dense &= k > q - window
  n = seq // block
  touched = dense.reshape(n, block, n, block).any(axis=(1, 3)).sum()
  assert splash.visible_tiles(seq, window, block) == touched


def test_block_size_divides_the_sequence():
  assert splash.block_size(8192) == 512
  assert splash.block_size(640) == 128
  assert splash.block_size(256) == 256
  assert splash.block_size(96) == 96   # one tile (interpret mode only)
  assert splash.check_shapes(8192, 256) is None
  assert "head_dim 32" in splash.check_shapes(8192, 32)
  assert "sequence length 1000" in splash.check_shapes(1000, 128)


def test_attention_kernel_option_resolves_and_refuses_by_name():
  # Off TPU, auto keeps XLA and splash is interpreted (any shape).
  assert trainer.resolve(tiny_config()).attention_kernel == "xla"
  assert trainer.resolve(tiny_config(attention_kernel="splash")).attention_kernel == "splash"
  with pytest.raises(ConfigError, match="choose auto, xla or splash"):
    trainer.resolve(tiny_config(attention_kernel="flash"))
  # Heads are sharded over the tensor axis: tiny_gemma2's 2 kv heads do not split 4 ways.
  with pytest.raises(ConfigError, match="2 key/value heads, which the tensor axis \\(4\\)"):
    trainer.resolve(tiny_config(**{"attention_kernel": "splash", "mesh.tensor": 4}))


@needs_libtpu
def test_on_a_v5e_topology_auto_picks_splash_and_the_cost_counts_its_calls(monkeypatch):
  devices = aot.topology_devices("v5e:2x2")
  # Small shapes: libtpu's compile time grows with them (21 -> 14 CPU-s for this test).
  c = tiny_config(**{"mesh.data": 1, "mesh.fsdp": 4, "data.seq_len": 128,
                     "data.global_batch_size": 4})
  # tiny_gemma2's head_dim (32) is not a multiple of 128: auto falls back, splash refuses.
  assert trainer.resolve(c, devices=devices).attention_kernel == "xla"
  c.attention_kernel = "splash"
  with pytest.raises(ConfigError, match="head_dim 32 is not a multiple of 128"):
    trainer.resolve(c, devices=devices)
  tiny = model_config.get_config("tiny_gemma2")
  monkeypatch.setitem(model_config.PRESETS, "tiny_gemma2", tiny.replace(head_dim=128))
  c.attention_kernel = "auto"
  c.remat = "full"
  c.objective.method = "bf16"  # one pass: the smallest program with every kernel in it
  setup = trainer.resolve(c, devices=devices)
  assert setup.attention_kernel == "splash"
  tx, schedule = trainer.make_optimizer(c, setup)
  compiled = trainer.compile_step(setup, tx, schedule)[1]
  kernels = trainer._kernel_costs(setup)
  plain = aot.cost_dict(compiled)
  cost = aot.cost_dict(compiled, kernels)
  # The scanned program holds one layer group (local + global): its forward, the remat
  # recompute in the backward, and one fused backward kernel per layer.
  assert cost[f"kernel_calls:{splash.FWD_KERNEL}"] == 4
  assert cost[f"kernel_calls:{splash.BWD_KERNEL}"] == 2
  added = sum(cost[f"kernel_calls:{k}"] * v["flops"] for k, v in kernels.items())
  assert cost["flops"] == pytest.approx(plain["flops"] + added)
  assert "optimal_seconds" not in cost
