"""validate_body: every rule, every field kind, and robustness against arbitrary input."""

from __future__ import annotations

import json
import math
import time
from decimal import Decimal, InvalidOperation

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collectors.ingest.validate import (
    MAX_PROBLEMS,
    BodyError,
    Validation,
    parse_body,
    validate_body,
    validate_document,
)
from tests.support.servers import make_feed

NOW_NS = time.time_ns()


def run(feeds: object, *, max_feeds: int = 10_000) -> Validation:
    return validate_body(json.dumps({"feeds": feeds}).encode(), max_feeds=max_feeds,
                         now_ns=NOW_NS)


def only_problem(verdict: Validation) -> tuple[int | None, str, str]:
    assert not verdict.ok
    assert len(verdict.problems) == 1, verdict.problems
    p = verdict.problems[0]
    return p.index, p.field, p.problem


def test_valid_record_round_trip() -> None:
    feed = make_feed(timestamp="2026-01-02T03:04:05.123456789+00:00", price=45123.5)
    verdict = run([feed, make_feed(volume=None, metadata=None), make_feed(volume=0)])
    assert verdict.ok
    first = verdict.feeds[0]
    assert first["symbol"] == "BTC/USD"
    assert first["price"] == Decimal("45123.5")
    assert first["timestamp"] == "2026-01-02T03:04:05.123456789Z"
    assert first["timestamp_ns"] % 1_000_000_000 == 123456789
    assert json.loads(first["metadata_json"]) == feed["metadata"]
    assert verdict.feeds[1]["volume"] is None
    assert verdict.feeds[1]["metadata"] == {}
    assert verdict.feeds[2]["volume"] == 0


def test_price_keeps_exact_decimal_text() -> None:
    raw = b'{"feeds":[' + json.dumps(make_feed()).replace(
        '"price": 45123.5', '"price": 0.10000000000000000001').encode() + b"]}"
    verdict = validate_body(raw, max_feeds=10, now_ns=NOW_NS)
    assert verdict.feeds[0]["price"] == Decimal("0.10000000000000000001")


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("field", ["price", "volume"])
def test_non_finite_literals_name_the_field(literal: str, field: str) -> None:
    text = json.dumps({"feeds": [make_feed(), make_feed(**{field: 1.0})]})
    text = text.replace(f'"{field}": 1.0', f'"{field}": {literal}')
    verdict = validate_body(text.encode(), max_feeds=10, now_ns=NOW_NS)
    index, got_field, problem = only_problem(verdict)
    assert (index, got_field) == (1, field)
    assert literal in problem and "finite" in problem
    assert verdict.feeds == []


@pytest.mark.parametrize(("literal", "fragment"), [
    ("1e400", "not a finite 64-bit number"),
    ("1e-400", "greater than 0"),
    ("1" * 41, "significant digits"),
])
def test_price_out_of_float_range(literal: str, fragment: str) -> None:
    text = json.dumps({"feeds": [make_feed(price=1.5)]}).replace("1.5", literal)
    index, field, problem = only_problem(validate_body(text.encode(), max_feeds=5,
                                                       now_ns=NOW_NS))
    assert (index, field) == (0, "price")
    assert fragment in problem


