"""Block-wise OmniQuant-MatQuant calibration: frozen weights, lower int2 error than MinMax,
resume == uninterrupted, export to the int8 MatQuant checkpoint, configs and their errors."""

import dataclasses
import importlib.util
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matquant_jax import calibration
from matquant_jax.calibration import block as block_lib
from matquant_jax.calibration import calibrator
from matquant_jax.calibration import memory
from matquant_jax.calibration import pipeline
from matquant_jax.calibration import transform
from matquant_jax.checkpoints.matquant_checkpoint import MatQuantCheckpoint
from matquant_jax.quant.kernels import BY_NAME as KERNEL
from matquant_jax.quant import minmax
from matquant_jax.quant.fake_quant import fake_quant
from matquant_jax.quant.plan import PrecisionPlan

REPO = pathlib.Path(__file__).resolve().parents[2]


def _tree_equal(a, b):
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _first_batch(setup, tiny, fns):
  """Layer 0's first calibration batch on the devices, in the step's layout."""
  params, tokens = tiny.tiny_params(), tiny.tiny_tokens()
  x0 = calibrator.embed_tokens(setup.model, params["embedder"], tokens["inputs"],
                               batch_size=setup.batch_size, mesh=setup.mesh,
                               host_dtype=setup.host_dtype)
  acts = calibrator._Activations(setup, tokens, x0)
  bp = calibrator._block_params_to_device(params, 0, fns.replicated)
  y, _ = calibrator._forward_fp(fns, bp, acts)
  return bp, acts, y, acts.device_batch(fns, np.arange(setup.batch_size), y)


def test_only_lwc_and_let_are_trained_and_weights_stay_frozen(uninterrupted, tiny):
  setup, _, _ = uninterrupted
  fns = block_lib.block_functions(setup.model, 0, setup.objective, setup.step, setup.mesh)
  bp, _, _, batch = _first_batch(setup, tiny, fns)
  frozen = jax.tree_util.tree_map(np.array, bp)
  calib0 = transform.init_calib_params(setup.model, setup.step.calib)
  calib = jax.device_put(calib0, fns.replicated)
  opt_state = fns.init_opt(calib)
  # The optimizer state holds moments of exactly the LWC logits and LET log-scales.
  mu = opt_state[0].mu
  chex.assert_trees_all_equal_shapes_and_dtypes(mu, calib0)
  assert set(calib0["lwc"]["mlp"]) == {"gating_einsum", "linear"}
  assert set(calib0["let"]) == {"ffn_in", "ffn_mid"}
  for _ in range(3):
    ones = np.ones(len(setup.objective.bits), np.float32)  # no loss normalization
    calib, opt_state, metrics = fns.train_step(calib, opt_state, bp, batch, ones)
  assert float(metrics["grad_norm"]) > 0
  # Every learnable leaf moved (its gradient is not zero)...
  for path, before, after in zip(
      *[[jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(calib0)]],
      jax.tree_util.tree_leaves(calib0), jax.tree_util.tree_leaves(calib)):
    moved = np.mean(np.asarray(after) != before)
    assert moved > 0.5, f"{path}: only {moved:.0%} of its entries received a gradient"
  # ...and the model's weights are the same arrays, bit for bit: they are an input of the step,
  # never an output, and nothing differentiates with respect to them.
  _tree_equal(bp, frozen)


def test_calibration_lowers_int2_error_well_below_minmax(uninterrupted):
  setup, result, _ = uninterrupted
  assert result.finished and sorted(result.calib) == [0, 1]
  for layer, m in result.metrics.items():
    print(f"layer {layer}: int2 nmse MinMax {m['nmse_minmax_int2']:.4f} -> calibrated "
          f"{m['nmse_final_int2']:.4f}")
    assert m["nmse_final_int2"] < 0.8 * m["nmse_minmax_int2"], m
    assert m["loss_last"] < m["loss_first"]
    for r in setup.objective.bits:  # every width is measured before and after
      assert np.isfinite(m[f"mse_final_int{r}"]) and m[f"mse_minmax_int{r}"] > 0


