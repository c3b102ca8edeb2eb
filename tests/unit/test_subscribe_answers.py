"""A subscribe the venue never answers is sent again, then the connection replaced: heartbeats
keep such a connection alive, and it would deliver nothing for good (Kraken advises a deadline
timer of about 5 s on its subscribes). First the parser's rule on its own, then a real
connection and parser against a raw-socket server on 127.0.0.1 that never answers."""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest
from prometheus_client import CollectorRegistry

from collectors import pipeline
from collectors.backoff import Backoff
from collectors.batching import Handoff
from collectors.connection import Connection, Frame, SubscribeSent
from collectors.decoding import decode_frame
from collectors.exchanges import create
from collectors.metrics import Metrics
from collectors.model import PriceFeed
from collectors.pipeline import Parser
from tests.unit.test_connection import with_parser
from tests.unit.test_connection_faults import Peer, raw_server, wait_for
from tests.unit.test_frame_buffer import server_frame

SYMBOLS = ["BTC/USD", "ETH/USD"]
# Kraken v2 shapes from its docs and tests/fixtures/kraken (status, heartbeat, subscribe ack).
STATUS = (b'{"channel":"status","type":"update","data":[{"api_version":"v2",'
          b'"connection_id":13834774380200032777,"system":"online","version":"2.0.0"}]}')
HEARTBEAT = b'{"channel":"heartbeat"}'


def ack(symbol: str) -> bytes:
    return json.dumps({"method": "subscribe", "req_id": 1, "result": {
        "channel": "ticker", "event_trigger": "trades", "snapshot": True, "symbol": symbol},
        "success": True, "time_in": "2024-05-15T11:20:43.013486Z",
        "time_out": "2024-05-15T11:20:43.013545Z"}).encode()


class _SentConnection:
    """What the parser asks of a connection, with the subscribes it sent set by the test."""

    def __init__(self) -> None:
        self.symbols = list(SYMBOLS)
        self.connected_since: float | None = 0.0
        self.session = 1
        self.sent: dict[str, SubscribeSent] = {}
        self.resubscribes: list[tuple[list[str], int | None]] = []
        self.reconnects: list[tuple[str, int | None]] = []

    def subscribe_sent(self) -> tuple[int, dict[str, SubscribeSent]]:
        return self.session, dict(self.sent)

    def send(self, frame: int, *symbols: str) -> None:
        """A subscribe for `symbols`, sent a deadline ago, when the queue had taken `frame`."""
        ago = pipeline.SUBSCRIBE_ANSWER_DEADLINE_S + 0.5
        sub = SubscribeSent(frame, time.monotonic() - ago)
        self.sent.update(dict.fromkeys(symbols, sub))

    def request_resubscribe(self, symbols: list[str], *, after_s: float = 0.0,
                            session: int | None = None) -> None:
        self.resubscribes.append((list(symbols), session))

    def request_reconnect(self, reason: str, *, session: int | None = None,
                          **_which_frame: object) -> None:
        self.reconnects.append((reason, session))

    def data_seen(self) -> None:
        pass


def _kraken_parser() -> tuple[Parser, _SentConnection]:
    adapter = create("kraken", "w1", decode_frame)
    metrics = Metrics(CollectorRegistry(), "kraken", "w1")
    frames: Handoff[Frame] = Handoff(10)
    real = Connection(adapter, "ws://127.0.0.1:9", SYMBOLS, frames, metrics, threading.Event())
    parser = Parser(adapter, frames, Handoff[PriceFeed](100), real, metrics, threading.Event())
    conn = _SentConnection()
    parser._conn = conn  # type: ignore[assignment]
    return parser, conn


def _frames(*payloads: bytes) -> list[Frame]:
    return [(p, time.time_ns()) for p in payloads]


def test_symbols_without_an_answer_are_subscribed_again_then_the_connection_replaced(
        caplog: pytest.LogCaptureFixture) -> None:
    parser, conn = _kraken_parser()
    conn.send(100, *SYMBOLS)
    parser._handle(_frames(ack("BTC/USD"), HEARTBEAT), first_index=100)
    with caplog.at_level(logging.WARNING, logger="collectors.pipeline"):
        parser._periodic(time.monotonic())
        assert conn.resubscribes == [(["ETH/USD"], 1)]  # BTC/USD was acknowledged
        retry = [r for r in caplog.records if r.getMessage() == "subscribe_retry"]
        assert [getattr(r, "symbols", None) for r in retry] == [["ETH/USD"]]
        assert "no answer to the subscribe" in str(getattr(retry[0], "error", ""))
        parser._periodic(time.monotonic())
        assert len(conn.resubscribes) == 1  # one verdict per subscribe sent
        for frame in (200, 300):
            conn.send(frame, "ETH/USD")  # the subscribe sent again, unanswered
            parser._resubscribe_due = 0.0  # (its backoff's time has come)
            parser._periodic(time.monotonic())
        assert conn.resubscribes == [(["ETH/USD"], 1)] * 2
        assert conn.reconnects == [("subscribe_unanswered", 1)]  # for that connection only
        assert [getattr(r, "symbols", None) for r in caplog.records
                if r.getMessage() == "subscribe_unanswered"] == [["ETH/USD"]]


def test_an_acknowledgement_a_refusal_or_data_answer_a_subscribe() -> None:
    parser, conn = _kraken_parser()
    conn.send(100, *SYMBOLS)
    parser._handle(_frames(ack("BTC/USD"), ticker("ETH/USD")), first_index=100)
    parser._periodic(time.monotonic())
    assert conn.resubscribes == [] and conn.reconnects == []
    # Answers in frames queued before a subscribe answer an earlier one, not this one.
    conn.send(500, *SYMBOLS)
    parser._periodic(time.monotonic())
    assert conn.resubscribes == [(list(SYMBOLS), 1)]


