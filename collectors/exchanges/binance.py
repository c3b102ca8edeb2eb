"""Binance spot (`binance`) and Binance.US (`binanceus`): `<symbol>@ticker` streams -> PriceFeed.

One adapter class, two venues that speak the same stream protocol but list different markets.

Protocol as documented by the venues (checked 2026-11):
- Binance spot WebSocket Streams (endpoints, combined streams, 24 h limit, `serverShutdown`,
  ping every 20 s / pong within a minute, 1024 streams per connection, `24hrTicker` payload):
  https://developers.binance.com/docs/binance-spot-api-docs/web-socket-streams
  https://developers.binance.com/en/docs/products/spot/web-socket-streams
  https://github.com/binance/binance-spot-api-docs/blob/master/web-socket-streams.md
  (subscribe answer `{"result": null, "id": N}`, `{"code", "msg"}` errors)
- Binance `serverShutdown` event shape (WebSocket API connection events page):
  https://developers.binance.com/docs/binance-spot-api-docs/websocket-api/connection-events
- Binance.US WebSocket Streams (same payloads; `stream.binance.us:9443`; its page says the server
  pings every 3 minutes and drops a connection without a pong within 10 minutes):
  https://github.com/binance-us/binance-us-api-docs/blob/master/web-socket-streams.md
Real shapes used as fixtures: tests/fixtures/binance/ and tests/fixtures/binanceus/.

Notes that shape this parser:
- Streams go in the URL (`/stream?streams=btcusdt@ticker/...`, lowercase), so nothing is sent
  after connecting; every payload arrives wrapped as `{"stream": ..., "data": {...}}`. A raw
  payload (the `/ws/` form) is accepted too.
- `24hrTicker`: `c` is the last price; `p` is the 24 h price *change* and is never the price.
  All prices and quantities are decimal strings. `E` is the event time in milliseconds (we do not
  ask for `timeUnit=MICROSECOND`), kept with exactly millisecond precision.
- Binance has no ticker sequence number; `E` identifies a symbol's updates. During a handover
  (the 24 h cut, `serverShutdown`) the old and the new connection both deliver for a while and
  their frames interleave, so an update is a duplicate when its `E` was already seen for that
  symbol within the last `DEDUP_WINDOW_MS`; one older than that window is dropped as late. A
  distinct update that merely arrives out of order is kept: the overlap loses nothing. The
  newest `E` never moves more than `NEWEST_AHEAD_MS` past our receive time, so one bad `E`
  (hours ahead) cannot make every real update after it "late"; an `E` more than
  `MAX_EVENT_AHEAD_NS` ahead is not used as the record's time at all.
- Symbols map both ways through explicit tables, never by string surgery on the venue's side
  (`BTCUSDC` and `BTCUSDS` cannot be told apart that way): a table of well-known (base, quote)
  markets per venue, plus each configured `BASE/QUOTE` symbol, whose venue name is `BASEQUOTE`
  and which joins the reverse table as configured (two configured symbols with one venue name
  are refused at start). A USDT market is never `.../USD`: binance.com lists no USD-quoted
  market at all (refused at start, pointing at binanceus); binance.us lists both `BTCUSD` and
  `BTCUSDT`.
- Binance says nothing about a stream name it does not know (no error, just no data), and lists
  far more markets than any table here: a configured symbol outside the table is logged at
  start as unverified, and the parser's "no first message within 30 s" check names it if the
  venue sends nothing for it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from collectors.errors import ConfigError, ParseError
from collectors.exchanges.base import (
    Decoder,
    Field,
    Kind,
    Parsed,
    Rule,
    Shape,
    ShapedDecoder,
    checked_string,
    copy_numbers,
    load_json,
    load_object,
    number,
    received_iso,
    signed_or_none,
    string,
)
from collectors.model import (
    MAX_EVENT_AHEAD_NS,
    MIN_EVENT_NS,
    Metadata,
    PriceFeed,
    canonical_symbol_ok,
    iso_from_ms,
)

Market = tuple[str, str]

# binance.com spot markets (base, quote). USDT is Tether, a different asset from USD: there is no
# USD-quoted market on binance.com.
BINANCE_COM_MARKETS: tuple[Market, ...] = (
    ("BTC", "USDT"), ("ETH", "USDT"), ("BNB", "USDT"), ("SOL", "USDT"), ("XRP", "USDT"),
    ("DOGE", "USDT"), ("ADA", "USDT"), ("TRX", "USDT"), ("AVAX", "USDT"), ("LINK", "USDT"),
    ("DOT", "USDT"), ("LTC", "USDT"), ("BCH", "USDT"), ("SHIB", "USDT"), ("UNI", "USDT"),
    ("ATOM", "USDT"), ("XLM", "USDT"), ("ETC", "USDT"), ("FIL", "USDT"), ("NEAR", "USDT"),
    ("APT", "USDT"), ("ARB", "USDT"), ("OP", "USDT"), ("SUI", "USDT"), ("PEPE", "USDT"),
    ("TON", "USDT"), ("ICP", "USDT"), ("HBAR", "USDT"), ("AAVE", "USDT"), ("INJ", "USDT"),
    ("ALGO", "USDT"), ("VET", "USDT"), ("SEI", "USDT"), ("TIA", "USDT"), ("WLD", "USDT"),
    ("USDC", "USDT"), ("FDUSD", "USDT"),
    ("BTC", "USDC"), ("ETH", "USDC"), ("SOL", "USDC"), ("BNB", "USDC"), ("XRP", "USDC"),
    ("DOGE", "USDC"),
    ("BTC", "FDUSD"), ("ETH", "FDUSD"),
    ("ETH", "BTC"), ("BNB", "BTC"), ("SOL", "BTC"), ("XRP", "BTC"),
    ("BTC", "EUR"), ("ETH", "EUR"),
)

# binance.us markets (base, quote): USD-quoted markets and, separately, USDT/USDC-quoted ones.
BINANCE_US_MARKETS: tuple[Market, ...] = (
    ("BTC", "USD"), ("ETH", "USD"), ("SOL", "USD"), ("XRP", "USD"), ("DOGE", "USD"),
    ("ADA", "USD"), ("LTC", "USD"), ("BCH", "USD"), ("LINK", "USD"), ("DOT", "USD"),
    ("AVAX", "USD"), ("UNI", "USD"), ("ATOM", "USD"), ("XLM", "USD"), ("ALGO", "USD"),
    ("ETC", "USD"), ("FIL", "USD"), ("SHIB", "USD"), ("BNB", "USD"), ("HBAR", "USD"),
    ("VET", "USD"), ("AAVE", "USD"), ("NEAR", "USD"), ("USDT", "USD"), ("USDC", "USD"),
    ("BTC", "USDT"), ("ETH", "USDT"), ("SOL", "USDT"), ("XRP", "USDT"), ("DOGE", "USDT"),
    ("ADA", "USDT"), ("BNB", "USDT"), ("LTC", "USDT"), ("LINK", "USDT"), ("AVAX", "USDT"),
    ("BTC", "USDC"), ("ETH", "USDC"), ("SOL", "USDC"),
)


@dataclass(frozen=True, slots=True)
class BinanceVenue:
    """What differs between binance.com and binance.us: name, endpoint, market table."""

    name: str
    ws_url: str
    markets: tuple[Market, ...]
    default_symbols: tuple[str, ...]


BINANCE_COM = BinanceVenue(
    name="binance",
    ws_url="wss://stream.binance.com:9443",
    markets=BINANCE_COM_MARKETS,
    default_symbols=("BTC/USDT", "ETH/USDT", "SOL/USDT", "XRP/USDT", "DOGE/USDT"),
)
BINANCE_US = BinanceVenue(
    name="binanceus",
    ws_url="wss://stream.binance.us:9443",
    markets=BINANCE_US_MARKETS,
    default_symbols=("BTC/USD", "ETH/USD", "SOL/USD", "XRP/USD", "DOGE/USD"),
)

_TICKER_SUFFIX = "@ticker"
#: (metadata key, ticker field) of the optional decimal-string fields >= 0, in output order.
_META_NUMBERS = (("quote_volume", "q"), ("bid", "b"), ("bid_size", "B"), ("ask", "a"),
                 ("ask_size", "A"), ("open_24h", "o"), ("high_24h", "h"), ("low_24h", "l"))
_TICKER = Kind.TICKER  # a module global: looking a member up on its Enum class is slow
_SYMBOL_CACHE_MAX = 4096


class _Payload(Protocol):
    """A `24hrTicker` payload as `_SHAPE` decodes it (attributes named by the JSON keys)."""

    s: str
    c: float
    v: float
    E: object
    q: float
    b: float
    B: float
    a: float
    A: float
    o: float
    h: float
    l: float  # noqa: E741 (Binance's key for the 24 h low)
    P: object
    n: object
    F: object
    L: object


class _Frame(Protocol):
    stream: str
    data: _Payload


# A combined-stream ticker, and nothing else: a closed shape, because other top-level keys
# (`error`, `result`, `code`) change a frame's meaning. Every number is required, so that
# building the record needs no test per field, except `P`: a signed decimal string, which the
# adapter reads itself (see collectors/decoding.py on "-0").
_SHAPE: Shape[_Frame] = Shape(
    fields=(Field("stream", Rule.TEXT, required=True),
            Field("data", Shape(
                fields=(Field("s", Rule.TEXT, required=True),
                        Field("c", Rule.POSITIVE, required=True),
                        Field("v", Rule.NON_NEGATIVE, required=True), Field("E", Rule.ANY),
                        *(Field(key, Rule.NON_NEGATIVE, required=True)
                          for _, key in _META_NUMBERS),
                        Field("P", Rule.ANY), Field("n", Rule.ANY), Field("F", Rule.ANY),
                        Field("L", Rule.ANY)),
                tag=("e", "24hrTicker")), required=True)),
    closed=True,
)
_RESTRICTED_HINT = ("binance.com refuses connections from restricted locations such as the US "
                    "(HTTP 451): use the binanceus collector there")


#: How far back an event time is remembered for deduplication (a handover overlaps a few s).
DEDUP_WINDOW_MS = 60_000
_PRUNE_MIN = 2 * DEDUP_WINDOW_MS // 1000  # a minute of one-a-second updates, twice
#: Event times remembered per symbol at most (the newest kept past it): a second-by-second
#: stream needs a few hundred, a handover's overlap a few thousand.
_SEEN_MAX = 8192
#: How far ahead of its receive time an event time may move a symbol's newest `E` (which makes
#: older updates "late"): a venue's `E` precedes our receipt, so more is our clock or a bad value.
#: Such a record is kept; its time just does not make the updates after it look late.
NEWEST_AHEAD_MS = 2_000


class BinanceAdapter:
    """Pure parser for one Binance venue; keeps the last event time `E` per symbol."""

    # The server pings every 20 s (binance.com; every 3 min on binance.us) and websocket-client
    # answers with pongs: no application ping exists.
    app_ping_interval_s: float | None = None
    # A WebSocket ping of our own after 5 s without a frame (at most one per 5 s, well within
    # the venue's 5 incoming messages a second): the pong proves the connection alive when the
    # subscribed markets are quiet, so only a dead connection goes 10 s without a frame.
    ws_ping_interval_s: float | None = 5.0
    # Streams are in the URL; there is no subscribe request to void.
    # Binance cuts every connection at 24 h: hand over to a new one well before.
    max_connection_age_s: float | None = 23.5 * 3600
    resubscribe_after_reject = False
    # Ten seconds without any frame, our ping's pong included, means the connection is dead.
    # `24hrTicker` updates come every 1000 ms at most, and whether a market without trades still
    # gets one every second is not documented, so quiet markets are not relied upon; nor are
    # the server's pings (binance.us sends them only every 3 minutes).
    liveness_timeout_s = 10.0
    # A listed market's ticker updates every second; a minute of silence for one symbol while
    # others flow means its stream is stuck (or the market was halted): report it.
    symbol_stale_after_s = 60.0
    # `24hrTicker` is pushed every second: every stream silent for a minute is a stuck one.
    reconnect_when_all_stale = True
    ws_url_is_base = True  # the streams go in the path and query
    #: Binance's limit of streams on one connection; the connection layer splits above it.
    max_streams_per_connection = 1024

    def __init__(self, worker_id: str, venue: BinanceVenue = BINANCE_COM,
                 decode: Decoder = load_json) -> None:
        self.decode = decode
        self.name: str = venue.name
        self.default_ws_url: str = venue.ws_url
        self.default_symbols: tuple[str, ...] = venue.default_symbols
        self._worker_id = worker_id
        self._to_venue: dict[str, str] = {}
        self._from_venue: dict[str, str] = {}
        for base, quote in venue.markets:
            canonical, venue_symbol = f"{base}/{quote}", f"{base}{quote}"
            # Two markets spelling the same venue symbol would make the reverse map ambiguous.
            if venue_symbol in self._from_venue:
                raise ValueError(f"ambiguous {venue.name} market table entry {venue_symbol}")
            self._to_venue[canonical] = venue_symbol
            self._from_venue[venue_symbol] = canonical
        # Per venue symbol: the newest event time seen and every event time seen within the
        # dedup window before it.
        self._newest_ms: dict[str, int] = {}  # capped (see _remember)
        self._newest_sent_ms: dict[str, int] = {}  # as sent: the dedup mark
        self._seen_ms: dict[str, set[int]] = {}
        self._prune_at: dict[str, int] = {}
        # stream name -> (venue symbol, canonical symbol) of pairs already validated (bounded:
        # past the bound, pairs are simply validated every time).
        self._streams: dict[str, tuple[str, str]] = {}
        # Tickers decoded straight into their shape when the decoder can (the service's can).
        self._typed = (decode.shaped(_SHAPE, decimal_strings=True)
                       if isinstance(decode, ShapedDecoder) else None)

    # ---- symbols ---------------------------------------------------------------------------

    def supported_symbols(self) -> list[str]:
        return sorted(self._to_venue)

    def to_venue(self, symbol: str) -> str:
        """`BTC/USDT` -> `BTCUSDT`; a symbol outside the table joins it (see the module's
        notes). Raises ConfigError for a symbol this venue cannot have."""
        venue_symbol = self._to_venue.get(symbol)
        if venue_symbol is None:
            problem = self._unlisted(symbol)
            if problem is not None:
                raise problem
            base, quote = symbol.split("/")
            venue_symbol = base + quote
            other = self._from_venue.get(venue_symbol)
            if other is not None:
                raise ConfigError("SYMBOLS", f"{symbol} and {other} are both {venue_symbol} on "
                                  f"{self.name}", "the market really traded (only one is)")
            self._to_venue[symbol] = venue_symbol
            self._from_venue[venue_symbol] = symbol
        return venue_symbol

    def from_venue(self, venue_symbol: str) -> str:
        """`BTCUSDT` -> `BTC/USDT`. Raises ParseError naming a symbol neither in the table nor
        configured."""
        canonical = self._from_venue.get(venue_symbol)
        if canonical is None:
            raise ParseError(f"{self.name}: market {venue_symbol[:40]!r} is not in the symbol "
                             "table")
        return canonical

    def stream_name(self, symbol: str) -> str:
        return self.to_venue(symbol).lower() + _TICKER_SUFFIX

    def check_symbols(self, symbols: Sequence[str]) -> list[str]:
        """Raises ConfigError("SYMBOLS", ...) for the first symbol this venue cannot have;
        returns those outside the table of known markets."""
        unverified = [s for s in dict.fromkeys(symbols) if s not in self._to_venue]
        for symbol in symbols:
            self.to_venue(symbol)
        return unverified

    def _unlisted(self, symbol: str) -> ConfigError | None:
        """Why a symbol outside the table cannot be a market of this venue (None: it can)."""
        if not canonical_symbol_ok(symbol):
            return ConfigError("SYMBOLS", f"{symbol!r} is not a BASE/QUOTE symbol",
                               "e.g. BTC/USDT")
        base, quote = symbol.split("/")
        if self.name == BINANCE_COM.name and quote == "USD":
            usdt = f"{base}/USDT"
            suggestion = usdt if usdt in self._to_venue else "a USDT market such as BTC/USDT"
            return ConfigError(
                "SYMBOLS",
                f"binance.com has no USD market, so {symbol} does not exist there (its dollar "
                "markets are quoted in USDT, a different asset)",
                f"use {suggestion}, or the binanceus collector, which lists {symbol}",
            )
        return None

    # ---- connection ------------------------------------------------------------------------

    def connect_url(self, base_url: str, symbols: Sequence[str]) -> str:
        """`{base}/stream?streams=a@ticker/b@ticker`. Raises ConfigError for bad symbol lists."""
        if not symbols:
            raise ConfigError("SYMBOLS", "no symbols to subscribe to")
        if len(symbols) > self.max_streams_per_connection:
            raise ConfigError("SYMBOLS", f"{len(symbols)} streams on one connection",
                              f"at most {self.max_streams_per_connection}: split the list")
        streams = "/".join(self.stream_name(s) for s in symbols)
        return f"{base_url.rstrip('/')}/stream?streams={streams}"

    def subscribe_messages(self, symbols: Sequence[str]) -> list[str]:
        return []  # the streams are in the URL

    def ping_message(self) -> str | None:
        return None

    def http_error_hint(self, status: int) -> str | None:
        """Explanation for a failed WebSocket handshake status, if this venue has one."""
        if status == 451 and self.name == BINANCE_COM.name:
            return _RESTRICTED_HINT
        # Binance's limits page: an IP that does not back off after a 429 is banned (418) for
        # 2 minutes to 3 days; both carry Retry-After, which the connection waits out.
        # https://developers.binance.com/docs/binance-spot-api-docs/rest-api/limits
        if status == 429:
            return ("the venue rate-limited this IP (too many connections or requests); "
                    "backing off, at least as long as Retry-After says")
        if status == 418:
            return ("the venue banned this IP for not backing off after a 429; waiting as "
                    "Retry-After says (check for other clients on this IP)")
        return None

    # ---- parsing ---------------------------------------------------------------------------

    def parse(self, frame: str | bytes, received_ns: int) -> Parsed:
        if self._typed is not None and (ticker := self._typed(frame)) is not None:
            return self._typed_ticker(ticker, received_ns)
        msg = load_object(frame, self.decode)
        if msg.get("error") is not None:
            return _error(msg["error"])
        if "result" in msg and "id" in msg:
            # `null` answers a (UN)SUBSCRIBE; a list answers LIST_SUBSCRIPTIONS.
            return Parsed(Kind.SUBSCRIBED) if msg["result"] is None else Parsed(Kind.OTHER)
        if "code" in msg and "msg" in msg:
            parsed = _error(msg)
            if (self.name == BINANCE_COM.name and parsed.error is not None
                    and "restricted location" in parsed.error.lower()):
                return Parsed(Kind.ERROR, error=f"{parsed.error} ({_RESTRICTED_HINT})")
            return parsed

        stream: str | None = None
        payload = msg
        if "stream" in msg or "data" in msg:
            stream = string(msg, "stream", max_len=200)
            data = msg.get("data")
            if not isinstance(data, dict):
                raise ParseError(f"stream {stream[:40]!r}: 'data' is not an object")
            payload = data
        else:
            event = msg.get("event")
            if isinstance(event, dict):  # the WebSocket API's {"event": {"e": ...}} wrapping
                payload = event

        event_type = payload.get("e")
        if event_type == "24hrTicker":
            return self._ticker(payload, stream, received_ns)
        if event_type == "serverShutdown":
            return Parsed(Kind.SHUTDOWN, reconnect=True)
        # bookTicker, depth, other events: not ours.
        return Parsed(Kind.OTHER)

    def _ticker(self, payload: dict[str, object], stream: str | None,
                received_ns: int) -> Parsed:
        """A ticker from the generic decode: every field checked here."""
        get = payload.get
        symbol, venue_symbol = self._symbol(get("s"), stream)
        price = number(payload, "c", positive=True)  # `c` is the last price; `p` is the change
        assert price is not None  # required=True
        volume = number(payload, "v", required=False)
        meta: Metadata = {}
        copy_numbers(payload, _META_NUMBERS, meta)
        return self._record(venue_symbol, symbol, price, volume, get("E"), meta, get("P"),
                            get("n"), get("F"), get("L"), received_ns)

    def _typed_ticker(self, frame: _Frame, received_ns: int) -> Parsed:
        """A ticker from the shaped decode: its numbers are all there, already valid floats."""
        stream = checked_string(frame.stream, "stream", max_len=200)
        t = frame.data
        symbol, venue_symbol = self._symbol(t.s, stream)
        # _META_NUMBERS, spelled out (same keys, same order): the shape requires them all.
        meta: Metadata = {"quote_volume": t.q, "bid": t.b, "bid_size": t.B, "ask": t.a,
                          "ask_size": t.A, "open_24h": t.o, "high_24h": t.h, "low_24h": t.l}
        return self._record(venue_symbol, symbol, t.c, t.v, t.E, meta, t.P, t.n, t.F, t.L,
                            received_ns)

    def _symbol(self, venue_symbol: object, stream: str | None) -> tuple[str, str]:
        """(canonical, venue symbol) of a ticker's `s`, which must match its stream's name.
        Raises ParseError."""
        if stream is not None:
            known = self._streams.get(stream)
            if known is not None and known[0] == venue_symbol:
                return known[1], known[0]
        venue_symbol = checked_string(venue_symbol, "s", max_len=40)
        if (stream is not None and stream.endswith(_TICKER_SUFFIX)
                and stream[: -len(_TICKER_SUFFIX)] != venue_symbol.lower()):
            raise ParseError(f"stream {stream[:60]!r} carries a ticker for {venue_symbol!r}")
        symbol = self.from_venue(venue_symbol)
        if stream is not None and len(self._streams) < _SYMBOL_CACHE_MAX:
            self._streams[stream] = (venue_symbol, symbol)
        return symbol, venue_symbol

    def _record(self, venue_symbol: str, symbol: str, price: float, volume: float | None,
                event_time: object, meta: Metadata, change_pct: object, trade_count: object,
                first_trade_id: object, last_trade_id: object, received_ns: int) -> Parsed:
        """The rest of a ticker, after its symbol, price, volume and metadata numbers."""
        # The event time `E` (ms) when it is an integer that can be a real event. Checked before
        # any formatting, so that an absurd value never reaches the date code.
        if (type(event_time) is int
                and MIN_EVENT_NS <= event_time * 1_000_000 <= received_ns + MAX_EVENT_AHEAD_NS):
            event_ms: int | None = event_time
            newest = self._newest_ms.get(venue_symbol)
            if newest is not None and (event_time < newest - DEDUP_WINDOW_MS  # late
                                       or event_time in self._seen_ms[venue_symbol]):
                return Parsed(_TICKER, duplicates=1)
        else:
            event_ms = None

        if (value := signed_or_none(change_pct)) is not None:
            meta["change_pct"] = value
        if type(trade_count) is int:
            meta["trade_count"] = trade_count
        if type(first_trade_id) is int:
            meta["first_trade_id"] = first_trade_id
        if type(last_trade_id) is int:
            meta["last_trade_id"] = last_trade_id
        meta["received_at"] = received_at = received_iso(received_ns)
        if event_ms is not None:
            timestamp, exchange_ns = iso_from_ms(event_ms), event_ms * 1_000_000
            meta["timestamp_source"] = "exchange"
            # Only a fully valid record counts as seen.
            self._remember(venue_symbol, event_ms, received_ns // 1_000_000 + NEWEST_AHEAD_MS)
        else:
            timestamp, exchange_ns = received_at, 0
            meta["timestamp_source"] = "local"
        # Positional, in PriceFeed's field order: keywords cost 1.8x as much here.
        return Parsed(_TICKER, (PriceFeed(symbol, price, volume, timestamp, self.name,
                                          self._worker_id, meta, exchange_ns, received_ns),))

    def dedup_mark(self, record: PriceFeed) -> tuple[str, int] | None:
        """The newest event time of the record's symbol (this adapter's state, after the
        chunk)."""
        venue_symbol = self._to_venue.get(record.symbol)
        if venue_symbol is None:
            return None
        # The newest `E` as sent, not as capped: with our clock behind, the capped one is no
        # `E` at all, and the replay after a restart would not be recognised.
        newest = self._newest_sent_ms.get(venue_symbol)
        return None if newest is None else (venue_symbol, newest)

    def restore_marks(self, marks: Mapping[str, int]) -> None:
        # (A mark stored by an older version may be far ahead: capped like a live one.)
        newest_cap_ms = time.time_ns() // 1_000_000 + NEWEST_AHEAD_MS
        for venue_symbol, event_ms in marks.items():
            self._remember(venue_symbol, event_ms, newest_cap_ms)

    def _remember(self, venue_symbol: str, event_ms: int, newest_cap_ms: int) -> None:
        """`event_ms` was seen; the symbol's newest time moves to it, but not past the cap."""
        seen = self._seen_ms.get(venue_symbol)
        if seen is None:
            seen = self._seen_ms[venue_symbol] = set()
        seen.add(event_ms)
        if event_ms > self._newest_sent_ms.get(venue_symbol, -1):
            self._newest_sent_ms[venue_symbol] = event_ms
        newest = self._newest_ms.get(venue_symbol)
        candidate = min(event_ms, newest_cap_ms)
        if newest is None or candidate > newest:
            self._newest_ms[venue_symbol] = newest = candidate
        # Prune when the set has doubled since the last prune: amortised O(1) per update even
        # when a burst puts thousands of updates inside the window.
        if len(seen) > self._prune_at.get(venue_symbol, _PRUNE_MIN):
            # The window before the newest, and what may lie ahead of it: a host clock up to
            # MAX_EVENT_AHEAD_NS behind makes every real `E` run ahead of the capped newest.
            # Further ahead nothing is kept, so bad input cannot grow the set.
            floor = newest - DEDUP_WINDOW_MS
            ceiling = newest + MAX_EVENT_AHEAD_NS // 1_000_000 + DEDUP_WINDOW_MS
            kept = [e for e in seen if floor <= e <= ceiling]
            if len(kept) > _SEEN_MAX:  # distinct times by the thousand: not a venue's pace
                kept = sorted(kept)[-_SEEN_MAX // 2:]
            seen = self._seen_ms[venue_symbol] = set(kept)
            self._prune_at[venue_symbol] = max(_PRUNE_MIN, 2 * len(seen))


def _error(raw: object) -> Parsed:
    """`{"code": 2, "msg": "..."}` (alone or under "error") -> Kind.ERROR with the text."""
    if isinstance(raw, dict):
        text = raw.get("msg")
        code = raw.get("code")
        message = str(text)[:300] if isinstance(text, str) and text else "error without a message"
        if isinstance(code, int) and not isinstance(code, bool):
            message += f" (code {code})"
        return Parsed(Kind.ERROR, error=message)
    if isinstance(raw, str) and raw:
        return Parsed(Kind.ERROR, error=raw[:300])
    return Parsed(Kind.ERROR, error="error without a message")


def binance(worker_id: str, decode: Decoder = load_json) -> BinanceAdapter:
    """The binance.com adapter (registry factory)."""
    return BinanceAdapter(worker_id, BINANCE_COM, decode)


def binance_us(worker_id: str, decode: Decoder = load_json) -> BinanceAdapter:
    """The binance.us adapter (registry factory)."""
    return BinanceAdapter(worker_id, BINANCE_US, decode)