def test_resume_after_interruption_equals_uninterrupted_run(uninterrupted, tiny, tmp_path):
  setup, full, _ = uninterrupted
  params, tokens = tiny.tiny_params(), tiny.tiny_tokens()
  part = calibration.calibrate_blocks(setup, params, tokens, workdir=tmp_path,
                                      stop_after_blocks=1)
  assert not part.finished and sorted(part.calib) == [0]
  assert (tmp_path / "calibration" / "layer_0.npz").exists()

  lines = []

  class Log:
    text = staticmethod(lines.append)

    def log(self, step, metrics):
      pass

  resumed = calibration.calibrate_blocks(setup, params, tokens, workdir=tmp_path, logger=Log())
  assert any("resuming: layers 0..0" in s for s in lines), lines
  assert resumed.finished
  for layer in (0, 1):
    _tree_equal(resumed.calib[layer], full.calib[layer])
    drop = lambda m: {k: v for k, v in m.items() if k != "seconds"}  # noqa: E731
    assert drop(resumed.metrics[layer]) == drop(full.metrics[layer])

  # A different run must not silently resume from these results.
  other = dataclasses.replace(setup, seed=setup.seed + 1)
  with pytest.raises(calibration.ConfigError, match="different run.*seed"):
    calibration.calibrate_blocks(other, params, tokens, workdir=tmp_path)


def test_export_loads_and_slices_dequantize_to_calibrated_weights(uninterrupted, tiny, tmp_path):
  setup, result, _ = uninterrupted
  params = tiny.tiny_params()
  path = calibration.export_calibrated(tmp_path / "int8", setup, params, result,
                                       float_dtype=jnp.float32)
  ckpt = MatQuantCheckpoint.load(path)
  assert ckpt.parent_bits == 8 and ckpt.metadata["calibration"] == "omniquant"
  folded, clipping = calibration.fold_and_clipping(setup, params, result)
  for name, (gamma, beta) in clipping.items():
    layer, _, kernel, _ = name.split("/")
    w = jnp.asarray(folded[layer]["mlp"][kernel]["w"])
    # The stored int8 codes, α and z are Q_Omni of the folded weights with the learned clipping.
    alpha, zero = minmax.minmax_params(w, 8, KERNEL[kernel].reduce_axes, gamma=gamma, beta=beta)
    qt = ckpt.qtensors[name]
    np.testing.assert_allclose(np.asarray(qt.scale), np.asarray(alpha), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(qt.codes),
                                  np.asarray(minmax.quantize(w, qt.scale, qt.zero, 8)))
    for r in (8, 6, 4, 3, 2):  # trained widths and the interpolated ones
      served = ckpt.params_for(PrecisionPlan.parse(f"ffn:int{r}"), dtype=jnp.float32)
      # ...and every slice dequantizes to the calibrated fake-quant weights (up to float
      # rounding of α·(q − z) inside and outside jit).
      want = fake_quant(w, r, 8, KERNEL[kernel].reduce_axes, gamma=gamma, beta=beta)
      np.testing.assert_allclose(np.asarray(served[layer]["mlp"][kernel]["w"]), np.asarray(want),
                                 rtol=1e-6, atol=1e-7, err_msg=f"{name} int{r}")
  # Norm scales carry the folded LET; the block served at int2 is the calibrated int2 block.
  np.testing.assert_array_equal(np.asarray(served["layer_0"]["pre_ffw_norm"]["scale"]),
                                np.asarray(folded["layer_0"]["pre_ffw_norm"]["scale"]))
  fns = block_lib.block_functions(setup.model, 0, setup.objective, setup.step, setup.mesh)
  bp, acts, _, batch = _first_batch(setup, tiny, fns)
  ours = fns.quant_forward(bp, jax.device_put(result.calib[0], fns.replicated), batch["x"],
                           batch["positions"], batch["segment_ids"], jnp.asarray(2, jnp.int32))
  served_bp = jax.device_put(served["layer_0"], fns.replicated)
  theirs, _ = fns.fp_forward(served_bp, batch["x"], batch["positions"], batch["segment_ids"])
  np.testing.assert_allclose(np.asarray(theirs), np.asarray(ours), rtol=1e-5, atol=1e-5)


