"""PriceFeed, the normalized record every adapter produces, and its time helpers."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache

MetaValue = float | int | str | bool
Metadata = dict[str, MetaValue]

_ISO_RE = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,9}))?"
    r"(Z|[+-]00:?00)"
)
# Exchange times outside this window are placeholders (Coinbase's 0001-01-01, Kraken's epoch 0)
# or garbage, never real events: 2009-01-03 is bitcoin's genesis block.
MIN_EVENT_NS = 1_230_940_800 * 1_000_000_000
MAX_FUTURE_SKEW_NS = 24 * 3600 * 1_000_000_000


@dataclass(frozen=True, slots=True)
class PriceFeed:
    """One ticker update, as the contract's record shows it.

    `exchange_ns` and `received_ns` are the two clocks as integers (epoch ns) for metrics and
    ordering; they are not part of the JSON form (the strings `timestamp` and
    `metadata.received_at` are).
    """

    symbol: str
    price: float
    volume: float | None
    timestamp: str
    source: str
    worker_id: str
    metadata: Metadata = field(default_factory=dict)
    exchange_ns: int = 0
    received_ns: int = 0

    def to_json_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"symbol": self.symbol, "price": self.price}
        if self.volume is not None:
            out["volume"] = self.volume
        out["timestamp"] = self.timestamp
        out["source"] = self.source
        out["worker_id"] = self.worker_id
        out["metadata"] = self.metadata
        return out


@lru_cache(maxsize=64)
def _second_text(seconds: int) -> str:
    """`YYYY-MM-DDTHH:MM:SS` of an epoch second (cached: records of one second share it)."""
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")


@lru_cache(maxsize=64)
def _epoch_second(year: int, month: int, day: int, hour: int, minute: int, sec: int) -> int:
    """Epoch second of a UTC calendar time. Raises ValueError for an impossible date."""
    return int(datetime(year, month, day, hour, minute, sec, tzinfo=UTC).timestamp())


def iso_from_ns(epoch_ns: int, digits: int = 6) -> str:
    """Format epoch nanoseconds as ISO 8601 UTC with `digits` fractional digits (0-9)."""
    seconds, frac_ns = divmod(epoch_ns, 1_000_000_000)
    base = _second_text(seconds)
    if digits <= 0:
        return base + "Z"
    frac = f"{frac_ns:09d}"[:digits]
    return f"{base}.{frac}Z"


def iso_from_ms(epoch_ms: int) -> str:
    """Exchange millisecond times keep exactly millisecond precision."""
    return iso_from_ns(epoch_ms * 1_000_000, digits=3)


def parse_iso(text: str) -> tuple[str, int]:
    """Validate an exchange ISO 8601 UTC time; return (canonical text, epoch ns).

    The canonical text keeps every fractional digit the exchange sent and ends in `Z`.
    Raises ValueError for anything that is not a UTC ISO time.
    """
    m = _ISO_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"not an ISO 8601 UTC time: {text[:40]!r}")
    year, month, day, hour, minute, sec, frac, _tz = m.groups()
    whole_s = _epoch_second(int(year), int(month), int(day), int(hour), int(minute), int(sec))
    frac = frac or ""
    ns = whole_s * 1_000_000_000 + (int(frac.ljust(9, "0")) if frac else 0)
    canon = f"{year}-{month}-{day}T{hour}:{minute}:{sec}" + (f".{frac}" if frac else "") + "Z"
    return canon, ns


def plausible_event_ns(event_ns: int, received_ns: int) -> bool:
    """True when an exchange time can be a real event: not a placeholder, not far future."""
    return MIN_EVENT_NS <= event_ns <= received_ns + MAX_FUTURE_SKEW_NS


def positive_finite(value: float) -> bool:
    return math.isfinite(value) and value > 0


def canonical_symbol_ok(symbol: str) -> bool:
    """`BASE/QUOTE`, upper-case letters and digits, 1-20 characters each side."""
    return _SYMBOL_RE.fullmatch(symbol) is not None


_SYMBOL_RE = re.compile(r"[A-Z0-9]{1,20}/[A-Z0-9]{1,20}")
