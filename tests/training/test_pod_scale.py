"""Pod-scale memory in the train step: ZeRO-3 optimizer state, scanned layers, chunked loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matquant_jax.training import sharding
from matquant_jax.training import trainer
from tests.training.test_trainer import tiny_config


def _batch(seed=0, b=8, t=32):
  rng = np.random.default_rng(seed)
  return {"inputs": rng.integers(0, 512, (b, t)).astype(np.int32),
          "targets": rng.integers(0, 512, (b, t)).astype(np.int32),
          "segment_ids": np.ones((b, t), np.int32),
          "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
          "loss_mask": np.ones((b, t), np.float32)}


def _init_state(c, setup, tx, shardings):
  params = trainer.initial_params(c, setup, shardings.params, jax.random.key(0))
  opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
  return trainer.TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), shardings.step),
                            params=params, opt_state=opt_state)


def _shard_count(x) -> int:
  return int(np.prod([x.sharding.mesh.shape[a] for axes in x.sharding.spec if axes
                      for a in (axes if isinstance(axes, tuple) else (axes,))]))


def test_optimizer_state_is_sharded_like_the_params():
  c = tiny_config(**{"mesh.data": 1, "mesh.fsdp": 8, "optimizer.grad_clip_norm": 1.0})
  setup = trainer.resolve(c, devices=jax.devices()[:8])
  tx, schedule = trainer.make_optimizer(c, setup)
  jitted, _, shardings, _ = trainer.compile_step(setup, tx, schedule)
  state = _init_state(c, setup, tx, shardings)
  # After a step (the compiled step's own output layout), not only after init.
  state, _ = jitted(state, trainer._to_global(_batch(), sharding.batch_sharding(setup.mesh)))
  p_flat = {jax.tree_util.keystr(p): x for p, x in
            jax.tree_util.tree_flatten_with_path(state.params)[0]}
  moments = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]:
    name = jax.tree_util.keystr(path)
    per_device = leaf.addressable_shards[0].data.nbytes
    assert per_device * _shard_count(leaf) == leaf.nbytes, name
    if leaf.ndim:  # Adam's mu and nu: exactly their param's sharding
      moments += 1
      twin = [p for k, p in p_flat.items() if name.endswith(k)]
      assert twin and leaf.sharding == twin[0].sharding, name
  assert moments == 2 * len(p_flat)
  # fsdp=8 divides the width 64 of every param and moment: all are split 8 ways (ZeRO-3).
  assert all(_shard_count(x) == 8 for x in jax.tree_util.tree_leaves(state.params))
  assert sum(_shard_count(x) == 8 for x in jax.tree_util.tree_leaves(state.opt_state)) == moments


@pytest.mark.parametrize("codistill", ["", "[8,4,2,8->2]"])
def test_scanned_chunked_step_equals_per_layer_full_logits_step(codistill):
  from matquant_jax.models import transformer
  results = []
  # The reference also quantizes the whole param tree up front; the scanned step quantizes
  # inside each layer (fake_quant_at's default for a scan over widths).
  for scan, remat, chunk, at in ((False, "none", 0, "tree"), (True, "full", 8, "auto")):
    c = tiny_config(**{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "scan_layers": scan,
                       "remat": remat, "loss_chunk_size": chunk, "fake_quant_at": at})
    if codistill:
      c.objective.codistill = codistill
      c.objective.weights = (0.2, 0.2, 1.0)
    setup = trainer.resolve(c, devices=jax.devices()[:8])
    assert setup.fake_quant_at == ("layers" if scan else "tree")
    # The scanned step adds each width's gradient into the running sum inside the backward
    # pass of the layer stack; the reference computes each width's gradient and adds it.
    assert setup.accumulate_grads == ("in_place" if scan else "add")
    tx, schedule = trainer.make_optimizer(c, setup)
    jitted, _, shardings, _ = trainer.compile_step(setup, tx, schedule)
    if not scan:
      state = _init_state(c, setup, tx, shardings)
      start = jax.device_get(state.params)  # the step donates its input
    else:  # the same starting weights, stacked at the boundary
      params = jax.jit(lambda p: transformer.stack_layers(p, setup.model),
                       out_shardings=shardings.params)(start)
      state = trainer.TrainState(
          step=jax.device_put(jnp.zeros((), jnp.int32), shardings.step), params=params,
          opt_state=jax.jit(tx.init, out_shardings=shardings.opt_state)(params))
    for i in range(2):
      state, m = jitted(state, trainer._to_global(_batch(i), sharding.batch_sharding(setup.mesh)))
    params = jax.device_get(state.params)
    if scan:
      params = transformer.unstack_layers(params, setup.model)
    results.append((params, float(m["loss"])))
  (p_layer, l_layer), (p_scan, l_scan) = results
  assert l_layer == pytest.approx(l_scan, rel=1e-5)
  for x, y in zip(jax.tree_util.tree_leaves(p_layer), jax.tree_util.tree_leaves(p_scan)):
    np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("overrides,match", [
    ({"remat": "some"}, "config.remat='some'"),
    ({"remat": "full", "scan_layers": False}, "needs config.scan_layers=True"),
    ({"loss_chunk_size": -1}, "loss_chunk_size"),
    ({"fake_quant_at": "everywhere"}, "config.fake_quant_at='everywhere'"),
    ({"accumulate_grads": "sometimes"}, "config.accumulate_grads='sometimes'"),
    ({"accumulate_grads": "in_place", "scan_layers": True},
     "needs config.remat='full'"),
])
def test_pod_scale_options_are_validated(overrides, match):
  from matquant_jax.training.config import ConfigError
  with pytest.raises(ConfigError, match=match):
    trainer.resolve(tiny_config(**overrides), devices=jax.devices()[:1])


def test_paper_step_count_is_the_data_pipelines_batch_count():
  # One source: 100M tokens / (16 × 8192) packs into 12,208 rows -> 763 batches (the last row
  # partly filled), and the LR schedule runs exactly that many steps.
  from matquant_jax.data import lm
  from matquant_jax.training.config import paper_qat_config
  c = paper_qat_config("gemma2_9b")
  c.aot_only = True
  setup = trainer.resolve(c, devices=jax.devices()[:1])
  assert setup.num_steps == lm.budget_num_batches(trainer.data_config(c)) == 763


def test_fake_quant_at_auto_quantizes_in_layers_only_for_a_scan_over_widths():
  def at(**overrides):
    return trainer.resolve(tiny_config(**overrides), devices=jax.devices()[:8]).fake_quant_at
  assert at() == "layers"                                   # MatQuant [8, 4, 2], scanned
  assert at(width_loop="unrolled") == "tree"
  assert at(**{"objective.method": "single_precision"}) == "tree"   # one width
  assert at(fake_quant_at="tree") == "tree" and at(
      **{"objective.method": "single_precision", "fake_quant_at": "layers"}) == "layers"


def test_accumulate_grads_auto_is_in_place_wherever_it_applies():
  def acc(**overrides):
    return trainer.resolve(tiny_config(**overrides),
                           devices=jax.devices()[:8]).accumulate_grads
  def pod(**overrides):
    return acc(**{"scan_layers": True, "remat": "full", **overrides})
  assert pod() == "in_place"                                # MatQuant [8, 4, 2], scanned
  assert pod(accumulate_grads="add") == "add"
  assert acc() == "add"                                     # per-layer params
  assert pod(remat="dots") == "add"
  assert pod(width_loop="unrolled") == "add"
  assert pod(fake_quant_at="tree") == "add"
  assert pod(**{"objective.method": "single_precision"}) == "add"   # one width
  assert pod(**{"objective.codistill": "[8,4,2,8->2]"}) == "in_place"
  assert pod(**{"objective.codistill": "[8,4,2,8->2]",
                "objective.stop_teacher_grad": False}) == "add"


@pytest.mark.parametrize("scan_layers", [False, True])
def test_quantizing_in_layers_equals_quantizing_the_tree(scan_layers):
  """Both fake_quant_at placements give the same logits at every traced width, with attention
  kernels in scope and Extra Precision (the pod-scale step test covers the FFN scope)."""
  from matquant_jax.models import get_config
  from matquant_jax.models import transformer
  from matquant_jax.training import objectives
  model = get_config("tiny_gemma2")
  objective = objectives.make_objective("matquant", scope="ffn+attn", extra_precision=True)
  tree_fn, layer_fn = (trainer.make_apply_fn(model, objective, jnp.float32,
                                             scan_layers=scan_layers, quantize_in_layers=q)
                       for q in (False, True))
  params = transformer.init_params(model, jax.random.key(4, impl="rbg"))
  if scan_layers:
    params = transformer.stack_layers(params, model)
  batch = {"inputs": jax.random.randint(jax.random.key(5), (2, 16), 0, model.vocab_size)}
  both = jax.jit(lambda p: jax.lax.map(
      lambda r: (tree_fn(p, batch, r), layer_fn(p, batch, r)), jnp.asarray([8, 4, 2])))(params)
  np.testing.assert_array_equal(both[0], both[1])
  # The widths differ from each other (the width really is traced through the layers).
  assert not np.allclose(both[1][0], both[1][2])


def test_a_checkpoint_is_stacked_into_the_scanned_layout_on_its_shardings(tmp_path):
  import warnings
  from matquant_jax.checkpoints import save_hf_checkpoint
  from matquant_jax.checkpoints import weight_source
  from matquant_jax.models import get_config
  from matquant_jax.models import init_params
  from matquant_jax.models import transformer
  model = get_config("tiny_gemma2")
  params = init_params(model, jax.random.key(1))
  save_hf_checkpoint(tmp_path / "ckpt", model, params)
  c = tiny_config(**{"init": f"hf:{tmp_path / 'ckpt'}", "mesh.data": 2, "mesh.fsdp": 4})
  setup = trainer.resolve(c, devices=jax.devices()[:8])
  assert setup.scan_layers
  shardings = trainer.param_shardings(setup)[0]
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # e.g. jax's "donated buffers were not usable"
    got = trainer.initial_params(c, setup, shardings, jax.random.key(0))
  # The per-layer tree every reader yields, stacked on the host.
  want = transformer.stack_layers(weight_source.load(c.init, setup.model)[1], setup.model)
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  for (path, g), w, s in zip(jax.tree_util.tree_flatten_with_path(got)[0],
                             jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(shardings)):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=jax.tree_util.keystr(path))
    assert g.sharding == s, jax.tree_util.keystr(path)
