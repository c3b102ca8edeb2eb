"""The parser thread: per-symbol freshness (stale is reported once, recovery is reported,
nothing reconnects), the records and metrics one chunk of frames produces, and the spool writer
that commits each chunk's records on the parser's thread (a real spool in a temporary
directory)."""

from __future__ import annotations

import errno
import json
import logging
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from collectors.batching import Handoff
from collectors.config import CollectorConfig
from collectors.connection import Connection, Frame
from collectors.decoding import decode_frame
from collectors.delivery import SpoolWriter
from collectors.errors import ConfigError, ParseError, SpoolError
from collectors.exchanges import create
from collectors.metrics import Metrics
from collectors.model import PriceFeed
from collectors.pipeline import (
    FIRST_DATA_TIMEOUT_S,
    PARSE_ERROR_LOG_REASONS,
    Freshness,
    LogSampler,
    Parser,
)
from collectors.sdnotify import Notifier
from collectors.service import PROGRESS_WINDOW_S, CollectorService
from collectors.spool import Spool
from tests.support.waiting import wait_until


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


def test_the_first_data_window_counts_connected_time_across_short_connections() -> None:
    # A venue that voids the subscribe and goes silent: each connection ends at the 10 s
    # liveness timeout. A window restarted by every connection never ended, so the symbols that
    # never had data were never named; connected time adds up over the connections instead.
    f = Freshness(["BTC/USD"], stale_after_s=120, now=0.0)
    assert f.check(0.5, None) == ([], [])  # connecting
    reported: list[str] = []
    up_at = 1.0
    while up_at < 100 and not reported:
        for t in range(1, 11):  # up for 10 s, checked every second
            reported += f.check(up_at + t, up_at)[1]
        assert f.check(up_at + 11.5, None) == ([], [])  # down, backing off
        up_at += 13.0
    assert reported == ["BTC/USD"]
    assert FIRST_DATA_TIMEOUT_S < f.clock(up_at) < FIRST_DATA_TIMEOUT_S + 11


def test_time_without_a_connection_does_not_make_symbols_stale() -> None:
    f = Freshness(["BTC/USD", "ETH/USD"], stale_after_s=60, now=0.0)
    f.seen("BTC/USD", 1.0)
    assert f.check(2.0, 0.0) == ([], [])
    assert f.check(3.0, None) == ([], [])  # a 10-minute outage follows
    assert f.check(600.0, None) == ([], [])
    # Back up: neither the symbol that had data nor the one without is stale at once...
    assert f.check(601.0, 600.5) == ([], [])
    assert f.check(601.0 + FIRST_DATA_TIMEOUT_S - 5, 600.5) == ([], [])
    # ...but each after its own threshold of connected time.
    assert f.check(601.0 + FIRST_DATA_TIMEOUT_S, 600.5) == ([], ["ETH/USD"])
    assert f.check(660.0, 600.5) == (["BTC/USD"], [])


# ---- the parser thread's per-chunk work --------------------------------------------------------

def _ticker(product: str, sequence: int, price: str, time_iso: str) -> bytes:
    # The shape of Coinbase's ticker (tests/fixtures/coinbase/cases.jsonl, real captures).
    return json.dumps({
        "type": "ticker", "sequence": sequence, "product_id": product, "price": price,
        "open_24h": "14.6647", "volume_24h": "94381.28", "low_24h": "14.3691",
        "high_24h": "16.55", "volume_30d": "2295579.57", "best_bid": "14.7550",
        "best_ask": "14.8060", "side": "buy", "time": time_iso, "trade_id": 881613,
        "last_size": "0.04"}).encode()


def _coinbase_parser(symbols: list[str]) -> tuple[Parser, Handoff[PriceFeed], CollectorRegistry]:
    """A Coinbase parser subscribed to `symbols` (a connection never opened), handing its
    records to a queue."""
    registry = CollectorRegistry()
    metrics = Metrics(registry, "coinbase", "w1")
    adapter = create("coinbase", "w1", decode_frame)
    frames: Handoff[Frame] = Handoff(10)
    records: Handoff[PriceFeed] = Handoff(100)
    conn = Connection(adapter, "ws://127.0.0.1:9", symbols, frames, metrics, threading.Event())
    return Parser(adapter, frames, records, conn, metrics, threading.Event()), records, registry


def test_a_chunk_updates_records_and_metrics_once_per_symbol() -> None:
    parser, records, registry = _coinbase_parser(["BTC/USD", "ETH/USD"])
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
    # (the metric of the last frame is the connection's, read when scraped: see below)
    assert parser.last_message_unix == (t0 + 7_000_000) / 1e9
    # Lags of 2, 2 and 1 ms.
    assert sample("lag_seconds_count") == 3
    assert sample("lag_seconds_bucket", le="0.001") == 1
    assert sample("lag_seconds_bucket", le="0.005") == 3
    assert parser.records_total == 3
    assert parser.freshness.last["BTC/USD"] is not None


