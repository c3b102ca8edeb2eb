"""Coinbase Exchange WebSocket feed: `ticker` + `heartbeat` channels -> PriceFeed records.

Protocol as documented by Coinbase (checked 2026-11):
- Overview, subscribe within 5 s, errors: https://docs.cdp.coinbase.com/exchange/websocket-feed/overview
- Channels (ticker fields, heartbeat): https://docs.cdp.coinbase.com/exchange/websocket-feed/channels
Real shapes used as fixtures: tests/fixtures/coinbase/ (sources named there).

Notes that shape this parser:
- every number is a decimal string; `best_bid_size`/`best_ask_size` are absent in older messages;
- `time` is the last match's time: absent, a `0001-01-01` placeholder, or old in the first ticker
  after subscribing. Absent or implausible -> receive time with `timestamp_source="local"`;
- `sequence` is per product and shared by all channels, so gaps are normal; a ticker whose
  sequence is at or below the last one seen is a duplicate (e.g. the replay after a reconnect).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence

from collectors.errors import ParseError
from collectors.exchanges.base import (
    Decoder,
    Kind,
    Parsed,
    copy_numbers,
    integer,
    load_json,
    load_object,
    number,
    received_iso,
    string,
)
from collectors.model import Metadata, PriceFeed, canonical_symbol_ok, parse_iso, plausible_event_ns

_PRODUCT_RE = re.compile(r"^([A-Z0-9]{1,20})-([A-Z0-9]{1,20})$")
_INVALID_PRODUCT_RE = re.compile(r"^\s*(\S*)\s+is not a valid product", re.IGNORECASE)
_SYMBOL_CACHE_MAX = 4096
#: (metadata key, ticker field) of the optional decimal-string fields, in output order.
_META_NUMBERS = (("bid", "best_bid"), ("bid_size", "best_bid_size"), ("ask", "best_ask"),
                 ("ask_size", "best_ask_size"), ("open_24h", "open_24h"),
                 ("high_24h", "high_24h"), ("low_24h", "low_24h"),
                 ("volume_30d", "volume_30d"), ("last_size", "last_size"))


def to_product(symbol: str) -> str:
    """`BTC/USD` -> `BTC-USD` (Coinbase spells markets with a dash; same asset codes)."""
    return symbol.replace("/", "-")


def from_product(product_id: str) -> str:
    """`BTC-USD` -> `BTC/USD`. Raises ParseError for anything that is not a product id."""
    m = _PRODUCT_RE.match(product_id)
    if m is None:
        raise ParseError(f"not a Coinbase product id: {product_id[:40]!r}")
    return f"{m.group(1)}/{m.group(2)}"


class CoinbaseAdapter:
    """Pure parser for the Coinbase Exchange feed; keeps the last ticker sequence per product."""

    name = "coinbase"
    default_ws_url = "wss://ws-feed.exchange.coinbase.com"
    default_symbols: tuple[str, ...] = ("BTC/USD", "ETH/USD", "SOL/USD", "XRP/USD", "DOGE/USD")
    # Heartbeats arrive once a second per product: 10 s of total silence is a dead connection.
    liveness_timeout_s = 10.0
    app_ping_interval_s: float | None = None
    # "Failed to subscribe ... is not a valid product" voids the whole request.
    max_connection_age_s: float | None = None
    resubscribe_after_reject = True
    # Tickers follow trades; a liquid market is never quiet for 2 minutes, a thin one may be.
    symbol_stale_after_s = 120.0

    def __init__(self, worker_id: str, decode: Decoder = load_json) -> None:
        self._worker_id = worker_id
        self.decode = decode
        self._last_sequence: dict[str, int] = {}
        # product id -> canonical symbol, for ids already validated (bounded: hostile input
        # cannot grow it without limit; past the bound ids are simply validated every time).
        self._symbols: dict[str, str] = {}

    def check_symbols(self, symbols: Sequence[str]) -> None:
        """Coinbase validates products itself (error reply naming the product)."""

    def connect_url(self, base_url: str, symbols: Sequence[str]) -> str:
        return base_url

    def subscribe_messages(self, symbols: Sequence[str]) -> list[str]:
        if not symbols:
            return []
        return [json.dumps({"type": "subscribe",
                            "product_ids": [to_product(s) for s in symbols],
                            "channels": ["ticker", "heartbeat"]})]

    def ping_message(self) -> str | None:
        return None

    def http_error_hint(self, status: int) -> str | None:
        return None

    def parse(self, frame: str | bytes, received_ns: int) -> Parsed:
        msg = load_object(frame, self.decode)
        kind = msg.get("type")
        if kind == "ticker":
            return self._ticker(msg, received_ns)
        if kind == "heartbeat":
            return Parsed(Kind.HEARTBEAT)
        if kind == "subscriptions":
            return Parsed(Kind.SUBSCRIBED, subscribed=_subscribed_tickers(msg))
        if kind == "error":
            return _error(msg)
        if not isinstance(kind, str):
            raise ParseError("message has no string 'type'")
        return Parsed(Kind.OTHER)

    def dedup_mark(self, record: PriceFeed) -> tuple[str, int] | None:
        sequence = record.metadata.get("sequence")
        if isinstance(sequence, int) and not isinstance(sequence, bool):
            return to_product(record.symbol), sequence
        return None

    def restore_marks(self, marks: Mapping[str, int]) -> None:
        for product, sequence in marks.items():
            if sequence > self._last_sequence.get(product, -1):
                self._last_sequence[product] = sequence

    def _ticker(self, msg: dict[str, object], received_ns: int) -> Parsed:
        product = string(msg, "product_id", max_len=41)
        symbol = self._symbols.get(product)
        if symbol is None:
            symbol = from_product(product)
            if not canonical_symbol_ok(symbol):
                raise ParseError(f"bad product id {product!r}")
            if len(self._symbols) < _SYMBOL_CACHE_MAX:
                self._symbols[product] = symbol
        price = number(msg, "price", positive=True)
        assert price is not None  # required=True
        volume = number(msg, "volume_24h", required=False)
        sequence = integer(msg, "sequence")
        if sequence is not None:
            last = self._last_sequence.get(product)
            if last is not None and sequence <= last:
                return Parsed(Kind.TICKER, duplicates=1)

        timestamp, exchange_ns, source = _event_time(msg.get("time"), received_ns)
        meta: Metadata = {}
        copy_numbers(msg, _META_NUMBERS, meta)
        if sequence is not None:
            meta["sequence"] = sequence
        trade_id = msg.get("trade_id")
        if isinstance(trade_id, int) and not isinstance(trade_id, bool):
            meta["trade_id"] = trade_id
        side = msg.get("side")
        if side in ("buy", "sell"):
            meta["side"] = side
        meta["received_at"] = received_iso(received_ns)
        meta["timestamp_source"] = source

        # Only a record that is fully valid moves the sequence forward.
        if sequence is not None:
            self._last_sequence[product] = sequence
        record = PriceFeed(symbol=symbol, price=price, volume=volume, timestamp=timestamp,
                           source=self.name, worker_id=self._worker_id, metadata=meta,
                           exchange_ns=exchange_ns, received_ns=received_ns)
        return Parsed(Kind.TICKER, records=(record,))


def _event_time(raw: object, received_ns: int) -> tuple[str, int, str]:
    """(timestamp, exchange ns or 0, timestamp_source) for a ticker's `time` field."""
    if isinstance(raw, str):
        try:
            text, ns = parse_iso(raw)
        except ValueError:
            pass
        else:
            if plausible_event_ns(ns, received_ns):
                return text, ns, "exchange"
    return received_iso(received_ns), 0, "local"


def _subscribed_tickers(msg: dict[str, object]) -> tuple[str, ...]:
    """Canonical symbols the ack lists on the ticker channel."""
    channels = msg.get("channels")
    if not isinstance(channels, list):
        raise ParseError("subscriptions message without a 'channels' list")
    out: list[str] = []
    for channel in channels:
        if isinstance(channel, dict) and channel.get("name") == "ticker":
            products = channel.get("product_ids")
            if isinstance(products, list):
                out.extend(from_product(p) for p in products if isinstance(p, str))
    return tuple(out)


def _error(msg: dict[str, object]) -> Parsed:
    message = msg.get("message")
    reason = msg.get("reason")
    text = "; ".join(str(x)[:200] for x in (message, reason) if isinstance(x, str) and x)
    rejected: tuple[str, ...] = ()
    if isinstance(reason, str):
        m = _INVALID_PRODUCT_RE.match(reason)
        if m and m.group(1):
            try:
                rejected = (from_product(m.group(1)),)
            except ParseError:
                rejected = ()
    return Parsed(Kind.ERROR, rejected=rejected, error=text or "error without a message")
