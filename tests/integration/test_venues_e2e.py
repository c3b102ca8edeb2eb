"""Binance, Binance.US and Kraken end to end against the simulator over real sockets."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from collectors.simulator import Simulator
from tests.integration.conftest import (
    ROOT,
    collector_process,
    stored_count,
    stored_rows,
    wait_until,
)
from tests.support.servers import IngestServer


def _expected_binance(t: dict[str, object]) -> tuple[object, ...]:
    d = t["data"]
    assert isinstance(d, dict)
    return (str(d["s"]), float(d["c"]), float(d["v"]), float(d["b"]), float(d["a"]),
            int(d["E"]))


def _actual_binance(row: dict[str, object], table: dict[str, str]) -> tuple[object, ...]:
    meta = row["metadata"]
    assert isinstance(meta, dict)
    from datetime import datetime

    ts = datetime.fromisoformat(str(row["timestamp"]).replace("Z", "+00:00"))
    return (table[str(row["symbol"])], row["price"], row["volume"], meta["bid"], meta["ask"],
            round(ts.timestamp() * 1000))


@pytest.fixture(params=["binance", "binanceus"])
def binance_sim(request: pytest.FixtureRequest) -> Iterator[Simulator]:
    with Simulator(request.param, rate_hz=10, seed=3, shutdown_grace_s=2.0) as sim:
        yield sim


def test_binance_every_ticker_once_with_canonical_symbols(
        tmp_path: Path, ingest: IngestServer, binance_sim: Simulator) -> None:
    exchange = binance_sim.exchange
    with collector_process(tmp_path, binance_sim.url, ingest.url, ingest.key,
                           exchange=exchange) as col:
        assert wait_until(lambda: stored_count(ingest) >= 50, 20)
        binance_sim.go_silent(True)
        sent = binance_sim.sent_tickers()
        assert wait_until(lambda: stored_count(ingest) >= len(sent), 10)
        assert col.stop() == 0
    rows = stored_rows(ingest)
    expected_symbols = ({"BTC/USDT", "ETH/USDT", "SOL/USDT", "XRP/USDT", "DOGE/USDT"}
                        if exchange == "binance" else
                        {"BTC/USD", "ETH/USD", "SOL/USD", "XRP/USD", "DOGE/USD"})
    assert {r["symbol"] for r in rows} == expected_symbols
    table = {s: s.replace("/", "") for s in expected_symbols}
    assert sorted(_actual_binance(r, table) for r in rows) == sorted(
        _expected_binance(t) for t in sent)
    assert all(r["metadata"]["timestamp_source"] == "exchange" for r in rows)  # type: ignore[index]


def test_binance_server_shutdown_handover_loses_and_duplicates_nothing(
        tmp_path: Path, ingest: IngestServer, binance_sim: Simulator) -> None:
    with collector_process(tmp_path, binance_sim.url, ingest.url, ingest.key,
                           exchange=binance_sim.exchange) as col:
        assert wait_until(lambda: stored_count(ingest) >= 30, 20)
        binance_sim.server_shutdown()
        assert binance_sim.wait_for(lambda: binance_sim.connections_total >= 2, 10)
        # Both connections deliver during the grace period; then the old one is closed.
        assert wait_until(lambda: bool(col.events("ws_handover_done")), 15)
        before = stored_count(ingest)
        assert wait_until(lambda: stored_count(ingest) >= before + 20, 15)
        binance_sim.go_silent(True)
        sent = binance_sim.sent_tickers()
        unique_sent = {_expected_binance(t) for t in sent}
        assert wait_until(lambda: stored_count(ingest) >= len(unique_sent), 10)
        assert col.metric("chrono_collector_reconnects_total", reason="server_shutdown") == 1
        assert col.stop() == 0
    rows = stored_rows(ingest)
    table = {str(r["symbol"]): str(r["symbol"]).replace("/", "") for r in rows}
    stored = [_actual_binance(r, table) for r in rows]
    assert len(stored) == len(set(stored)), "an update was stored twice"
    assert set(stored) == unique_sent, "an update was lost in the handover"


def test_kraken_every_ticker_once_and_local_time_when_absent(
        tmp_path: Path, ingest: IngestServer) -> None:
    with Simulator("kraken", rate_hz=10, seed=5, kraken_timestamp=False) as sim, \
            collector_process(tmp_path, sim.url, ingest.url, ingest.key,
                              exchange="kraken") as col:
        assert wait_until(lambda: stored_count(ingest) >= 40, 20)
        sim.go_silent(True)
        sent = [item for t in sim.sent_tickers() for item in t["data"]]  # type: ignore[union-attr]
        assert wait_until(lambda: stored_count(ingest) >= len(sent), 10)
        assert col.stop() == 0
    rows = stored_rows(ingest)
    assert sorted((r["symbol"], r["price"], r["volume"], r["metadata"]["bid"],  # type: ignore[index]
                   r["metadata"]["ask"]) for r in rows) == sorted(  # type: ignore[index]
        (d["symbol"], d["last"], d["volume"], d["bid"], d["ask"]) for d in sent)
    assert {r["metadata"]["timestamp_source"] for r in rows} == {"local"}  # type: ignore[index]


def test_kraken_uses_the_exchange_time_and_names_a_rejected_pair(
        tmp_path: Path, ingest: IngestServer) -> None:
    with Simulator("kraken", rate_hz=10, seed=5) as sim, \
            collector_process(tmp_path, sim.url, ingest.url, ingest.key, exchange="kraken",
                              SYMBOLS="BTC/USD,ETH/USD,FOO/USD") as col:
        assert wait_until(lambda: bool(col.events("symbol_rejected")), 10)
        assert wait_until(lambda: stored_count(ingest) >= 20, 20)
        sim.go_silent(True)
        sent = [item for t in sim.sent_tickers() for item in t["data"]]  # type: ignore[union-attr]
        assert wait_until(lambda: stored_count(ingest) >= len(sent), 10)
        [event] = col.events("symbol_rejected")
        assert event["symbols"] == ["FOO/USD"]
        assert col.stop() == 0
    rows = stored_rows(ingest)
    assert {r["symbol"] for r in rows} == {"BTC/USD", "ETH/USD"}
    assert sorted((r["symbol"], r["timestamp"]) for r in rows) == sorted(
        (d["symbol"], d["timestamp"]) for d in sent)


@pytest.mark.parametrize("exchange", ["binance", "binanceus", "kraken"])
def test_dropped_connection_reconnects_for_every_venue(
        tmp_path: Path, ingest: IngestServer, exchange: str) -> None:
    with Simulator(exchange, rate_hz=10, seed=1) as sim, \
            collector_process(tmp_path, sim.url, ingest.url, ingest.key,
                              exchange=exchange) as col:
        assert wait_until(lambda: stored_count(ingest) >= 20, 20)
        sim.drop_all()
        assert sim.wait_for(lambda: sim.connections_total >= 2, 10)
        before = stored_count(ingest)
        assert wait_until(lambda: stored_count(ingest) >= before + 20, 15)
        assert col.metric("chrono_collector_reconnects_total") >= 1
        assert col.stop() == 0


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "collectors", *args], capture_output=True,
                          text=True, env={"PYTHONPATH": str(ROOT), **env}, timeout=30,
                          check=False)


def test_binance_com_has_no_usd_market_and_says_what_to_use() -> None:
    env = {"API_BASE_URL": "http://127.0.0.1:9", "API_KEY": "test-key-0123456789",
           "SYMBOLS": "BTC/USD"}
    result = _run("run", "binance", env=env)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert "BTC/USD" in line and "BTC/USDT" in line and "binanceus" in line


def test_a_symbol_outside_the_table_is_named_at_start_and_the_others_flow(
        tmp_path: Path, ingest: IngestServer) -> None:
    """Binance lists far more markets than the adapter's table: one outside it is subscribed
    (and named as unverified); the venue sends nothing for a market it does not list, which
    the parser reports by name after 30 s (tests/unit/test_pipeline.py)."""
    with Simulator("binance", rate_hz=10, seed=3) as sim, collector_process(
            tmp_path, sim.url, ingest.url, ingest.key, exchange="binance",
            SYMBOLS="BTC/USDT,NOPE/USDT") as col:
        assert wait_until(lambda: bool(col.events("symbols_unverified")), 10)
        assert col.events("symbols_unverified")[0]["symbols"] == ["NOPE/USDT"]
        assert wait_until(lambda: stored_count(ingest) >= 5, 20)
        assert "nopeusdt@ticker" in next(iter(sim.subscriptions().values()))
        assert col.stop() == 0
    assert {r["symbol"] for r in stored_rows(ingest)} == {"BTC/USDT"}


def test_http_451_says_the_region_is_restricted(tmp_path: Path, ingest: IngestServer) -> None:
    with Simulator("binance", rate_hz=10) as sim:
        sim.reject_handshake(451)
        with collector_process(tmp_path, sim.url, ingest.url, ingest.key,
                               exchange="binance") as col:
            assert wait_until(lambda: bool(col.events("ws_handshake_rejected")), 10)
            event = col.events("ws_handshake_rejected")[0]
            assert event["status"] == 451 and "binanceus" in str(event["hint"])
            assert col.stop() == 0
