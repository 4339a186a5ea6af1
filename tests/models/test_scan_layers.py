"""The scanned decoder stack: same numbers as the per-layer model, both param layouts convert."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matquant_jax.models import config as mc
from matquant_jax.models import transformer as T
from matquant_jax.quant.plan import PrecisionPlan


@pytest.mark.parametrize("name", ["tiny_gemma2", "tiny_mistral"])
def test_scanned_stack_equals_per_layer_model(name):
  cfg = mc.get_config(name)
  params = T.init_params(cfg, jax.random.key(0))
  stacked = T.stack_layers(params, cfg)
  # Layout: Gemma-2 scans (local, global) pairs; the leading axis is the group index.
  period = T.layer_period(cfg)
  assert period == (2 if name == "tiny_gemma2" else 1)
  assert set(stacked["layers"]) == {f"sub_{j}" for j in range(period)}
  assert not any(k.startswith("layer_") for k in stacked)
  chex.assert_trees_all_equal_shapes_and_dtypes(stacked, T.param_shapes(cfg, scan_layers=True))
  q = stacked["layers"][f"sub_{period - 1}"]["mlp"]["linear"]["w"]
  assert q.shape == (cfg.num_layers // period,) + params["layer_0"]["mlp"]["linear"]["w"].shape
  np.testing.assert_array_equal(q[1], params[f"layer_{2 * period - 1}"]["mlp"]["linear"]["w"])
  assert T.logical_axes(cfg, scan_layers=True)["layers"]["sub_0"]["mlp"]["linear"]["w"] == \
      jax.sharding.PartitionSpec("layers", "mlp", "embed")
  back = T.unstack_layers(stacked, cfg)
  chex.assert_trees_all_equal(back, params)

  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
  plan = PrecisionPlan.parse("ffn:int4")

  @functools.partial(jax.jit, static_argnums=0)
  def logits_and_grads(model, p):
    # One program per model: the logits and the gradient of sum(logits²) (a compile each is
    # most of this test's time).
    out, vjp = jax.vjp(lambda p: model.apply({"params": p}, tokens), p)
    return out, vjp(2 * out)[0]

  ref_model = T.Transformer(cfg, plan=plan)
  ref, ref_grads = logits_and_grads(ref_model, params)
  ref_grads = T.stack_layers(ref_grads, cfg)
  for remat in ("none", "dots", "full"):
    model = T.Transformer(cfg, plan=plan, scan_layers=True, remat=remat)
    if remat == "dots" and name == "tiny_gemma2":
      # The policy only changes what the backward pass recomputes; one model's gradients
      # suffice.
      np.testing.assert_allclose(jax.jit(model.apply)({"params": stacked}, tokens), ref,
                                 rtol=1e-5, atol=1e-5)
      continue
    out, grads = logits_and_grads(model, stacked)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    for g, want in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
      # float32 summation order differs between the scan and the unrolled layers.
      np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(want))))
  hidden = jax.jit(lambda p: T.Transformer(cfg, plan=plan, scan_layers=True).apply(
      {"params": p}, tokens, return_hidden=True))(stacked)
  np.testing.assert_allclose(jax.jit(lambda p, h: T.head_logits(cfg, p, h))(params, hidden),
                             ref, rtol=1e-5, atol=1e-5)


def test_scanned_stack_refuses_what_it_cannot_do():
  cfg = mc.get_config("tiny_gemma2")
  stacked = T.stack_layers(T.init_params(cfg, jax.random.key(0)), cfg)
  tokens = jnp.zeros((1, 4), jnp.int32)
  with pytest.raises(ValueError, match="no KV cache"):
    T.Transformer(cfg, scan_layers=True).apply(
        {"params": stacked}, tokens, positions=jnp.zeros((1, 4), jnp.int32),
        cache=T.init_cache(cfg, 1, 8))
  with pytest.raises(ValueError, match="one plan per group position"):
    T.Transformer(cfg, plan=PrecisionPlan.parse("ffn:pyramid@3.0"), scan_layers=True).apply(
        {"params": stacked}, tokens)
  with pytest.raises(ValueError, match="not in the per-layer layout"):
    T.stack_layers(stacked, cfg)
  with pytest.raises(ValueError, match="not in the scanned layout"):
    T.unstack_layers(T.unstack_layers(stacked, cfg), cfg)


def test_accumulating_stack_adds_the_layers_gradient_into_the_running_sum():
  # grad_acc: the same output; the VJP w.r.t. the accumulator, seeded with the running sum,
  # returns running sum + d(loss)/d(layers), without differentiating w.r.t. the params.
  cfg = mc.get_config("tiny_gemma2")
  stacked = T.stack_layers(T.init_params(cfg, jax.random.key(0)), cfg)
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
  model = T.Transformer(cfg, plan=PrecisionPlan.parse("ffn:int4"), scan_layers=True,
                        remat="full")

  @jax.jit
  def run(p):
    out, vjp = jax.vjp(lambda p: model.apply({"params": p}, tokens), p)
    want = vjp(2 * out)[0]["layers"]
    running = jax.tree_util.tree_map(lambda a: jnp.full_like(a, 0.5), p["layers"])
    (out2, passed), vjp2 = jax.vjp(
        lambda acc: model.apply({"params": p}, tokens, grad_acc=acc), running)
    (got,) = vjp2((2 * out2, running))
    return out, out2, passed, want, got

  out, out2, passed, want, got = run(stacked)
  np.testing.assert_array_equal(out2, out)
  assert all(float(jnp.min(a)) == float(jnp.max(a)) == 0.5
             for a in jax.tree_util.tree_leaves(passed))
  for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    assert float(jnp.max(jnp.abs(w))) > 0
    np.testing.assert_allclose(g, w + 0.5, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="grad_acc needs remat='full'"):
    T.Transformer(cfg, scan_layers=True, remat="dots").apply(
        {"params": stacked}, tokens, grad_acc=stacked["layers"])
  with pytest.raises(ValueError, match="grad_acc needs scan_layers=True"):
    T.Transformer(cfg).apply({"params": T.unstack_layers(stacked, cfg)}, tokens,
                             grad_acc=stacked["layers"])
