"""Kraken spot WebSocket v2 (`kraken`): `ticker` channel -> PriceFeed records.

Protocol as documented by Kraken (checked 2026-11):
- Ticker (subscribe request, per-symbol ack, snapshot/update schema, optional `timestamp`):
  https://docs.kraken.com/api/docs/websocket-v2/ticker
  https://docs.kraken.com/exchange/api-reference/spot-websocket-v2/ticker
- Heartbeat (about once a second when no other channel update is sent):
  https://docs.kraken.com/api/docs/websocket-v2/heartbeat
- Status (sent on connect and when the trading engine status changes):
  https://docs.kraken.com/exchange/api-reference/spot-websocket-v2/status
- Ping / pong (application level, `req_id` echoed):
  https://docs.kraken.com/exchange/api-reference/spot-websocket-v2/ping
- Reconnection guide (~5 s deadline timer, replay subscriptions after reconnecting):
  https://docs.kraken.com/exchange/guides/websockets/reconnection
- v2 vs v1 (v2 spells bitcoin `BTC`, RFC 3339 times) and number precision:
  https://docs.kraken.com/exchange/api-reference/spot-websocket
  https://docs.kraken.com/api/blog/ws-v2
Real shapes used as fixtures: tests/fixtures/kraken/ (sources named there).

Notes that shape this parser:
- Canonical symbols are the v2 symbols (`BTC/USD`). v1 spellings `XBT`/`XDG` are refused by v2,
  so `check_symbols` rejects them up front and says to use `BTC`/`DOGE`.
- One subscribe message covers every symbol; Kraken answers one ack per symbol, so a bad pair is
  rejected alone (`success: false`, `error` naming it) and the others stay subscribed.
- A ticker message carries a list of items, one record each. An invalid item (the zero-price,
  epoch-zero item seen in real data) is skipped and reported in `Parsed.invalid`; the valid items
  of the same message are kept. A message whose items are all invalid raises ParseError.
- Numbers are JSON numbers "with the same precision as the engine". They are decoded with
  Python's correctly rounded float conversion, whose repr prints back exactly the decimal Kraken
  sent for any value of up to 15 significant digits (every price and quantity in the fixtures;
  trailing zeros aside); a longer value becomes the nearest double, since `PriceFeed` holds floats.
- `timestamp` is optional (absent from 2024-era messages): used when present and plausible, else
  the receive time with `timestamp_source="local"`.
- Ticker messages have no sequence number, and Kraken says timestamps are not unique and not
  ordered identifiers. So only an exact replay is dropped: an item with the same `timestamp` and
  the same content as the last one seen for its symbol (the snapshot after a reconnect repeats
  the last update). Same time with other content, or an older time, is a distinct update and
  kept. After a restart only the last time is known (persisted mark), so an item at exactly that
  time is taken as the replay. Without `timestamp` nothing can tell, and the item is passed on.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Mapping, Sequence

from collectors.errors import ConfigError, ParseError
from collectors.exchanges.base import (
    Decoder,
    Kind,
    Parsed,
    copy_numbers,
    load_json,
    load_object,
    number,
    optional_number,
    received_iso,
    string,
)
from collectors.model import Metadata, PriceFeed, parse_iso, plausible_event_ns

#: Kraken's legacy (v1 / REST) asset codes and their v2 spelling, which is canonical.
ASSET_ALIASES: dict[str, str] = {"XBT": "BTC", "XDG": "DOGE"}

_PAIR_RE = re.compile(r"^([A-Z0-9]{1,20})/([A-Z0-9]{1,20})$")
_SYMBOL_CACHE_MAX = 4096
#: (metadata key, ticker item field) of the optional numbers >= 0, in output order.
_META_NUMBERS = (("bid", "bid"), ("bid_size", "bid_qty"), ("ask", "ask"), ("ask_size", "ask_qty"),
                 ("vwap", "vwap"), ("high_24h", "high"), ("low_24h", "low"))


def from_pair(pair: str) -> str:
    """A v2 pair (`BTC/USD`) -> canonical symbol; legacy `XBT`/`XDG` map to `BTC`/`DOGE`.

    Raises ParseError for anything that is not an upper-case BASE/QUOTE pair.
    """
    m = _PAIR_RE.match(pair)
    if m is None:
        raise ParseError(f"not a canonical BASE/QUOTE pair: {pair[:40]!r}")
    base, quote = (ASSET_ALIASES.get(part, part) for part in m.groups())
    return f"{base}/{quote}"


class KrakenAdapter:
    """Pure parser for Kraken WebSocket v2; numbers its requests with an increasing `req_id`."""

    name = "kraken"
    default_ws_url = "wss://ws.kraken.com/v2"
    default_symbols: tuple[str, ...] = ("BTC/USD", "ETH/USD", "SOL/USD", "XRP/USD", "DOGE/USD")
    # Heartbeats arrive about once a second whenever nothing else is sent, and a quiet connection
    # is pinged every 5 s: ten seconds without any frame is a dead connection.
    liveness_timeout_s = 10.0
    # Kraken advises a ~5 s deadline: ping when nothing arrived for that long (a live server
    # answers `pong`, and its heartbeats normally make the ping unnecessary).
    app_ping_interval_s: float | None = 5.0
    # One ack per symbol: a rejected pair leaves the others subscribed.
    max_connection_age_s: float | None = None
    resubscribe_after_reject = False
    # Tickers follow trades (event_trigger defaults to `trades`); Kraken's USD majors trade every
    # few seconds but DOGE/USD or XRP/USD can pause for minutes. Staleness is only reported.
    symbol_stale_after_s = 300.0

    def __init__(self, worker_id: str, decode: Decoder = load_json) -> None:
        self._worker_id = worker_id
        self.decode = decode
        self._req_ids = itertools.count(1)
        # symbol -> (exchange ns, content) of the newest item; content None after a restore.
        # (The mark persisted across restarts is the newest time, see dedup_mark.)
        self._last: dict[str, tuple[int, tuple[object, ...] | None]] = {}
        # pair -> canonical symbol, for pairs already validated (bounded, like Coinbase's).
        self._symbols: dict[str, str] = {}

    def check_symbols(self, symbols: Sequence[str]) -> None:
        """Raises ConfigError("SYMBOLS", ...) for a symbol v2 would refuse by its spelling.

        Unlisted pairs are left to Kraken, which rejects each by name in its subscribe ack.
        """
        for symbol in symbols:
            m = _PAIR_RE.match(symbol)
            if m is None:
                raise ConfigError("SYMBOLS", f"{symbol!r} is not a BASE/QUOTE symbol",
                                  "e.g. BTC/USD")
            fixed = "/".join(ASSET_ALIASES.get(part, part) for part in m.groups())
            if fixed != symbol:
                legacy = ", ".join(f"{old} is {new}" for old, new in ASSET_ALIASES.items()
                                   if old in m.groups())
                raise ConfigError("SYMBOLS",
                                  f"{symbol} uses Kraken's legacy asset code ({legacy}), which "
                                  "WebSocket v2 rejects", f"use {fixed}")

    def connect_url(self, base_url: str, symbols: Sequence[str]) -> str:
        return base_url

    def subscribe_messages(self, symbols: Sequence[str]) -> list[str]:
        if not symbols:
            return []
        return [json.dumps({"method": "subscribe",
                            "params": {"channel": "ticker", "symbol": list(symbols),
                                       "snapshot": True},
                            "req_id": next(self._req_ids)})]

    def ping_message(self) -> str | None:
        return json.dumps({"method": "ping", "req_id": next(self._req_ids)})

    def http_error_hint(self, status: int) -> str | None:
        return None

    def parse(self, frame: str | bytes, received_ns: int) -> Parsed:
        msg = load_object(frame, self.decode)
        channel = msg.get("channel")
        method = msg.get("method")
        if channel == "ticker":
            return self._tickers(msg, received_ns)
        if channel == "heartbeat":
            return Parsed(Kind.HEARTBEAT)
        if channel == "status":
            return _status(msg)
        if method == "pong":
            return Parsed(Kind.PONG)
        if method == "subscribe":
            return _subscribe_ack(msg)
        error = msg.get("error")
        if isinstance(error, str) and error:
            # e.g. {"error": "Malformed request", "method": "error", ...}: names no symbol.
            return Parsed(Kind.ERROR, error=error[:300])
        if not isinstance(channel, str) and not isinstance(method, str):
            raise ParseError("message has neither a string 'channel' nor a string 'method'")
        return Parsed(Kind.OTHER)

    def _tickers(self, msg: dict[str, object], received_ns: int) -> Parsed:
        items = msg.get("data")
        if not isinstance(items, list):
            raise ParseError("ticker message without a 'data' list")
        records: list[PriceFeed] = []
        invalid: list[str] = []
        duplicates = 0
        for item in items:
            try:
                record = self._ticker_item(item, received_ns)
            except ParseError as exc:
                invalid.append(str(exc))
                continue
            if record.exchange_ns:
                content = (record.price, record.volume, record.metadata.get("bid"),
                           record.metadata.get("ask"))
                last_ns, last_content = self._last.get(record.symbol, (0, ()))
                if record.exchange_ns == last_ns and last_content in (None, content):
                    duplicates += 1
                    continue
                if record.exchange_ns >= last_ns:
                    self._last[record.symbol] = (record.exchange_ns, content)
            records.append(record)
        if invalid and not records and not duplicates:
            if len(invalid) == 1:
                raise ParseError(invalid[0])
            raise ParseError(f"all {len(invalid)} ticker items invalid; first: {invalid[0]}")
        return Parsed(Kind.TICKER, records=tuple(records), invalid=tuple(invalid),
                      duplicates=duplicates)

    def dedup_mark(self, record: PriceFeed) -> tuple[str, int] | None:
        return (record.symbol, record.exchange_ns) if record.exchange_ns else None

    def restore_marks(self, marks: Mapping[str, int]) -> None:
        for symbol, event_ns in marks.items():
            if event_ns > self._last.get(symbol, (0, None))[0]:
                self._last[symbol] = (event_ns, None)

    def _ticker_item(self, item: object, received_ns: int) -> PriceFeed:
        if not isinstance(item, dict):
            raise ParseError(f"ticker item is a {type(item).__name__}, not an object")
        pair = string(item, "symbol", max_len=41)
        symbol = self._symbols.get(pair)
        if symbol is None:
            symbol = from_pair(pair)
            if len(self._symbols) < _SYMBOL_CACHE_MAX:
                self._symbols[pair] = symbol
        try:
            price = number(item, "last", positive=True)
            volume = number(item, "volume", required=False)
        except ParseError as exc:
            raise ParseError(f"{pair}: {exc}") from None
        assert price is not None  # required=True

        timestamp, exchange_ns, source = _event_time(item.get("timestamp"), received_ns)
        meta: Metadata = {}
        copy_numbers(item, _META_NUMBERS, meta)
        for key in ("change", "change_pct"):
            value = optional_number(item, key, signed=True)
            if value is not None:
                meta[key] = value
        meta["received_at"] = received_iso(received_ns)
        meta["timestamp_source"] = source
        return PriceFeed(symbol=symbol, price=price, volume=volume, timestamp=timestamp,
                         source=self.name, worker_id=self._worker_id, metadata=meta,
                         exchange_ns=exchange_ns, received_ns=received_ns)


def _event_time(raw: object, received_ns: int) -> tuple[str, int, str]:
    """(timestamp, exchange ns or 0, timestamp_source) for a ticker item's `timestamp`."""
    if isinstance(raw, str):
        try:
            text, ns = parse_iso(raw)
        except ValueError:
            pass
        else:
            if plausible_event_ns(ns, received_ns):
                return text, ns, "exchange"
    return received_iso(received_ns), 0, "local"


