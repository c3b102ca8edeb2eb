"""The column-at-a-time fast path (`_fast_columns` -> `FeedBatch`) agrees with the reference path.

`validate_batch` hands the storage backends an ordinary batch as a `FeedBatch`: the records held by
column (float literals kept as text, metadata JSON checked for the whole batch at once), which
SQLite stores with multi-row INSERTs and PostgreSQL with COPY text built from the columns. Each
must give exactly what the reference path gives: the same records (`list(batch)` against
`parse_body` + `validate_document`, compared by repr), the same problems or errors otherwise, the
same SQLite rows and the same COPY text.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from decimal import Decimal
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collectors.ingest.storage import SQLiteStorage, open_storage
from collectors.ingest.storage.postgres import _copy_payload
from collectors.ingest.storage.sqlite import _ROWS_PER_INSERT, _insert_rows, _row_values
from collectors.ingest.validate import (
    _FAST_DECODE,
    BodyError,
    FeedBatch,
    Validation,
    ValidFeed,
    _decimal_texts,
    _fast_columns,
    _fast_records,
    _json_floats,
    _Literal,
    parse_body,
    validate_batch,
    validate_body,
    validate_document,
)
from tests.support import postgres
from tests.support.servers import make_feed

NOW_NS = time.time_ns()
MAX_FEEDS = 200
STAMP = str(make_feed()["timestamp"])  # e.g. 2026-05-09T11:58:30.123456Z, a minute ago
SECOND = STAMP[:19]


def _reference(raw: bytes) -> object:
    try:
        return validate_document(parse_body(raw), max_feeds=MAX_FEEDS, now_ns=NOW_NS)
    except BodyError as exc:
        return exc.status, exc.title, exc.detail


def _columns(raw: bytes) -> object:
    try:
        verdict = validate_batch(raw, max_feeds=MAX_FEEDS, now_ns=NOW_NS)
    except BodyError as exc:
        return exc.status, exc.title, exc.detail
    if isinstance(verdict.feeds, FeedBatch):
        _check_projections(verdict.feeds)
        return Validation(list(verdict.feeds), [], 0)
    return verdict


def _check_projections(batch: FeedBatch) -> None:
    """What the backends read from the columns is what they build from the records."""
    records = list(batch)
    assert len(batch) == len(records)
    assert batch[-1] == records[-1] and batch[1:3] == records[1:3]
    assert _row_values(batch) == _row_values(records)
    assert [type(v) for v in _row_values(batch)] == [type(v) for v in _row_values(records)]
    assert _copy_payload(batch) == _copy_payload(records)


def _same(raw: bytes) -> object:
    got = _columns(raw)
    # repr, not ==: Decimal("1.50") == Decimal("1.5") and 1 == 1.0, but the stored text differs
    assert repr(got) == repr(_reference(raw))
    return got


def _record(**fields: str) -> str:
    """One record written by hand (values are raw JSON text), so literals stay as written."""
    base = {"symbol": '"BTC/USD"', "price": "45123.5", "volume": "1.25",
            "timestamp": json.dumps(STAMP), "source": '"coinbase"', "worker_id": '"w-1"',
            "metadata": '{"bid":45123.4,"side":"buy","sequence":7}'}
    base.update(fields)
    return "{" + ",".join(f'"{k}":{v}' for k, v in base.items() if v != "") + "}"


def _raw(*records: str) -> bytes:
    return ('{"feeds":[' + ",".join(records) + "]}").encode()


def _collector_body(count: int) -> bytes:
    """A batch as the collectors send it: msgspec's compact JSON of Coinbase-like records."""
    feeds = []
    for i in range(count):
        price = 45123.5 + i / 100
        feeds.append({
            "symbol": ["BTC/USD", "ETH/USD", "SOL/USD"][i % 3], "price": price,
            "volume": 12345.67891234, "timestamp": f"{SECOND}.{i:06d}Z", "source": "coinbase",
            "worker_id": "coinbase-1",
            "metadata": {"bid": price - 0.01, "bid_size": 0.5, "ask": price + 0.01,
                         "ask_size": [1.5, 0.00001234, 2e-7, 0.0][i % 4],
                         "open_24h": 44000.12, "high_24h": 46000.99, "low_24h": 43000.01,
                         "volume_30d": [345678.12345678, 1e16, 1.5e20][i % 3],
                         "last_size": 0.00123456, "sequence": 98765432100 + i,
                         "trade_id": 612345678 + i, "side": "buy" if i % 2 else "sell",
                         "received_at": f"{SECOND}.{i + 1:06d}Z", "timestamp_source": "exchange"},
        })
    return msgspec.json.encode({"feeds": feeds})


