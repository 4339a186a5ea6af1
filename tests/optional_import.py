"""Optional test dependencies (the `parity` extra), imported on first use.

torch and transformers take seconds to import, and every xdist worker collects every test file;
only the worker that runs a parity test should pay for them. A missing package skips that test.
"""

import pytest


class LazyModule:
  """Stands for a module: each public attribute access imports it (once; then from sys.modules)
  or skips the test that asked."""

  def __init__(self, name: str):
    self._name = name

  def __getattr__(self, attr):
    # Collection probes every module global for pytest's markers (`__pytest_wrapped__`,
    # `_pytestfixturefunction`, ...): answering those must not import the module.
    if attr.startswith("_"):
      raise AttributeError(attr)
    return getattr(pytest.importorskip(self._name), attr)
