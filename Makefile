# chrono-collectors: every target CI and humans use. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
VAR := var
SUPERVISORD_CONF := supervisord.conf
PYTEST_ARGS ?=
# How long `make run`/`make demo` wait for the collectors to be connected and healthy.
START_WAIT_S ?= 20

.PHONY: help venv setup test lint typecheck run demo stop status logs check-db clean bench

help:
	@echo "make run       set up, then start the collectors + local ingest API under supervisord (real exchanges)"
	@echo "make setup     set up .venv, the shared API key and var/ (what supervisord by hand needs)"
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

SUPERVISORCTL := $(BIN)/supervisorctl -c $(SUPERVISORD_CONF)
PIDFILE := $(VAR)/run/supervisord.pid

# Every variable the collectors and the ingest API read (README: Collector configuration,
# Reference ingest API). supervisord hands its whole environment to every program, so one
# exported in the shell (`API_KEY=... make demo`) would reach every collector and the ingest
# API: they are removed (supervisord.conf sets what the programs get).
CONTRACT_ENV := API_BASE_URL API_KEY API_KEY_FILE API_KEYS WORKER_ID SYMBOLS BATCH_SIZE \
	BATCH_INTERVAL_MS LOG_LEVEL WS_URL METRICS_HOST METRICS_PORT SPOOL_DIR \
	INGEST_HOST INGEST_PORT DATABASE_URL DELIVERY_CONCURRENCY DELIVERY_RETRY_MAX_S \
	HTTP_CONNECT_TIMEOUT_S HTTP_READ_TIMEOUT_S INGEST_MAX_BODY_BYTES INGEST_MAX_FEEDS \
	INGEST_THREADS SPOOL_FSYNC_INTERVAL_MS SPOOL_MAX_BYTES WS_LIVENESS_TIMEOUT_S

# Succeeds while the supervisord named by the pid file runs (a reused pid does not count).
define supervisord_alive
{ pid=$$(cat $(PIDFILE) 2>/dev/null) && [ -n "$$pid" ] && \
  tr '\0' ' ' 2>/dev/null < /proc/$$pid/cmdline | grep -q supervisord; }
endef
# The supervisord `make stop` shut down ($$spid) until it has exited (a zombie has no cmdline).
define stopping_supervisord_alive
{ tr '\0' ' ' 2>/dev/null < /proc/$$spid/cmdline | grep -q supervisord; }
endef

# This checkout's programs still running ("  PID COMMAND" lines): after a supervisord was
# killed, they hold their ports and spool locks. ($$bin keeps this shell from matching itself.)
define list_leftovers
bin="$(CURDIR)/$(BIN)"; for d in /proc/[0-9]*; do \
  args=$$(tr '\0' ' ' 2>/dev/null < $$d/cmdline) || continue; \
  case "$$args" in *" $$bin/chrono-collector "*) echo "  $${d#/proc/} $$args";; esac; \
done
endef
LEFTOVERS := programs of this checkout still run without supervisord (they stop on their own \
	within 30 s of losing it; else kill them):

RUN_DOWN_HINT := No internet? 'make stop', then 'make demo' runs offline against the bundled \
	exchange simulator; else see $(VAR)/log/ and 'make status'.
DEMO_DOWN_HINT := See $(VAR)/log/ and 'make status'.

