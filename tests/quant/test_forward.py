"""quant/forward.py: float weights and stored codes give the same served kernel, and the tree
function serves a plan exactly as the model does."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matquant_jax.models import config as mc
from matquant_jax.models import transformer as T
from matquant_jax.quant import forward
from matquant_jax.quant import kernels
from matquant_jax.quant.plan import PrecisionPlan
from matquant_jax.quant.qtensor import QTensor


@pytest.mark.parametrize("name", [k.name for k in kernels.KERNELS])
@pytest.mark.parametrize("ep", [False, True])
def test_float_weights_and_stored_codes_serve_the_same_kernel(name, ep):
  kernel = kernels.BY_NAME[name]
  cfg = mc.get_config("tiny_gemma2")
  w = jax.random.normal(jax.random.key(0), kernel.shape(cfg), jnp.float32)
  stored = QTensor.quantize(w, 8, kernel.reduce_axes)
  for bits in range(1, 9):
    from_float = forward.kernel_value(w, kernel, bits, 8, extra_precision=ep)
    from_codes = forward.kernel_value(stored, kernel, bits, extra_precision=ep)
    np.testing.assert_array_equal(np.asarray(from_float), np.asarray(from_codes),
                                  err_msg=f"{name} int{bits} ep={ep}")


def test_quantized_tree_serves_a_plan_as_the_model_does():
  cfg = mc.get_config("tiny_gemma2")
  params = T.init_params(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 8), 0, cfg.vocab_size)
  plan = PrecisionPlan.parse("ffn+attn:pyramid@3.0")
  at_plan = T.Transformer(cfg, plan=plan).apply({"params": params}, tokens)
  tree = forward.quantized_tree(params, plan=plan, num_layers=cfg.num_layers)
  bf16 = T.Transformer(cfg, plan=PrecisionPlan.bf16()).apply({"params": tree}, tokens)
  np.testing.assert_array_equal(np.asarray(at_plan), np.asarray(bf16))
  # Norms and embeddings are never quantized.
  chex.assert_trees_all_equal(tree["embedder"], params["embedder"])


def test_stacked_layout_keeps_per_layer_statistics():
  cfg = mc.get_config("tiny_mistral")
  params = T.init_params(cfg, jax.random.key(0))
  per_layer = forward.quantized_tree(params, bits=jnp.int32(3), scope="ffn")
  stacked = forward.quantized_tree(T.stack_layers(params, cfg), bits=jnp.int32(3), scope="ffn")
  chex.assert_trees_all_equal(T.unstack_layers(stacked, cfg), per_layer)


def test_arguments_are_checked():
  with pytest.raises(ValueError, match="either plan= or bits="):
    forward.quantized_tree({}, plan=PrecisionPlan.parse("ffn:int4"), bits=4)
  with pytest.raises(ValueError, match="needs num_layers"):
    forward.quantized_tree({}, plan=PrecisionPlan.parse("ffn:int4"))
  with pytest.raises(ValueError, match="needs the scope"):
    forward.quantized_tree({}, bits=4)
