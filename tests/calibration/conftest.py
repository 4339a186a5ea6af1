"""Shared tiny calibration setups (compiling a block step is most of this folder's runtime).

The test model is tiny_gemma2 cut to 2 layers with every layer on the sliding window: one
attention locality, so each objective compiles one block step, shared by every test through
block.block_functions' cache (same model, objective, options and mesh => same functions).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
import pytest

from matquant_jax import calibration
from matquant_jax.checkpoints import _common
from matquant_jax.models.config import AttentionPattern
from matquant_jax.models.config import NormType
from matquant_jax.quant.kernels import BY_NAME as KERNEL
from matquant_jax.models.config import get_config

NUM_SAMPLES = 16
SEQ_LEN = 32
STEPS = 100
LR = 3e-2  # a tiny block converges in ~100 steps at this rate (the paper's 1e-3 takes 1,000s)


def tiny_model():
  return get_config("tiny_gemma2").replace(
      name="tiny_gemma2_2l_local", num_layers=2, attention_pattern=AttentionPattern.LOCAL)


def tiny_config(**overrides):
  c = calibration.default_config()
  c.model = "tiny_gemma2"
  c.init = "random"
  c.data.source = "kjv"
  c.data.num_samples = NUM_SAMPLES
  c.data.seq_len = SEQ_LEN
  c.calibration.batch_size = 4
  c.calibration.steps_per_block = STEPS
  c.calibration.lr = LR
  c.calibration.compute_dtype = "float32"
  c.log_every_steps = 50
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def tiny_setup(*, num_devices: int = 1, **overrides) -> calibration.CalibSetup:
  """A resolved setup for the 2-layer test model (resolve() only knows the presets), on the
  first `num_devices` host devices: one unless a test is about the mesh (8 CPU devices on 2
  cores run a tiny block step slower than one)."""
  setup = calibration.resolve(tiny_config(**overrides), devices=jax.devices()[:num_devices])
  return dataclasses.replace(setup, model=tiny_model())


def random_params(config, seed=0, norm_noise=0.0):
  """A host-numpy parameter tree with fan-in scaled Gaussian kernels (no compilation, unlike
  init_params); norm scales at their identity value plus optional noise."""
  rng = np.random.default_rng(seed)
  flat = {}
  for name, shape in _common.expected_param_shapes(config).items():
    parts = name.split("/")
    if parts[-1] == "scale":
      base = 0.0 if config.norm_type == NormType.ZERO_CENTERED else 1.0
      flat[name] = (base + rng.normal(0.0, norm_noise, shape)).astype(np.float32)
      continue
    if parts[-2] in KERNEL:
      fan_in = int(np.prod([shape[a] for a in KERNEL[parts[-2]].reduce_axes]))
    else:  # embedding [V, D] and lm_head [D, V]
      fan_in = shape[1] if parts[-1] == "input_embedding" else shape[0]
    flat[name] = rng.normal(0.0, fan_in ** -0.5, shape).astype(np.float32)
  return _common.unflatten_tree(flat)


@functools.lru_cache(maxsize=None)
def tiny_params():
  return random_params(tiny_model(), seed=1)


def tiny_tokens():
  rng = np.random.default_rng(0)
  seg = np.ones((NUM_SAMPLES, SEQ_LEN), np.int32)
  seg[0, -5:] = 0  # some padding: the loss must ignore it
  pos = np.tile(np.arange(SEQ_LEN, dtype=np.int32), (NUM_SAMPLES, 1))
  # Two documents in one row: attention and positions restart at the boundary.
  seg[1, 20:] = 2
  pos[1, 20:] = np.arange(SEQ_LEN - 20)
  return {"inputs": rng.integers(3, 500, (NUM_SAMPLES, SEQ_LEN)).astype(np.int32),
          "positions": pos, "segment_ids": seg}


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory):
  """A full MatQuant calibration of the test model, with its results kept in a workdir."""
  setup = tiny_setup()
  workdir = tmp_path_factory.mktemp("calib_full")
  result = calibration.calibrate_blocks(setup, tiny_params(), tiny_tokens(), workdir=workdir)
  return setup, result, workdir


@pytest.fixture(scope="session")
def tiny():
  """This module's helpers (tests cannot import a conftest by name: tests/ has several)."""
  import sys
  return sys.modules[__name__]
