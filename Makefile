# The two set-up commands of the README: `make run` and `make test`.
# Each creates the project virtualenv from the committed lock on first use, and is a
# no-op install afterwards (the stamp file is newer than the lock and pyproject).
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed-stamp
export PATH := $(abspath $(VENV))/bin:$(PATH)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: install run test test-all bench

$(STAMP): requirements/lock.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip==26.3
	$(VENV)/bin/python -m pip install -q -c requirements/lock.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

## Main job: raw clips of the embedded default corpus -> ... -> registered model, via DVC
## (`imer repro` = `dvc repro` with one local Prefect API for all stages, stopped at the end).
run: $(STAMP)
	imer repro

## Fast test suite (slow and GPU tests are skipped by default).
test: $(STAMP)
	python -m pytest

## Everything, including slow end-to-end tests.
test-all: $(STAMP)
	python -m pytest -m "not gpu"
