"""Fake-quant forward equals the integer pipeline; STE gradients equal their analytic values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matquant_jax.quant import fake_quant as fq
from matquant_jax.quant import minmax
from matquant_jax.quant.qtensor import QTensor


def _w(shape=(48, 16), seed=0, dtype=jnp.float32):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, dtype)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("ep", [False, True])
def test_forward_equals_integer_pipeline(bits, ep):
  w = _w()
  want = QTensor.quantize(w, 8, 0).slice(bits, extra_precision=ep).dequantize()
  got = fq.fake_quant(w, bits, 8, 0, extra_precision=ep)
  np.testing.assert_array_equal(got, want)


def test_baseline_parent_width_is_minmax_at_r():
  w = _w()
  got = fq.fake_quant(w, 4, parent_bits=4, reduce_axes=0)
  alpha, zero = minmax.minmax_params(w, 4, 0)
  np.testing.assert_array_equal(got, minmax.dequantize(minmax.quantize(w, alpha, zero, 4), alpha, zero))


def test_bf16_weights_keep_their_dtype():
  w = _w(dtype=jnp.bfloat16)
  out = fq.fake_quant(w, 4)
  assert out.dtype == jnp.bfloat16
  assert jax.grad(lambda w: fq.fake_quant(w, 4).astype(jnp.float32).sum())(w).dtype == jnp.bfloat16


def _analytic(w, alpha, zero, g, bits, ep, c=8):
  """The documented STE gradients, written out in numpy."""
  # u in float32 like the op itself, so both see the same rounding at bucket edges.
  u = (np.asarray(w, np.float32) / np.asarray(alpha, np.float32) + np.asarray(zero, np.float32))
  w, alpha, zero, g, u = (np.asarray(x, np.float64) for x in (w, alpha, zero, g, u))
  ru = np.floor(u + 0.5)
  q = np.clip(ru, 0, 2**c - 1)
  s = c - bits
  idx = np.floor(q / 2**s + 0.5)
  m = (ru >= 0) & (ru <= 2**c - 1)
  if not ep and bits < c:
    m &= idx <= 2**bits - 1
    idx = np.minimum(idx, 2**bits - 1)
  qs = idx * 2**s
  m = m.astype(np.float64)
  gw = g * m
  ga = (g * ((qs - zero) - m * w / alpha)).sum(axis=0, keepdims=True)
  gz = (g * (-alpha * (1 - m))).sum(axis=0, keepdims=True)
  return gw, ga, gz, m


@pytest.mark.parametrize("bits", [8, 4, 3, 2, 1])
@pytest.mark.parametrize("ep", [False, True])
def test_ste_gradients_match_analytic(bits, ep):
  w = _w((64, 8), seed=bits)
  # Clip a few channels with a narrower α so that the parent clamp is exercised too.
  alpha, zero = minmax.minmax_params(w, 8, 0)
  alpha = alpha * jnp.linspace(0.6, 1.0, 8)[None]
  g = jax.random.normal(jax.random.PRNGKey(7), w.shape)
  _, vjp = jax.vjp(lambda w, a, z: fq.fake_quant_with_params(w, a, z, bits, extra_precision=ep),
                   w, alpha, zero)
  gw, ga, gz = vjp(g)
  want_w, want_a, want_z, m = _analytic(w, alpha, zero, g, bits, ep)
  np.testing.assert_allclose(gw, want_w, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ga, want_a, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(gz, want_z, rtol=1e-4, atol=1e-4)
  assert 0 < m.mean() <= 1  # the mask is non-trivial on the narrowed channels
  if bits == 2 and not ep:
    assert m.mean() < 1  # int2's top bucket clamps (codes >= 224)


def _reference_fake_quant(w, gamma_logit, beta_logit, bits, ep):
  """An independent STE: autodiff through round-with-identity-gradient and where-clamps."""
  @jax.custom_vjp
  def rnd(x):
    return jnp.floor(x + 0.5)
  rnd.defvjp(lambda x: (rnd(x), None), lambda _, g: (g,))

  def clamp(x, hi):
    return jnp.where(x < 0, 0.0, jnp.where(x > hi, float(hi), x))

  gamma, beta = jax.nn.sigmoid(gamma_logit), jax.nn.sigmoid(beta_logit)
  wmax = jax.lax.stop_gradient(w.max(0, keepdims=True)) * gamma
  wmin = jax.lax.stop_gradient(w.min(0, keepdims=True)) * beta
  alpha = (wmax - wmin) / 255
  zero = -wmin / alpha
  q = clamp(rnd(w / alpha + zero), 255)
  s = 8 - bits
  idx = rnd(q / 2**s)
  if not ep:
    idx = clamp(idx, 2**bits - 1)
  return alpha * (idx * 2**s - zero)


@pytest.mark.parametrize("bits,ep", [(8, False), (4, False), (2, False), (2, True)])
def test_lwc_gradients_match_independent_ste(bits, ep):
  w = _w((64, 8), seed=3)
  gl = jnp.full((1, 8), 1.0) + 0.1 * jnp.arange(8)
  bl = jnp.full((1, 8), 2.0) - 0.1 * jnp.arange(8)
  target = jax.random.normal(jax.random.PRNGKey(5), w.shape)

  def loss(fn, gl, bl, w):
    return jnp.sum((fn(w, gl, bl) - target) ** 2)

  ours = lambda w, gl, bl: fq.fake_quant(
      w, bits, 8, 0, extra_precision=ep, gamma=minmax.lwc_factor(gl), beta=minmax.lwc_factor(bl))
  ref = lambda w, gl, bl: _reference_fake_quant(w, gl, bl, bits, ep)
  np.testing.assert_allclose(ours(w, gl, bl), ref(w, gl, bl), rtol=1e-6, atol=1e-6)
  g_ours = jax.grad(loss, argnums=(1, 2, 3))(ours, gl, bl, w)
  g_ref = jax.grad(loss, argnums=(1, 2, 3))(ref, gl, bl, w)
  for a, b in zip(g_ours, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  assert np.abs(np.asarray(g_ours[0])).sum() > 0  # γ really learns


def test_qat_gradient_is_identity_inside_the_grid():
  w = _w((32, 4))
  g = jax.grad(lambda w: jnp.sum(fq.fake_quant(w, 8) * 3.0))(w)
  np.testing.assert_array_equal(g, 3.0 * np.ones_like(w))


def test_stop_weight_grad_false_lets_max_and_min_learn():
  w = _w((32, 4))
  loss = lambda w, s: jnp.sum(fq.fake_quant(w, 2, stop_weight_grad=s) ** 2)
  g_stop = jax.grad(loss)(w, True)
  g_flow = jax.grad(loss)(w, False)
  diff = np.abs(np.asarray(g_flow - g_stop)) > 1e-4  # beyond float reassociation noise
  # Only the per-channel max/min entries receive the extra gradient through α and z.
  assert diff.sum() <= 2 * w.shape[1] and diff.any()


def test_jit_vmap_grad_compose():
  ws = jnp.stack([_w(seed=i) for i in range(3)])
  f = jax.jit(jax.vmap(jax.grad(lambda w: jnp.sum(fq.fake_quant(w, 2) ** 2))))
  want = jnp.stack([jax.grad(lambda w: jnp.sum(fq.fake_quant(w, 2) ** 2))(w) for w in ws])
  np.testing.assert_allclose(f(ws), want, rtol=1e-6)


def test_bad_inputs():
  with pytest.raises(ValueError, match="bits=9"):
    fq.fake_quant(_w(), 9)
  with pytest.raises(ValueError, match="r must be <= the parent"):
    fq.fake_quant(_w(), 8, parent_bits=4)
  with pytest.raises(ValueError, match="out of range"):
    fq.fake_quant(_w(), 4, reduce_axes=3)
  with pytest.raises(ValueError, match="keep the reduced axes"):
    fq.fake_quant_with_params(_w(), jnp.ones((16,)), jnp.zeros((16,)), 4)


@pytest.mark.parametrize("ep", [False, True])
def test_traced_bits_equal_static_bits(ep):
  w = _w((40, 8), seed=11)
  g = jax.random.normal(jax.random.PRNGKey(3), w.shape)

  def run(bits):
    out, vjp = jax.vjp(lambda w: fq.fake_quant(w, bits, extra_precision=ep), w)
    return out, vjp(g)[0]

  traced = jax.jit(run)
  for r in range(1, 9):
    want_out, want_g = run(r)
    got_out, got_g = traced(jnp.int32(r))
    np.testing.assert_array_equal(got_out, want_out)
    np.testing.assert_array_equal(got_g, want_g)
  # One compiled body serves every width inside a scan over R.
  def body(carry, r):
    return carry + jnp.sum(fq.fake_quant(w, r, extra_precision=ep)), None
  total, _ = jax.lax.scan(body, 0.0, jnp.array([8, 4, 2], jnp.int32))
  want = sum(jnp.sum(fq.fake_quant(w, r, extra_precision=ep)) for r in (8, 4, 2))
  np.testing.assert_allclose(total, want, rtol=1e-5)


def test_traced_bits_must_be_an_integer_scalar():
  with pytest.raises(ValueError, match="integer scalar"):
    jax.jit(lambda b: fq.fake_quant(_w(), b))(jnp.float32(4))


@pytest.mark.parametrize("bits", [9, 0, -1])
def test_a_concrete_array_bit_width_is_checked_not_clipped(bits):
  w = jnp.ones((4, 3))
  with pytest.raises(ValueError, match="bits"):
    fq.fake_quant(w, jnp.int32(bits))
  with pytest.raises(ValueError, match="bits"):
    fq.fake_quant(w, np.int32(bits))
  np.testing.assert_array_equal(fq.fake_quant(w, jnp.int32(4)), fq.fake_quant(w, 4))