def test_shifted_calibration_exports_a_model_every_loader_runs(tiny, tmp_path):
  """let='scale_shift': δ is learned, folded into the two bias leaves the exported checkpoint
  stores (ffn_shift=True); its int2 slice is the calibrated int2 block, packed serving computes
  what params_for computes, and bias-free formats refuse it. With a clipping bound above 1
  (calibration.lwc_max), so the export must use the same bound as the calibrated step."""
  from matquant_jax import export_hf
  from matquant_jax.checkpoints import _common
  from matquant_jax.models import transformer as transformer_lib
  from matquant_jax.serving import loader
  setup = tiny.tiny_setup(**{"calibration.let": "scale_shift", "calibration.lwc_max": 1.5,
                             "calibration.steps_per_block": 20})
  params = tiny.tiny_params()
  result = calibration.calibrate_blocks(setup, params, tiny.tiny_tokens())
  assert np.max(np.abs(result.calib[0]["let"]["ffn_shift"])) > 0  # δ received gradients
  path = calibration.export_calibrated(tmp_path / "int8", setup, params, result,
                                       float_dtype=jnp.float32)
  ckpt = MatQuantCheckpoint.load(path)
  assert ckpt.config.ffn_shift and ckpt.metadata["let"] == "scale_shift"
  served = ckpt.params_for(PrecisionPlan.parse("ffn:int2"), dtype=jnp.float32)
  assert set(served["layer_1"]["mlp"]) == {"gating_einsum", "linear", "gating_bias"}
  assert set(served["layer_1"]["pre_ffw_norm"]) == {"scale", "bias"}
  fns = block_lib.block_functions(setup.model, 0, setup.objective, setup.step, setup.mesh)
  bp, _, _, batch = _first_batch(setup, tiny, fns)
  ours = fns.quant_forward(bp, jax.device_put(result.calib[0], fns.replicated), batch["x"],
                           batch["positions"], batch["segment_ids"], jnp.asarray(2, jnp.int32))
  block = transformer_lib.Block(config=ckpt.config, layer=0)
  theirs, _ = jax.jit(block.apply)({"params": served["layer_0"]},
                                   *(np.asarray(batch[k]) for k in ("x", "positions",
                                                                    "segment_ids")))
  np.testing.assert_allclose(np.asarray(theirs), np.asarray(ours), rtol=1e-5, atol=1e-5)
  tokens = jnp.asarray(tiny.tiny_tokens()["inputs"][:2])
  model = loader.load_serving(path, "ffn:int2", dtype=jnp.float32)
  ref = transformer_lib.Transformer(ckpt.config).apply({"params": served}, tokens)
  np.testing.assert_allclose(np.asarray(model.model().apply({"params": model.params}, tokens)),
                             np.asarray(ref), rtol=1e-4, atol=1e-4)
  packed = loader.load_serving_checkpoint(loader.export_serving_checkpoint(
      model, tmp_path / "serving"))  # the packed serving format keeps the biases too
  assert packed.config.ffn_shift
  np.testing.assert_array_equal(packed.params["layer_1"]["mlp"]["gating_bias"],
                                np.asarray(served["layer_1"]["mlp"]["gating_bias"]))
  with pytest.raises(_common.CheckpointError, match="LET shift.*let=scale"):
    export_hf.export_hf(path, "ffn:int4", tmp_path / "hf")


def test_loss_normalization_divides_each_width_by_its_minmax_error(uninterrupted, tiny):
  """loss_normalization='minmax': the step's loss is Σ_r λ_r · MSE_r / MSE_r(MinMax); the
  scales come from the block's MinMax errors (a width MinMax represents exactly gets the
  smallest nonzero one's scale instead of infinity)."""
  setup, _, _ = uninterrupted
  fns = block_lib.block_functions(setup.model, 0, setup.objective, setup.step, setup.mesh)
  _, acts, y, batch = _first_batch(setup, tiny, fns)
  bp = calibrator._block_params_to_device(tiny.tiny_params(), 0, fns.replicated)
  mse_minmax = calibrator._evaluate(
      fns, bp, transform.minmax_calib_params(setup.model, setup.step.calib), acts, y)
  normalized = dataclasses.replace(setup.step, loss_normalization="minmax")
  scale = calibrator._width_scale(normalized, mse_minmax)
  np.testing.assert_allclose(scale, 1.0 / mse_minmax, rtol=1e-6)
  np.testing.assert_array_equal(calibrator._width_scale(setup.step, mse_minmax), np.ones(3))
  np.testing.assert_array_equal(
      calibrator._width_scale(normalized, np.asarray([0.0, 2.0, 4.0])), [0.5, 0.5, 0.25])
  calib = transform.init_calib_params(setup.model, setup.step.calib)
  total, _, e_gt, _ = jax.jit(fns.loss_and_grads)(calib, bp, batch, jnp.asarray(scale))
  lam = np.asarray(setup.objective.weights)
  np.testing.assert_allclose(float(total), float(np.sum(lam * scale * np.asarray(e_gt))),
                             rtol=1e-5)
  assert 0.3 < float(total) / float(np.sum(lam)) < 3.0  # every term starts near 1


