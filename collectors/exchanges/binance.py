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
  distinct update that merely arrives out of order is kept: the overlap loses nothing.
- Symbols map both ways through an explicit table of (base, quote) markets per venue: `BTCUSDC`
  and `BTCUSDS` cannot be told apart by string surgery, and a USDT market is never `.../USD`.
  binance.com lists no USD-quoted market at all; binance.us lists both `BTCUSD` and `BTCUSDT`.
- Binance says nothing about a stream name it does not know (no error, just no data); the
  symbol check at start-up and the connection layer's "no first message" watch cover that.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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
from collectors.model import (
    Metadata,
    PriceFeed,
    canonical_symbol_ok,
    iso_from_ms,
    plausible_event_ns,
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
_RESTRICTED_HINT = ("binance.com refuses connections from restricted locations such as the US "
                    "(HTTP 451): use the binanceus collector there")


#: How far back an event time is remembered for deduplication (a handover overlaps a few s).
DEDUP_WINDOW_MS = 60_000
_PRUNE_MIN = 2 * DEDUP_WINDOW_MS // 1000  # a minute of one-a-second updates, twice


class BinanceAdapter:
    """Pure parser for one Binance venue; keeps the last event time `E` per symbol."""

    # The server pings every 20 s (binance.com; every 3 min on binance.us) and websocket-client
    # answers with pongs: no application ping exists.
    app_ping_interval_s: float | None = None
    # Streams are in the URL; there is no subscribe request to void.
    # Binance cuts every connection at 24 h: hand over to a new one well before.
    max_connection_age_s: float | None = 23.5 * 3600
    resubscribe_after_reject = False
    # Each subscribed symbol gets a `24hrTicker` every 1000 ms (the rolling 24 h window moves
    # every second for any market that traded in the last day), so ten seconds without any frame
    # is ten missed updates on every symbol at once: the connection is dead. Server pings are not
    # relied upon (binance.us sends them only every 3 minutes).
    liveness_timeout_s = 10.0
    # A listed market's ticker updates every second; a minute of silence for one symbol while
    # others flow means its stream is stuck (or the market was halted): report it.
    symbol_stale_after_s = 60.0
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
        self._newest_ms: dict[str, int] = {}
        self._seen_ms: dict[str, set[int]] = {}
        self._prune_at: dict[str, int] = {}

    # ---- symbols ---------------------------------------------------------------------------

    def supported_symbols(self) -> list[str]:
        return sorted(self._to_venue)

    def to_venue(self, symbol: str) -> str:
        """`BTC/USDT` -> `BTCUSDT`. Raises ConfigError for a market this venue does not list."""
        venue_symbol = self._to_venue.get(symbol)
        if venue_symbol is None:
            raise self._unlisted(symbol)
        return venue_symbol

    def from_venue(self, venue_symbol: str) -> str:
        """`BTCUSDT` -> `BTC/USDT`. Raises ParseError naming a symbol not in the table."""
        canonical = self._from_venue.get(venue_symbol)
        if canonical is None:
            raise ParseError(f"{self.name}: market {venue_symbol[:40]!r} is not in the symbol "
                             "table")
        return canonical

    def stream_name(self, symbol: str) -> str:
        return self.to_venue(symbol).lower() + _TICKER_SUFFIX

    def check_symbols(self, symbols: Sequence[str]) -> None:
        """Raises ConfigError("SYMBOLS", ...) for the first symbol this venue does not list."""
        for symbol in symbols:
            self.to_venue(symbol)

    def _unlisted(self, symbol: str) -> ConfigError:
        if not canonical_symbol_ok(symbol):
            return ConfigError("SYMBOLS", f"{symbol!r} is not a BASE/QUOTE symbol",
                               "e.g. BTC/USDT")
        base, quote = symbol.split("/")
        same_base = sorted(s for s in self._to_venue if s.split("/")[0] == base)
        if self.name == BINANCE_COM.name and quote == "USD":
            usdt = f"{base}/USDT"
            suggestion = usdt if usdt in self._to_venue else "a USDT market such as BTC/USDT"
            return ConfigError(
                "SYMBOLS",
                f"binance.com has no USD market, so {symbol} does not exist there (its dollar "
                "markets are quoted in USDT, a different asset)",
                f"use {suggestion}, or the binanceus collector, which lists {symbol}",
            )
        listed = f"; {base} is listed as {', '.join(same_base)}" if same_base else ""
        return ConfigError("SYMBOLS", f"{symbol} is not a {self.name} market{listed}",
                           "supported: " + ", ".join(self.supported_symbols()))

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
        return None

    # ---- parsing ---------------------------------------------------------------------------

    def parse(self, frame: str | bytes, received_ns: int) -> Parsed:
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
        venue_symbol = string(payload, "s", max_len=40)
        if (stream is not None and stream.endswith(_TICKER_SUFFIX)
                and stream[: -len(_TICKER_SUFFIX)] != venue_symbol.lower()):
            raise ParseError(f"stream {stream[:60]!r} carries a ticker for {venue_symbol!r}")
        symbol = self.from_venue(venue_symbol)
        price = number(payload, "c", positive=True)  # `c` is the last price; `p` is the change
        assert price is not None  # required=True
        volume = number(payload, "v", required=False)

        event_ms = _event_ms(payload.get("E"), received_ns)
        if event_ms is not None and self._already_seen(venue_symbol, event_ms):
            return Parsed(Kind.TICKER, duplicates=1)

        meta: Metadata = {}
        copy_numbers(payload, _META_NUMBERS, meta)
        change_pct = optional_number(payload, "P", signed=True)
        if change_pct is not None:
            meta["change_pct"] = change_pct
        for out_key, in_key in (("trade_count", "n"), ("first_trade_id", "F"),
                                ("last_trade_id", "L")):
            raw = payload.get(in_key)
            if isinstance(raw, int) and not isinstance(raw, bool):
                meta[out_key] = raw
        meta["received_at"] = received_iso(received_ns)
        if event_ms is not None:
            timestamp, exchange_ns = iso_from_ms(event_ms), event_ms * 1_000_000
            meta["timestamp_source"] = "exchange"
        else:
            timestamp, exchange_ns = received_iso(received_ns), 0
            meta["timestamp_source"] = "local"

        # Only a fully valid record counts as seen.
        if event_ms is not None:
            self._remember(venue_symbol, event_ms)
        record = PriceFeed(symbol=symbol, price=price, volume=volume, timestamp=timestamp,
                           source=self.name, worker_id=self._worker_id, metadata=meta,
                           exchange_ns=exchange_ns, received_ns=received_ns)
        return Parsed(Kind.TICKER, records=(record,))

    def dedup_mark(self, record: PriceFeed) -> tuple[str, int] | None:
        if record.exchange_ns <= 0:
            return None
        return self.to_venue(record.symbol), record.exchange_ns // 1_000_000

    def restore_marks(self, marks: Mapping[str, int]) -> None:
        for venue_symbol, event_ms in marks.items():
            self._remember(venue_symbol, event_ms)

    def _already_seen(self, venue_symbol: str, event_ms: int) -> bool:
        newest = self._newest_ms.get(venue_symbol)
        if newest is None:
            return False
        if event_ms < newest - DEDUP_WINDOW_MS:
            return True  # too old to tell: late, and superseded long since
        return event_ms in self._seen_ms[venue_symbol]

    def _remember(self, venue_symbol: str, event_ms: int) -> None:
        seen = self._seen_ms.setdefault(venue_symbol, set())
        seen.add(event_ms)
        newest = max(event_ms, self._newest_ms.get(venue_symbol, event_ms))
        self._newest_ms[venue_symbol] = newest
        # Prune when the set has doubled since the last prune: amortised O(1) per update even
        # when a burst puts thousands of updates inside the window.
        if len(seen) > self._prune_at.get(venue_symbol, _PRUNE_MIN):
            floor = newest - DEDUP_WINDOW_MS
            seen = self._seen_ms[venue_symbol] = {e for e in seen if e >= floor}
            self._prune_at[venue_symbol] = max(_PRUNE_MIN, 2 * len(seen))


def _event_ms(raw: object, received_ns: int) -> int | None:
    """The event time `E` (ms) when it is an integer that can be a real event, else None."""
    # Checked before any formatting, so that an absurd value never reaches the date code.
    if (isinstance(raw, int) and not isinstance(raw, bool)
            and plausible_event_ns(raw * 1_000_000, received_ns)):
        return raw
    return None


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
