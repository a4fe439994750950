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

.PHONY: help setup system-deps node-deps dataplane run test unit proto proto-check lint typecheck breaking bench lock clean

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

# The native data plane (orchestrator/dataplane, Rust + PyO3), built by maturin into the
# venv as the `sidemesh_dataplane` module; rebuilt only when its sources change.
DATAPLANE       := orchestrator/dataplane
DATAPLANE_STAMP := $(VENV)/.dataplane-stamp
DATAPLANE_SRC   := $(shell find $(DATAPLANE)/src -name '*.rs') $(addprefix $(DATAPLANE)/,Cargo.toml Cargo.lock pyproject.toml sidemesh_dataplane.pyi)
CARGO_FLAGS     := --manifest-path $(DATAPLANE)/Cargo.toml --locked -j2

$(DATAPLANE_STAMP): $(STAMP) $(DATAPLANE_SRC)
	@command -v cargo >/dev/null || { echo "the data plane needs a Rust toolchain (cargo) on PATH" >&2; exit 1; }
	cd $(DATAPLANE) && CARGO_BUILD_JOBS=2 VIRTUAL_ENV=$(CURDIR)/$(VENV) $(BIN)/maturin develop --release --locked --quiet
	@touch $@

dataplane: $(DATAPLANE_STAMP)

setup: $(STAMP) $(DATAPLANE_STAMP) system-deps node-deps

## Main jobs ------------------------------------------------------------------

run: setup
	$(BIN)/python -m orchestrator.demo

test: setup proto-check lint
	@scripts/system-deps.sh bench  # the benchmark's smoke test needs nginx and h2load
	cargo test $(CARGO_FLAGS)
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
	cargo fmt --manifest-path $(DATAPLANE)/Cargo.toml --check
	cargo clippy $(CARGO_FLAGS) --all-targets -- -D warnings
	cargo clippy $(CARGO_FLAGS) --features python -- -D warnings

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
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info $(DATAPLANE)/target
