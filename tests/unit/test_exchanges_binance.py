"""Golden and edge tests for the Binance adapter (`binance` and `binanceus`), on real shapes."""

from __future__ import annotations

import json
import time

import pytest

from collectors.errors import ConfigError, ParseError
from collectors.exchanges import create
from collectors.exchanges.base import Kind
from collectors.exchanges.binance import (
    _SEEN_MAX,
    BINANCE_COM,
    BINANCE_COM_MARKETS,
    BINANCE_US_MARKETS,
    DEDUP_WINDOW_MS,
    BinanceAdapter,
    BinanceVenue,
    binance,
    binance_us,
)
from tests.unit.golden import load_cases

CASES = [(venue, i, case) for venue in ("binance", "binanceus")
         for i, case in enumerate(load_cases(venue))]
BTCUSDT = next(json.loads(c["frame"]) for v, _, c in CASES
               if v == "binance" and isinstance(c["frame"], str) and '"BTCUSDT"' in c["frame"]
               and "24hrTicker" in c["frame"])
E0 = 1703150652024  # BTCUSDT's event time in the real frame (ms)
RECEIVED_NS = 1703150652031250000


def _ticker(event_ms: int = E0, /, *, combined: bool = True, **over: object) -> str:
    data = {**BTCUSDT, "E": event_ms, **over}
    if not combined:
        return json.dumps(data)
    return json.dumps({"stream": f"{str(data['s']).lower()}@ticker", "data": data})


# ---- attributes, URLs, symbols -----------------------------------------------------------------

def test_venue_attributes() -> None:
    com, us = binance("w"), binance_us("w")
    assert (com.name, com.default_ws_url) == ("binance", "wss://stream.binance.com:9443")
    assert (us.name, us.default_ws_url) == ("binanceus", "wss://stream.binance.us:9443")
    assert com.default_symbols == ("BTC/USDT", "ETH/USDT", "SOL/USDT", "XRP/USDT", "DOGE/USDT")
    assert us.default_symbols == ("BTC/USD", "ETH/USD", "SOL/USD", "XRP/USD", "DOGE/USD")
    for adapter in (com, us):
        adapter.check_symbols(adapter.default_symbols)
        assert adapter.app_ping_interval_s is None
        assert adapter.ping_message() is None
        assert adapter.subscribe_messages(adapter.default_symbols) == []
        assert adapter.max_streams_per_connection == 1024
        assert 1.0 < adapter.liveness_timeout_s < adapter.symbol_stale_after_s
        # Our pings keep a connection of quiet markets alive, at most one per 5 s.
        assert adapter.ws_ping_interval_s is not None
        assert 5.0 <= adapter.ws_ping_interval_s <= adapter.liveness_timeout_s / 2


def test_connect_url_puts_lowercase_streams_in_the_path() -> None:
    url = binance("w").connect_url("wss://stream.binance.com:9443", ["BTC/USDT", "ETH/USDT"])
    assert url == "wss://stream.binance.com:9443/stream?streams=btcusdt@ticker/ethusdt@ticker"
    assert binance_us("w").connect_url("ws://127.0.0.1:9000/", ["BTC/USD", "BTC/USDT"]) == (
        "ws://127.0.0.1:9000/stream?streams=btcusd@ticker/btcusdt@ticker")


def test_connect_url_refuses_empty_oversized_and_impossible_lists() -> None:
    adapter = binance("w")
    with pytest.raises(ConfigError, match="no symbols"):
        adapter.connect_url("wss://x", [])
    with pytest.raises(ConfigError, match="at most 1024"):
        adapter.connect_url("wss://x", ["BTC/USDT"] * 1025)
    with pytest.raises(ConfigError, match="BTC/USD"):
        adapter.connect_url("wss://x", ["BTC/USD"])


