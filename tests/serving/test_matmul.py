"""Packed weights and the packed matmul: exact dequantization, every path, the guard."""

from __future__ import annotations

import functools
import itertools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matquant_jax.quant.kernels import BY_NAME as KERNEL
from matquant_jax.models.layers import WeightQuant
from matquant_jax.quant.qtensor import QTensor
from matquant_jax.serving import matmul
from matquant_jax.serving import weights


@functools.lru_cache(maxsize=None)
def _quantize_fn(axes):
  return jax.jit(lambda w: QTensor.quantize(w, 8, axes))


def _parent(shape, axes, seed=0) -> QTensor:
  w = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
  return _quantize_fn(tuple(axes))(w)


def _pack(qt: QTensor, bits: int, ep: bool = False, fmt: str = "auto") -> weights.PackedWeight:
  return weights.pack_kernel(np.asarray(qt.codes), np.asarray(qt.scale), np.asarray(qt.zero),
                             contract_axes=qt.reduce_axes, bits=bits, extra_precision=ep, fmt=fmt)


@functools.partial(jax.jit, static_argnums=1)
def _dequantize(w, dtype):
  return w.dequantize(dtype)


@jax.jit
def _ref_dot(x, w):
  return jnp.dot(x, w, preferred_element_type=jnp.float32)


def _assert_matmul_close(y, x, w: weights.PackedWeight):
  """Within bf16 rounding of the exact product (float32: float32 rounding)."""
  xf = np.asarray(x.astype(jnp.float32), np.float64)
  wf = np.asarray(_dequantize(w, jnp.float32), np.float64)
  exact = xf @ wf
  magnitude = np.abs(xf) @ np.abs(wf)
  # bf16: the reference rounds each weight and the output (2^-8 each); float32: accumulation.
  rel = 2.0**-7 if x.dtype == jnp.bfloat16 else 1e-5
  assert y.dtype == x.dtype
  np.testing.assert_array_less(np.abs(np.asarray(y, np.float64) - exact), rel * magnitude + 1e-6)
  # And the dequantized-weight reference matmul itself sits in the same band.
  ref = _ref_dot(x, _dequantize(w, x.dtype))
  np.testing.assert_array_less(np.abs(np.asarray(ref, np.float64) - exact), rel * magnitude + 1e-6)


@pytest.mark.parametrize("bits,ep,fmt", [
    (b, ep, f) for b, ep, f in itertools.product(range(1, 9), (False, True), ("auto", "u8"))
] + [(4, False, "int4"), (3, True, "int4"), (2, False, "int4")])
def test_dequantize_is_exactly_the_slice(bits, ep, fmt):
  qt = _parent((2, 13, 5), (1,))  # gating layout, odd sizes
  w = _pack(qt, bits, ep, fmt)
  want = jax.jit(lambda q: q.slice(bits, extra_precision=ep).dequantize(jnp.float32))(qt)
  got = jax.jit(lambda w: w.dequantize(jnp.float32))(w)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert w.kernel_shape == (2, 13, 5) and w.k == 13 and w.n == 10


def test_int4_format_refuses_wide_codes():
  with pytest.raises(ValueError, match="at most 4-bit"):
    _pack(_parent((8, 4), (0,)), 4, ep=True, fmt="int4")


def test_resident_bytes_shrink_with_the_width():
  qt = _parent((256, 128), (0,))
  by_bits = {b: _pack(qt, b) for b in (8, 4, 2)}
  codes = {b: w.code_nbytes for b, w in by_bits.items()}
  assert codes[8] == 256 * 128
  assert codes[4] == codes[8] // 2 and codes[2] == codes[8] // 4
  # With α' and z' (8 bytes per channel) the totals stay within a few percent of 1/2 and 1/4.
  total = {b: w.nbytes for b, w in by_bits.items()}
  assert abs(total[4] / total[8] - 0.5) < 0.03 and abs(total[2] / total[8] - 0.25) < 0.03


