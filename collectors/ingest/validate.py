"""Pure validation of an ingest request body: bytes -> ValidFeed records, or Problems naming each.

No I/O and no clock: the caller passes `now_ns`. `validate_body` raises only `BodyError`; every
other defect is a `Problem` (record index, field, what is wrong) and the whole batch is refused.

Numbers are parsed as `Decimal`, so a price is stored exactly as the collector wrote it where the
backend can hold that (PostgreSQL `numeric`). JSON's non-standard `NaN`/`Infinity` literals never
become floats: they parse to a marker that validation reports against the record and field that
carried it (a 422 naming the field is more useful to the sender than a bare 400). So do float
literals that no Decimal holds (an exponent beyond the decimal module's range, such as
`1e999999999999999999999`): they are judged by the float they denote, an infinity or a zero, as
`1e400` and `1e-400` are. A price or volume needing more than MAX_NUMBER_SCALE (16383) digits
after the point is refused too, whatever the backend: PostgreSQL would refuse to store it, every
time the collector retried. So is a negative volume whose float is a mere -0.0 (`-1e-400`): the
sign is checked on the decimal (`-0` and `-0.0` are zeros, and valid).
"""

from __future__ import annotations

import json
import math
import re
import sys
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from itertools import accumulate, repeat
from operator import add, attrgetter, itemgetter, mul
from typing import Annotated, Any, TypedDict, overload

import msgspec

from collectors.model import MAX_FUTURE_SKEW_NS, MIN_EVENT_NS, parse_iso

MAX_PROBLEMS = 100
MAX_METADATA_KEYS = 64
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_STRING_CHARS = 256
MAX_METADATA_JSON_BYTES = 4096
MAX_NUMBER_DIGITS = 40
#: Digits after the decimal point a price or volume may need (PostgreSQL `numeric` holds up to
#: 16383; `1e-16384` would fail to store, and a batch the database always refuses would be
#: retried by the collector forever). Both backends apply the same rule.
MAX_NUMBER_SCALE = 16383
MAX_TIMESTAMP_CHARS = 40

FEED_FIELDS = frozenset(
    {"symbol", "price", "volume", "timestamp", "source", "worker_id", "metadata"}
)

# fullmatch, not `$`: `$` also matches before a trailing newline.
_SYMBOL_RE = re.compile(r"[A-Z0-9]{1,20}/[A-Z0-9]{1,20}")
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")

MetaScalar = str | int | float | bool | None


class ValidFeed(TypedDict):
    """One record that passed every rule, in the forms the storage backends want."""

    symbol: str
    price: Decimal
    volume: Decimal | None
    timestamp: str  # canonical ISO 8601 UTC text: every digit the sender gave, ending in Z
    timestamp_ns: int
    source: str
    worker_id: str
    metadata: dict[str, MetaScalar]
    metadata_json: str  # compact JSON text of `metadata`


@dataclass(frozen=True, slots=True)
class Problem:
    """One rule a record broke. `index` is None for problems with the body as a whole."""

    index: int | None
    field: str
    problem: str

    def as_dict(self) -> dict[str, object]:
        return {"index": self.index, "field": self.field, "problem": self.problem}


class BodyError(ValueError):
    """The body cannot be read as a batch at all: 400 (not JSON) or 413 (too many records)."""

    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.title = title
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Validation:
    """The verdict on one batch: valid records, or the problems (first MAX_PROBLEMS of them).

    `feeds` is a list, or (from `validate_batch` only) a `FeedBatch`.
    """

    feeds: Sequence[ValidFeed]
    problems: list[Problem]
    invalid_records: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


class _NonFinite:
    """What `NaN`, `Infinity` and `-Infinity` parse to: never a float."""

    __slots__ = ("literal",)

    def __init__(self, literal: str) -> None:
        self.literal = literal


class _Unholdable:
    """What a JSON float literal parses to when `Decimal(literal)` fails (InvalidOperation: an
    exponent beyond the decimal module's range, e.g. `1e999999999999999999999`): never a
    Decimal. `float()` of it is the float the literal denotes, an infinity or a (signed) zero,
    which validation judges it by, as it judges `1e400` and `1e-400`."""

    __slots__ = ("literal",)

    def __init__(self, literal: str) -> None:
        self.literal = literal

    def __float__(self) -> float:
        return float(self.literal)

    @property
    def digits(self) -> int:
        """How many digits `Decimal(literal).as_tuple().digits` would have."""
        coefficient = self.literal.lower().lstrip("-").partition("e")[0].replace(".", "")
        return len(coefficient.lstrip("0")) or 1


def _decimal_or_unholdable(literal: str) -> Decimal | _Unholdable:
    """json's `parse_float`: the literal's exact Decimal, or an `_Unholdable` (a 422 naming the
    record and field, never an exception out of `parse_body`)."""
    try:
        return Decimal(literal)
    except (ArithmeticError, ValueError):  # InvalidOperation (and OverflowError)
        return _Unholdable(literal)


class _DuplicateKeyError(ValueError):
    pass