class _UpConnection:
    """What the parser asks of a connection that is up since `since`; records its requests."""

    def __init__(self, symbols: list[str], since: float) -> None:
        self.symbols = symbols
        self.connected_since: float | None = since
        self.reconnects: list[str] = []

    def request_reconnect(self, reason: str, **_which_frame: object) -> None:
        self.reconnects.append(reason)

    def subscribe_sent(self) -> tuple[int, dict[str, object]]:
        return 1, {}  # (the venues here take no subscribe request, or none was sent)


def _binance_parser(symbols: list[str]) -> Parser:
    adapter = create("binance", "w1", decode_frame)
    metrics = Metrics(CollectorRegistry(), "binance", "w1")
    frames: Handoff[Frame] = Handoff(10)
    conn = Connection(adapter, "ws://127.0.0.1:9", symbols, frames, metrics, threading.Event())
    return Parser(adapter, frames, Handoff(100), conn, metrics, threading.Event())


def test_every_symbol_stale_on_a_live_connection_asks_for_a_new_one(
        caplog: pytest.LogCaptureFixture) -> None:
    # Binance pushes each ticker every second; pongs keep the connection alive while no stream
    # delivers (a stuck stream): only a new connection can mend it. Asked once per
    # stale_after_s of connected time.
    parser = _binance_parser(["BTC/USDT", "ETH/USDT"])
    conn = _UpConnection(["BTC/USDT", "ETH/USDT"], 0.0)
    parser._conn = conn  # type: ignore[assignment]
    stale_after = parser.freshness.stale_after_s
    freshness = parser.freshness = Freshness(conn.symbols, stale_after, now=0.0)
    freshness.seen("BTC/USDT", 1.0)
    parser._periodic(stale_after / 2)
    assert conn.reconnects == []
    parser._periodic(stale_after + 2)  # BTC quiet, ETH never had data: both stale
    assert freshness.stale == {"BTC/USDT", "ETH/USDT"}
    assert conn.reconnects == ["all_symbols_stale"]
    assert "all_symbols_stale" in caplog.text
    parser._periodic(stale_after + 10)
    assert conn.reconnects == ["all_symbols_stale"]  # not on every check
    parser._periodic(2 * stale_after + 3)
    assert conn.reconnects == ["all_symbols_stale"] * 2
    # One symbol back: not all stale any more, no further requests.
    freshness.seen("ETH/USDT", 2 * stale_after + 4)
    freshness.stale.discard("ETH/USDT")
    parser._periodic(2 * stale_after + 10)
    assert conn.reconnects == ["all_symbols_stale"] * 2


@pytest.mark.parametrize("exchange", ["coinbase", "kraken"])
def test_quiet_markets_where_tickers_follow_trades_are_not_reconnected(exchange: str) -> None:
    # Coinbase's and Kraken's tickers follow trades: every symbol quiet is quiet markets (one
    # thin market, say), reported, never a reason for a new connection (whose snapshot would
    # repeat the last update anyway).
    adapter = create(exchange, "w1", decode_frame)
    metrics = Metrics(CollectorRegistry(), exchange, "w1")
    frames: Handoff[Frame] = Handoff(10)
    conn_ = Connection(adapter, "ws://127.0.0.1:9", ["DOGE/USD"], frames, metrics,
                       threading.Event())
    parser = Parser(adapter, frames, Handoff(100), conn_, metrics, threading.Event())
    conn = _UpConnection(["DOGE/USD"], 0.0)
    parser._conn = conn  # type: ignore[assignment]
    stale_after = parser.freshness.stale_after_s
    parser.freshness = Freshness(["DOGE/USD"], stale_after, now=0.0)
    parser.freshness.seen("DOGE/USD", 1.0)
    for t in range(2, int(4 * stale_after), 5):
        parser._periodic(float(t))
    assert parser.freshness.stale == {"DOGE/USD"}
    assert conn.reconnects == []


@pytest.mark.parametrize(("exchange", "symbols", "all_stale"), [
    ("binance", ("BTC/USDT", "ETH/USDT"), (False, "stale")),  # a stuck stream
    ("kraken", ("BTC/USD", "ETH/USD"), (True, "degraded")),    # quiet markets
])
def test_health_when_every_symbol_is_stale(tmp_path: Path, exchange: str,
                                           symbols: tuple[str, str],
                                           all_stale: tuple[bool, str]) -> None:
    service = CollectorService(CollectorConfig.from_env(exchange, {
        "API_BASE_URL": "http://127.0.0.1:3000", "API_KEY": "test-key-0123456789",
        "CHRONO_STATE_DIR": str(tmp_path), "SYMBOLS": ",".join(symbols)}))
    service.connection.connected_since = time.monotonic()
    service.connection.last_frame_monotonic = time.monotonic()
    assert (service.health().ok, service.health().body["status"]) == (True, "ok")
    service.parser.freshness.stale.add(symbols[1])
    assert (service.health().ok, service.health().body["status"]) == (True, "degraded")
    service.parser.freshness.stale.add(symbols[0])
    health = service.health()
    assert (health.ok, health.body["status"]) == all_stale
    assert health.body["stale_symbols"] == sorted(symbols)


