"""The collector's frame decoder: msgspec's JSON parser behind the adapters' `Decoder` contract.

Adapters default to the standard library's decoder (`exchanges.base.load_json`) and import
nothing else; the service hands them this one, which is about three times faster on a ticker
frame (1.0 vs 2.9 us for Coinbase's ~400 bytes) and accepts the same JSON. It is stricter only
where the standard library is lax in ways no venue relies on: a lone UTF-16 surrogate escape
(`"\\ud800"`, not encodable as UTF-8) is a parse error here. A frame holding a number beyond
the float range, which msgspec refuses, is handed whole to the standard library's decoder (which
then also accepts a lone surrogate in it, as the adapters' default decoder does): the number
reads as `inf`, the adapters refuse that one value, item by item, and keep the valid items of the
same frame (a Kraken ticker carries several). NaN/Infinity literals, invalid UTF-8, trailing
data and absurd nesting are parse errors in both (tests/unit/test_decoding.py).

It is also a `ShapedDecoder`: an adapter describes its ticker as a `Shape` (standard library
terms), and gets back a function that decodes a ticker frame straight into a msgspec Struct,
with its numbers (decimal strings included) checked and converted in C. That replaces the
generic decode, a dict lookup and a `float()` call per field, and the adapter's own range
checks: about half an adapter's CPU per ticker (bench/parse_bench.py). Any frame that does not
match the shape exactly gives None, and the adapter takes its generic path, which also says what
is wrong with an invalid one; tests/unit/test_exchanges_robustness.py checks that both paths
build the same records.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterator
from typing import Annotated, Any, Literal

import msgspec

from collectors.errors import ParseError
from collectors.exchanges.base import Field, Items, Rule, Shape, T, load_json

_DECODER = msgspec.json.Decoder()
_MAX = sys.float_info.max
_POSITIVE = Annotated[float, msgspec.Meta(gt=0.0, le=_MAX)]
_NON_NEGATIVE = Annotated[float, msgspec.Meta(ge=0.0, le=_MAX)]
_SIGNED = Annotated[float, msgspec.Meta(ge=-_MAX, le=_MAX)]


class FrameDecoder:
    """`decode_frame(frame)` decodes any frame; `decode_frame.shaped(shape)` makes the typed
    decoder of one venue's ticker (see `exchanges.base.ShapedDecoder`)."""

    def __call__(self, frame: str | bytes) -> object:
        """One frame's JSON value (dict, list, str, int, float, bool or None).

        Raises ParseError, and only ParseError, for anything that is not valid UTF-8 JSON text.
        """
        try:
            return _DECODER.decode(frame)
        except msgspec.ValidationError as exc:
            if str(exc).startswith("Number out of range"):
                return load_json(frame)  # inf, refused by the adapter where it stands
            raise ParseError(f"malformed JSON: {str(exc)[:120]}") from exc
        except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError) as exc:
            raise ParseError(f"malformed JSON: {str(exc)[:120]}") from exc

    def shaped(self, shape: Shape[T], *,
               decimal_strings: bool = False) -> Callable[[str | bytes], T | None]:
        """frame -> `shape`'s Struct, or None when the frame does not match it exactly.

        `strict=False` is what lets msgspec read decimal strings as numbers; it also reads
        "1" as an integer and "null" as None, which no field type here accepts (ANY fields take
        any value unconverted). Raises ValueError for a shape it cannot check exactly.
        """
        names = (f"Shape{n}" for n in itertools.count())
        decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(
            _struct(shape, decimal_strings, names), strict=not decimal_strings)
        decode: Callable[[str | bytes], T] = decoder.decode  # a Struct that is a T, by shape

        def decode_shaped(frame: str | bytes) -> T | None:
            try:
                return decode(frame)
            except (msgspec.MsgspecError, ValueError, RecursionError):
                return None  # not this shape, or not JSON: the generic path decides

        return decode_shaped


def _struct(shape: Shape[object], decimal_strings: bool,
            names: Iterator[str]) -> type[msgspec.Struct]:
    fields: list[tuple[str, Any] | tuple[str, Any, None]] = []
    for field in shape.fields:
        kind = _field_type(field, decimal_strings, names)
        # An optional field defaults to None, and a number's type has no None: a null (or, with
        # strict=False, a "null" string, which msgspec would read as None) does not match. The
        # generic path reads null as absent but "null" as invalid. (ANY takes null as None,
        # as the generic path's dict.get gives it.)
        fields.append((field.key, kind) if field.required else (field.key, kind, None))
    if shape.tag is not None:
        # A required Literal field, not a msgspec tag: a Struct decoded on its own accepts an
        # object that lacks its tag.
        key, value = shape.tag
        fields.insert(0, (key, Literal[value]))
    return msgspec.defstruct(next(names), fields, kw_only=True,
                             forbid_unknown_fields=shape.closed, gc=False)


def _field_type(field: Field, decimal_strings: bool, names: Iterator[str]) -> Any:
    rule = field.rule
    if isinstance(rule, Shape):
        return _struct(rule, decimal_strings, names)
    if isinstance(rule, Items):
        return list[_struct(rule.shape, decimal_strings, names)]  # type: ignore[misc]
    if rule is Rule.ANY:
        return Any
    if rule is Rule.TEXT:
        return str
    if rule is Rule.POSITIVE:
        return _POSITIVE
    # msgspec reads the decimal string "-0" as an integer, so as 0.0 where float() gives -0.0 (a
    # different record once printed). Zeros are rare in the fields venues send as strings: there
    # a zero does not match, and takes the generic path. A signed field cannot exclude zero.
    if rule is Rule.NON_NEGATIVE:
        return _POSITIVE if decimal_strings else _NON_NEGATIVE
    if decimal_strings:
        raise ValueError(f"field {field.key!r}: a signed number cannot be read exactly from a "
                         "decimal string here ('-0'); make it Rule.ANY and check it yourself")
    return _SIGNED


#: The decoder the service gives every adapter.
decode_frame = FrameDecoder()
