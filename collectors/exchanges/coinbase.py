"""Coinbase Exchange WebSocket feed: `ticker` + `heartbeat` channels -> PriceFeed records.

Protocol as documented by Coinbase (checked 2026-11):
- Overview, subscribe within 5 s, errors: https://docs.cdp.coinbase.com/exchange/websocket-feed/overview
- Channels (ticker fields, heartbeat): https://docs.cdp.coinbase.com/exchange/websocket-feed/channels
Real shapes used as fixtures: tests/fixtures/coinbase/ (sources named there).

Notes that shape this parser:
- every number is a decimal string; `best_bid_size`/`best_ask_size` are absent in older messages;
- `time` is the last match's time: absent, a `0001-01-01` placeholder, or old in the first ticker
  after subscribing. Absent or implausible -> receive time with `timestamp_source="local"`;
- `sequence` is per product and shared by all channels, so gaps are normal; a ticker at or
  below the last one seen is a duplicate or a late message, and is dropped (e.g. the venue's
  replay of its current ticker after a (re)subscribe). Two guards keep one bad value from
  blocking a product. A higher sequence is only "pending" until a later one is higher still
  (then it is the last): a ticker below a pending one is late too, unless the pending one
  jumped more than `SEQUENCE_JUMP` past the last, when it may be the bad one and the real ones
  after it are kept. And the first ticker after a `subscriptions` ack (every connection's
  start) is the product's current state: the newest one kept again (the replay: dropped), or,
  if below it, a count that started over (a restarted venue or test server, another endpoint;
  perhaps at numbers the old count used): kept, and the count restarts from it. Within a
  connection the last `RECENT_SEQUENCES` kept are remembered too: a repeat of any is a
  duplicate. `LATE_RUN_RESTART` late tickers in a row, each above the one before, restart the
  count too: late below the last (two bad values in a row confirm each other, and silenced the
  product) or below a pending one within `SEQUENCE_JUMP` (one bad value a little ahead, such as
  9000 after 101, silenced the product until the real count passed it); both kinds count in
  the same run. The last of the run is kept and becomes the last and the newest (the pending
  one, taken for the bad value, is forgotten with the remembered sequences), as after a count
  that started over. Only the products the last ack listed keep this state. The dedup mark
  stored with the records is the newest sequence, pending or last (a replay after a restart
  repeats it).
  A sequence outside 0 .. 2**63-1 is not a sequence (and no SQLite integer): refused.
"""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Protocol

from collectors.errors import ParseError
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
)
from collectors.model import Metadata, PriceFeed, canonical_symbol_ok, event_time

# Used with fullmatch: `$` would also match before a final "\n" ("BTC-USD\n" -> BTC/USD,
# with dedup state of its own under the raw id).
_PRODUCT_RE = re.compile(r"([A-Z0-9]{1,20})-([A-Z0-9]{1,20})")
_INVALID_PRODUCT_RE = re.compile(r"^\s*(\S*)\s+is not a valid product", re.IGNORECASE)
_SYMBOL_CACHE_MAX = 4096
#: A pending sequence further than this past the last one may be a bad value: the tickers
#: below it are kept, not taken for late ones.
SEQUENCE_JUMP = 10_000
#: Sequences remembered per product: a ticker repeating one of them is a duplicate.
RECENT_SEQUENCES = 32
#: This many late tickers in a row, each above the one before, mean the last (or pending)
#: sequence is the bad one (two bad values in a row confirm each other) or the count started
#: over within the connection: the last of them is kept and the count restarts from it. A
#: venue's stream is ordered, so real late tickers come one at a time (a replay), not as a
#: rising run.
LATE_RUN_RESTART = 10
_SEQUENCE_MAX = 2**63 - 1
#: (metadata key, ticker field) of the optional decimal-string fields, in output order.
_META_NUMBERS = (("bid", "best_bid"), ("bid_size", "best_bid_size"), ("ask", "best_ask"),
                 ("ask_size", "best_ask_size"), ("open_24h", "open_24h"),
                 ("high_24h", "high_24h"), ("low_24h", "low_24h"),
                 ("volume_30d", "volume_30d"), ("last_size", "last_size"))
