"""Coinbase Exchange feed simulation, checked with websocket-client over 127.0.0.1."""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from collectors.simulator import Simulator
from tests.unit.test_simulator_support import ISO_US, client

SAMPLES = Path(__file__).parents[1] / "fixtures" / "samples" / "coinbase_exchange.jsonl"
TICKER_FIELDS = ["type", "sequence", "product_id", "price", "open_24h", "volume_24h", "low_24h",
                 "high_24h", "volume_30d", "best_bid", "best_bid_size", "best_ask",
                 "best_ask_size", "side", "time", "trade_id", "last_size"]
SUBSCRIBE = {"type": "subscribe", "product_ids": ["BTC-USD", "ETH-USD"],
             "channels": ["ticker", "heartbeat"]}


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator("coinbase", rate_hz=20, seed=3, heartbeat_interval_s=0.1) as s:
        yield s


def is_ticker(m: dict) -> bool:
    return m.get("type") == "ticker"


def test_url_is_the_root_of_loopback(sim: Simulator) -> None:
    assert sim.url == f"ws://127.0.0.1:{sim.port}"


def test_subscribe_ack_then_tickers_with_every_field(sim: Simulator) -> None:
    with client(sim.url) as c:
        c.send(SUBSCRIBE)
        assert c.recv_json() == {"type": "subscriptions", "channels": [
            {"name": "ticker", "product_ids": ["BTC-USD", "ETH-USD"]},
            {"name": "heartbeat", "product_ids": ["BTC-USD", "ETH-USD"]}]}
        # The current ticker of each product arrives at once, before any heartbeat.
        first = [c.recv_json(), c.recv_json()]
        assert [m["product_id"] for m in first] == ["BTC-USD", "ETH-USD"]
        tickers = first + c.recv_n(20, is_ticker)
    for ticker in tickers:
        assert list(ticker) == TICKER_FIELDS
        assert isinstance(ticker["sequence"], int) and isinstance(ticker["trade_id"], int)
        for name in [*TICKER_FIELDS[3:13], "last_size"]:
            assert isinstance(ticker[name], str)
            assert Decimal(ticker[name]) > 0, name
        assert ticker["side"] in ("buy", "sell")
        assert ISO_US.match(ticker["time"])
        assert Decimal(ticker["best_bid"]) < Decimal(ticker["best_ask"])
        assert Decimal(ticker["low_24h"]) <= Decimal(ticker["price"]) <= Decimal(
            ticker["high_24h"])


def test_shapes_match_the_real_captures(sim: Simulator) -> None:
    real = [json.loads(line) for line in SAMPLES.read_text().splitlines()]
    real_ticker = next(m for m in real if is_ticker(m) and "best_bid_size" in m)
    real_heartbeat = next(m for m in real if m.get("type") == "heartbeat")
    with client(sim.url) as c:
        c.send(SUBSCRIBE)
        heartbeat, _ = c.recv_until(lambda m: m["type"] == "heartbeat")
        ticker, _ = c.recv_until(is_ticker)
    assert list(ticker) == list(real_ticker)
    assert list(heartbeat) == list(real_heartbeat)
    for name, value in real_ticker.items():
        assert type(ticker[name]) is type(value), name


def test_sequence_increases_per_product_and_matches_what_was_recorded(sim: Simulator) -> None:
    with client(sim.url) as c:
        c.send(SUBSCRIBE)
        c.recv_json()
        received = c.recv_n(30, is_ticker)
        conn_id = sim.connection_ids()[0]
        assert sim.wait_for(lambda: len(sim.sent_tickers(conn_id)) >= 30)
    assert sim.sent_tickers(conn_id)[:30] == received
    for product in ("BTC-USD", "ETH-USD"):
        sequences = [m["sequence"] for m in received if m["product_id"] == product]
        trade_ids = [m["trade_id"] for m in received if m["product_id"] == product]
        assert len(sequences) >= 10
        assert sequences == sorted(set(sequences))
        assert trade_ids == sorted(set(trade_ids))


def test_heartbeats_once_per_interval_per_product(sim: Simulator) -> None:
    with client(sim.url) as c:
        c.send({"type": "subscribe", "product_ids": ["SOL-USD", "LTC-USD"],
                "channels": ["heartbeat"]})
        assert c.recv_json()["channels"] == [{"name": "heartbeat",
                                              "product_ids": ["SOL-USD", "LTC-USD"]}]
        beats = c.recv_n(6)
    assert all(list(b) == ["type", "sequence", "last_trade_id", "product_id", "time"]
               for b in beats)
    assert [b["product_id"] for b in beats] == ["SOL-USD", "LTC-USD"] * 3
    assert all(ISO_US.match(b["time"]) for b in beats)
    assert sim.sent_count == 0  # heartbeat-only: no tickers


