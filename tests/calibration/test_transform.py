"""LWC/LET state and the equivalent-transformation fold: exact in float32, MinMax when off."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matquant_jax.calibration import transform
from matquant_jax.models import layers
from matquant_jax.models import transformer as transformer_lib
from matquant_jax.models.config import get_config
from matquant_jax.quant import minmax
from matquant_jax.quant.plan import Scope


def _random_let(config, options, rng, spread=0.5):
  return {k: rng.normal(0.0, spread, shp).astype(np.float32)
          for k, shp in transform.let_shapes(config, options).items()}


@pytest.mark.parametrize("name", ["tiny_gemma2", "tiny_mistral"])
def test_folding_let_is_exact_in_float32(name, tiny):
  """The whole model with LET folded into norms and weights computes the same logits."""
  # Two layers: a local and a global one for Gemma-2; norms away from their init (0 or 1).
  config = get_config(name).replace(num_layers=2)
  rng = np.random.default_rng(0)
  params = tiny.random_params(config, seed=0, norm_noise=0.3)
  options = transform.CalibOptions(scope=Scope.FFN_ATTN)  # every LET placement at once
  calib = {i: {"lwc": {}, "let": _random_let(config, options, rng)}
           for i in range(config.num_layers)}
  folded = transform.fold_model_params(config, params, calib)
  # The transform really changed the quantized kernels and norms...
  w0, w1 = params["layer_0"]["mlp"]["linear"]["w"], folded["layer_0"]["mlp"]["linear"]["w"]
  assert np.max(np.abs(np.asarray(w0) - np.asarray(w1))) > 1e-2
  # ...and not the function.
  tokens = jnp.asarray(rng.integers(3, config.vocab_size, (2, 24)), jnp.int32)
  seg = jnp.ones_like(tokens).at[1, 16:].set(2)
  fwd = jax.jit(transformer_lib.Transformer(config).apply)
  ref = np.asarray(fwd({"params": params}, tokens, segment_ids=seg))
  out = np.asarray(fwd({"params": folded}, tokens, segment_ids=seg))
  np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", ["tiny_gemma2", "tiny_mistral"])
def test_folding_the_shift_is_exact_and_adds_the_biases(name, tiny):
  """let='scale_shift': the folded model (ffn_shift=True: norm bias, gating bias) computes the
  same logits as the original one, and folding twice (a shifted model calibrated again) too."""
  config = get_config(name).replace(num_layers=2)
  rng = np.random.default_rng(3)
  params = tiny.random_params(config, seed=1, norm_noise=0.3)
  options = transform.CalibOptions(scope=Scope.FFN, let="scale_shift")
  assert set(transform.let_shapes(config, options)) == {"ffn_in", "ffn_mid", "ffn_shift"}
  calib = {i: {"lwc": {}, "let": _random_let(config, options, rng)}
           for i in range(config.num_layers)}
  folded = transform.fold_model_params(config, params, calib)
  shifted = transform.folded_config(config, options)
  assert shifted.ffn_shift and not config.ffn_shift
  assert folded["layer_0"]["pre_ffw_norm"]["bias"].shape == (config.embed_dim,)
  assert folded["layer_0"]["mlp"]["gating_bias"].shape == (2, config.hidden_dim)
  assert np.max(np.abs(folded["layer_1"]["mlp"]["gating_bias"])) > 1e-2
  tokens = jnp.asarray(rng.integers(3, config.vocab_size, (2, 24)), jnp.int32)
  ref = np.asarray(jax.jit(transformer_lib.Transformer(config).apply)(
      {"params": params}, tokens))
  run_shifted = jax.jit(transformer_lib.Transformer(shifted).apply)
  np.testing.assert_allclose(np.asarray(run_shifted({"params": folded}, tokens)), ref,
                             rtol=3e-5, atol=3e-5)
  again = transform.fold_model_params(
      shifted, folded, {i: {"lwc": {}, "let": _random_let(config, options, rng, 0.3)}
                        for i in range(config.num_layers)})
  np.testing.assert_allclose(np.asarray(run_shifted({"params": again}, tokens)), ref,
                             rtol=5e-5, atol=5e-5)


def _ffn_block(config, rng):
  """A pre-FFN norm and FFN with random weights, and a random LET input scale."""
  d, f = config.embed_dim, config.hidden_dim
  p = {"pre_ffw_norm": {"scale": rng.normal(0, 0.3, (d,)).astype(np.float32)},
       "mlp": {"gating_einsum": {"w": rng.normal(0, 0.2, (2, d, f)).astype(np.float32)},
               "linear": {"w": rng.normal(0, 0.1, (f, d)).astype(np.float32)}}}
  return p, np.exp(rng.normal(0, 0.5, (d,))).astype(np.float32)


def test_shift_fold_matches_eq4_written_out():
  """Eq. 4 on the FFN input: ((x̂ − δ) ⊘ s)(s ⊙ W) + δ·W, with W the unscaled kernel."""
  config = get_config("tiny_gemma2")
  rng = np.random.default_rng(4)
  d = config.embed_dim
  p, s_in = _ffn_block(config, rng)
  delta = rng.normal(0, 0.5, (d,)).astype(np.float32)
  folded = transform.fold_let(config, p, {"ffn_in": np.log(s_in), "ffn_shift": delta})
  x = rng.normal(0, 1, (3, 5, d)).astype(np.float32)
  xn = layers.RMSNorm(norm_type=config.norm_type, eps=config.norm_eps).apply(
      {"params": p["pre_ffw_norm"]}, x)
  w = p["mlp"]["gating_einsum"]["w"]
  explicit = jnp.einsum("btd,cdf->cbtf", (xn - delta) / s_in, w * s_in[None, :, None]) + \
      jnp.einsum("d,cdf->cf", delta, w)[:, None, None, :]
  normed = layers.RMSNorm(norm_type=config.norm_type, eps=config.norm_eps, use_bias=True).apply(
      {"params": folded["pre_ffw_norm"]}, x)
  gate = jnp.einsum("btd,cdf->cbtf", normed, folded["mlp"]["gating_einsum"]["w"]) + \
      folded["mlp"]["gating_bias"][:, None, None, :]
  np.testing.assert_allclose(np.asarray(gate), np.asarray(explicit), rtol=1e-5, atol=1e-5)


def test_ffn_fold_matches_explicit_activation_transform():
  """Eq. 4 written out on the FFN: (x̂ ⊘ s)(s ⊙ W) with the down projection's input scaled
  through the up projection, for GeGLU (act(gate) · up)."""
  config = get_config("tiny_gemma2")
  rng = np.random.default_rng(1)
  d, f = config.embed_dim, config.hidden_dim
  p, s_in = _ffn_block(config, rng)
  s_mid = np.exp(rng.normal(0, 0.5, (f,))).astype(np.float32)
  x = rng.normal(0, 1, (3, 5, d)).astype(np.float32)

  def ffn(params, x):
    h = layers.RMSNorm(norm_type=config.norm_type, eps=config.norm_eps).apply(
        {"params": params["pre_ffw_norm"]}, x)
    return layers.FeedForward(config).apply({"params": params["mlp"]}, h)

  folded = transform.fold_let(config, p, {"ffn_in": np.log(s_in), "ffn_mid": np.log(s_mid)})
  # Explicit: normalised input divided by s_in, weights multiplied by it; the hidden state
  # divided by s_mid before a down projection multiplied by it.
  xn = layers.RMSNorm(norm_type=config.norm_type, eps=config.norm_eps).apply(
      {"params": p["pre_ffw_norm"]}, x) / s_in
  w = p["mlp"]["gating_einsum"]["w"] * s_in[None, :, None]
  gate, up = jnp.einsum("btd,cdf->cbtf", xn, w)
  hidden = jax.nn.gelu(gate, approximate=True) * up / s_mid
  explicit = jnp.einsum("btf,fd->btd", hidden, p["mlp"]["linear"]["w"] * s_mid[:, None])
  ffn = jax.jit(ffn)
  np.testing.assert_allclose(np.asarray(ffn(folded, x)), np.asarray(explicit), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(ffn(folded, x)), np.asarray(ffn(p, x)), rtol=1e-4,
                             atol=1e-5)


def test_initial_state_shapes_and_values():
  config = get_config("tiny_mistral")
  d, f, k, h = config.embed_dim, config.hidden_dim, config.num_kv_heads, config.head_dim
  c = transform.init_calib_params(config, transform.CalibOptions())
  assert c["lwc"]["mlp"]["gating_einsum"]["gamma"].shape == (2, 1, f)
  assert c["lwc"]["mlp"]["linear"]["beta"].shape == (1, d)
  assert "attn" not in c["lwc"]
  np.testing.assert_allclose(minmax.lwc_factor(jnp.asarray(c["lwc"]["mlp"]["linear"]["gamma"])),
                             0.98201376, rtol=1e-6)
  assert {k_: v.shape for k_, v in c["let"].items()} == {"ffn_in": (d,), "ffn_mid": (f,)}
  assert all(np.all(v == 0) for v in c["let"].values())
  both = transform.init_calib_params(config, transform.CalibOptions(scope="ffn+attn"))
  assert both["let"]["attn_out"].shape == (k, h)
  assert set(both["lwc"]["attn"]) == {"q_einsum", "kv_einsum", "attn_vec_einsum"}
  assert transform.init_calib_params(config, transform.CalibOptions(let="none"))["let"] == {}
  with pytest.raises(ValueError, match="let="):
    transform.CalibOptions(let="shift")
  # A wider clipping bound starts from the same factors, and its MinMax state is still exactly 1.
  wide = transform.CalibOptions(lwc_max=2.0)
  c2 = transform.init_calib_params(config, wide)
  g, b = transform.clipping_factors(c2, "mlp", "linear", wide.lwc_max)
  np.testing.assert_allclose(g, 0.98201376, rtol=1e-6)
  np.testing.assert_allclose(b, 0.98201376, rtol=1e-6)
  g, b = transform.clipping_factors(transform.minmax_calib_params(config, wide), "mlp", "linear",
                                    wide.lwc_max)
  assert np.all(np.asarray(g) == 1.0) and np.all(np.asarray(b) == 1.0)
  with pytest.raises(ValueError, match="lwc_max"):
    transform.CalibOptions(lwc_max=0.9)


def test_minmax_state_is_exactly_plain_minmax(tiny):
  """γ = β = 1, s = 1 reproduces the model's own fake-quant path bit for bit: the 'MinMax'
  errors reported per block are the real MinMax baseline."""
  config = get_config("tiny_gemma2")
  params = tiny.random_params(config, seed=2, norm_noise=0.3)["layer_1"]
  options = transform.CalibOptions()
  calib = transform.minmax_calib_params(config, options)
  x = np.random.default_rng(3).normal(0, 1, (2, 12, config.embed_dim)).astype(np.float32)
  pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
  seg = jnp.ones((2, 12), jnp.int32)

  @jax.jit
  def both(params, calib, x):
    out = []
    for bits in (8, 2):
      qp = transform.quantized_block_params(config, params, calib, bits, options=options)
      ours, _ = transformer_lib.Block(config, layer=1).apply({"params": qp}, x, pos, seg)
      ref, _ = transformer_lib.Block(config, layer=1, ffn_quant=layers.WeightQuant(bits)).apply(
          {"params": params}, x, pos, seg)
      out.append((ours, ref))
    return out

  for ours, ref in both(params, calib, x):
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))
