"""Binance spot (`binance`) and Binance.US (`binanceus`) market streams, simulated.

Follows the venues' documentation:
- https://developers.binance.com/docs/binance-spot-api-docs/web-socket-streams (and the same text
  in github.com/binance/binance-spot-api-docs web-socket-streams.md): raw streams at
  `/ws/<stream>`, combined streams at `/stream?streams=a/b` wrapped as `{"stream","data"}`;
  SUBSCRIBE / UNSUBSCRIBE / LIST_SUBSCRIPTIONS / SET_PROPERTY / GET_PROPERTY with `id`; error
  shapes; a ping frame every 20 s and a disconnect without a pong within a minute (unsolicited
  pongs do not count); 5 incoming messages per second (ping/pong/JSON) per connection; 1024
  streams per connection; the `serverShutdown` event (raw `{"e":"serverShutdown","E":ms}`,
  combined `{"stream":"!serverShutdown","data":{...}}`); `<symbol>@ticker` (24hrTicker, 1000 ms).
- https://docs.binance.us/ (WebSocket streams): the same protocol at stream.binance.us:9443.
and the real messages in shared/samples/binance.jsonl (24hrTicker shapes, the 451 body of a
region-restricted request, `{"error":{"code":2,"msg":"Invalid request: invalid stream"},"id":2}`).

Well-formed streams for unknown symbols are accepted and stay silent, as on Binance. Simulator
choices where the docs are silent: more than 1024 streams, and a rate-limit breach, close the
connection with 1008 ("Too many streams" / "Too many requests"); a serverShutdown is followed by a
1001 close after `shutdown_grace_s` (the real venue waits about 10 minutes).
"""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Mapping

from collectors.simulator.base import (
    NEVER,
    Hub,
    JsonObject,
    Rendered,
    Session,
    SimOptions,
    Venue,
    dumps,
    fixed,
)
from collectors.simulator.market import MarketSpec, Tick
from collectors.simulator.wsserver import CloseCode, Connection, HandshakeRequest, Rejection

# The 451 body binance.com answers from a restricted location (shared/samples/binance.jsonl:11).
RESTRICTED_BODY = (
    b'{"code":0,"msg":"Service unavailable from a restricted location according to \'b. '
    b"Eligibility' in https://www.binance.com/en/terms. Please contact customer service if you "
    b'believe you received this message in error."}'
)
METHODS = ("SUBSCRIBE", "UNSUBSCRIBE", "LIST_SUBSCRIPTIONS", "SET_PROPERTY", "GET_PROPERTY")
_STREAM = re.compile(r"^!?[a-z0-9]+(@[a-zA-Z0-9_]+)+$")
_ID = re.compile(r"^[A-Za-z0-9]{1,36}$")
_DAY_MS = 86_400_000


def _spec(symbol: str, price: float, decimals: int, size: float, volume: float) -> MarketSpec:
    return MarketSpec(symbol=symbol, price=price, price_decimals=decimals, trade_size=size,
                      daily_volume=volume)


# binance.com lists USDT (and USDC, BTC) quoted markets, and no BTCUSD.
BINANCE_MARKETS: Mapping[str, MarketSpec] = {spec.symbol: spec for spec in (
    _spec("BTCUSDT", 65000.0, 2, 0.01, 25000.0),
    _spec("ETHUSDT", 3200.0, 2, 0.2, 400000.0),
    _spec("SOLUSDT", 150.0, 2, 3.0, 4_000_000.0),
    _spec("XRPUSDT", 0.55, 4, 800.0, 250_000_000.0),
    _spec("DOGEUSDT", 0.15, 5, 3000.0, 1_500_000_000.0),
    _spec("LTCUSDT", 80.0, 2, 2.0, 700_000.0),
    _spec("ADAUSDT", 0.45, 4, 900.0, 300_000_000.0),
    _spec("AVAXUSDT", 35.0, 2, 8.0, 2_000_000.0),
    _spec("BNBUSDT", 580.0, 2, 0.5, 500_000.0),
    _spec("ETHBTC", 0.05, 5, 0.4, 50000.0),
    _spec("BTCUSDC", 65000.0, 2, 0.005, 4000.0),
)}

