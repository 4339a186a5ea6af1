"""Each subpackage states its public API in __all__, and every name there resolves."""

import importlib
import subprocess
import sys

import pytest

SUBPACKAGES = ("quant", "models", "checkpoints", "data", "training", "calibration", "serving",
               "evaluation")


@pytest.mark.parametrize("name",
                         ("matquant_jax",) + tuple(f"matquant_jax.{p}" for p in SUBPACKAGES))
def test_all_names_resolve(name):
  module = importlib.import_module(name)
  assert module.__all__ and len(set(module.__all__)) == len(module.__all__)
  for attr in module.__all__:
    assert getattr(module, attr) is not None, f"{name}.{attr}"


def test_calibration_does_not_import_the_train_loop():
  # A fresh interpreter: in this one other tests have imported the trainer already.
  code = ("import sys, matquant_jax.calibration, matquant_jax.calibrate; "
          "print('matquant_jax.training.trainer' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"


def test_facade_names():
  import matquant_jax
  from matquant_jax import quant
  assert callable(matquant_jax.fake_quant) and callable(quant.fake_quant.fake_quant)
  assert str(matquant_jax.PrecisionPlan.parse("ffn:int4")) == "ffn:int4"
