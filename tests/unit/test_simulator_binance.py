"""Binance / Binance.US stream simulation, checked with websocket-client over 127.0.0.1."""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
import websocket

from collectors.simulator import Simulator, SimulatorError
from tests.unit.test_simulator_support import client

SAMPLES = Path(__file__).parents[1] / "fixtures" / "samples" / "binance.jsonl"
FIELDS = ["e", "E", "s", "p", "P", "w", "x", "c", "Q", "b", "B", "a", "A", "o", "h", "l", "v",
          "q", "O", "C", "F", "L", "n"]
INT_FIELDS = {"E", "O", "C", "F", "L", "n"}


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator("binance", rate_hz=20, seed=5) as s:
        yield s


def check_ticker(data: dict, symbol: str) -> None:
    assert list(data) == FIELDS
    assert data["e"] == "24hrTicker" and data["s"] == symbol
    for name in FIELDS[3:18]:
        assert isinstance(data[name], str), name
        Decimal(data[name])
    for name in INT_FIELDS:
        assert isinstance(data[name], int), name
    assert data["C"] - data["O"] == 86_400_000
    assert data["n"] == data["L"] - data["F"] + 1
    assert Decimal(data["b"]) < Decimal(data["a"])
    assert Decimal(data["p"]) == Decimal(data["c"]) - Decimal(data["o"])
    assert abs(data["E"] - data["C"]) <= 1


def test_combined_stream_url_wraps_payloads(sim: Simulator) -> None:
    real = json.loads(SAMPLES.read_text().splitlines()[3])  # combined 24hrTicker capture
    with client(f"{sim.url}/stream?streams=btcusdt@ticker/ethusdt@ticker") as c:
        messages = c.recv_n(20)
    assert {m["stream"] for m in messages} == {"btcusdt@ticker", "ethusdt@ticker"}
    for m in messages:
        assert list(m) == list(real) == ["stream", "data"]
        check_ticker(m["data"], m["stream"].split("@")[0].upper())
        assert list(m["data"]) == list(real["data"])
    events = [m["data"]["E"] for m in messages if m["stream"] == "btcusdt@ticker"]
    assert events == sorted(events)


def test_raw_stream_url_sends_bare_payloads(sim: Simulator) -> None:
    with client(f"{sim.url}/ws/solusdt@ticker") as c:
        messages = c.recv_n(3)
        conn_id = sim.connection_ids()[0]
    for m in messages:
        check_ticker(m, "SOLUSDT")
    # The record is the combined form either way.
    assert sim.sent_tickers(conn_id)[:3] == [{"stream": "solusdt@ticker", "data": m}
                                             for m in messages]


def test_live_subscribe_unsubscribe_and_list(sim: Simulator) -> None:
    with client(f"{sim.url}/stream") as c:
        c.send({"method": "SUBSCRIBE", "params": ["btcusdt@ticker", "xrpusdt@ticker"], "id": 1})
        assert c.recv_json() == {"result": None, "id": 1}
        got = c.recv_n(6)
        assert {m["stream"] for m in got} == {"btcusdt@ticker", "xrpusdt@ticker"}
        c.send({"method": "UNSUBSCRIBE", "params": ["btcusdt@ticker"], "id": 2})
        c.recv_until(lambda m: m.get("id") == 2)
        c.send({"method": "LIST_SUBSCRIPTIONS", "id": 3})
        listed, _ = c.recv_until(lambda m: m.get("id") == 3)
        assert listed == {"result": ["xrpusdt@ticker"], "id": 3}
        later = c.recv_n(6)
        assert {m["stream"] for m in later} == {"xrpusdt@ticker"}
        c.send({"method": "GET_PROPERTY", "params": ["combined"], "id": 4})
        got_property, _ = c.recv_until(lambda m: m.get("id") == 4)
        assert got_property == {"result": True, "id": 4}


def test_request_errors(sim: Simulator) -> None:
    with client(f"{sim.url}/ws") as c:
        c.send({"method": "SUBSCRIBE", "params": ["BTCUSDT ticker"], "id": 2})
        assert c.recv_json() == {"error": {"code": 2, "msg": "Invalid request: invalid stream"},
                                 "id": 2}
        c.send({"method": "SUBSCRIBE", "params": ["btcusdt@ticker"]})
        assert c.recv_json()["error"]["msg"] == ("Invalid request: request ID must be an "
                                                 "unsigned integer")
        c.send({"method": "FOO", "id": 5})
        assert c.recv_json()["error"]["msg"].startswith("Invalid request: unknown variant")
        c.send("{oops")
        assert c.recv_json()["error"]["code"] == 3


def test_unknown_symbol_is_silent_like_binance(sim: Simulator) -> None:
    # binance.com has no BTCUSD market: the stream is accepted and nothing ever comes for it.
    with client(f"{sim.url}/stream?streams=btcusd@ticker/ethusdt@ticker") as c:
        c.send({"method": "SUBSCRIBE", "params": ["foousdt@ticker"], "id": 1})
        messages = c.recv_n(20, lambda m: "stream" in m)
        conn_id = sim.connection_ids()[0]
        assert sim.subscriptions()[conn_id] == ["btcusd@ticker", "ethusdt@ticker",
                                                "foousdt@ticker"]
    assert {m["stream"] for m in messages} == {"ethusdt@ticker"}


