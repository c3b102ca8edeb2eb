"""Coinbase Exchange market-data feed (`wss://ws-feed.exchange.coinbase.com`), simulated.

Follows the venue's documentation:
- https://docs.cdp.coinbase.com/exchange/websocket-feed/overview : subscribe within 5 s or be
  disconnected; `subscriptions` ack; `error` messages; channel objects with their own products.
- https://docs.cdp.coinbase.com/exchange/websocket-feed/channels : `ticker` fields (numbers as
  strings) and the `heartbeat` channel (one per product per second: sequence, last_trade_id, time).
and the real captures in shared/samples/coinbase_exchange.jsonl (first tickers after subscribing
carry the last trade's time, which can be tens of seconds old; an invalid product voids the whole
request and is followed by the unchanged `subscriptions` list; "No channels provided").

Simulator choices where the docs are silent: only the `ticker` and `heartbeat` channels exist
(others get "<name> is not a valid channel"); malformed JSON gets an error with reason
"malformed JSON"; the subscribe deadline closes with 1008 "subscribe timeout".
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
    fixed,
    iso_us,
    trimmed,
)
from collectors.simulator.market import MarketSpec, Tick
from collectors.simulator.wsserver import CloseCode, Connection

CHANNELS = ("ticker", "heartbeat")


def _spec(symbol: str, price: float, decimals: int, size: float, volume: float) -> MarketSpec:
    return MarketSpec(symbol=symbol, price=price, price_decimals=decimals, trade_size=size,
                      daily_volume=volume)


MARKETS: Mapping[str, MarketSpec] = {spec.symbol: spec for spec in (
    _spec("BTC-USD", 65000.0, 2, 0.02, 12000.0),
    _spec("ETH-USD", 3200.0, 2, 0.3, 150000.0),
    _spec("SOL-USD", 150.0, 2, 5.0, 2_500_000.0),
    _spec("XRP-USD", 0.55, 4, 900.0, 90_000_000.0),
    _spec("DOGE-USD", 0.15, 5, 4000.0, 400_000_000.0),
    _spec("LTC-USD", 80.0, 2, 4.0, 300_000.0),
    _spec("BTC-USDT", 65000.0, 2, 0.005, 450.0),
    _spec("ETH-BTC", 0.05, 5, 0.5, 9000.0),
    _spec("ADA-USD", 0.45, 4, 1200.0, 60_000_000.0),
    _spec("AVAX-USD", 35.0, 2, 12.0, 800_000.0),
    _spec("BTC-EUR", 60000.0, 2, 0.01, 900.0),
    _spec("ETH-EUR", 2950.0, 2, 0.2, 9000.0),
)}


class CoinbaseSession(Session):
    def __init__(self, conn: Connection, now: float) -> None:
        super().__init__(conn, now)
        self.channels: dict[str, dict[str, None]] = {name: {} for name in CHANNELS}
        self.subscribe_deadline: float | None = None
        self.next_heartbeat = NEVER

    def topics(self) -> list[str]:
        return [f"{name}:{product}" for name in CHANNELS for product in self.channels[name]]


class Coinbase(Venue):
    name = "coinbase"
    path = ""

    def new_session(self, conn: Connection, now: float) -> Session:
        return CoinbaseSession(conn, now)

    def on_open(self, session: Session, now: float) -> None:
        assert isinstance(session, CoinbaseSession)
        session.subscribe_deadline = now + self.options.subscribe_timeout_s

    # -- client messages

    def _error(self, session: Session, reason: str) -> None:
        self.hub.send(session, {"type": "error", "message": "Failed to subscribe",
                                "reason": reason})

    def _ack(self, session: CoinbaseSession) -> None:
        channels = [{"name": name, "product_ids": list(session.channels[name])}
                    for name in CHANNELS if session.channels[name]]
        self.hub.send(session, {"type": "subscriptions", "channels": channels})

    def on_text(self, session: Session, text: str, now: float) -> None:
        assert isinstance(session, CoinbaseSession)
        try:
            msg = json.loads(text)
        except ValueError:
            self._error(session, "malformed JSON")
            return
        kind = msg.get("type") if isinstance(msg, dict) else None
        if kind not in ("subscribe", "unsubscribe"):
            self._error(session, f"{kind!s} is not a valid message type")
            return
        assert isinstance(msg, dict)
        if kind == "subscribe":
            session.subscribe_deadline = None
        request = self._parse_request(msg)
        with session.conn.send_lock:
            if isinstance(request, str):
                # The whole request is void: report, then the unchanged subscription list.
                self._error(session, request)
                self._ack(session)
                return
            if kind == "subscribe":
                self._subscribe(session, request, now)
            else:
                for name, products in request:
                    for product in products:
                        session.channels[name].pop(product, None)
                self.hub.subscriptions_changed(session)
                self._ack(session)

    def _parse_request(self, msg: dict[str, object]) -> list[tuple[str, list[str]]] | str:
        """[(channel, products)] or the error reason that voids the request."""
        root = msg.get("product_ids", [])
        if not isinstance(root, list):
            return "product_ids must be a list"
        channels = msg.get("channels")
        if not isinstance(channels, list) or not channels:
            return "No channels provided"
        request: list[tuple[str, list[str]]] = []
        for channel in channels:
            if isinstance(channel, str):
                name: object = channel
                products: list[object] = list(root)
            elif isinstance(channel, dict):
                name = channel.get("name")
                own = channel.get("product_ids", [])
                if not isinstance(own, list):
                    return "product_ids must be a list"
                products = list(root) + [p for p in own if p not in root]
            else:
                return f"{channel!s} is not a valid channel"
            if name not in CHANNELS:
                return f"{name!s} is not a valid channel"
            if not products:
                return "No product ids provided"
            for product in products:
                if not isinstance(product, str) or product not in self.markets:
                    return f"{product!s} is not a valid product"
            request.append((str(name), [str(p) for p in products]))
        return request

    def _subscribe(self, session: CoinbaseSession, request: list[tuple[str, list[str]]],
                   now: float) -> None:
        # Like the real feed, each newly subscribed product gets its current ticker at once.
        # Read before publishing the change, which may start a burst of newer tickers.
        initial: list[Tick] = []
        for name, products in request:
            for product in products:
                if product not in session.channels[name]:
                    session.channels[name][product] = None
                    if name == "ticker":
                        initial.append(self.hub.market(product).current)
        if session.channels["heartbeat"] and session.next_heartbeat == NEVER:
            session.next_heartbeat = now + self.options.heartbeat_interval_s
        self.hub.subscriptions_changed(session)
        self._ack(session)
        for tick in initial:
            self.hub.send_ticker(session, tick, self.render_tick(session, tick, {}))

    # -- timers (scheduler thread)

    def next_due(self, session: Session) -> float:
        assert isinstance(session, CoinbaseSession)
        deadline = session.subscribe_deadline
        return min(session.next_heartbeat, NEVER if deadline is None else deadline)

    def on_timer(self, session: Session, now: float) -> None:
        assert isinstance(session, CoinbaseSession)
        deadline = session.subscribe_deadline
        if deadline is not None and now >= deadline:
            session.subscribe_deadline = None
            self.hub.close(session, CloseCode.POLICY_VIOLATION, "subscribe timeout",
                           "subscribe_timeout")
            return
        if now < session.next_heartbeat:
            return
        products = list(session.channels["heartbeat"])
        # A burst's tickers are generated ahead of sending; a heartbeat's (newer) sequence in
        # between would make them look late, so heartbeats pause during bursts.
        if products and not (session.bursting or session.streaming):
            stamp = iso_us(self.hub.now_ns())
            for product in products:
                tick = self.hub.market(product).current
                self.hub.send(session, {"type": "heartbeat", "sequence": tick.sequence,
                                        "last_trade_id": tick.trade_id, "product_id": product,
                                        "time": stamp})
        interval = self.options.heartbeat_interval_s
        session.next_heartbeat = max(session.next_heartbeat + interval, now) if products else NEVER

    # -- tickers

    def wants(self, session: Session, symbol: str) -> bool:
        assert isinstance(session, CoinbaseSession)
        return symbol in session.channels["ticker"]

    def ticker_symbols(self, session: Session) -> list[str]:
        assert isinstance(session, CoinbaseSession)
        return list(session.channels["ticker"])

    def render_tick(self, session: Session, tick: Tick, cache: dict[str, Rendered]) -> Rendered:
        hit = cache.get("ticker")
        if hit is not None:
            return hit
        decimals = self.markets[tick.symbol].price_decimals
        message: JsonObject = {
            "type": "ticker",
            "sequence": tick.sequence,
            "product_id": tick.symbol,
            "price": trimmed(tick.price, decimals),
            "open_24h": trimmed(tick.open_24h, decimals),
            "volume_24h": fixed(tick.volume_24h, 8),
            "low_24h": trimmed(tick.low_24h, decimals),
            "high_24h": trimmed(tick.high_24h, decimals),
            "volume_30d": fixed(tick.volume_30d, 8),
            "best_bid": fixed(tick.best_bid, decimals),
            "best_bid_size": fixed(tick.best_bid_size, 8),
            "best_ask": fixed(tick.best_ask, decimals),
            "best_ask_size": fixed(tick.best_ask_size, 8),
            "side": tick.side,
            "time": iso_us(tick.trade_time_ns),
            "trade_id": tick.trade_id,
            "last_size": trimmed(tick.last_size, 8),
        }
        text = dumps(message)
        rendered = Rendered(text=text, record=message, record_text=text)
        cache["ticker"] = rendered
        return rendered