def test_usd_symbol_on_binance_com_says_there_is_no_usd_market() -> None:
    with pytest.raises(ConfigError) as info:
        binance("w").check_symbols(["ETH/USDT", "BTC/USD"])
    err = info.value
    assert err.variable == "SYMBOLS"
    assert "binance.com has no USD market" in err.problem
    assert "BTC/USDT" in err.allowed and "binanceus" in err.allowed


def test_a_real_market_outside_the_table_is_subscribed_and_noted_as_unverified() -> None:
    """LTC/BTC and BTC/TRY are binance.com markets the table does not hold: they were refused
    at start ("not a binance market"). Binance sends nothing for a stream it does not know, and
    the parser names a symbol without data after 30 s, so the table cannot be the judge."""
    adapter = binance("w")
    # the service logs those
    assert adapter.check_symbols(["BTC/USDT", "LTC/BTC", "BTC/TRY"]) == ["LTC/BTC", "BTC/TRY"]
    assert adapter.connect_url("wss://x", ["LTC/BTC"]) == "wss://x/stream?streams=ltcbtc@ticker"
    data = {**BTCUSDT, "s": "LTCBTC", "c": "0.00123"}
    [rec] = adapter.parse(json.dumps({"stream": "ltcbtc@ticker", "data": data}),
                          RECEIVED_NS).records
    assert (rec.symbol, rec.price) == ("LTC/BTC", 0.00123)
    # a venue symbol neither in the table nor configured is still no market of ours
    with pytest.raises(ParseError, match="'NOPEBTC' is not in the symbol table"):
        adapter.parse(json.dumps({"stream": "nopebtc@ticker", "data": {**data, "s": "NOPEBTC"}}),
                      RECEIVED_NS)


def test_two_symbols_with_one_venue_name_and_malformed_symbols_are_refused() -> None:
    with pytest.raises(ConfigError, match="BTCU/SDT and BTC/USDT are both BTCUSDT"):
        binance("w").check_symbols(["BTCU/SDT"])
    with pytest.raises(ConfigError, match="ABC/D and AB/CD are both ABCD"):
        binance("w").check_symbols(["AB/CD", "ABC/D"])
    with pytest.raises(ConfigError, match="not a BASE/QUOTE symbol"):
        binance("w").check_symbols(["btcusdt"])


def test_binance_us_lists_usd_and_usdt_as_different_markets() -> None:
    us = binance_us("w")
    us.check_symbols(["BTC/USD", "BTC/USDT"])
    assert (us.to_venue("BTC/USD"), us.to_venue("BTC/USDT")) == ("BTCUSD", "BTCUSDT")
    assert (us.from_venue("BTCUSD"), us.from_venue("BTCUSDT")) == ("BTC/USD", "BTC/USDT")


def test_tables_are_explicit_real_and_unambiguous() -> None:
    assert len(BINANCE_COM_MARKETS) >= 30 and len(BINANCE_US_MARKETS) >= 30
    assert not [m for m in BINANCE_COM_MARKETS if m[1] == "USD"]  # binance.com has no USD market
    for markets, adapter in ((BINANCE_COM_MARKETS, binance("w")),
                             (BINANCE_US_MARKETS, binance_us("w"))):
        assert len(set(markets)) == len(markets)
        for base, quote in markets:
            symbol = f"{base}/{quote}"
            assert adapter.from_venue(adapter.to_venue(symbol)) == symbol
    # The reverse map is a lookup, not string surgery: BTCUSDC is the USDC market.
    assert binance("w").from_venue("BTCUSDC") == "BTC/USDC"
    with pytest.raises(ParseError, match="'BTCUSDS' is not in the symbol table"):
        binance("w").from_venue("BTCUSDS")


def test_an_ambiguous_table_is_refused() -> None:
    venue = BinanceVenue("x", "wss://x", (("AB", "C"), ("A", "BC")), ())
    with pytest.raises(ValueError, match="ambiguous"):
        BinanceAdapter("w", venue)


