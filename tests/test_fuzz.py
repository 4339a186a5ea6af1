"""Property-based fuzzing of every user-facing parser: a clear library error or a correct
result, never anything else (no KeyError/TypeError/IndexError from deep inside)."""

from __future__ import annotations

import json
import math
import shutil
import warnings

import jax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from matquant_jax.checkpoints._common import CheckpointError
from matquant_jax.quant.plan import PrecisionPlan

FAST = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# Plan grammar ----------------------------------------------------------------------------------

_TOKENS = ["bf16", "ffn", "attn", "ffn+attn", ":", "int", "@", "(", ")", ",", "[", "]", "/",
           "ep", "parent=", "tiers=", "mid=", "rule=", "three_tier", "min_spread", "pyramid",
           "reverse_pyramid", "increasing", "decreasing", "0", "1", "2", "3", "4", "6", "8", "9",
           "3.0", "2.5", "-1", " ", "x", "1e3", ".5"]


@FAST
@given(st.lists(st.sampled_from(_TOKENS), min_size=0, max_size=12).map("".join),
       st.integers(1, 30))
def test_plan_grammar(text, depth):
  try:
    plan = PrecisionPlan.parse(text)
  except ValueError:
    return
  assert PrecisionPlan.parse(str(plan)) == plan
  try:
    bits = plan.layer_bits(depth) if plan.is_quantized else None
  except ValueError:
    return
  if bits is not None:
    assert len(bits) == depth
    assert plan.effective_bits(depth) <= 8.0


# Config overrides -----------------------------------------------------------------------------

_NUMBERS = st.one_of(st.integers(-10**6, 10**6),
                     st.floats(allow_nan=True, allow_infinity=True, width=32))
_QAT_FIELDS = ["num_steps", "optimizer.peak_lr", "optimizer.warmup_steps", "optimizer.b1",
               "optimizer.b2", "optimizer.eps", "optimizer.weight_decay",
               "optimizer.final_lr_fraction", "optimizer.grad_clip_norm", "data.seq_len",
               "data.global_batch_size", "data.num_shards", "log_every_steps",
               "checkpoint_every_steps", "keep_checkpoints", "loss_chunk_size", "mesh.data"]


def _set(config, path, value):
  node = config
  *parents, leaf = path.split(".")
  for p in parents:
    node = node[p]
  current = node[leaf]
  if isinstance(current, int) and not isinstance(current, bool):
    if not isinstance(value, int):
      if not math.isfinite(value):
        return False
      value = int(value)
  elif isinstance(value, int):
    value = float(value)
  node[leaf] = value
  return True


@FAST
@given(st.lists(st.tuples(st.sampled_from(_QAT_FIELDS), _NUMBERS), min_size=1, max_size=3))
def test_qat_config_overrides(overrides):
  from tests.training.test_trainer import tiny_config
  from matquant_jax.training import trainer
  c = tiny_config()
  for path, value in overrides:
    if not _set(c, path, value):
      return
  try:
    setup = trainer.resolve(c, devices=jax.devices()[:8])
  except trainer.ConfigError:
    return
  assert setup.num_steps > 0 and setup.global_batch_size > 0 and setup.seq_len > 1


_CALIB_FIELDS = ["calibration.lr", "calibration.lwc_lr", "calibration.b1", "calibration.b2",
                 "calibration.eps", "calibration.batch_size", "calibration.steps_per_block",
                 "calibration.num_microbatches", "calibration.lwc_init_logit",
                 "data.num_samples", "data.seq_len", "log_every_steps", "mesh.data"]


@FAST
@given(st.lists(st.tuples(st.sampled_from(_CALIB_FIELDS), _NUMBERS), min_size=1, max_size=3))
def test_calibration_config_overrides(overrides):
  from matquant_jax.calibration import config as calib_config
  c = calib_config.default_config()
  c.model = "tiny_gemma2"
  c.data.num_samples, c.data.seq_len = 8, 32
  for path, value in overrides:
    if not _set(c, path, value):
      return
  try:
    setup = calib_config.resolve(c)
  except calib_config.ConfigError:
    return
  assert setup.steps_per_block > 0 and setup.num_samples % setup.batch_size == 0


# safetensors headers ---------------------------------------------------------------------------

_JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 10**4), st.floats(allow_nan=False),
              st.text(max_size=5)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=4), inner, max_size=3)),
    max_leaves=8)
_ENTRY = st.one_of(
    _JSON,
    st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "BF16", "I8", "XX", 3]),
                           "shape": st.one_of(st.lists(st.integers(-2, 6), max_size=3), _JSON),
                           "data_offsets": st.one_of(
                               st.lists(st.integers(-4, 200), min_size=0, max_size=3), _JSON)}))


@FAST
@given(st.one_of(st.dictionaries(st.text(min_size=1, max_size=6), _ENTRY, max_size=4), _JSON),
       st.binary(max_size=128))
def test_safetensors_headers(tmp_path_factory, header, data):
  from matquant_jax.checkpoints.safetensors_io import list_tensors
  f = tmp_path_factory.mktemp("st") / "fuzz.safetensors"
  raw = json.dumps(header).encode()
  f.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
  try:
    infos = list_tensors([f])
  except CheckpointError as e:
    assert str(f) in str(e)
    return
  for info in infos.values():  # what is listed can be read from the file
    assert info.data_start + info.offsets[1] <= f.stat().st_size


# int8 checkpoint metadata ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  from matquant_jax.checkpoints.matquant_checkpoint import export_matquant_checkpoint
  from matquant_jax.models import get_config, init_params
  config = get_config("tiny_gemma2")
  params = init_params(config, jax.random.key(0, impl="rbg"))
  return export_matquant_checkpoint(tmp_path_factory.mktemp("fz") / "ckpt", config, params)


_META_FIELDS = ["format", "version", "scope", "parent_bits", "round_zero", "float_dtype",
                "quantized", "metadata", "checksums", "model_config"]


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.sampled_from(_META_FIELDS),
       st.one_of(_JSON, st.integers(-3, 12), st.sampled_from(
           ["ffn", "attn", "ffn+attn", "bfloat16", "float16", "int8", "matquant_jax.int8"])))
def test_checkpoint_metadata(exported, tmp_path_factory, field, value):
  from matquant_jax.checkpoints.matquant_checkpoint import MatQuantCheckpoint
  path = tmp_path_factory.mktemp("m") / "ckpt"
  shutil.copytree(exported, path)
  meta = json.loads((path / "metadata.json").read_text())
  original = meta.get(field)
  meta[field] = value
  (path / "metadata.json").write_text(json.dumps(meta))
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # checkpoints without checksums warn; expected here
      ckpt = MatQuantCheckpoint.load(path)
  except CheckpointError:
    return
  finally:
    shutil.rmtree(path, ignore_errors=True)
  # Accepted: the value must have been harmless (e.g. equal to the original, free-form
  # metadata, or an older version number).
  # A null checksums entry reads as a pre-checksum checkpoint (loaded with a warning).
  assert (field in ("metadata", "version") or value == original or
          (field == "checksums" and value is None)), (field, value)
  assert ckpt.parent_bits == 8
