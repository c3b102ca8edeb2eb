"""Kraken spot WebSocket v2 (`wss://ws.kraken.com/v2`), ticker channel, simulated.

Follows the venue's documentation:
- https://docs.kraken.com/api/docs/websocket-v2/status : the `status` update on connect.
- https://docs.kraken.com/api/docs/websocket-v2/ticker : subscribe request, one ack per symbol
  (`result` with channel/event_trigger/snapshot/symbol, `success`, `time_in`, `time_out`,
  `req_id`), snapshot then updates with JSON numbers; `timestamp` only in newer messages.
- https://docs.kraken.com/api/docs/websocket-v2/heartbeat : `{"channel":"heartbeat"}` about once
  a second when nothing else is sent, once any channel is subscribed.
- https://docs.kraken.com/api/docs/websocket-v2/ping : `{"method":"ping","req_id":N}` answered by
  `{"method":"pong","req_id":N,"time_in":...,"time_out":...}`.
and the real messages in shared/samples/kraken_v2.jsonl, including the rejection of a v1 spelling:
`{"error":"Currency pair not supported XBT/EUR","method":"subscribe","success":false,...}`.

Simulator choices where the docs are silent: only the `ticker` channel exists (others get
"Channel not supported <name>"); malformed requests get `success:false` with a short `error`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from collectors.simulator.base import (
    NEVER,
    JsonObject,
    Rendered,
    Session,
    Venue,
    dumps,
    iso_us,
)
from collectors.simulator.market import MarketSpec, Tick
from collectors.simulator.wsserver import Connection

API_VERSION = "v2"
SERVER_VERSION = "2.0.10"


def _spec(symbol: str, price: float, decimals: int, size: float, volume: float) -> MarketSpec:
    return MarketSpec(symbol=symbol, price=price, price_decimals=decimals, trade_size=size,
                      daily_volume=volume)


# v2 spells bitcoin BTC and dogecoin DOGE; the v1 names XBT and XDG are not pairs here.
MARKETS: Mapping[str, MarketSpec] = {spec.symbol: spec for spec in (
    _spec("BTC/USD", 65000.0, 1, 0.01, 4200.0),
    _spec("ETH/USD", 3200.0, 2, 0.2, 30000.0),
    _spec("SOL/USD", 150.0, 2, 3.0, 200_000.0),
    _spec("XRP/USD", 0.55, 5, 700.0, 30_000_000.0),
    _spec("DOGE/USD", 0.15, 7, 3000.0, 150_000_000.0),
    _spec("LTC/USD", 80.0, 2, 1.5, 60000.0),
    _spec("ADA/USD", 0.45, 6, 800.0, 20_000_000.0),
    _spec("BTC/EUR", 60000.0, 1, 0.01, 1500.0),
    _spec("ETH/BTC", 0.05, 5, 0.3, 2500.0),
    _spec("BTC/USDT", 65000.0, 1, 0.005, 300.0),
)}


class KrakenSession(Session):
    def __init__(self, conn: Connection, now: float, connection_id: int) -> None:
        super().__init__(conn, now)
        self.connection_id = connection_id
        self.tickers: dict[str, None] = {}

    def topics(self) -> list[str]:
        return [f"ticker:{symbol}" for symbol in self.tickers]


class Kraken(Venue):
    name = "kraken"
    path = "/v2"

    def new_session(self, conn: Connection, now: float) -> Session:
        return KrakenSession(conn, now, self._connection_id(conn.id))

    def _connection_id(self, conn_id: int) -> int:
        # Deterministic for a seed, distinct per connection, and above 2**63 like the real ones
        # (shared/samples/kraken_v2.jsonl:9), which trips parsers that assume signed 64-bit.
        mixed = (self.options.seed * 0x9E3779B97F4A7C15 + conn_id * 0xBF58476D1CE4E5B9)
        return (1 << 63) | (mixed & ((1 << 63) - 1))

    def on_open(self, session: Session, now: float) -> None:
        assert isinstance(session, KrakenSession)
        self.hub.send(session, {"channel": "status", "type": "update", "data": [{
            "api_version": API_VERSION, "connection_id": session.connection_id,
            "system": "online", "version": SERVER_VERSION}]})

    # -- client messages

    def _answer(self, session: Session, message: JsonObject, time_in: str,
                req_id: object) -> None:
        message["time_in"] = time_in
        message["time_out"] = iso_us(self.hub.now_ns())
        if req_id is not None:
            message["req_id"] = req_id
        self.hub.send(session, message)

    def on_text(self, session: Session, text: str, now: float) -> None:
        assert isinstance(session, KrakenSession)
        time_in = iso_us(self.hub.now_ns())
        try:
            msg = json.loads(text)
        except ValueError:
            self._answer(session, {"error": "Malformed request", "success": False}, time_in,
                         None)
            return
        if not isinstance(msg, dict):
            self._answer(session, {"error": "Malformed request", "success": False}, time_in,
                         None)
            return
        req_id = msg.get("req_id")
        method = msg.get("method")
        if method == "ping":
            self._answer(session, {"method": "pong"}, time_in, req_id)
        elif method in ("subscribe", "unsubscribe"):
            self._subscription(session, str(method), msg.get("params"), time_in, req_id)
        else:
            self._answer(session, {"error": f"Method not supported {method!s}",
                                   "method": method, "success": False}, time_in, req_id)

    def _subscription(self, session: KrakenSession, method: str, params: object, time_in: str,
                      req_id: object) -> None:
        if not isinstance(params, dict):
            self._answer(session, {"error": "Missing field params", "method": method,
                                   "success": False}, time_in, req_id)
            return
        channel = params.get("channel")
        if channel != "ticker":
            self._answer(session, {"error": f"Channel not supported {channel!s}",
                                   "method": method, "success": False}, time_in, req_id)
            return
        symbols = params.get("symbol")
        if not isinstance(symbols, list) or not symbols:
            self._answer(session, {"error": "Missing field symbol", "method": method,
                                   "success": False}, time_in, req_id)
            return
        snapshot = params.get("snapshot", True) is not False
        trigger = params.get("event_trigger", "trades")
        with session.conn.send_lock:
            # Apply and publish first (a burst may start from it), then answer in request
            # order: an ack, then the snapshot read before any burst, per symbol.
            answers: list[tuple[JsonObject, Tick | None]] = []
            for symbol in symbols:
                if not isinstance(symbol, str) or symbol not in self.markets:
                    answers.append(({"error": f"Currency pair not supported {symbol!s}",
                                     "method": method, "success": False, "symbol": symbol},
                                    None))
                    continue
                if method == "subscribe":
                    result: JsonObject = {"channel": "ticker", "event_trigger": trigger,
                                          "snapshot": snapshot, "symbol": symbol}
                    session.tickers[symbol] = None
                    tick = self.hub.market(symbol).current if snapshot else None
                else:
                    result = {"channel": "ticker", "symbol": symbol}
                    session.tickers.pop(symbol, None)
                    tick = None
                answers.append(({"method": method, "result": result, "success": True}, tick))
            if any(answer.get("success") for answer, _ in answers):
                self.hub.subscriptions_changed(session)
            for answer, tick in answers:
                self._answer(session, answer, time_in, req_id)
                if tick is not None:
                    self.hub.send_ticker(session, tick, self._render(tick, "snapshot"))

    # -- timers (scheduler thread)

    def next_due(self, session: Session) -> float:
        assert isinstance(session, KrakenSession)
        if not session.tickers:
            return NEVER
        return session.last_sent_at + self.options.heartbeat_interval_s

    def on_timer(self, session: Session, now: float) -> None:
        if now - session.last_sent_at >= self.options.heartbeat_interval_s:
            self.hub.send(session, {"channel": "heartbeat"})

    # -- tickers

    def wants(self, session: Session, symbol: str) -> bool:
        assert isinstance(session, KrakenSession)
        return symbol in session.tickers

    def ticker_symbols(self, session: Session) -> list[str]:
        assert isinstance(session, KrakenSession)
        return list(session.tickers)

    def _render(self, tick: Tick, kind: str) -> Rendered:
        decimals = self.markets[tick.symbol].price_decimals
        # "+ 0.0" turns a rounded -0.0 into 0.0, which is what a venue prints.
        change = round(tick.price - tick.open_24h, decimals) + 0.0
        data: JsonObject = {
            "symbol": tick.symbol,
            "bid": tick.best_bid,
            "bid_qty": tick.best_bid_size,
            "ask": tick.best_ask,
            "ask_qty": tick.best_ask_size,
            "last": tick.price,
            "volume": tick.volume_24h,
            "vwap": tick.vwap,
            "low": tick.low_24h,
            "high": tick.high_24h,
            "change": change,
            "change_pct": round((tick.price - tick.open_24h) / tick.open_24h * 100.0, 2) + 0.0,
        }
        if self.options.kraken_timestamp:
            data["timestamp"] = iso_us(tick.trade_time_ns)
        message: JsonObject = {"channel": "ticker", "type": kind, "data": [data]}
        text = dumps(message)
        return Rendered(text=text, record=message, record_text=text)

    def render_tick(self, session: Session, tick: Tick, cache: dict[str, Rendered]) -> Rendered:
        hit = cache.get("update")
        if hit is None:
            hit = cache["update"] = self._render(tick, "update")
        return hit