@pytest.mark.parametrize("exchange", ["kraken", "coinbase"])
def test_health_when_the_venue_rejected_every_symbol(tmp_path: Path, exchange: str) -> None:
    # Connected, its heartbeats fresh, and nothing left to collect: not healthy (it was "ok",
    # 200, for as long as the heartbeats came).
    service = CollectorService(CollectorConfig.from_env(exchange, {
        "API_BASE_URL": "http://127.0.0.1:3000", "API_KEY": "test-key-0123456789",
        "CHRONO_STATE_DIR": str(tmp_path), "SYMBOLS": "BTC/USD,ETH/USD"}))
    service.connection.connected_since = time.monotonic()
    service.connection.last_frame_monotonic = time.monotonic()
    assert service.health().ok
    service.parser._venue_error("Currency pair not supported", ("BTC/USD",))
    assert (service.health().ok, service.health().body["status"]) == (True, "ok")
    service.parser._venue_error("Currency pair not supported", ("ETH/USD",))
    health = service.health()
    assert (health.ok, health.body["status"], health.body["symbols"]) == (
        False, "no_symbols", [])


def test_the_queue_and_last_frame_gauges_are_read_when_scraped(tmp_path: Path) -> None:
    # The parser set them per chunk: a parser held by a stalled spool froze them at an empty
    # queue and an ageing last frame while frames kept arriving and piling up.
    registry = CollectorRegistry()
    service = CollectorService(CollectorConfig.from_env("coinbase", {
        "API_BASE_URL": "http://127.0.0.1:3000", "API_KEY": "test-key-0123456789",
        "CHRONO_STATE_DIR": str(tmp_path)}), registry=registry)
    labels = {"exchange": "coinbase"}
    assert registry.get_sample_value("chrono_collector_queue_records", labels) == 0
    assert registry.get_sample_value("chrono_collector_last_message_timestamp_seconds",
                                     labels) == 0
    for i in range(7):  # the ws thread hands frames on; no parser runs
        assert service.frames.put((b"{}", i))
    service.connection._frame_seen_at = time.monotonic() - 2.0
    assert registry.get_sample_value("chrono_collector_queue_records", labels) == 7
    last = registry.get_sample_value("chrono_collector_last_message_timestamp_seconds", labels)
    assert last is not None and abs(last - (time.time() - 2.0)) < 0.5


def test_the_record_rate_falls_while_the_parser_is_held_up() -> None:
    # The rate was read between the window's own samples, which only the parser loop takes:
    # a parser stuck in a spool write retry showed its last rate for as long as it was stuck.
    parser, _records, _registry = _coinbase_parser(["BTC/USD"])
    now = time.monotonic()
    parser._rate_window.extend([(now - 20.0, 0), (now - 10.0, 1000)])
    parser.records_total = 1000
    assert 45 < parser.records_per_s() < 55  # 1000 records over the last 20 s, none since


def test_records_for_symbols_not_subscribed_are_dropped_not_delivered() -> None:
    # A venue that sends tickers nobody asked for (by mistake, or a hostile endpoint sending a
    # new product id each time) gets neither its records delivered nor a metric series each.
    parser, records, registry = _coinbase_parser(["BTC/USD"])
    t0 = 1_795_948_682_000_000_000
    chunk: list[Frame] = [
        (_ticker("BTC-USD", 10, "100.5", "2026-11-29T10:38:02.000000Z"), t0),
        *((_ticker(f"X{i}-USD", 1, "1", "2026-11-29T10:38:02.000000Z"), t0) for i in range(50)),
        (_ticker("BTC-USD", 11, "101", "2026-11-29T10:38:02.100000Z"), t0),
    ]
    parser._handle(chunk)
    assert [(r.symbol, r.price) for r in records.get_all(0.0)] == [("BTC/USD", 100.5),
                                                                  ("BTC/USD", 101.0)]
    series = {s.labels.get("symbol") for family in registry.collect() for s in family.samples
              if "symbol" in s.labels}
    assert series == {"BTC/USD"}
    assert registry.get_sample_value("chrono_collector_parse_errors_total",
                                     {"exchange": "coinbase"}) == 50
    assert parser.records_total == 2


# ---- the spool writer, on the parser's thread --------------------------------------------------

def _parser_into_spool(spool: Spool, wake: threading.Event,
                       stop: threading.Event) -> tuple[Parser, SpoolWriter, CollectorRegistry]:
    registry = CollectorRegistry()
    metrics = Metrics(registry, "coinbase", "w1")
    adapter = create("coinbase", "w1", decode_frame)
    frames: Handoff[Frame] = Handoff(10)
    writer = SpoolWriter(spool, metrics, wake, mark_of=adapter.dedup_mark, retry_wait_s=0.01)
    conn = Connection(adapter, "ws://127.0.0.1:9", ["BTC/USD", "ETH/USD"], frames, metrics,
                      threading.Event())
    return Parser(adapter, frames, writer, conn, metrics, threading.Event(), stop), writer, registry


def _chunk(t0: int) -> list[Frame]:
    return [(_ticker("BTC-USD", 10, "100.5", "2026-11-29T10:38:02.000000Z"), t0),
            (_ticker("ETH-USD", 20, "10.25", "2026-11-29T10:38:02.001000Z"), t0 + 1000),
            (_ticker("BTC-USD", 12, "101", "2026-11-29T10:38:02.002000Z"), t0 + 2000)]