def test_codistillation_objective_and_quantized_inputs(tiny):
  """'[8,4,2,8->4;2]': int4 and int2 are pulled toward the fp target and toward the int8
  slice's block output; with 'quantized' inputs each width reads its own stream."""
  setup = tiny.tiny_setup(**{"objective.codistill": "[8,4,2,8->4;2]",
                             "calibration.input_mode": "quantized"})
  obj = setup.objective
  assert obj.bits == (8, 4, 2) and obj.weights == (0.1, 0.1, 1.0)
  assert obj.distill == ((8, 4), (8, 2))
  fns = block_lib.block_functions(setup.model, 0, obj, setup.step, setup.mesh)
  bp, acts, y, batch = _first_batch(setup, tiny, fns)
  rng = np.random.default_rng(0)
  # Distinct inputs per width, as after a quantized previous layer.
  batch["x"] = batch["x"] * jnp.asarray([1.0, 0.9, 1.1])[:, None, None, None]
  calib = transform.init_calib_params(setup.model, setup.step.calib)
  calib["let"]["ffn_mid"] = rng.normal(0, 0.1, calib["let"]["ffn_mid"].shape).astype(np.float32)
  total, _, e_gt, e_t = jax.jit(fns.loss_and_grads)(calib, bp, batch)

  mask = np.asarray(batch["segment_ids"] != 0, np.float32)[..., None]
  mse = lambda a, b: float(np.sum(mask * (np.asarray(a) - np.asarray(b)) ** 2) / (  # noqa: E731
      mask.sum() * a.shape[-1]))
  outs = {r: fns.quant_forward(bp, calib, batch["x"][i], batch["positions"],
                               batch["segment_ids"], jnp.asarray(r, jnp.int32))
          for i, r in enumerate(obj.bits)}
  want = sum(lam * (mse(outs[r], batch["y"]) + (mse(outs[r], outs[8]) if r != 8 else 0.0))
             for r, lam in zip(obj.bits, obj.weights))
  np.testing.assert_allclose(float(total), want, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(e_gt), [mse(outs[r], batch["y"]) for r in obj.bits],
                             rtol=1e-5)
  np.testing.assert_allclose(float(e_t[2]), mse(outs[2], outs[8]), rtol=1e-5)


