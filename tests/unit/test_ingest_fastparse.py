"""The msgspec fast parser (`_fast_body`) gives exactly what the stdlib reference path gives.

`validate_body` tries `_fast_body` first and falls back to `parse_body` + `validate_document`.
Every body must get the same verdict (records with the same exact Decimal text and metadata
JSON, or the same problems, or the same BodyError) as the reference path alone would give it.
"""

from __future__ import annotations

import json
import time

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


def _reference(raw: bytes) -> Validation | tuple[int, str, str]:
    try:
        return validate_document(parse_body(raw), max_feeds=MAX_FEEDS, now_ns=NOW_NS)
    except BodyError as exc:
        return exc.status, exc.title, exc.detail


def _actual(raw: bytes) -> Validation | tuple[int, str, str]:
    try:
        return validate_body(raw, max_feeds=MAX_FEEDS, now_ns=NOW_NS)
    except BodyError as exc:
        return exc.status, exc.title, exc.detail


def _same(raw: bytes) -> Validation | tuple[int, str, str]:
    expected, got = _reference(raw), _actual(raw)
    # repr, not ==: Decimal("1.50") == Decimal("1.5") and 1 == 1.0, but the stored text differs
    assert repr(got) == repr(expected)
    return got


def _body(feeds: list[dict[str, object]], **dumps: object) -> bytes:
    return json.dumps({"feeds": feeds}, **dumps).encode()  # type: ignore[arg-type]


@pytest.mark.parametrize("dumps", [{}, {"separators": (",", ":")}, {"ensure_ascii": False}])
def test_ordinary_bodies_take_the_fast_path(dumps: dict[str, object]) -> None:
    raw = _body([make_feed(), make_feed(volume=None, metadata=None),
                 make_feed(price=7, volume=0, metadata={"seq": 2**62, "ok": True, "n": None})],
                **dumps)
    assert _fast_body(raw, MAX_FEEDS, NOW_NS) is not None
    verdict = _same(raw)
    assert isinstance(verdict, Validation) and verdict.ok and len(verdict.feeds) == 3


def test_exact_decimal_text_is_kept() -> None:
    raw = (b'{"feeds":[{"symbol":"BTC/USD","price":45123.50,"volume":1.0E+2,'
           b'"timestamp":"' + str(make_feed()["timestamp"]).encode()
           + b'","source":"s","worker_id":"w","metadata":{"f":1.50,"g":-0.0,"h":0.0001}}]}')
    assert _fast_body(raw, MAX_FEEDS, NOW_NS) is not None
    verdict = _same(raw)
    assert isinstance(verdict, Validation)
    feed = verdict.feeds[0]
    assert str(feed["price"]) == "45123.50" and str(feed["volume"]) == "1.0E+2"
    assert feed["metadata_json"] == '{"f":1.5,"g":-0.0,"h":0.0001}'


@pytest.mark.parametrize("meta", [
    {"big": 1e300}, {"small": 1e-5}, {"tiny": 5e-324}, {"edge": 1e16},
    {"under": 9999999999999998.0},
    {"ünï": "€ ✓"}, {"k": "v" * 256}, {f"k{i}": "v" * 100 for i in range(30)},
    {f"k{i}": "v" * 200 for i in range(30)},  # over 4096 bytes as JSON: refused
    {"k": "v" * 257}, {"": 1}, {"k" * 65: 1}, {f"k{i}": i for i in range(65)},
])
def test_metadata_json_matches_json_dumps(meta: dict[str, object]) -> None:
    for dumps in ({}, {"ensure_ascii": False}, {"separators": (",", ":")}):
        _same(_body([make_feed(metadata=meta)], **dumps))


@pytest.mark.parametrize("raw", [
    b'{"feeds": [], "feeds": []}',
    b'{"feeds":[{"symbol":"BTC/USD","symbol":"ETH/USD","price":1,"timestamp":"%s",'
    b'"source":"s","worker_id":"w"}]}',
    b'{"feeds":[{"symbol":"BTC/USD","price":1,"timestamp":"%s","source":"s","worker_id":"w",'
    b'"metadata":{"a":1,"a":2}}]}',
    # a duplicate hidden behind whitespace before the colon, or behind an escaped key
    b'{"feeds":[{"symbol":"BTC/USD","price":1,"price" :2,"timestamp":"%s","source":"s",'
    b'"worker_id":"w"}]}',
    b'{"feeds":[{"symbol":"BTC/USD","price":1,"pr\\u0069ce":2,"timestamp":"%s","source":"s",'
    b'"worker_id":"w","metadata":{"q":"\\u003a"}}]}',
    b'{"feeds":[{"symbol":"BTC/USD","price":1,"timestamp":"%s","source":"s","worker_id":"w",'
    b'"metadata":{"a":":x","a":":y"}}]}',
])
def test_duplicate_keys_are_refused_as_before(raw: bytes) -> None:
    stamp = str(make_feed()["timestamp"]).encode()
    raw = raw.replace(b"%s", stamp)
    assert _fast_body(raw, MAX_FEEDS, NOW_NS) is None
    got = _same(raw)
    assert isinstance(got, tuple) and got[0] == 400 and "duplicate key" in got[2]


