"""The full pipeline into PostgreSQL: simulators -> collector processes -> `chrono-collector
ingest` (a process, DATABASE_URL=postgresql://...) -> price_feeds; the original design's check
queries run verbatim."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest
import requests

from collectors.simulator import Simulator
from tests.integration.conftest import ROOT, collector_process, free_port, wait_until
from tests.support.postgres import connect, postgres_schema

pytestmark = pytest.mark.postgres

KEY = "pg-pipeline-key-0123456789"
CHECK_QUERY = ("SELECT source, COUNT(*), COUNT(DISTINCT symbol), MAX(timestamp) FROM price_feeds "
               "WHERE timestamp > NOW() - INTERVAL '10 minutes' GROUP BY source")
LATEST_QUERY = "SELECT * FROM price_feeds ORDER BY timestamp DESC LIMIT 10"


def _count(url: str) -> int:
    with connect(url) as conn:
        try:
            row = conn.execute("SELECT COUNT(*) FROM price_feeds").fetchone()
        except Exception:  # the ingest process has not created the table yet
            return 0
        return int(row[0]) if row else 0


def test_three_venues_fill_price_feeds_and_the_check_query_counts_them(tmp_path: Path) -> None:
    with postgres_schema() as db_url, ExitStack() as stack:
        port = free_port()
        log = (tmp_path / "ingest.log").open("wb")
        stack.callback(log.close)
        ingest = subprocess.Popen(
            [sys.executable, "-m", "collectors", "ingest"], stdout=log, stderr=subprocess.STDOUT,
            env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT),
                 "DATABASE_URL": db_url, "API_KEY": KEY, "INGEST_PORT": str(port)})
        stack.callback(lambda: ingest.poll() is None and ingest.kill())
        base = f"http://127.0.0.1:{port}"

        def ingest_up() -> bool:
            try:
                return requests.get(base + "/healthz", timeout=1).status_code == 200
            except requests.RequestException:
                return False

        assert wait_until(ingest_up, 20), (tmp_path / "ingest.log").read_text()
        sims = {ex: stack.enter_context(Simulator(ex, rate_hz=10, seed=9))
                for ex in ("coinbase", "binance", "kraken")}
        cols = {}
        for ex, sim in sims.items():
            sub = tmp_path / ex
            sub.mkdir()
            cols[ex] = stack.enter_context(collector_process(sub, sim.url, base, KEY,
                                                             exchange=ex))
        assert wait_until(lambda: _count(db_url) >= 150, 30)
        for sim in sims.values():
            sim.go_silent(True)
        sent = {"coinbase": len(sims["coinbase"].sent_tickers()),
                "binance": len(sims["binance"].sent_tickers()),
                "kraken": sum(len(t["data"]) for t in sims["kraken"].sent_tickers())}  # type: ignore[arg-type]
        assert wait_until(lambda: _count(db_url) >= sum(sent.values()), 20)
        for col in cols.values():
            assert col.stop() == 0

        with connect(db_url) as conn:
            summary = {row[0]: row[1:] for row in conn.execute(CHECK_QUERY).fetchall()}
            latest = conn.execute(LATEST_QUERY).fetchall()
        assert {s: v[0] for s, v in summary.items()} == sent
        assert {s: v[1] for s, v in summary.items()} == {"coinbase": 5, "binance": 5,
                                                         "kraken": 5}
        assert len(latest) == 10

        # The read endpoints say the same without SQL.
        headers = {"Authorization": f"Bearer {KEY}"}
        body = requests.get(base + "/api/v1/summary?minutes=10", headers=headers,
                            timeout=5).json()
        assert {s["source"]: s["count"] for s in body["sources"]} == sent
        prices = requests.get(base + "/api/v1/prices/latest?source=binance", headers=headers,
                              timeout=5).json()["prices"]
        assert {p["symbol"] for p in prices} == {"BTC/USDT", "ETH/USDT", "SOL/USDT", "XRP/USDT",
                                                 "DOGE/USDT"}
        ingest.send_signal(signal.SIGTERM)
        assert ingest.wait(10) == 0