def test_http_451_hint_points_at_binanceus() -> None:
    assert "binanceus" in (binance("w").http_error_hint(451) or "")
    assert binance("w").http_error_hint(500) is None
    assert binance_us("w").http_error_hint(451) is None


# ---- ticker content -----------------------------------------------------------------------------

def test_price_is_c_never_p_and_time_keeps_milliseconds() -> None:
    rec = binance("w").parse(_ticker(), RECEIVED_NS).records[0]
    assert rec.price == 43647.99 and BTCUSDT["p"] == "754.65000000"
    assert rec.timestamp == "2023-12-21T09:24:12.024Z"
    assert rec.exchange_ns == E0 * 1_000_000
    assert rec.received_ns == RECEIVED_NS
    assert rec.metadata["timestamp_source"] == "exchange"


def test_raw_payload_and_combined_envelope_give_the_same_record() -> None:
    raw = binance("w").parse(_ticker(combined=False), RECEIVED_NS).records
    combined = binance("w").parse(_ticker(), RECEIVED_NS).records
    assert raw == combined


@pytest.mark.parametrize("bad_e", [None, 0, -1, 1.7e12, "1703150652024", True,
                                   E0 + 3 * 86_400_000, 10**30])
def test_unusable_event_time_falls_back_to_receive_time(bad_e: object) -> None:
    rec = binance("w").parse(_ticker(E0, E=bad_e), RECEIVED_NS).records[0]
    assert rec.timestamp == "2023-12-21T09:24:12.031250Z"
    assert rec.metadata["timestamp_source"] == "local"
    assert rec.exchange_ns == 0


@pytest.mark.parametrize(
    ("over", "reason"),
    [
        ({"c": "abc"}, "not a number"),
        ({"c": "-1"}, "must be > 0"),
        ({"c": "NaN"}, "not a number"),
        ({"c": "1_000"}, "not a number"),  # float() reads these three
        ({"c": " 7 "}, "not a number"),
        ({"c": "\u0661\u0662"}, "not a number"),  # Arabic-Indic 12
        ({"c": None}, "missing field 'c'"),
        ({"c": 10**400}, "out of range"),
        ({"v": "-3"}, "must be >= 0"),
        ({"s": 7}, "non-empty string"),
        ({"s": "btcusdt"}, "'btcusdt' is not in the symbol table"),
    ],
)
def test_bad_tickers_raise_parse_error_naming_the_problem(over: dict[str, object],
                                                          reason: str) -> None:
    with pytest.raises(ParseError, match=reason):
        binance("w").parse(_ticker(combined=False, **over), RECEIVED_NS)


def test_bad_metadata_is_dropped_not_fatal() -> None:
    rec = binance("w").parse(_ticker(b="x", P="-1.5", n="many", F=-1), RECEIVED_NS).records[0]
    assert "bid" not in rec.metadata and "trade_count" not in rec.metadata
    assert rec.metadata["change_pct"] == -1.5 and rec.metadata["first_trade_id"] == -1


@pytest.mark.parametrize("frame", ["{", "[]", "null", '"x"', b"\xff\xfe", '{"stream": 5}',
                                   '{"stream": "btcusdt@ticker", "data": []}',
                                   '{"e":"24hrTicker","c":NaN}'])
def test_malformed_frames_raise_parse_error(frame: str | bytes) -> None:
    with pytest.raises(ParseError):
        binance("w").parse(frame, RECEIVED_NS)


def test_unknown_events_are_other() -> None:
    adapter = binance("w")
    assert adapter.parse('{"e": "1hTicker", "s": "BTCUSDT"}', RECEIVED_NS).kind is Kind.OTHER
    assert adapter.parse("{}", RECEIVED_NS).kind is Kind.OTHER


# ---- event-time dedup ---------------------------------------------------------------------------

