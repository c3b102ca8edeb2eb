"""Grafana is not installable here: check the dashboard's PromQL with promtool (every panel
expression wrapped in a generated rule file) and every metric name against a real scrape."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import CollectorProcess
from tests.ops.helpers import ROOT, require_tool, scrape_names

GRAFANA = ROOT / "monitoring" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "chrono-collectors.json"


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


@pytest.mark.slow
def test_every_metric_name_appears_in_a_real_scrape(collector: CollectorProcess) -> None:
    names = scrape_names(collector.metrics_text())
    used = {n for e in panel_exprs() for n in re.findall(r"\bchrono_collector_\w+", e)}
    assert used and not used - names, sorted(used - names)
