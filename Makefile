# Sidemesh: every target sets up what it needs on a fresh machine.
#   make run    the mesh with the bundled plugins and a client session
#   make test   the whole test suite (with lint and the proto freshness check)
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   := .venv
BIN    := $(CURDIR)/$(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export PATH := $(BIN):$(PATH)

# Arguments for pytest, e.g. `make test PYTEST_ARGS="-k manifest -x"`.
PYTEST_ARGS ?=

.PHONY: help setup system-deps node-deps run test unit proto proto-check lint typecheck breaking bench lock clean

help:
	@echo "make run | test | proto | proto-check | lint | typecheck | breaking | bench | clean"

## Environment ----------------------------------------------------------------

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check \
	    -c constraints.txt -e '.[dev,examples,bench]'
	@touch $@

system-deps:
	@scripts/system-deps.sh

# npm packages of bundled plugins (each plugin directory with a package-lock.json).
node-deps:
	@scripts/node-deps.sh

setup: $(STAMP) system-deps node-deps

## Main jobs ------------------------------------------------------------------

run: setup
	$(BIN)/python -m orchestrator.demo

test: setup proto-check lint
	@scripts/system-deps.sh bench  # the benchmark's smoke test needs nginx and h2load
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## Contracts ------------------------------------------------------------------

proto: $(STAMP)
	scripts/gen-proto.sh

proto-check: $(STAMP)
	scripts/proto-check.sh

breaking: $(STAMP)
	buf breaking --against '.git#branch=main'

## Code quality ---------------------------------------------------------------

lint: $(STAMP)
	ruff check .
	ruff format --check .
	buf lint

typecheck: $(STAMP)
	mypy

## Benchmarks -----------------------------------------------------------------

bench: setup
	@scripts/system-deps.sh bench
	$(BIN)/python -m bench

## Maintenance ----------------------------------------------------------------

# Re-resolve the pinned dependency set after changing pyproject.toml.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev,examples,bench]'
	.lock-venv/bin/python -m pip freeze --exclude-editable > constraints.txt
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
