"""The service's msgspec frame decoder: same values as the standard library's for valid JSON,
ParseError (and only ParseError) for anything else; its shaped decoders match a frame only when
they read it exactly as the adapters' generic path would."""

from __future__ import annotations

import json
import math
from typing import Protocol

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collectors.decoding import decode_frame
from collectors.errors import ParseError
from collectors.exchanges.base import (
    Field,
    Items,
    Rule,
    Shape,
    ShapedDecoder,
    load_json,
    number,
    signed_or_none,
)

# JSON documents as venues send them: objects of strings, ints, finite floats, nesting.
VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**30), 10**30)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=5),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(doc=VALUES, as_bytes=st.booleans(), ascii_only=st.booleans())
def test_valid_json_decodes_to_the_same_value_as_the_standard_library(
        doc: object, as_bytes: bool, ascii_only: bool) -> None:
    text = json.dumps(doc, ensure_ascii=ascii_only)
    frame: str | bytes = text.encode() if as_bytes else text
    value = decode_frame(frame)
    assert value == load_json(frame)
    assert json.dumps(value) == json.dumps(load_json(frame))  # same types too (int vs float)


@pytest.mark.parametrize("frame", [
    b"NaN", b'{"price": NaN}', b'{"price": Infinity}', b'{"price": -Infinity}',  # not JSON
    b"\xff\xfe{}", b'{"s": "\xed\xa0\x80"}',   # invalid UTF-8 (an encoded surrogate)
    b"[" * 100_000,                             # nesting beyond any real message
    b'{"a": 1} trailing', b"", b"   ", b'{"a": ', b"{'a': 1}",
    '"\\ud800"',                                # lone surrogate escape: not encodable as UTF-8
])
def test_invalid_frames_raise_parse_error(frame: str | bytes) -> None:
    with pytest.raises(ParseError, match=r"^malformed JSON: "):
        decode_frame(frame)



def test_a_number_beyond_the_float_range_reads_as_the_standard_library_reads_it() -> None:
    # msgspec refuses it; the frame is not lost for it: the value is inf, which the adapters
    # refuse where it stands, keeping the frame's other items.
    frame = b'{"v": 1e400, "w": [-1e999, 2.5]}'
    assert decode_frame(frame) == load_json(frame) == {"v": math.inf, "w": [-math.inf, 2.5]}

@settings(max_examples=300, deadline=None)
@given(frame=st.binary(max_size=64) | st.text(max_size=64))
def test_arbitrary_input_decodes_or_raises_parse_error(frame: str | bytes) -> None:
    try:
        value = decode_frame(frame)
    except ParseError:
        return
    # Whatever it accepts, the standard library accepts with the same meaning.
    assert json.dumps(value) == json.dumps(load_json(frame))


# ---- shaped decoding -----------------------------------------------------------------------------

class _Numbers(Protocol):
    pos: float
    nonneg: float | None
    signed: float | None
    raw: object


NUMBERS: Shape[_Numbers] = Shape(
    fields=(Field("pos", Rule.POSITIVE, required=True), Field("nonneg", Rule.NON_NEGATIVE),
            Field("signed", Rule.SIGNED), Field("raw", Rule.ANY)),
    tag=("type", "t"),
)
DECIMAL_NUMBERS: Shape[_Numbers] = Shape(fields=NUMBERS.fields[:2] + NUMBERS.fields[3:],
                                         tag=("type", "t"))
DECODE_NUMBERS = decode_frame.shaped(NUMBERS)
DECODE_DECIMAL_NUMBERS = decode_frame.shaped(DECIMAL_NUMBERS, decimal_strings=True)


def _floats_like_generic(raw: object, *, positive: bool) -> float | None:
    """What the adapters' generic path makes of a number field (None: absent or refused)."""
    try:
        return number({"k": raw}, "k", positive=positive, required=False)
    except ParseError:
        return None


# Strings around the decimal grammar: what venues send, and near misses that float() reads.
DECIMALS = (st.from_regex(r"\A[-+]?[0-9]{0,25}(\.[0-9]{0,25})?([eE][-+]?[0-9]{1,4})?\Z")
            | st.from_regex(r"\A\s?-?(0|[1-9][0-9_]{0,6})(\.[0-9]{1,8})?\s?\Z")
            | st.floats().map(repr) | st.integers().map(str)
            | st.sampled_from(["-0", "-0.0", "0", "0.0", "00", "-00", "1.", ".5", "1e400",
                               "-1e-400", "1e-400", "nan", "NaN", "inf", "-Infinity", "1_000",
                               " 1", "1 ", "+1", "0x10", "null", "true", "", "\u0661",
                               "4.9e-324", "2.4703282292062328e-324", "1.7976931348623158e308",
                               "9007199254740993", "18446744073709551617",
                               "0.30000000000000004"])
            | st.text(alphabet="0123456789.eE+- ", max_size=12))


