"""A precision plan fake-quantizes exactly the planned kernels and nothing else."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matquant_jax.models import Transformer
from matquant_jax.models import get_config
from matquant_jax.models import layers
from matquant_jax.quant.kernels import BY_NAME as KERNEL
from matquant_jax.quant.plan import KIND_KERNELS
from matquant_jax.quant.fake_quant import fake_quant
from matquant_jax.quant.plan import PrecisionPlan

NAME = "tiny_gemma2"
SEQ = 32  # the conftest forward shape, shared with the decoding tests


def _tokens(config, seed=0):
  return np.random.RandomState(seed).randint(0, config.vocab_size, (2, SEQ))


def _quantize_tree(params, plan: PrecisionPlan, num_layers: int):
  """What the plan should do, written out: fake-quantize the planned kernels in the tree."""
  out = jax.tree_util.tree_map(lambda x: x, params)
  for i in range(num_layers):
    for kind, group, names in (("ffn", "mlp", KIND_KERNELS["ffn"]),
                               ("attn", "attn", KIND_KERNELS["attn"])):
      if not plan.quantizes(kind):
        continue
      for name in names:
        bits = plan.bits_for(i, num_layers, kind, name)
        w = out[f"layer_{i}"][group][name]["w"]
        out[f"layer_{i}"][group][name]["w"] = fake_quant(
            w, bits, plan.parent_bits, KERNEL[name].reduce_axes,
            extra_precision=plan.extra_precision)
  return out


def _sublayer_outputs(config, plan, params, tokens):
  """Attention and FFN sub-layer outputs, {(layer, 'attn'|'mlp'): array}."""
  def capture(module, method):
    return method == "__call__" and isinstance(module, (layers.Attention, layers.FeedForward))

  apply = jax.jit(functools.partial(Transformer(config, plan=plan).apply,
                                    capture_intermediates=capture))
  _, state = apply({"params": params}, jnp.asarray(tokens))
  out = {}
  for i in range(config.num_layers):
    inter = state["intermediates"][f"layer_{i}"]
    out[(i, "attn")] = np.asarray(inter["attn"]["__call__"][0][0])
    out[(i, "mlp")] = np.asarray(inter["mlp"]["__call__"][0])
  return out


def test_bf16_plan_is_the_unquantized_model(tiny_models):
  config = get_config(NAME)
  params = tiny_models.params(NAME)
  tokens = jnp.asarray(_tokens(config))

  def graph(model):
    return str(jax.make_jaxpr(model.apply)({"params": params}, tokens))

  # The same program as the module without a plan, with no rounding anywhere in it.
  plain = graph(Transformer(config))
  assert graph(Transformer(config, plan=PrecisionPlan.bf16())) == plain
  assert graph(Transformer(config, plan=PrecisionPlan.parse("bf16"))) == plain
  assert "floor" not in plain
  assert "floor" in graph(Transformer(config, plan=PrecisionPlan.parse("ffn:int4")))


def test_ffn_plan_leaves_attention_alone(tiny_models):
  config = get_config(NAME)
  params = tiny_models.params(NAME)
  tokens = _tokens(config)[:, :12]
  ref = _sublayer_outputs(config, PrecisionPlan.bf16(), params, tokens)
  ffn = _sublayer_outputs(config, PrecisionPlan.parse("ffn:int4"), params, tokens)
  # Layer 0's attention sees the same input under an FFN plan: bit-identical output.
  np.testing.assert_array_equal(ffn[(0, "attn")], ref[(0, "attn")])
  assert np.abs(ffn[(0, "mlp")] - ref[(0, "mlp")]).max() > 1e-3
  full = tiny_models.logits(NAME, _tokens(config))
  quant = tiny_models.logits(NAME, _tokens(config), plan="ffn:int4")
  assert np.abs(full - quant).max() > 1e-3


@pytest.mark.parametrize("plan", ["ffn:int4", "ffn+attn:[2,4,8,3]:ep", "attn:int3:parent=4",
                                  "ffn:[2/8,4,8/3,6]", "ffn+attn:[2/4/8/3/6,8,4,3/3/3/3/2]:ep"])
def test_plan_equals_quantizing_the_tree(tiny_models, plan):
  """Serving at a plan == running the bf16 model on weights fake-quantized by hand."""
  config = get_config(NAME)
  plan = PrecisionPlan.parse(plan)
  params = tiny_models.params(NAME)
  tokens = _tokens(config)
  quantized_tree = _quantize_tree(params, plan, config.num_layers)
  fn_bf16 = tiny_models.step_fn(NAME)
  expected = np.asarray(fn_bf16({"params": quantized_tree}, jnp.asarray(tokens),
                                segment_ids=jnp.ones(tokens.shape, jnp.int32)))
  got = tiny_models.logits(NAME, tokens, plan=str(plan))
  np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)


def test_param_tree_is_the_same_for_every_plan():
  config = get_config(NAME)
  tokens = jax.ShapeDtypeStruct((1, 4), jnp.int32)

  def tree(plan):
    variables = jax.eval_shape(Transformer(config, plan=PrecisionPlan.parse(plan)).init,
                               jax.random.key(0), tokens)
    return jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), variables)

  reference = tree("bf16")
  for plan in ("ffn:int4", "attn:int2", "ffn+attn:pyramid@3.0", "ffn:[8,4,2,8]:ep"):
    assert tree(plan) == reference, plan


def test_quantized_forward_has_gradients(tiny_models):
  """QAT needs gradients through the fake-quantized kernels (straight-through estimator)."""
  name = "tiny_mistral"
  config = get_config(name)
  params = tiny_models.params(name)
  tokens = jnp.asarray(_tokens(config)[:1, :8])
  model = Transformer(config, plan=PrecisionPlan.parse("ffn+attn:int2"))

  def loss(p):
    logits = model.apply({"params": p}, tokens)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

  grads = jax.jit(jax.grad(loss))(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    g = np.asarray(g)
    assert np.isfinite(g).all(), path
  for kernel in ("gating_einsum", "linear"):
    assert np.abs(np.asarray(grads["layer_0"]["mlp"][kernel]["w"])).max() > 0
  assert np.abs(np.asarray(grads["layer_0"]["attn"]["q_einsum"]["w"])).max() > 0