def test_collector_batches_take_the_column_path_and_agree() -> None:
    raw = _collector_body(MAX_FEEDS)
    verdict = validate_batch(raw, max_feeds=MAX_FEEDS, now_ns=NOW_NS)
    assert isinstance(verdict.feeds, FeedBatch) and len(verdict.feeds) == MAX_FEEDS
    got = _same(raw)
    assert isinstance(got, Validation)
    texts = [f["metadata_json"] for f in got.feeds[:4]]
    # json.dumps's floats where msgspec writes them otherwise, the body's text elsewhere
    assert '"ask_size":1.234e-05' in texts[1] and '"ask_size":2e-07' in texts[2]
    assert '"volume_30d":1e+16' in texts[1] and '"volume_30d":1.5e+20' in texts[2]
    assert '"ask_size":0.0,' in texts[3] and '"last_size":0.00123456,' in texts[0]


def test_validate_body_still_returns_a_list() -> None:
    raw = _collector_body(3)
    verdict = validate_body(raw, max_feeds=MAX_FEEDS, now_ns=NOW_NS)
    assert type(verdict.feeds) is list and len(verdict.feeds) == 3


@pytest.mark.parametrize("fields", [
    # numbers: literal forms, digit counts, signs, ints (the column path takes float literals)
    {"price": "7"}, {"volume": "0"}, {"volume": "null"}, {"volume": ""}, {"price": "1E2"},
    {"price": "1.5e-7"}, {"price": "0.0000001"}, {"price": "0.000001"}, {"price": "10.0000001"},
    {"volume": "0.0000000"}, {"volume": "-0.0"}, {"price": "-0.0"}, {"volume": "-0.5"},
    {"price": "1." + "0" * 38}, {"price": "1." + "0" * 39}, {"price": "9" * 39 + ".5"},
    {"price": "0." + "0" * 50 + "1"}, {"price": "1e400"}, {"price": "1e-400"},
    {"volume": "1e-400"}, {"price": "45123.50"}, {"price": '"1.5"'}, {"volume": '"1.5"'},
    # literals no Decimal holds (exponent beyond the decimal module's range): a 422, never an
    # exception; judged by their float (an infinity or a zero) as 1e400 and 1e-400 are
    {"price": "1e999999999999999999999"}, {"volume": "1E-999999999999999999999"},
    {"price": "-1e999999999999999999999"}, {"price": "1e-999999999999999999999"},
    {"price": "-1E-999999999999999999999"}, {"volume": "1e999999999999999999999"},
    {"volume": "-1e-999999999999999999999"}, {"price": "1" * 41 + "e999999999999999999999"},
    {"price": "1E+999999999999999999"}, {"volume": "1e-999999999999999999"},
    {"metadata": '{"m":1e999999999999999999999}'}, {"metadata": '{"m":-1E+999999999999999999999}'},
    {"metadata": '{"m":1e-999999999999999999999}'}, {"metadata": '{"m":-1e-999999999999999999999}'},
    {"price": "1" + "0" * 400}, {"volume": "1" + "0" * 400},
    {"metadata": '{"m":1' + "0" * 400 + "}"},
    # timestamps: fraction lengths, zones, impossible dates, the future
    {"timestamp": json.dumps(SECOND + ".5Z")}, {"timestamp": json.dumps(SECOND + ".123456789Z")},
    {"timestamp": json.dumps(SECOND + ".1234567890Z")}, {"timestamp": json.dumps(SECOND + "Z")},
    {"timestamp": json.dumps(SECOND + ".Z")}, {"timestamp": json.dumps(SECOND + ".5z")},
    {"timestamp": json.dumps(SECOND + ".5+00:00")}, {"timestamp": json.dumps(SECOND + ".\u0661Z")},
    {"timestamp": json.dumps("2026-02-30T00:00:00.5Z")},
    {"timestamp": json.dumps("2008-01-01T00:00:00.5Z")},
    {"timestamp": json.dumps("2999-01-01T00:00:00.5Z")},
    {"timestamp": json.dumps(SECOND[:-2] + "60.5Z")}, {"timestamp": json.dumps("x" * 27)},
    # metadata: absent, null, empty, keys of 0/64/65 characters, floats json.dumps writes
    # with an exponent, strings that look like such floats
    {"metadata": ""}, {"metadata": "null"}, {"metadata": "{}"}, {"metadata": '{"":1}'},
    {"metadata": json.dumps({"k" * 64: 1})}, {"metadata": json.dumps({"k" * 65: 1})},
    {"metadata": json.dumps({"é" * 64: 1})}, {"metadata": json.dumps({"é" * 65: 1})},
    {"metadata": '{"a":1e-5,"b":-0.00001234,"c":1e16,"d":-1.5e300,"e":5e-324,"f":0.0001}'},
    {"metadata": '{"a":".0000","b":"e-1","c":"1e5","d":"x:0.00001"}'},
    {"metadata": '{"a":1.00001,"b":10.00009,"c":0.1e1}'},
    {"metadata": '{"a":1,"a":2}'}, {"metadata": '{"a":[1]}'},
    {"metadata": '{"a":"' + "x" * 257 + '"}'},
    # names and symbols
    {"symbol": '"btc/usd"'}, {"source": '"a b"'}, {"worker_id": '"' + "w" * 65 + '"'},
])
def test_unusual_records_answer_as_before(fields: dict[str, str]) -> None:
    # Alone, and after an ordinary record (which takes the column path when alone).
    _same(_raw(_record(**fields)))
    _same(_raw(_record(), _record(**fields)))
    _same(_raw(_record(**fields), _record(), _record(metadata='{"x":1e-7}')))


