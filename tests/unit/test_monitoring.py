"""The shipped Prometheus rules and Grafana dashboard against what the collectors export:
counters that start at 0, timestamps that read 0 while unknown, one unit per panel, and the
alerts' behaviour through `promtool test rules` (skipped without promtool, failed in CI)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from collectors.connection import PLANNED_REASONS
from collectors.metrics import RECONNECT_REASONS
from tests.ops.helpers import DASHBOARD, ROOT, panel_expr, require_tool

RULES_DIR = ROOT / "monitoring" / "prometheus" / "rules"
RULES = RULES_DIR / "chrono.rules.yml"
#: Gauges that read 0 until their time is known (none yet, or the spool is empty).
ZERO_UNTIL_KNOWN = ("last_flush_success_timestamp_seconds", "last_message_timestamp_seconds",
                    "spool_oldest_record_timestamp_seconds", "last_record_timestamp_seconds")


def _panels() -> list[dict[str, object]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert isinstance(panels, list)
    return panels


def _exprs(panel: dict[str, object]) -> list[str]:
    targets = panel["targets"]
    assert isinstance(targets, list)
    return [str(t["expr"]) for t in targets]


def _panel(title: str) -> dict[str, object]:
    [panel] = [p for p in _panels() if p["title"] == title]
    return panel


def _unit(panel: dict[str, object]) -> str:
    field_config = panel["fieldConfig"]
    assert isinstance(field_config, dict)
    return str(field_config["defaults"]["unit"])


def _alert_expr(name: str) -> str:
    text = RULES.read_text()
    start = text.index(f"- alert: {name}\n")
    end = text.find("- alert:", start + 1)
    block = text[start:end if end > 0 else None]
    return block.split("expr:", 1)[1].split("\n        for:")[0].split("\n        labels:")[0]


def _alert_test(tmp_path: Path, series: str, alert_rule_tests: str) -> None:
    """`promtool test rules` of the shipped rules: one-minute steps over `series` (lines made
    by `_series`), checked by `alert_rule_tests` (the YAML items under alert_rule_test)."""
    _promtool_test(tmp_path, "rule_files: [chrono.rules.yml]\nevaluation_interval: 1m\n"
                   "tests:\n  - interval: 1m\n    input_series:\n" + series
                   + "    alert_rule_test:\n" + alert_rule_tests)


def _promtool_test(tmp_path: Path, test_yaml: str) -> None:
    (tmp_path / "chrono.rules.yml").write_text(RULES.read_text())
    (tmp_path / "case.test.yml").write_text(test_yaml)
    res = subprocess.run([require_tool("promtool"), "test", "rules", "case.test.yml"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_shipped_rule_unit_tests_pass() -> None:
    res = subprocess.run([require_tool("promtool"), "test", "rules", "chrono.rules.test.yml"],
                         capture_output=True, text=True, timeout=60, cwd=RULES_DIR, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_time_since_a_timestamp_never_uses_one_that_reads_zero() -> None:
    # time() - 0 is ~1.8e9 s: every `time() - x` keeps x only where x > 0.
    texts = [RULES.read_text(), *(e for p in _panels() for e in _exprs(p))]
    for text in texts:
        for name in ZERO_UNTIL_KNOWN:
            for m in re.finditer(rf"time\(\)\s*-\s*(\(?)\s*chrono_collector_{name}", text):
                rest = text[m.end():]
                assert m.group(1) == "(" and re.match(r"(\{[^}]*\})?\s*>\s*0\s*\)", rest), (
                    text[m.start():m.end() + 60])


def test_each_panel_has_one_unit_for_all_its_queries() -> None:
    for panel in _panels():
        exprs = _exprs(panel)
        ages = [e for e in exprs if e.startswith("time() -")]
        if ages:
            assert ages == exprs and _unit(panel) == "s", panel["title"]
        if any("spool_max_bytes" in e for e in exprs):
            assert len(exprs) == 1 and _unit(panel) == "percentunit", panel["title"]
    assert _exprs(_panel("Flush failures/s by reason")) == [
        panel_expr("Flush failures/s by reason").replace(".*", "$exchange")]
    assert "last_flush_success" in panel_expr("Time since last accepted batch")
    assert _unit(_panel("Spool backlog (records)")) == "none"
    assert _exprs(_panel("Spool backlog (records)")) == [
        'chrono_collector_spool_records{exchange=~"$exchange"}']


def test_the_drops_panel_shows_every_loss_the_alert_counts() -> None:
    alerted = set(re.findall(r"chrono_collector_\w+_total", _alert_expr("RecordsDropped")))
    shown = {n for e in _exprs(_panel("Dropped and dead-lettered (10m)"))
             for n in re.findall(r"chrono_collector_\w+_total", e)}
    assert "chrono_collector_spool_corrupt_lost_records_total" in alerted
    assert alerted <= shown, alerted - shown


def test_error_counters_have_an_alert_and_a_panel() -> None:
    rules = RULES.read_text()
    panels = " ".join(e for p in _panels() for e in _exprs(p))
    for name in ("subscription_errors_total", "symbol_rejected", "spool_errors_total",
                 "thread_errors_total"):
        assert f"chrono_collector_{name}" in panels, name
    for name in ("symbol_rejected", "spool_errors_total", "thread_errors_total"):
        assert f"chrono_collector_{name}" in rules, name


def test_the_reconnect_alert_leaves_out_exactly_the_planned_reasons() -> None:
    expr = _alert_expr("CollectorReconnecting")
    [excluded] = re.findall(r'reason!~"([^"]*)"', expr)
    assert set(excluded.split("|")) == PLANNED_REASONS
    assert set(RECONNECT_REASONS) > PLANNED_REASONS


def test_symbol_no_data_is_quiet_while_the_collector_is_disconnected() -> None:
    expr = _alert_expr("SymbolNoData")
    assert re.search(r"unless on \(exchange, job, instance\) \(chrono_collector_connected == 0\)",
                     expr), expr


SERIES = "        values: '{values}'\n"
FLUSH_SUMMARY = ("{exchange}: no batch accepted by the ingest API for over 10 minutes while "
                 "records wait in the spool")
FLUSH_DESCRIPTION = ("Flush failures in the last 15 minutes by reason: {reasons} (batch_retry "
                     "and ingest_auth_failed log lines give the status and detail).")
RECONNECT_DESCRIPTION = ("The WebSocket connection keeps dropping; see the dashboard's "
                         "reconnects by reason and the ws_disconnected, ws_liveness_timeout "
                         "and ws_closed_by_server log lines.")
REJECTED_DESCRIPTION = ("The venue does not list this market (log line symbol_rejected); it is "
                        "not collected. Fix SYMBOLS and restart the collector.")


def _labels(**labels: str) -> str:
    """An alert's expected labels (a promtool test's `exp_labels`), instance "a"."""
    return json.dumps({**labels, "job": "chrono-collectors", "instance": "a"})


def _series(name: str, values: str, **labels: str) -> str:
    text = ",".join([*(f'{k}="{v}"' for k, v in labels.items()), 'job="chrono-collectors"',
                     'instance="a"'])
    return f"      - series: '{name}{{{text}}}'\n" + SERIES.format(values=values)


def test_flush_failing_fires_on_a_rare_failure_with_records_waiting(tmp_path: Path) -> None:
    # The reviewer's case: 503 with Retry-After 600 s, one failure per 10 minutes.
    series = "".join([
        _series("chrono_collector_flush_failures_total", "0 1x9 2x9 3x9 4x9",
                exchange="coinbase", reason="throttled"),
        _series("chrono_collector_last_flush_success_timestamp_seconds", "30x40",
                exchange="coinbase"),
        _series("chrono_collector_spool_oldest_record_timestamp_seconds", "0 60x40",
                exchange="coinbase"),
        _series("chrono_collector_spool_records", "0 500+50x40", exchange="coinbase"),
    ])
    _alert_test(tmp_path, series, f"""
      - alertname: FlushFailing
        eval_time: 15m
        exp_alerts: []
      - alertname: FlushFailing
        eval_time: 25m
        exp_alerts:
          - exp_labels: {_labels(severity="critical", exchange="coinbase")}
            exp_annotations:
              summary: {json.dumps(FLUSH_SUMMARY.format(exchange="coinbase"))}
              description: {json.dumps(FLUSH_DESCRIPTION.format(reasons="throttled=2"))}