def test_unknown_product_voids_the_whole_request(sim: Simulator) -> None:
    with client(sim.url) as c:
        c.send({"type": "subscribe", "product_ids": ["ETH-USD", "XRP-FOO"],
                "channels": ["ticker", "heartbeat"]})
        assert c.recv_json() == {"type": "error", "message": "Failed to subscribe",
                                 "reason": "XRP-FOO is not a valid product"}
        assert c.recv_json() == {"type": "subscriptions", "channels": []}
        assert sim.subscriptions() == {sim.connection_ids()[0]: []}
        # Subscribing again without the bad product works, and ETH-USD only starts now.
        c.send({"type": "subscribe", "product_ids": ["ETH-USD"], "channels": ["ticker"]})
        ack = c.recv_json()
        assert ack["channels"] == [{"name": "ticker", "product_ids": ["ETH-USD"]}]
        assert c.recv_json()["product_id"] == "ETH-USD"


@pytest.mark.parametrize(("request_", "reason"), [
    ({"type": "subscribe", "product_ids": ["BTC-USD"]}, "No channels provided"),
    ({"type": "subscribe", "product_ids": ["BTC-USD"], "channels": ["level9"]},
     "level9 is not a valid channel"),
    ({"type": "subscribe", "product_ids": [], "channels": ["ticker"]}, "No product ids provided"),
    ({"type": "subscribe", "product_ids": [""], "channels": ["ticker"]},
     " is not a valid product"),
])
def test_invalid_requests(sim: Simulator, request_: dict, reason: str) -> None:
    with client(sim.url) as c:
        c.send(request_)
        assert c.recv_json() == {"type": "error", "message": "Failed to subscribe",
                                 "reason": reason}


def test_channel_objects_with_their_own_products_and_unsubscribe(sim: Simulator) -> None:
    with client(sim.url) as c:
        c.send({"type": "subscribe", "product_ids": ["ETH-USD"],
                "channels": ["heartbeat", {"name": "ticker", "product_ids": ["ETH-BTC"]}]})
        assert c.recv_json()["channels"] == [
            {"name": "ticker", "product_ids": ["ETH-USD", "ETH-BTC"]},
            {"name": "heartbeat", "product_ids": ["ETH-USD"]}]
        conn_id = sim.connection_ids()[0]
        assert sim.subscriptions()[conn_id] == ["ticker:ETH-USD", "ticker:ETH-BTC",
                                                "heartbeat:ETH-USD"]
        c.send({"type": "unsubscribe", "product_ids": ["ETH-USD"], "channels": ["ticker"]})
        ack, _ = c.recv_until(lambda m: m["type"] == "subscriptions")
        assert ack["channels"] == [{"name": "ticker", "product_ids": ["ETH-BTC"]},
                                   {"name": "heartbeat", "product_ids": ["ETH-USD"]}]
        later = c.recv_n(10, is_ticker)
    assert {m["product_id"] for m in later} == {"ETH-BTC"}


def test_no_subscribe_within_the_deadline_disconnects() -> None:
    with Simulator("coinbase", subscribe_timeout_s=0.2) as sim, client(sim.url) as c:
        assert c.wait_closed() == 1008
        assert sim.wait_for(lambda: [x.reason for x in sim.closed_connections()]
                            == ["subscribe_timeout"])


def test_malformed_json_is_an_error_not_a_disconnect(sim: Simulator) -> None:
    with client(sim.url) as c:
        c.send("{not json")
        assert c.recv_json()["type"] == "error"
        c.send(SUBSCRIBE)
        assert c.recv_json()["type"] == "subscriptions"


def test_same_seed_same_prices_across_simulators() -> None:
    paths = []
    for _ in range(2):
        with Simulator("coinbase", rate_hz=50, seed=11) as sim, client(sim.url) as c:
            c.send({"type": "subscribe", "product_ids": ["BTC-USD"], "channels": ["ticker"]})
            c.recv_json()
            paths.append([m["price"] for m in c.recv_n(10)])
    assert paths[0] == paths[1]
