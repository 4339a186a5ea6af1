"""The training loop: validation before compilation, learning, NaN stop, resume after SIGKILL,
export that restores in a fresh process on another device count, sharded == unsharded."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matquant_jax.training import trainer
from matquant_jax.training.config import default_config

REPO = pathlib.Path(__file__).resolve().parents[2]


def tiny_config(**overrides):
  c = default_config()
  c.model = "tiny_gemma2"
  c.tokenizer = "train:512"
  c.data.source = "kjv"
  c.data.seq_len = 32
  c.data.global_batch_size = 8
  c.data.num_epochs = 0
  c.data.max_tokens = 0
  c.num_steps = 12
  c.optimizer.peak_lr = 3e-3
  c.optimizer.warmup_steps = 2
  c.compute_dtype = "float32"
  c.log_every_steps = 2
  c.checkpoint_every_steps = 4
  c.mesh.data = -1
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def _devices(n=1):
  return jax.devices()[:n]


@pytest.mark.parametrize("overrides,match", [
    ({"model": "gemma3_1b"}, "unknown model"),
    ({"objective.method": "qat"}, "unknown objective method"),
    ({"objective.codistill": "[8,4,2->8]"}, "more bits than its student"),
    ({"compute_dtype": "fp8"}, "compute_dtype"),
    ({"mesh.data": 8, "data.global_batch_size": 12}, "not divisible by the 8 data-parallel"),
    ({"mesh.data": 3}, "mesh"),
    ({"num_steps": 0}, "max_tokens"),
    ({"init": "required"}, "config.init must be set"),
    ({"train_scope": "norms"}, "train_scope"),
    ({"width_loop": "vmap"}, "width_loop='vmap'; choose one of"),
])
def test_bad_configs_fail_before_compilation(overrides, match):
  c = tiny_config(**overrides)
  with pytest.raises(trainer.ConfigError, match=match):
    trainer.resolve(c, devices=jax.devices()[:8])


@pytest.mark.parametrize("overrides,match", [
    ({"optimizer.peak_lr": -1.0}, "peak_lr=-1.0 must be > 0"),
    ({"optimizer.peak_lr": float("nan")}, "peak_lr=nan must be a finite"),
    ({"optimizer.grad_clip_norm": -1.0}, "grad_clip_norm=-1.0 must be > 0"),
    ({"optimizer.b2": 1.5}, r"b2=1.5 must be in \[0, 1\)"),
    ({"optimizer.b1": -0.1}, "b1=-0.1"),
    ({"optimizer.eps": 0.0}, "eps=0.0"),
    ({"optimizer.weight_decay": -1e-4}, "weight_decay"),
    ({"optimizer.final_lr_fraction": 2.0}, "final_lr_fraction"),
    ({"optimizer.warmup_steps": -1}, "warmup_steps=-1 must be >= 0"),
    ({"num_steps": -5}, "num_steps=-5 must be >= 0"),
])
def test_optimizer_and_step_fields_are_range_checked(overrides, match):
  with pytest.raises(trainer.ConfigError, match=match):
    trainer.resolve(tiny_config(**overrides), devices=jax.devices()[:8])


@pytest.mark.parametrize("overrides,match", [
    ({"data.source": "text:/nonexistent/corpus.txt"}, "config.data.source"),
    ({"tokenizer": "/nonexistent/tokenizer.model"}, "config.tokenizer.*does not exist"),
    ({"tokenizer": "train:abc"}, "vocabulary size must be an integer"),
    ({"tokenizer": "run:/nonexistent"}, "config.tokenizer='run:/nonexistent'"),
    ({"init": "hf:/nonexistent"}, "config.init='hf:/nonexistent'.*does not exist"),
    ({"init": "run:/nonexistent"}, "config.init='run:/nonexistent'"),
    ({"init": "gemma2:/x"}, "config.init"),
    ({"optimizer.warmup_steps": -1}, "warmup_steps"),
])
def test_bad_inputs_fail_before_anything_is_written(tmp_path, overrides, match):
  workdir = tmp_path / "run"
  with pytest.raises(trainer.ConfigError, match=match):
    trainer.train(tiny_config(**overrides), workdir)
  assert not workdir.exists()  # no workdir, config.json, metrics or TensorBoard files


def test_cli_rejects_unknown_and_ill_typed_overrides(tmp_path, capsys):
  from matquant_jax import train  # its own FlagValues: runs in this process
  for flag, needle in (("--config.num_stepz=3", "the config has no field 'num_stepz'"),
                       ("--config.num_steps=three", "num_steps"),
                       ("--config.optimizer.peak_lr=-1.0", "peak_lr=-1.0 must be > 0")):
    try:
      code = train.main([f"--config={REPO / 'configs' / 'tiny_qat.py'}",
                         f"--workdir={tmp_path / 'w'}", flag])
    except SystemExit as e:
      code = e.code
    stderr = capsys.readouterr().err
    assert code == 2
    assert needle in stderr
    # One line for the user, no traceback.
    lines = [l for l in stderr.splitlines() if needle.split("'")[0] in l]
    assert lines and "Traceback" not in stderr, stderr
    assert not (tmp_path / "w").exists()


def test_aot_only_compiles_without_weights_or_data(tmp_path, capsys):
  c = tiny_config(init="required", tokenizer="required", aot_only=True)
  summary = trainer.train(c, tmp_path)
  assert summary["aot_only"] and summary["memory"]["peak_estimate_bytes"] > 0
  assert "aot_only: compiled for the local 8 cpu device(s)" in capsys.readouterr().out
  assert not (tmp_path / "checkpoints").exists()


def _read_metrics(workdir):
  return [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """One 30-step MatQuant run shared by the tests that read its metrics and its export.

  On one of the 8 host devices: 8 CPU devices on 2 cores run a tiny step at half the speed
  (sharded training is checked by test_sharded_step_equals_single_device and the multi-host
  tests); the export is then restored on 8 devices in a fresh process."""
  workdir = tmp_path_factory.mktemp("trained")
  return workdir, trainer.train(tiny_config(num_steps=30, log_every_steps=5), workdir,
                                devices=jax.devices()[:1])


def test_tiny_training_learns_and_exports(trained):
  tmp_path, summary = trained
  m = _read_metrics(tmp_path)
  assert m[-1]["loss"] < m[0]["loss"] - 0.5
  for r in (8, 4, 2):
    assert m[-1][f"ce_int{r}"] < m[0][f"ce_int{r}"]
  assert {"grad_norm", "learning_rate", "tokens_per_s"} <= set(m[-1])
  assert (tmp_path / "tensorboard").is_dir() and any((tmp_path / "tensorboard").iterdir())
  assert summary["steps"] == 30 and pathlib.Path(summary["export"]).is_dir()
  assert (tmp_path / "matquant_int8" / "metadata.json").exists()


def test_nan_stops_training_naming_the_step(tmp_path, monkeypatch):
  original = trainer.build_train_step

  def poisoned(setup, tx, schedule):
    step = original(setup, tx, schedule)

    def s(state, batch):
      new, m = step(state, batch)
      bad = state.step == 2
      m["loss"] = jnp.where(bad, jnp.nan, m["loss"])
      m["finite"] = m["finite"] & ~bad
      return new, m
    return s

  monkeypatch.setattr(trainer, "build_train_step", poisoned)
  with pytest.raises(FloatingPointError, match="diverged at step 3"):
    trainer.train(tiny_config(num_steps=8, checkpoint_every_steps=100), tmp_path,
                  devices=jax.devices()[:1])
  assert not (tmp_path / "final_params").exists()


# Resume after SIGKILL is tested on the multi-process path (tests/training/test_multihost.py):
# both processes killed mid-run, restarted, bit-identical final params.


def test_export_restores_and_slices_in_a_fresh_process_on_8_devices(trained):
  tmp_path, _ = trained
  script = f"""
