"""Streaming load of serving weights: exact against params_for, memory, serving checkpoints."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from matquant_jax.checkpoints import _common
from matquant_jax.checkpoints import matquant_checkpoint as mqc
from matquant_jax.serving import loader
from matquant_jax.serving.weights import PackedWeight

_PLANS = ["ffn:int4", "ffn:int2:ep", "ffn+attn:int3", "ffn:pyramid@3.0", "attn:int1:ep", "bf16",
          "ffn:[2/8,4,8/3,6/2]"]


def _assert_same_params(params, ref, dtype=jnp.float32):
  flat, want = _common.flatten_tree(params), _common.flatten_tree(ref)
  assert flat.keys() == want.keys()
  for name, value in flat.items():
    got = value.dequantize(dtype) if isinstance(value, PackedWeight) else value
    assert got.dtype == want[name].dtype, name
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want[name]), err_msg=name)


@pytest.mark.parametrize("plan", _PLANS)
def test_serving_weights_equal_params_for(tiny_checkpoint, plan):
  model = loader.load_serving(tiny_checkpoint.path, plan, dtype=jnp.float32)
  _assert_same_params(model.params, tiny_checkpoint.params_for(plan))
  packed = model.packed()
  if plan == "bf16":
    assert not packed
    return
  ckpt = tiny_checkpoint.ckpt
  for name, w in packed.items():
    assert w.bits == ckpt.slice_bits(model.plan, name), name
    assert w.extra_precision == (model.plan.extra_precision and w.bits < 8)


def test_bfloat16_serving_weights_are_exact_too(tiny_checkpoint):
  model = loader.load_serving(tiny_checkpoint.path, "ffn:pyramid@3.0")  # bf16 by default
  _assert_same_params(model.params, tiny_checkpoint.params_for("ffn:pyramid@3.0", jnp.bfloat16),
                      jnp.bfloat16)


def test_loading_streams_one_kernel_at_a_time(tiny_checkpoint, monkeypatch):
  def no_full_load(*args, **kwargs):
    raise AssertionError("load_serving must not restore the whole int8 checkpoint")

  monkeypatch.setattr(mqc.MatQuantCheckpoint, "load", no_full_load)
  reads = []
  original = loader._ArrayReader.read
  monkeypatch.setattr(loader._ArrayReader, "read",
                      lambda self, paths: reads.append(list(paths)) or original(self, paths))
  loader.load_serving(tiny_checkpoint.path, "ffn+attn:int2")
  assert max(len(r) for r in reads) == 3  # codes, α, z of a single kernel
  kernels = [r for r in reads if r[0].startswith("quantized/")]
  assert len(kernels) == len(tiny_checkpoint.ckpt.qtensors)
  assert all(len({k.rsplit("/", 1)[0] for k in r}) == 1 for r in kernels)


def test_resident_bytes_per_plan(tiny_checkpoint):
  sizes = {p: loader.load_serving(tiny_checkpoint.path, p).weight_bytes()
           for p in ("bf16", "ffn+attn:int8", "ffn+attn:int4", "ffn+attn:int2",
                     "ffn+attn:pyramid@3.0")}
  codes = {p: s["quantized_codes"] for p, s in sizes.items()}
  assert codes["ffn+attn:int4"] * 2 == codes["ffn+attn:int8"]
  assert codes["ffn+attn:int2"] * 4 == codes["ffn+attn:int8"]
  kernels = {p: s["quantized_kernels"] for p, s in sizes.items()}
  # Beyond the codes, every plan keeps the same α', z' (two float32 per output channel); at
  # this tiny K they are a large share, at real sizes (K >= 2304) well under 1%.
  overhead = {kernels[p] - codes[p] for p in kernels if p != "bf16"}
  assert overhead == {8 * sum(w.n for w in loader.load_serving(
      tiny_checkpoint.path, "ffn+attn:int2").packed().values())}
  assert codes["ffn+attn:int2"] < codes["ffn+attn:pyramid@3.0"] < codes["ffn+attn:int4"]
  assert sizes["bf16"]["total"] > sizes["ffn+attn:int8"]["total"]
  model = loader.load_serving(tiny_checkpoint.path, "ffn+attn:int2")
  report = loader.memory_report(model.params)
  assert report["source"] in ("memory_stats", "live_arrays")
  assert report["params_bytes"] == model.weight_bytes()["total"]
  assert report["bytes_in_use"] >= report["params_bytes"]


@pytest.mark.parametrize("plan,fmt", [("ffn+attn:int2:ep", "auto"), ("ffn:int4", "int4")])
def test_serving_checkpoint_round_trip(tiny_checkpoint, tmp_path, plan, fmt):
  model = loader.load_serving(tiny_checkpoint.path, plan, dtype=jnp.float32, fmt=fmt)
  path = loader.export_serving_checkpoint(model, tmp_path / "serving")
  with pytest.raises(FileExistsError):
    loader.export_serving_checkpoint(model, path)
  back = loader.load_serving_checkpoint(path)
  assert back.plan == model.plan and back.config == model.config
  _assert_same_params(back.params, tiny_checkpoint.params_for(plan))
  again = loader.load_serving(path, plan, dtype=jnp.float32)  # the same plan loads as is
  _assert_same_params(again.params, tiny_checkpoint.params_for(plan))
  with pytest.raises(ValueError, match="cannot be re-sliced"):
    loader.load_serving(path, "ffn:int8")


def test_clear_errors(tiny_checkpoint, tmp_path):
  with pytest.raises(ValueError, match="parent=8"):
    loader.load_serving(tiny_checkpoint.path, "ffn:int2:parent=4")
  with pytest.raises(ValueError, match="cannot parse precision plan"):
    loader.load_serving(tiny_checkpoint.path, "ffn:int9")
  with pytest.raises(FileNotFoundError, match="not a MatQuant checkpoint"):
    loader.load_serving(tmp_path, "ffn:int2")
