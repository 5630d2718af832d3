# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pyproject.toml admits a torch range; the CPU machines get these exact versions
CONSTRAINTS := constraints-cpu.txt

.PHONY: setup test test-fast test-gpu gpu-wheels demo bench system-deps clean-runs

# Python writes each module's .pyc the first time a process imports it, where PYTHONDONTWRITEBYTECODE lets it: a
# machine that sets it (this one) would compile torch again in every process of the tests (`make test` 381 s ->
# 595 s), so the recipes run without it. Compiling the whole venv at install instead (compileall on both cores)
# took 39 s of the setup; what the kit's commands and notebook kernels import (torch, torchvision, SciPy,
# scikit-learn, matplotlib, papermill, ipykernel, the kit: a fifth of the files) costs 15 s of one core, or 12 s on
# both: setup imports it once that way, so that a process run outside make, where PYTHONDONTWRITEBYTECODE is set (as
# Docker images often do), finds it compiled. (uv, unlike pip, compiles nothing while installing.)
unexport PYTHONDONTWRITEBYTECODE

# uv installs the same pins as pip in a fifth of the time (a fresh clone's setup: pip 2 to 2.6 minutes); where uv
# cannot be had, pip does it. uv reads no pip configuration: tools/uv_index_args.py hands it pip's indexes.
$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	if $(BIN)/python -m pip install -q uv 2>/dev/null && \
	  $(BIN)/uv pip install -q -p $(BIN)/python --index-strategy unsafe-best-match \
	    $$($(BIN)/python tools/uv_index_args.py) -c $(CONSTRAINTS) -e '.[test,zoo]' && \
	  $(BIN)/uv pip install -q -p $(BIN)/python $$($(BIN)/python tools/uv_index_args.py) --no-deps torchattacks==3.5.1; \
	then :; else \
	  $(BIN)/python -m pip install -q --no-compile -c $(CONSTRAINTS) -e '.[test,zoo]' && \
	  $(BIN)/python -m pip install -q --no-compile --no-deps torchattacks==3.5.1; \
	fi
	# (torchattacks pins requests~=2.25.1, which breaks jupyterlab-server: it goes in without its pins)
	$(BIN)/python -c "import torchvision, afs_kit.studies, afs_kit.analysis, afs_kit.widgets, afs_kit.app.reports" & \
	  kit=$$!; $(BIN)/python -c "import scipy.stats, sklearn.manifold, matplotlib.pyplot, seaborn, openTSNE, papermill, \
	    nbconvert, ipykernel.kernelapp, ipywidgets" && wait $$kit
	touch $(STAMP)

setup: $(STAMP)

# Debian packages the tests use: Chromium (real-browser widget test) and Fashion-MNIST's files.
# Where apt is missing or refuses, the tests that need them are skipped with a message.
system-deps:
	@missing=""; command -v chromium >/dev/null 2>&1 || missing="chromium chromium-driver"; \
	  [ -d /usr/share/datasets/fashion-mnist ] || missing="$$missing dataset-fashion-mnist"; \
	  if [ -n "$$missing" ]; then \
	    if command -v apt-get >/dev/null 2>&1; then \
	      DEBIAN_FRONTEND=noninteractive dpkg --configure -a >/dev/null 2>&1; \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null 2>&1; } || \
	      echo "could not install $$missing: the tests that need them will be skipped"; \
	    else echo "no apt-get: $$missing not installed; the tests that need them will be skipped"; fi; \
	  fi

# two workers (pytest-xdist), one thread each; a file's tests stay on one worker, so a module's trained fixtures
# are made once; files in the order tests/conftest.py gives (the longest first), not xdist's most-tests-first
test: setup system-deps
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

# the quick local loop: everything but the tests marked slow (notebooks, browser, kill-and-resume)
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# the device-dependent tests on CUDA with the machine's own Python and torch; installs nothing from an index
# (missing packages come from ./gpu-wheels); says so and exits 0 where there is no CUDA
test-gpu:
	@sh gpu/test-gpu.sh

# on a machine with an index: cp312 manylinux wheels of what a CUDA image with PyTorch lacks (gpu/requirements.txt,
# no dependencies: a few MB), into ./gpu-wheels
GPU_WHEELS := --only-binary=:all: --implementation cp --python-version 3.12 --platform manylinux_2_28_x86_64 \
	--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --no-deps -d gpu-wheels
gpu-wheels:
	$(PY) -m pip download -q $(GPU_WHEELS) -r gpu/requirements.txt
	$(PY) gpu/trim_wheels.py gpu-wheels

demo: setup
	$(BIN)/afs-kit report --preset demo

bench: setup
	$(BIN)/python -m benchmarks --json benchmarks/latest.json

clean-runs:
	rm -rf runs
