# diffim developer targets. Every target creates or reuses the virtual environment .venv at the repo root.
# The newest Python >= 3.12 found (pyenv installs included) is used; otherwise python3 (>= 3.11).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PYTHON ?= $(shell for p in python3.14 python3.13 python3.12 \
	$$(ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.1[2-9]*/bin/python 2>/dev/null | sort -rV); do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null && { command -v $$p; break; }; \
	done)
PYTHON := $(if $(PYTHON),$(PYTHON),python3)
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test test-slow test-rubin bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip >/dev/null 2>&1 || true
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/diffim demo demo_output

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m slow $(PYTEST_ARGS)

# Rubin middleware adapter tests (pipetask, and bps in the slow test): need Python >= 3.12 in .venv.
test-rubin: $(STAMP)
	@if $(PY) -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then \
		$(PY) -m pip install -q -e '.[rubin]' && \
		$(PY) -m pytest -q -p no:cacheprovider -m 'slow or not slow' tests/test_rubin*.py $(PYTEST_ARGS); \
	else \
		echo "test-rubin: SKIPPED: the Rubin middleware needs Python >= 3.12, but .venv has Python $$($(PY) -c 'import platform; print(platform.python_version())'). Install Python >= 3.12 (e.g. pyenv install 3.12), then: make clean test-rubin"; \
	fi

bench: $(STAMP)
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) demo_output build src/*.egg-info