import jax, jax.numpy as jnp, numpy as np, orbax.checkpoint as ocp
from matquant_jax.checkpoints.matquant_checkpoint import MatQuantCheckpoint
from matquant_jax.models import transformer
from matquant_jax.quant.plan import PrecisionPlan
from matquant_jax.training import sharding, trainer, objectives
assert jax.device_count() == 8
ck = MatQuantCheckpoint.load({str(tmp_path / 'matquant_int8')!r})
cfg = ck.config
mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
sh, _ = sharding.param_shardings(transformer.logical_axes(cfg), transformer.param_shapes(cfg), mesh)
flat = {{}}
def walk(prefix, node):
  for k, v in node.items():
    walk(prefix + k + '/', v) if isinstance(v, dict) else flat.__setitem__(prefix + k, v)
walk('', sh)
ck8 = MatQuantCheckpoint.load({str(tmp_path / 'matquant_int8')!r}, shardings=flat)
q = ck8.qtensors['layer_1/mlp/linear/w']
assert q.codes.sharding.num_devices == 8, q.codes.sharding
final = ocp.StandardCheckpointer().restore({str((tmp_path / 'final_params').absolute())!r})
obj = objectives.make_objective('matquant')
for plan, bits in (('ffn:int8', 8), ('ffn:int4', 4), ('ffn:int2', 2)):
  p = ck8.params_for(PrecisionPlan.parse(plan), jnp.float32)
  want = trainer.fake_quant_params(final, obj, bits)
  np.testing.assert_array_equal(np.asarray(p['layer_1']['mlp']['linear']['w']),
                                np.asarray(want['layer_1']['mlp']['linear']['w']))
  np.testing.assert_array_equal(np.asarray(p['layer_0']['attn']['q_einsum']['w']),
                                np.asarray(final['layer_0']['attn']['q_einsum']['w']).astype(jnp.bfloat16).astype(np.float32))
