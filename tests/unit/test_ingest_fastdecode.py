"""The typed msgspec decoding of `_fast_body` agrees with the stdlib reference path.

`_fast_body` decodes into msgspec Structs whose types hold most of the rules (metadata key and
string lengths, finite floats, at most 64 keys, no unknown fields), reads timestamps of a second
it has already seen without the regex, and counts keys with UNSET defaults. Each of those must
give exactly the verdict `parse_body` + `validate_document` give: the same records (same Decimal
text, same metadata JSON), or the same problems, or the same BodyError.
"""

from __future__ import annotations

import json
import math
import random
import time
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collectors.ingest.validate import (
    BodyError,
    Validation,
    _fast_body,
    parse_body,
    validate_body,
    validate_document,
)
from tests.support.servers import make_feed

NOW_NS = time.time_ns()
MAX_FEEDS = 50
STAMP = str(make_feed()["timestamp"])  # e.g. 2026-05-09T11:58:30.123456Z, a minute ago
SECOND = STAMP[:19]


def _reference(raw: bytes) -> Validation | tuple[int, str, str]:
    try:
        return validate_document(parse_body(raw), max_feeds=MAX_FEEDS, now_ns=NOW_NS)
    except BodyError as exc:
        return exc.status, exc.title, exc.detail


def _same(raw: bytes) -> Validation | tuple[int, str, str]:
    try:
        got: Validation | tuple[int, str, str] = validate_body(raw, max_feeds=MAX_FEEDS,
                                                               now_ns=NOW_NS)
    except BodyError as exc:
        got = exc.status, exc.title, exc.detail
    # repr, not ==: Decimal("1.50") == Decimal("1.5") and 1 == 1.0, but the stored text differs
    assert repr(got) == repr(_reference(raw))
    return got


def _body(*feeds: dict[str, object], compact: bool = True) -> bytes:
    separators = (",", ":") if compact else None
    return json.dumps({"feeds": list(feeds)}, separators=separators,
                      ensure_ascii=False).encode()


def _record(**fields: bytes) -> bytes:
    """One record written by hand (values are raw JSON text), so literals stay as written."""
    base = {"symbol": b'"BTC/USD"', "price": b"1.5", "timestamp": b'"' + STAMP.encode() + b'"',
            "source": b'"s"', "worker_id": b'"w"'}
    base.update(fields)
    return b"{" + b",".join(b'"' + k.encode() + b'":' + v for k, v in base.items()) + b"}"


def _raw_body(*records: bytes) -> bytes:
    return b'{"feeds":[' + b",".join(records) + b"]}"


@pytest.mark.parametrize("fields", [
    {"volume": b"null"}, {"metadata": b"null"}, {"volume": b"null", "metadata": b"null"},
    {"volume": b"0"}, {"volume": b"0.0"}, {"metadata": b"{}"},
])
def test_explicit_nulls_and_empties_are_counted_and_stored_as_before(
        fields: dict[str, bytes]) -> None:
    raw = _raw_body(_record(**fields), _record())
    assert _fast_body(raw, MAX_FEEDS, NOW_NS) is not None
    verdict = _same(raw)
    assert isinstance(verdict, Validation) and verdict.ok


@pytest.mark.parametrize("raw", [
    # duplicates of optional fields, also when one of them is null (an UNSET default must not
    # hide them from the key count)
    _raw_body(_record(volume=b"null") [:-1] + b',"volume":1}'),
    _raw_body(_record(metadata=b"null")[:-1] + b',"metadata":{"a":1}}'),
    _raw_body(_record(metadata=b'{"a":null,"a":null}')),
    _raw_body(_record(metadata=b'{"a":1,"b":2,"a":3}')),
    b'{"feeds":[' + _record() + b'],"feeds":[' + _record() + b"]}",
])
def test_duplicate_keys_still_refused(raw: bytes) -> None:
    assert _fast_body(raw, MAX_FEEDS, NOW_NS) is None
    got = _same(raw)
    assert isinstance(got, tuple) and got[0] == 400 and "duplicate key" in got[2]


def test_keys_are_counted_by_their_quotes_whatever_the_spacing() -> None:
    # Whitespace before a colon, and strings that start or end with a colon, are ordinary JSON:
    # they take the fast path (duplicates are found by counting quotes, not `":`).
    record = _record(metadata=b'{"a" :":x","b:"\t:\n"c:"}')
    raw = _raw_body(record.replace(b'"source":', b'"source"  :'))
    assert _fast_body(raw, MAX_FEEDS, NOW_NS) is not None
    verdict = _same(raw)
    assert isinstance(verdict, Validation) and verdict.feeds[0]["metadata_json"] == (
        '{"a":":x","b:":"c:"}')