@pytest.mark.parametrize(("fields", "field", "fragment"), [
    ({"price": "1e999999999999999999999"}, "price", "not a finite 64-bit number"),
    ({"price": "-1e999999999999999999999"}, "price", "not a finite 64-bit number"),
    ({"price": "1e-999999999999999999999"}, "price", "greater than 0"),
    ({"volume": "1E+999999999999999999999"}, "volume", "not a finite 64-bit number"),
    ({"volume": "1e-999999999999999999999"}, "volume", "stored exactly"),
    ({"volume": "-1e-999999999999999999999"}, "volume", "stored exactly"),
    ({"price": "1" * 41 + ".5e999999999999999999999"}, "price", "significant digits"),
    ({"metadata": '{"m":1e999999999999999999999}'}, "metadata.m", "not a finite 64-bit number"),
])
def test_literals_no_decimal_holds_are_422_on_both_paths(fields: dict[str, str], field: str,
                                                          fragment: str) -> None:
    for raw in (_raw(_record(), _record(**fields)), _raw(_record(), _record(), _record(**fields))):
        got = _same(raw)  # (raised InvalidOperation, on both paths, before the fix: a 500)
        assert isinstance(got, Validation) and not got.feeds
        index = raw.count(b'"symbol"') - 1
        assert [(p.index, p.field) for p in got.problems] == [(index, field)]
        assert fragment in got.problems[0].problem


