"""The int8 MatQuant checkpoint refuses corrupted or inconsistent files, naming the problem."""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from matquant_jax.checkpoints import _common
from matquant_jax.checkpoints._common import CheckpointError
from matquant_jax.checkpoints.matquant_checkpoint import MatQuantCheckpoint
from matquant_jax.checkpoints.matquant_checkpoint import export_matquant_checkpoint
from matquant_jax.models import get_config
from matquant_jax.models import init_params


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> pathlib.Path:
  config = get_config("tiny_gemma2")
  params = init_params(config, jax.random.key(1, impl="rbg"))
  return export_matquant_checkpoint(tmp_path_factory.mktemp("mq") / "ckpt", config, params)


def _copy(src: pathlib.Path, tmp_path) -> pathlib.Path:
  dst = tmp_path / "copy"
  shutil.copytree(src, dst)
  return dst


def _edit_meta(path: pathlib.Path, **changes) -> None:
  meta = json.loads((path / "metadata.json").read_text())
  for k, v in changes.items():
    if v is _DROP:
      meta.pop(k, None)
    else:
      meta[k] = v
  (path / "metadata.json").write_text(json.dumps(meta))


_DROP = object()


def _rewrite_arrays(path: pathlib.Path, edit) -> None:
  """Rewrites <path>/arrays with `edit(flat numpy dict)` applied (as a tampering tool would)."""
  restored = ocp.StandardCheckpointer().restore((path / "arrays").absolute())
  flat = {k: np.asarray(v) for k, v in _common.flatten_tree(restored).items()}
  edit(flat)
  shutil.rmtree(path / "arrays")
  ckptr = ocp.StandardCheckpointer()
  ckptr.save((path / "arrays").absolute(), _common.unflatten_tree(flat))
  ckptr.wait_until_finished()


def test_round_trip_verifies_checksums(exported):
  meta = json.loads((exported / "metadata.json").read_text())
  assert meta["checksums"] and all(len(v) == 32 for v in meta["checksums"].values())
  ckpt = MatQuantCheckpoint.load(exported)
  assert ckpt.parent_bits == 8


@pytest.mark.parametrize("changes, match", [
    (dict(float_dtype="int8"), "float_dtype='int8' is not one of"),
    (dict(float_dtype="float16"), "stored as bfloat16.*implies float16"),
    (dict(parent_bits=9), "parent_bits=9 is outside 1..8"),
    (dict(parent_bits="8"), "parent_bits='8' is not a int"),
    (dict(parent_bits=4), "code 2[0-9][0-9], above the 4-bit range"),
    (dict(scope="everything"), "scope='everything'"),
    (dict(round_zero=_DROP), "lacks 'round_zero'"),
    (dict(quantized={"layer_0/mlp/linear/w": [1]}), "contracting axes"),
    (dict(model_config={"name": "x"}), "model_config is invalid"),
    (dict(checksums={"float/final_norm/scale": [[[[0, "64"]], "00"]]}), "region, digest"),
])
def test_metadata_is_checked(exported, tmp_path, changes, match):
  path = _copy(exported, tmp_path)
  _edit_meta(path, **changes)
  with pytest.raises(CheckpointError, match=match):
    MatQuantCheckpoint.load(path)


def test_metadata_that_is_not_json(exported, tmp_path):
  path = _copy(exported, tmp_path)
  (path / "metadata.json").write_text("{not json")
  with pytest.raises(CheckpointError, match="not valid JSON"):
    MatQuantCheckpoint.load(path)


def test_a_changed_array_fails_its_checksum(exported, tmp_path):
  path = _copy(exported, tmp_path)

  def nudge(flat):
    k = "quantized/layer_1/mlp/linear/w/codes"
    flat[k] = flat[k].copy()
    flat[k][3, 5] ^= 1  # one flipped bit of one code
  _rewrite_arrays(path, nudge)
  with pytest.raises(CheckpointError, match="'quantized/layer_1/mlp/linear/w/codes' does not "
                                            "match its checksum"):
    MatQuantCheckpoint.load(path)


