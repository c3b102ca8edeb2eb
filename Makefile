# chrono-collectors: every target CI and humans use. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
VAR := var
SUPERVISORD_CONF := supervisord.conf
PYTEST_ARGS ?=

.PHONY: help venv test lint typecheck run demo stop status logs check-db clean bench

help:
	@echo "make run       set up, then start the collectors + local ingest API under supervisord (real exchanges)"
	@echo "make demo      same, but the collectors read the local exchange simulator (no internet needed)"
	@echo "make status    chrono-collector status (one table of every collector)"
	@echo "make check-db  the check query on the local SQLite store"
	@echo "make stop      stop supervisord and everything under it"
	@echo "make test      set up and run the whole test suite (what CI runs)"
	@echo "make lint      ruff + mypy --strict"

$(STAMP): setup.cfg pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required (set PYTHON=python3.11)")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check collectors tests bench
	$(BIN)/mypy

typecheck: lint

# A random key shared by the local ingest API and the collectors, readable by us only.
$(VAR)/secrets/api_key:
	@mkdir -p $(VAR)/secrets && chmod 700 $(VAR)/secrets
	@umask 077 && $(BIN)/python -c 'import secrets; print(secrets.token_urlsafe(32))' > $@
	@chmod 400 $@

$(VAR)/run $(VAR)/log:
	@mkdir -p $@ && chmod 700 $@

define start_supervisord
	@if [ -S $(VAR)/run/supervisor.sock ] && $(BIN)/supervisorctl -c $(SUPERVISORD_CONF) pid >/dev/null 2>&1; then \
		echo "supervisord is already running: make stop first"; exit 1; fi
	CHRONO_DEMO=$(1) CHRONO_COINBASE_WS_URL=$(2) CHRONO_BINANCE_WS_URL=$(3) \
		CHRONO_BINANCEUS_WS_URL=$(4) CHRONO_KRAKEN_WS_URL=$(5) $(BIN)/supervisord -c $(SUPERVISORD_CONF)
	@echo "started; waiting for the programs to come up..."
	@$(BIN)/chrono-collector status -c $(SUPERVISORD_CONF) --wait 20 >/dev/null || true
	@$(BIN)/supervisorctl -c $(SUPERVISORD_CONF) status || true
	@echo "logs: $(VAR)/log/   status: make status   stop: make stop   rows: make check-db"
endef

run: $(STAMP) $(VAR)/secrets/api_key | $(VAR)/run $(VAR)/log
	$(call start_supervisord,false,,,,)

demo: $(STAMP) $(VAR)/secrets/api_key | $(VAR)/run $(VAR)/log
	$(call start_supervisord,true,ws://127.0.0.1:9201,ws://127.0.0.1:9202,ws://127.0.0.1:9203,ws://127.0.0.1:9204/v2)

stop:
	@if [ -S $(VAR)/run/supervisor.sock ]; then \
		$(BIN)/supervisorctl -c $(SUPERVISORD_CONF) shutdown; \
		for i in $$(seq 1 150); do [ -e $(VAR)/run/supervisord.pid ] || break; sleep 0.2; done; \
		[ ! -e $(VAR)/run/supervisord.pid ] || { echo "supervisord is still stopping (see var/log/supervisord.log)"; exit 1; }; \
	else echo "not running"; fi

status: $(STAMP)
	$(BIN)/chrono-collector status -c $(SUPERVISORD_CONF)

logs:
	tail -n 20 -F $(VAR)/log/*.log

check-db: $(STAMP)
	$(BIN)/python -m collectors.checkdb

# The collector benchmarks of docs/benchmarks.md (about 8 minutes; results in bench/results/).
bench: $(STAMP)
	$(BIN)/python bench/throughput.py
	$(BIN)/python bench/ceiling.py --throughput bench/results/throughput.md
	$(BIN)/python bench/parse_bench.py
	$(BIN)/python bench/latency.py
	$(BIN)/python bench/spool_latency.py
	$(BIN)/python bench/steady.py
	$(BIN)/python bench/footprint.py
	$(BIN)/python bench/outage.py
	$(BIN)/python bench/remote_api.py
	$(BIN)/python bench/ingest_bench.py

clean:
	rm -rf $(VAR) .pytest_cache .mypy_cache .ruff_cache .hypothesis

# --- operations: supervisord/systemd/Prometheus/Grafana checks (tests/ops) ---
.PHONY: test-ops check-monitoring

test-ops: $(STAMP)
	$(BIN)/python -m pytest -q tests/ops $(PYTEST_ARGS)

check-monitoring:
	promtool check config monitoring/prometheus/prometheus.yml
	promtool check rules monitoring/prometheus/rules/chrono.rules.yml
	cd monitoring/prometheus/rules && promtool test rules chrono.rules.test.yml
