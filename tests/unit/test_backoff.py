"""Backoff, status classes and Retry-After: pure policies, property-tested."""

from __future__ import annotations

import random
from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from collectors.backoff import Backoff, Outcome, classify_status, parse_retry_after


@given(st.integers(min_value=0, max_value=100), st.integers(min_value=0, max_value=2**32))
def test_delay_is_within_the_capped_exponential_envelope(attempts: int, seed: int) -> None:
    b = Backoff(base_s=1.0, cap_s=60.0, rng=random.Random(seed))
    for n in range(attempts + 1):
        d = b.next_delay()
        assert 0.0 <= d <= min(60.0, 2.0**n)


def test_full_jitter_spreads_and_reset_restarts() -> None:
    b = Backoff(base_s=1.0, cap_s=60.0, rng=random.Random(1))
    delays = [b.next_delay() for _ in range(12)]
    assert max(delays) > 8  # it grows...
    assert len({round(d, 6) for d in delays}) == 12  # ...with jitter
    b.reset()
    assert b.next_delay() <= 1.0


def test_status_classes_follow_the_contract() -> None:
    assert classify_status(200) is Outcome.STORED
    assert classify_status(201) is Outcome.STORED
    for s in (408, 409, 429, 500, 502, 503, 504):
        assert classify_status(s) is Outcome.RETRY
    for s in (401, 403):
        assert classify_status(s) is Outcome.AUTH
    for s in (400, 404, 413, 415, 422):
        assert classify_status(s) is Outcome.REJECT


def test_retry_after_seconds_and_dates() -> None:
    now = datetime(2026, 11, 29, 10, 0, 0, tzinfo=UTC)
    assert parse_retry_after("3", now) == 3.0
    assert parse_retry_after("Sun, 29 Nov 2026 10:00:30 GMT", now) == 30.0
    assert parse_retry_after("Sun, 29 Nov 2026 09:00:00 GMT", now) == 0.0
    assert parse_retry_after("99999", now) == 600.0
    # str.isdigit() says yes to these, float() no: a header is latin-1, so one byte will do.
    assert parse_retry_after("\xb2", now) is None
    assert parse_retry_after("\u0663", now) is None
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None


def test_retry_after_dates_past_datetimes_range_are_ignored() -> None:
    # parsedate_to_datetime raises OverflowError on these (once a delivery-thread crash).
    for value in ("Sun, 06 Nov 99999999999 08:49:37 GMT",
                  "Sun, 99999999999 Nov 1994 08:49:37 GMT",
                  "Sun, 06 Nov 1994 99999999999:49:37 GMT",
                  "Sun, 06 Nov 1994 08:49:99999999999 GMT"):
        assert parse_retry_after(value) is None


_number = st.integers(min_value=-(10**15), max_value=10**15).map(str)


@given(day=_number, year=_number, hour=_number, minute=_number, second=_number,
       zone=st.sampled_from(["GMT", "UT", "+0000", "-2359", "+9999", "+99999999999", ""]))
def test_retry_after_never_raises_on_a_date_shaped_value(
        day: str, year: str, hour: str, minute: str, second: str, zone: str) -> None:
    value = f"Sun, {day} Nov {year} {hour}:{minute}:{second} {zone}"
    result = parse_retry_after(value, datetime(2026, 11, 29, tzinfo=UTC))
    assert result is None or 0.0 <= result <= 600.0


@given(st.text())
def test_retry_after_never_raises(value: str) -> None:
    result = parse_retry_after(value)
    assert result is None or 0.0 <= result <= 600.0
