# The README's two commands: `make train` and `make test`. Both build .venv from the pinned dependencies first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
NPROC ?= 2
CONFIG ?= configs/debug.toml

$(VENV)/installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	# open-mythos is only the reference for the parity tests; its own pins (torch 2.11, transformers) are not wanted.
	$(PY) -m pip install --quiet --no-deps open-mythos==0.5.0
	touch $@

.PHONY: venv test test-fast train lint
venv: $(VENV)/installed

test: lint
	$(PY) -m pytest -q --durations=15

test-fast: venv
	$(PY) -m pytest -q -m "not slow"

lint: venv
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

train: venv
	$(PY) -m mythos_train prepare --config $(CONFIG)
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m mythos_train train --config $(CONFIG)