def test_repeated_and_too_old_event_times_are_dropped() -> None:
    adapter = binance("w")
    assert len(adapter.parse(_ticker(E0), RECEIVED_NS).records) == 1
    same = adapter.parse(_ticker(E0), RECEIVED_NS)
    ancient = adapter.parse(_ticker(E0 - DEDUP_WINDOW_MS - 1), RECEIVED_NS)
    assert (same.kind, same.records, same.duplicates) == (Kind.TICKER, (), 1)
    assert (ancient.records, ancient.duplicates) == ((), 1)
    assert len(adapter.parse(_ticker(E0 + 1000), RECEIVED_NS).records) == 1


def test_handover_overlap_keeps_out_of_order_updates_once() -> None:
    """Old and new connection interleave during a handover: every distinct E once."""
    adapter = binance("w")
    old_conn = [E0, E0 + 1000, E0 + 2000, E0 + 3000]
    new_conn = [E0 + 2000, E0 + 3000, E0 + 4000]
    arrival = [old_conn[0], old_conn[1], new_conn[0], new_conn[1], old_conn[2], new_conn[2],
               old_conn[3]]
    stored = [r.exchange_ns // 1_000_000 for e in arrival
              for r in adapter.parse(_ticker(e), RECEIVED_NS).records]
    assert sorted(stored) == sorted(set(old_conn) | set(new_conn))


def test_dedup_memory_stays_bounded() -> None:
    adapter = binance("w")
    for i in range(1000):  # a ticker a second, received 7 ms after its event time
        adapter.parse(_ticker(E0 + i * 1000), RECEIVED_NS + i * 1_000_000_000)
    assert max(len(s) for s in adapter._seen_ms.values()) <= 2 * DEDUP_WINDOW_MS // 1000 + 1


def test_dedup_memory_stays_bounded_when_event_times_run_ahead() -> None:
    """Hostile or broken `E`s, all within the plausible window ahead of the receive time but
    each one new: the remembered set is still bounded."""
    adapter = binance("w")
    for i in range(30_000):
        adapter.parse(_ticker(E0 + 10 + i * 5), RECEIVED_NS)
    assert max(len(s) for s in adapter._seen_ms.values()) <= 2 * _SEEN_MAX


def test_a_host_clock_a_few_minutes_behind_keeps_deduplicating() -> None:
    """Every real `E` runs 90 s ahead of our clock: the pruning kept only times up to 60 s
    past the (capped) newest, so a handover's overlap was stored twice."""
    adapter = binance("w")
    skew_ms = 90_000
    stored = []
    for i in range(400):  # a second apart, each delivered twice (a handover's overlap)
        received = RECEIVED_NS + i * 1_000_000_000
        for _copy in range(2):
            stored += adapter.parse(_ticker(E0 + skew_ms + i * 1000), received).records
    assert len(stored) == 400


