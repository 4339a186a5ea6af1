"""Objectives: method resolution, co-distillation parsing, and exact losses and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matquant_jax.quant import fake_quant as fq
from matquant_jax.quant.plan import Scope
from matquant_jax.training import objectives as obj


def test_methods_and_defaults():
  m = obj.make_objective("matquant")
  assert m.bits == (8, 4, 2) and m.weights == (0.1, 0.1, 1.0) and not m.extra_precision
  assert obj.make_objective("matquant", family="mistral").weights == (0.2, 0.2, 1.0)
  sp = obj.make_objective("single_precision")
  assert sp.bits == (2,) and sp.parent_bits == 8 and sp.plan_for(2).parent_bits == 8
  ep = obj.make_objective("extra_precision")
  assert ep.weights == (1.0, 1.0, 1.0) and ep.extra_precision and ep.plan_for(2).extra_precision
  b = obj.make_objective("baseline", bits=(3,))
  assert b.parent_bits == 3 and str(b.plan_for(3)) == "ffn:int3:parent=3"
  assert obj.make_objective("bf16").plan_for(None).is_quantized is False
  fa = obj.make_objective("matquant", scope="ffn+attn")
  assert fa.plan_for(4).scope == Scope.FFN_ATTN


@pytest.mark.parametrize("spec,gt,pairs", [
    ("[8,4,2]", (8, 4, 2), ()),
    ("[8,4,8->2]", (8, 4), ((8, 2),)),
    ("[8,4,2,8→2]", (8, 4, 2), ((8, 2),)),
    ("[8,4,2,8->4;2]", (8, 4, 2), ((8, 4), (8, 2))),
])
def test_parse_codistill(spec, gt, pairs):
  assert obj.parse_codistill(spec) == (gt, pairs)
  o = obj.make_objective("matquant", codistill=spec)
  assert o.bits == (8, 4, 2) and o.ground_truth == gt and o.distill == pairs


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="qat"), "unknown objective method"),
    (dict(method="baseline", bits=(8, 4)), "exactly one bit-width"),
    (dict(method="matquant", bits=(8, 4), weights=None), "no default λ"),
    (dict(method="matquant", weights=(1.0, 1.0)), "one λ per bit-width"),
    (dict(method="matquant", bits=(9, 4, 2), weights=(1, 1, 1)), "bits=9"),
    (dict(method="matquant", codistill="8,4,2"), "must look like"),
    (dict(method="matquant", codistill="[8,4,2->8]"), "more bits than its student"),
    (dict(method="matquant", codistill="[4,2,8->2]"), "no ground-truth term"),
    (dict(method="matquant", codistill="[8,4,x]"), "neither a bit-width"),
    (dict(method="matquant", distill_loss="js"), "unknown distill_loss"),
    (dict(method="matquant", scope="none"), "ffn, attn or ffn\\+attn"),
    (dict(method="bf16", bits=(8,)), "without quantization"),
    (dict(method="matquant", weights=(0, 0, 0)), "at least one > 0"),
])
def test_bad_objectives(kwargs, match):
  method = kwargs.pop("method")
  with pytest.raises(ValueError, match=match):
    obj.make_objective(method, **kwargs)


# A toy "model": logits = fake-quantized W applied to one-hot inputs, so losses and gradients
# have independent closed forms through plain autodiff.
V = 12


def _toy():
  w = jax.random.normal(jax.random.PRNGKey(0), (V, V)) * 0.5
  params = {"w": w, "b": jnp.linspace(-0.1, 0.1, V)}
  rng = np.random.default_rng(0)
  batch = {"inputs": jnp.asarray(rng.integers(0, V, (2, 6)), jnp.int32),
           "targets": jnp.asarray(rng.integers(0, V, (2, 6)), jnp.int32),
           "loss_mask": jnp.asarray(rng.integers(0, 2, (2, 6)), jnp.float32)}

  def make_apply(o):
    def apply_fn(p, batch, bits):
      w = p["w"]
      if bits is not None:
        w = fq.fake_quant(w, bits, o.parent_bits, 0, extra_precision=o.extra_precision)
      return jax.nn.one_hot(batch["inputs"], V) @ w + p["b"]
    return apply_fn

  return params, batch, make_apply


def _reference_loss(o, apply_fn, params, batch):
  """The objective written as one expression, differentiated by plain autodiff."""
  mask = batch["loss_mask"]
  logits = {r: apply_fn(params, batch, r) for r in o.bits}
  total = 0.0
  for r in o.bits:
    term = 0.0
    if r in o.ground_truth:
      term += obj.cross_entropy(logits[r], batch["targets"], mask)
    for t, s in o.distill:
      if s == r:
        teacher = logits[t]
        if o.stop_teacher_grad:
          teacher = jax.lax.stop_gradient(teacher)
        term += obj.distillation(logits[r], teacher, mask, o.distill_loss)
    total += o.weight(r) * term
  return total


@pytest.mark.parametrize("kwargs", [
    dict(method="matquant"),
    dict(method="matquant", weights=(0.3, 0.5, 1.0), codistill="[8,4,2,8->4;2]"),
    dict(method="matquant", weights=(1.0, 1.0, 1.0), codistill="[8,4,8->2]", distill_loss="soft_ce"),
    dict(method="matquant", weights=(0.2, 0.2, 1.0), codistill="[8,4,2,8->2]",
         stop_teacher_grad=False),
    dict(method="matquant", weights=(1.0, 0.5, 1.0), codistill="[8,4,2,8->4;2]",
         stop_teacher_grad=False, distill_loss="l2"),
    dict(method="extra_precision"),
    dict(method="single_precision"),
    dict(method="baseline", bits=(4,)),
    dict(method="bf16"),
])
@pytest.mark.parametrize("scan", [True, False])
def test_loss_and_grads_equal_the_joint_objective(kwargs, scan):
  o = obj.make_objective(**kwargs)
  params, batch, make_apply = _toy()
  apply_fn = make_apply(o)
  loss, grads, metrics = jax.jit(lambda p: obj.loss_and_grads(o, apply_fn, p, batch, scan=scan))(
      params)
  if o.method == "bf16":
    want_loss, want_grads = jax.value_and_grad(
        lambda p: obj.cross_entropy(apply_fn(p, batch, None), batch["targets"],
                                    batch["loss_mask"]))(params)
  else:
    want_loss, want_grads = jax.value_and_grad(
        lambda p: _reference_loss(o, apply_fn, p, batch))(params)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  for k in params:
    np.testing.assert_allclose(grads[k], want_grads[k], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(metrics["loss"], loss)
  for r in o.bits:
    assert f"ce_int{r}" in metrics
  for t, s in o.distill:
    assert f"distill_int{t}_int{s}" in metrics


def test_per_bit_metrics_are_the_unweighted_cross_entropies():
  o = obj.make_objective("matquant")
  params, batch, make_apply = _toy()
  apply_fn = make_apply(o)
  _, _, m = obj.loss_and_grads(o, apply_fn, params, batch)
  for r in (8, 4, 2):
    want = obj.cross_entropy(apply_fn(params, batch, r), batch["targets"],
                             batch["loss_mask"])
    np.testing.assert_allclose(m[f"ce_int{r}"], want, rtol=1e-6)
  np.testing.assert_allclose(m["loss"], 0.1 * m["ce_int8"] + 0.1 * m["ce_int4"] + m["ce_int2"],
                             rtol=1e-6)


def test_distillation_losses():
  s = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 5))
  mask = jnp.ones((2, 3))
  assert float(obj.distillation(s, s, mask, "kl")) == pytest.approx(0.0, abs=1e-6)
  t = jax.random.normal(jax.random.PRNGKey(2), (2, 3, 5))
  pt = jax.nn.softmax(t)
  ent = -jnp.sum(pt * jnp.log(pt), -1).mean()
  np.testing.assert_allclose(obj.distillation(s, t, mask, "soft_ce") - ent,
                             obj.distillation(s, t, mask, "kl"), rtol=1e-5)
  np.testing.assert_allclose(obj.distillation(s, t, mask, "l2"), jnp.mean((s - t) ** 2), rtol=1e-6)


@pytest.mark.parametrize("kwargs", [
    dict(method="matquant"),
    dict(method="matquant", weights=(0.3, 0.5, 1.0), codistill="[8,4,2,8->4;2]"),
    dict(method="matquant", weights=(0.2, 0.2, 1.0), codistill="[8,4,2,8->2]",
         stop_teacher_grad=False),
    dict(method="matquant", weights=(1.0, 0.5, 1.0), codistill="[8,4,2,8->4;2]",
         stop_teacher_grad=False, distill_loss="l2"),
    dict(method="bf16"),
])
@pytest.mark.parametrize("scan", [True, False])
def test_chunked_head_losses_equal_the_full_logits_objective(kwargs, scan):
  # apply_fn returns hidden states and a separate head (with its own trained params, like a
  # tied embedding) makes logits 3 tokens at a time: same loss and gradients as full logits.
  o = obj.make_objective(**kwargs)
  params, batch, make_apply = _toy()
  params = dict(params, head=jax.random.normal(jax.random.PRNGKey(1), (V, V)) * 0.5)
  hidden_fn = make_apply(o)

  def head(p, h):
    return jnp.tanh(h @ p["head"] / 3.0) * 3.0

  def full_fn(p, b, bits):
    return head(p, hidden_fn(p, b, bits))

  loss, grads, metrics = jax.jit(lambda p: obj.loss_and_grads(
      o, hidden_fn, p, batch, scan=scan, head=head, chunk=4))(params)
  want_loss, want_grads, want_metrics = obj.loss_and_grads(o, full_fn, params, batch, scan=False)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  for k in params:
    np.testing.assert_allclose(grads[k], want_grads[k], rtol=1e-4, atol=1e-6)
  for k in want_metrics:
    # Distillation metrics are differences of near-equal logits: float32 cancellation leaves an
    # absolute floor (like the gradients' atol) that depends on XLA's summation order.
    np.testing.assert_allclose(metrics[k], want_metrics[k], rtol=1e-5, atol=1e-7)
  assert obj.chunk_length(6, 4) == 3 and obj.chunk_length(8192, 1024) == 1024