def _load_config(file, arg=None):
  spec = importlib.util.spec_from_file_location(f"cfg_{file}", REPO / "configs" / f"{file}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg) if arg is not None else mod.get_config()


@pytest.mark.parametrize("file,arg,bits,lam,steps,parent,ep", [
    ("omniquant_matquant", "gemma2_9b", (8, 4, 2), (0.1, 0.1, 1.0), 1221, 8, False),
    ("omniquant_matquant", "gemma2_2b", (8, 4, 2), (0.1, 0.1, 1.0), 1221, 8, False),
    ("omniquant_matquant", "mistral_7b", (8, 4, 2), (0.4, 0.4, 1.0), 1221, 8, False),
    ("omniquant_baseline", "gemma2_9b,int8", (8,), (1.0,), 1221, 8, False),
    ("omniquant_baseline", "mistral_7b,int6", (6,), (1.0,), 1221, 6, False),
    ("omniquant_baseline", "gemma2_2b,int3", (3,), (1.0,), 1221, 3, False),
    ("omniquant_baseline", "gemma2_9b,int2", (2,), (1.0,), 2442, 2, False),
    ("omniquant_single_precision", "gemma2_9b", (2,), (1.0,), 1221, 8, False),
    ("omniquant_extra_precision", "mistral_7b", (8, 4, 2), (1.0, 1.0, 1.0), 1221, 8, True),
    ("omniquant_codistill", "gemma2_9b,8-4-2-8to4_2", (8, 4, 2), (0.1, 0.1, 1.0), 1014, 8,
     False),
    ("omniquant_codistill", "mistral_7b,8-4-8to2", (8, 4, 2), (0.4, 0.4, 1.0), 1014, 8, False),
])
def test_paper_configs_resolve_to_the_paper_settings(file, arg, bits, lam, steps, parent, ep):
  c = _load_config(file, arg)
  c.aot_only = True  # the released weights are required otherwise
  s = calibration.resolve(c, devices=jax.devices()[:8])
  assert (s.objective.bits, s.objective.weights, s.steps_per_block) == (bits, lam, steps)
  assert (s.objective.parent_bits, s.objective.extra_precision) == (parent, ep)
  assert (s.num_samples, s.seq_len, s.batch_size, s.step.lr) == (128, 2048, 4, 1e-3)
  # OmniQuant's procedure: quantized stream per width, its code's learning rates, Eq. 4's LET
  # with the shift; the paper's literal loss (no normalization).
  assert (s.step.input_mode, s.step.lwc_lr, s.step.let_lr) == ("quantized", 1e-2, 5e-3)
  assert (s.step.calib.let, s.step.loss_normalization) == ("scale_shift", "none")
  assert dict(s.mesh.shape)["data"] == 4  # auto: the paper's batch of 4 over 4 of 8 devices
  c.aot_only = False
  with pytest.raises(calibration.ConfigError, match="config.init must be set"):
    calibration.resolve(c, devices=jax.devices()[:8])


def test_tiny_config_resolves():
  s = calibration.resolve(_load_config("tiny_omniquant"), devices=jax.devices()[:8])
  assert s.model.name == "tiny_gemma2" and s.steps_per_block > 0


@pytest.mark.parametrize("overrides,match", [
    ({"model": "gemma3_1b"}, "unknown model"),
    ({"objective.method": "bf16"}, "nothing to calibrate"),
    ({"objective.codistill": "[8,4,2->8]"}, "more bits than its student"),
    ({"calibration.let": "shift"}, "let="),
    ({"calibration.input_mode": "layerwise"}, "input_mode"),
    ({"calibration.loss_normalization": "energy"}, "loss_normalization"),
    ({"objective.scope": "attn", "calibration.let": "scale_shift"}, "no FFN kernel"),
    ({"calibration.lwc": False, "calibration.let": "none"}, "nothing to learn"),
    ({"calibration.batch_size": 5}, "not a multiple of calibration.batch_size"),
    ({"calibration.num_microbatches": 3}, "num_microbatches"),
    ({"mesh.data": 3}, "not divisible by the 3 data-parallel"),
    ({"calibration.host_dtype": "float16"}, "host_dtype"),
    ({"calibration.lwc_lr": -1.0}, "lwc_lr"),
    ({"calibration.lwc_max": 0.5}, "lwc_max"),
    ({"calibration.steps_per_block": 0, "calibration.budget_tokens": 0}, "budget_tokens"),
    ({"init": "required"}, "config.init must be set"),
])
def test_bad_configs_fail_before_compilation(overrides, match, tiny, tmp_path, monkeypatch):
  def no_compile(*a, **k):
    raise AssertionError("compiled before validating the config")
  monkeypatch.setattr(block_lib, "block_functions", no_compile)
  monkeypatch.setattr(memory, "compiled_step_memory", no_compile)
  with pytest.raises(calibration.ConfigError, match=match):
    pipeline.run(tiny.tiny_config(**overrides), tmp_path)


def test_memory_report_of_the_compiled_block_step(tiny):
  setup = tiny.tiny_setup(**{"objective.method": "single_precision"})
  rep = memory.report(setup)
  assert rep["xla_peak_estimate_bytes"] > rep["xla_argument_size_in_bytes"] > 0
  m = setup.model
  d, f, n, k, h = m.embed_dim, m.hidden_dim, m.num_heads, m.num_kv_heads, m.head_dim
  n_block = 4 * d + 2 * n * d * h + 2 * k * d * h + 3 * d * f  # 4 norms, attention, FFN
  n_state = 2 * (2 * f + d) + d + f                     # γ, β per channel; LET scales
  assert rep["block_params"] == n_block and rep["calib_params"] == n_state
  assert "GiB" in memory.format_report(rep) or "MiB" in memory.format_report(rep)


def test_cli_rejects_unknown_overrides(tmp_path, capsys):
  from matquant_jax import calibrate  # its own FlagValues: runs in this process
  with pytest.raises(SystemExit) as e:
    calibrate.main([f"--config={REPO / 'configs' / 'tiny_omniquant.py'}",
                    f"--workdir={tmp_path}", "--config.calibration.lrr=0.1"])
  assert e.value.code != 0 and "lrr" in capsys.readouterr().err


def test_data_parallel_and_microbatched_steps_match_one_device(uninterrupted, tiny):
  """One block's step sharded over 4 devices, or over 2 devices in 2 micro-batches, takes the
  same step as on one device (rows without padding, so micro-batch means equal the mean)."""
  base, _, _ = uninterrupted
  runs = {}
  for label, overrides in (("4 devices", {}), ("1 device", {"mesh.data": 1}),
                           ("2 devices x 2 micro", {"mesh.data": 2,
                                                    "calibration.num_microbatches": 2})):
    setup = tiny.tiny_setup(num_devices=8, **overrides)
    assert setup.objective == base.objective
    assert dict(setup.mesh.shape)["data"] == int(label[0])
    fns = block_lib.block_functions(setup.model, 0, setup.objective, setup.step, setup.mesh)
    bp, acts, y, _ = _first_batch(setup, tiny, fns)
    batch = acts.device_batch(fns, np.arange(2, 6), y)
    calib = jax.device_put(transform.init_calib_params(setup.model, setup.step.calib),
                           fns.replicated)
    opt_state = fns.init_opt(calib)
    for _ in range(2):
      ones = np.ones(len(setup.objective.bits), np.float32)
      calib, opt_state, m = fns.train_step(calib, opt_state, bp, batch, ones)
    runs[label] = (float(m["loss"]), jax.tree_util.tree_map(np.asarray, calib))
  ref_loss, ref = runs["1 device"]
  for label, (loss, calib) in runs.items():
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, err_msg=label)
    for a, b in zip(jax.tree_util.tree_leaves(calib), jax.tree_util.tree_leaves(ref)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=label)