@pytest.mark.parametrize(("fields", "field"), [
    ({"volume": "1e-16384"}, "volume"), ({"price": "1e-20000"}, "price"),
    ({"volume": "0." + "0" * 20000 + "1"}, "volume"), ({"price": "1.5E-16383"}, "price"),
])
def test_numbers_postgresql_cannot_hold_are_422_on_both_paths(fields: dict[str, str],
                                                              field: str) -> None:
    # PostgreSQL's numeric keeps at most 16383 digits after the point: such a batch would fail
    # to store every time, and the collector would retry it forever (a 503 each time).
    for raw in (_raw(_record(), _record(**fields)), _raw(_record(), _record(), _record(**fields))):
        got = _same(raw)
        assert isinstance(got, Validation) and not got.feeds
        index = raw.count(b'"symbol"') - 1
        assert [(p.index, p.field, p.problem) for p in got.problems] == [
            (index, field, "more than 16383 digits after the decimal point")]


def test_the_finest_number_postgresql_holds_is_valid_on_both_paths() -> None:
    for raw in (_raw(_record(volume="1e-16383")), _raw(_record(), _record(volume="1e-16383")),
                _raw(_record(), _record(), _record(volume="1e-16383"))):
        got = _same(raw)
        assert isinstance(got, Validation) and got.ok
        assert str(got.feeds[-1]["volume"]) == "1E-16383"


@pytest.mark.parametrize("literal", ["-1e-400", "-1e-330", "-1E-1001", "-0.5e-400",
                                     "-0." + "0" * 400 + "1", "-1e-16383"])
def test_negative_volumes_whose_float_is_minus_zero_are_422_on_both_paths(literal: str) -> None:
    # float(-1e-400) is -0.0, which passed a sign check on the float: SQLite stored 0.0, and
    # PostgreSQL's CHECK (volume >= 0) refused the batch on every retry (a 503, forever).
    for raw in (_raw(_record(volume=literal)), _raw(_record(), _record(volume=literal)),
                _raw(_record(), _record(), _record(volume=literal))):
        assert validate_batch(raw, max_feeds=MAX_FEEDS, now_ns=NOW_NS).feeds == []
        got = _same(raw)
        assert isinstance(got, Validation) and not got.feeds
        index = raw.count(b'"symbol"') - 1
        assert [(p.index, p.field, p.problem) for p in got.problems] == [
            (index, "volume", f"must not be negative, got {Decimal(literal)}")]


@pytest.mark.parametrize("literal", ["-0", "-0.0", "-0e-5", "-0.000E+3", "0.0", "1e-400"])
def test_zero_and_tiny_positive_volumes_are_valid_on_both_paths(literal: str) -> None:
    for raw in (_raw(_record(volume=literal)), _raw(_record(), _record(volume=literal))):
        got = _same(raw)
        assert isinstance(got, Validation) and got.ok
        assert got.feeds[-1]["volume"] == Decimal(literal)  # (-0, an int literal, is 0)


@pytest.mark.parametrize("literal", ["1e-400", "1E-330", "0.5e-1001", "-1e-400", "-0.0"])
def test_prices_whose_float_is_zero_are_422_on_both_paths(literal: str) -> None:
    # > 0 is judged by the float SQLite would store: 1e-400 is 0 there (PostgreSQL would keep it).
    for raw in (_raw(_record(price=literal)), _raw(_record(), _record(price=literal))):
        got = _same(raw)
        assert isinstance(got, Validation) and not got.feeds
        index = raw.count(b'"symbol"') - 1
        assert [(p.index, p.field) for p in got.problems] == [(index, "price")]
        assert got.problems[0].problem.startswith("must be greater than 0, got ")


def test_tiny_metadata_literal_no_decimal_holds_is_its_float() -> None:
    raw = _raw(_record(metadata='{"a":1e-999999999999999999999,"b":-1E-999999999999999999999}'))
    got = _same(raw)
    assert isinstance(got, Validation) and got.ok
    assert got.feeds[0]["metadata_json"] == '{"a":0.0,"b":-0.0}'  # as 1e-400 and -1e-400


def test_decimal_texts_refuses_literals_no_decimal_holds() -> None:
    for bad in ("1e-999999999999999999999", "1E+999999999999999999999"):
        assert _decimal_texts([_Literal("1.5"), _Literal(bad)]) is None
    # A Decimal holds this one, but PostgreSQL could not store it (over 16383 digits after the
    # point): the reference path names the field.
    assert _decimal_texts([_Literal("1e-999999999999999999")]) is None
    assert _decimal_texts([_Literal("1e-16383")]) == ["1E-16383"]


