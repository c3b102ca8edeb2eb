"""The service's msgspec frame decoder: same values as the standard library's for valid JSON,
ParseError (and only ParseError) for anything else."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collectors.decoding import decode_frame
from collectors.errors import ParseError
from collectors.exchanges.base import load_json

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
    b'{"v": 1e400}',                            # beyond the float range (json gives inf)
])
def test_invalid_frames_raise_parse_error(frame: str | bytes) -> None:
    with pytest.raises(ParseError, match=r"^malformed JSON: "):
        decode_frame(frame)


@settings(max_examples=300, deadline=None)
@given(frame=st.binary(max_size=64) | st.text(max_size=64))
def test_arbitrary_input_decodes_or_raises_parse_error(frame: str | bytes) -> None:
    try:
        value = decode_frame(frame)
    except ParseError:
        return
    # Whatever it accepts, the standard library accepts with the same meaning.
    assert json.dumps(value) == json.dumps(load_json(frame))
