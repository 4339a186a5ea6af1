"""Optional test dependencies (the `parity` extra), imported on first use.

torch and transformers take seconds to import, and every xdist worker collects every test file;
only the worker that runs a parity test should pay for them. A missing package skips that test.
"""

import pytest


class LazyModule:
  """Stands for a module: each attribute access imports it (once; then from sys.modules) or
  skips the test that asked."""

  def __init__(self, name: str):
    self._name = name

  def __getattr__(self, attr):
    return getattr(pytest.importorskip(self._name), attr)
