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
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, TypeVar

from collectors.errors import ConfigError, ParseError
from collectors.exchanges.base import (
    Decoder,
    Field,
    Items,
    Kind,
    Parsed,
    Rule,
    Shape,
    ShapedDecoder,
    checked_string,
    copy_numbers,
    load_json,
    number,
    received_iso,
    signed_or_none,
)
from collectors.model import Metadata, PriceFeed, event_time

#: Kraken's legacy (v1 / REST) asset codes and their v2 spelling, which is canonical.
ASSET_ALIASES: dict[str, str] = {"XBT": "BTC", "XDG": "DOGE"}

# Used with fullmatch: `$` would also match before a final "\n" ("BTC/USD\n" -> BTC/USD).
_PAIR_RE = re.compile(r"([A-Z0-9]{1,20})/([A-Z0-9]{1,20})")
_SYMBOL_CACHE_MAX = 4096
#: (metadata key, ticker item field) of the optional numbers >= 0, in output order.
_META_NUMBERS = (("bid", "bid"), ("bid_size", "bid_qty"), ("ask", "ask"), ("ask_size", "ask_qty"),
                 ("vwap", "vwap"), ("high_24h", "high"), ("low_24h", "low"))
_TICKER = Kind.TICKER  # a module global: looking a member up on its Enum class is slow
ItemT = TypeVar("ItemT")  # a ticker item: a decoded JSON value, or an _Item


class _Item(Protocol):
    """A ticker item as `_SHAPE` decodes it (attributes named by the JSON keys)."""

    symbol: str
    last: float
    volume: float
    timestamp: object
    bid: float
    bid_qty: float
    ask: float
    ask_qty: float
    vwap: float
    high: float
    low: float
    change: float
    change_pct: float


class _Ticker(Protocol):
    data: list[_Item]


# Every number is required (an item without some takes the generic path), so that building the
# record needs no test per field.
_SHAPE: Shape[_Ticker] = Shape(
    fields=(Field("data", Items(Shape(
        fields=(Field("symbol", Rule.TEXT, required=True),
                Field("last", Rule.POSITIVE, required=True),
                Field("volume", Rule.NON_NEGATIVE, required=True), Field("timestamp", Rule.ANY),
                *(Field(key, Rule.NON_NEGATIVE, required=True) for _, key in _META_NUMBERS),
                Field("change", Rule.SIGNED, required=True),
                Field("change_pct", Rule.SIGNED, required=True)))),
                  required=True),),
    tag=("channel", "ticker"),
)