""")


def test_the_first_reconnects_and_rejections_alert(tmp_path: Path) -> None:
    # What the collector exports now: every reason and configured symbol from 0 at the start.
    series = "".join([
        _series("chrono_collector_reconnects_total", "0 0 4x10", exchange="kraken",
                reason="liveness_timeout"),
        _series("chrono_collector_reconnects_total", "0 0 9x10", exchange="kraken",
                reason="max_age"),
        _series("chrono_collector_subscription_errors_total", "0 0 1x10", exchange="kraken",
                symbol="FOO/USD"),
        _series("chrono_collector_symbol_rejected", "0 0 1x10", exchange="kraken",
                symbol="FOO/USD"),
    ])
    _alert_test(tmp_path, series, f"""
      - alertname: CollectorReconnecting
        eval_time: 4m
        exp_alerts:
          - exp_labels: {_labels(severity="warning", exchange="kraken")}
            exp_annotations:
              summary: "kraken: 4 unplanned reconnects in 15 minutes"
              description: {json.dumps(RECONNECT_DESCRIPTION)}
      - alertname: SymbolRejected
        eval_time: 4m
        exp_alerts:
          - exp_labels: {_labels(severity="warning", exchange="kraken", symbol="FOO/USD")}
            exp_annotations:
              summary: "kraken FOO/USD: the venue refused the subscription"
              description: {json.dumps(REJECTED_DESCRIPTION)}
