# distrain — every workflow is a target here; `make help` lists them.
.DEFAULT_GOAL := help
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev
ARGS ?=

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Reinstalled when pyproject.toml changes. Editable, so conf/ next to the package is found.
$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

.PHONY: help install train test test-fast lint format bench gpu-check tensorboard clean

help: ## list the workflows
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv and install distrain with its dev extras

train: $(STAMP) ## run the default job (digits MLP, 2 workers, embedded Ray); ARGS='trainer.epochs=3 ...'
	$(VENV)/bin/distrain $(ARGS)

# Two pytest processes, one test file each at a time (--dist loadfile keeps a file's module
# fixtures, shared runs and network namespaces in one process): much of a test is waiting on
# actors, processes and timeouts, so two keep both cores busy. Each process has its own Ray.
# Files go out in collection order (--no-loadscope-reorder), so the end-to-end files (tests/*.py)
# start first and the quick unit files (tests/unit/) fill the end. xdist's default order (most
# tests first) handed test_two_hosts.py (2 tests, ~55 s) out last: the other process sat idle.
# ARGS='-n 0' runs in one process.
XDIST := -n 2 --dist loadfile --no-loadscope-reorder

test: $(STAMP) ## run the whole test suite (slow end-to-end tests included)
	$(PY) -m pytest $(XDIST) $(ARGS)

test-fast: $(STAMP) ## run the suite without the slow end-to-end tests
	$(PY) -m pytest $(XDIST) -m 'not slow' $(ARGS)

lint: $(STAMP) ## ruff check + format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP) ## apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP) ## benchmarks side by side with plain PyTorch, torchrun DDP and Ray Train
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	$(PY) benchmarks/run.py $(ARGS)

gpu-check: $(STAMP) ## prove the CUDA path on this machine's GPUs (<5 min); without a GPU: one line, exit 0
	@$(PY) benchmarks/gpu_check.py $(ARGS)

tensorboard: $(STAMP) ## serve TensorBoard on outputs/ and multirun/ (http://localhost:6006)
	$(VENV)/bin/tensorboard --logdir_spec outputs:outputs,multirun:multirun --port 6006

clean: ## remove run outputs and caches (keeps .venv)
	rm -rf outputs multirun .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
