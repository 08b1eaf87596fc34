# Every target bootstraps its own environment from a bare checkout.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# One place for state, shared by `make demo`, `make ui`, `make status` and every `deals-pipeline` command.
# A value set by the user (environment or `make VAR=...`) wins.
DAGSTER_HOME ?= $(CURDIR)/dagster_home
DEALS_DB_PATH ?= $(CURDIR)/data/deals.duckdb
UI_HOST ?= 127.0.0.1
UI_PORT ?= 3000
export DAGSTER_HOME
# Passed to the state targets only: tests choose their own databases.
STATE := DEALS_DB_PATH="$(DEALS_DB_PATH)"

.PHONY: install test test-fast demo ui status bench bench-quick clean

$(STAMP): setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# pytest-xdist workers; tests wait for events, not time windows, so they hold up in parallel.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile

# Everything: unit, integration, Dagster, subprocess and kill tests.
test: $(STAMP)
	$(PYTEST)

# The unit layer (no whole stack, no Dagster, no subprocess: see deals_pipeline_tests/conftest.py), < 60 s.
test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

demo: $(STAMP)
	$(STATE) $(BIN)/deals-pipeline demo

ui: $(STAMP)
	$(STATE) $(BIN)/dagster dev -w workspace.yaml -h $(UI_HOST) -p $(UI_PORT)

status: $(STAMP)
	$(STATE) $(BIN)/deals-pipeline status

bench: $(STAMP)
	$(BIN)/python benchmarks/run_benchmarks.py

# Same code paths on small windows; fails when a benchmark breaks (CI runs it).
bench-quick: $(STAMP)
	$(BIN)/python benchmarks/run_benchmarks.py --quick

clean:
	rm -rf $(VENV) data *.egg-info
