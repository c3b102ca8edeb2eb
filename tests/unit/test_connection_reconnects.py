"""When and how soon the WebSocket loop reconnects, against a raw-socket server on 127.0.0.1:
a venue's `serverShutdown` repeated on the connection being handed over, a venue that asks every
connection to go, a handshake refused with 429/418 and `Retry-After`."""

from __future__ import annotations

import json
import logging
import random
import struct
import threading
import time
from contextlib import suppress
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from websocket import ABNF

from collectors.backoff import Backoff
from collectors.batching import Handoff
from collectors.connection import RATE_LIMITED_HINT, RETRY_AFTER_MAX_S, Connection, Frame
from collectors.decoding import decode_frame
from collectors.exchanges import create
from collectors.exchanges.binance import BinanceAdapter
from collectors.exchanges.coinbase import CoinbaseAdapter
from collectors.metrics import Metrics, ReconnectReason
from collectors.pipeline import Parser
from tests.unit.test_connection import running, with_parser
from tests.unit.test_connection_faults import Peer, raw_server, wait_for
from tests.unit.test_frame_buffer import server_frame

SYMBOLS = ["BTC/USDT"]
# The combined-stream shape of Binance's docs (tests/fixtures/binance/cases.jsonl).
SHUTDOWN = b'{"stream":"!serverShutdown","data":{"e":"serverShutdown","E":1770123456789}}'


def ticker() -> bytes:
    """A BTCUSDT `24hrTicker` as the combined stream wraps it (the fixtures' shape), new each
    time: its event time is now (the adapter drops an `E` it has seen as a duplicate)."""
    event_ms = time.time_ns() // 1_000_000
    data = {"e": "24hrTicker", "E": event_ms, "s": "BTCUSDT", "p": "-5.0", "P": "-1.2",
            "w": "100", "x": "105", "c": "100.5", "Q": "1", "b": "100.4", "B": "2",
            "a": "100.6", "A": "3", "o": "105.5", "h": "110", "l": "90", "v": "1234.5",
            "q": "123456", "O": event_ms - 86_400_000, "C": event_ms, "F": 1, "L": 2, "n": 2}
    return json.dumps({"stream": "btcusdt@ticker", "data": data}).encode()


# ---- a planned handover: the retiring connection's frames do not replace its successor -------

def test_serverShutdown_repeated_on_the_retiring_connection_keeps_its_successor() -> None:
    backoff = Backoff(base_s=0.01, cap_s=0.05)
    data_parsed = threading.Event()
    successor_delivering = threading.Event()
    repeats_sent = threading.Event()

    def scenario(peer: Peer) -> None:
        peer.accept()
        if peer.number == 1:  # a node being drained: it says so, and says it again
            peer.sock.sendall(server_frame(ticker()))
            # Told to go only once its data was parsed, as a connection live for hours is.
            if not data_parsed.wait(10):
                return
            peer.sock.sendall(server_frame(SHUTDOWN))
            if not successor_delivering.wait(10):
                return
            # (an oversized frame among them: counted as on a live connection)
            peer.sock.sendall(server_frame(b"x" * 5000) + server_frame(SHUTDOWN) * 3)
            repeats_sent.set()
            return
        while not peer.stop.wait(0.05):  # healthy nodes stream at their own pace
            peer.sock.sendall(server_frame(ticker()))

    adapter = BinanceAdapter("w")
    # (healthy_after_s=0: a connection that delivered counts as healthy at once here, as one
    # that lived for minutes would)
    with raw_server(scenario) as server, running(server.url, adapter, symbols=SYMBOLS,
                                             backoff=backoff, recv_timeout_s=0.2,
                                             max_frame_bytes=4096, healthy_after_s=0.0) as h, \
            h.parsing():
        assert wait_for(lambda: h.conn._data_seen, 10)
        data_parsed.set()
        assert wait_for(lambda: h.conn.session == 2 and h.conn._data_seen, 10)
        successor_delivering.set()
        assert repeats_sent.wait(10)
        # The old connection is read until its successor has delivered for a while:
        # every repeat reaches the parser (and asks for a reconnect) meanwhile.
        assert wait_for(lambda: h.shutdowns == 4, 10), h.shutdowns
        assert wait_for(lambda: not any(t.is_alive() for t in h.conn._retiring), 10)
        assert h.conn._reconnect_reason is None
        assert h.conn.session == 2
        assert server.connections == 2
        assert h.value("chrono_collector_reconnects_total", reason="server_shutdown") == 1
        assert h.value("chrono_collector_oversized_frames_total") == 1
        # The healthy connection was handed over at once, without a backoff.
        assert backoff.attempt == 0