def _pairs_to_dict(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # Two parsers that disagree on which duplicate wins are a classic smuggling trick: refuse.
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKeyError(f"duplicate key {_show(key)} in a JSON object")
            seen.add(key)
    return out


def valid_symbol(value: str) -> bool:
    """A canonical `BASE/QUOTE` symbol (the rule records are held to)."""
    return _SYMBOL_RE.fullmatch(value) is not None


def valid_name(value: str) -> bool:
    """A `source` or `worker_id`: 1-64 characters of A-Z a-z 0-9 . _ -."""
    return _NAME_RE.fullmatch(value) is not None


def parse_body(raw: bytes) -> object:
    """Parse strict UTF-8 JSON. Raises BodyError(400) for anything that is not JSON."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BodyError(400, "Malformed JSON", "the body is not valid UTF-8") from None
    try:
        return json.loads(text, parse_float=_decimal_or_unholdable, parse_constant=_NonFinite,
                          object_pairs_hook=_pairs_to_dict)
    except _DuplicateKeyError as exc:
        raise BodyError(400, "Malformed JSON", str(exc)) from None
    except json.JSONDecodeError as exc:
        raise BodyError(400, "Malformed JSON",
                        f"{exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except ValueError as exc:  # e.g. an integer literal beyond Python's digit limit
        raise BodyError(400, "Malformed JSON", f"unreadable JSON: {str(exc)[:100]}") from None
    except RecursionError:
        raise BodyError(400, "Malformed JSON", "JSON nested too deeply") from None


def validate_body(raw: bytes, *, max_feeds: int, now_ns: int) -> Validation:
    """Parse and validate a whole request body. Raises BodyError (400 or 413).

    The valid records come as a list of ValidFeed dicts."""
    verdict = validate_batch(raw, max_feeds=max_feeds, now_ns=now_ns)
    if isinstance(verdict.feeds, FeedBatch):
        return Validation(list(verdict.feeds), [], 0)
    return verdict


def validate_batch(raw: bytes, *, max_feeds: int, now_ns: int) -> Validation:
    """`validate_body`, except that the valid records of an ordinary batch come as a
    `FeedBatch` (the same records, held by column, which the storage backends read without
    building a dict per record). Raises BodyError (400 or 413)."""
    fast = fast_validation(raw, max_feeds=max_feeds, now_ns=now_ns)
    return fast if fast is not None else slow_validation(raw, max_feeds=max_feeds, now_ns=now_ns)


def fast_validation(raw: bytes, *, max_feeds: int, now_ns: int) -> Validation | None:
    """`validate_batch`'s verdict on an ordinary all-valid body (msgspec, typed, by column),
    or None: then `slow_validation` decides."""
    fast = _fast_body(raw, max_feeds, now_ns)
    return None if fast is None else Validation(fast, [], 0)


def slow_validation(raw: bytes, *, max_feeds: int, now_ns: int) -> Validation:
    """`validate_batch`'s verdict by the stdlib parser and the rule-by-rule checks, which name
    every problem. Dear for a body of many tiny values (a Python object, a Decimal, per value:
    about 30x the body's size at worst), so the app runs one at a time. Raises BodyError."""
    return validate_document(parse_body(raw), max_feeds=max_feeds, now_ns=now_ns)


def validate_document(doc: object, *, max_feeds: int, now_ns: int) -> Validation:
    """Validate a parsed body `{"feeds": [...]}`. Raises BodyError(413) for too many records."""
    if not isinstance(doc, dict):
        return Validation([], [Problem(None, "(body)", "must be a JSON object with 'feeds'")])
    unknown = sorted(k for k in doc if k != "feeds")
    if unknown:
        return Validation([], [Problem(None, _show_key(unknown[0]), "unknown field")])
    feeds = doc.get("feeds")
    if not isinstance(feeds, list):
        return Validation([], [Problem(None, "feeds", "must be a list of records")])
    if not feeds:
        return Validation([], [Problem(None, "feeds", "must not be empty")])
    if len(feeds) > max_feeds:
        raise BodyError(413, "Too many records",
                        f"{len(feeds)} records in one batch; at most {max_feeds} are accepted")
    fast = _fast_feeds(feeds, now_ns)
    if fast is not None:
        return Validation(fast, [], 0)
    # Something in the batch is off (or unusual): the detailed path finds and names every
    # problem. It is also the reference: the fast path accepts only what it would accept.
    valid: list[ValidFeed] = []
    problems: list[Problem] = []
    invalid = 0
    for index, item in enumerate(feeds):
        found: list[Problem] = []
        feed = _validate_feed(index, item, now_ns, found)
        if found:
            invalid += 1
            problems.extend(found[: MAX_PROBLEMS - len(problems)])
        elif feed is not None:
            valid.append(feed)
    if problems:
        return Validation([], problems, invalid)
    return Validation(valid, [], 0)


# --- the fast path ---------------------------------------------------------------------------
#
# Almost every batch is entirely valid, so it is checked first by `_fast_feeds`: the same rules,
# with exact type tests and no Problem bookkeeping, returning None at the first doubt (any rule
# broken, any unusual input). A None sends the batch down the detailed path, which then decides
# and explains. So the fast path may only ever be stricter than `_validate_feed`, never looser,
# and the records it returns are identical to the ones `_validate_feed` builds.

_SECOND_PATTERN = r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}"
_FAST_ISO_RE = re.compile(f"({_SECOND_PATTERN})" + r"(?:\.([0-9]{1,9}))?(?:Z|[+-]00:?00)")
_SECOND_RE = re.compile(_SECOND_PATTERN)
_META_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False,
                              allow_nan=False).encode  # exactly json.dumps(..) with these args
_MAX_FAST_META_CHARS = MAX_METADATA_JSON_BYTES // 4  # 4 UTF-8 bytes per character at most


# The fast parser. msgspec decodes the common body several times faster than the stdlib, and
# checks most rules in C while it does: it decodes into `_FastDocument`, whose types say what an
# ordinary valid record looks like (`price` and `volume` stay untyped, so `float_hook` keeps
# every float literal's exact text, a `_Literal`). But it keeps the last of two duplicate keys
# where `parse_body` refuses the body, and its errors read differently. So it is used only for
# bodies that cannot hide a difference, and any doubt sends the body to `parse_body` +
# `validate_document`, which decide and explain exactly as before:
#   * no backslash anywhere: then every `"` delimits a string, strings hold no escapes (so no
#     NUL, control character or lone surrogate: msgspec refuses those raw, and invalid UTF-8),
#     and their JSON text is just `"` + text + `"`, as `json.dumps` writes it;
#   * so `raw.count(b'"')` is twice the number of strings (keys and values) written in the
#     text. Each string of the decoded document comes from a distinct one of those, and one is
#     missing exactly when a duplicate key was dropped (with the key's own string at least), so
#     the counts match only without duplicates. Optional fields default to UNSET, not None, so
#     that a key written with a `null` is counted too;
#   * msgspec must accept the text as a `_FastDocument` (it refuses NaN/Infinity, trailing
#     data, BOMs, leading zeros, deep nesting, unknown fields, a missing required field, a
#     value of another JSON type, and metadata breaking the size rules: all of those take the
#     stdlib path);
#   * the records must pass `_fast_columns` (the ordinary batch, a column at a time) or
#     `_fast_records` (record by record), which apply the remaining rules.

