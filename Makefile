# Two entry points for a fresh clone: `make demo` and `make test` (each installs first).
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON ?= python3

.PHONY: setup demo test docs ui bench metrics browser live

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	$(BIN)/python -m candlestack.backtest  # compiles the backtest loop into numba's cache
	touch $@

demo: setup
	DAGSTER_HOME=$(CURDIR) $(BIN)/python -m pipelines.demo

test: setup browser docs
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest

# The manual (docs/, mkdocs.yml), built strictly: a broken link or anchor fails.
docs: setup
	$(BIN)/mkdocs build --strict --site-dir site

# tests/ui drives Debian's Chromium through its chromedriver (never a downloaded browser).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
		sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$sudo apt-get update && \
		$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver; }

ui: setup
	DAGSTER_HOME=$(CURDIR) $(BIN)/dagster dev -h 127.0.0.1 -p 3000

bench: setup
	$(BIN)/python bench/backfill.py
	$(BIN)/python bench/backtest.py

metrics: setup
	DAGSTER_HOME=$(CURDIR) $(BIN)/python -m pipelines.metrics

# The live WebSocket collector (CANDLESTACK_SOURCE=ccxt): streams closed 1m candles into the lake.
live: setup
	$(BIN)/python -m candlestack.live