@pytest.mark.parametrize(("field", "value", "fragment"), [
    ("price", -1, "greater than 0"),
    ("price", 0, "greater than 0"),
    ("price", True, "not a boolean"),
    ("price", "45123.5", "not a string"),
    ("price", None, "required"),
    ("volume", -0.5, "negative"),
    ("volume", False, "not a boolean"),
    ("volume", [1], "not a list"),
    ("symbol", "btc/usd", "canonical"),
    ("symbol", "BTCUSD", "canonical"),
    ("symbol", "BTC/USD\n", "canonical"),
    ("symbol", "X" * 10_000, "10000 characters"),
    ("symbol", "BTC/USD'; DROP TABLE price_feeds;--", "canonical"),
    ("symbol", 5, "not a number"),
    ("timestamp", "0001-01-01T00:00:00Z", "before 2009-01-03"),
    ("timestamp", "1970-01-01T00:00:00Z", "before 2009-01-03"),
    ("timestamp", "9999-12-31T23:59:59Z", "in the future"),
    ("timestamp", "2026-11-29 10:00:00", "ISO 8601"),
    ("timestamp", "2026-11-29T10:00:00+02:00", "ISO 8601"),
    ("timestamp", "2026-13-29T10:00:00Z", "ISO 8601"),
    ("timestamp", "٢٠٢٦-11-29T10:00:00Z", "ISO 8601"),
    ("timestamp", 1764410400, "not a number"),
    ("source", "", "1-64"),
    ("source", "coin base", "1-64"),
    ("source", "s" * 65, "1-64"),
    ("worker_id", "w/1", "1-64"),
    ("worker_id", None, "required"),
    ("metadata", [], "must be an object"),
    ("metadata", "x", "must be an object"),
    ("metadata", {f"k{i}": i for i in range(65)}, "at most 64"),
    ("metadata", {"k" * 65: 1}, "key"),
    ("metadata", {"": 1}, "key"),
    ("metadata", {f"k{i}": "v" * 200 for i in range(30)}, "4096 bytes"),
])
def test_each_invalid_field_kind(field: str, value: object, fragment: str) -> None:
    index, got_field, problem = only_problem(run([make_feed(), make_feed(**{field: value})]))
    assert index == 1
    assert got_field == field
    assert fragment in problem
    assert len(problem) < 200  # never echoes a 10,000-character value


@pytest.mark.parametrize(("value", "fragment"), [
    ({"nested": {"a": 1}}, "not an object"),
    ({"list": [1]}, "not a list"),
    ({"long": "x" * 257}, "longer than 256"),
    ({"nul": "a\u0000b"}, "NUL"),
    ({"surrogate": "\ud800"}, "surrogates"),
])
def test_metadata_values(value: dict[str, object], fragment: str) -> None:
    index, field, problem = only_problem(run([make_feed(metadata=value)]))
    assert (index, field) == (0, f"metadata.{next(iter(value))}")
    assert fragment in problem


def test_metadata_nan_names_the_key() -> None:
    text = json.dumps({"feeds": [make_feed(metadata={"bid": 1.5})]}).replace("1.5", "NaN")
    index, field, problem = only_problem(validate_body(text.encode(), max_feeds=5,
                                                       now_ns=NOW_NS))
    assert (index, field) == (0, "metadata.bid")
    assert "NaN" in problem


def test_metadata_scalars_accepted() -> None:
    meta = {"s": "text", "i": 7, "f": 1.25, "t": True, "n": None, "big": 2**62}
    verdict = run([make_feed(metadata=meta)])
    assert verdict.ok
    assert json.loads(verdict.feeds[0]["metadata_json"]) == meta


def test_unknown_fields_rejected_by_name() -> None:
    index, field, problem = only_problem(run([make_feed(exchange="coinbase")]))
    assert (index, field, problem) == (0, "exchange", "unknown field")
    verdict = validate_body(b'{"feeds": [], "extra": 1}', max_feeds=5, now_ns=NOW_NS)
    assert only_problem(verdict) == (None, "extra", "unknown field")


def test_every_bad_record_listed_and_nothing_kept() -> None:
    feeds = [make_feed(price=-1) if i % 2 else make_feed() for i in range(10)]
    verdict = run(feeds)
    assert verdict.feeds == []
    assert verdict.invalid_records == 5
    assert [p.index for p in verdict.problems] == [1, 3, 5, 7, 9]


def test_problems_capped() -> None:
    verdict = run([make_feed(price=-1, volume=-1)] * 300)
    assert verdict.invalid_records == 300
    assert len(verdict.problems) == MAX_PROBLEMS