def test_serverShutdown_on_the_successor_during_the_handover_is_acted_on() -> None:
    # The successor landed on a node being drained too, and says so while its predecessor is
    # still read. Ignoring every planned request in that window dropped this one: the venue
    # then cut the connection minutes later, with a gap, instead of a handover now.
    backoff = Backoff(base_s=0.01, cap_s=0.05)
    data_parsed = threading.Event()

    def scenario(peer: Peer) -> None:
        peer.accept()
        if peer.number == 1:
            peer.sock.sendall(server_frame(ticker()))
            if not data_parsed.wait(10):
                return
            peer.sock.sendall(server_frame(SHUTDOWN))
            while not peer.stop.wait(0.05):  # read on during the handover
                peer.sock.sendall(server_frame(ticker()))
            return
        if peer.number == 2:
            peer.sock.sendall(server_frame(ticker()))
            time.sleep(0.3)  # the venue's own pace: its notice comes after its first data
            peer.sock.sendall(server_frame(SHUTDOWN))
        while not peer.stop.wait(0.05):
            peer.sock.sendall(server_frame(ticker()))

    with raw_server(scenario) as server, running(server.url, BinanceAdapter("w"),
                                                 symbols=SYMBOLS, backoff=backoff,
                                                 recv_timeout_s=0.2,
                                                 healthy_after_s=0.0) as h, h.parsing():
        assert wait_for(lambda: h.conn._data_seen, 10)
        data_parsed.set()
        assert wait_for(lambda: server.connections == 3, 10), server.connections
        assert h.value("chrono_collector_reconnects_total", reason="server_shutdown") == 2
        assert backoff.attempt == 0  # both were handovers of a healthy connection


class _SlowSink:
    """The parser's record sink, committing in 100 ms (a busy disk): the parser reads the
    frames of a connection already replaced after the switch."""

    def put_many_waiting(self, items: list[object], stop: threading.Event) -> int:
        time.sleep(0.1)
        return 0


def test_a_notice_repeated_before_the_switch_keeps_the_successor() -> None:
    # The repeat was read by the old connection's own loop, before the switch, so it is no
    # RetiredFrame; the parser, behind by a commit, took it after the new connection began,
    # and replaced it (a review's reproduction, with the real parser).
    data_parsed = threading.Event()

    def scenario(peer: Peer) -> None:
        peer.accept()
        if peer.number == 1:
            peer.sock.sendall(server_frame(ticker()))
            if not data_parsed.wait(10):
                return
            time.sleep(0.3)  # the venue's pace: the parser is idle again
            peer.sock.sendall(server_frame(ticker()) + server_frame(SHUTDOWN))
            time.sleep(0.03)  # the loop switches meanwhile; the parser commits the ticker
            peer.sock.sendall(server_frame(SHUTDOWN))
        while not peer.stop.wait(0.05):
            peer.sock.sendall(server_frame(ticker()))

    adapter = create("binance", "w", decode_frame)
    registry = CollectorRegistry()
    metrics = Metrics(registry, "binance", "w")
    frames: Handoff[Frame] = Handoff(100_000)
    stop, ws_done = threading.Event(), threading.Event()
    with raw_server(scenario) as server:
        conn = Connection(adapter, server.url, SYMBOLS, frames, metrics, stop,
                          backoff=Backoff(base_s=0.01, cap_s=0.05), recv_timeout_s=0.2)
        asked: list[str] = []
        request = conn.request_reconnect

        def counted(reason: ReconnectReason, **kw: Any) -> None:
            request(reason, **kw)
            asked.append(reason)

        conn.request_reconnect = counted  # type: ignore[method-assign]
        parser = Parser(adapter, frames, _SlowSink(), conn, metrics, ws_done, stop)
        with with_parser(conn, parser, frames, stop, ws_done):
            assert wait_for(lambda: conn._data_seen, 10)
            data_parsed.set()
            # Both notices parsed, and what they asked for done: the one switch (a request
            # the second made would be pending, or counted, by then).
            assert wait_for(lambda: len(asked) == 2 and conn._reconnect_reason is None, 10)
            assert conn.session == 2 and server.connections == 2
            assert registry.get_sample_value("chrono_collector_reconnects_total",
                                             {"exchange": "binance",
                                              "reason": "server_shutdown"}) == 1


