"""The WebSocket loop against the simulator over real sockets (no parser: frames only)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from prometheus_client import CollectorRegistry

from collectors.backoff import Backoff
from collectors.batching import Handoff
from collectors.connection import Connection, Frame, RetiredFrame, _proxy_for
from collectors.errors import ParseError
from collectors.exchanges.binance import BinanceAdapter
from collectors.exchanges.coinbase import CoinbaseAdapter
from collectors.metrics import Metrics
from collectors.pipeline import Parser
from collectors.simulator import Simulator
from tests.support.waiting import wait_until

SYMBOLS = ["BTC/USD", "ETH/USD"]


class Harness:
    def __init__(self, conn: Connection, frames: Handoff[Frame], registry: CollectorRegistry,
                 stop: threading.Event) -> None:
        self.conn, self.frames, self.registry, self.stop = conn, frames, registry, stop
        self.got: list[Frame] = []
        self.shutdowns = 0  # reconnects the venue asked for, as `parsing` saw them

    def value(self, name: str, **labels: str) -> float:
        """Sum of the samples named `name` whose labels include `labels`."""
        return sum(sample.value for family in self.registry.collect()
                   for sample in family.samples if sample.name == name
                   and all(sample.labels.get(k) == v for k, v in labels.items()))

    def wait_frames(self, n: int, timeout_s: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while len(self.got) < n and time.monotonic() < deadline:
            self.got.extend(self.frames.get_all(0.1))
        return len(self.got) >= n

    def messages(self) -> list[dict[str, object]]:
        self.got.extend(self.frames.get_all(0))
        return [json.loads(p) for p, _ in self.got if p[:1] == b"{"]

    def wait_messages(self, predicate: Callable[[list[dict[str, object]]], bool],
                      timeout_s: float = 10.0) -> bool:
        """Wait (on the hand-off, not by sleeping) until `predicate(messages so far)` holds."""
        deadline = time.monotonic() + timeout_s
        while not predicate(self.messages()) and time.monotonic() < deadline:
            self.got.extend(self.frames.get_all(0.1))
        return predicate(self.messages())

    @contextmanager
    def parsing(self) -> Iterator[None]:
        """Stand in for `pipeline.Parser` meanwhile, in its order: take each chunk of frames
        into `got`, parse them with the connection's adapter one by one (a reconnect the venue
        asks for is requested at once), then report `data_seen` if the chunk had records."""
        done = threading.Event()
        adapter, conn = self.conn.adapter, self.conn

        def parse() -> None:
            while not done.is_set():
                chunk = self.frames.get_all(0.05)
                first = self.frames.taken_total - len(chunk)
                self.got.extend(chunk)
                records = 0
                for i, frame in enumerate(chunk):
                    try:
                        parsed = adapter.parse(*frame)
                    except ParseError:
                        continue
                    if parsed.reconnect:
                        self.shutdowns += 1
                        conn.request_reconnect("server_shutdown", frame_index=first + i,
                                               retired=type(frame) is RetiredFrame)
                    records += len(parsed.records)
                if records:
                    conn.data_seen()

        thread = threading.Thread(target=parse, name="parse-test")
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join(5)


@contextmanager
def running(url: str, adapter: CoinbaseAdapter | BinanceAdapter | None = None,
            frames: Handoff[Frame] | None = None, symbols: list[str] | None = None,
            **kw: object) -> Iterator[Harness]:
    registry = CollectorRegistry()
    metrics = Metrics(registry, "coinbase", "w")
    frames = Handoff(100_000) if frames is None else frames
    stop = threading.Event()
    conn = Connection(adapter or CoinbaseAdapter("w"), url, symbols or SYMBOLS, frames, metrics,
                      stop, **kw)  # type: ignore[arg-type]
    thread = threading.Thread(target=conn.run, name="ws-test")
    thread.start()
    try:
        yield Harness(conn, frames, registry, stop)
    finally:
        stop.set()
        conn.abort()
        thread.join(5)
        assert not thread.is_alive(), "the loop did not stop"


@contextmanager
def with_parser(conn: Connection, parser: Parser, frames: Handoff[Frame],
                stop: threading.Event, ws_done: threading.Event) -> Iterator[None]:
    """`conn` and the real `parser` on threads of their own, as the service runs them; stopped
    in the service's order on exit."""
    threads = [threading.Thread(target=conn.run, daemon=True),
               threading.Thread(target=parser.run, daemon=True)]
    for t in threads:
        t.start()
    try:
        yield
    finally:
        stop.set()
        conn.abort()
        ws_done.set()
        frames.close()
        for t in threads:
            t.join(5)


