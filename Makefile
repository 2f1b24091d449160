# vireid_fast — set-up, tests, demo and benchmarks.
#   make demo   set up (if needed) and run the main job: DCL and the supervised ceiling from the synthetic-pretrained
#               start, two seeds, and the comparison table (runs/demo/results.md)
#   make test   set up (if needed) and run the test suite, then the op tests without the compiled extension
#   make bench  benchmarks (pytest-benchmark, saved);  make bench-compare  fail on a median regression
# Set-up: uses the active virtual environment (VIRTUAL_ENV / CONDA_PREFIX) if there is one, else creates .venv;
# installs the CPU torch build unless a torch (e.g. a CUDA build) is already installed, then the package with its
# compiled extension. TORCH_SPEC / PIP_TORCH_ARGS choose the torch to install.

SHELL := /bin/bash
TORCH_SPEC ?= torch==2.13.0
PIP_TORCH_ARGS ?=
PYTEST_ARGS ?=
BENCH_FAIL ?= median:15%

ifneq ($(VIRTUAL_ENV),)
  PY := $(VIRTUAL_ENV)/bin/python
  STAMP_DIR := build/.stamps
else ifneq ($(CONDA_PREFIX),)
  PY := $(CONDA_PREFIX)/bin/python
  STAMP_DIR := build/.stamps
else
  PY := .venv/bin/python
  STAMP_DIR := .venv/.stamps
endif
BASE_PY ?= python3

CSRC := $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu)
DEPS_STAMP := $(STAMP_DIR)/deps
BUILD_STAMP := $(STAMP_DIR)/build

.PHONY: setup build test demo bench bench-compare lint clean

$(PY):
	$(BASE_PY) -m venv .venv

$(DEPS_STAMP): pyproject.toml | $(PY)
	@mkdir -p $(STAMP_DIR)
	@if $(PY) -c "import torch" 2>/dev/null; then \
	  echo "using installed torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else $(PY) -m pip install $(PIP_TORCH_ARGS) "$(TORCH_SPEC)"; fi
	$(PY) -m pip install "setuptools>=69" wheel ninja
	$(PY) -m pip install -e ".[test,bench]" --no-build-isolation
	@touch $@ $(BUILD_STAMP)

$(BUILD_STAMP): $(DEPS_STAMP) $(CSRC) setup.py
	$(PY) setup.py -q build_ext --inplace
	@touch $@

setup: $(DEPS_STAMP) $(BUILD_STAMP)

build: setup

# The second run checks the fallback configuration (no compiled extension: the reference kernels behind the same
# validation layer) on the op tests; tests that need the extension skip there, and the Triton-interpreter tests
# (which do not use the extension and ran in the first pass) are left out to keep it short.
test: setup
	$(PY) -m pytest $(PYTEST_ARGS)
	VIREID_DISABLE_EXTENSION=1 $(PY) -m pytest tests/ops -m "not triton" -p no:cacheprovider $(PYTEST_ARGS)

DEMO_SEEDS ?= 0,1
DEMO_JOBS ?= 2

demo: setup
	$(PY) -m vireid_fast.cli compare --methods dcl,supervised --seeds $(DEMO_SEEDS) --jobs $(DEMO_JOBS) \
	  --output-dir runs/demo

bench: setup
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-autosave $(PYTEST_ARGS)

bench-compare: setup
	$(PY) -m pytest benchmarks --benchmark-only --benchmark-autosave --benchmark-compare \
	  --benchmark-compare-fail=$(BENCH_FAIL) $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf build *.egg-info vireid_fast/_C*.so .pytest_cache
