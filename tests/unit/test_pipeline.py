"""The parser thread: per-symbol freshness (stale is reported once, recovery is reported,
nothing reconnects) and the records and metrics one chunk of frames produces."""

from __future__ import annotations

import json
import threading

from prometheus_client import CollectorRegistry

from collectors.batching import Handoff
from collectors.connection import Connection, Frame
from collectors.decoding import decode_frame
from collectors.exchanges import create
from collectors.metrics import Metrics
from collectors.model import PriceFeed
from collectors.pipeline import FIRST_DATA_TIMEOUT_S, Freshness, Parser


def test_quiet_symbol_goes_stale_once_and_recovers() -> None:
    f = Freshness(["BTC/USD", "ETH/USD"], stale_after_s=60, now=0.0)
    f.seen("BTC/USD", 1.0)
    f.seen("ETH/USD", 1.0)
    assert f.check(50.0) == ([], [])
    f.seen("ETH/USD", 55.0)
    assert f.check(62.0) == (["BTC/USD"], [])
    assert f.check(70.0) == ([], [])  # reported once
    assert f.stale == {"BTC/USD"}
    assert f.seen("BTC/USD", 71.0) is True
    assert f.stale == set()


def test_symbol_that_never_sends_is_named() -> None:
    f = Freshness(["BTC/USD", "NOPE/USD"], stale_after_s=120, now=0.0)
    f.seen("BTC/USD", 1.0)
    assert f.check(FIRST_DATA_TIMEOUT_S - 1) == ([], [])
    assert f.check(FIRST_DATA_TIMEOUT_S + 1) == ([], ["NOPE/USD"])


def test_forgotten_symbols_are_not_watched() -> None:
    f = Freshness(["BTC/USD", "XRP/FOO"], stale_after_s=10, now=0.0)
    f.forget("XRP/FOO")
    f.seen("BTC/USD", 100.0)
    assert f.check(105.0) == ([], [])
    assert f.seen("XRP/FOO", 1.0) is False


def test_new_connection_restarts_the_first_data_window() -> None:
    f = Freshness(["BTC/USD"], stale_after_s=120, now=0.0)
    f.restart_clock(100.0)
    assert f.check(100.0 + FIRST_DATA_TIMEOUT_S - 1) == ([], [])


# ---- the parser thread's per-chunk work --------------------------------------------------------

def _ticker(product: str, sequence: int, price: str, time_iso: str) -> bytes:
    # The shape of Coinbase's ticker (tests/fixtures/coinbase/cases.jsonl, real captures).
    return json.dumps({
        "type": "ticker", "sequence": sequence, "product_id": product, "price": price,
        "open_24h": "14.6647", "volume_24h": "94381.28", "low_24h": "14.3691",
        "high_24h": "16.55", "volume_30d": "2295579.57", "best_bid": "14.7550",
        "best_ask": "14.8060", "side": "buy", "time": time_iso, "trade_id": 881613,
        "last_size": "0.04"}).encode()


def test_a_chunk_updates_records_and_metrics_once_per_symbol() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, "coinbase", "w1")
    adapter = create("coinbase", "w1", decode_frame)
    frames: Handoff[Frame] = Handoff(10)
    records: Handoff[PriceFeed] = Handoff(100)
    conn = Connection(adapter, "ws://127.0.0.1:9", ["BTC/USD", "ETH/USD"], frames, metrics,
                      threading.Event())
    parser = Parser(adapter, frames, records, conn, metrics, threading.Event())
    t0 = 1_795_948_682_000_000_000  # 2026-11-29T10:38:02Z
    chunk: list[Frame] = [
        (_ticker("BTC-USD", 10, "100.5", "2026-11-29T10:38:02.000000Z"), t0 + 2_000_000),
        (_ticker("ETH-USD", 20, "10.25", "2026-11-29T10:38:02.001000Z"), t0 + 3_000_000),
        (_ticker("BTC-USD", 10, "100.5", "2026-11-29T10:38:02.000000Z"), t0 + 4_000_000),  # dup
        (b'{"type": "ticker", "price": ', t0 + 5_000_000),                              # broken
        (b'{"type": "heartbeat", "sequence": 21, "product_id": "ETH-USD"}', t0 + 6_000_000),
        (_ticker("BTC-USD", 11, "101", "2026-11-29T10:38:02.006000Z"), t0 + 7_000_000),
    ]
    parser._handle(chunk)

    out = records.get_all(0.0)
    assert [(r.symbol, r.price) for r in out] == [("BTC/USD", 100.5), ("ETH/USD", 10.25),
                                                  ("BTC/USD", 101.0)]

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(f"chrono_collector_{name}",
                                         {"exchange": "coinbase", **labels})

    assert sample("records_total", symbol="BTC/USD") == 2
    assert sample("records_total", symbol="ETH/USD") == 1
    assert sample("last_record_timestamp_seconds", symbol="BTC/USD") == (t0 + 7_000_000) / 1e9
    assert sample("messages_received_total", kind="ticker") == 4
    assert sample("messages_received_total", kind="heartbeat") == 1
    assert sample("duplicates_dropped_total") == 1
    assert sample("parse_errors_total") == 1
    assert sample("last_message_timestamp_seconds") == (t0 + 7_000_000) / 1e9
    # Lags of 2, 2 and 1 ms.
    assert sample("lag_seconds_count") == 3
    assert sample("lag_seconds_bucket", le="0.001") == 1
    assert sample("lag_seconds_bucket", le="0.005") == 3
    assert parser.records_total == 3
    assert parser.freshness.last["BTC/USD"] is not None