_MSGSPEC_ENCODE = msgspec.json.Encoder().encode
# msgspec writes the same shortest float digits as repr(), but exponents as `1e16`, not `1e+16`,
# and 1e-5 <= |x| < 1e-4 without one (`0.00001234`): floats that repr() writes with an exponent
# are written by repr() instead (`_json_floats`), which is what json.dumps writes.
_PLAIN_FLOAT_MIN = 1e-4
_PLAIN_FLOAT_MAX = 1e16
# What msgspec writes for the floats it writes differently from repr(): an exponent (`1e16`,
# `1.5e-7`: `e`, then a digit or `-`) or, for 1e-5 <= |x| < 1e-4, `0.0000...`.
_EXPONENT_RE = re.compile(rb"e[-0-9]")
_FRACTION_SCALE = tuple(10 ** (9 - n) for n in range(10))  # ns per unit of an n-digit fraction

# The metadata rules of `_metadata` and `_meta_scalar`, as types msgspec checks while decoding:
# strings of at most 256 characters (msgspec counts characters, as len() does), finite floats
# (msgspec refuses a literal beyond the float range itself; the bounds say so explicitly, so no
# change of msgspec can let an infinity through), at most 64 keys. A float literal becomes the
# float nearest to it, which is what float(Decimal(literal)) gives on the reference path;
# integer literals stay exact ints. Keys of 1-64 characters are checked after decoding, once
# per distinct key of the batch (`_metadata_keys_ok`): a length constraint on the key type
# costs msgspec a fifth of the decoding (its cache of key strings no longer applies).
_MetaText = Annotated[str, msgspec.Meta(max_length=MAX_METADATA_STRING_CHARS)]
_MetaFloat = Annotated[float, msgspec.Meta(ge=-sys.float_info.max, le=sys.float_info.max)]
_FastMetadata = Annotated[dict[str, _MetaText | int | _MetaFloat | bool | None],
                          msgspec.Meta(max_length=MAX_METADATA_KEYS)]


class _Literal(str):
    """The text of a JSON float literal, as msgspec's `float_hook` hands it over: what
    `parse_body` makes a Decimal of (`Decimal(literal)` is that Decimal), and a type of its own,
    which no JSON string decodes to."""

    __slots__ = ()