@pytest.mark.parametrize(("doc", "field"), [
    ([], "(body)"),
    ({}, "feeds"),
    ({"feeds": {}}, "feeds"),
    ({"feeds": []}, "feeds"),
    ({"feeds": [1]}, "(record)"),
])
def test_body_shape(doc: object, field: str) -> None:
    verdict = validate_body(json.dumps(doc).encode(), max_feeds=5, now_ns=NOW_NS)
    assert not verdict.ok
    assert verdict.problems[0].field == field


def test_too_many_feeds_is_413() -> None:
    with pytest.raises(BodyError) as info:
        run([make_feed()] * 6, max_feeds=5)
    assert info.value.status == 413


@pytest.mark.parametrize("raw", [
    b"", b"{", b"not json", b'{"feeds": [}', b"\xff\xfe{}", b"[" * 100_000,
    b'{"feeds": [], "feeds": []}', b'{"a": 1' + b"0" * 5000 + b"}",
])
def test_malformed_is_400(raw: bytes) -> None:
    with pytest.raises(BodyError) as info:
        parse_body(raw)
    assert info.value.status == 400


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_parse_body_only_raises_body_error(raw: bytes) -> None:
    try:
        parse_body(raw)
    except BodyError as exc:
        assert exc.status == 400


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)
_field_values = st.fixed_dictionaries({}, optional={
    "symbol": st.sampled_from(["BTC/USD", "ETH/USDT", "x"]) | _json,
    "price": st.floats(allow_nan=False, allow_infinity=False) | _json,
    "volume": _json,
    "timestamp": st.sampled_from(["2026-01-01T00:00:00Z", "2026-01-01T00:00:00.5+00:00"])
    | _json,
    "source": st.sampled_from(["coinbase", ""]) | _json,
    "worker_id": st.sampled_from(["w-1"]) | _json,
    "metadata": _json,
})


@settings(max_examples=300, deadline=None)
@given(st.lists(_field_values | _json, max_size=5))
def test_validation_never_crashes(feeds: list[object]) -> None:
    verdict = validate_body(json.dumps({"feeds": feeds}).encode(), max_feeds=10,
                            now_ns=NOW_NS)
    assert verdict.ok == (len(verdict.feeds) == len(feeds) and bool(feeds))
    for problem in verdict.problems:
        assert problem.index is None or 0 <= problem.index < len(feeds)


# --- number literals of any magnitude -----------------------------------------------------------
#
# `Decimal("1e999999999999999999999")` raises InvalidOperation: its exponent is beyond the
# decimal module's range. Such a literal is judged like any other, by the float it denotes (an
# infinity or a zero, as `1e400` and `1e-400` are): never an exception out of validation.

_PLACEHOLDER = "@number@"
_exponent = st.integers(-500, 500) | st.integers(-(10**24), 10**24)
_any_literal = st.builds(
    lambda sign, mantissa, exponent: f"{sign}{mantissa}{exponent}",
    st.sampled_from(["", "-"]),
    st.from_regex(r"(0|[1-9][0-9]{0,5})(\.[0-9]{1,5})?", fullmatch=True),
    st.sampled_from(["e", "E", "e+", "E-"]).flatmap(
        lambda mark: _exponent.map(lambda n: f"{mark}{n}" if n >= 0 else f"{mark[0]}{n}")),
)


def _with_literal(field: str, literal: str) -> bytes:
    """[valid, valid with `literal` as the raw JSON of `field` (or of metadata key `m`)]."""
    value = {_PLACEHOLDER: 0} if field == "metadata" else _PLACEHOLDER
    text = json.dumps({"feeds": [make_feed(), make_feed(**{field: value})]})
    placeholder = f'{{"{_PLACEHOLDER}": 0}}' if field == "metadata" else f'"{_PLACEHOLDER}"'
    return text.replace(placeholder, f'{{"m": {literal}}}' if field == "metadata"
                        else literal).encode()