def from_pair(pair: str) -> str:
    """A v2 pair (`BTC/USD`) -> canonical symbol; legacy `XBT`/`XDG` map to `BTC`/`DOGE`.

    Raises ParseError for anything that is not an upper-case BASE/QUOTE pair.
    """
    m = _PAIR_RE.fullmatch(pair)
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
    ws_ping_interval_s: float | None = None  # the application ping above
    # One ack per symbol: a rejected pair leaves the others subscribed.
    max_connection_age_s: float | None = None
    resubscribe_after_reject = False
    # Tickers follow trades (event_trigger defaults to `trades`); Kraken's USD majors trade every
    # few seconds but DOGE/USD or XRP/USD can pause for minutes. Staleness is only reported.
    symbol_stale_after_s = 300.0
    # Tickers follow trades: one quiet market (or several) is reported, not reconnected (a
    # new connection's snapshot repeats the last update, so it would not even mend the stale).
    reconnect_when_all_stale = False
    ws_url_is_base = False

    def __init__(self, worker_id: str, decode: Decoder = load_json) -> None:
        self._worker_id = worker_id
        self.decode = decode
        self._req_ids = itertools.count(1)
        # symbol -> (exchange ns, content) of the newest item; content None after a restore.
        # (The mark persisted across restarts is the newest time, see dedup_mark.)
        self._last: dict[str, tuple[int, tuple[object, ...] | None]] = {}
        # Every symbol asked for (kept whatever the bound on `_last`).
        self._subscribed: set[str] = set()
        # pair -> canonical symbol, for pairs already validated (bounded, like Coinbase's).
        self._symbols: dict[str, str] = {}
        # Tickers decoded straight into their shape when the decoder can (the service's can).
        # Kraken's numbers are JSON numbers: a decimal string takes the generic path.
        self._typed = decode.shaped(_SHAPE) if isinstance(decode, ShapedDecoder) else None

    def check_symbols(self, symbols: Sequence[str]) -> list[str]:
        """Raises ConfigError("SYMBOLS", ...) for a symbol v2 would refuse by its spelling.

        Unlisted pairs are left to Kraken, which rejects each by name in its subscribe ack.
        """
        for symbol in symbols:
            m = _PAIR_RE.fullmatch(symbol)
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
        return []

    def connect_url(self, base_url: str, symbols: Sequence[str]) -> str:
        return base_url

    def subscribe_messages(self, symbols: Sequence[str]) -> list[str]:
        if not symbols:
            return []
        self._subscribed.update(symbols)
        return [json.dumps({"method": "subscribe",
                            "params": {"channel": "ticker", "symbol": list(symbols),
                                       "snapshot": True},
                            "req_id": next(self._req_ids)})]

    def ping_message(self) -> str | None:
        return json.dumps({"method": "ping", "req_id": next(self._req_ids)})

    def http_error_hint(self, status: int) -> str | None:
        return None

    def parse(self, frame: str | bytes, received_ns: int) -> Parsed:
        if self._typed is not None and (ticker := self._typed(frame)) is not None:
            return self._typed_tickers(ticker.data, received_ns)
        data = self.decode(frame)
        # v1's `[channelID, {...}, "ticker", "XBT/USD"]` and `{"event": "heartbeat"}`
        if isinstance(data, list) or (isinstance(data, dict) and "event" in data
                                      and "channel" not in data and "method" not in data):
            raise ParseError(_V1_HINT)
        if not isinstance(data, dict):
            raise ParseError(f"expected a JSON object, got {type(data).__name__}")
        msg: dict[str, object] = data
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
        """A ticker message from the generic decode: every field checked here."""
        items = msg.get("data")
        if not isinstance(items, list):
            raise ParseError("ticker message without a 'data' list")
        return self._items(items, self._ticker_item, received_ns)

    def _typed_tickers(self, items: list[_Item], received_ns: int) -> Parsed:
        """A ticker message from the shaped decode: its numbers are all there, already valid
        floats."""
        if len(items) == 1:  # the usual message; its one item's ParseError is the message's
            record = self._typed_item(items[0], received_ns)
            if record.exchange_ns and self._replayed(record):
                return Parsed(_TICKER, duplicates=1)
            return Parsed(_TICKER, (record,))
        return self._items(items, self._typed_item, received_ns)

    def _items(self, items: list[ItemT], record_of: Callable[[ItemT, int], PriceFeed],
               received_ns: int) -> Parsed:
        """One record per valid item that is not a replay; a message whose items are all
        invalid is a ParseError."""
        records: list[PriceFeed] = []
        invalid: list[str] = []
        duplicates = 0
        for item in items:
            try:
                record = record_of(item, received_ns)
            except ParseError as exc:
                invalid.append(str(exc))
                continue
            if record.exchange_ns and self._replayed(record):
                duplicates += 1
            else:
                records.append(record)
        if invalid and not records and not duplicates:
            if len(invalid) == 1:
                raise ParseError(invalid[0])
            raise ParseError(f"all {len(invalid)} ticker items invalid; first: {invalid[0]}")
        return Parsed(_TICKER, records=tuple(records), invalid=tuple(invalid),
                      duplicates=duplicates)

    def _replayed(self, record: PriceFeed) -> bool:
        """True for the exact replay of the last item seen for its symbol (see the notes)."""
        meta = record.metadata
        content = (record.price, record.volume, meta.get("bid"), meta.get("ask"))
        last_ns, last_content = self._last.get(record.symbol, (0, ()))
        if record.exchange_ns == last_ns and last_content in (None, content):
            return True
        if record.exchange_ns >= last_ns and (
                last_ns or len(self._last) < _SYMBOL_CACHE_MAX
                or record.symbol in self._subscribed):
            # Bounded like the pair cache: a flood of pairs nobody subscribed to (dropped by the
            # pipeline) must not grow this for ever (410 B each: 369 MB for 800k pairs), nor
            # take the room of the symbols subscribed to.
            self._last[record.symbol] = (record.exchange_ns, content)
        return False

    def dedup_mark(self, record: PriceFeed) -> tuple[str, int] | None:
        """The newest item time of the record's symbol (this adapter's state, after the chunk:
        Kraken's times need not arrive in order)."""
        last = self._last.get(record.symbol)
        return (record.symbol, last[0]) if last is not None and last[0] else None

    def restore_marks(self, marks: Mapping[str, int]) -> None:
        for symbol, event_ns in marks.items():
            if event_ns > self._last.get(symbol, (0, None))[0]:
                self._last[symbol] = (event_ns, None)

    def _ticker_item(self, item: object, received_ns: int) -> PriceFeed:
        if not isinstance(item, dict):
            raise ParseError(f"ticker item is a {type(item).__name__}, not an object")
        get = item.get
        pair = get("symbol")
        symbol = self._symbols.get(pair) if type(pair) is str else None
        if symbol is None:
            symbol = self._new_pair(pair)
        assert isinstance(pair, str)  # _new_pair checked it
        try:
            price = number(item, "last", positive=True)
            volume = number(item, "volume", required=False)
        except ParseError as exc:
            raise ParseError(f"{pair}: {exc}") from None
        assert price is not None  # required=True
        meta: Metadata = {}
        copy_numbers(item, _META_NUMBERS, meta)
        if (value := signed_or_none(get("change"))) is not None:
            meta["change"] = value
        if (value := signed_or_none(get("change_pct"))) is not None:
            meta["change_pct"] = value
        return self._record(symbol, price, volume, get("timestamp"), meta, received_ns)

    def _typed_item(self, t: _Item, received_ns: int) -> PriceFeed:
        pair = t.symbol
        symbol = self._symbols.get(pair)
        if symbol is None:
            symbol = self._new_pair(pair)
        # _META_NUMBERS, then change and change_pct, spelled out (same keys, same order): the
        # shape requires them all.
        meta: Metadata = {"bid": t.bid, "bid_size": t.bid_qty, "ask": t.ask,
                          "ask_size": t.ask_qty, "vwap": t.vwap, "high_24h": t.high,
                          "low_24h": t.low, "change": t.change, "change_pct": t.change_pct}
        return self._record(symbol, t.last, t.volume, t.timestamp, meta, received_ns)

    def _new_pair(self, pair: object) -> str:
        """The symbol of a pair not seen yet. Raises ParseError for a bad one."""
        pair = checked_string(pair, "symbol", max_len=41)
        symbol = from_pair(pair)
        if len(self._symbols) < _SYMBOL_CACHE_MAX:
            self._symbols[pair] = symbol
        return symbol

    def _record(self, symbol: str, price: float, volume: float | None, timestamp: object,
                meta: Metadata, received_ns: int) -> PriceFeed:
        """An item's record, after its symbol, price, volume and metadata numbers."""
        meta["received_at"] = received_at = received_iso(received_ns)
        # `timestamp` is optional (absent from 2024-era messages), see the module's notes.
        # PriceFeed positional, in its field order: keywords cost 1.8x as much here.
        if (when := event_time(timestamp, received_ns)) is not None:
            meta["timestamp_source"] = "exchange"
            return PriceFeed(symbol, price, volume, when[0], self.name, self._worker_id, meta,
                             when[1], received_ns)
        meta["timestamp_source"] = "local"
        return PriceFeed(symbol, price, volume, received_at, self.name, self._worker_id, meta,
                         0, received_ns)