@settings(max_examples=1000, deadline=None)
@given(text=DECIMALS)
def test_decimal_strings_read_like_float_or_do_not_match(text: str) -> None:
    """A shaped number from a decimal string is what float() reads (sign of zero included),
    and within its rule; anything else does not match and takes the generic path."""
    decode = DECODE_DECIMAL_NUMBERS
    for key, positive in (("pos", True), ("nonneg", False)):
        doc = {"type": "t", "pos": "1", key: text}
        got = decode(json.dumps(doc))
        expected = _floats_like_generic(text, positive=positive)
        if got is None:
            continue
        value = getattr(got, key)
        assert expected is not None, (text, value)
        assert (value, math.copysign(1, value)) == (expected, math.copysign(1, expected)), text


@settings(max_examples=1000, deadline=None)
@given(value=st.floats() | st.integers(-(10**400), 10**400) | st.booleans() | st.none()
       | st.text(max_size=5) | st.lists(st.integers(), max_size=2),
       decimal_strings=st.booleans())
def test_json_numbers_read_like_the_generic_path(value: object, decimal_strings: bool) -> None:
    decode = DECODE_DECIMAL_NUMBERS if decimal_strings else DECODE_NUMBERS
    keys = [("pos", True), ("nonneg", False)] + ([] if decimal_strings else [("signed", None)])
    for key, positive in keys:
        text = json.dumps({"type": "t", "pos": 1.5, key: value})
        try:
            generic = decode_frame(text)
        except ParseError:  # beyond the float range, NaN: not JSON for msgspec
            assert decode(text) is None
            continue
        assert isinstance(generic, dict)
        got = decode(text)
        if positive is None:
            expected = signed_or_none(generic[key])
        else:
            expected = _floats_like_generic(generic[key], positive=positive)
        if got is None:
            continue
        read = getattr(got, key)
        assert expected is not None and read is not None, (value, read)
        assert (read, math.copysign(1, read)) == (expected, math.copysign(1, expected)), value


@pytest.mark.parametrize(("doc", "matches"), [
    ({"type": "t", "pos": "1.5"}, True),
    ({"type": "t", "pos": 2, "raw": [1, {"a": None}]}, True),
    ({"pos": "1.5"}, False),                          # no tag
    ({"type": "u", "pos": "1.5"}, False),             # another tag
    ({"type": "t"}, False),                           # a required field absent
    ({"type": "t", "pos": None}, False),              # null is "absent" to the generic path
    ({"type": "t", "pos": "1", "nonneg": None}, False),
    ({"type": "t", "pos": "1", "nonneg": "null"}, False),   # msgspec would read None
    ({"type": "t", "pos": "1", "nonneg": "0"}, False),      # zeros take the generic path
    ({"type": "t", "pos": "1", "nonneg": "-0"}, False),     # (msgspec reads 0.0, float() -0.0)
    ({"type": "t", "pos": "0"}, False),
    ({"type": "t", "pos": "1", "nonneg": "-1"}, False),
    ({"type": "t", "pos": True}, False),
    ({"type": "t", "pos": "1", "extra": "kept out"}, True),
])
def test_what_matches_a_decimal_string_shape(doc: dict[str, object], matches: bool) -> None:
    assert (DECODE_DECIMAL_NUMBERS(json.dumps(doc)) is not None) is matches


class _Outer(Protocol):
    inner: list[_Numbers]


def test_closed_and_nested_shapes() -> None:
    outer: Shape[_Outer] = Shape(fields=(Field("inner", Items(NUMBERS), required=True),),
                                 closed=True)
    decode = decode_frame.shaped(outer)
    got = decode('{"inner": [{"type": "t", "pos": 1, "nonneg": 0, "signed": -0.0}]}')
    assert got is not None
    [item] = got.inner
    assert (item.pos, item.nonneg, item.signed, item.raw) == (1.0, 0.0, -0.0, None)
    assert item.signed is not None and math.copysign(1, item.signed) == -1
    assert decode('{"inner": [], "error": null}') is None          # closed: no other keys
    assert decode('{"inner": [{"type": "t", "pos": "1"}]}') is None  # strict: no strings
    assert decode('{"inner": [{"type": "t", "pos": 1}, 5]}') is None


@pytest.mark.parametrize("frame", [b"", b"{", b"[]", b"\xff", b'{"type": "t", "pos": 1} x',
                                   b'{"type": "t", "type": "u", "pos": 1}', "\ud800",
                                   b"[" * 100_000])
def test_frames_that_are_not_the_shape_give_none(frame: str | bytes) -> None:
    assert DECODE_NUMBERS(frame) is None


def test_a_signed_decimal_string_field_is_refused_up_front() -> None:
    with pytest.raises(ValueError, match="signed"):
        decode_frame.shaped(NUMBERS, decimal_strings=True)


def test_the_stdlib_decoder_has_no_shapes() -> None:
    assert isinstance(decode_frame, ShapedDecoder)
    assert not isinstance(load_json, ShapedDecoder)