_TICKER = Kind.TICKER  # a module global: looking a member up on its Enum class is slow


class _Ticker(Protocol):
    """A ticker as `_SHAPE` decodes it (attributes named by the JSON keys)."""

    product_id: str
    price: float
    volume_24h: float
    sequence: object
    time: object
    trade_id: object
    side: object
    best_bid: float
    best_bid_size: float
    best_ask: float
    best_ask_size: float
    open_24h: float
    high_24h: float
    low_24h: float
    volume_30d: float
    last_size: float


# Every number is required (a ticker without some, such as an older one without the sizes,
# takes the generic path), so that building the record needs no test per field.
_SHAPE: Shape[_Ticker] = Shape(
    fields=(Field("product_id", Rule.TEXT, required=True),
            Field("price", Rule.POSITIVE, required=True),
            Field("volume_24h", Rule.NON_NEGATIVE, required=True),
            Field("sequence", Rule.ANY), Field("time", Rule.ANY), Field("trade_id", Rule.ANY),
            Field("side", Rule.ANY),
            *(Field(key, Rule.NON_NEGATIVE, required=True) for _, key in _META_NUMBERS)),
    tag=("type", "ticker"),
)


def to_product(symbol: str) -> str:
    """`BTC/USD` -> `BTC-USD` (Coinbase spells markets with a dash; same asset codes)."""
    return symbol.replace("/", "-")