def test_a_chunk_is_committed_with_its_marks_before_the_parser_goes_on(tmp_path: Path) -> None:
    wake, stop = threading.Event(), threading.Event()
    with Spool(tmp_path / "spool", fsync_interval_s=0) as spool:
        parser, _writer, _ = _parser_into_spool(spool, wake, stop)
        parser._handle(_chunk(1_795_948_682_000_000_000))
        # Committed when _handle returns: a claim sees every record, in order.
        assert wake.is_set()
        assert spool.stats().records == 3
        batch = spool.due_batch(10, 0.0, force=True)
        assert batch is not None
        stored = [json.loads(r) for r in batch.records]
        assert [(r["symbol"], r["metadata"]["sequence"]) for r in stored] == [
            ("BTC/USD", 10), ("ETH/USD", 20), ("BTC/USD", 12)]
        # The last sequence per product, stored with the records (the restart dedup).
        assert spool.marks() == {"BTC-USD": 12, "ETH-USD": 20}


def test_a_count_that_starts_over_lowers_the_stored_mark(tmp_path: Path) -> None:
    """A sequence count that starts over is stored as the adapter now holds it (a higher
    stored mark would make the next restart drop real tickers)."""
    wake, stop = threading.Event(), threading.Event()
    t0 = 1_795_948_682_000_000_000
    with Spool(tmp_path / "spool", fsync_interval_s=0) as spool:
        parser, _writer, _ = _parser_into_spool(spool, wake, stop)
        parser._handle([(_ticker("BTC-USD", 10**18, "100", "2026-11-29T10:38:02.000000Z"), t0)])
        assert spool.marks() == {"BTC-USD": 10**18}
        parser._handle([(_ticker("BTC-USD", 101, "100", "2026-11-29T10:38:02.001000Z"), t0),
                        (_ticker("BTC-USD", 102, "100", "2026-11-29T10:38:02.002000Z"), t0)])
        assert spool.marks() == {"BTC-USD": 102}
        assert spool.stats().records == 3


def test_a_mark_sqlite_cannot_hold_is_no_mark(tmp_path: Path) -> None:
    """No mark kills the parser thread: 2**63, once a Coinbase sequence, raised OverflowError
    in SQLite."""
    wake, stop = threading.Event(), threading.Event()
    registry = CollectorRegistry()
    marks = iter([("a", 2**63), ("b", -(2**63) - 1), ("c", 7)])
    with Spool(tmp_path / "spool", fsync_interval_s=0) as spool:
        writer = SpoolWriter(spool, Metrics(registry, "coinbase", "w1"), wake,
                             mark_of=lambda _record: next(marks))
        records = [PriceFeed("BTC/USD", 100.0, None, "2026-11-29T10:38:02.000000Z", "coinbase",
                             "w1", {}, 0, 1_795_948_682_000_000_000) for _ in range(3)]
        assert writer.put_many_waiting(records, stop) == 0
        assert spool.marks() == {"c": 7}
        assert spool.stats().records == 3


class _RefusingSpool(Spool):
    """A real spool whose first `refusals` appends fail as a full disk would."""

    def __init__(self, directory: Path, refusals: int) -> None:
        super().__init__(directory, fsync_interval_s=0)
        self.refusals = refusals
        self.attempts = 0

    def append(self, records: Sequence[bytes], marks: Mapping[str, int] | None = None) -> int:
        self.attempts += 1
        if self.attempts <= self.refusals:
            raise SpoolError(f"spool {self._db_path}: append failed: database or disk is full")
        return super().append(records, marks)


def test_a_refused_write_is_retried_until_the_spool_takes_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    wake, stop = threading.Event(), threading.Event()
    with _RefusingSpool(tmp_path / "spool", refusals=3) as spool, \
            caplog.at_level(logging.ERROR, logger="collectors.delivery"):
        parser, writer, registry = _parser_into_spool(spool, wake, stop)
        started = time.monotonic()
        parser._handle(_chunk(1_795_948_682_000_000_000))
        assert spool.attempts == 4
        assert writer.beat >= started  # retrying is progress for the watchdog
        assert spool.stats().records == 3  # nothing lost, nothing twice
        assert registry.get_sample_value("chrono_collector_spool_errors_total",
                                         {"exchange": "coinbase"}) == 3
        assert registry.get_sample_value("chrono_collector_queue_dropped_records_total",
                                         {"exchange": "coinbase"}) == 0
        # One line for the outage, not one per retry; it names the problem.
        failures = [r for r in caplog.records if r.getMessage() == "spool_write_failed"]
        assert len(failures) == 1
        assert "disk is full" in str(getattr(failures[0], "error", ""))


