"""Per-symbol freshness: stale is reported once, recovery is reported, nothing reconnects."""

from __future__ import annotations

from collectors.pipeline import FIRST_DATA_TIMEOUT_S, Freshness


def test_quiet_symbol_goes_stale_once_and_recovers() -> None:
    f = Freshness(["BTC/USD", "ETH/USD"], stale_after_s=60, now=0.0)
    f.seen("BTC/USD", 1.0)
    f.seen("ETH/USD", 1.0)
    assert f.check(50.0) == ([], [])
    f.seen("ETH/USD", 55.0)
    assert f.check(62.0) == (["BTC/USD"], [])
    assert f.check(70.0) == ([], [])  # reported once
    assert f.stale == {"BTC/USD"}
    assert f.seen("BTC/USD", 71.0) is True
    assert f.stale == set()


def test_symbol_that_never_sends_is_named() -> None:
    f = Freshness(["BTC/USD", "NOPE/USD"], stale_after_s=120, now=0.0)
    f.seen("BTC/USD", 1.0)
    assert f.check(FIRST_DATA_TIMEOUT_S - 1) == ([], [])
    assert f.check(FIRST_DATA_TIMEOUT_S + 1) == ([], ["NOPE/USD"])


def test_forgotten_symbols_are_not_watched() -> None:
    f = Freshness(["BTC/USD", "XRP/FOO"], stale_after_s=10, now=0.0)
    f.forget("XRP/FOO")
    f.seen("BTC/USD", 100.0)
    assert f.check(105.0) == ([], [])
    assert f.seen("XRP/FOO", 1.0) is False


def test_new_connection_restarts_the_first_data_window() -> None:
    f = Freshness(["BTC/USD"], stale_after_s=120, now=0.0)
    f.restart_clock(100.0)
    assert f.check(100.0 + FIRST_DATA_TIMEOUT_S - 1) == ([], [])