def test_subscribes_and_hands_frames_on_with_receive_times() -> None:
    with Simulator("coinbase", rate_hz=20) as sim, running(sim.url) as h:
        assert h.wait_frames(10)
        before = time.time_ns()
        kinds = {m.get("type") for m in h.messages()}
        assert {"subscriptions", "ticker"} <= kinds
        assert all(0 < ns <= before for _, ns in h.got)
        assert h.value("chrono_collector_connected") == 1


def test_a_proxy_from_the_environment_is_not_used_for_a_loopback_venue(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # websocket-client has no loopback exemption: with http_proxy exported, the demo's
    # collectors connected to the (dead) proxy instead of the simulator on 127.0.0.1.
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:1")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    with Simulator("coinbase", rate_hz=20) as sim, running(sim.url) as h:
        assert h.wait_frames(3)
        assert h.value("chrono_collector_connected") == 1
    assert _proxy_for("wss://ws-feed.exchange.coinbase.com") == "127.0.0.1:1"
    assert _proxy_for("ws://localhost:9201") is None and _proxy_for("ws://[::1]:9201") is None


def test_oversized_frame_is_discarded_and_the_connection_kept() -> None:
    with Simulator("coinbase", rate_hz=20) as sim, running(sim.url,
                                                            max_frame_bytes=64 * 1024) as h:
        assert h.wait_frames(5)
        sim.send_raw("z" * (1024 * 1024))
        n = len(h.got)
        assert h.wait_frames(n + 20)
        assert h.value("chrono_collector_oversized_frames_total") == 1
        assert sim.connections_total == 1
        assert all(len(p) <= 64 * 1024 for p, _ in h.got)


def test_silence_is_detected_and_the_connection_replaced() -> None:
    with Simulator("coinbase", rate_hz=20) as sim, running(
            sim.url, liveness_timeout_s=1.0, backoff=Backoff(base_s=0.05, cap_s=0.1)) as h:
        assert h.wait_frames(5)
        sim.go_silent(True)
        assert sim.wait_for(lambda: sim.connections_total >= 2, 10)
        sim.go_silent(False)
        n = len(h.got)
        assert h.wait_frames(n + 5)
        assert h.value("chrono_collector_reconnects_total", reason="liveness_timeout") >= 1


class _QuickPingBinance(BinanceAdapter):
    ws_ping_interval_s = 0.2


def test_a_connection_of_quiet_markets_is_kept_alive_by_its_pings() -> None:
    # Binance sends no heartbeat of its own between its 20 s pings: with every subscribed
    # market quiet, our WebSocket pings' pongs are what tells a live connection from a dead one.
    symbols = ["BTC/USDT", "ETH/USDT"]
    with Simulator("binance", rate_hz=20, quiet=["BTCUSDT", "ETHUSDT"]) as sim, running(
            sim.url, _QuickPingBinance("w"), symbols=symbols, liveness_timeout_s=1.0,
            backoff=Backoff(base_s=0.05, cap_s=0.1)) as h:
        # A ping per 0.5 s of silence at most (the receive loop's timeout): six pongs take 3 s,
        # three liveness limits.
        assert wait_until(
            lambda: h.value("chrono_collector_messages_received_total", kind="pong") >= 6, 10)
        assert h.value("chrono_collector_reconnects_total") == 0
        assert sim.connections_total == 1
        assert h.got == []


def test_every_connect_resubscribes() -> None:
    with Simulator("coinbase", rate_hz=20) as sim, running(
            sim.url, backoff=Backoff(base_s=0.05, cap_s=0.1)) as h:
        assert h.wait_frames(5)
        sim.drop_all()
        assert sim.wait_for(lambda: sim.connections_total >= 2, 10)

        def subscribes() -> set[int]:
            return {m.connection_id for m in sim.received_messages()
                    if isinstance(m.json(), dict) and m.json().get("type") == "subscribe"}

        assert sim.wait_for(lambda: len(subscribes()) >= 2, 5), sim.received_messages()
        assert h.value("chrono_collector_reconnects_total") >= 1


class _ShortLived(CoinbaseAdapter):
    max_connection_age_s = 3.0


def test_max_age_hands_over_without_a_gap() -> None:
    with Simulator("coinbase", rate_hz=50) as sim, running(sim.url, _ShortLived("w")) as h:
        # A connection is handed over only when it delivered data: the parser says so.
        with h.parsing():
            assert sim.wait_for(lambda: sim.connections_total >= 2, 10)
            # The first connection is closed by us (client_close) only after its successor
            # has delivered for a while: make-before-break.
            assert sim.wait_for(
                lambda: any(c.connection_id == 1 for c in sim.closed_connections()), 10)
        assert h.wait_frames(200)
        assert h.value("chrono_collector_reconnects_total", reason="max_age") >= 1
        first_id = 1
        [closed] = [c for c in sim.closed_connections() if c.connection_id == first_id]
        assert closed.reason == "client_close"
        # Every BTC-USD sequence the simulator sent to the first connection, up to the switch,
        # arrives (duplicates from the overlap are the adapter's job): the last few through
        # the successor, which the simulator writes each tick to right after the first.
        sent_first = {int(str(t["sequence"])) for t in sim.sent_tickers(first_id)
                      if t.get("product_id") == "BTC-USD"}

        def missing(messages: list[dict[str, object]]) -> set[int]:
            return sent_first - {int(str(m["sequence"])) for m in messages
                                 if m.get("type") == "ticker" and m.get("product_id") == "BTC-USD"}

        assert h.wait_messages(lambda messages: not missing(messages), 5), missing(h.messages())


def test_stop_returns_promptly_on_a_quiet_connection() -> None:
    with Simulator("coinbase", rate_hz=0.01) as sim:
        with running(sim.url, recv_timeout_s=30.0) as h:
            assert sim.wait_for(lambda: sim.active_connections == 1, 5)
            started = time.monotonic()
        # `running` joined the thread: abort() woke the blocked recv at once.
        assert time.monotonic() - started < 3
        assert h.value("chrono_collector_connected") == 0


def test_unreachable_venue_backs_off() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with running(f"ws://127.0.0.1:{port}", backoff=Backoff(base_s=0.01, cap_s=0.05)) as h:
        deadline = time.monotonic() + 5
        while h.value("chrono_collector_connect_attempts_total") < 4 and \
                time.monotonic() < deadline:
            h.stop.wait(0.05)
        assert h.value("chrono_collector_reconnects_total", reason="connect_failed") >= 3


def small_queue() -> Handoff[Frame]:
    return Handoff(200, max_cost=32 * 1024, cost_of=lambda f: len(f[0]))


def test_a_burst_beyond_the_frame_queue_waits_for_the_parser_instead_of_dropping() -> None:
    with Simulator("coinbase", rate_hz=1e-6) as sim, running(sim.url, frames=small_queue()) as h:
        assert sim.wait_for(lambda: any(sim.subscriptions().values()), 10)
        sim.burst(5000)  # ~2 MB, sixty times the queue's bound
        assert sim.wait_for(lambda: sim.bursts_active == 0, 30)
        assert h.wait_frames(5000)
        tickers = [m for m in h.messages() if m.get("type") == "ticker"]
        assert len(tickers) >= 5000
        assert h.value("chrono_collector_frames_dropped_total") == 0
        assert sim.connections_total == 1


def test_a_stuck_parser_costs_frames_after_the_wait_not_the_connection() -> None:
    with Simulator("coinbase", rate_hz=1e-6) as sim, running(
            sim.url, frames=small_queue(), frame_queue_wait_s=0.02) as h:
        assert sim.wait_for(lambda: any(sim.subscriptions().values()), 10)
        sim.burst(2000)  # nobody takes frames meanwhile
        assert sim.wait_for(lambda: sim.bursts_active == 0, 30)
        assert wait_until(lambda: h.value("chrono_collector_frames_dropped_total") > 0, 10)
        assert h.frames.cost <= 32 * 1024
        sim.burst(10)  # the connection still works once the parser takes frames again
        h.got.clear()
        assert h.wait_frames(10)
        assert sim.connections_total == 1


def test_a_resubscribe_can_wait_and_goes_out_on_the_same_connection() -> None:
    """A venue that refused a subscribe for a passing reason (Kraken's rate limit) gets it
    again after a backoff, without dropping the connection."""
    with Simulator("coinbase", rate_hz=20) as sim, running(sim.url) as h:
        assert h.wait_frames(3)

        def subscribes() -> list[int]:
            return [m.connection_id for m in sim.received_messages()
                    if isinstance(m.json(), dict) and m.json().get("type") == "subscribe"]

        assert subscribes() == [1]
        asked = time.monotonic()
        h.conn.request_resubscribe(["BTC/USD"], after_s=0.5)
        assert sim.wait_for(lambda: len(subscribes()) == 2, 5)
        assert time.monotonic() - asked >= 0.45
        assert subscribes() == [1, 1]
        assert sim.connections_total == 1
