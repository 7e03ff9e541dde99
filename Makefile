# Every target that needs Python builds .venv itself, so a fresh clone needs only python3.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
# Benchmarks against peers get their own venvs, so their packages never touch the runtime lock.
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed
PYRALLEL_VENV := .venv-pyrallel
PYRALLEL_STAMP := $(PYRALLEL_VENV)/.installed
# pyrallel-consumer needs Python >= 3.12: a working python3.12 on PATH, else pyenv's newest 3.12
# (a pyenv shim on PATH may not run, so each candidate is tried).
PYTHON312 ?= $(shell for p in python3.12 $$(ls -d $$(pyenv root 2>/dev/null || echo $$HOME/.pyenv)/versions/3.12*/bin/python3.12 2>/dev/null | sort -rV); do $$p -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1 && { command -v $$p; break; }; done)

.PHONY: demo test test-fast lint typecheck bench bench-quick bench-env clean promtool chaos

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

# The gateway's pinned runtime and dev sets plus requirements/bench.txt (FastStream,
# matplotlib), all --no-deps: the same pins as .venv, with the bench packages on top.
$(BENCH_STAMP): requirements/runtime.txt requirements/dev.txt requirements/bench.txt pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install --quiet --no-deps -r requirements/runtime.txt -r requirements/dev.txt -r requirements/bench.txt
	$(BENCH_VENV)/bin/python -m pip install --quiet --no-deps -e .
	touch $@

# Optional: when it cannot be built, .venv-pyrallel.failed says why, the benchmark
# reports pyrallel-consumer as not installed, and the next `make bench` tries again.
$(PYRALLEL_STAMP): requirements/bench-pyrallel.txt
	@rm -f .venv-pyrallel.failed
	@if [ -z "$(PYTHON312)" ]; then \
		echo "no Python 3.12 (python3.12 on PATH or under pyenv)" > .venv-pyrallel.failed; \
	elif ( $(PYTHON312) -m venv $(PYRALLEL_VENV) && \
		$(PYRALLEL_VENV)/bin/python -m pip install --quiet --no-deps -r requirements/bench-pyrallel.txt \
		) > .venv-pyrallel.log 2>&1; then \
		touch $@; \
	else \
		tail -n 5 .venv-pyrallel.log > .venv-pyrallel.failed; \
		echo "pyrallel-consumer did not install; see .venv-pyrallel.failed"; \
	fi

bench-env: $(BENCH_STAMP) $(PYRALLEL_STAMP)

demo: $(DEV_STAMP)
	$(BIN)/gateway demo

test: $(DEV_STAMP)
	$(BIN)/python -m pytest

# The tests that need no broker and no Vault (pure logic, parsing, the API app): ~30 s.
test-fast: $(DEV_STAMP)
	$(BIN)/python -m pytest -m "not integration" -q

# The fault-injection suite (tests/chaos, marker `chaos`): never part of `make test`.
# One verdict line per scenario and a summary table at the end, also written to
# bench/results/chaos.json. CHAOS_SOAK_S sets the soak's length (default 30 minutes).
CHAOS_SOAK_S ?= 1800
chaos: $(DEV_STAMP)
	CHAOS_SOAK_S=$(CHAOS_SOAK_S) CHAOS_RESULTS=bench/results/chaos.json \
		$(BIN)/python -m pytest -m chaos tests/chaos

# promtool (from Debian's `prometheus` package) checks and unit-tests the alerting rules in
# deploy/prometheus: the one on PATH, else $(BIN)/promtool, which `make promtool` unpacks
# from the package (`apt-get download`: no service installed or started). Where it
# cannot be had, lint says so and skips the rule checks; with promtool, broken rules fail.
PROMTOOL := $(shell command -v promtool 2>/dev/null || echo $(BIN)/promtool)

promtool: $(STAMP)
	@if [ -x "$(PROMTOOL)" ]; then exit 0; fi; \
	tmp=$$(mktemp -d); \
	( cd $$tmp \
	  && { apt-cache show prometheus >/dev/null 2>&1 \
	       || { [ "$$(id -u)" = 0 ] && timeout 300 apt-get update -qq >/dev/null 2>&1; } || true; } \
	  && timeout 300 apt-get download -qq prometheus >/dev/null 2>&1 \
	  && dpkg-deb -x prometheus_*.deb unpacked \
	  && cp unpacked/usr/bin/promtool $(CURDIR)/$(BIN)/promtool ) \
	  && echo "promtool: unpacked from Debian's prometheus package into $(BIN)/promtool" \
	  || echo "promtool: could not fetch Debian's prometheus package (apt-get download prometheus); alert rule checks will be skipped"; \
	rm -rf $$tmp

lint: $(DEV_STAMP) promtool
	$(BIN)/ruff check gateway tests bench examples deploy
	$(BIN)/ruff format --check gateway tests bench examples deploy
	$(BIN)/mypy gateway examples deploy/scripts deploy/sync.py
	@if [ -x "$(PROMTOOL)" ]; then \
		echo "$(PROMTOOL) check rules / test rules (deploy/prometheus)"; \
		$(PROMTOOL) check rules deploy/prometheus/alerts.yaml \
		&& $(PROMTOOL) test rules deploy/prometheus/alerts_test.yaml; \
	else \
		echo "promtool not available: alert rule checks skipped (make promtool)"; \
	fi

# Benchmarks print their figures; they are never part of `make test`.
bench: $(DEV_STAMP) bench-env
	$(BIN)/python -m bench.intake
	$(BIN)/python -m bench.pools
	$(BIN)/python -m bench.secrets
	$(BENCH_VENV)/bin/python -m bench.peers

bench-quick: $(DEV_STAMP) bench-env
	$(BIN)/python -m bench.intake --jobs 2000 --sleep-jobs 2000
	$(BIN)/python -m bench.pools --quick
	$(BIN)/python -m bench.secrets --quick
	$(BENCH_VENV)/bin/python -m bench.peers --quick

.PHONY: bench-api
# GET /v1/jobs/{id} latency while the gateway works through echo jobs (issue 6).
bench-api: $(DEV_STAMP)
	$(BIN)/python -m bench.api

clean:
	rm -rf $(VENV) $(BENCH_VENV) $(PYRALLEL_VENV) .venv-pyrallel.failed .venv-pyrallel.log .pytest_cache .mypy_cache .ruff_cache