def test_metadata_floats_fixed_only_where_json_dumps_differs() -> None:
    metas = [f'{{"n":{i},"f":{f}}}' for i, f in enumerate(
        ["0.5", "1e-5", "2.5", "1e16", "3.5", "0.00009999", "-1e-7", "1e15", "9999999999999998.0"])]
    raw = _raw(*(_record(metadata=m) for m in metas))
    assert isinstance(validate_batch(raw, max_feeds=MAX_FEEDS, now_ns=NOW_NS).feeds, FeedBatch)
    got = _same(raw)
    assert isinstance(got, Validation)
    assert [f["metadata_json"] for f in got.feeds] == [
        '{"n":0,"f":0.5}', '{"n":1,"f":1e-05}', '{"n":2,"f":2.5}', '{"n":3,"f":1e+16}',
        '{"n":4,"f":3.5}', '{"n":5,"f":9.999e-05}', '{"n":6,"f":-1e-07}',
        '{"n":7,"f":1000000000000000.0}', '{"n":8,"f":9999999999999998.0}']


def test_columns_and_records_agree_record_for_record() -> None:
    for raw in (_collector_body(60), _raw(_record(), _record(price="1.0", volume="0.0"))):
        feeds = _FAST_DECODE(raw).feeds
        columns, records = _fast_columns(feeds, NOW_NS), _fast_records(feeds, NOW_NS)
        assert columns is not None and records is not None
        assert repr(list(columns[0])) == repr(records[0]) and columns[1] == records[1]


_literal = st.from_regex(r"-?(0|[1-9][0-9]{0,25})\.[0-9]{1,25}([eE][-+]?[0-9]{1,3})?",
                         fullmatch=True)


@settings(max_examples=500, deadline=None)
@given(st.lists(_literal, min_size=1, max_size=5))
def test_decimal_texts_are_str_of_the_decimals(literals: list[str]) -> None:
    texts = _decimal_texts([_Literal(t) for t in literals])
    assert texts is not None
    assert texts == [str(Decimal(t)) for t in literals]
    assert [repr(Decimal(t)) for t in texts] == [repr(Decimal(t)) for t in literals]


_plain_text = st.text(st.characters(blacklist_categories=("Cs", "Cc"),
                                    blacklist_characters='"\\'), max_size=8)


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(_plain_text, st.floats(allow_nan=False, allow_infinity=False)
                       | st.integers() | st.booleans() | st.none() | _plain_text, max_size=8))
def test_json_floats_is_json_dumps(meta: dict[str, object]) -> None:
    expected = json.dumps(meta, separators=(",", ":"), ensure_ascii=False)
    assert _json_floats(meta).decode() == expected  # type: ignore[arg-type]


_positive = st.floats(min_value=1e-12, max_value=1e12, allow_nan=False, allow_infinity=False)
_finite = st.floats(allow_nan=False, allow_infinity=False)
# Ordinary values, as collectors send them (the float literals and metadata floats of every
# magnitude, including those json.dumps writes with an exponent)...
_price = _positive.map(repr) | st.from_regex(
    r"(0|[1-9][0-9]{0,15})\.[0-9]{0,14}[1-9]([eE][-+]?[0-9]{1,2})?", fullmatch=True)
_meta_value = (_finite.map(repr) | st.integers(min_value=-(2**63), max_value=2**64 - 1).map(str)
               | st.sampled_from(["1e-5", "0.00001234", "1e16", "-0.0", "true", "null", '"x"',
                                  '"e-5"', '".0000"', '"1.5e-7"', '"2026-01-01T00:00:00.000012Z"']))
_meta = st.dictionaries(st.sampled_from(["bid", "ask", "seq", "received_at", "a:b", "k" * 64]),
                        _meta_value, max_size=5).map(
    lambda d: "{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in d.items()) + "}")