p = ck8.params_for(PrecisionPlan.parse('ffn:pyramid@3.0'))
print('OK', ck8.effective_bits(PrecisionPlan.parse('ffn:int2:ep')))
"""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8 "
             + os.environ["MATQUANT_TEST_CPU_FLAGS"], JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "OK 2." in r.stdout
  # About one byte per quantized weight on disk.
  arrays = tmp_path / "matquant_int8" / "arrays"
  disk = sum(f.stat().st_size for f in arrays.rglob("*") if f.is_file())
  from matquant_jax.models import config as mc
  cfg = mc.get_config("tiny_gemma2")
  n_q = cfg.num_layers * 3 * cfg.embed_dim * cfg.hidden_dim
  n_f = sum(int(np.prod(s)) for s in jax.tree_util.tree_leaves(
      jax.tree_util.tree_map(lambda x: x.shape, __import__("matquant_jax.models.transformer",
                                                           fromlist=["x"]).param_shapes(cfg)),
      is_leaf=lambda x: isinstance(x, tuple))) - n_q
  assert disk < 1.3 * (n_q + 2 * n_f) + 200_000


def test_sharded_step_equals_single_device(tmp_path):
  batch = None
  results = []
  for mesh in ({"data": 1, "fsdp": 1, "tensor": 1}, {"data": 2, "fsdp": 2, "tensor": 2}):
    c = tiny_config(**{f"mesh.{k}": v for k, v in mesh.items()})
    devices = jax.devices()[:int(np.prod(list(mesh.values())))]
    setup = trainer.resolve(c, devices=devices)
    tx, schedule = trainer.make_optimizer(c, setup)
    jitted, _, shardings, _ = trainer.compile_step(setup, tx, schedule)
    params = trainer.initial_params(c, setup, shardings.params, jax.random.key(0))
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    state = trainer.TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), shardings.step),
                               params=params, opt_state=opt_state)
    if batch is None:
      rng = np.random.default_rng(0)
      batch = {"inputs": rng.integers(0, 512, (8, 32)).astype(np.int32),
               "targets": rng.integers(0, 512, (8, 32)).astype(np.int32),
               "segment_ids": np.ones((8, 32), np.int32),
               "positions": np.tile(np.arange(32, dtype=np.int32), (8, 1)),
               "loss_mask": np.ones((8, 32), np.float32)}
    from matquant_jax.training import sharding as sh
    for _ in range(2):
      state, m = jitted(state, trainer._to_global(batch, sh.batch_sharding(setup.mesh)))
    results.append((jax.device_get(state.params), float(m["loss"])))
  (p1, l1), (p8, l8) = results
  assert l1 == pytest.approx(l8, rel=1e-5)
  # The sharded reductions add in another order, which can move a weight across a rounding
  # boundary of the fake quantizer: its gradient then changes, and Adam turns that into an
  # update of up to the learning rate per step. Allow that on a few elements (seen: 1 in 16,384
  # on one CPU); everything else agrees to float rounding.
  bound = 2 * c.optimizer.peak_lr
  for x, y in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p8)):
    close = np.isclose(x, y, rtol=2e-4, atol=2e-5)
    assert close.mean() >= 0.999, f"{(~close).sum()} of {close.size} elements differ"
    np.testing.assert_allclose(x, y, atol=bound)


def test_width_loop_reaches_the_objective(monkeypatch):
  """config.width_loop picks loss_and_grads' width loop (test_objectives checks that both loops
  give the same loss and gradients); tracing the step is enough to see which one runs."""
  from matquant_jax.training import objectives
  seen = []
  real = objectives.loss_and_grads

  def spy(*args, **kwargs):
    seen.append(kwargs["scan"])
    return real(*args, **kwargs)

  monkeypatch.setattr(objectives, "loss_and_grads", spy)
  for loop in ("scan", "unrolled"):
    c = tiny_config(**{"width_loop": loop, "mesh.fsdp": 1})
    setup = trainer.resolve(c, devices=jax.devices()[:1])
    assert setup.width_loop == loop and len(setup.objective.bits) == 3
    tx, schedule = trainer.make_optimizer(c, setup)
    params = jax.eval_shape(lambda: trainer.initial_params(c, setup, None, jax.random.key(0)))
    state = trainer.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                               opt_state=jax.eval_shape(tx.init, params))
    jax.eval_shape(trainer.build_train_step(setup, tx, schedule), state,
                   trainer.abstract_batch(setup))
  assert seen == [True, False]


def test_a_multi_process_run_refuses_a_device_subset(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(trainer.ConfigError, match="every device of every process"):
    trainer.train(tiny_config(), tmp_path / "run", devices=jax.devices()[:1])
  assert not (tmp_path / "run").exists()