def test_a_flipped_byte_on_disk_is_refused(exported, tmp_path):
  path = _copy(exported, tmp_path)
  data = max((p for p in (path / "arrays").rglob("*") if p.is_file()),
             key=lambda p: p.stat().st_size)
  raw = bytearray(data.read_bytes())
  raw[len(raw) // 2] ^= 0xFF
  data.write_bytes(bytes(raw))
  with pytest.raises(CheckpointError):
    MatQuantCheckpoint.load(path)


@pytest.mark.parametrize("edit, match", [
    (lambda f: f.__setitem__("quantized/layer_0/mlp/linear/w/scale",
                             np.full_like(f["quantized/layer_0/mlp/linear/w/scale"], np.nan)),
     "'quantized/layer_0/mlp/linear/w/scale' has non-finite or non-positive"),
    (lambda f: f.__setitem__("quantized/layer_0/mlp/linear/w/scale",
                             -f["quantized/layer_0/mlp/linear/w/scale"]),
     "non-positive scales"),
    (lambda f: f.__setitem__("float/final_norm/scale",
                             np.full_like(f["float/final_norm/scale"], np.inf)),
     "'float/final_norm/scale' has non-finite"),
])
def test_old_checkpoints_warn_and_values_are_checked(exported, tmp_path, edit, match):
  path = _copy(exported, tmp_path)
  _edit_meta(path, checksums=_DROP)  # a checkpoint from before checksums existed
  _rewrite_arrays(path, edit)
  with pytest.warns(UserWarning, match="no array checksums"), \
       pytest.raises(CheckpointError, match=match):
    MatQuantCheckpoint.load(path)


def test_old_checkpoint_without_checksums_loads_with_a_warning(exported, tmp_path):
  path = _copy(exported, tmp_path)
  _edit_meta(path, checksums=_DROP)
  with pytest.warns(UserWarning, match="no array checksums"):
    ckpt = MatQuantCheckpoint.load(path)
  assert len(ckpt.qtensors) == 2 * get_config("tiny_gemma2").num_layers


def test_export_refuses_non_finite_weights_by_name(tmp_path):
  config = get_config("tiny_gemma2")
  params = init_params(config, jax.random.key(1, impl="rbg"))
  w = np.array(params["layer_2"]["mlp"]["linear"]["w"])
  w[7, 11] = np.nan
  params["layer_2"]["mlp"]["linear"]["w"] = jnp.asarray(w)
  with pytest.raises(ValueError, match=r"'layer_2/mlp/linear/w'.*output channel \(11,\)"):
    export_matquant_checkpoint(tmp_path / "x", config, params)
  assert not (tmp_path / "x").exists()


def test_codes_stored_wider_than_uint8_are_refused_before_reading(exported, tmp_path):
  path = _copy(exported, tmp_path)

  def widen(f):  # int32 codes above 255 would wrap modulo 256 if cast to uint8
    k = "quantized/layer_0/mlp/linear/w/codes"
    f[k] = f[k].astype(np.int32) + 200
  _rewrite_arrays(path, widen)
  with pytest.raises(CheckpointError, match="'quantized/layer_0/mlp/linear/w/codes' is stored "
                                            "as int32"):
    MatQuantCheckpoint.load(path)


def test_extra_precision_checkpoint_refuses_clamped_plans_unless_asked(tmp_path):
  from matquant_jax.quant.plan import PrecisionPlan
  from matquant_jax.serving import loader
  config = get_config("tiny_gemma2")
  params = init_params(config, jax.random.key(2, impl="rbg"))
  path = export_matquant_checkpoint(tmp_path / "ep", config, params,
                                    metadata={"objective": "extra_precision [8,4,2] λ=(1,1,1) "
                                              "ffn ep", "extra_precision": True})
  ckpt = MatQuantCheckpoint.load(path)
  assert ckpt.trained_extra_precision
  for plan in ("ffn:int2", "ffn:pyramid@3.0", "ffn:[2,4,8,8]"):
    with pytest.raises(ValueError, match="trained with Extra Precision"):
      ckpt.params_for(PrecisionPlan.parse(plan))
    with pytest.raises(ValueError, match="add ':ep'"):
      loader.load_serving(path, plan)
  ckpt.params_for(PrecisionPlan.parse("ffn:int2:ep"))   # what it was trained for
  ckpt.params_for(PrecisionPlan.parse("ffn:int8"))      # the parent width is not sliced
  ckpt.params_for(PrecisionPlan.parse("ffn:int2"), allow_clamped=True)
  loader.load_serving(path, "ffn:int2", allow_clamped=True)


def test_shard_checksums_verify_every_region_and_catch_a_changed_code(exported, tmp_path):
  """A pod's export records [region, digest] per shard (no process holds a whole sharded
  array); the parts merge into one sorted list, and a reader holding the array checks each
  region."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from matquant_jax.checkpoints import matquant_checkpoint as mq
  path = _copy(exported, tmp_path)
  name = "quantized/layer_1/mlp/linear/w/codes"
  meta = json.loads((path / "metadata.json").read_text())
  codes = np.asarray(_common.flatten_tree(
      ocp.StandardCheckpointer().restore((path / "arrays").absolute()))[name])
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2), ("a", "b"))
  digests = mq.shard_digests(jax.device_put(codes, NamedSharding(mesh, P("a"))))
  assert len(digests) == 4  # one copy of each of the 4 row blocks (replicas skipped)
  shapes = {name: codes.shape}
  merged = mq.merge_checksums([{name: digests[:1]}, {name: digests[1:]}], shapes)[name]
  assert merged == sorted(digests)
  with pytest.raises(ValueError, match="cover"):
    mq.merge_checksums([{name: digests[1:]}], shapes)
  # A replicated array's one region is the whole array: its plain digest, as one process writes.
  whole = mq.shard_digests(jax.device_put(codes, NamedSharding(mesh, P())))
  assert mq.merge_checksums([{name: whole}, {name: whole}], shapes)[name] == meta["checksums"][name]
  _edit_meta(path, checksums=dict(meta["checksums"], **{name: merged[1:]}))
  with pytest.raises(CheckpointError, match="does not match its checksum"):
    MatQuantCheckpoint.load(path)  # a region list must cover the array
  _edit_meta(path, checksums=dict(meta["checksums"], **{name: merged}))
  MatQuantCheckpoint.load(path)

  def nudge(flat):
    flat[name] = flat[name].copy()
    flat[name][-1, -1] ^= 1  # in the last region
  _rewrite_arrays(path, nudge)
  with pytest.raises(CheckpointError, match=f"{name!r} does not match its checksum"):
    MatQuantCheckpoint.load(path)