def _both_paths(raw: bytes) -> Validation:
    fast = validate_body(raw, max_feeds=10, now_ns=NOW_NS)
    reference = validate_document(parse_body(raw), max_feeds=10, now_ns=NOW_NS)
    assert repr(fast) == repr(reference)
    return fast


def _storable(literal: str) -> bool:
    """A Decimal holds it, and PostgreSQL's numeric too (at most 16383 digits after the point,
    zeros included: PostgreSQL refuses `0e-16384` as well)."""
    try:
        exponent = Decimal(literal).as_tuple().exponent
    except InvalidOperation:
        return False
    return not isinstance(exponent, int) or exponent >= -16383


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(["price", "volume", "metadata"]), _any_literal)
def test_any_number_literal_is_judged_by_its_float(field: str, literal: str) -> None:
    verdict = _both_paths(_with_literal(field, literal))
    as_float = float(literal)
    # Prices and volumes are stored exactly, as Decimals: they must also be storable. A volume
    # is judged by its decimal's sign too: -1e-400 is -0.0 as a float, but negative.
    if field == "price":
        ok = math.isfinite(as_float) and as_float > 0 and _storable(literal)
    elif field == "volume":
        ok = math.isfinite(as_float) and _storable(literal) and Decimal(literal) >= 0
    else:
        ok = math.isfinite(as_float)
    assert verdict.ok == ok, (verdict.problems, literal)
    if not ok:
        want = "metadata.m" if field == "metadata" else field
        assert [(p.index, p.field) for p in verdict.problems] == [(1, want)]
    elif field == "metadata":
        assert verdict.feeds[1]["metadata"] == {"m": as_float}
        assert verdict.feeds[1]["metadata_json"] == json.dumps({"m": as_float},
                                                               separators=(",", ":"))
    else:
        assert repr(verdict.feeds[1][field]) == repr(Decimal(literal))  # type: ignore[literal-required]


@pytest.mark.parametrize(("field", "literal", "fragment"), [
    ("price", "1e999999999999999999999", "not a finite 64-bit number"),
    ("price", "-1E+999999999999999999999", "not a finite 64-bit number"),
    ("price", "1e-999999999999999999999", "greater than 0"),
    ("price", "-1e-999999999999999999999", "greater than 0"),
    ("volume", "1e999999999999999999999", "not a finite 64-bit number"),
    ("volume", "-1e999999999999999999999", "not a finite 64-bit number"),
    ("volume", "1e-999999999999999999999", "stored exactly"),
    ("volume", "-0.0e-999999999999999999999", "stored exactly"),
    ("price", "1" * 41 + "e-999999999999999999999", "significant digits"),
    ("metadata", "1e999999999999999999999", "not a finite 64-bit number"),
    ("metadata", "-1E999999999999999999999", "not a finite 64-bit number"),
    ("price", "1" + "0" * 400, "significant digits"),  # 10**400 as an integer literal
    ("volume", "-1" + "0" * 400, "significant digits"),
])
def test_numbers_no_decimal_or_float_holds_name_the_field(field: str, literal: str,
                                                          fragment: str) -> None:
    verdict = _both_paths(_with_literal(field, literal))
    want = "metadata.m" if field == "metadata" else field
    index, got_field, problem = only_problem(verdict)
    assert (index, got_field) == (1, want)
    assert fragment in problem and len(problem) < 200
    assert verdict.feeds == []


@pytest.mark.parametrize(("literal", "value"), [
    ("1e-999999999999999999999", 0.0),  # its float, as for 1e-400
    ("-1e-999999999999999999999", -0.0),
    ("1" + "0" * 400, 10**400),  # integer literals stay exact ints in metadata
])
def test_metadata_numbers_out_of_decimal_or_float_range_kept(literal: str, value: object) -> None:
    verdict = _both_paths(_with_literal("metadata", literal))
    assert verdict.ok
    assert repr(verdict.feeds[1]["metadata"]["m"]) == repr(value)