def test_stopping_while_the_spool_refuses_counts_the_records_it_could_not_keep(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    wake, stop = threading.Event(), threading.Event()
    with _RefusingSpool(tmp_path / "spool", refusals=1_000_000) as spool, \
            caplog.at_level(logging.ERROR):
        parser, _writer, registry = _parser_into_spool(spool, wake, stop)
        stop.set()
        parser._handle(_chunk(1_795_948_682_000_000_000))
        assert spool.attempts == 1  # one try once stopping, no retry loop
        parser._handle([(_ticker("BTC-USD", 13 + i, "102", "2026-11-29T10:38:03.000000Z"),
                         1_795_948_683_000_000_000) for i in range(3)])  # the backlog's next
        assert registry.get_sample_value("chrono_collector_queue_dropped_records_total",
                                         {"exchange": "coinbase"}) == 6
        assert not wake.is_set()
        # The first chunk's said at once (the stop may not wait for a thread a hanging spool
        # holds), the rest in one more line when the loop ends (a line per chunk was nine in
        # 0.2 s).
        def said() -> list[int]:
            return [r.dropped for r in caplog.records  # type: ignore[attr-defined]
                    if r.getMessage() == "records_dropped_unspooled"]

        assert said() == [3]
        parser._ws_finished.set()
        parser.run()
        assert said() == [3, 3]


def test_the_writer_needs_a_spool() -> None:
    writer = SpoolWriter(None, Metrics(CollectorRegistry(), "coinbase", "w1"), threading.Event())
    assert writer.put_many_waiting([], threading.Event()) == 0
    with pytest.raises(RuntimeError, match="before attach"):
        writer.put_many_waiting([PriceFeed.__new__(PriceFeed)], threading.Event())


# ---- the service's threads ---------------------------------------------------------------------

def test_service_threads_carry_their_names_to_the_os() -> None:
    # `top -H` and /proc show which thread uses the CPU (CPython 3.11 does not name them).
    from collectors.threadnames import name_native_thread

    seen: dict[str, object] = {}

    def run() -> None:
        seen["named"] = name_native_thread("parse-coinbase-and-more")
        with open(f"/proc/self/task/{threading.get_native_id()}/comm", encoding="utf-8") as f:
            seen["comm"] = f.read().strip()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen == {"named": True, "comm": "parse-coinbase-"}  # the kernel keeps 15 bytes


def test_the_writer_wakes_delivery_only_when_its_plan_changes(tmp_path: Path) -> None:
    # A wake-up per commit cost more CPU than the POSTs: the delivery thread sleeps until the
    # oldest record is due, and is woken for the first record after none, or a full batch.
    wake, stop = threading.Event(), threading.Event()
    registry = CollectorRegistry()
    metrics = Metrics(registry, "coinbase", "w1")
    adapter = create("coinbase", "w1", decode_frame)
    t0 = 1_795_948_682_000_000_000
    records = adapter.parse(_ticker("BTC-USD", 10, "100.5", "2026-11-29T10:38:02.000000Z"),
                            t0).records
    more = [adapter.parse(_ticker("BTC-USD", 11 + i, "101", "2026-11-29T10:38:02.001000Z"),
                          t0 + 1 + i).records[0] for i in range(3)]
    with Spool(tmp_path / "spool", fsync_interval_s=0) as spool:
        writer = SpoolWriter(spool, metrics, wake, due_size=lambda: 3)
        assert writer.put_many_waiting(list(records), stop) == 0
        assert wake.is_set()  # the first record after none: the sleeper needs its due time
        wake.clear()
        assert writer.put_many_waiting(more[:1], stop) == 0
        assert not wake.is_set()  # two waiting, a batch is three: nothing changed
        assert writer.put_many_waiting(more[1:], stop) == 0
        assert wake.is_set()  # four waiting: a full batch is due now
        assert spool.waiting_records == 4


def test_the_watchdog_window_covers_the_longest_honest_post(tmp_path: Path) -> None:
    # A POST may take twice connect + read timeout before its deadline cuts it: the watchdog
    # must not call a delivery thread waiting that long stuck (systemd would kill it and
    # restart it into the same wait).
    base = {"API_BASE_URL": "http://127.0.0.1:3000", "API_KEY": "test-key-0123456789",
            "CHRONO_STATE_DIR": str(tmp_path)}
    default = CollectorService(CollectorConfig.from_env("coinbase", base))
    slow = CollectorService(CollectorConfig.from_env(
        "coinbase", {**base, "HTTP_READ_TIMEOUT_S": "60"}))
    assert default._progress_window_s == max(PROGRESS_WINDOW_S, 2 * (3 + 10) + 5)
    assert slow._progress_window_s == 2 * (3 + 60) + 5


def test_each_kind_of_parse_error_is_logged_with_its_reason(
        caplog: pytest.LogCaptureFixture) -> None:
    """One log line a reason per interval, not one line for every reason: a flood of one
    defect used to hide the reasons of the others for 10 s at a time."""
    parser, _records, registry = _coinbase_parser(["BTC/USD"])
    t0 = 1_795_948_682_000_000_000
    chunk: list[Frame] = [
        (_ticker("BTC-USD", 10, "-5", "2026-11-29T10:38:02.000000Z"), t0),
        (_ticker("BTC-USD", 11, "-7", "2026-11-29T10:38:02.000000Z"), t0),  # same kind
        (b'{"type": "ticker", "price": ', t0),
        (_ticker("BTC-USD", 12, "abc", "2026-11-29T10:38:02.000000Z"), t0),
        (_ticker("BTC-*", 13, "1", "2026-11-29T10:38:02.000000Z"), t0),
    ]
    with caplog.at_level(logging.WARNING, logger="collectors.pipeline"):
        parser._handle(chunk)
        parser._handle(chunk[:1])  # within the interval: counted, not logged
    errors = [getattr(r, "error", "") for r in caplog.records if r.getMessage() == "parse_failed"]
    assert len(errors) == 4
    assert "must be > 0: '-5'" in errors[0]
    assert errors[1].startswith("malformed JSON")
    assert "'abc'" in errors[2] and "'BTC-*'" in errors[3]
    assert registry.get_sample_value(
        "chrono_collector_parse_errors_total", {"exchange": "coinbase"}) == 6


def test_parse_error_reasons_logged_per_interval_are_bounded(
        caplog: pytest.LogCaptureFixture) -> None:
    parser, _records, _registry = _coinbase_parser(["BTC/USD"])
    reasons = [f"bad field {chr(97 + i // 26)}{chr(97 + i % 26)}"
               for i in range(PARSE_ERROR_LOG_REASONS + 30)]
    with caplog.at_level(logging.WARNING, logger="collectors.pipeline"):
        for reason in reasons:
            parser._log_parse_error(ParseError(reason), b"{}")
    logged = [getattr(r, "error", "") for r in caplog.records if r.getMessage() == "parse_failed"]
    assert logged == reasons[:PARSE_ERROR_LOG_REASONS]


def test_a_passing_subscribe_failure_is_sent_again_later_and_keeps_the_symbol() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, "kraken", "w1")
    adapter = create("kraken", "w1", decode_frame)
    frames: Handoff[Frame] = Handoff(10)
    records: Handoff[PriceFeed] = Handoff(100)
    conn = Connection(adapter, "ws://127.0.0.1:9", ["BTC/USD", "ETH/USD"], frames, metrics,
                      threading.Event())
    parser = Parser(adapter, frames, records, conn, metrics, threading.Event())
    refused = json.dumps({"method": "subscribe", "success": False, "symbol": "ETH/USD",
                          "error": "Exceeded msg rate", "req_id": 2}).encode()
    before = time.monotonic()
    parser._handle([(refused, 1_795_948_682_000_000_000)])
    assert conn.symbols == ["BTC/USD", "ETH/USD"]  # no verdict on the market
    assert conn._resubscribe == ["ETH/USD"]
    assert before <= conn._resubscribe_at <= time.monotonic() + 1.0  # the first backoff: <= 1 s
    parser._resubscribe_due = time.monotonic()  # the retry went out, and is refused again
    parser._handle([(refused, 1_795_948_682_000_000_000)])
    assert parser._subscribe_backoff.attempt == 2
    # "already subscribed" (a symbol the retry sent again) is no news: the backoff keeps growing
    again = json.dumps({"method": "subscribe", "success": False, "symbol": "BTC/USD",
                        "error": "Already subscribed", "req_id": 3}).encode()
    parser._handle([(again, 1_795_948_682_000_000_000)])
    assert parser._subscribe_backoff.attempt == 2
    ack = json.dumps({"method": "subscribe", "success": True, "req_id": 3,
                      "result": {"channel": "ticker", "symbol": "ETH/USD"}}).encode()
    parser._handle([(ack, 1_795_948_682_000_000_000)])
    assert parser._subscribe_backoff.attempt == 0