# Start supervisord; fail (exit 1, naming them) when it does not come up or programs do not.
# When collector programs (rows whose PROCESS is not "-") are still not connected after
# START_WAIT_S: the status table and a warning; supervisord keeps them retrying. `make run`
# then still exits 0 (the service runs, as it should while a venue is unreachable, and
# connects when it can); `make demo` exits 1 (its venues are local: something is wrong).
define start_supervisord
	@if [ -S $(VAR)/run/supervisor.sock ] && $(SUPERVISORCTL) pid >/dev/null 2>&1; then \
		echo "supervisord is already running: make stop first"; exit 1; fi
	@left=$$($(list_leftovers)); [ -z "$$left" ] || { echo "$(LEFTOVERS)"; echo "$$left"; exit 1; }
	CHRONO_DEMO=$(1) CHRONO_COINBASE_WS_URL=$(2) CHRONO_BINANCE_WS_URL=$(3) \
		CHRONO_BINANCEUS_WS_URL=$(4) CHRONO_KRAKEN_WS_URL=$(5) \
		env $(addprefix -u ,$(CONTRACT_ENV)) $(BIN)/supervisord -c $(SUPERVISORD_CONF)
	@echo "started; waiting for the programs to come up..."
	@for i in $$(seq 1 150); do \
		$(SUPERVISORCTL) pid >/dev/null 2>&1 || { \
			echo "supervisord did not come up (see $(VAR)/log/supervisord.log)"; exit 1; }; \
		$(SUPERVISORCTL) status | grep -E '^\S+\s+(STARTING|BACKOFF)\s' >/dev/null || break; \
		sleep 0.2; \
	done; \
	failed=$$($(SUPERVISORCTL) status | grep -vE '^\S+\s+(RUNNING|STOPPED)\s'); \
	if [ -n "$$failed" ]; then \
		names=$$(echo "$$failed" | awk '{print $$1}' | xargs); \
		echo "$$failed"; \
		echo "did not start: $$names (see$$(printf ' $(VAR)/log/%s.log' $$names); then make stop)"; \
		exit 1; fi
	@table=$$($(BIN)/chrono-collector status -c $(SUPERVISORD_CONF) --wait $(START_WAIT_S)) || \
	if printf '%s\n' "$$table" | awk 'NR > 1 && !/^supervisord:/ && $$2 != "-"' | grep -q .; then \
		printf '%s\n' "$$table"; \
		echo "WARNING: collectors not connected and healthy after $(START_WAIT_S) s (table above)."; \
		echo "They keep retrying under supervisord ('make stop' stops them). $(if $(filter false,$(1)),$(RUN_DOWN_HINT),$(DEMO_DOWN_HINT))"; \
		$(if $(filter false,$(1)),true,exit 1); fi
	@$(SUPERVISORCTL) status || true
	@echo "logs: $(VAR)/log/   status: make status   stop: make stop   rows: make check-db"
endef

# What supervisord.conf needs before supervisord can start by hand (README).
setup: $(STAMP) $(VAR)/secrets/api_key | $(VAR)/run $(VAR)/log

run: $(STAMP) $(VAR)/secrets/api_key | $(VAR)/run $(VAR)/log
	$(call start_supervisord,false,,,,)

# The demo's simulator addresses have one source: supervisord.conf's [program:simulator]
# command (`simulate coinbase binance binanceus kraken --port 9201`: the first venue listens on
# that port, the next ones on +1, +2, ..., on --host, 127.0.0.1 by default). `make demo` points
# each collector's WS_URL at its venue there, so a port changed in supervisord.conf moves the
# collectors too. SIM_ADDRS reads "coinbase=127.0.0.1:9201 binance=127.0.0.1:9202 ...".
SIM_ADDRS = $(shell awk '/^\[/ { sim = ($$0 ~ /^\[program:simulator\]/) } \
	sim && /^command *=/ { s = 0; p = ""; h = "127.0.0.1"; \
	  for (i = 1; i <= NF; i++) { if ($$i == "simulate") s = i; \
	    else if ($$i == "--port") p = $$(i + 1); else if ($$i ~ /^--port=/) p = substr($$i, 8); \
	    else if ($$i == "--host") h = $$(i + 1); else if ($$i ~ /^--host=/) h = substr($$i, 8) } \
	  n = 0; if (s && p != "") for (i = s + 1; i <= NF; i++) { \
	    if ($$i ~ /^-/) { if ($$i !~ /=/) i++; continue } \
	    printf "%s=%s:%d ", $$i, h, p + n; n++ } }' $(SUPERVISORD_CONF))
sim_url = ws://$(patsubst $(1)=%,%,$(filter $(1)=%,$(SIM_ADDRS)))

demo: $(STAMP) $(VAR)/secrets/api_key | $(VAR)/run $(VAR)/log
	$(call start_supervisord,true,$(call sim_url,coinbase),$(call sim_url,binance),$(call sim_url,binanceus),$(call sim_url,kraken)/v2)