# (path, bits, extra precision, storage format, activation dtype).
_PATH_CASES = [
    ("xla_unpack", 2, False, "auto", jnp.float32), ("xla_unpack", 2, False, "auto", jnp.bfloat16),
    ("xla_unpack", 2, True, "auto", jnp.bfloat16), ("xla_unpack", 6, False, "auto", jnp.float32),
    ("xla_int4", 4, False, "int4", jnp.float32), ("xla_int4", 4, False, "int4", jnp.bfloat16),
    ("xla_u8", 8, False, "auto", jnp.bfloat16), ("xla_u8", 2, False, "u8", jnp.float32),
    ("pallas_gpu", 2, False, "auto", jnp.bfloat16), ("pallas_gpu", 2, True, "auto", jnp.float32),
    ("pallas_gpu", 6, False, "auto", jnp.bfloat16), ("pallas_tpu", 2, False, "auto", jnp.bfloat16),
    ("pallas_tpu", 3, False, "auto", jnp.float32),
]


@pytest.mark.parametrize("path,bits,ep,fmt,dtype", _PATH_CASES,
                         ids=[f"{c[0]}-int{c[1]}{'-ep' if c[2] else ''}-{c[3]}-{jnp.dtype(c[4]).name}"
                              for c in _PATH_CASES])
def test_every_path_matches_the_dequantized_matmul(path, bits, ep, fmt, dtype):
  w = _pack(_parent((256, 64), (0,), seed=bits), bits, ep, fmt)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(3, 256)), dtype)
  y = jax.jit(functools.partial(matmul.packed_matmul, path=path, interpret=True))(x, w)
  _assert_matmul_close(y, x, w)


def test_odd_shapes_run_on_xla_and_are_refused_by_kernels():
  w = _pack(_parent((13, 5), (0,)), 2)  # K = 13, N = 5: no kernel tiles this
  x = jnp.asarray(np.random.default_rng(4).normal(size=(3, 13)), jnp.float32)
  _assert_matmul_close(jax.jit(matmul.packed_matmul)(x, w), x, w)
  with pytest.raises(ValueError, match="pallas_gpu kernel cannot run.*N=5 is not a multiple"):
    matmul.packed_matmul(x, w, path="pallas_gpu", interpret=True)
  with pytest.raises(ValueError, match="needs 'int4' weights"):
    matmul.packed_matmul(x, w, path="xla_int4")
  with pytest.raises(ValueError, match=r"needs x \[M, 13\]"):
    matmul.packed_matmul(x[:, :12], w)


def test_guard_picks_the_path_per_backend_and_shape():
  qt = _parent((256, 128), (0,))
  w2, w4, w8 = _pack(qt, 2), _pack(qt, 4, fmt="int4"), _pack(qt, 8)
  assert matmul.select_path(w4, 1, backend="gpu") == "xla_int4"
  assert matmul.select_path(w8, 1, backend="tpu") == "xla_u8"
  assert matmul.select_path(w2, 1, backend="cpu") == "xla_unpack"
  assert matmul.select_path(w2, 1, backend="gpu") == "pallas_gpu"
  assert matmul.select_path(w2, 8, backend="tpu") == "pallas_tpu"
  assert matmul.select_path(w2, 512, backend="gpu") == "xla_unpack"  # prefill-sized M
  assert matmul.select_path(w2, 512, backend="tpu") == "xla_unpack"
  odd = _pack(_parent((256, 30), (0,)), 2)
  assert matmul.select_path(odd, 1, backend="gpu") == "xla_unpack"  # N not a multiple of 16
  wide = _pack(_parent((256, 4100), (0,)), 2)
  assert matmul.select_path(wide, 1, backend="tpu") == "xla_unpack"  # N not tileable by 128