# binance.us lists both USD and USDT quoted markets; they are different markets.
BINANCE_US_MARKETS: Mapping[str, MarketSpec] = {spec.symbol: spec for spec in (
    _spec("BTCUSD", 65000.0, 2, 0.005, 300.0),
    _spec("ETHUSD", 3200.0, 2, 0.05, 3000.0),
    _spec("SOLUSD", 150.0, 2, 1.0, 30000.0),
    _spec("XRPUSD", 0.55, 4, 300.0, 3_000_000.0),
    _spec("DOGEUSD", 0.15, 5, 1000.0, 20_000_000.0),
    _spec("LTCUSD", 80.0, 2, 0.5, 5000.0),
    _spec("ADAUSD", 0.45, 4, 300.0, 2_000_000.0),
    _spec("BTCUSDT", 65000.0, 2, 0.003, 120.0),
    _spec("ETHUSDT", 3200.0, 2, 0.03, 900.0),
    _spec("SOLUSDT", 150.0, 2, 0.5, 8000.0),
    _spec("BTCUSDC", 65000.0, 2, 0.002, 40.0),
)}


class BinanceSession(Session):
    def __init__(self, conn: Connection, now: float, streams: list[str], combined: bool) -> None:
        super().__init__(conn, now)
        self.streams: dict[str, None] = dict.fromkeys(streams)
        self.combined = combined
        self.frame_times: deque[float] = deque()
        self.shutdown_close_at = NEVER

    def topics(self) -> list[str]:
        return list(self.streams)


def _url_streams(request: HandshakeRequest) -> tuple[list[str], bool] | None:
    """(streams, combined) for a Binance stream URL, None for a path Binance does not serve."""
    path = request.path
    if path in ("/stream", "/stream/"):
        value = request.query_value("streams") or ""
        return [s for s in value.split("/") if s], True
    if path == "/ws" or path.startswith("/ws/"):
        return [s for s in path[len("/ws"):].split("/") if s], False
    return None