# The errors that say a market is not there ("Currency pair not supported XBT/EUR"; a pair
# Kraken cannot even read gets "Currency pair not in ISO 4217-A3 format ..."). Any other failure
# of a subscribe (rate limit, internal error) is retried, not taken as a verdict on the symbol.
_NOT_LISTED = re.compile(r"currency pair|not supported|unknown (?:pair|symbol)", re.IGNORECASE)
_V1_HINT = ("a Kraken WebSocket v1 message (an array or an 'event' object): this collector "
            "speaks v2; set WS_URL to a v2 endpoint such as wss://ws.kraken.com/v2")


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
    success = msg.get("success")
    if success is True:
        return Parsed(Kind.SUBSCRIBED, subscribed=named)
    if success is not False:
        return Parsed(Kind.OTHER)  # no answer (e.g. a request echoed back)
    # A subscribe repeated on a live connection (a retry, or the remaining symbols after one was
    # rejected) must not turn subscribed symbols into "rejected" ones; it is no news either.
    if "already subscribed" in reason.lower():
        return Parsed(Kind.SUBSCRIBED, subscribed=named, error=reason)
    what = f"subscribe {named[0]}" if named else "subscribe"
    if _NOT_LISTED.search(reason):
        return Parsed(Kind.ERROR, rejected=named, error=f"{what} rejected: {reason}")
    # A rate limit, an internal error, anything else: no verdict on the market.
    return Parsed(Kind.ERROR, error=f"{what} failed: {reason}", retry_subscribe=named)
