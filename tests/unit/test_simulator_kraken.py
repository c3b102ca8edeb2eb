"""Kraken WebSocket v2 simulation, checked with websocket-client over 127.0.0.1."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import websocket

from collectors.simulator import Simulator
from tests.unit.test_simulator_support import ISO_US, client

SAMPLES = Path(__file__).parents[1] / "fixtures" / "samples" / "kraken_v2.jsonl"
DATA_FIELDS = ["symbol", "bid", "bid_qty", "ask", "ask_qty", "last", "volume", "vwap", "low",
               "high", "change", "change_pct"]


def sample(line: int) -> dict:
    return json.loads(SAMPLES.read_text().splitlines()[line - 1])


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator("kraken", rate_hz=20, seed=9) as s:
        yield s


def subscribe(symbols: list[str], req_id: int = 42, **params: object) -> dict:
    return {"method": "subscribe",
            "params": {"channel": "ticker", "symbol": symbols, **params}, "req_id": req_id}


def is_ticker(m: dict) -> bool:
    return m.get("channel") == "ticker"


def test_url_has_v2_path_and_other_paths_are_404(sim: Simulator) -> None:
    assert sim.url == f"ws://127.0.0.1:{sim.port}/v2"
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        websocket.create_connection(f"ws://127.0.0.1:{sim.port}/", timeout=5)
    assert info.value.status_code == 404


def test_status_update_on_connect(sim: Simulator) -> None:
    real = sample(9)
    with client(sim.url) as c:
        status = c.recv_json()
    assert status["channel"] == "status" and status["type"] == "update"
    assert sorted(status) == sorted(real)
    assert list(status["data"][0]) == list(real["data"][0])
    assert status["data"][0]["system"] == "online"
    assert status["data"][0]["api_version"] == "v2"
    assert status["data"][0]["version"].startswith("2.0.")
    assert status["data"][0]["connection_id"] >= 1 << 63


def test_one_ack_per_symbol_then_snapshot_then_updates(sim: Simulator) -> None:
    with client(sim.url) as c:
        c.recv_json()  # status
        c.send(subscribe(["BTC/USD", "ETH/USD"]))
        first = [c.recv_json() for _ in range(4)]
        updates = c.recv_n(10, is_ticker)
    acks = [m for m in first if m.get("method") == "subscribe"]
    snapshots = [m for m in first if is_ticker(m)]
    assert [a["result"]["symbol"] for a in acks] == ["BTC/USD", "ETH/USD"]
    for ack in acks:
        assert sorted(ack) == sorted(sample(2))
        assert ack["success"] is True and ack["req_id"] == 42
        assert ack["result"] == {"channel": "ticker", "event_trigger": "trades",
                                 "snapshot": True, "symbol": ack["result"]["symbol"]}
        assert ISO_US.match(ack["time_in"]) and ISO_US.match(ack["time_out"])
        assert ack["time_in"] <= ack["time_out"]
    # Each symbol's ack precedes its snapshot; updates follow.
    assert first.index(acks[0]) < first.index(snapshots[0])
    assert [s["type"] for s in snapshots] == ["snapshot", "snapshot"]
    assert {u["type"] for u in updates} == {"update"}
    for message in snapshots + updates:
        assert list(message) == ["channel", "type", "data"]
        (data,) = message["data"]
        assert list(data) == [*DATA_FIELDS, "timestamp"]
        for name in DATA_FIELDS[1:]:
            assert isinstance(data[name], (int, float)) and not isinstance(data[name], bool)
        assert data["bid"] < data["ask"]
        assert ISO_US.match(data["timestamp"])


def test_xbt_and_unknown_pairs_are_rejected_by_name(sim: Simulator) -> None:
    with client(sim.url) as c:
        c.recv_json()
        c.send(subscribe(["XBT/USD", "BTC/USD", "FOO/BAR"], req_id=7))
        answers = [c.recv_json() for _ in range(4)]
    errors = [a for a in answers if a.get("success") is False]
    assert [e["symbol"] for e in errors] == ["XBT/USD", "FOO/BAR"]
    assert errors[0]["error"] == "Currency pair not supported XBT/USD"
    for error in errors:
        assert sorted(error) == sorted([*sample(3), "time_in", "time_out", "req_id"])
        assert error["method"] == "subscribe" and error["req_id"] == 7
    ok = [a for a in answers if a.get("success") is True]
    assert [a["result"]["symbol"] for a in ok] == ["BTC/USD"]


def test_ping_is_answered_with_pong(sim: Simulator) -> None:
    with client(sim.url) as c:
        c.recv_json()
        c.send({"method": "ping", "req_id": 101})
        pong = c.recv_json()
    assert sorted(pong) == sorted(sample(11))
    assert pong["method"] == "pong" and pong["req_id"] == 101


def test_heartbeat_when_nothing_else_is_sent() -> None:
    with Simulator("kraken", heartbeat_interval_s=0.1, quiet=["SOL/USD"]) as sim, client(
            sim.url) as c:
        c.recv_json()
        c.send(subscribe(["SOL/USD"], snapshot=False))
        ack = c.recv_json()
        assert ack["result"]["snapshot"] is False
        beats = c.recv_n(3)
    assert beats == [{"channel": "heartbeat"}] * 3


def test_no_heartbeat_before_any_subscription(sim: Simulator) -> None:
    with client(sim.url) as c:
        c.recv_json()
        c.ws.settimeout(1.5)  # past the 1 s heartbeat period
        with pytest.raises(websocket.WebSocketTimeoutException):
            c.recv_json()


def test_timestamp_can_be_omitted_like_older_messages() -> None:
    with Simulator("kraken", rate_hz=20, kraken_timestamp=False) as sim, client(sim.url) as c:
        c.recv_json()
        c.send(subscribe(["ETH/BTC"]))
        tickers = c.recv_n(3, is_ticker)
    for ticker in tickers:
        assert list(ticker["data"][0]) == DATA_FIELDS
    assert list(sample(5)["data"][0]) == DATA_FIELDS


def test_unsubscribe_stops_updates(sim: Simulator) -> None:
    with client(sim.url) as c:
        c.recv_json()
        c.send(subscribe(["BTC/USD", "LTC/USD"]))
        c.recv_n(4, is_ticker)
        c.send({"method": "unsubscribe", "params": {"channel": "ticker", "symbol": ["BTC/USD"]},
                "req_id": 3})
        ack, _ = c.recv_until(lambda m: m.get("method") == "unsubscribe")
        assert ack["success"] is True and ack["result"]["symbol"] == "BTC/USD"
        later = c.recv_n(6, is_ticker)
    assert {m["data"][0]["symbol"] for m in later} == {"LTC/USD"}


def test_bad_requests_get_success_false(sim: Simulator) -> None:
    with client(sim.url) as c:
        c.recv_json()
        c.send("nope")
        assert c.recv_json()["success"] is False
        c.send({"method": "subscribe", "params": {"channel": "book", "symbol": ["BTC/USD"]},
                "req_id": 1})
        answer = c.recv_json()
        assert answer["success"] is False and answer["req_id"] == 1
        c.send({"method": "dance", "req_id": 2})
        assert c.recv_json()["success"] is False