def _status(msg: dict[str, object]) -> Parsed:
    """`system` other than `online` (maintenance, cancel_only, post_only) becomes `error`."""
    data = msg.get("data")
    entries = data if isinstance(data, list) else [data]
    for entry in entries:
        if isinstance(entry, dict):
            system = entry.get("system")
            if isinstance(system, str) and system != "online":
                return Parsed(Kind.STATUS, error=f"kraken system status: {system[:40]}")
    return Parsed(Kind.STATUS)


def _subscribe_ack(msg: dict[str, object]) -> Parsed:
    """One ack per symbol: success -> SUBSCRIBED; failure -> ERROR rejecting that symbol."""
    result = msg.get("result")
    symbol = msg.get("symbol")
    if not isinstance(symbol, str) and isinstance(result, dict):
        symbol = result.get("symbol")
    named = (symbol,) if isinstance(symbol, str) and 0 < len(symbol) <= 64 else ()
    error = msg.get("error")
    reason = error[:300] if isinstance(error, str) and error else "no reason given"
    # A subscribe repeated on a live connection (the collector re-sends the remaining symbols
    # after one was rejected) must not turn subscribed symbols into "rejected" ones.
    if msg.get("success") is True or "already subscribed" in reason.lower():
        return Parsed(Kind.SUBSCRIBED, subscribed=named)
    what = f"subscribe {named[0]}" if named else "subscribe"
    return Parsed(Kind.ERROR, rejected=named, error=f"{what} rejected: {reason}")