def test_one_subscribe_refused_symbol_by_symbol_is_one_retry(
        caplog: pytest.LogCaptureFixture) -> None:
    # Kraken answers each symbol of a subscribe on its own: five refusals of one subscribe
    # stepped the backoff five times and logged five retry times, of which only the earliest
    # was kept.
    symbols = ["BTC/USD", "ETH/USD", "SOL/USD", "XRP/USD", "DOGE/USD"]
    metrics = Metrics(CollectorRegistry(), "kraken", "w1")
    adapter = create("kraken", "w1", decode_frame)
    conn = Connection(adapter, "ws://127.0.0.1:9", symbols, Handoff(10), metrics,
                      threading.Event())
    parser = Parser(adapter, Handoff(10), Handoff(100), conn, metrics, threading.Event())
    refusals = [json.dumps({"method": "subscribe", "success": False, "symbol": symbol,
                            "error": "Exceeded msg rate", "req_id": 1}).encode()
                for symbol in symbols]
    with caplog.at_level(logging.WARNING, logger="collectors.pipeline"):
        parser._handle([(refusals[0], 1_795_948_682_000_000_000)])
        at = conn._resubscribe_at
        parser._handle([(r, 1_795_948_682_000_000_000) for r in refusals[1:]])
    assert parser._subscribe_backoff.attempt == 1
    assert conn._resubscribe == symbols
    assert conn._resubscribe_at == pytest.approx(at, abs=0.01)  # the logged time holds
    assert [r.getMessage() for r in caplog.records].count("subscribe_retry") == 1


def _rejection(product: str) -> bytes:
    return json.dumps({"type": "error", "message": "Failed to subscribe",
                       "reason": f"{product} is not a valid product"}).encode()