class Binance(Venue):
    name = "binance"
    path = ""
    default_ping_interval_s = 20.0

    def __init__(self, hub: Hub, markets: Mapping[str, MarketSpec], options: SimOptions, *,
                 name: str = "binance") -> None:
        super().__init__(hub, markets, options)
        self.name = name

    def accept(self, request: HandshakeRequest) -> Rejection | None:
        if _url_streams(request) is None:
            return Rejection(404, b"Not Found")
        return None

    def default_rejection_body(self, status: int) -> tuple[bytes, str]:
        if status == 451:
            return RESTRICTED_BODY, "application/json"
        return super().default_rejection_body(status)

    def new_session(self, conn: Connection, now: float) -> Session:
        parsed = _url_streams(conn.request)
        streams, combined = parsed if parsed is not None else ([], False)
        return BinanceSession(conn, now, streams, combined)

    def on_open(self, session: Session, now: float) -> None:
        assert isinstance(session, BinanceSession)
        if len(session.streams) > self.options.max_streams:
            self.hub.close(session, CloseCode.POLICY_VIOLATION, "Too many streams",
                           "too_many_streams")
            return
        if session.streams:
            with session.conn.send_lock:
                self.hub.subscriptions_changed(session)

    # -- client messages

    def on_frame(self, session: Session, now: float) -> bool:
        assert isinstance(session, BinanceSession)
        times = session.frame_times
        times.append(now)
        while times and times[0] <= now - 1.0:
            times.popleft()
        if len(times) > self.options.max_messages_per_s:
            self.hub.close(session, CloseCode.POLICY_VIOLATION, "Too many requests",
                           "rate_limited")
            return False
        return True

    def _reply(self, session: Session, request_id: object, **fields: object) -> None:
        self.hub.send(session, {**fields, "id": request_id})

    def _error(self, session: Session, code: int, msg: str, request_id: object) -> None:
        self._reply(session, request_id, error={"code": code, "msg": msg})

    def on_text(self, session: Session, text: str, now: float) -> None:
        assert isinstance(session, BinanceSession)
        try:
            msg = json.loads(text)
        except ValueError as exc:
            where = f"line {getattr(exc, 'lineno', 1)} column {getattr(exc, 'colno', 1)}"
            self._error(session, 3, f"Invalid JSON: expected value at {where}", None)
            return
        if not isinstance(msg, dict):
            self._error(session, 2, "Invalid request: expected a JSON object", None)
            return
        request_id = msg.get("id")
        if "id" not in msg or not (
                request_id is None
                or (isinstance(request_id, int) and not isinstance(request_id, bool)
                    and -(1 << 63) <= request_id < 1 << 63)
                or (isinstance(request_id, str) and _ID.match(request_id))):
            self._error(session, 2, "Invalid request: request ID must be an unsigned integer",
                        None)
            return
        method = msg.get("method")
        if method is None:
            self._error(session, 2, "Invalid request: missing field `method`", request_id)
            return
        if method not in METHODS:
            self._error(session, 2, f"Invalid request: unknown variant `{method!s}`, expected "
                        "one of `SUBSCRIBE`, `UNSUBSCRIBE`, `LIST_SUBSCRIPTIONS`, "
                        "`SET_PROPERTY`, `GET_PROPERTY`", request_id)
            return
        params = msg.get("params", [])
        if not isinstance(params, list):
            self._error(session, 2, "Invalid request: params must be a list", request_id)
            return
        with session.conn.send_lock:
            if method in ("SUBSCRIBE", "UNSUBSCRIBE"):
                if not all(isinstance(p, str) and _STREAM.match(p) for p in params):
                    self._error(session, 2, "Invalid request: invalid stream", request_id)
                    return
                streams = [str(p) for p in params]
                if method == "SUBSCRIBE":
                    merged = dict(session.streams)
                    merged.update(dict.fromkeys(streams))
                    if len(merged) > self.options.max_streams:
                        self.hub.close(session, CloseCode.POLICY_VIOLATION, "Too many streams",
                                       "too_many_streams")
                        return
                    session.streams = merged
                else:
                    for stream in streams:
                        session.streams.pop(stream, None)
                self.hub.subscriptions_changed(session)
                self._reply(session, request_id, result=None)
            elif method == "LIST_SUBSCRIPTIONS":
                self._reply(session, request_id, result=list(session.streams))
            elif method == "SET_PROPERTY":
                if len(params) != 2 or params[0] != "combined" or not isinstance(params[1], bool):
                    self._error(session, 0, "Unknown property", request_id)
                    return
                session.combined = params[1]
                self._reply(session, request_id, result=None)
            else:  # GET_PROPERTY
                if params != ["combined"]:
                    self._error(session, 0, "Unknown property", request_id)
                    return
                self._reply(session, request_id, result=session.combined)

    # -- timers and events

    def next_due(self, session: Session) -> float:
        assert isinstance(session, BinanceSession)
        return session.shutdown_close_at

    def on_timer(self, session: Session, now: float) -> None:
        assert isinstance(session, BinanceSession)
        if now >= session.shutdown_close_at:
            session.shutdown_close_at = NEVER
            self.hub.close(session, CloseCode.GOING_AWAY, "server shutdown", "server_shutdown")

    def server_shutdown(self, session: Session, now: float, grace_s: float) -> None:
        assert isinstance(session, BinanceSession)
        event: JsonObject = {"e": "serverShutdown", "E": self.hub.now_ns() // 1_000_000}
        self.hub.send(session, {"stream": "!serverShutdown", "data": event}
                      if session.combined else event)
        session.shutdown_close_at = min(session.shutdown_close_at, now + grace_s)

    # -- tickers

    def wants(self, session: Session, symbol: str) -> bool:
        assert isinstance(session, BinanceSession)
        return f"{symbol.lower()}@ticker" in session.streams

    def ticker_symbols(self, session: Session) -> list[str]:
        assert isinstance(session, BinanceSession)
        symbols = []
        for stream in list(session.streams):
            base, _, kind = stream.partition("@")
            if kind == "ticker" and base.upper() in self.markets:
                symbols.append(base.upper())
        return symbols

    def render_tick(self, session: Session, tick: Tick, cache: dict[str, Rendered]) -> Rendered:
        assert isinstance(session, BinanceSession)
        key = "combined" if session.combined else "raw"
        hit = cache.get(key)
        if hit is not None:
            return hit
        event_ms = tick.event_time_ns // 1_000_000
        change = tick.price - tick.open_24h
        data: JsonObject = {
            "e": "24hrTicker",
            "E": event_ms,
            "s": tick.symbol,
            "p": fixed(change, 8),
            "P": f"{change / tick.open_24h * 100.0:.3f}",
            "w": fixed(tick.vwap, 8),
            "x": fixed(tick.prev_close, 8),
            "c": fixed(tick.price, 8),
            "Q": fixed(tick.last_size, 8),
            "b": fixed(tick.best_bid, 8),
            "B": fixed(tick.best_bid_size, 8),
            "a": fixed(tick.best_ask, 8),
            "A": fixed(tick.best_ask_size, 8),
            "o": fixed(tick.open_24h, 8),
            "h": fixed(tick.high_24h, 8),
            "l": fixed(tick.low_24h, 8),
            "v": fixed(tick.volume_24h, 8),
            "q": fixed(tick.quote_volume_24h, 8),
            "O": event_ms - 1 - _DAY_MS,
            "C": event_ms - 1,
            "F": tick.first_trade_id,
            "L": tick.trade_id,
            "n": tick.trade_count,
        }
        stream = f"{tick.symbol.lower()}@ticker"
        raw = dumps(data)
        combined = f'{{"stream":"{stream}","data":{raw}}}'
        record: JsonObject = {"stream": stream, "data": data}
        cache["raw"] = Rendered(text=raw, record=record, record_text=combined)
        cache["combined"] = Rendered(text=combined, record=record, record_text=combined)
        return cache[key]
