# Two entry points for a fresh clone: `make demo` and `make test` (each installs first).
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON ?= python3

.PHONY: setup demo test ui bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/python -m candlestack.backtest  # compiles the backtest loop into numba's cache
	touch $@

demo: setup
	DAGSTER_HOME=$(CURDIR) $(BIN)/python -m pipelines.demo

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest

ui: setup
	DAGSTER_HOME=$(CURDIR) $(BIN)/dagster dev -h 127.0.0.1 -p 3000

bench: setup
	$(BIN)/python bench/backfill.py
	$(BIN)/python bench/backtest.py