@pytest.mark.parametrize("raw", [
    b"", b"{", b"not json", b'{"feeds": [}', b"\xff\xfe{}", b"\xef\xbb\xbf{\"feeds\":[]}",
    b"[" * 100_000, b'{"a": 1' + b"0" * 5000 + b"}", b'{"feeds":[]} x', b"NaN",
    b'{"feeds": 1}', b'{"feeds": []}', b'{"feeds": [1]}', b'{"other": 1}', b"[]",
    b'{"feeds":[{"price":NaN}]}', b'{"feeds":[{"price":Infinity}]}', b'{"feeds":[{"price":01}]}',
    b'{"feeds":[{"symbol":"a\tb"}]}', b'{"feeds":[{"symbol":"\xed\xa0\x80"}]}',
])
def test_malformed_and_odd_bodies_answer_as_before(raw: bytes) -> None:
    _same(raw)


@pytest.mark.parametrize("changes", [
    {"price": -1}, {"price": 0}, {"price": True}, {"price": "1"}, {"price": 1e-400},
    {"price": 10**400 // 10**360}, {"volume": -0.5}, {"volume": "1"}, {"symbol": "btc/usd"},
    {"timestamp": "2026-02-30T00:00:00Z"}, {"timestamp": "2026-01-01T00:00:00+01:00"},
    {"timestamp": "2008-01-01T00:00:00Z"}, {"timestamp": "2999-01-01T00:00:00Z"},
    {"timestamp": "2026-01-02T03:04:05.123+00:00"}, {"timestamp": "2026-01-02T03:04:05-0000"},
    {"metadata": {"k": [1]}}, {"metadata": {"k": {"x": 1}}}, {"metadata": []},
    {"metadata": {"nul": "a\u0000"}}, {"metadata": {"s": "\ud800"}}, {"exchange": "x"},
    {"source": "a" * 65}, {"worker_id": ""}, {"symbol": "X" * 10_000},
])
def test_refusals_answer_as_before(changes: dict[str, object]) -> None:
    _same(_body([make_feed(), make_feed(**changes)]))


def test_huge_literals_answer_as_before() -> None:
    stamp = str(make_feed()["timestamp"]).encode()
    for price in (b"1e400", b"1" * 41, b"1." + b"1" * 45, b"1e-400", b"1e999999999999",
                  b"123456789012345678901234567890"):
        _same(b'{"feeds":[{"symbol":"BTC/USD","price":' + price + b',"timestamp":"' + stamp
              + b'","source":"s","worker_id":"w","metadata":{"m":' + price + b"}}]}")


def test_too_many_records_is_still_413() -> None:
    got = _same(_body([make_feed()] * (MAX_FEEDS + 1)))
    assert isinstance(got, tuple) and got[0] == 413


_scalar = (st.none() | st.booleans() | st.integers()
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
_record = st.fixed_dictionaries({
    "symbol": st.sampled_from(["BTC/USD", "ETH/USDT", "x"]),
    "price": st.floats(allow_nan=False, allow_infinity=False) | st.integers() | _scalar,
    "timestamp": st.sampled_from(["2026-01-01T00:00:00Z", "2026-01-01T00:00:00.5+00:00",
                                  "2026-01-01T00:00:00.123456789Z"]),
    "source": st.sampled_from(["coinbase", "kraken"]),
    "worker_id": st.sampled_from(["w-1"]),
}, optional={
    "volume": st.floats(allow_nan=False, allow_infinity=False) | _scalar,
    "metadata": st.none() | st.dictionaries(st.text(max_size=8), _scalar, max_size=5),
})


@settings(max_examples=400, deadline=None)
@given(st.lists(_record, min_size=1, max_size=4), st.booleans(), st.booleans())
def test_random_bodies_answer_as_before(feeds: list[dict[str, object]], compact: bool,
                                        ascii_only: bool) -> None:
    separators = (",", ":") if compact else None
    _same(_body(feeds, separators=separators, ensure_ascii=ascii_only))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_answer_as_before(raw: bytes) -> None:
    _same(raw)


def test_fast_records_are_the_reference_records() -> None:
    raw = _body([make_feed(price=1.25, metadata={"a": 1, "b": "x:y"})])
    assert _fast_body(raw, MAX_FEEDS, NOW_NS) is not None
    _same(raw)