@pytest.mark.parametrize("fields", [
    {"symbol": b"1"}, {"symbol": b"null"}, {"price": b"null"}, {"price": b'"1.5"'},
    {"price": b"true"}, {"price": b"[1]"}, {"price": b"{}"}, {"volume": b'"1"'},
    {"volume": b"false"}, {"timestamp": b"1"}, {"source": b"null"}, {"worker_id": b"[]"},
    {"metadata": b"[]"}, {"metadata": b'"x"'}, {"metadata": b"1"}, {"metadata": b'{"a":[1]}'},
    {"metadata": b'{"a":{"b":1}}'}, {"extra": b"1"}, {"Symbol": b'"BTC/USD"'},
    {"price": b"1e400"}, {"price": b"-1e400"}, {"price": b"-0.0"}, {"price": b"0"},
    {"price": b"1e-400"}, {"volume": b"-1e-400"}, {"volume": b"-0.0"}, {"volume": b"-1"},
])
def test_wrong_types_and_values_answer_as_before(fields: dict[str, bytes]) -> None:
    _same(_raw_body(_record(), _record(**fields)))


def test_missing_required_fields_answer_as_before() -> None:
    full = _record()
    for name in ("symbol", "price", "timestamp", "source", "worker_id"):
        doc = json.loads(full)
        del doc[name]
        _same(_body(doc))


@pytest.mark.parametrize("price", [
    b"1" * 40, b"1" * 41, b"1" * 39 + b".5", b"1" * 40 + b".5", b"0." + b"0" * 50 + b"1",
    b"1." + b"0" * 39, b"1." + b"0" * 40, b"1E+50", b"1.5e-7", b"-0", b"9" * 40 + b"e-30",
    b"123456789012345678901234567890123456789.0", b"0.0000000000000000000000000000000000000001",
])
def test_significant_digits_rule_answers_as_before(price: bytes) -> None:
    _same(_raw_body(_record(price=price, volume=price)))


@pytest.mark.parametrize("stamp", [
    SECOND + "Z", SECOND + ".5Z", SECOND + ".123456789Z", SECOND + ".1234567890Z",
    SECOND + ".Z", SECOND + "..5Z", SECOND + ".12a4Z", SECOND + ".\uff11\uff12Z",
    SECOND + ".\u0661Z", SECOND + ".5z", SECOND + ".5+00:00", SECOND + ".5-0000",
    SECOND + "+00:00", SECOND + ".5+01:00", SECOND + ".5 Z", SECOND + ".-5Z",
    SECOND[:17] + "60.5Z", SECOND[:17] + "60Z", "2026-02-30T00:00:00.5Z", SECOND.lower() + ".5Z",
    SECOND + ".5ZZ", SECOND + "Z.5Z", SECOND + ",5Z", SECOND + "05Z", SECOND + "5Z",
    SECOND + "0.5Z", "x" * 40, "",
])
def test_timestamps_after_a_seen_second_answer_as_before(stamp: str) -> None:
    # The first record puts its second in the cache; the second record may then take the
    # cached branch, which must refuse exactly what the regex refuses.
    first = make_feed(timestamp=SECOND + ".000001Z")
    _same(_body(first, make_feed(timestamp=stamp)))
    _same(_body(make_feed(timestamp=stamp), first))


@pytest.mark.parametrize("meta", [
    {"k" * 64: 1}, {"k" * 65: 1}, {"é" * 64: 1}, {"é" * 65: 1}, {"😀" * 64: "😀" * 256},
    {"k": "😀" * 257}, {"k": "é" * 256}, {"k": "é" * 257},
    {f"k{i}": i for i in range(64)}, {f"k{i}": None for i in range(65)},
    {"a": 2**63, "b": -(2**63) - 1, "c": 10**30, "d": True, "e": False, "f": None},
    {":k": ":v", "k:": "v:", "k": ":"},
    {f"k{i}": "é" * 100 for i in range(19)},  # under 4096 bytes, over 1024 characters
    {f"k{i:02}": "é" * 100 for i in range(20)},  # over 4096 bytes, 2 per character
])
def test_metadata_rules_answer_as_before(meta: dict[str, object]) -> None:
    _same(_body(make_feed(metadata=meta)))
    _same(_body(make_feed(metadata=meta), compact=False))


