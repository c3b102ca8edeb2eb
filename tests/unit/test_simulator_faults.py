"""Simulator faults, modes and observability: what tests and benchmarks script."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import websocket

from collectors.errors import ConfigError
from collectors.simulator import Simulator
from collectors.simulator.wsserver import Opcode, encode_frame
from tests.unit.test_simulator_support import Client, client

SUB = {"type": "subscribe", "product_ids": ["BTC-USD", "ETH-USD"], "channels": ["ticker"]}


def subscribed(sim: Simulator, message: dict = SUB) -> Client:
    c = Client(sim.url)
    c.send(message)
    assert c.recv_json()["type"] == "subscriptions"
    return c


def drain_until_quiet(c: Client, quiet_s: float) -> list:
    """Everything already on its way, until nothing arrives for `quiet_s`."""
    c.ws.settimeout(quiet_s)
    got = []
    try:
        while True:
            opcode, frame = c.ws.recv_data_frame(control_frame=True)
            got.append((opcode, frame.data))
    except websocket.WebSocketTimeoutException:
        return got


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="exchange"):
        Simulator("ftx")
    with pytest.raises(ConfigError, match="loopback"):
        Simulator("coinbase", host="0.0.0.0")
    with pytest.raises(ConfigError, match="loopback"):
        Simulator("coinbase", host="example.com")
    with pytest.raises(ConfigError, match="loopback"):
        Simulator("coinbase", host="::1")  # IPv4 loopback only
    assert Simulator("coinbase", host="localhost").host == "127.0.0.1"
    with pytest.raises(ConfigError, match="rate_hz"):
        Simulator("coinbase", rate_hz=-1)


def test_drop_all_cuts_tcp_without_close_frame_and_reconnect_works() -> None:
    with Simulator("coinbase", rate_hz=20) as sim:
        c1, c2 = subscribed(sim), subscribed(sim)
        try:
            assert sim.wait_for(lambda: sim.active_connections == 2)
            assert sim.drop_all() == 2
            assert c1.wait_closed() is None and c2.wait_closed() is None
            assert sim.wait_for(lambda: sim.active_connections == 0)
            assert [c.reason for c in sim.closed_connections()] == ["drop_all", "drop_all"]
        finally:
            c1.close()
            c2.close()
        with client(sim.url) as c3:
            c3.send(SUB)
            assert c3.recv_json()["type"] == "subscriptions"
        assert sim.connections_total == 3


def test_go_silent_sends_nothing_at_all_then_resumes() -> None:
    with Simulator("binance", rate_hz=20, ping_interval_s=0.05, pong_timeout_s=5) as sim, client(
            f"{sim.url}/ws/btcusdt@ticker") as c:
        c.recv_n(2)
        sim.go_silent(True)
        count = sim.sent_count
        in_flight = drain_until_quiet(c, 0.5)  # ~10 ping periods and ~10 ticker periods
        assert sim.sent_count == count
        data = [d for op, d in in_flight if op == websocket.ABNF.OPCODE_TEXT]
        assert len(data) == count - 2  # exactly what was written before silence, unread
        # A request gets no answer either, but is still recorded.
        c.send({"method": "LIST_SUBSCRIPTIONS", "id": 9})
        assert drain_until_quiet(c, 0.3) == []
        assert sim.wait_for(lambda: len(sim.received_messages()) == 1)
        assert sim.active_connections == 1
        sim.go_silent(False)
        c.ws.settimeout(5)
        assert c.recv_json()["s"] == "BTCUSDT"  # raw stream: bare payloads


def test_client_close_while_silent_is_not_answered_but_does_not_hang() -> None:
    with Simulator("coinbase") as sim:
        c = subscribed(sim)
        sim.go_silent(True)
        c.ws.close(timeout=5)  # the server drops TCP instead of answering: returns at once
        c.ws.shutdown()
        assert sim.wait_for(lambda: sim.active_connections == 0)


@pytest.mark.parametrize("payload", [
    "{not json",
    '{"type":"ticker","product_id":"BTC-USD","price":"abc"}',
    '{"type":"ticker","product_id":"BTC-USD","price":"-5"}',
    '{"type":"ticker"}',
    "[1,2,3]",
])
def test_send_raw_text(payload: str) -> None:
    with Simulator("coinbase", rate_hz=0.01) as sim, client(sim.url) as c:
        assert sim.wait_for(lambda: sim.active_connections == 1)
        assert sim.send_raw(payload) == 1
        assert c.ws.recv() == payload


def test_send_raw_binary_big_frame_and_raw_bytes() -> None:
    with Simulator("coinbase", rate_hz=0.01) as sim, client(sim.url) as c:
        assert sim.wait_for(lambda: sim.active_connections == 1)
        sim.send_raw(b"\x00\xffbinary")
        assert c.ws.recv() == b"\x00\xffbinary"
        big = "x" * (2 * 1024 * 1024)
        sim.send_raw(big)
        assert c.ws.recv() == big
        sim.send_raw(encode_frame(Opcode.TEXT, b"hand-made"), frame=False)
        assert c.ws.recv() == "hand-made"
        sim.send_raw(bytes([0xF1, 0x01, 0x41]), frame=False)  # RSV bits set: invalid frame
        with pytest.raises(websocket.WebSocketProtocolException):
            c.ws.recv()


def test_reject_handshake_for_the_next_connections_then_clear() -> None:
    with Simulator("kraken") as sim:
        sim.reject_handshake(503, count=2, body="maintenance")
        for _ in range(2):
            with pytest.raises(websocket.WebSocketBadStatusException) as info:
                websocket.create_connection(sim.url, timeout=5)
            assert info.value.status_code == 503 and info.value.resp_body == b"maintenance"
        with client(sim.url) as c:
            assert c.recv_json()["channel"] == "status"
        sim.reject_handshake(429)
        for _ in range(3):
            with pytest.raises(websocket.WebSocketBadStatusException):
                websocket.create_connection(sim.url, timeout=5)
        sim.reject_handshake(None)
        with client(sim.url) as c:
            assert c.recv_json()["channel"] == "status"
        assert sim.handshakes_rejected == 5 and sim.connections_total == 2


def test_burst_delivers_n_tickers_in_order_as_recorded() -> None:
    with Simulator("coinbase", rate_hz=0.01, seed=2) as sim:
        c = subscribed(sim)
        try:
            c.recv_n(2)  # the initial tickers
            conn_id = sim.connection_ids()[0]
            assert sim.burst(5000) == 1
            got = c.recv_n(5000, lambda m: m["type"] == "ticker")
            assert sim.wait_for(lambda: sim.bursts_active == 0)
        finally:
            c.close()
    assert got == sim.sent_tickers(conn_id)[2:5002]
    for product in ("BTC-USD", "ETH-USD"):
        seqs = [m["sequence"] for m in got if m["product_id"] == product]
        assert len(seqs) == 2500 and seqs == sorted(set(seqs))


def test_flat_out_mode_streams_continuously() -> None:
    with Simulator("kraken", rate_hz=0) as sim, client(sim.url) as c:
        c.recv_json()
        c.send({"method": "subscribe", "params": {"channel": "ticker", "symbol": ["BTC/USD"]}})
        ticks = c.recv_n(3000, lambda m: m.get("channel") == "ticker")
        assert sim.bursts_active == 1
    assert ticks[0]["type"] == "snapshot"
    assert {t["type"] for t in ticks[1:]} == {"update"}


def test_burst_on_subscribe_and_record_file(tmp_path: Path) -> None:
    record = tmp_path / "sent.jsonl"
    with Simulator("binance", rate_hz=1, burst_on_subscribe=300, record_path=record) as sim, \
            client(f"{sim.url}/stream?streams=btcusdt@ticker/ethusdt@ticker") as c:
        got = c.recv_n(300)
        assert sim.wait_for(300)
        assert sim.wait_for(lambda: sim.bursts_active == 0)
    lines = [json.loads(line) for line in record.read_text().splitlines()]
    assert lines[:300] == got == sim.sent_tickers()[:300]


def test_keep_sent_bounds_memory_but_counts_everything() -> None:
    with Simulator("coinbase", rate_hz=1, keep_sent=10) as sim:
        c = subscribed(sim)
        try:
            sim.burst(100)
            c.recv_n(102)
        finally:
            c.close()
        assert sim.sent_count == 102
        assert len(sim.sent_tickers()) == 10


def test_observability_and_wait_for_timeout() -> None:
    with Simulator("coinbase", rate_hz=0.01) as sim:
        assert sim.wait_for(1, timeout_s=0.05) is False
        c = subscribed(sim, {"type": "subscribe", "product_ids": ["DOGE-USD"],
                             "channels": ["ticker", "heartbeat"]})
        try:
            c.recv_json()
            assert sim.wait_for(1)
            assert [m.json() for m in sim.received_messages()] == [
                {"type": "subscribe", "product_ids": ["DOGE-USD"],
                 "channels": ["ticker", "heartbeat"]}]
            assert sim.subscriptions() == {1: ["ticker:DOGE-USD", "heartbeat:DOGE-USD"]}
            assert sim.active_connections == 1 and sim.connections_total == 1
        finally:
            c.close()
        assert sim.wait_for(lambda: sim.active_connections == 0)
        assert sim.subscriptions() == {}
        assert sim.closed_connections()[0].reason == "client_close"


def test_max_connection_age_closes_like_the_24h_cut() -> None:
    with Simulator("binance", max_connection_age_s=0.2) as sim, client(
            f"{sim.url}/ws/btcusdt@ticker") as c:
        assert c.wait_closed() == 1000
        assert sim.wait_for(lambda: [x.reason for x in sim.closed_connections()]
                            == ["max_connection_age"])


def test_quiet_symbol_stops_ticking_but_others_go_on() -> None:
    with Simulator("coinbase", rate_hz=20, quiet=["BTC-USD"]) as sim:
        c = subscribed(sim)
        try:
            later = c.recv_n(10, lambda m: m["type"] == "ticker")[2:]
            assert {m["product_id"] for m in later} == {"ETH-USD"}
            sim.set_quiet("BTC-USD", False)
            c.recv_until(lambda m: m.get("product_id") == "BTC-USD")
        finally:
            c.close()


def test_stop_closes_clients_with_1001_and_joins_every_thread() -> None:
    sim = Simulator("kraken", rate_hz=0, close_timeout_s=0.5).start()
    c = Client(sim.url)
    try:
        c.recv_json()
        c.send({"method": "subscribe", "params": {"channel": "ticker", "symbol": ["BTC/USD"]}})
        c.recv_n(10)
        sim.stop()
        assert c.wait_closed() in (1001, None)  # 1001, unless the stream filled the buffer
    finally:
        c.close()
        sim.stop()
    assert not [t.name for t in threading.enumerate() if t.name.startswith("sim-")]


def test_silence_pauses_a_burst_and_loses_nothing() -> None:
    with Simulator("coinbase", rate_hz=0.01) as sim:
        c = subscribed(sim)
        try:
            c.recv_n(2)
            sim.burst(3000)
            sim.go_silent(True)
            before = sim.sent_count
            early = [m for op, m in drain_until_quiet(c, 0.5) if op == websocket.ABNF.OPCODE_TEXT]
            assert len(early) == before - 2 and sim.sent_count == before
            assert sim.bursts_active == 1
            sim.go_silent(False)
            c.ws.settimeout(5)
            rest = c.recv_n(3000 - len(early))
            assert sim.wait_for(lambda: sim.bursts_active == 0)
        finally:
            c.close()
    tickers = [json.loads(m) for m in early] + rest
    assert tickers == sim.sent_tickers()[2:]
    for product in ("BTC-USD", "ETH-USD"):
        seqs = [m["sequence"] for m in tickers if m["product_id"] == product]
        assert len(seqs) == 1500 and seqs == sorted(set(seqs))
