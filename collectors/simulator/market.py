"""Venue-neutral market model for the simulator: a deterministic random walk per market.

Each market advances one trade per `tick()`: the last price follows a slightly mean-reverting
geometric random walk rounded to the market's price increment, with a best bid/ask around it,
rolling 24 h statistics and venue-style counters (`sequence` with gaps, as Coinbase's sequence is
shared across channels; trade ids). The random stream is seeded per (seed, venue, symbol), so the
same seed gives the same price path for the same number of ticks, whatever the timing. Times come
from the caller (`now_ns`), so this module has no clock and no I/O.
"""

from __future__ import annotations

import math
import random
import threading
from dataclasses import dataclass
from typing import NamedTuple

_NS_PER_S = 1_000_000_000


@dataclass(frozen=True, slots=True)
class MarketSpec:
    """A market as a venue lists it: venue spelling, start price and increments."""

    symbol: str
    price: float  # typical price, the walk's anchor
    price_decimals: int  # decimals of the quote increment
    trade_size: float  # mean trade size in base units
    daily_volume: float  # 24 h base volume
    size_decimals: int = 8


class Tick(NamedTuple):
    """The market right after one trade; venues render it in their own message shapes.

    A NamedTuple rather than a frozen dataclass: bursts build hundreds of thousands, and a
    frozen dataclass's __init__ is several times slower.
    """

    symbol: str
    serial: int  # simulator-internal, +1 per tick: orders ticks of one market
    sequence: int  # venue-style sequence: increasing with gaps
    trade_id: int  # id of the last trade
    first_trade_id: int  # id of the first trade of the 24 h window
    trade_count: int  # trades in the 24 h window
    price: float
    last_size: float
    side: str  # taker side: "buy" or "sell"
    best_bid: float
    best_bid_size: float
    best_ask: float
    best_ask_size: float
    open_24h: float
    high_24h: float
    low_24h: float
    prev_close: float  # price of the trade just before the 24 h window (Binance "x")
    volume_24h: float
    quote_volume_24h: float
    volume_30d: float
    vwap: float
    trade_time_ns: int  # when the last trade happened (wall clock, ns)
    event_time_ns: int  # when this update was generated (wall clock, ns)


