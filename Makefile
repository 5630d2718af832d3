# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pyproject.toml admits a torch range; the CPU machines get these exact versions
CONSTRAINTS := constraints-cpu.txt

.PHONY: setup test test-fast test-gpu gpu-wheels demo bench system-deps clean-runs

# The .pyc files must be written at install time: a machine with PYTHONDONTWRITEBYTECODE set (this one) never
# writes them later, and every process that imports torch then compiles it again (tried without: `make test`
# 381 s -> 595 s). pip compiles one file at a time (39 s of the install); compileall on every core, 28 s.
$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --no-compile -c $(CONSTRAINTS) -e '.[test,zoo]'
	# torchattacks pins requests~=2.25.1, which breaks jupyterlab-server: install it without its pins
	$(BIN)/python -m pip install -q --no-compile --no-deps torchattacks==3.5.1
	# (a few files are for other Python versions and do not compile: pip skips them alike)
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
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
