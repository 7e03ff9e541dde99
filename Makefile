# Every target that needs Python builds .venv itself, so a fresh clone needs only python3.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: demo test lint typecheck bench bench-quick clean

$(STAMP): requirements/runtime.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# --no-deps: the pinned lean closure, not penguiflow's 1 GB of declared extras.
	$(BIN)/python -m pip install --quiet --no-deps -r requirements/runtime.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

$(DEV_STAMP): $(STAMP) requirements/dev.txt
	$(BIN)/python -m pip install --quiet --no-deps -r requirements/dev.txt
	touch $@

demo: $(DEV_STAMP)
	$(BIN)/gateway demo

test: $(DEV_STAMP)
	$(BIN)/python -m pytest

lint: $(DEV_STAMP)
	$(BIN)/ruff check gateway tests bench
	$(BIN)/ruff format --check gateway tests bench
	$(BIN)/mypy gateway

# Benchmarks print their figures; they are never part of `make test`.
bench: $(DEV_STAMP)
	$(BIN)/python -m bench.intake
	$(BIN)/python -m bench.pools
	$(BIN)/python -m bench.secrets

bench-quick: $(DEV_STAMP)
	$(BIN)/python -m bench.intake --jobs 2000 --sleep-jobs 2000
	$(BIN)/python -m bench.pools --quick
	$(BIN)/python -m bench.secrets --quick

.PHONY: bench-api
# GET /v1/jobs/{id} latency while the gateway works through echo jobs (issue 6).
bench-api: $(DEV_STAMP)
	$(BIN)/python -m bench.api

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