class _FastRecord(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """One record as `_fast_body` decodes it (never a cycle, so not tracked by the GC)."""

    symbol: str
    price: Any  # _Literal (float literal), int, or anything else: then the stdlib path
    timestamp: Annotated[str, msgspec.Meta(max_length=MAX_TIMESTAMP_CHARS)]
    source: str
    worker_id: str
    volume: Any = msgspec.UNSET
    metadata: _FastMetadata | msgspec.UnsetType | None = msgspec.UNSET


class _FastDocument(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    feeds: list[_FastRecord]


# The literal's text, not yet a Decimal: the usual batch needs only its float (SQLite) and its
# text (PostgreSQL), and a record's Decimal is made from it when one is asked for.
_FAST_DECODE = msgspec.json.Decoder(_FastDocument, float_hook=_Literal).decode


def _fast_body(raw: bytes, max_feeds: int, now_ns: int) -> Sequence[ValidFeed] | None:
    """Every record of an ordinary all-valid body (a FeedBatch, or a list when the columns do
    not fit `_fast_columns`), or None: then the stdlib path decides."""
    if type(raw) is not bytes or b"\\" in raw:
        return None
    try:
        feeds = _FAST_DECODE(raw).feeds
    except (msgspec.MsgspecError, ValueError, RecursionError):
        # whatever msgspec refuses, parse_body refuses or reads, and explains
        return None
    if not 0 < len(feeds) <= max_feeds:
        return None
    found: tuple[Sequence[ValidFeed], int] | None = _fast_columns(feeds, now_ns)
    if found is None:
        found = _fast_records(feeds, now_ns)
        if found is None:
            return None
    out, quotes = found
    if quotes != raw.count(b'"'):
        return None  # a duplicate key: let parse_body say
    return out


def _metadata_keys_ok(metas: list[dict[str, MetaScalar]]) -> bool:
    """Whether every key of these metadata objects has 1-64 characters (the decoder's type
    leaves that to this check: a batch's records share a few keys)."""
    keys: set[str] = set().union(*metas)
    return not keys or (min(map(len, keys)) > 0
                        and max(map(len, keys)) <= MAX_METADATA_KEY_CHARS)


def _scale(number: Decimal) -> int:
    """Digits after the decimal point of a finite Decimal (`1E-7`: 7; `1.50`: 2; `12E+3`: 0)."""
    exponent = number.as_tuple().exponent
    return -exponent if isinstance(exponent, int) and exponent < 0 else 0


def _fast_number(value: object, *, positive: bool) -> Decimal | None:
    """A price (`positive`: > 0) or volume (>= 0) for the fast paths, by the rules of `_number`:
    an int or a Decimal (or a float literal's text), at most MAX_NUMBER_DIGITS digits, finite as
    a float (the chained comparisons also refuse NaN), and a volume not negative as a decimal
    either (`-1e-400` is -0.0 as a float). None: the reference path decides."""
    if type(value) is _Literal or type(value) is int:
        try:
            number = Decimal(value)
        except (ArithmeticError, ValueError):  # a literal no Decimal holds: `_number` says
            return None
    elif type(value) is Decimal:
        number = value
    else:
        return None
    # str() shows every digit of the coefficient, so a short text needs no count; and it
    # writes an exponent whenever the scale is over 6 or so, so only then is it looked at.
    text = str(number)
    if len(text) > MAX_NUMBER_DIGITS and len(number.as_tuple().digits) > MAX_NUMBER_DIGITS:
        return None
    if "E" in text and _scale(number) > MAX_NUMBER_SCALE:
        return None
    as_float = float(number)
    if not (0.0 < as_float < math.inf if positive else 0.0 <= as_float < math.inf):
        return None
    if as_float == 0.0 and number < 0:  # a volume such as -1e-400: its float is a mere -0.0
        return None
    return number


def _fast_timestamp(stamp: str, seconds: dict[str, int]) -> tuple[str, int] | None:
    """(canonical text, epoch ns) of a record's timestamp for the fast paths, or None (then the
    reference path decides). `seconds` caches whole-second prefixes -> epoch ns, only for
    prefixes the pattern matched: the records of a batch share seconds."""
    # What venues send, `2026-11-29T10:38:02.672020Z`, is canonical already: once its second
    # has been matched, only the fraction needs a look.
    base = seconds.get(stamp[:19]) if stamp[-1:] == "Z" and stamp[19:20] == "." else None
    frac = stamp[20:-1]
    if base is not None and 0 < len(frac) <= 9 and frac.isascii() and frac.isdigit():
        return stamp, base + int(frac) * _FRACTION_SCALE[len(frac)]
    m = _FAST_ISO_RE.fullmatch(stamp)
    if m is None:
        return None
    whole, frac = m.group(1, 2)
    base = seconds.get(whole)
    if base is None:
        try:
            base = parse_iso(whole + "Z")[1]
        except ValueError:
            return None
        seconds[whole] = base
    if frac:
        return (stamp if stamp[-1] == "Z" else f"{whole}.{frac}Z",
                base + int(frac) * _FRACTION_SCALE[len(frac)])
    return (stamp if stamp[-1] == "Z" else whole + "Z"), base


def _json_floats(meta: dict[str, Any]) -> bytes:
    """The JSON of `meta` exactly as json.dumps writes it (compact, ensure_ascii=False), for
    metadata from a backslash-free body: msgspec's, except that each float repr() writes with an
    exponent is written by repr(), as json.dumps writes every float."""
    fixed = dict(meta)
    for key, value in meta.items():
        if type(value) is float and not _PLAIN_FLOAT_MIN <= abs(value) < _PLAIN_FLOAT_MAX \
                and value != 0.0:
            fixed[key] = msgspec.Raw(float.__repr__(value).encode("ascii"))
    return _MSGSPEC_ENCODE(fixed)


def _json_may_differ(data: bytes) -> list[int]:
    """Where msgspec's JSON of metadata objects may hold a float that json.dumps writes
    differently (see _EXPONENT_RE): offsets into `data`. Other text may look alike (a string
    `e-1`, a number `1.00001`), which only costs a closer look."""
    found = [m.start() for m in _EXPONENT_RE.finditer(data)]
    at = data.find(b".0000")
    while at >= 0:
        found.append(at)
        at = data.find(b".0000", at + 5)
    return found


class FeedBatch(Sequence[ValidFeed]):
    """The records of an all-valid batch, held by column (as `_fast_columns` builds them).

    `batch[i]` is the ValidFeed every other path builds for record i; the storage backends read
    the columns instead (SQLite the floats, PostgreSQL the decimal text), so that no dict (nor
    Decimal) is made per record. Every record has a volume and a metadata object.
    """

    __slots__ = ("metadata", "metadata_json", "metadata_plain", "price_floats", "price_texts",
                 "sources", "symbols", "timestamps", "timestamps_ns", "volume_floats",
                 "volume_texts", "worker_ids")

    def __init__(self, *, symbols: list[str], price_floats: list[float],
                 price_texts: list[str], volume_floats: list[float], volume_texts: list[str],
                 timestamps: list[str], timestamps_ns: list[int], sources: list[str],
                 worker_ids: list[str], metadata: list[dict[str, MetaScalar]],
                 metadata_json: list[str], metadata_plain: bool) -> None:
        self.symbols = symbols
        # str(price) of the record's Decimal price (which is Decimal(text): exact both ways),
        # as PostgreSQL's COPY reads it, and float(price), as SQLite stores it
        self.price_texts = price_texts
        self.price_floats = price_floats
        self.volume_texts = volume_texts
        self.volume_floats = volume_floats
        self.timestamps = timestamps
        self.timestamps_ns = timestamps_ns
        self.sources = sources
        self.worker_ids = worker_ids
        self.metadata = metadata
        self.metadata_json = metadata_json
        # whether no metadata text holds a tab, newline, carriage return or backslash (the
        # other columns never do: they match strict patterns)
        self.metadata_plain = metadata_plain

    def __len__(self) -> int:
        return len(self.symbols)

    @overload
    def __getitem__(self, index: int) -> ValidFeed: ...

    @overload
    def __getitem__(self, index: slice) -> list[ValidFeed]: ...

    def __getitem__(self, index: int | slice) -> ValidFeed | list[ValidFeed]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return {"symbol": self.symbols[index], "price": Decimal(self.price_texts[index]),
                "volume": Decimal(self.volume_texts[index]), "timestamp": self.timestamps[index],
                "timestamp_ns": self.timestamps_ns[index], "source": self.sources[index],
                "worker_id": self.worker_ids[index], "metadata": self.metadata[index],
                "metadata_json": self.metadata_json[index]}

    def __iter__(self) -> Iterator[ValidFeed]:
        for index in range(len(self.symbols)):
            yield self[index]

    def __repr__(self) -> str:
        return f"<FeedBatch of {len(self)} records>"


_GET_SYMBOL = attrgetter("symbol")
_GET_PRICE = attrgetter("price")
_GET_VOLUME = attrgetter("volume")
_GET_TIMESTAMP = attrgetter("timestamp")
_GET_SOURCE = attrgetter("source")
_GET_WORKER_ID = attrgetter("worker_id")
_GET_METADATA = attrgetter("metadata")
_FIRST_CHAR_OF = itemgetter(slice(0, 1))
_SECOND_OF = itemgetter(slice(0, 19))  # slices: a short string gives "", never IndexError
_CHAR_19_OF = itemgetter(slice(19, 20))
_FRACTION_OF = itemgetter(slice(20, -1))
_LAST_CHAR_OF = itemgetter(slice(-1, None))
_ONLY_LITERAL = {_Literal}
_ONLY_DICT = {dict}
_ONLY_DOT = {"."}
_ONLY_Z = {"Z"}


def _decimal_texts(literals: list[_Literal]) -> list[str] | None:
    """str(Decimal(literal)) of each float literal. That is the literal itself unless it has an
    exponent or its first significant digit comes 7 or more places after the point (then str()
    writes an exponent: `0.0000001` -> `1E-7`); a literal holding `0.000000` anywhere is
    converted, which is only slower. None if a literal has no Decimal (an exponent beyond the
    decimal module's range, such as `1e-999999999999999999999`, whose float is a mere 0.0) or
    needs more than MAX_NUMBER_SCALE digits after the point."""
    every = "".join(literals)
    if "e" in every or "E" in every or "0.000000" in every:
        try:
            numbers = list(map(Decimal, literals))
        except (ArithmeticError, ValueError):
            return None
        # (a context not trapping InvalidOperation makes such a literal NaN instead)
        if not all(map(Decimal.is_finite, numbers)):
            return None
        if max(map(_scale, numbers)) > MAX_NUMBER_SCALE:
            return None  # `_number` names the record and the field
        return list(map(str, numbers))
    return list(literals)  # (str subclasses: as good as str to join, and not copied)


def _fast_columns(feeds: list[_FastRecord], now_ns: int) -> tuple[FeedBatch, int] | None:
    """`_fast_records` for the ordinary batch, a column at a time in C loops (map, set, min,
    max, join), or None: then `_fast_records` decides. Ordinary means: every price and volume a
    float literal, every timestamp `YYYY-MM-DDTHH:MM:SS.<1-9 digits>Z`, every metadata an object.
    The rules, the records and the quote count are `_fast_records`'s.
    """
    n = len(feeds)
    symbols = list(map(_GET_SYMBOL, feeds))
    sources = list(map(_GET_SOURCE, feeds))
    worker_ids = list(map(_GET_WORKER_ID, feeds))
    for symbol in {*symbols}:  # records of a batch share a few symbols and names
        if _SYMBOL_RE.fullmatch(symbol) is None:
            return None
    for name in {*sources, *worker_ids}:
        if _NAME_RE.fullmatch(name) is None:
            return None

    # Numbers: `_fast_number`'s rules, on float literals' text. A literal has at least as many
    # characters as digits: one of at most MAX_NUMBER_DIGITS characters is short enough (longer:
    # `_fast_records` counts). float(text) is float(Decimal(text)): both are the double nearest
    # to the literal's exact value (and never NaN).
    prices: list[_Literal] = list(map(_GET_PRICE, feeds))
    volumes: list[_Literal] = list(map(_GET_VOLUME, feeds))
    if {*map(type, prices)} != _ONLY_LITERAL or {*map(type, volumes)} != _ONLY_LITERAL:
        return None
    if max(map(len, prices)) > MAX_NUMBER_DIGITS or max(map(len, volumes)) > MAX_NUMBER_DIGITS:
        return None
    price_floats = list(map(float, prices))
    volume_floats = list(map(float, volumes))
    least_volume = min(volume_floats)
    if not (min(price_floats) > 0.0 and max(price_floats) < math.inf
            and least_volume >= 0.0 and max(volume_floats) < math.inf):
        return None
    # A negative literal whose float is -0.0 may be a zero (`-0.0`: valid) or a negative
    # number too small for a float (`-1e-400`: refused): `_fast_records` tells them apart.
    if least_volume == 0.0 and "-" in {*map(_FIRST_CHAR_OF, volumes)}:
        return None
    price_texts = _decimal_texts(prices)
    volume_texts = _decimal_texts(volumes)
    if price_texts is None or volume_texts is None:
        return None

    # Timestamps: what `_fast_timestamp` accepts as canonical already, `<second>.<fraction>Z`
    # (the second matched once per distinct second, the fraction 1-9 ASCII digits), read the
    # same way: epoch ns of the second + the fraction in ns.
    stamps: list[str] = list(map(_GET_TIMESTAMP, feeds))
    if {*map(_LAST_CHAR_OF, stamps)} != _ONLY_Z or {*map(_CHAR_19_OF, stamps)} != _ONLY_DOT:
        return None
    fractions = list(map(_FRACTION_OF, stamps))
    digits = list(map(len, fractions))
    if min(digits) < 1 or max(digits) > 9:
        return None
    every_fraction = "".join(fractions)
    if not (every_fraction.isascii() and every_fraction.isdigit()):
        return None
    seconds = list(map(_SECOND_OF, stamps))
    second_ns: dict[str, int] = {}
    for second in {*seconds}:
        if _SECOND_RE.fullmatch(second) is None:
            return None
        try:
            second_ns[second] = parse_iso(second + "Z")[1]
        except ValueError:
            return None
    # (one length of fraction, one second: the usual batch, and the cheaper loops)
    scales = (repeat(_FRACTION_SCALE[digits[0]]) if min(digits) == max(digits)
              else map(_FRACTION_SCALE.__getitem__, digits))
    bases = repeat(second_ns[seconds[0]]) if len(second_ns) == 1 \
        else map(second_ns.__getitem__, seconds)
    stamps_ns = list(map(add, bases, map(mul, map(int, fractions), scales)))
    if min(stamps_ns) < MIN_EVENT_NS or max(stamps_ns) > now_ns + MAX_FUTURE_SKEW_NS:
        return None

    # Metadata: msgspec's JSON, measured as `_fast_records` measures it; json.dumps's where a
    # float needs it (rare: the whole batch is looked at once, then only records that may).
    metas: list[dict[str, MetaScalar]] = list(map(_GET_METADATA, feeds))
    if {*map(type, metas)} != _ONLY_DICT or not _metadata_keys_ok(metas):
        return None
    blobs = list(map(_MSGSPEC_ENCODE, metas))
    if max(map(len, blobs)) > MAX_METADATA_JSON_BYTES:
        return None
    # One text to scan (no pattern below can span two objects: they touch at `}{`).
    joined = b"".join(blobs)
    # the body's "feeds"; per record 18 (as `_fast_records`), "volume" and "metadata" keys, and
    # the metadata's own
    quotes = 2 + 22 * n + joined.count(b'"')
    suspects = _json_may_differ(joined)
    if suspects:
        # record i's text ends just before offset ends[i]
        ends = list(accumulate(map(len, blobs)))
        for index in {bisect_right(ends, at) for at in suspects}:
            data = _json_floats(metas[index])
            if len(data) > MAX_METADATA_JSON_BYTES:
                return None
            blobs[index] = data
    # (before any float was rewritten above: that changes digits only)
    plain = not (b"\\" in joined or b"\t" in joined or b"\n" in joined or b"\r" in joined)
    batch = FeedBatch(symbols=symbols, price_floats=price_floats,
                      price_texts=price_texts, volume_floats=volume_floats,
                      volume_texts=volume_texts, timestamps=stamps,
                      timestamps_ns=stamps_ns, sources=sources, worker_ids=worker_ids,
                      metadata=metas, metadata_json=list(map(bytes.decode, blobs)),
                      metadata_plain=plain)
    return batch, quotes


def _fast_records(feeds: list[_FastRecord], now_ns: int) -> tuple[list[ValidFeed], int] | None:
    """The records of `_fast_body` and the number of `"` its strings take as JSON, or None.

    The same rules as `_fast_feeds` (and so `_validate_feed`) apply, minus the ones msgspec
    checked while decoding; the records built are identical to the reference path's.
    """
    out: list[ValidFeed] = []
    append = out.append
    symbol_ok = _SYMBOL_RE.fullmatch
    name_ok = _NAME_RE.fullmatch
    encode = _MSGSPEC_ENCODE
    latest_ns = now_ns + MAX_FUTURE_SKEW_NS
    unset = msgspec.UNSET
    plain_min, plain_max = _PLAIN_FLOAT_MIN, _PLAIN_FLOAT_MAX
    max_meta_bytes = MAX_METADATA_JSON_BYTES
    # whole-second prefix -> epoch ns, only for prefixes `iso` matched: records share seconds
    seconds: dict[str, int] = {}
    # Records of a batch share a few symbols and names: each distinct one is matched once.
    good_symbols: set[str] = set()
    good_names: set[str] = set()
    # The body's "feeds"; each record's five required keys and four string values (a price
    # or volume that is a string is refused below). Metadata counts itself as msgspec writes it.
    quotes = 2 + 18 * len(feeds)
    metas: list[dict[str, MetaScalar]] = []  # for `_metadata_keys_ok`
    for item in feeds:
        symbol = item.symbol
        source = item.source
        worker_id = item.worker_id
        if symbol not in good_symbols:
            if symbol_ok(symbol) is None:
                return None
            good_symbols.add(symbol)
        if source not in good_names:
            if name_ok(source) is None:
                return None
            good_names.add(source)
        if worker_id not in good_names:
            if name_ok(worker_id) is None:
                return None
            good_names.add(worker_id)
        price = _fast_number(item.price, positive=True)
        if price is None:
            return None
        volume: Decimal | None = None
        if item.volume is not unset:
            quotes += 2
            if item.volume is not None:
                volume = _fast_number(item.volume, positive=False)
                if volume is None:
                    return None
        stamp = item.timestamp
        when = _fast_timestamp(stamp, seconds)
        if when is None:
            return None
        canon, ns = when
        if ns < MIN_EVENT_NS or ns > latest_ns:
            return None
        meta = item.metadata
        if meta is unset or meta is None:
            if meta is None:
                quotes += 2
            meta = {}
            text = "{}"
        else:
            metas.append(meta)
            data = encode(meta)
            quotes += 2 + data.count(b'"')
            if len(data) > max_meta_bytes:
                return None  # (json.dumps may write it shorter: let the stdlib path measure)
            for value in meta.values():
                if type(value) is float and not plain_min <= abs(value) < plain_max \
                        and value != 0.0:
                    data = _json_floats(meta)
                    if len(data) > max_meta_bytes:
                        return None
                    break
            text = data.decode("utf-8")
        feed: ValidFeed = {"symbol": symbol, "price": price, "volume": volume, "timestamp": canon,
                           "timestamp_ns": ns, "source": source, "worker_id": worker_id,
                           "metadata": meta, "metadata_json": text}
        append(feed)
    if not _metadata_keys_ok(metas):
        return None
    return out, quotes


def _fast_text_ok(text: str) -> bool:
    # _storable_text, cheap for the usual ASCII text
    if text.isascii():
        return "\x00" not in text
    return _storable_text(text)


def _fast_metadata(value: object) -> tuple[dict[str, MetaScalar], str] | None:
    if value is None:
        return {}, "{}"
    if type(value) is not dict or len(value) > MAX_METADATA_KEYS:
        return None
    clean: dict[str, MetaScalar] = {}
    inf = math.inf
    for key, item in value.items():
        if not 0 < len(key) <= MAX_METADATA_KEY_CHARS or not _fast_text_ok(key):
            return None
        kind = type(item)
        if kind is str:
            if len(item) > MAX_METADATA_STRING_CHARS or not _fast_text_ok(item):
                return None
            clean[key] = item
        elif kind is Decimal:
            as_float = float(item)
            if not -inf < as_float < inf:
                return None
            clean[key] = as_float
        elif kind is int or kind is bool or item is None:
            clean[key] = item
        else:
            return None
    text = _META_JSON(clean)
    if len(text) > _MAX_FAST_META_CHARS and len(text.encode("utf-8")) > MAX_METADATA_JSON_BYTES:
        return None
    return clean, text


def _fast_feeds(feeds: list[object], now_ns: int) -> list[ValidFeed] | None:
    """Every record of an all-valid batch (parsed by `parse_body`), or None: then the detailed
    path decides."""
    out: list[ValidFeed] = []
    append = out.append
    symbol_ok = _SYMBOL_RE.fullmatch
    name_ok = _NAME_RE.fullmatch
    latest_ns = now_ns + MAX_FUTURE_SKEW_NS
    seconds: dict[str, int] = {}  # whole-second prefix -> epoch ns: records share seconds
    # Records of a batch share a few symbols and names: each distinct one is matched once.
    good_symbols: set[str] = set()
    good_names: set[str] = set()
    known = FEED_FIELDS
    for item in feeds:
        if type(item) is not dict or not item.keys() <= known:
            return None
        symbol = item.get("symbol")
        source = item.get("source")
        worker_id = item.get("worker_id")
        stamp = item.get("timestamp")
        if type(symbol) is not str or type(source) is not str or type(worker_id) is not str \
                or type(stamp) is not str or len(stamp) > MAX_TIMESTAMP_CHARS:
            return None
        if symbol not in good_symbols:
            if symbol_ok(symbol) is None:
                return None
            good_symbols.add(symbol)
        if source not in good_names:
            if name_ok(source) is None:
                return None
            good_names.add(source)
        if worker_id not in good_names:
            if name_ok(worker_id) is None:
                return None
            good_names.add(worker_id)
        price = _fast_number(item.get("price"), positive=True)
        if price is None:
            return None
        volume: Decimal | None = None
        if item.get("volume") is not None:
            volume = _fast_number(item.get("volume"), positive=False)
            if volume is None:
                return None
        when = _fast_timestamp(stamp, seconds)
        if when is None:
            return None
        canon, ns = when
        if ns < MIN_EVENT_NS or ns > latest_ns:
            return None
        meta = _fast_metadata(item.get("metadata"))
        if meta is None:
            return None
        feed: ValidFeed = {"symbol": symbol, "price": price, "volume": volume, "timestamp": canon,
                           "timestamp_ns": ns, "source": source, "worker_id": worker_id,
                           "metadata": meta[0], "metadata_json": meta[1]}
        append(feed)
    return out


def _validate_feed(index: int, item: object, now_ns: int,
                   out: list[Problem]) -> ValidFeed | None:
    if not isinstance(item, dict):
        out.append(Problem(index, "(record)", "must be a JSON object"))
        return None
    for key in sorted(k for k in item if k not in FEED_FIELDS):
        out.append(Problem(index, _show_key(key), "unknown field"))

    symbol = _symbol(index, item.get("symbol"), out)
    price = _number(index, "price", item.get("price"), out, required=True, positive=True)
    volume = _number(index, "volume", item.get("volume"), out, required=False, positive=False)
    stamp = _timestamp(index, item.get("timestamp"), now_ns, out)
    source = _name(index, "source", item.get("source"), out)
    worker_id = _name(index, "worker_id", item.get("worker_id"), out)
    meta = _metadata(index, item.get("metadata"), out)
    if out or symbol is None or price is None or stamp is None or source is None \
            or worker_id is None or meta is None:
        return None
    return ValidFeed(symbol=symbol, price=price, volume=volume, timestamp=stamp[0],
                     timestamp_ns=stamp[1], source=source, worker_id=worker_id,
                     metadata=meta[0], metadata_json=meta[1])


def _symbol(index: int, value: object, out: list[Problem]) -> str | None:
    if value is None:
        out.append(Problem(index, "symbol", "required"))
    elif not isinstance(value, str):
        out.append(Problem(index, "symbol", f"must be a string, not {_kind(value)}"))
    elif _SYMBOL_RE.fullmatch(value) is None:
        out.append(Problem(index, "symbol", f"{_show(value)} is not a canonical symbol "
                                            "(BASE/QUOTE, A-Z and 0-9, 1-20 each side)"))
    else:
        return value
    return None


def _number(index: int, field: str, value: object, out: list[Problem], *, required: bool,
            positive: bool) -> Decimal | None:
    if value is None:
        if required:
            out.append(Problem(index, field, "required"))
        return None
    if isinstance(value, _NonFinite):
        out.append(Problem(index, field, f"{value.literal} is not a finite number"))
        return None
    if isinstance(value, _Unholdable):
        out.append(Problem(index, field, _unholdable_problem(value, positive=positive)))
        return None
    if isinstance(value, bool) or not isinstance(value, (int, Decimal)):
        out.append(Problem(index, field, f"must be a JSON number, not {_kind(value)}"))
        return None
    number = Decimal(value)
    if len(number.as_tuple().digits) > MAX_NUMBER_DIGITS:
        out.append(Problem(index, field, f"more than {MAX_NUMBER_DIGITS} significant digits"))
        return None
    if _scale(number) > MAX_NUMBER_SCALE:
        out.append(Problem(index, field,
                           f"more than {MAX_NUMBER_SCALE} digits after the decimal point"))
        return None
    as_float = float(number)
    if not math.isfinite(as_float):
        out.append(Problem(index, field, "is not a finite 64-bit number"))
        return None
    if positive and not as_float > 0:
        # (a price such as 1e-400 is 0 as a float: SQLite would store 0)
        tiny = " (0 as a 64-bit float)" if number > 0 else ""
        out.append(Problem(index, field, f"must be greater than 0, got {_short(number)}{tiny}"))
        return None
    if not positive and number < 0:  # the decimal: -1e-400 is -0.0 as a float
        out.append(Problem(index, field, f"must not be negative, got {_short(number)}"))
        return None
    return number


def _unholdable_problem(value: _Unholdable, *, positive: bool) -> str:
    """What `_number` says of a price or volume literal no Decimal holds: the rule it breaks,
    checked in `_number`'s order, by the float it denotes (an infinity or a zero), as for
    `1e400` and `1e-400`. A volume such as `1e-999999999999999999999` (a zero as a float, but
    not a zero) breaks no other rule; it is refused too, since the exact decimal the sender
    wrote cannot be stored."""
    if value.digits > MAX_NUMBER_DIGITS:
        return f"more than {MAX_NUMBER_DIGITS} significant digits"
    as_float = float(value)
    if not math.isfinite(as_float):
        return "is not a finite 64-bit number"
    if positive and not as_float > 0:
        return f"must be greater than 0, got {_short(value.literal)}"
    if not positive and as_float < 0:
        return f"must not be negative, got {_short(value.literal)}"
    return f"{_short(value.literal)} has an exponent beyond what can be stored exactly"


def _timestamp(index: int, value: object, now_ns: int,
               out: list[Problem]) -> tuple[str, int] | None:
    if value is None:
        out.append(Problem(index, "timestamp", "required"))
        return None
    if not isinstance(value, str):
        out.append(Problem(index, "timestamp", f"must be a string, not {_kind(value)}"))
        return None
    hint = "an ISO 8601 UTC time such as 2026-11-29T10:00:00.123456Z"
    if len(value) > MAX_TIMESTAMP_CHARS or not value.isascii():
        out.append(Problem(index, "timestamp", f"{_show(value)} is not {hint}"))
        return None
    try:
        canon, ns = parse_iso(value)
    except ValueError:
        out.append(Problem(index, "timestamp", f"{_show(value)} is not {hint}"))
        return None
    if ns < MIN_EVENT_NS:
        out.append(Problem(index, "timestamp", f"{canon} is before 2009-01-03"))
        return None
    if ns > now_ns + MAX_FUTURE_SKEW_NS:
        out.append(Problem(index, "timestamp", f"{canon} is more than a day in the future"))
        return None
    return canon, ns


def _name(index: int, field: str, value: object, out: list[Problem]) -> str | None:
    if value is None:
        out.append(Problem(index, field, "required"))
    elif not isinstance(value, str):
        out.append(Problem(index, field, f"must be a string, not {_kind(value)}"))
    elif _NAME_RE.fullmatch(value) is None:
        out.append(Problem(index, field, f"{_show(value)} must be 1-64 characters of "
                                         "A-Z a-z 0-9 . _ -"))
    else:
        return value
    return None


def _metadata(index: int, value: object,
              out: list[Problem]) -> tuple[dict[str, MetaScalar], str] | None:
    if value is None:
        return {}, "{}"
    if not isinstance(value, dict):
        out.append(Problem(index, "metadata", f"must be an object, not {_kind(value)}"))
        return None
    if len(value) > MAX_METADATA_KEYS:
        out.append(Problem(index, "metadata", f"{len(value)} keys; at most {MAX_METADATA_KEYS}"))
        return None
    clean: dict[str, MetaScalar] = {}
    ok = True
    for key, item in value.items():
        if not 1 <= len(key) <= MAX_METADATA_KEY_CHARS or not _storable_text(key):
            out.append(Problem(index, "metadata", f"key {_show(key)} must be 1-"
                               f"{MAX_METADATA_KEY_CHARS} characters without NUL"))
            ok = False
            continue
        field = f"metadata.{key}"
        scalar = _meta_scalar(index, field, item, out)
        if isinstance(scalar, _Invalid):
            ok = False
        else:
            clean[key] = scalar
    if not ok:
        return None
    text = json.dumps(clean, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    if len(text.encode("utf-8")) > MAX_METADATA_JSON_BYTES:
        out.append(Problem(index, "metadata", f"larger than {MAX_METADATA_JSON_BYTES} bytes "
                                              "as JSON"))
        return None
    return clean, text


class _Invalid:
    """Marks a metadata value that broke a rule (None is a valid value)."""


_INVALID = _Invalid()


def _meta_scalar(index: int, field: str, item: object,
                 out: list[Problem]) -> MetaScalar | _Invalid:
    if item is None or isinstance(item, (bool, int)):
        return item
    if isinstance(item, str):
        if len(item) > MAX_METADATA_STRING_CHARS:
            out.append(Problem(index, field, f"string longer than {MAX_METADATA_STRING_CHARS} "
                                             "characters"))
            return _INVALID
        if not _storable_text(item):
            out.append(Problem(index, field, "string contains NUL or unpaired surrogates"))
            return _INVALID
        return item
    if isinstance(item, (Decimal, _Unholdable)):
        # (an _Unholdable is judged by its float too: an infinity is refused, a zero kept)
        as_float = float(item)
        if not math.isfinite(as_float):
            out.append(Problem(index, field, "is not a finite 64-bit number"))
            return _INVALID
        return as_float
    if isinstance(item, _NonFinite):
        out.append(Problem(index, field, f"{item.literal} is not a finite number"))
        return _INVALID
    out.append(Problem(index, field, f"must be a string, number, boolean or null, not "
                                     f"{_kind(item)}"))
    return _INVALID


def _storable_text(text: str) -> bool:
    # PostgreSQL text and jsonb refuse NUL; UTF-8 refuses lone surrogates ("\ud800" is legal JSON).
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, Decimal, _NonFinite, _Unholdable)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _show(text: str) -> str:
    """A short, safe echo of a client string (never the whole of a 10,000-character one)."""
    if len(text) <= 40:
        return repr(text)
    return f"{text[:32]!r}... ({len(text)} characters)"


def _show_key(key: str) -> str:
    return key if len(key) <= 64 and key.isprintable() else _show(key)


def _short(number: Decimal | str) -> str:
    text = str(number)
    return text if len(text) <= 40 else text[:37] + "..."
