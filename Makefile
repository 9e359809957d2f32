# Two entry points for a fresh clone: `make demo` and `make test` (each installs first).
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON ?= python3

.PHONY: setup demo test docs ui bench metrics browser live workers

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

# Celery workers for CANDLESTACK_EXECUTOR=celery (docs/workers.md): N of them (default 2),
# worker1..N, each `dagster-celery worker start` taking one step at a time, in the foreground;
# Ctrl-C stops them all (a step in flight finishes; a second Ctrl-C drops it, to run again on
# another worker). They read the caller's CANDLESTACK_* settings and DAGSTER_HOME (this folder
# unless set, as for ui and demo): the same as the runs'. The instance's tables are made first,
# not by N workers at once; dagster-celery runs `celery` off PATH.
N ?= 2
workers: setup
	@export DAGSTER_HOME="$${DAGSTER_HOME:-$(CURDIR)}" PATH="$(abspath $(BIN)):$$PATH"; \
	$(BIN)/python -c 'import dagster; dagster.DagsterInstance.get()'; \
	pids=; trap 'for p in $$pids; do pkill -TERM -P $$p; done; wait; exit 130' INT TERM; \
	for i in $$(seq 1 $(N)); do \
		$(BIN)/dagster-celery worker start -A pipelines.workers -n worker$$i & \
		pids="$$pids $$!"; \
	done; \
	wait
