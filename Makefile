# The two set-up commands of the README: `make run` and `make test`.
# Each creates the project virtualenv from the committed lock on first use, and is a
# no-op install afterwards (the stamp file is newer than the lock and pyproject).
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed-stamp
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export PATH := $(abspath $(VENV))/bin:$(PATH)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: install run test test-fast bench

$(STAMP): requirements/lock.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip==26.3
	$(VENV)/bin/python -m pip install -q -c requirements/lock.txt -e '.[test,dask]'
	@# The demo's browser test drives the system Chromium (a browser download cannot reach its host here).
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { command -v apt-get >/dev/null && $(SUDO) apt-get update -qq && \
	    $(SUDO) apt-get install -y -qq chromium chromium-driver; } || \
	  echo "make install: chromium + chromium-driver not installed; tests/test_demo.py's browser test will skip"
	touch $(STAMP)

install: $(STAMP)

## Main job: raw clips of the embedded default corpus -> ... -> registered model, via DVC
## (`imer repro` = `dvc repro` with one local Prefect API for all stages, stopped at the end).
run: $(STAMP)
	imer repro

## The whole suite, slow end-to-end tests included (real DVC, Prefect, MLflow); GPU tests skip without a GPU.
test: $(STAMP)
	python -m pytest

## Quick loop while developing: skips the slow end-to-end tests.
test-fast: $(STAMP)
	python -m pytest -m "not slow and not gpu"
