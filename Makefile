# `make test` is the project's test command (README, .ci/run): it builds .venv from setup.py
# with the test, parity and tpu extras, then runs the whole suite on CPU (libtpu is only used to
# compile tiny models for a TPU topology: tests/training/test_tpu_aot.py).
# `make demo` is the README's main command: the built-in demo (needs only the base install).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test demo install clean

$(VENV)/.base: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed: $(VENV)/.base
	$(PY) -m pip install --quiet -e '.[test,parity,tpu]'
	touch $@

install: $(VENV)/.installed

# pytest exits 5 when it collects no test; make treats any non-zero exit as failure. Three
# pytest-xdist workers on CI's two cores (a worker often waits on one thread: XLA compiling, or
# a test's subprocesses; measured 9 min 49 s vs 10 min 15 s with two), each test file on one
# worker so its module fixtures run once, handed files in tests/conftest.py's order, slowest
# first, rather than xdist's default of most tests first.
test: $(VENV)/.installed
	TPU_SKIP_MDS_QUERY=1 $(PY) -m pytest -q -n 3 --dist loadfile --no-loadscope-reorder --durations=20 tests

# The built-in demo: tokenizer, pretraining, baseline and MatQuant QAT, OmniQuant calibration,
# evaluation of every slice and Mix'n'Match plan on the bundled text; results in results/demo/.
demo: $(VENV)/.base
	$(PY) -m matquant_jax.demo

clean:
	rm -rf $(VENV) build *.egg-info