def test_binanceus_lists_usd_and_usdt_markets() -> None:
    with Simulator("binanceus", rate_hz=20) as sim, client(
            f"{sim.url}/stream?streams=btcusd@ticker/btcusdt@ticker") as c:
        messages = c.recv_n(6)
    assert {m["data"]["s"] for m in messages} == {"BTCUSD", "BTCUSDT"}


def test_server_pings_and_pong_deadline() -> None:
    with Simulator("binance", rate_hz=20, ping_interval_s=0.05, pong_timeout_s=0.25,
                   max_messages_per_s=1000, close_timeout_s=0.5) as sim:
        with client(f"{sim.url}/ws/btcusdt@ticker") as reader:
            pings = 0
            while pings < 8:  # answered by websocket-client while reading: stays connected
                opcode, _ = reader.ws.recv_data_frame(control_frame=True)
                pings += opcode == websocket.ABNF.OPCODE_PING
            assert sim.closed_connections() == []
        with client(f"{sim.url}/ws/btcusdt@ticker"):
            # This client never reads, so never answers: cut after the pong deadline.
            assert sim.wait_for(lambda: any(c.reason == "pong_timeout"
                                            for c in sim.closed_connections()))


def test_default_ping_interval_is_20s_and_others_do_not_ping() -> None:
    assert Simulator("binance").ping_interval_s == 20.0
    assert Simulator("binance").pong_timeout_s == 60.0
    assert Simulator("coinbase").ping_interval_s is None
    assert Simulator("kraken").ping_interval_s is None
    assert Simulator("binance", ping_interval_s=0).ping_interval_s is None


@pytest.mark.parametrize(("path", "expected"), [
    ("/stream?streams=btcusdt@ticker", {"stream": "!serverShutdown",
                                        "data": {"e": "serverShutdown"}}),
    ("/ws/btcusdt@ticker", {"e": "serverShutdown"}),
])
def test_server_shutdown_event_then_close(path: str, expected: dict) -> None:
    real = [json.loads(line) for line in SAMPLES.read_text().splitlines()[7:9]]
    with Simulator("binance", rate_hz=20, shutdown_grace_s=0.3) as sim, client(
            sim.url + path) as c:
        c.recv_json()  # a ticker: subscribed and flowing
        assert sim.server_shutdown() == 1
        event, _ = c.recv_until(lambda m: "serverShutdown" in json.dumps(m))
        assert c.wait_closed() == 1001
    shape = event.get("data", event)
    assert shape["e"] == "serverShutdown" and isinstance(shape["E"], int)
    assert list(event) == list(real[0] if "e" in event else real[1])
    if "stream" in event:
        assert event["stream"] == expected["stream"]
    assert any(c.reason == "server_shutdown" for c in sim.closed_connections())


def test_server_shutdown_is_binance_only() -> None:
    with Simulator("kraken") as sim, pytest.raises(SimulatorError):
        sim.server_shutdown()


def test_451_region_restriction_with_the_real_body(sim: Simulator) -> None:
    real_body = SAMPLES.read_text().splitlines()[10].encode()
    sim.reject_handshake(451, count=1)
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        websocket.create_connection(f"{sim.url}/stream?streams=btcusdt@ticker", timeout=5)
    assert info.value.status_code == 451
    assert info.value.resp_body == real_body
    assert info.value.resp_headers["content-type"] == "application/json"
    with client(f"{sim.url}/stream?streams=btcusdt@ticker") as c:  # count=1: next one is fine
        assert c.recv_json()["stream"] == "btcusdt@ticker"
    assert sim.handshakes_rejected == 1


def test_more_than_five_messages_a_second_disconnects(sim: Simulator) -> None:
    with client(f"{sim.url}/ws") as c:
        for i in range(6):
            c.send({"method": "LIST_SUBSCRIPTIONS", "id": i})
        assert c.wait_closed() == 1008
    assert sim.wait_for(lambda: [x.reason for x in sim.closed_connections()] == ["rate_limited"])


def test_stream_limit_per_connection() -> None:
    with Simulator("binance", max_streams=3) as sim:
        with client(f"{sim.url}/stream?streams=a@ticker/b@ticker/c@ticker/d@ticker") as c:
            assert c.wait_closed() == 1008
        with client(f"{sim.url}/stream?streams=btcusdt@ticker/ethusdt@ticker") as c:
            c.send({"method": "SUBSCRIBE", "params": ["solusdt@ticker", "xrpusdt@ticker"],
                    "id": 1})
            assert c.wait_closed() == 1008
        assert sim.wait_for(lambda: [x.reason for x in sim.closed_connections()]
                            == ["too_many_streams"] * 2)


def test_unknown_path_is_404(sim: Simulator) -> None:
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        websocket.create_connection(f"{sim.url}/api/v3/ticker", timeout=5)
    assert info.value.status_code == 404