def test_a_rejected_symbol_is_counted_from_zero_and_flagged_until_restart() -> None:
    registry = CollectorRegistry()
    symbols = ["BTC/USD", "XRP/USD"]
    metrics = Metrics(registry, "coinbase", "w1", symbols=symbols)
    adapter = create("coinbase", "w1", decode_frame)
    frames: Handoff[Frame] = Handoff(10)
    conn = Connection(adapter, "ws://127.0.0.1:9", symbols, frames, metrics, threading.Event())
    parser = Parser(adapter, frames, Handoff[PriceFeed](100), conn, metrics, threading.Event())
    labels = {"exchange": "coinbase", "symbol": "XRP/USD"}
    # before: 0, so that Prometheus sees the rejection as an increase
    assert registry.get_sample_value("chrono_collector_subscription_errors_total", labels) == 0
    assert registry.get_sample_value("chrono_collector_symbol_rejected", labels) == 0
    parser._handle([(_rejection("XRP-USD"), time.time_ns())])
    assert registry.get_sample_value("chrono_collector_subscription_errors_total", labels) == 1
    assert registry.get_sample_value("chrono_collector_symbol_rejected", labels) == 1
    assert registry.get_sample_value("chrono_collector_symbol_rejected",
                                     {"exchange": "coinbase", "symbol": "BTC/USD"}) == 0
    assert conn.symbols == ["BTC/USD"]


def test_the_service_starts_its_symbols_threads_and_reasons_at_zero(tmp_path: Path) -> None:
    service = CollectorService(CollectorConfig.from_env("kraken", {
        "API_BASE_URL": "http://127.0.0.1:3000", "API_KEY": "test-key-0123456789",
        "CHRONO_STATE_DIR": str(tmp_path), "SYMBOLS": "BTC/USD,ETH/USD",
        "DELIVERY_CONCURRENCY": "2"}))
    registry = service.registry
    for symbol in ("BTC/USD", "ETH/USD"):
        assert registry.get_sample_value("chrono_collector_subscription_errors_total",
                                         {"exchange": "kraken", "symbol": symbol}) == 0
    for thread in ("ws-kraken", "parse-kraken", "delivery", "delivery-2"):
        assert registry.get_sample_value("chrono_collector_thread_errors_total",
                                         {"exchange": "kraken", "thread": thread}) == 0
    assert registry.get_sample_value("chrono_collector_reconnects_total",
                                     {"exchange": "kraken", "reason": "liveness_timeout"}) == 0
    assert registry.get_sample_value("chrono_collector_flush_failures_total",
                                     {"exchange": "kraken", "reason": "server_error"}) == 0


def test_venue_error_messages_are_logged_like_parse_errors(
        caplog: pytest.LogCaptureFixture) -> None:
    # A hostile venue writing a new error text every time must not write a log line each.
    parser, _records, _registry = _coinbase_parser(["BTC/USD"])
    texts = [{"type": "error", "message": f"go away {chr(97 + i // 26)}{chr(97 + i % 26)}"}
             for i in range(200)]
    repeated = [{"type": "error", "message": f"slow down, retry in {i} s"} for i in range(50)]
    with caplog.at_level(logging.ERROR, logger="collectors.pipeline"):
        parser._handle([(json.dumps(m).encode(), time.time_ns()) for m in repeated])
        parser._handle([(json.dumps(m).encode(), time.time_ns()) for m in texts])
    lines = [r for r in caplog.records if r.getMessage() == "venue_error"]
    # one line for the 50 that differ only in a number, then up to the bound of kinds
    assert len(lines) == PARSE_ERROR_LOG_REASONS
    assert getattr(lines[0], "error", "") == "slow down, retry in 0 s"
    assert [getattr(r, "since_last_log", None) for r in lines] == [0] * len(lines)


def test_a_repeated_venue_status_is_logged_once_per_interval_and_a_new_one_at_once(
        caplog: pytest.LogCaptureFixture) -> None:
    # A venue (or a hostile peer) repeating its status every frame wrote a line each: 5,000
    # frames gave 6,082 lines in 5 s.
    registry = CollectorRegistry()
    metrics = Metrics(registry, "kraken", "w1")
    adapter = create("kraken", "w1", decode_frame)
    conn = Connection(adapter, "ws://127.0.0.1:9", ["BTC/USD"], Handoff(10), metrics,
                      threading.Event())
    parser = Parser(adapter, Handoff(10), Handoff(100), conn, metrics, threading.Event())

    def status(system: str) -> Frame:
        # The shape of Kraken's docs (websocket-v2/status; tests/fixtures/kraken).
        return (json.dumps({"channel": "status", "type": "update", "data": [{
            "api_version": "v2", "connection_id": 13834774380200032777, "system": system,
            "version": "2.0.0"}]}).encode(), time.time_ns())

    with caplog.at_level(logging.WARNING, logger="collectors.pipeline"):
        parser._handle([status("maintenance")] * 500)
        parser._handle([status("cancel_only")] * 500)
    lines = [(getattr(r, "status", None), getattr(r, "since_last_log", None))
             for r in caplog.records if r.getMessage() == "venue_status"]
    assert lines == [("kraken system status: maintenance", 0),
                     ("kraken system status: cancel_only", 0)]
    assert registry.get_sample_value("chrono_collector_messages_received_total",
                                     {"exchange": "kraken", "kind": "status"}) == 1000