class _ByteTokenizer:
  """A stand-in for sentencepiece: one id per byte (the pipeline only calls encode)."""
  pad_id = 0

  def encode(self, text, add_bos=None, add_eos=False):
    return ([2] if add_bos else []) + [3 + b % 250 for b in text.encode()] + (
        [1] if add_eos else [])


def test_calibration_sample_and_host_weights(tiny):
  c = tiny.tiny_config(**{"model": "tiny_mistral"})
  tokens = pipeline.calibration_tokens(c, _ByteTokenizer())
  for k in ("inputs", "positions", "segment_ids"):
    assert tokens[k].shape == (tiny.NUM_SAMPLES, tiny.SEQ_LEN) and tokens[k].dtype == np.int32
  assert np.all(tokens["segment_ids"] > 0)  # full rows of packed KJV text, no padding
  again = pipeline.calibration_tokens(c, _ByteTokenizer())
  np.testing.assert_array_equal(tokens["inputs"], again["inputs"])  # a seeded, fixed sample
  setup = calibration.resolve(c, devices=jax.devices()[:8])
  params = pipeline.host_params(c, setup.model, "bfloat16")
  leaves = jax.tree_util.tree_leaves(params)
  assert all(isinstance(x, np.ndarray) and x.dtype == np.dtype("bfloat16") for x in leaves)
  with pytest.raises(calibration.ConfigError, match="nonexistent does not exist"):
    pipeline.host_params(tiny.tiny_config(init="run:/nonexistent"), setup.model)


@pytest.mark.parametrize("overrides, match", [
    ({"tokenizer": "/nonexistent/tok.model"}, "config.tokenizer"),
    ({"init": "hf:/nonexistent"}, "config.init='hf:/nonexistent'"),
    ({"data.source": "text:/nonexistent.txt"}, "config.data.source"),
    ({"calibration.steps_per_block": -5}, "steps_per_block=-5 must be >= 0"),
    ({"calibration.b2": 1.5}, "b2=1.5"),
    ({"calibration.lr": float("nan")}, "lr=nan"),
])
def test_bad_inputs_fail_before_anything_is_written(tmp_path, overrides, match):
  from tests.calibration.conftest import tiny_config
  c = tiny_config(**overrides)
  with pytest.raises(calibration.ConfigError, match=match):
    pipeline.run(c, tmp_path / "run")
  assert not (tmp_path / "run").exists()