def from_product(product_id: str) -> str:
    """`BTC-USD` -> `BTC/USD`. Raises ParseError for anything that is not a product id."""
    m = _PRODUCT_RE.fullmatch(product_id)
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
    ws_ping_interval_s: float | None = None  # heartbeats once a second per product
    # "Failed to subscribe ... is not a valid product" voids the whole request.
    max_connection_age_s: float | None = None
    resubscribe_after_reject = True
    # Tickers follow trades; a liquid market is never quiet for 2 minutes, a thin one may be.
    symbol_stale_after_s = 120.0
    reconnect_when_all_stale = False  # tickers follow trades: quiet markets are quiet
    ws_url_is_base = False

    def __init__(self, worker_id: str, decode: Decoder = load_json) -> None:
        self._worker_id = worker_id
        self.decode = decode
        # product -> its last sequence (confirmed: see the module's notes), the higher one
        # kept after it but not yet confirmed, and the last RECENT_SEQUENCES kept (in order:
        # the newest is the dedup mark). Bounded like `_symbols`.
        self._last_sequence: dict[str, int] = {}
        self._pending: dict[str, int] = {}
        self._recent: dict[str, deque[int]] = {}
        # product -> (late tickers in a row, each above the one before; the last of them)
        self._late_run: dict[str, tuple[int, int]] = {}
        # The products the last `subscriptions` ack listed (None before one): only they keep
        # dedup state. And those with a ticker since that ack (see the module's notes).
        self._acked: frozenset[str] | None = None
        self._seen_since_ack: set[str] = set()
        # product id -> canonical symbol, for ids already validated (bounded: hostile input
        # cannot grow it without limit; past the bound ids are simply validated every time).
        self._symbols: dict[str, str] = {}
        # Tickers decoded straight into their shape when the decoder can (the service's can).
        self._typed = (decode.shaped(_SHAPE, decimal_strings=True)
                       if isinstance(decode, ShapedDecoder) else None)

    def check_symbols(self, symbols: Sequence[str]) -> list[str]:
        """Coinbase validates products itself (error reply naming the product)."""
        return []

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
        if self._typed is not None and (ticker := self._typed(frame)) is not None:
            return self._typed_ticker(ticker, received_ns)
        msg = load_object(frame, self.decode)
        kind = msg.get("type")
        if kind == "ticker":
            return self._ticker(msg, received_ns)
        if kind == "heartbeat":
            return Parsed(Kind.HEARTBEAT)
        if kind == "subscriptions":
            subscribed, invalid = _subscribed_tickers(msg)
            self._seen_since_ack.clear()
            self._acked = frozenset(map(to_product, subscribed))
            return Parsed(Kind.SUBSCRIBED, subscribed=subscribed, invalid=invalid)
        if kind == "error":
            return _error(msg)
        if not isinstance(kind, str):
            raise ParseError("message has no string 'type'")
        return Parsed(Kind.OTHER)

    def dedup_mark(self, record: PriceFeed) -> tuple[str, int] | None:
        """The product's newest sequence, pending or last (this adapter's state, after the
        chunk): what the venue replays after a restart."""
        product = to_product(record.symbol)
        sequence = self._pending.get(product, self._last_sequence.get(product))
        return None if sequence is None else (product, sequence)

    def _is_duplicate(self, product: str, sequence: int) -> bool:
        """A repeat, or (within a connection) a late ticker: see the module's notes."""
        last = self._last_sequence.get(product)
        if product not in self._seen_since_ack:
            # A connection's first is the venue's current ticker: a replay of the newest one
            # kept, or (anything else below it) a count that started over, perhaps at numbers
            # the old count used too.
            return sequence == self._pending.get(product, last)
        recent = self._recent.get(product)
        if sequence == last or (recent is not None and sequence in recent):
            return True
        if last is not None and sequence < last:
            return not self._count_restarted(product, sequence)
        pending = self._pending.get(product)
        if (pending is not None and sequence < pending
                and pending - (sequence if last is None else last) <= SEQUENCE_JUMP):
            return not self._count_restarted(product, sequence)  # late: below the pending one
        return False

    def _count_restarted(self, product: str, sequence: int) -> bool:
        """A late ticker (below the last, or below a pending one): True when it ends a rising
        run of LATE_RUN_RESTART of them, and the product's count then restarts from it (see
        LATE_RUN_RESTART): it becomes the last; the pending one and the remembered sequences
        are forgotten; `_remember` then makes it the newest (pending) too."""
        run = self._late_run.get(product)
        count = run[0] + 1 if run is not None and run[1] < sequence else 1
        if count < LATE_RUN_RESTART:
            if run is not None or len(self._late_run) < _SYMBOL_CACHE_MAX:
                self._late_run[product] = (count, sequence)
            return False
        del self._late_run[product]
        self._last_sequence[product] = sequence
        self._pending.pop(product, None)
        recent = self._recent.get(product)
        if recent is not None:
            recent.clear()
        return True

    def restore_marks(self, marks: Mapping[str, int]) -> None:
        for product, sequence in marks.items():
            if product in self._last_sequence or len(self._last_sequence) < _SYMBOL_CACHE_MAX:
                self._last_sequence[product] = sequence

    def _remember(self, product: str, sequence: int) -> None:
        """`sequence` was kept (see the module's notes for what becomes the last)."""
        if self._late_run:
            self._late_run.pop(product, None)  # a run of late tickers is one without a gap
        if self._acked is not None and product not in self._acked:
            return  # not subscribed (the pipeline drops it): no state, which junk would fill
        recent = self._recent.get(product)
        if recent is None:
            if len(self._recent) >= _SYMBOL_CACHE_MAX:
                return  # hostile product ids: no dedup state past the bound (dropped anyway)
            recent = self._recent[product] = deque(maxlen=RECENT_SEQUENCES)
        last = self._last_sequence.get(product)
        pending = self._pending.get(product)
        newest = last if pending is None else pending
        if product not in self._seen_since_ack and newest is not None and sequence < newest:
            # a connection's first, below the newest: a new count
            recent.clear()
            self._last_sequence[product] = sequence
            self._pending.pop(product, None)
        elif pending is not None and sequence > pending:  # confirms the pending one
            self._last_sequence[product] = pending
            self._pending[product] = sequence
        else:  # the first, or between the last and a pending one that jumped: pending
            self._pending[product] = sequence
        recent.append(sequence)
        if len(self._seen_since_ack) < _SYMBOL_CACHE_MAX:
            self._seen_since_ack.add(product)

    def _ticker(self, msg: dict[str, object], received_ns: int) -> Parsed:
        """A ticker from the generic decode: every field checked here."""
        get = msg.get
        product = get("product_id")
        symbol = self._symbols.get(product) if type(product) is str else None
        if symbol is None:
            symbol = self._new_product(product)
        assert isinstance(product, str)  # _new_product checked it
        price = number(msg, "price", positive=True)
        assert price is not None  # required=True
        volume = number(msg, "volume_24h", required=False)
        meta: Metadata = {}
        copy_numbers(msg, _META_NUMBERS, meta)
        return self._record(product, symbol, price, volume, get("sequence"), get("time"),
                            get("trade_id"), get("side"), meta, received_ns)

    def _typed_ticker(self, t: _Ticker, received_ns: int) -> Parsed:
        """A ticker from the shaped decode: its numbers are all there, already valid floats."""
        product = t.product_id
        symbol = self._symbols.get(product)
        if symbol is None:
            symbol = self._new_product(product)
        # _META_NUMBERS, spelled out (same keys, same order): the shape requires them all.
        meta: Metadata = {"bid": t.best_bid, "bid_size": t.best_bid_size, "ask": t.best_ask,
                          "ask_size": t.best_ask_size, "open_24h": t.open_24h,
                          "high_24h": t.high_24h, "low_24h": t.low_24h,
                          "volume_30d": t.volume_30d, "last_size": t.last_size}
        return self._record(product, symbol, t.price, t.volume_24h, t.sequence, t.time,
                            t.trade_id, t.side, meta, received_ns)

    def _new_product(self, product: object) -> str:
        """The symbol of a product id not seen yet. Raises ParseError for a bad one."""
        product = checked_string(product, "product_id", max_len=41)
        symbol = from_product(product)
        if not canonical_symbol_ok(symbol):
            raise ParseError(f"bad product id {product!r}")
        if len(self._symbols) < _SYMBOL_CACHE_MAX:
            self._symbols[product] = symbol
        return symbol

    def _record(self, product: str, symbol: str, price: float, volume: float | None,
                sequence: object, time: object, trade_id: object, side: object,
                meta: Metadata, received_ns: int) -> Parsed:
        """The rest of a ticker, after its symbol, price, volume and metadata numbers."""
        if sequence is not None:
            if type(sequence) is not int:
                raise ParseError("field 'sequence' must be an integer")
            if not 0 <= sequence <= _SEQUENCE_MAX:
                raise ParseError("field 'sequence' is out of range (0 to 2**63-1)")
            if self._is_duplicate(product, sequence):
                return Parsed(_TICKER, duplicates=1)
            meta["sequence"] = sequence
        if type(trade_id) is int:
            meta["trade_id"] = trade_id
        if side in ("buy", "sell"):
            meta["side"] = side
        meta["received_at"] = received_at = received_iso(received_ns)
        # `time` is absent, a placeholder, or real (see the module's notes).
        if (when := event_time(time, received_ns)) is not None:
            timestamp, exchange_ns = when
            meta["timestamp_source"] = "exchange"
        else:
            timestamp, exchange_ns = received_at, 0
            meta["timestamp_source"] = "local"
        # Only a record that is fully valid counts as seen.
        if sequence is not None:
            self._remember(product, sequence)
        # Positional, in PriceFeed's field order: keywords cost 1.8x as much here.
        return Parsed(_TICKER, (PriceFeed(symbol, price, volume, timestamp, self.name,
                                          self._worker_id, meta, exchange_ns, received_ns),))


def _subscribed_tickers(msg: dict[str, object]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Canonical symbols the ack lists on the ticker channel, and a reason for each product id
    in it that is none (skipped: one bad entry must not void the ack for the others)."""
    channels = msg.get("channels")
    if not isinstance(channels, list):
        raise ParseError("subscriptions message without a 'channels' list")
    out: list[str] = []
    invalid: list[str] = []
    for channel in channels:
        if isinstance(channel, dict) and channel.get("name") == "ticker":
            products = channel.get("product_ids")
            if isinstance(products, list):
                for product in products:
                    try:
                        if not isinstance(product, str):
                            raise ParseError("subscriptions: a product id that is no string")
                        out.append(from_product(product))
                    except ParseError as exc:
                        invalid.append(str(exc))
    return tuple(out), tuple(invalid)


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
