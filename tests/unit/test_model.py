"""Time helpers of the record model: the fast paths of `parse_iso` and `event_time` agree with the
general parser, and the formatting shortcuts with the general formatter."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collectors.model import (
    _parse_iso_general,
    event_time,
    iso_from_ms,
    iso_from_ns,
    parse_iso,
    plausible_event_ns,
)

TIMES = st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59))


def _same(text: str) -> None:
    try:
        expected = _parse_iso_general(text)
    except ValueError:
        with pytest.raises(ValueError):
            parse_iso(text)
        return
    assert parse_iso(text) == expected


@settings(max_examples=500, deadline=None)
@given(when=TIMES, digits=st.integers(0, 12), fraction=st.integers(0, 10**12 - 1),
       suffix=st.sampled_from(["Z", "+00:00", "-0000", "", "z", " Z", "+01:00"]))
def test_fast_path_agrees_with_the_general_parser(when: datetime, digits: int, fraction: int,
                                                  suffix: str) -> None:
    frac = f".{fraction:012d}"[: digits + 1] if digits else ""
    _same(when.strftime("%Y-%m-%dT%H:%M:%S") + frac + suffix)


@settings(max_examples=500, deadline=None)
@given(text=st.text(alphabet="0123456789-:.TZ+ \u0661\u00b2", min_size=19, max_size=32))
def test_fast_path_agrees_on_near_misses(text: str) -> None:
    _same(text)


@pytest.mark.parametrize(("text", "ns"), [
    ("2026-11-29T10:38:02.672020Z", 1_795_948_682_672_020_000),
    ("2026-11-29T10:38:02.6Z", 1_795_948_682_600_000_000),
    ("2026-11-29T10:38:02.123456789Z", 1_795_948_682_123_456_789),
    ("2024-02-29T00:00:00.5Z", 1_709_164_800_500_000_000),
])
def test_venue_times(text: str, ns: int) -> None:
    assert parse_iso(text) == (text, ns)


@pytest.mark.parametrize("text", [
    "2026-02-30T10:38:02.1Z",            # no such day
    "2026-11-29T24:00:00.1Z",            # no such hour
    "2026-11-29T10:38:02.1234567890Z",   # more than nanoseconds
    "2026-11-29T10:38:02.\u0661Z",       # a non-ASCII digit
    "2026-11-29T10:38:02.Z",
])
def test_invalid_times_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_iso(text)


def test_iso_from_ns_round_trips() -> None:
    ns = int(datetime(2026, 11, 29, 10, 38, 2, tzinfo=UTC).timestamp()) * 10**9 + 672_020_123
    assert iso_from_ns(ns) == "2026-11-29T10:38:02.672020Z"
    assert parse_iso(iso_from_ns(ns, digits=9)) == ("2026-11-29T10:38:02.672020123Z", ns)


RECEIVED_NS = 1_795_948_682_672_020_000  # 2026-11-29T10:38:02.672020Z


def _same_event_time(text: str) -> None:
    """`event_time` (its own copy of the fast path) is `parse_iso` + `plausible_event_ns`."""
    try:
        parsed = _parse_iso_general(text)
    except ValueError:
        assert event_time(text, RECEIVED_NS) is None
        return
    plausible = plausible_event_ns(parsed[1], RECEIVED_NS)
    assert event_time(text, RECEIVED_NS) == (parsed if plausible else None)


@settings(max_examples=500, deadline=None)
@given(when=st.datetimes(min_value=datetime(2008, 12, 1), max_value=datetime(2026, 12, 31)),
       digits=st.integers(0, 12), fraction=st.integers(0, 10**12 - 1),
       suffix=st.sampled_from(["Z", "+00:00", "-0000", "", "z", " Z", "+01:00"]))
def test_event_time_agrees_with_parse_iso(when: datetime, digits: int, fraction: int,
                                          suffix: str) -> None:
    frac = f".{fraction:012d}"[: digits + 1] if digits else ""
    _same_event_time(when.strftime("%Y-%m-%dT%H:%M:%S") + frac + suffix)


@settings(max_examples=500, deadline=None)
@given(text=st.text(alphabet="0123456789-:.TZ+ \u0661\u00b2", min_size=19, max_size=32))
def test_event_time_agrees_on_near_misses(text: str) -> None:
    _same_event_time(text)


@pytest.mark.parametrize("raw", [None, 5, 1.5, True, [], {}, b"2026-11-29T10:38:02.672020Z"])
def test_event_time_of_a_non_string_is_none(raw: object) -> None:
    assert event_time(raw, RECEIVED_NS) is None


@pytest.mark.parametrize(("text", "usable"), [
    ("2026-11-29T10:38:02.672020Z", True),
    ("2026-11-29T10:43:02.672020Z", True),     # 5 minutes ahead (clock skew)
    ("2026-11-29T10:43:02.672021Z", False),    # further ahead: a bad value, or our clock
    ("2026-11-30T10:38:02.672020Z", False),    # a day ahead
    ("2009-01-03T00:00:00Z", True),
    ("2009-01-02T23:59:59.999999Z", False),    # before bitcoin
    ("0001-01-01T00:00:00.000000Z", False),    # Coinbase's placeholder
])
def test_event_time_keeps_only_plausible_times(text: str, usable: bool) -> None:
    assert (event_time(text, RECEIVED_NS) is not None) is usable


@settings(max_examples=500, deadline=None)
@given(epoch_ns=st.integers(-(10**18), 4 * 10**18), digits=st.integers(0, 9))
def test_formatting_shortcuts_agree_with_the_general_formatter(epoch_ns: int, digits: int) -> None:
    seconds, frac_ns = divmod(epoch_ns, 1_000_000_000)
    whole = datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
    expected = whole + (f".{frac_ns:09d}"[: digits + 1] if digits else "") + "Z"
    assert iso_from_ns(epoch_ns, digits) == expected
    if digits == 3:
        assert iso_from_ms(epoch_ns // 1_000_000) == expected