""")


def test_time_since_panels_show_nothing_until_the_time_is_known(tmp_path: Path) -> None:
    cases = []
    for title, name in (("Time since last accepted batch",
                         "chrono_collector_last_flush_success_timestamp_seconds"),
                        ("Oldest waiting record age",
                         "chrono_collector_spool_oldest_record_timestamp_seconds"),
                        ("Time since last frame",
                         "chrono_collector_last_message_timestamp_seconds")):
        cases.append((panel_expr(title), name))
    series = "".join(_series(name, "0 0 60 60", exchange="coinbase") for _e, name in cases)
    tests = "".join(f"""      - expr: {json.dumps(expr)}
        eval_time: 1m
        exp_samples: []
      - expr: {json.dumps(expr)}
        eval_time: 3m
        exp_samples:
          - labels: '{{exchange="coinbase",job="chrono-collectors",instance="a"}}'
            value: 120
""" for expr, _name in cases)
    _promtool_test(tmp_path, f"""
rule_files: [chrono.rules.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
{series}    promql_expr_test:
{tests}""")


RESTARTED_SUMMARY = ("collector a restarted 1 time(s) in 15 minutes: a crash, unless restarted "
                     "by hand")
RESTARTED_DESCRIPTION = (
    "A new collector process started. After a crash, the collector's log has a thread_crashed "
    "line naming the thread, with its traceback (else look for the exit in supervisord.log or "
    "journalctl -u chrono-collector@EXCHANGE). RestartsLooping fires past 3 restarts in 15 "
    "minutes.")


def test_a_crash_alerts_through_the_restart_it_causes(tmp_path: Path) -> None:
    # The reviewer's case: the crashed process exits ~15 ms after counting the thread error,
    # so no scrape sees it, and the new process's thread_errors_total starts at 0:
    # ThreadCrashed stays quiet, CollectorRestarted fires (also for a target that never
    # answered a scrape with build_info: no exchange label then).
    assert "process_start_time_seconds" in _alert_expr("CollectorRestarted")
    series = "".join([
        _series("process_start_time_seconds", "1000 1000 _ 1130x20"),
        _series("chrono_collector_thread_errors_total", "0 0 _ 0x20", exchange="binance",
                thread="parse-binance"),
    ])
    _alert_test(tmp_path, series, f"""
      - alertname: CollectorRestarted
        eval_time: 1m
        exp_alerts: []
      - alertname: ThreadCrashed
        eval_time: 4m
        exp_alerts: []
      - alertname: CollectorRestarted
        eval_time: 4m
        exp_alerts:
          - exp_labels: {_labels(severity="warning")}
            exp_annotations:
              summary: {json.dumps(RESTARTED_SUMMARY)}
              description: {json.dumps(RESTARTED_DESCRIPTION)}
""")