_fraction = st.integers(min_value=1, max_value=9).flatmap(
    lambda n: st.from_regex(f"[0-9]{{{n}}}", fullmatch=True))
_stamp = st.builds(lambda second, frac: f"{second}.{frac}Z",
                   st.sampled_from([SECOND, SECOND[:-1] + ("1" if SECOND[-1] == "0" else "0")]),
                   _fraction)
# ...and, now and then, one field of one record that is not (every one must get the reference
# path's answer, whichever path gives it).
_odd = st.sampled_from([
    ("price", "7"), ("price", "0.0"), ("price", "-1.5"), ("price", "1e400"), ("price", "1e-400"),
    ("price", "1." + "0" * 40), ("price", "0.0000001"), ("price", "1e999999999999999999999"),
    ("price", "1e-999999999999999999999"), ("volume", "1E-999999999999999999999"),
    ("metadata", '{"bid":1e999999999999999999999}'),
    ("metadata", '{"a":-1e-999999999999999999999}'), ("price", "1.5E+3"), ("price", '"1.5"'),
    ("volume", "0"), ("volume", "-0.0"), ("volume", "null"), ("volume", ""), ("volume", "-1.0"),
    ("timestamp", json.dumps(SECOND + "Z")), ("timestamp", json.dumps(SECOND + ".5+00:00")),
    ("timestamp", json.dumps(SECOND + ".1234567890Z")), ("timestamp", json.dumps(SECOND + ".Z")),
    ("timestamp", json.dumps("2026-02-30T00:00:00.5Z")), ("timestamp", json.dumps(SECOND + ".5z")),
    ("timestamp", json.dumps("2008-12-31T23:59:59.5Z")),
    ("metadata", "null"), ("metadata", ""), ("metadata", '{"":1}'),
    ("metadata", json.dumps({"k" * 65: 1})), ("metadata", '{"a":"a\\u0000"}'),
    ("metadata", '{"a":1,"a":1}'), ("metadata", '{"a":[1]}'),
    ("symbol", '"btc/usd"'), ("source", '"a b"'), ("worker_id", '""'), ("extra", "1"),
])


@st.composite
def _ordinary(draw: st.DrawFn) -> str:
    return _record(
        symbol=json.dumps(draw(st.sampled_from(["BTC/USD", "ETH/USD", "SOL/USD"]))),
        price=draw(_price), volume=draw(_price | st.sampled_from(["0.0", "-0.0"])),
        timestamp=json.dumps(draw(_stamp)), source='"coinbase"',
        worker_id=json.dumps(draw(st.sampled_from(["w-1", "w-1", "w-2"]))), metadata=draw(_meta))


@settings(max_examples=600, deadline=None)
@given(st.lists(_ordinary(), min_size=1, max_size=8), st.none() | st.tuples(_odd, st.integers()))
def test_random_batches_answer_as_before(records: list[str],
                                         odd: tuple[tuple[str, str], int] | None) -> None:
    if odd is not None:
        (name, value), at = odd
        records[at % len(records)] = _record(**{name: value})
    _same(_raw(*records))


# --- storage ----------------------------------------------------------------------------------


def test_insert_statement_shape() -> None:
    for rows in (1, 2, _ROWS_PER_INSERT):
        sql = _insert_rows(rows)
        assert sql.startswith("INSERT OR FAIL INTO price_feeds (")
        assert sql.count("(") == rows + 1 and sql.count("?") == rows * 9
        assert sql.count(f"?{rows * 8 + 1})") == rows  # received_at, shared


def _rows(path: Path) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT *, typeof(price), typeof(volume) FROM price_feeds"
                            " ORDER BY id").fetchall()
        rows += conn.execute("SELECT * FROM ingest_batches ORDER BY idempotency_key").fetchall()
    return rows


@pytest.mark.parametrize("count", [1, _ROWS_PER_INSERT - 1, _ROWS_PER_INSERT,
                                   _ROWS_PER_INSERT + 1, 3 * _ROWS_PER_INSERT + 7])