def test_a_reconnect_request_from_an_earlier_connection_is_ignored() -> None:
    def scenario(peer: Peer) -> None:
        peer.accept()
        while not peer.stop.wait(0.05):
            peer.sock.sendall(server_frame(ticker()))

    with raw_server(scenario) as server, running(server.url, BinanceAdapter("w"),
                                                 symbols=SYMBOLS, recv_timeout_s=0.2) as h:
        assert h.wait_frames(1)
        first = h.conn._session_first  # where the current connection's frames begin
        h.conn.request_reconnect("server_shutdown", frame_index=first - 1)
        assert h.conn._reconnect_reason is None
        h.conn.request_reconnect("server_shutdown", frame_index=first)
        assert wait_for(lambda: server.connections == 2, 5)


def test_a_node_that_asks_every_connection_to_go_after_a_ticker_meets_a_backoff() -> None:
    """Each new connection delivers a ticker, then `serverShutdown`: counted as a healthy
    handover, each was replaced at once and the backoff reset, about twice a second for good
    (Binance bans an IP past 300 connections in 5 minutes), with every old connection kept
    open and read for up to 30 s (79 connections and 55 threads in 40 s in a review)."""
    backoff = Backoff(base_s=0.05, cap_s=0.2)
    open_connections: list[int] = []

    def scenario(peer: Peer) -> None:
        peer.accept()
        peer.sock.sendall(server_frame(ticker()) + server_frame(SHUTDOWN))
        while not peer.stop.wait(0.05):  # the old node keeps sending while it is read
            peer.sock.sendall(server_frame(ticker()))

    with raw_server(scenario) as server, running(server.url, BinanceAdapter("w"),
                                                 symbols=SYMBOLS, backoff=backoff,
                                                 recv_timeout_s=0.2,
                                                 healthy_after_s=5.0) as h, h.parsing():
        def backed_off() -> bool:
            open_connections.append(sum(p.reading for p in server.peers))
            return backoff.attempt >= 4
        assert wait_for(backed_off, 10), backoff.attempt
        assert h.value("chrono_collector_reconnects_total", reason="server_shutdown") >= 4
        # The live one and one being retired (and one closing) at most: the client closed
        # each earlier one (the peer's reader saw the end).
        assert server.connections >= 4 and max(open_connections) <= 3, open_connections


# ---- a planned reconnect backs off unless the connection delivered data -----------------------

def test_a_venue_that_asks_every_connection_to_go_meets_a_growing_backoff() -> None:
    """A node being drained that the load balancer keeps choosing: each new connection gets
    `serverShutdown` and nothing else."""
    backoff = Backoff(base_s=0.01, cap_s=0.05)

    def scenario(peer: Peer) -> None:
        peer.accept()
        peer.sock.sendall(server_frame(SHUTDOWN))

    with raw_server(scenario) as server, running(server.url, BinanceAdapter("w"),
                                                 symbols=SYMBOLS, backoff=backoff,
                                                 recv_timeout_s=0.2) as h, h.parsing():
        assert wait_for(lambda: backoff.attempt >= 3, 5), backoff.attempt
        assert server.connections >= 3
        assert h.value("chrono_collector_reconnects_total", reason="server_shutdown") >= 3
        # Nothing to hand over: each connection was closed at once, none kept being read.
        assert h.conn._retiring == []


# ---- a handshake refused with Retry-After waits that long -------------------------------------

def _messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The connection loop's log lines, in order."""
    return [r.getMessage() for r in caplog.records if r.name == "collectors.connection"]


@pytest.mark.parametrize(("status", "reason"), [(429, "Too Many Requests"),
                                                 (418, "I'm a teapot")])
def test_a_handshake_refused_with_retry_after_waits_that_long(
        status: int, reason: str, caplog: pytest.LogCaptureFixture) -> None:
    attempts: list[float] = []

    def scenario(peer: Peer) -> None:
        attempts.append(time.monotonic())
        peer.read_request()
        peer.sock.sendall(f"HTTP/1.1 {status} {reason}\r\nRetry-After: 1\r\n"
                          "Content-Length: 0\r\n\r\n".encode())

    with caplog.at_level(logging.INFO, logger="collectors.connection"), \
            raw_server(scenario) as server, \
            running(server.url, BinanceAdapter("w"), symbols=SYMBOLS,
                    backoff=Backoff(base_s=0.01, cap_s=0.05), recv_timeout_s=0.2):
        assert wait_for(lambda: server.connections >= 2, 5)
    assert attempts[1] - attempts[0] >= 1.0
    # One line per refused handshake, with what the venue asked for (and the loop's own wait).
    [rejected, *_] = [r for r in caplog.records if r.getMessage() == "ws_handshake_rejected"]
    assert (rejected.status, rejected.retry_after_s) == (status, 1.0)  # type: ignore[attr-defined]
    assert "Retry-After" in rejected.hint  # type: ignore[attr-defined]
    assert set(_messages(caplog)) <= {"ws_handshake_rejected", "ws_reconnect_wait"}