@pytest.mark.parametrize("literal", [
    b"1e-4", b"0.0001", b"0.00009999999999999999", b"1e-5", b"0.00001", b"9.99e-05", b"5e-324",
    b"1e16", b"9999999999999998", b"9999999999999998.0", b"10000000000000000.0", b"1.5e+16",
    b"1.7976931348623157e308", b"1.7976931348623158e308", b"1.7976931348623159e308",
    b"-1.7976931348623158e308", b"2.2250738585072011e-308", b"2.4703282292062328e-324",
    b"2.4703282292062327e-324", b"1e-400", b"-0.0", b"0.0", b"1E2", b"1.0", b"100.0",
    b"45123.40", b"0.1", b"0.30000000000000004", b"123456789.123456789123456789",
])
def test_metadata_float_literals_answer_as_before(literal: bytes) -> None:
    raw = _raw_body(_record(metadata=b'{"f":' + literal + b',"s":"x"}'))
    _same(raw)


def test_metadata_float_literals_random() -> None:
    """Float literals of every magnitude: the float msgspec makes of one is float(Decimal(it)),
    and its JSON text is json.dumps's."""
    rnd = random.Random(20260509)
    literals = []
    for _ in range(3000):
        digits = "".join(rnd.choice("0123456789") for _ in range(rnd.randint(1, 22)))
        cut = rnd.randint(1, len(digits))
        text = (digits[:cut].lstrip("0") or "0") + "." + (digits[cut:] or "0")
        if rnd.random() < 0.6:
            text += f"e{rnd.randint(-330, 310)}"
        literals.append(("-" if rnd.random() < 0.3 else "") + text)
    for start in range(0, len(literals), 16):
        chunk = literals[start:start + 16]
        meta = b"{" + b",".join(f'"m{i}":{t}'.encode() for i, t in enumerate(chunk)) + b"}"
        verdict = _same(_raw_body(_record(metadata=meta)))
        finite = all(math.isfinite(float(Decimal(t))) for t in chunk)
        assert isinstance(verdict, Validation) and verdict.ok is finite


def test_ordinary_collector_body_takes_the_fast_path() -> None:
    feeds = [make_feed(price=45123.5 + i / 100, metadata={
        "bid": 45123.4, "ask": 45123.6, "received_at": STAMP, "sequence": i, "tiny": 1e-6,
        "big": 1e20}) for i in range(MAX_FEEDS)]
    raw = _body(*feeds)
    fast = _fast_body(raw, MAX_FEEDS, NOW_NS)
    assert fast is not None and len(fast) == MAX_FEEDS
    verdict = _same(raw)
    assert isinstance(verdict, Validation)
    assert verdict.feeds[0]["metadata_json"].endswith('"tiny":1e-06,"big":1e+20}')


def test_too_many_and_too_few_records_answer_as_before() -> None:
    for count in (0, MAX_FEEDS, MAX_FEEDS + 1):
        _same(_body(*[make_feed()] * count))


_finite = st.floats(allow_nan=False, allow_infinity=False)
_meta_value = (st.none() | st.booleans() | st.integers() | _finite
               | st.text(max_size=5) | st.text(min_size=250, max_size=260, alphabet="aé"))
_meta = st.dictionaries(st.text(min_size=0, max_size=3) | st.text(min_size=63, max_size=66,
                                                                   alphabet="ké"),
                        _meta_value, max_size=6)
_stamp = st.builds(lambda frac, tail: SECOND + frac + tail,
                   st.sampled_from(["", ".5", ".123456", ".123456789", ".1234567890", "."]),
                   st.sampled_from(["Z", "+00:00", "-0000", "+01:00", "z"]))


@settings(max_examples=400, deadline=None)
@given(st.lists(st.fixed_dictionaries({
    "symbol": st.sampled_from(["BTC/USD", "ETH/USDT", "btc/usd"]),
    "price": _finite | st.integers(),
    "timestamp": _stamp,
    "source": st.sampled_from(["coinbase", "kraken", "a:b"]),
    "worker_id": st.sampled_from(["w-1", ":w"]),
}, optional={"volume": st.none() | _finite | st.integers(), "metadata": st.none() | _meta}),
    min_size=1, max_size=4), st.booleans())
def test_random_records_answer_as_before(feeds: list[dict[str, object]], compact: bool) -> None:
    _same(_body(*feeds, compact=compact))

