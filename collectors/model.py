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
#: How far ahead of now the ingest API accepts a record's time (a sender's clock may be off).
MAX_FUTURE_SKEW_NS = 24 * 3600 * 1_000_000_000
#: How far ahead of its receive time an exchange's event time may be and still be taken as the
#: record's time. A venue stamps an event before we receive it, so a time ahead of ours is our
#: clock running behind (seconds, without NTP) or a bad value; beyond this the record keeps the
#: receive time (`timestamp_source` "local"): one bad value must not become the symbol's newest
#: row for hours, nor a dedup mark that makes the real updates after it look old.
MAX_EVENT_AHEAD_NS = 300 * 1_000_000_000


# Slotted, not frozen: a frozen dataclass's __init__ sets every field through
# object.__setattr__, 2.5x the cost (1.33 vs 0.53 us) of a plain one, once per record on the
# hot path. Records are treated as immutable: nothing changes one after its adapter built it.
@dataclass(slots=True)
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


#: "000" to "999": formatting an int with `:03d` costs more than finding its text here, once
#: or twice per record (the receive time, Binance's event time).
_THREE_DIGITS = tuple(f"{n:03d}" for n in range(1000))


def iso_from_ns(epoch_ns: int, digits: int = 6) -> str:
    """Format epoch nanoseconds as ISO 8601 UTC with `digits` fractional digits (0-9)."""
    seconds, frac_ns = divmod(epoch_ns, 1_000_000_000)
    if digits == 6:  # every receive time
        ms, us = divmod(frac_ns // 1000, 1000)
        return f"{_second_text(seconds)}.{_THREE_DIGITS[ms]}{_THREE_DIGITS[us]}Z"
    base = _second_text(seconds)
    if digits <= 0:
        return base + "Z"
    frac = f"{frac_ns:09d}"[:digits]
    return f"{base}.{frac}Z"


def iso_from_ms(epoch_ms: int) -> str:
    """Exchange millisecond times keep exactly millisecond precision (`iso_from_ns(epoch_ms *
    1_000_000, digits=3)`, without the detour)."""
    seconds, ms = divmod(epoch_ms, 1000)
    return f"{_second_text(seconds)}.{_THREE_DIGITS[ms]}Z"


_SECOND_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}")
_FRACTION_SCALE = tuple(10 ** (9 - n) for n in range(10))


@lru_cache(maxsize=64)
def _second_of(prefix: str) -> int:
    """Epoch second of `YYYY-MM-DDTHH:MM:SS` (UTC). Raises ValueError (not cached)."""
    if _SECOND_RE.fullmatch(prefix) is None:
        raise ValueError(f"not an ISO 8601 time: {prefix[:40]!r}")
    return _epoch_second(int(prefix[0:4]), int(prefix[5:7]), int(prefix[8:10]),
                         int(prefix[11:13]), int(prefix[14:16]), int(prefix[17:19]))


def parse_iso(text: str) -> tuple[str, int]:
    """Validate an exchange ISO 8601 UTC time; return (canonical text, epoch ns).

    The canonical text keeps every fractional digit the exchange sent and ends in `Z`.
    Raises ValueError for anything that is not a UTC ISO time.
    """
    # Fast path for what venues send (`2026-11-29T10:38:02.672020Z`, Coinbase and Kraken): the
    # text is already canonical and its second is cached, since updates of one second share it.
    # (`event_time` inlines this path too.)
    if 20 < len(text) <= 30 and text[19] == "." and text[-1] == "Z":
        frac = text[20:-1]
        if frac.isascii() and frac.isdigit():
            return text, _second_of(text[:19]) * 1_000_000_000 + int(frac) * _FRACTION_SCALE[
                len(frac)]
    return _parse_iso_general(text)


def _parse_iso_general(text: str) -> tuple[str, int]:
    """`parse_iso` for every accepted form (no fraction, `+00:00`, `-0000`)."""
    m = _ISO_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"not an ISO 8601 UTC time: {text[:40]!r}")
    year, month, day, hour, minute, sec, frac, _tz = m.groups()
    whole_s = _epoch_second(int(year), int(month), int(day), int(hour), int(minute), int(sec))
    frac = frac or ""
    ns = whole_s * 1_000_000_000 + (int(frac.ljust(9, "0")) if frac else 0)
    canon = f"{year}-{month}-{day}T{hour}:{minute}:{sec}" + (f".{frac}" if frac else "") + "Z"
    return canon, ns


def event_time(raw: object, received_ns: int) -> tuple[str, int] | None:
    """`parse_iso(raw)` when `raw` is a string whose time can be a real event (as
    `plausible_event_ns` says), else None: the exchange time of a ticker that may not have one.

    The common case (`parse_iso`'s fast path) is inlined: this runs once per Coinbase and Kraken
    ticker."""
    if (type(raw) is str and 20 < len(raw) <= 30 and raw[19] == "." and raw[-1] == "Z"
            and (frac := raw[20:-1]).isdigit() and frac.isascii()):
        try:
            event_ns = _second_of(raw[:19]) * 1_000_000_000 + int(frac) * _FRACTION_SCALE[len(frac)]
        except ValueError:  # no such date
            return None
        text = raw
    elif isinstance(raw, str):
        try:
            text, event_ns = _parse_iso_general(raw)
        except ValueError:
            return None
    else:
        return None
    if MIN_EVENT_NS <= event_ns <= received_ns + MAX_EVENT_AHEAD_NS:
        return text, event_ns
    return None


def plausible_event_ns(event_ns: int, received_ns: int) -> bool:
    """True when an exchange time can be a real event: not a placeholder, and not more than
    MAX_EVENT_AHEAD_NS ahead of its receive time."""
    return MIN_EVENT_NS <= event_ns <= received_ns + MAX_EVENT_AHEAD_NS


def positive_finite(value: float) -> bool:
    return math.isfinite(value) and value > 0


def canonical_symbol_ok(symbol: str) -> bool:
    """`BASE/QUOTE`, upper-case letters and digits, 1-20 characters each side."""
    return _SYMBOL_RE.fullmatch(symbol) is not None


_SYMBOL_RE = re.compile(r"[A-Z0-9]{1,20}/[A-Z0-9]{1,20}")