def test_a_429_gets_a_hint_from_any_venue(caplog: pytest.LogCaptureFixture) -> None:
    def scenario(peer: Peer) -> None:
        peer.read_request()
        peer.sock.sendall(b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 0\r\n\r\n")

    with caplog.at_level(logging.INFO, logger="collectors.connection"), \
            raw_server(scenario) as server, \
            running(server.url, CoinbaseAdapter("w"), backoff=Backoff(base_s=0.01, cap_s=0.05),
                    recv_timeout_s=0.2):
        assert wait_for(lambda: server.connections >= 2, 5)
    [rejected, *_] = [r for r in caplog.records if r.getMessage() == "ws_handshake_rejected"]
    assert rejected.hint == RATE_LIMITED_HINT  # type: ignore[attr-defined]
    assert rejected.status == 429  # type: ignore[attr-defined]
    # Without a Retry-After the backoff alone paces the attempts, and the line says none.
    assert not hasattr(rejected, "retry_after_s")
    assert set(_messages(caplog)) <= {"ws_handshake_rejected", "ws_reconnect_wait"}


def test_a_long_retry_after_is_capped_and_stop_interrupts_the_wait(
        caplog: pytest.LogCaptureFixture) -> None:
    def scenario(peer: Peer) -> None:
        peer.read_request()
        # An HTTP-date far ahead: a long ban, or a bogus header.
        peer.sock.sendall(b"HTTP/1.1 418 I'm a teapot\r\n"
                          b"Retry-After: Wed, 21 Oct 2099 07:28:00 GMT\r\n"
                          b"Content-Length: 0\r\n\r\n")

    with caplog.at_level(logging.INFO, logger="collectors.connection"), \
            raw_server(scenario) as server:
        with running(server.url, BinanceAdapter("w"), symbols=SYMBOLS,
                     recv_timeout_s=0.2) as h:
            assert wait_for(lambda: any(r.getMessage() == "ws_reconnect_wait"
                                        for r in caplog.records), 5)
            started = time.monotonic()
        # `running` joined the thread: the stop ended the wait at once.
        assert time.monotonic() - started < 3
        assert server.connections == 1
        assert h.value("chrono_collector_connect_attempts_total") == 1
    [rejected] = [r for r in caplog.records if r.getMessage() == "ws_handshake_rejected"]
    assert rejected.status == 418  # type: ignore[attr-defined]
    assert rejected.retry_after_s == RETRY_AFTER_MAX_S  # type: ignore[attr-defined]
    [waited] = [r for r in caplog.records if r.getMessage() == "ws_reconnect_wait"]
    assert waited.delay_s >= RETRY_AFTER_MAX_S  # type: ignore[attr-defined]
    # The refused handshake is one line (and the wait the loop's own).
    assert _messages(caplog) == ["ws_handshake_rejected", "ws_reconnect_wait"]


def test_a_503_with_a_past_retry_after_is_one_rejected_line_not_a_rate_limit(
        caplog: pytest.LogCaptureFixture) -> None:
    def scenario(peer: Peer) -> None:
        peer.read_request()
        peer.sock.sendall(b"HTTP/1.1 503 Service Unavailable\r\n"
                          b"Retry-After: Wed, 21 Oct 2015 07:28:00 GMT\r\n"
                          b"Content-Length: 0\r\n\r\n")

    def rejected() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.getMessage() == "ws_handshake_rejected"]

    with caplog.at_level(logging.INFO, logger="collectors.connection"), \
            raw_server(scenario) as server, \
            running(server.url, backoff=Backoff(base_s=0.01, cap_s=0.05), recv_timeout_s=0.2):
        assert wait_for(lambda: len(rejected()) >= 2, 5)
    lines = rejected()
    assert all((r.status, r.retry_after_s) == (503, 0.0)  # type: ignore[attr-defined]
               for r in lines)
    assert all(r.levelno == logging.ERROR for r in lines)
    # No "rate limited" for what is no rate limit, and one line per refusal.
    assert set(_messages(caplog)) <= {"ws_handshake_rejected", "ws_reconnect_wait"}
    assert len(lines) <= server.connections