# How long `make stop` waits for supervisord. It stops its programs one after another, each for
# up to its stopwaitsecs (supervisord's default: 10) before SIGKILL, so the worst case is their
# sum, read from supervisord.conf: 4 collectors x 30 + ingest 15 + simulator 5 = 140 s, plus a
# margin: 150 s, as systemd's chrono-supervisord unit allows (TimeoutStopSec=150).
STOP_WAIT_S = $(shell awk '/^\[/ { t += w; w = 0; p = ($$0 ~ /^\[program:/); if (p) w = 10 } \
	p && /^stopwaitsecs *=/ { sub(/^[^=]*= */, ""); w = $$0 + 0 } \
	END { print t + w + 10 }' $(SUPERVISORD_CONF))
SUPERVISORD_LOG := $(VAR)/log/supervisord.log

# Every 10 s, a line naming the programs supervisord still waits for (its own "waiting for ...
# to die" log line, from this shutdown on), so nobody is left staring at a silent terminal.
# (Waited for by its pid, not its pid file: supervisord removes that before it has exited.)
stop:
	@if $(supervisord_alive); then \
		spid=$$(cat $(PIDFILE)); \
		from=$$(stat -c %s $(SUPERVISORD_LOG) 2>/dev/null || echo 0); \
		$(SUPERVISORCTL) shutdown; \
		began=$$SECONDS; next=10; \
		while $(stopping_supervisord_alive) && [ $$((SECONDS - began)) -lt $(STOP_WAIT_S) ]; do \
			if [ $$((SECONDS - began)) -ge $$next ]; then \
				waiting=$$(tail -c +$$((from + 1)) $(SUPERVISORD_LOG) 2>/dev/null | \
					sed -n 's/.*waiting for \(.*\) to die.*/\1/p' | tail -n 1); \
				echo "still stopping: $${waiting:-see $(SUPERVISORD_LOG)} ($$((SECONDS - began)) s;" \
					"programs stop one at a time, up to $(STOP_WAIT_S) s in all)"; \
				next=$$((next + 10)); fi; \
			sleep 0.2; done; \
		! $(stopping_supervisord_alive) || { echo "supervisord is still stopping (see $(SUPERVISORD_LOG)):" \
			"$(STOP_WAIT_S) s is more than its programs' stopwaitsecs add up to"; exit 1; }; \
	else \
		[ ! -e $(PIDFILE) ] || { echo "supervisord is not running: pid $$(cat $(PIDFILE)) of" \
			"$(PIDFILE) is gone (killed?); stale pid file removed"; \
			rm -f $(PIDFILE) $(VAR)/run/supervisor.sock; stale=1; }; \
		left=$$($(list_leftovers)); \
		if [ -n "$$left" ]; then echo "$(LEFTOVERS)"; echo "$$left"; exit 1; fi; \
		[ -z "$${stale:-}" ] || exit 1; \
		echo "not running"; \
	fi

# The read-only targets need a virtualenv, not a fresh install: after a `git pull` they must not
# pip-install into the .venv the running programs use (`make venv` or `make run` does that).
$(BIN)/chrono-collector:
	$(MAKE) venv

status: | $(BIN)/chrono-collector
	$(BIN)/chrono-collector status -c $(SUPERVISORD_CONF)

logs:
	tail -n 20 -F $(VAR)/log/*.log

check-db: | $(BIN)/chrono-collector
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

# Not while anything of this checkout runs: var/ holds its live spools, key and control socket.
clean:
	@if $(supervisord_alive); then \
		echo "supervisord is running: make stop first (make clean deletes var/: spools, key, socket)"; \
		exit 1; fi
	@left=$$($(list_leftovers)); [ -z "$$left" ] || { echo "$(LEFTOVERS)"; echo "$$left"; exit 1; }
	rm -rf $(VAR) .pytest_cache .mypy_cache .ruff_cache .hypothesis

# --- operations: supervisord/systemd/Prometheus/Grafana checks (tests/ops) ---
.PHONY: test-ops check-monitoring

test-ops: $(STAMP)
	$(BIN)/python -m pytest -q tests/ops $(PYTEST_ARGS)

check-monitoring:
	promtool check config monitoring/prometheus/prometheus.yml
	promtool check rules monitoring/prometheus/rules/chrono.rules.yml
	cd monitoring/prometheus/rules && promtool test rules chrono.rules.test.yml
