"""Prometheus config, rules and rule unit tests through promtool; `promtool check metrics` on a
real scrape; and a real Prometheus server on 127.0.0.1 scraping a running collector, firing an
alert when the collector stops."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import CollectorProcess
from tests.ops.helpers import ROOT, http_get, panel_expr, require_tool
from tests.support.waiting import free_port, wait_until

PROM_DIR = ROOT / "monitoring" / "prometheus"
RULES = PROM_DIR / "rules" / "chrono.rules.yml"


def promtool(*args: str, stdin: str | None = None,
             cwd: Path = PROM_DIR) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("promtool"), *args], input=stdin, capture_output=True,
                          text=True, timeout=60, cwd=cwd, check=False)


def test_check_config() -> None:
    res = promtool("check", "config", "prometheus.yml")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "exchange" not in (PROM_DIR / "prometheus.yml").read_text().split("scrape_configs")[1]


def test_check_rules() -> None:
    res = promtool("check", "rules", str(RULES))
    assert res.returncode == 0, res.stdout + res.stderr


def test_rule_unit_tests_cover_every_alert() -> None:
    res = promtool("test", "rules", "chrono.rules.test.yml", cwd=PROM_DIR / "rules")
    assert res.returncode == 0, res.stdout + res.stderr
    # (no YAML parser in the venv: the files' layout is regular enough for patterns)
    alerts = set(re.findall(r"^\s+- alert: (\w+)$", RULES.read_text(), re.M))
    cases = re.findall(r"alertname: (\w+)\n\s+eval_time: \S+\n\s+exp_alerts:(.*)",
                       (PROM_DIR / "rules" / "chrono.rules.test.yml").read_text())
    firing = {name for name, rest in cases if rest.strip() != "[]"}
    quiet = {name for name, rest in cases if rest.strip() == "[]"}
    assert alerts <= firing and alerts <= quiet, (alerts - firing, alerts - quiet)
    assert {"CollectorDown", "CollectorDisconnected", "CollectorReconnecting", "SymbolNoData",
            "SymbolRejected", "FlushFailing", "SpoolGrowing", "SpoolNearFull", "SpoolErrors",
            "RestartsLooping", "RecordsDropped", "DeadLettered", "ThreadCrashed",
            "CollectorRestarted", "CollectorNoSymbols"} <= alerts


@pytest.mark.slow
def test_check_metrics_on_a_real_scrape(collector: CollectorProcess) -> None:
    text = collector.metrics_text()
    assert "chrono_collector_lag_seconds_bucket" in text
    # what CollectorRestarted and RestartsLooping count (the service's ProcessCollector)
    assert re.search(r"^process_start_time_seconds \d", text, re.M), text[:2000]
    res = promtool("check", "metrics", stdin=text)
    assert res.returncode == 0 and res.stdout + res.stderr == "", res.stdout + res.stderr


# --- a real Prometheus server -------------------------------------------------------------------

FAST_RULES = """
groups:
  - name: chrono-test-fast
    rules:
      - alert: CollectorDownFast
        expr: up{job="chrono-collectors"} == 0
        for: 2s
        labels: {severity: test}
"""


class PromServer:
    def __init__(self, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.port, self.proc, self.log = port, proc, log

    def api(self, path: str, **params: str) -> Any:
        query = ("?" + urllib.parse.urlencode(params)) if params else ""
        body = json.loads(http_get(f"http://127.0.0.1:{self.port}/api/v1/{path}{query}"))
        assert body["status"] == "success", body
        return body["data"]

    def ready(self) -> bool:
        try:
            http_get(f"http://127.0.0.1:{self.port}/-/ready", timeout=0.5)
            return True
        except OSError:
            return False


@pytest.fixture
def prometheus(tmp_path: Path, collector: CollectorProcess) -> Iterator[PromServer]:
    binary = require_tool("prometheus")
    (tmp_path / "fast.rules.yml").write_text(FAST_RULES)
    config = tmp_path / "prometheus.yml"
    config.write_text(f"""
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - {RULES}
  - {tmp_path / "fast.rules.yml"}
scrape_configs:
  - job_name: chrono-collectors
    static_configs:
      - targets: ['127.0.0.1:{collector.metrics_port}']
""")
    port = free_port()
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([binary, f"--config.file={config}",
                                 f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}",
                                 "--storage.tsdb.retention.time=1h"],
                                stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    server = PromServer(port, proc, log)
    try:
        assert wait_until(lambda: proc.poll() is not None or server.ready(), 15, 0.1), \
            log.read_text()
        assert proc.poll() is None, log.read_text()
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.mark.slow
def test_real_prometheus_scrapes_and_fires_when_the_collector_stops(
        prometheus: PromServer, collector: CollectorProcess) -> None:
    def up_value() -> str | None:
        result = prometheus.api("query", query='up{job="chrono-collectors"}')["result"]
        return result[0]["value"][1] if result else None

    assert wait_until(lambda: up_value() == "1", 10, 0.2), prometheus.log.read_text()[-3000:]
    # the metrics carry `exchange` themselves: no exported_exchange clash
    series = prometheus.api("query", query="chrono_collector_connected")["result"]
    assert series and series[0]["metric"]["exchange"] == "coinbase", series
    assert "exported_exchange" not in series[0]["metric"]
    # the restarts panel joins the exchange onto the target's process_start_time_seconds
    restarts = prometheus.api("query", query=panel_expr("Restarts (15m)"))["result"]
    assert [r["metric"] for r in restarts] == [{
        "exchange": "coinbase", "job": "chrono-collectors",
        "instance": f"127.0.0.1:{collector.metrics_port}"}], restarts
    assert restarts[0]["value"][1] == "0", restarts
    # the shipped rules are loaded and evaluate without errors
    groups = prometheus.api("rules")["groups"]
    assert {g["name"] for g in groups} >= {"chrono-collectors.records", "chrono-collectors.alerts"}
    assert wait_until(lambda: all(r.get("health") == "ok" for g in prometheus.api("rules")["groups"]
                                  for r in g["rules"]), 5, 0.2), prometheus.api("rules")

    assert collector.stop() == 0

    def alerts() -> dict[str, str]:
        return {a["labels"]["alertname"]: a["state"] for a in prometheus.api("alerts")["alerts"]}

    assert wait_until(lambda: alerts().get("CollectorDownFast") == "firing", 15, 0.2), alerts()
    # the shipped CollectorDown (for: 1m) is pending by now
    assert alerts().get("CollectorDown") == "pending", alerts()