# ---- the reconnect duration covers the whole outage -------------------------------------------

class _Ceiling(random.Random):
    """Full jitter at its ceiling: every backoff delay is exactly `min(cap, base * 2**n)`."""

    def uniform(self, a: float, b: float) -> float:
        return b


@pytest.mark.parametrize("failing", ["refused", "closed at once"])
def test_the_reconnect_duration_covers_the_whole_outage_failed_attempts_included(
        caplog: pytest.LogCaptureFixture, failing: str) -> None:
    # "closed at once": a node that takes the upgrade and closes before any data (1011 during
    # maintenance) restarted the outage's clock on every attempt.
    refusals = 3
    delay_s = 0.1
    server_saw: dict[str, float] = {}  # the outage, timed on the server's side
    release = threading.Event()

    def refuse(peer: Peer) -> None:
        if failing == "closed at once" and peer.number > 1:
            if upgrade(peer):
                peer.sock.sendall(server_frame(struct.pack("!H", 1011) + b"maintenance",
                                               ABNF.OPCODE_CLOSE))
            return
        if peer.read_request() is not None:
            peer.sock.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")

    def upgrade(peer: Peer) -> bool:
        answer = peer.read_request()
        if answer is None:
            return False
        if peer.number > 2:
            server_saw["up"] = time.monotonic()  # (the last one's: the client is back)
        peer.sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                          b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + answer
                          + b"\r\n\r\n")
        return True

    def scenario(peer: Peer) -> None:
        if peer.number == 1 or 2 < peer.number <= 2 + refusals:
            refuse(peer)  # before the first connection (no outage yet), then during one
            return
        if not upgrade(peer) or peer.number > 2:
            return
        if not release.wait(10):
            return
        peer.sock.sendall(server_frame(struct.pack("!H", 1001) + b"going away",
                                       ABNF.OPCODE_CLOSE))
        with suppress(OSError):  # (a reset is the client letting go too)
            while peer.sock.recv(65536):  # until the client has let the connection go
                pass
        server_saw["down"] = time.monotonic()

    def connected_lines() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.getMessage() == "ws_connected"]

    gauge = "chrono_collector_last_reconnect_duration_seconds"
    backoff = Backoff(base_s=delay_s, cap_s=delay_s, rng=_Ceiling())
    with caplog.at_level(logging.INFO, logger="collectors.connection"), \
            raw_server(scenario) as server, \
            running(server.url, backoff=backoff, recv_timeout_s=0.2) as h:
        assert wait_for(lambda: len(connected_lines()) == 1, 10)
        # The first connection after start ends no outage, though an attempt failed before it.
        assert h.value(gauge) == 0
        assert not hasattr(connected_lines()[0], "reconnect_after_s")
        release.set()
        upgrades = 2 + (refusals if failing == "closed at once" else 0)
        assert wait_for(lambda: len(connected_lines()) == upgrades, 10)
        assert wait_for(lambda: server.connections == 3 + refusals, 10)
        measured = h.value(gauge)
    outage = server_saw["up"] - server_saw["down"]
    assert outage >= (refusals + 1) * delay_s  # a wait before each attempt
    assert measured >= outage, (measured, outage)
    assert connected_lines()[-1].reconnect_after_s >= round(outage, 3)  # type: ignore[attr-defined]


# ---- requests the loop ignores are logged sampled ---------------------------------------------

def test_repeated_ignored_reconnect_requests_log_one_line(
        caplog: pytest.LogCaptureFixture) -> None:
    """A connection being drained repeats `serverShutdown` (every 50 ms, seen): one line."""
    conn = Connection(BinanceAdapter("w"), "ws://127.0.0.1:9", SYMBOLS, Handoff(10),
                      Metrics(CollectorRegistry(), "binance", "w"), threading.Event())
    with caplog.at_level(logging.INFO, logger="collectors.connection"):
        for _ in range(17):
            conn.request_reconnect("server_shutdown", retired=True)
    assert conn._reconnect_reason is None
    [line] = [r for r in caplog.records if r.getMessage() == "ws_reconnect_request_ignored"]
    assert (line.reason, line.since_last_log) == ("server_shutdown", 0)  # type: ignore[attr-defined]