def test_a_symbol_of_an_earlier_subscribe_is_judged_though_a_later_one_left_it_out() -> None:
    # A refusal of one symbol for a passing reason resubscribes that one alone a second later:
    # only the latest request was judged, and a symbol of the first whose answer was lost
    # stayed unsubscribed for good.
    parser, conn = _kraken_parser()
    conn.send(100, *SYMBOLS)
    conn.send(105, "BTC/USD")  # (BTC/USD's retry after a rate limit)
    parser._handle(_frames(ack("BTC/USD")), first_index=106)
    parser._periodic(time.monotonic())
    assert conn.resubscribes == [(["ETH/USD"], 1)]


def ticker(symbol: str) -> bytes:
    # Kraken v2's ticker update shape (its docs; tests/fixtures/kraken).
    return json.dumps({"channel": "ticker", "type": "update", "data": [{
        "symbol": symbol, "bid": 3000.1, "bid_qty": 1.5, "ask": 3000.2, "ask_qty": 2.0,
        "last": 3000.15, "volume": 1234.5, "vwap": 2990.0, "low": 2900.0, "high": 3100.0,
        "change": 10.0, "change_pct": 0.33}]}).encode()


def test_a_refusal_naming_no_symbol_answers_every_one() -> None:
    # Kraken refusing a whole request for a passing reason (a rate limit) names no symbol: it
    # is retried for all of them, and was then also taken for "no answer" (three times: the
    # connection replaced, into the rate limit).
    parser, conn = _kraken_parser()
    conn.send(100, *SYMBOLS)
    refusal = json.dumps({"method": "subscribe", "success": False,
                          "error": "Exceeded msg rate", "req_id": 1,
                          "time_in": "2024-05-15T11:20:43.013486Z",
                          "time_out": "2024-05-15T11:20:43.013545Z"}).encode()
    parser._handle(_frames(refusal), first_index=101)
    assert conn.resubscribes == [(list(SYMBOLS), None)]  # the refusal's own retry
    parser._periodic(time.monotonic())
    assert conn.resubscribes == [(list(SYMBOLS), None)] and parser._unanswered == 0


def test_data_from_before_a_subscribe_does_not_answer_it() -> None:
    # One chunk holds frames from before the subscribe and after it: the chunk's data was
    # counted at its last frame, so a ticker from before answered a subscribe since lost.
    parser, conn = _kraken_parser()
    conn.send(105, "BTC/USD")
    parser._handle(_frames(ticker("BTC/USD"), *[HEARTBEAT] * 9), first_index=100)
    parser._periodic(time.monotonic())
    assert conn.resubscribes == [(["BTC/USD"], 1)]


def test_a_new_connection_starts_the_count_again_and_a_lost_one_is_not_judged() -> None:
    parser, conn = _kraken_parser()
    parser._unanswered = pipeline.SUBSCRIBE_UNANSWERED_RECONNECT - 1  # (a previous one's)
    parser._judged_session = conn.session
    conn.session = 2
    conn.send(100, *SYMBOLS)
    conn.connected_since = None  # lost: its subscribe is not judged while down
    parser._periodic(time.monotonic())
    assert conn.resubscribes == [] and conn.reconnects == []
    conn.connected_since = 0.0
    parser._periodic(time.monotonic())
    assert conn.reconnects == [] and conn.resubscribes == [(list(SYMBOLS), 2)]


def test_a_backlog_of_frames_is_parsed_before_a_subscribe_is_judged() -> None:
    parser, conn = _kraken_parser()
    conn.send(0, *SYMBOLS)
    assert parser._frames.put((ack("ETH/USD"), time.time_ns()))  # not parsed yet
    parser._periodic(time.monotonic())
    assert conn.resubscribes == []


def test_a_venue_that_never_answers_the_subscribe_gets_it_again_then_a_new_connection(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "SUBSCRIBE_ANSWER_DEADLINE_S", 0.3)

    def scenario(peer: Peer) -> None:
        peer.accept()
        peer.sock.sendall(server_frame(STATUS))
        while not peer.stop.wait(0.1):  # heartbeats only: the connection looks alive
            peer.sock.sendall(server_frame(HEARTBEAT))

    adapter = create("kraken", "w", decode_frame)
    registry = CollectorRegistry()
    metrics = Metrics(registry, "kraken", "w")
    frames: Handoff[Frame] = Handoff(10_000)
    stop, ws_done = threading.Event(), threading.Event()
    with raw_server(scenario) as server:
        conn = Connection(adapter, server.url, SYMBOLS, frames, metrics, stop,
                          backoff=Backoff(base_s=0.01, cap_s=0.05), recv_timeout_s=0.2)
        parser = Parser(adapter, frames, Handoff[PriceFeed](1000), conn, metrics, ws_done,
                        stop)
        parser._subscribe_backoff = Backoff(base_s=0.01, cap_s=0.05)
        with with_parser(conn, parser, frames, stop, ws_done):
            assert wait_for(lambda: registry.get_sample_value(
                "chrono_collector_reconnects_total",
                {"exchange": "kraken", "reason": "subscribe_unanswered"}) == 1, 15)
            subscribes = [json.loads(payload) for op, payload in server.peers[0].client_frames()
                          if b'"subscribe"' in payload]
            # the first, then two more for what was still unanswered
            assert len(subscribes) == 3, subscribes
            assert all(m["params"]["symbol"] == SYMBOLS for m in subscribes)
            assert wait_for(lambda: server.connections >= 2, 5)