def test_guard_falls_back_when_the_kernel_does_not_compile(monkeypatch, caplog):
  # On this CPU machine the Triton kernel cannot compile: pretend to be a GPU and the guard,
  # after its one compile attempt, must use the XLA fallback (also inside jit).
  monkeypatch.setattr(matmul, "_default_backend", lambda: "gpu")
  w = _pack(_parent((256, 128), (0,), seed=5), 2)
  x = jnp.asarray(np.random.default_rng(6).normal(size=(1, 256)), jnp.bfloat16)
  with caplog.at_level(logging.WARNING, logger=matmul.__name__):
    assert matmul.resolve_path(w, 1, jnp.bfloat16) == "xla_unpack"
    y = jax.jit(matmul.packed_matmul)(x, w)
  assert "does not compile" in caplog.text
  _assert_matmul_close(y, x, w)


@pytest.mark.parametrize("platform,marker", [("cuda", "triton"), ("tpu", "tpu_custom_call")])
def test_kernels_lower_for_their_hardware(platform, marker):
  # Cross-platform lowering runs the Pallas -> Triton / Mosaic lowering on this CPU machine:
  # it catches unsupported ops and block shapes before a GPU or TPU ever sees the kernel.
  from matquant_jax.serving import pallas_gpu, pallas_tpu
  impl = pallas_gpu.matmul if platform == "cuda" else pallas_tpu.matmul
  w = _pack(_parent((512, 256), (0,)), 2, ep=True)  # two planes, (2, 1)
  x = jnp.zeros((1, 512), jnp.bfloat16)
  lowered = jax.jit(lambda x, w: impl(x, w)).trace(x, w).lower(lowering_platforms=(platform,))
  assert marker in lowered.as_text()


_EQNS = {
    "q_einsum": ("BTD,NDH->BTNH", (4, 16, 8), (2, 3, 16)),
    "kv_einsum": ("BSD,CKDH->CBSKH", (2, 2, 16, 8), (2, 3, 16)),
    "attn_vec_einsum": ("BTNH,NHD->BTD", (4, 8, 16), (2, 3, 4, 8)),
    "gating_einsum": ("BTD,CDF->CBTF", (2, 16, 24), (2, 3, 16)),
    "linear": ("BTF,FD->BTD", (24, 16), (2, 3, 24)),
}


@pytest.mark.parametrize("name", sorted(_EQNS))
def test_packed_einsum_matches_every_layer_equation(name):
  eqn, shape, x_shape = _EQNS[name]
  qt = _parent(shape, KERNEL[name].reduce_axes)
  w = _pack(qt, 3)
  x = np.random.default_rng(7).normal(size=x_shape).astype(np.float32)
  want = jax.jit(lambda x, q: jnp.einsum(eqn, x, q.slice(3).dequantize(jnp.float32)))(x, qt)
  got = jax.jit(lambda x, w: w.einsum(eqn, x))(x, w)
  assert got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)


def test_einsum_refuses_other_equations_and_plan_mismatch():
  w = _pack(_parent((2, 16, 24), (1,)), 2)
  x = jnp.ones((2, 3, 24), jnp.float32)
  with pytest.raises(ValueError, match="not a matmul over this kernel's contracting axes"):
    w.einsum("BTF,CDF->CBTD", x)
  with pytest.raises(ValueError, match="plan serves this kernel at 4 bits"):
    w.einsum("BTD,CDF->CBTF", jnp.ones((2, 3, 16)), quant=WeightQuant(bits=4))
  # The matching plan, or a parent-width kernel under an EP plan, is accepted.
  w.einsum("BTD,CDF->CBTF", jnp.ones((2, 3, 16)), quant=WeightQuant(bits=2))


def test_set_path_switches_only_weights_of_the_paths_format():
  qt = _parent((256, 128), (0,))
  tree = {"a": _pack(qt, 2), "b": _pack(qt, 8), "c": jnp.zeros(3)}
  out = weights.set_path(tree, "pallas_gpu", interpret=True)
  assert (out["a"].path, out["a"].interpret) == ("pallas_gpu", True)
  assert out["b"].path == "auto" and out["c"] is tree["c"]
  with pytest.raises(ValueError, match="unknown matmul path"):
    weights.set_path(tree, "cuda")
