"""The Adapter protocol: pure translation between one venue's frames and PriceFeed records.

Adapters do no I/O, read no clock and start no thread: the connection loop hands them a frame and
its receive time, and gets back a `Parsed` saying what the frame was. They may keep small state
(last sequence per product) that lives as long as the collector process.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from typing import Generic, NamedTuple, Protocol, TypeVar, runtime_checkable

from collectors.errors import ParseError
from collectors.model import Metadata, PriceFeed, iso_from_ns


class Kind(StrEnum):
    """What a frame was; also the `kind` label of the messages-received metric."""

    TICKER = "ticker"
    HEARTBEAT = "heartbeat"
    SUBSCRIBED = "subscribed"
    ERROR = "error"
    STATUS = "status"
    PONG = "pong"
    SHUTDOWN = "shutdown"
    OTHER = "other"


#: Frame text -> JSON value; raises ParseError, and only ParseError, for bad input. Adapters
#: take one in their constructor: `load_json` (standard library) unless the service passes a
#: faster one (collectors/decoding.py), so adapters themselves import nothing but the stdlib.
#: When it is also a `ShapedDecoder` (the service's is), adapters decode their tickers with it.
Decoder = Callable[[str | bytes], object]

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Rule(StrEnum):
    """What a typed decoder checks a field of a `Shape` for (see `ShapedDecoder`)."""

    #: Any JSON value, unchecked and unconverted: the adapter checks it.
    ANY = "any"
    #: A string (of any length: the adapter checks lengths).
    TEXT = "text"
    #: A finite number > 0, as a float.
    POSITIVE = "positive"
    #: A finite number >= 0, as a float.
    NON_NEGATIVE = "non_negative"
    #: A finite number, as a float.
    SIGNED = "signed"


class Field(NamedTuple):
    """One key of a `Shape`: absent (or, for an optional ANY field, null) reads as None."""

    key: str
    rule: Rule | Shape[object] | Items
    required: bool = False


@dataclass(frozen=True, slots=True)
class Shape(Generic[T_co]):
    """The one common data frame of a venue (its ticker), described for a typed decoder.

    `T_co` is the adapter's Protocol for the decoded object: one attribute per field, named by its
    key. A frame matches when it is a JSON object that carries `tag` (key, value), every required
    field, and values that follow their rules; `closed` shapes allow no other keys (they change
    the frame's meaning). A field may itself be an object (a nested `Shape`) or a list of them.
    """

    fields: tuple[Field, ...]
    tag: tuple[str, str] | None = None
    closed: bool = False


@dataclass(frozen=True, slots=True)
class Items:
    """A field that is a JSON list of objects of one shape."""

    shape: Shape[object]


@runtime_checkable
class ShapedDecoder(Protocol):
    """A `Decoder` that can also decode a frame straight into a venue's `Shape`, checking and
    converting its numbers in C (collectors/decoding.py). Adapters use it for their ticker and
    decode every frame that does not match (`None`) as before, so nothing else changes."""

    def __call__(self, frame: str | bytes) -> object: ...

    def shaped(self, shape: Shape[T], *,
               decimal_strings: bool = False) -> Callable[[str | bytes], T | None]:
        """A function: frame -> the decoded `T`, or None when the frame does not match `shape`
        exactly (invalid JSON included: the adapter's generic path then says what is wrong).

        Numbers are JSON numbers, or with `decimal_strings` also strings that `float()` reads
        to the same value. A matched frame's numbers have exactly the values the generic path
        would compute, so that both paths build identical records.
        """
        ...


# Slotted but not frozen: a frozen dataclass sets each field through object.__setattr__, which
# made building one of these (once per frame) twice as slow. Nothing mutates one after `parse`.
@dataclass(slots=True)
class Parsed:
    """The meaning of one frame.

    `records` holds the valid records it produced; `duplicates` counts ticker updates dropped
    because their sequence was at or below the last seen; `rejected` names canonical symbols the
    venue refused to subscribe to; `error` is the venue's error text; `reconnect` asks the
    connection to be replaced (a scheduled server shutdown); `invalid` gives one reason per item
    of a multi-item frame that was skipped as invalid (each is one parse error) while the frame's
    valid items are still in `records`. `retry_subscribe`, when not None, says the venue refused
    a subscribe for a passing reason (a rate limit, an internal error), not because a market is
    unknown: the symbols it names (every symbol, when it names none) are subscribed again later.
    """

    kind: Kind
    records: tuple[PriceFeed, ...] = ()
    duplicates: int = 0
    rejected: tuple[str, ...] = ()
    error: str | None = None
    reconnect: bool = False
    subscribed: tuple[str, ...] = ()
    invalid: tuple[str, ...] = ()
    retry_subscribe: tuple[str, ...] | None = None


class Adapter(Protocol):
    """One venue. Implementations live in `collectors/exchanges/<venue>.py`."""

    name: str
    #: Frame text -> JSON value (given to the constructor; `load_json` by default).
    decode: Decoder
    #: The public endpoint (`WS_URL` replaces it).
    default_ws_url: str
    default_symbols: tuple[str, ...]
    #: No frame of any kind for this long means the connection is dead.
    liveness_timeout_s: float
    #: Send `ping_message()` when nothing was received for this long (None: never).
    app_ping_interval_s: float | None
    #: Send a WebSocket ping frame (RFC 6455; its pong counts as a frame for liveness) when
    #: nothing was received for this long (None: never).
    ws_ping_interval_s: float | None
    #: A symbol with no data for this long is stale (reported, not reconnected).
    symbol_stale_after_s: float
    #: True when every subscribed symbol stale means the stream is stuck, not that the markets
    #: are quiet: the venue pushes each symbol's ticker on a clock (Binance, every second), so
    #: the collector asks for a new connection and /healthz says "stale" (503). False where
    #: tickers follow trades (Coinbase, Kraken): quiet markets are only reported ("degraded").
    reconnect_when_all_stale: bool
    #: Replace the connection before the venue cuts it at this age (Binance: 24 h); None: never.
    max_connection_age_s: float | None
    #: True when `connect_url` builds the path and query itself (Binance: the streams), so
    #: WS_URL must be the base address alone (config refuses one with a path or query).
    ws_url_is_base: bool
    #: True when a rejected symbol voids the whole subscribe request (Coinbase), so the others
    #: must be subscribed again; False when the venue rejects symbols one by one (Kraken).
    resubscribe_after_reject: bool

    def check_symbols(self, symbols: Sequence[str]) -> list[str]:
        """Raise ConfigError for a symbol this venue is known not to list; return those it
        cannot vouch for (outside its table of markets: the service names them at start)."""

    def connect_url(self, base_url: str, symbols: Sequence[str]) -> str:
        """The URL to open for these symbols (Binance puts its streams in the path)."""

    def subscribe_messages(self, symbols: Sequence[str]) -> list[str]:
        """Frames to send right after connecting (may be empty)."""

    def ping_message(self) -> str | None:
        """An application-level ping frame, if the venue has one."""

    def http_error_hint(self, status: int) -> str | None:
        """What to tell the operator when the handshake is refused with this HTTP status."""

    def parse(self, frame: str | bytes, received_ns: int) -> Parsed:
        """Translate one frame. Raises ParseError, and only ParseError, for bad input."""

    def dedup_mark(self, record: PriceFeed) -> tuple[str, int] | None:
        """(key, value) of this adapter's dedup state for the record's key (its last sequence,
        its newest time), if any, as it stands after the frames parsed so far. The collector
        persists it with the records (the value given last for a key wins), so after a restart
        the venue's replay of the last update (a first ticker after subscribing repeats it) is
        not stored twice."""

    def restore_marks(self, marks: Mapping[str, int]) -> None:
        """Seed the dedup state from persisted marks (before the first frame)."""


# ---- helpers shared by adapters (pure) -------------------------------------------------------

def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


# One decoder for every frame: json.loads(..., parse_constant=...) builds a new one per call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def load_json(frame: str | bytes) -> object:
    """Decode a frame (UTF-8 text); NaN/Infinity literals and invalid UTF-8 are parse errors."""
    try:
        text = frame.decode("utf-8") if isinstance(frame, bytes | bytearray) else frame
        return _DECODER.decode(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError too
        raise ParseError(f"malformed JSON: {str(exc)[:120]}") from exc


def load_object(frame: str | bytes, decode: Decoder = load_json) -> dict[str, object]:
    """Decode a frame that must hold a JSON object. Raises ParseError."""
    data = decode(frame)
    if not isinstance(data, dict):
        raise ParseError(f"expected a JSON object, got {type(data).__name__}")
    return data


# A decimal string as venues write numbers: JSON's number syntax, ASCII only. `float()` alone
# also reads "1_000", " 7 ", "inf", "nan" and other scripts' digits ("١٢"): never a venue's.
# (msgspec, on the shaped path, reads exactly this syntax, so both paths agree.)
_decimal = re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?").fullmatch


def number(obj: dict[str, object], key: str, *, positive: bool = False,
           required: bool = True, signed: bool = False) -> float | None:
    """A numeric field sent as a JSON number or a decimal string; finite, >= 0 (> 0 if positive).

    `signed` allows negative values (24 h changes). Raises ParseError, and only ParseError.
    """
    raw = obj.get(key)
    if type(raw) is str:  # the common case first: venues send decimal strings
        if _decimal(raw) is None:
            raise ParseError(f"field {key!r} is not a number: {raw[:40]!r}")
        value = float(raw)
        if (value > 0 or (value == 0 and not positive)) and value != math.inf:
            return value  # finite and in range
        # Otherwise the full checks below say what is wrong.
    if raw is None:
        if required:
            raise ParseError(f"missing field {key!r}")
        return None
    if isinstance(raw, bool):
        raise ParseError(f"field {key!r} is a boolean, not a number")
    if isinstance(raw, int | float):
        try:
            value = float(raw)
        except OverflowError:  # a JSON integer beyond the float range
            raise ParseError(f"field {key!r} is out of range") from None
    elif isinstance(raw, str):  # a str subclass
        if _decimal(raw) is None:
            raise ParseError(f"field {key!r} is not a number: {raw[:40]!r}")
        value = float(raw)
    else:
        raise ParseError(f"field {key!r} has type {type(raw).__name__}, expected a number")
    if not math.isfinite(value):
        raise ParseError(f"field {key!r} is not finite: {raw!r}")
    if not signed and (value < 0 or (positive and value == 0)):
        raise ParseError(f"field {key!r} must be {'> 0' if positive else '>= 0'}: {raw!r}")
    return value


def copy_numbers(src: dict[str, object], fields: Sequence[tuple[str, str]],
                 into: Metadata) -> None:
    """`into[out_key] = number` for each (out_key, in_key) whose value in `src` is a valid
    number >= 0 (as `optional_number`): absent or invalid ones are left out. The hot path of
    every ticker's metadata, so the decimal-string case is inlined."""
    for out_key, in_key in fields:
        raw = src.get(in_key)
        if raw is None:
            continue
        if type(raw) is str:
            if _decimal(raw) is None:
                continue
            value = float(raw)
            if value >= 0 and value != math.inf:
                into[out_key] = value
            continue
        checked = optional_number(src, in_key)
        if checked is not None:
            into[out_key] = checked


def optional_number(obj: dict[str, object], key: str, *, signed: bool = False) -> float | None:
    """Like `number` for metadata: absent -> None; present but invalid -> None (not fatal)."""
    try:
        return number(obj, key, required=False, signed=signed)
    except ParseError:
        return None


def signed_or_none(raw: object) -> float | None:
    """`optional_number(obj, key, signed=True)` of the value `obj.get(key)`: a finite number, or
    None when absent or invalid."""
    if type(raw) is str:  # the common case first: venues send decimal strings
        if _decimal(raw) is None:
            return None
        value = float(raw)
    elif isinstance(raw, int | float) and not isinstance(raw, bool):
        try:
            value = float(raw)
        except OverflowError:  # a JSON integer beyond the float range
            return None
    else:
        return None
    return value if -math.inf < value < math.inf else None  # NaN fails both tests


def string(obj: dict[str, object], key: str, *, max_len: int = 64) -> str:
    return checked_string(obj.get(key), key, max_len=max_len)


def checked_string(raw: object, key: str, *, max_len: int = 64) -> str:
    """`raw`, the value of field `key`, when it is a non-empty string of at most `max_len`
    characters. Raises ParseError."""
    if not isinstance(raw, str) or not raw:
        raise ParseError(f"field {key!r} must be a non-empty string")
    if len(raw) > max_len:
        raise ParseError(f"field {key!r} is longer than {max_len} characters")
    return raw


@lru_cache(maxsize=8)
def received_iso(received_ns: int) -> str:
    """The receive time as `metadata.received_at` writes it (µs). Cached: every frame cut from
    one socket read carries the same receive time."""
    return iso_from_ns(received_ns, digits=6)