def test_a_venue_error_kind_logged_again_says_how_many_were_not() -> None:
    sampler = LogSampler(interval_s=10.0, max_kinds=2)
    assert sampler.admit("error 1", 0.0) == 0
    assert sampler.admit("error 2", 1.0) is None
    assert sampler.admit("error 3", 2.0) is None
    assert sampler.admit("other 'x'", 3.0) == 0
    assert sampler.admit("third kind", 4.0) is None  # two kinds this interval already
    assert sampler.admit("error 4", 11.0) == 2
    assert sampler.admit("third kind", 25.0) == 0  # the old kinds have aged out


def test_a_full_disk_at_start_is_waited_out_not_a_configuration_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    # ENOSPC made the spool "not writable": exit 2, which supervisord and systemd take for a
    # setting to fix, so the collector stayed down (FATAL) after space came back.
    import errno

    from collectors import service as service_module

    attempts: list[int] = []
    real_spool = service_module.Spool

    def spool_on_a_full_disk(*args: object, **kwargs: object) -> Spool:
        attempts.append(1)
        if len(attempts) < 3:
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError as exc:
                raise SpoolError("spool directory x: not writable: No space left on "
                                 "device") from exc
        return real_spool(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(service_module, "Spool", spool_on_a_full_disk)
    monkeypatch.setattr(service_module, "SPOOL_OPEN_RETRY_S", 0.01)

    said: list[str] = []

    class Told(Notifier):  # what systemd would be told
        def notify(self, state: str) -> None:
            said.append(state)

    service = CollectorService(CollectorConfig.from_env("coinbase", {
        "API_BASE_URL": "http://127.0.0.1:3000", "API_KEY": "test-key-0123456789",
        "CHRONO_STATE_DIR": str(tmp_path)}), notifier=Told({}))
    spool = service._open_spool()
    assert spool is not None and len(attempts) == 3
    spool.close()
    assert caplog.text.count("spool_disk_full") == 1  # once a minute, not once a try
    # Type=notify: a start that never says READY is failed after TimeoutStartSec, and systemd
    # gives up after StartLimitBurst restarts. Waiting is the plan: it says READY, and pings.
    assert said[:2] == ["READY=1\nSTATUS=waiting for disk space for the spool",
                             "WATCHDOG=1"]
    # Once running, the status line is cleared with the run's own READY.
    attempts.clear()
    said.clear()
    runner = CollectorService(CollectorConfig.from_env("coinbase", {
        "API_BASE_URL": "http://127.0.0.1:9", "API_KEY": "test-key-0123456789",
        "WS_URL": "ws://127.0.0.1:9", "METRICS_PORT": "0",
        "CHRONO_STATE_DIR": str(tmp_path / "run")}), notifier=Told({}))
    thread = threading.Thread(target=runner.run, kwargs={"install_signals": False})
    thread.start()
    try:
        assert wait_until(lambda: "READY=1\nSTATUS=" in said, 10), said
    finally:
        runner.request_stop("test")
        thread.join(20)
    assert said[:2] == ["READY=1\nSTATUS=waiting for disk space for the spool", "WATCHDOG=1"]
    # Stopped while waiting: no spool, no error.
    attempts.clear()
    service.stop_event.set()
    assert service._open_spool() is None
    # Anything else is still the operator's to fix: one line naming SPOOL_DIR.
    monkeypatch.setattr(service_module, "Spool", lambda *a, **k: (_ for _ in ()).throw(
        SpoolError("spool directory x: not writable: Permission denied")))
    with pytest.raises(ConfigError, match="SPOOL_DIR"):
        service._open_spool()


def test_is_disk_full_reads_the_cause() -> None:
    import sqlite3

    from collectors.spool import is_disk_full

    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorname = "SQLITE_FULL"  # type: ignore[attr-defined]
    for cause, expected in ((full, True), (OSError(28, "No space left on device"), True),
                            (OSError(13, "Permission denied"), False), (None, False)):
        try:
            raise SpoolError("x") from cause
        except SpoolError as exc:
            assert is_disk_full(exc) is expected, cause


def test_a_metrics_address_that_cannot_be_used_names_the_variable_to_fix(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A host the server cannot bind (an IPv6 one, a name that does not resolve, an address of
    # another machine) was reported as METRICS_PORT, with "a free port" for a hint.
    def service(port: int) -> CollectorService:
        return CollectorService(CollectorConfig.from_env("coinbase", {
            "API_BASE_URL": "http://127.0.0.1:9", "API_KEY": "test-key-0123456789",
            "WS_URL": "ws://127.0.0.1:9", "METRICS_PORT": str(port),
            "CHRONO_STATE_DIR": str(tmp_path)}))

    with socket.create_server(("127.0.0.1", 0)) as taken:
        with pytest.raises(ConfigError) as info:
            service(taken.getsockname()[1]).run(install_signals=False)
        assert info.value.variable == "METRICS_PORT" and "a free port" in str(info.value)
    from collectors import service as service_module

    for failure in (socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
                    OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address")):
        def refuse(*_args: object, failure: OSError = failure, **_kw: object) -> None:
            raise failure
        monkeypatch.setattr(service_module, "MetricsServer", refuse)
        with pytest.raises(ConfigError) as info:
            service(9101).run(install_signals=False)
        assert info.value.variable == "METRICS_HOST", failure
