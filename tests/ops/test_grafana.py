"""Grafana is not installable here: check the dashboard's PromQL with promtool (every panel
expression wrapped in a generated rule file) and every metric name against a real scrape."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import CollectorProcess
from tests.ops.helpers import DASHBOARD, ROOT, panel_expr, require_tool, scrape_names

GRAFANA = ROOT / "monitoring" / "grafana"


def panel_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert exprs
    # template variables as Grafana would expand "All"
    return [e.replace("$exchange", ".*") for e in exprs]


def test_provisioning_files() -> None:
    ds = (GRAFANA / "provisioning" / "datasources" / "chrono.yml").read_text()
    assert "uid: chrono-prometheus" in ds and "type: prometheus" in ds
    provider = (GRAFANA / "provisioning" / "dashboards" / "chrono.yml").read_text()
    assert "type: file" in provider and "path:" in provider
    dash = json.loads(DASHBOARD.read_text())
    assert {t["datasource"]["uid"] for p in dash["panels"] for t in p["targets"]} \
        == {"chrono-prometheus"}
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for topic in ("connected", "records/s", "freshness", "lag", "flush latency",
                  "flush failures", "queue", "spool", "restarts"):
        assert topic in titles, topic


def test_every_panel_expression_is_valid_promql(tmp_path: Path) -> None:
    rules = ["groups:", "  - name: dashboard", "    rules:"]
    for i, expr in enumerate(panel_exprs()):
        rules += [f"      - record: dashboard:expr_{i}", f"        expr: {json.dumps(expr)}"]
    path = tmp_path / "dashboard.rules.yml"
    path.write_text("\n".join(rules) + "\n")
    res = subprocess.run([require_tool("promtool"), "check", "rules", str(path)],
                         capture_output=True, text=True, timeout=30, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(panel_exprs())} rules found" in res.stdout


def _series(name: str, port: int, values: str, **labels: str) -> str:
    """One input series of a promtool test, scraped from 127.0.0.1:`port`."""
    text = ",".join([*(f'{k}="{v}"' for k, v in labels.items()), 'job="chrono-collectors"',
                     f'instance="127.0.0.1:{port}"'])
    return f"      - series: '{name}{{{text}}}'\n        values: '{values}'\n"


def _info(exchange: str) -> dict[str, str]:
    return {"exchange": exchange, "version": "0.1.0", "worker_id": f"worker-{exchange}"}


# What Prometheus really holds across collector restarts: every start has a new
# process_start_time_seconds (a target's series: job and instance only), while connect attempts
# start at 1 again, where the old process's were (resets() of the counter sees no restart).
# Kraken restarts 3 times (one scrape failed: stale); Coinbase reconnects, never restarts.
RESTART_SERIES = "".join([
    _series("process_start_time_seconds", 9104, "100 100 160 220 stale 280 280 280 280 280"),
    _series("chrono_collector_connect_attempts_total", 9104, "1 1 1 1 stale 1 1 1 1 1",
            exchange="kraken"),
    _series("chrono_collector_build_info", 9104, "1 1 1 1 stale 1 1 1 1 1", **_info("kraken")),
    _series("process_start_time_seconds", 9101, "100x9"),
    _series("chrono_collector_connect_attempts_total", 9101, "1+1x9", exchange="coinbase"),
    _series("chrono_collector_build_info", 9101, "1x9", **_info("coinbase")),
])


def test_the_restarts_panel_counts_process_restarts_per_exchange(tmp_path: Path) -> None:
    expr = panel_expr("Restarts (15m)")
    (tmp_path / "none.rules.yml").write_text("groups: []\n")
    (tmp_path / "panel.test.yml").write_text(f"""
rule_files: [none.rules.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
{RESTART_SERIES}    promql_expr_test:
      - expr: {json.dumps(expr)}
        eval_time: 9m
        exp_samples:
          - labels: '{{exchange="kraken",job="chrono-collectors",instance="127.0.0.1:9104"}}'
            value: 3
          - labels: '{{exchange="coinbase",job="chrono-collectors",instance="127.0.0.1:9101"}}'
            value: 0
""")
    res = subprocess.run([require_tool("promtool"), "test", "rules", "panel.test.yml"],
                         capture_output=True, text=True, timeout=30, cwd=tmp_path, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.slow
def test_every_metric_name_appears_in_a_real_scrape(collector: CollectorProcess) -> None:
    names = scrape_names(collector.metrics_text())
    used = {n for e in panel_exprs()
            for n in re.findall(r"\b(?:chrono_collector|process)_\w+", e)}
    assert used and not used - names, sorted(used - names)
