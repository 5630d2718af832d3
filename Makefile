# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test demo bench browser clean-runs

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[test]'
	# torchattacks pins requests~=2.25.1, which breaks jupyterlab-server: install it without its pins
	$(BIN)/python -m pip install -q --no-deps torchattacks==3.5.1
	touch $(STAMP)

setup: $(STAMP)

# Chromium for the real-browser widget test; skipped (with a message) where it cannot be installed
browser:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && \
	  { apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; }; } ; } || \
	  echo "chromium could not be installed: the browser test will be skipped"

test: setup browser
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/afs-kit report --preset demo

bench: setup
	$(BIN)/python -m benchmarks --json benchmarks/latest.json

clean-runs:
	rm -rf runs