class MarketState:
    """One market's evolving state. Thread-safe: the scheduler and burst threads both tick."""

    # Per-tick volatility and pull back to the anchor: a few percent a day at one tick/s, and
    # bounded drift over a burst of a million ticks.
    VOLATILITY = 0.0002
    REVERSION = 0.0005

    def __init__(self, spec: MarketSpec, rng: random.Random, now_ns: int) -> None:
        self.spec = spec
        self._rng = rng
        self._lock = threading.Lock()  # ticks come from several threads
        self._inc = 10.0 ** -spec.price_decimals
        self._size_inc = 10.0 ** -spec.size_decimals
        price = self._round(spec.price * math.exp(rng.gauss(0.0, 0.01)))
        open_24h = self._round(price * math.exp(rng.gauss(0.0, 0.02)))
        volume = spec.daily_volume * rng.uniform(0.8, 1.2)
        count = max(1000, int(volume / max(spec.trade_size, self._size_inc)))
        trade_id = rng.randint(10_000_000, 900_000_000)
        self._price = price
        self._volume = volume
        self._quote_volume = volume * (price + open_24h) / 2.0
        self._volume_30d = volume * rng.uniform(25.0, 35.0)
        self._high = max(price, open_24h) * (1.0 + rng.uniform(0.001, 0.03))
        self._low = min(price, open_24h) * (1.0 - rng.uniform(0.001, 0.03))
        self._open = open_24h
        self._prev_close = self._round(open_24h * math.exp(rng.gauss(0.0, 0.001)))
        self._sequence = rng.randint(1_000_000_000, 90_000_000_000)
        self._trade_id = trade_id
        self._count = count
        self._serial = 0
        # The first ticker after subscribing carries the last trade's time, which for a market
        # that has not traded lately is tens of seconds old.
        trade_time = now_ns - int(rng.uniform(1.0, 40.0) * _NS_PER_S)
        self._current = self._make_tick(self._trade_size(), rng.random() < 0.5, trade_time,
                                        now_ns)

    def _round(self, value: float) -> float:
        return max(self._inc, round(value, self.spec.price_decimals))

    def _trade_size(self) -> float:
        size = self._rng.expovariate(1.0 / self.spec.trade_size)
        return max(self._size_inc, round(size, self.spec.size_decimals))

    def _make_tick(self, size: float, buy: bool, trade_time_ns: int, now_ns: int) -> Tick:
        rng = self._rng
        price = self._price
        spread = max(self._inc, self._round(price * 0.00005))
        if buy:  # a buyer lifted the ask: the trade printed at the ask
            ask = price
            bid = self._round(ask - spread)
        else:
            bid = price
            ask = self._round(bid + spread)
        if bid >= ask:  # at the price floor
            ask = round(bid + self._inc, self.spec.price_decimals)
        self._serial += 1
        first = self._trade_id - self._count + 1
        return Tick(
            symbol=self.spec.symbol,
            serial=self._serial,
            sequence=self._sequence,
            trade_id=self._trade_id,
            first_trade_id=first,
            trade_count=self._count,
            price=price,
            last_size=size,
            side="buy" if buy else "sell",
            best_bid=bid,
            best_bid_size=self._depth_size(rng),
            best_ask=ask,
            best_ask_size=self._depth_size(rng),
            open_24h=self._open,
            high_24h=self._round(max(self._high, price)),
            low_24h=self._round(min(self._low, price)),
            prev_close=self._prev_close,
            volume_24h=round(self._volume, self.spec.size_decimals),
            quote_volume_24h=round(self._quote_volume, 8),
            volume_30d=round(self._volume_30d, self.spec.size_decimals),
            vwap=self._round(self._quote_volume / self._volume),
            trade_time_ns=trade_time_ns,
            event_time_ns=now_ns,
        )

    def _depth_size(self, rng: random.Random) -> float:
        size = rng.expovariate(1.0 / (self.spec.trade_size * 4.0))
        return max(self._size_inc, round(size, self.spec.size_decimals))

    @property
    def current(self) -> Tick:
        with self._lock:
            return self._current

    def tick(self, now_ns: int) -> Tick:
        """Advance by one trade; `now_ns` is the wall-clock time of the update."""
        with self._lock:
            return self._advance(now_ns)

    def ticks(self, count: int, now_ns: int) -> list[Tick]:
        """Advance by `count` trades at once (bursts), 1 ms apart and ending at `now_ns`: each
        update keeps a distinct event time (Binance's `E` has millisecond resolution), as real
        updates do, so deduplication by event time does not mistake them for one another."""
        with self._lock:
            return [self._advance(now_ns - (count - 1 - i) * 1_000_000) for i in range(count)]

    def _advance(self, now_ns: int) -> Tick:
        rng = self._rng
        spec = self.spec
        drift = -self.REVERSION * math.log(self._price / spec.price)
        self._price = self._round(self._price * math.exp(drift + self.VOLATILITY * rng.gauss(
            0.0, 1.0)))
        size = self._trade_size()
        self._high = max(self._high, self._price)
        self._low = min(self._low, self._price)
        # Rolling volume: new trades add, a slow decay stands in for trades leaving the window.
        self._volume = self._volume * 0.99999 + size
        self._quote_volume = self._quote_volume * 0.99999 + size * self._price
        self._volume_30d += size
        self._trade_id += rng.randint(1, 4)
        self._sequence += rng.randint(1, 40)
        # The trade happened shortly before the ticker for it was published.
        trade_time = now_ns - rng.randint(0, 3_000_000)
        self._current = self._make_tick(size, rng.random() < 0.5, trade_time, now_ns)
        return self._current


def market_rng(seed: int, venue: str, symbol: str) -> random.Random:
    """The deterministic random stream of one market (string seeds hash with SHA-512)."""
    return random.Random(f"{seed}/{venue}/{symbol}")