def test_an_event_time_far_ahead_does_not_make_later_updates_late() -> None:
    """One `E` 23 hours ahead (within the old 24 h window) made every real update after it
    "late" for a day, and its mark, persisted, did so again after a restart."""
    adapter = binance("w")
    ahead = adapter.parse(_ticker(E0 + 23 * 3_600_000, c="999.0"), RECEIVED_NS).records
    # kept, but with the receive time: 23 h ahead is no event time of ours
    assert [(r.price, r.metadata["timestamp_source"]) for r in ahead] == [(999.0, "local")]
    for i in range(1, 16):
        records = adapter.parse(_ticker(E0 + i * 1000), RECEIVED_NS + i * 1_000_000_000).records
        assert [r.exchange_ns // 1_000_000 for r in records] == [E0 + i * 1000]


def test_an_event_time_a_little_ahead_is_kept_but_does_not_block_the_next_updates() -> None:
    adapter = binance("w")
    ahead = adapter.parse(_ticker(E0 + 240_000), RECEIVED_NS).records  # 4 minutes ahead
    assert [r.exchange_ns // 1_000_000 for r in ahead] == [E0 + 240_000]
    assert ahead[0].metadata["timestamp_source"] == "exchange"
    later = adapter.parse(_ticker(E0 + 1000), RECEIVED_NS + 1_000_000_000).records
    assert [r.exchange_ns // 1_000_000 for r in later] == [E0 + 1000]


def test_a_restored_mark_far_ahead_is_capped() -> None:
    """A mark an older version stored from a bad `E` (a day ahead) blocks nothing now."""
    adapter = binance("w")
    now_ms = time.time_ns() // 1_000_000
    adapter.restore_marks({"BTCUSDT": now_ms + 86_000_000})
    records = adapter.parse(_ticker(now_ms), now_ms * 1_000_000 + 5_000_000).records
    assert [r.exchange_ns // 1_000_000 for r in records] == [now_ms]


def test_event_times_are_per_symbol() -> None:
    adapter = binance("w")
    adapter.parse(_ticker(E0 + 5000), RECEIVED_NS)
    eth = adapter.parse(_ticker(E0, s="ETHUSDT"), RECEIVED_NS)
    assert [r.symbol for r in eth.records] == ["ETH/USDT"]


def test_24h_handover_overlap_is_dropped() -> None:
    """The old connection's last seconds and the new one's first overlap: each E passes once."""
    adapter = binance("w")
    old_conn = [E0 + i * 1000 for i in range(5)]
    new_conn = [E0 + i * 1000 for i in range(3, 8)]  # starts before the old one stopped
    interleaved = [old_conn[0], old_conn[1], old_conn[2], new_conn[0], old_conn[3], new_conn[1],
                   old_conn[4], new_conn[2], new_conn[3], new_conn[4]]
    kept: list[int] = []
    for event_ms in interleaved:
        parsed = adapter.parse(_ticker(event_ms), RECEIVED_NS + 10 * 1_000_000_000)
        kept.extend(r.exchange_ns // 1_000_000 for r in parsed.records)
    assert kept == [E0 + i * 1000 for i in range(8)]


def test_invalid_ticker_does_not_advance_the_event_time() -> None:
    adapter = binance("w")
    with pytest.raises(ParseError):
        adapter.parse(_ticker(E0, c="0"), RECEIVED_NS)
    assert len(adapter.parse(_ticker(E0), RECEIVED_NS).records) == 1


def test_local_time_updates_are_not_deduplicated() -> None:
    adapter = binance("w")
    adapter.parse(_ticker(E0), RECEIVED_NS)
    assert len(adapter.parse(_ticker(E0, E=None), RECEIVED_NS).records) == 1
    assert len(adapter.parse(_ticker(E0 + 1), RECEIVED_NS).records) == 1


def test_registry_holds_both_venues() -> None:
    assert create("binance", "w").name == BINANCE_COM.name
    assert create("binanceus", "w").default_ws_url == "wss://stream.binance.us:9443"


def test_restored_marks_drop_the_replay_after_a_restart() -> None:
    first = binance("w")
    [record] = first.parse(_ticker(E0), RECEIVED_NS).records
    mark = first.dedup_mark(record)
    assert mark == ("BTCUSDT", E0)
    restarted = binance("w")
    restarted.restore_marks(dict([mark]))
    assert restarted.parse(_ticker(E0), RECEIVED_NS).duplicates == 1
    assert len(restarted.parse(_ticker(E0 + 1000), RECEIVED_NS).records) == 1


def test_with_our_clock_behind_the_stored_mark_is_the_real_event_time() -> None:
    """The mark was the newest E as capped (receive time + 2 s), which is no E at all: after a
    restart the venue's replay of the last update was stored again."""
    adapter = binance("w")
    behind_ms = 30_000
    [record] = adapter.parse(_ticker(E0 + behind_ms), RECEIVED_NS).records
    mark = adapter.dedup_mark(record)
    assert mark == ("BTCUSDT", E0 + behind_ms)
    restarted = binance("w")
    restarted.restore_marks(dict([mark]))
    assert restarted.parse(_ticker(E0 + behind_ms), RECEIVED_NS).duplicates == 1