def test_sqlite_stores_a_feed_batch_as_its_records(tmp_path: Path, count: int) -> None:
    raw = _collector_body(count)
    batch = validate_batch(raw, max_feeds=MAX_FEEDS, now_ns=NOW_NS).feeds
    assert isinstance(batch, FeedBatch)
    records: list[ValidFeed] = list(batch)
    paths = []
    for name, feeds in (("batch", batch), ("records", records)):
        path = tmp_path / f"{name}.db"
        store = SQLiteStorage.open(path, clock_ns=lambda: NOW_NS)
        try:
            assert store.store_batch("k-0", "sha", records[:2]).stored == min(2, count)
            assert store.store_batch("k-1", "sha", feeds).stored == count
        finally:
            store.close()
        paths.append(path)
    rows = _rows(paths[0])
    assert rows == _rows(paths[1])
    first = min(2, count)  # the rows of k-0 come first
    assert [r[1:4] for r in rows[first:first + count]] == [
        (f["symbol"], float(f["price"]), float(f["volume"] or 0)) for f in records]
    assert {r[-2:] for r in rows[:first + count]} == {("real", "real")}


def test_sqlite_batch_failing_in_a_later_insert_stores_nothing(tmp_path: Path) -> None:
    records = list(validate_batch(_collector_body(_ROWS_PER_INSERT + 5), max_feeds=MAX_FEEDS,
                                  now_ns=NOW_NS).feeds)
    bad = [*records[:-1], {**records[-1], "worker_id": None}]
    store = SQLiteStorage.open(tmp_path / "x.db")
    try:
        with pytest.raises(Exception, match="NOT NULL"):
            store.store_batch("k", "sha", bad)  # type: ignore[arg-type]
        assert store.summary(10_000) == []
        assert store.store_batch("k", "sha", records).stored == len(records)
    finally:
        store.close()


def test_copy_text_of_metadata_with_special_characters_takes_the_record_path() -> None:
    batch = validate_batch(_collector_body(3), max_feeds=MAX_FEEDS, now_ns=NOW_NS).feeds
    assert isinstance(batch, FeedBatch) and batch.metadata_plain

    def with_metadata(*texts: str) -> FeedBatch:
        return FeedBatch(
            symbols=batch.symbols, price_floats=batch.price_floats,
            price_texts=batch.price_texts, volume_floats=batch.volume_floats,
            volume_texts=batch.volume_texts, timestamps=batch.timestamps,
            timestamps_ns=batch.timestamps_ns, sources=batch.sources,
            worker_ids=batch.worker_ids, metadata=batch.metadata, metadata_json=list(texts),
            metadata_plain=False)

    escaped = with_metadata(r'{"q":"a\\b"}', "{}", "{}")  # JSON's escaped backslash
    payload = _copy_payload(escaped)
    assert payload is not None and payload == _copy_payload(list(escaped))
    assert payload.split("\n")[0].endswith(r'{"q":"a\\\\b"}')  # COPY doubles it
    assert _copy_payload(with_metadata("{}", '{"t":"\t"}', "{}")) is None  # psycopg's rows


@pytest.mark.postgres
def test_postgres_stores_a_feed_batch_as_its_records() -> None:
    batch = validate_batch(_collector_body(30), max_feeds=MAX_FEEDS, now_ns=NOW_NS).feeds
    assert isinstance(batch, FeedBatch)
    with postgres.postgres_schema() as url:
        store = open_storage(url, max_connections=2)
        try:
            store.store_batch("batch", "sha", batch)
            store.store_batch("records", "sha", list(batch))
        finally:
            store.close()
        import psycopg
        with psycopg.connect(url) as conn:
            rows = conn.execute(
                "SELECT symbol, price::text, volume::text, timestamp, source, worker_id,"
                " metadata::text FROM price_feeds ORDER BY id").fetchall()
    assert rows[:30] == rows[30:] and len(rows) == 60
    assert [r[1] for r in rows[:30]] == [str(f["price"]) for f in batch]
    assert all(math.isfinite(float(r[2])) for r in rows)
