"""Golden and edge tests for the Coinbase adapter, on real message shapes."""

from __future__ import annotations

import json

import pytest

from collectors.decoding import decode_frame
from collectors.errors import ParseError
from collectors.exchanges.base import Decoder, Kind, load_json
from collectors.exchanges.coinbase import (
    LATE_RUN_RESTART,
    SEQUENCE_JUMP,
    CoinbaseAdapter,
    from_product,
    to_product,
)
from tests.unit.golden import load_cases

CASES = load_cases("coinbase")
RECEIVED_NS = 1_700_000_000_123_456_000


def _ticker(seq: int, **over: object) -> str:
    base = next(c["frame"] for c in CASES if c["frame"].get("product_id") == "BTC-USD")
    return json.dumps({**base, "sequence": seq, **over})


def test_record_carries_both_clocks() -> None:
    rec = CoinbaseAdapter("w").parse(_ticker(5), RECEIVED_NS).records[0]
    assert rec.received_ns == RECEIVED_NS
    assert rec.exchange_ns == 1_669_852_800_122_581_000  # 2022-12-01T00:00:00.122581Z


def test_duplicate_and_late_sequences_are_dropped() -> None:
    adapter = CoinbaseAdapter("w")
    assert len(adapter.parse(_ticker(10), RECEIVED_NS).records) == 1
    dup = adapter.parse(_ticker(10), RECEIVED_NS)
    late = adapter.parse(_ticker(9), RECEIVED_NS)
    assert (dup.records, dup.duplicates) == ((), 1)
    assert (late.records, late.duplicates) == ((), 1)
    assert len(adapter.parse(_ticker(12), RECEIVED_NS).records) == 1  # gaps are normal


def test_sequences_are_per_product() -> None:
    adapter = CoinbaseAdapter("w")
    adapter.parse(_ticker(100), RECEIVED_NS)
    other = adapter.parse(_ticker(5, product_id="ETH-USD"), RECEIVED_NS)
    assert [r.symbol for r in other.records] == ["ETH/USD"]


def test_invalid_ticker_does_not_advance_sequence() -> None:
    adapter = CoinbaseAdapter("w")
    with pytest.raises(ParseError):
        adapter.parse(_ticker(20, price="abc"), RECEIVED_NS)
    assert len(adapter.parse(_ticker(20), RECEIVED_NS).records) == 1


@pytest.mark.parametrize(
    ("over", "reason"),
    [
        ({"price": "abc"}, "not a number"),
        ({"price": "-1"}, "must be > 0"),
        ({"price": "0"}, "must be > 0"),
        ({"price": "NaN"}, "not a number"),
        ({"price": "1_000"}, "not a number"),  # float() reads these three
        ({"price": " 7 "}, "not a number"),
        ({"price": "\u0661\u0662"}, "not a number"),  # Arabic-Indic 12
        ({"price": "1e400"}, "not finite"),
        ({"price": True}, "boolean"),
        ({"price": None}, "missing field 'price'"),
        ({"product_id": "btcusd"}, "not a Coinbase product id"),
        ({"product_id": "BTC-USD\n"}, "not a Coinbase product id"),
        ({"product_id": 7}, "non-empty string"),
        ({"volume_24h": "-3"}, "must be >= 0"),
    ],
)
def test_bad_tickers_raise_parse_error_naming_the_problem(over: dict[str, object],
                                                          reason: str) -> None:
    with pytest.raises(ParseError, match=reason):
        CoinbaseAdapter("w").parse(_ticker(1, **over), RECEIVED_NS)


@pytest.mark.parametrize("frame", ["{", "[]", "null", '"x"', '{"type": 5}', b"\xff\xfe",
                                   '{"type":"ticker","price":NaN}'])
def test_malformed_frames_raise_parse_error(frame: str | bytes) -> None:
    with pytest.raises(ParseError):
        CoinbaseAdapter("w").parse(frame, RECEIVED_NS)


@pytest.mark.parametrize("bad_time", [None, "", "yesterday", "0001-01-01T00:00:00.000000Z",
                                      "1970-01-01T00:00:00Z", "2999-01-01T00:00:00Z",
                                      "2022-12-01T00:00:00.122581+05:00"])
def test_unusable_time_falls_back_to_receive_time(bad_time: object) -> None:
    rec = CoinbaseAdapter("w").parse(_ticker(1, time=bad_time), RECEIVED_NS).records[0]
    assert rec.timestamp == "2023-11-14T22:13:20.123456Z"
    assert rec.metadata["timestamp_source"] == "local"
    assert rec.exchange_ns == 0


def test_nanosecond_time_keeps_full_precision() -> None:
    rec = CoinbaseAdapter("w").parse(_ticker(1, time="2022-12-01T00:00:00.122581123Z"),
                                     RECEIVED_NS).records[0]
    assert rec.timestamp == "2022-12-01T00:00:00.122581123Z"
    assert rec.exchange_ns == 1_669_852_800_122_581_123


def test_subscribe_message_matches_the_documented_request() -> None:
    [msg] = CoinbaseAdapter("w").subscribe_messages(["BTC/USD", "ETH/USDT"])
    assert json.loads(msg) == {"type": "subscribe", "product_ids": ["BTC-USD", "ETH-USDT"],
                               "channels": ["ticker", "heartbeat"]}
    assert CoinbaseAdapter("w").subscribe_messages([]) == []


def test_symbol_mapping_round_trips() -> None:
    for symbol in ("BTC/USD", "BTC/USDC", "BTC/USDS", "SHIB/USD", "1INCH/USD"):
        assert from_product(to_product(symbol)) == symbol


def test_unknown_type_is_other() -> None:
    assert CoinbaseAdapter("w").parse('{"type":"status"}', RECEIVED_NS).kind is Kind.OTHER


def _restarted(mark: tuple[str, int] | None) -> CoinbaseAdapter:
    """A new adapter (a restarted process) that restored `mark` from the spool."""
    assert mark is not None
    adapter = CoinbaseAdapter("w")
    adapter.restore_marks(dict([mark]))
    return adapter


def test_restored_marks_drop_the_first_ticker_replayed_after_a_restart() -> None:
    first = CoinbaseAdapter("w")
    [record] = first.parse(_ticker(50), RECEIVED_NS).records
    assert first.dedup_mark(record) == ("BTC-USD", 50)
    restarted = _restarted(first.dedup_mark(record))
    assert restarted.parse(_ticker(50), RECEIVED_NS).duplicates == 1
    assert len(restarted.parse(_ticker(51), RECEIVED_NS).records) == 1


@pytest.mark.parametrize("decode", [load_json, decode_frame], ids=["generic", "shaped"])
@pytest.mark.parametrize("sequence", [2**63, 10**30, -1])
def test_a_sequence_outside_sqlite_integers_is_refused(decode: Decoder, sequence: int) -> None:
    """2**63 became a dedup mark SQLite could not store: the parser thread died on it."""
    adapter = CoinbaseAdapter("w", decode)
    with pytest.raises(ParseError, match="'sequence' is out of range"):
        adapter.parse(_ticker(sequence), RECEIVED_NS)
    assert len(adapter.parse(_ticker(2**63 - 1), RECEIVED_NS).records) == 1


@pytest.mark.parametrize("decode", [load_json, decode_frame], ids=["generic", "shaped"])
def test_one_absurd_sequence_does_not_make_every_later_ticker_a_duplicate(
        decode: Decoder) -> None:
    adapter = CoinbaseAdapter("w", decode)
    kept = [len(adapter.parse(_ticker(seq), RECEIVED_NS).records)
            for seq in (100, 10**18, 101, 102, 102, 90)]
    # 10**18 is kept (it may be a real renumbering); 101 is far below it: the count starts
    # over there, and the replays after it are duplicates again
    assert kept == [1, 1, 1, 1, 0, 0]


def test_a_restored_mark_far_ahead_starts_over_at_the_first_real_sequence() -> None:
    """A mark stored from a bad sequence (by an older version) blocks nothing."""
    adapter = _restarted(("BTC-USD", 10**18))
    assert len(adapter.parse(_ticker(500), RECEIVED_NS).records) == 1
    assert adapter.parse(_ticker(500), RECEIVED_NS).duplicates == 1


def test_a_late_ticker_however_far_below_is_dropped_within_a_connection() -> None:
    adapter = CoinbaseAdapter("w")
    for seq in (5_000_000, 5_000_100, 5_000_200):
        adapter.parse(_ticker(seq), RECEIVED_NS)
    # 5_000_150: below the pending 5_000_200, a plausible step past the last (5_000_100)
    assert [adapter.parse(_ticker(seq), RECEIVED_NS).duplicates
            for seq in (5_000_150, 5_000_050, 4_000_000, 3)] == [1, 1, 1, 1]


@pytest.mark.parametrize("ahead", [SEQUENCE_JUMP + 10, 500_000, 10**15])
def test_one_ticker_far_ahead_does_not_silence_the_product(ahead: int) -> None:
    """A bad sequence a little ahead (500,000: less than the old reset gap) made every real
    ticker after it a duplicate until the real count caught up: hours."""
    adapter = CoinbaseAdapter("w")
    assert len(adapter.parse(_ticker(1_000), RECEIVED_NS).records) == 1
    assert len(adapter.parse(_ticker(1_000 + ahead), RECEIVED_NS).records) == 1
    kept = [len(adapter.parse(_ticker(seq), RECEIVED_NS).records) for seq in (1_003, 1_005, 1_009)]
    assert kept == [1, 1, 1]


@pytest.mark.parametrize("decode", [load_json, decode_frame], ids=["generic", "shaped"])
def test_two_bad_sequences_in_a_row_silence_the_product_for_a_few_tickers_only(
        decode: Decoder) -> None:
    """The second bad value confirmed the first as the last sequence: every real ticker after
    them was dropped as late, for as long as the connection lasted (heartbeats kept it up)."""
    adapter = CoinbaseAdapter("w", decode)
    for seq in (101, 102, 103, 10**12, 10**12 + 1):
        assert len(adapter.parse(_ticker(seq), RECEIVED_NS).records) == 1
    kept = [len(adapter.parse(_ticker(seq), RECEIVED_NS).records) for seq in range(104, 124)]
    assert kept == [0] * (LATE_RUN_RESTART - 1) + [1] * (20 - LATE_RUN_RESTART + 1)
    # The count goes on from there: repeats are duplicates again, a replay of the last kept too.
    assert adapter.parse(_ticker(123), RECEIVED_NS).duplicates == 1
    assert adapter.parse(_ticker(110), RECEIVED_NS).duplicates == 1


@pytest.mark.parametrize("decode", [load_json, decode_frame], ids=["generic", "shaped"])
def test_one_bad_pending_sequence_a_little_ahead_silences_the_product_for_a_few_tickers_only(
        decode: Decoder) -> None:
    """9000 after 101 is pending, within SEQUENCE_JUMP of the last: every real ticker after it
    (102, 103, ...) was dropped as late, until the real count passed 9000."""
    adapter = CoinbaseAdapter("w", decode)
    sent = [100, 101, 9000, *range(102, 162)]
    kept = [seq for seq in sent if adapter.parse(_ticker(seq), RECEIVED_NS).records]
    # 102..110 (LATE_RUN_RESTART - 1 = 9 of the 60 real ones) are dropped as late below the
    # pending 9000; 111 ends a rising run of LATE_RUN_RESTART: it is kept and the count
    # restarts from it (9000 forgotten); 112..161 are kept as the count goes on.
    assert kept == [100, 101, 9000, *range(102 + LATE_RUN_RESTART - 1, 162)]
    assert len(sent) - len(kept) == LATE_RUN_RESTART - 1
    # The count goes on from there: a repeat, a late one, the bad value's replay are dropped.
    assert [adapter.parse(_ticker(seq), RECEIVED_NS).duplicates
            for seq in (161, 150, 105)] == [1, 1, 1]
    [record] = adapter.parse(_ticker(162), RECEIVED_NS).records
    assert adapter.dedup_mark(record) == ("BTC-USD", 162)


def test_late_tickers_below_a_pending_one_that_do_not_rise_never_restart_the_count() -> None:
    adapter = CoinbaseAdapter("w")
    for seq in (5_000_000, 5_000_100, 5_000_200):  # last 5_000_100, pending 5_000_200
        adapter.parse(_ticker(seq), RECEIVED_NS)
    late = [5_000_150, 5_000_140, 5_000_160, 5_000_130] * LATE_RUN_RESTART
    assert [adapter.parse(_ticker(seq), RECEIVED_NS).duplicates for seq in late] == [1] * len(late)
    assert len(adapter.parse(_ticker(5_000_201), RECEIVED_NS).records) == 1
    assert adapter.parse(_ticker(5_000_200), RECEIVED_NS).duplicates == 1


def test_late_tickers_that_do_not_rise_never_restart_the_count() -> None:
    adapter = CoinbaseAdapter("w")
    for seq in (5_000_000, 5_000_100):
        adapter.parse(_ticker(seq), RECEIVED_NS)
    # Replays and stragglers below the last, in any order but a rising run: all dropped.
    late = [4_999_990, 4_999_980, 4_999_995, 4_999_970] * LATE_RUN_RESTART
    assert [adapter.parse(_ticker(seq), RECEIVED_NS).duplicates for seq in late] == [1] * len(late)
    # A kept ticker ends a run: late ones before it do not count towards the next.
    for seq in range(4_999_900, 4_999_900 + LATE_RUN_RESTART - 1):
        assert adapter.parse(_ticker(seq), RECEIVED_NS).duplicates == 1
    assert len(adapter.parse(_ticker(5_000_101), RECEIVED_NS).records) == 1
    assert adapter.parse(_ticker(4_999_999), RECEIVED_NS).duplicates == 1


def test_a_late_ticker_does_not_lower_the_mark_a_restart_dedups_by() -> None:
    """A late ticker kept (and made the last) lowered the stored mark: after a restart the
    venue's replay of the real last ticker was stored again."""
    adapter = CoinbaseAdapter("w")
    for seq in (50_978_629_038, 50_978_629_900):
        adapter.parse(_ticker(seq), RECEIVED_NS)
    assert adapter.parse(_ticker(50_978_629_500), RECEIVED_NS).duplicates == 1  # late
    [record] = adapter.parse(_ticker(50_978_630_000), RECEIVED_NS).records
    assert adapter.dedup_mark(record) == ("BTC-USD", 50_978_630_000)
    restarted = _restarted(adapter.dedup_mark(record))
    assert restarted.parse(_ticker(50_978_630_000), RECEIVED_NS).duplicates == 1


def test_a_ticker_sent_again_is_a_duplicate_however_far_below_the_last() -> None:
    adapter = CoinbaseAdapter("w")
    for seq in (1_000, 2_000, 3_000):
        adapter.parse(_ticker(seq), RECEIVED_NS)
    assert [adapter.parse(_ticker(seq), RECEIVED_NS).duplicates for seq in (1_000, 2_000)] == [
        1, 1]


def test_the_dedup_mark_is_the_products_last_sequence() -> None:
    adapter = CoinbaseAdapter("w")
    [first] = adapter.parse(_ticker(7), RECEIVED_NS).records
    adapter.parse(_ticker(9), RECEIVED_NS)
    assert adapter.dedup_mark(first) == ("BTC-USD", 9)  # the latest kept, not the record's


_ACK = json.dumps({"type": "subscriptions", "channels": [
    {"name": "ticker", "product_ids": ["BTC-USD"]},
    {"name": "heartbeat", "product_ids": ["BTC-USD"]}]})


def test_after_a_reconnect_a_lower_sequence_is_another_numbering_not_a_replay() -> None:
    """A restarted server (or another endpoint) counts from lower: the marks of the previous
    run made every ticker a duplicate until the new count caught up (a second `make demo`)."""
    adapter = CoinbaseAdapter("w")
    adapter.restore_marks({"BTC-USD": 5_000})  # the previous run's last sequence
    assert adapter.parse(_ACK, RECEIVED_NS).kind is Kind.SUBSCRIBED
    kept = [len(adapter.parse(_ticker(seq), RECEIVED_NS).records) for seq in (1, 2, 2, 3)]
    assert kept == [1, 1, 0, 1]


def test_after_a_reconnect_the_replayed_last_ticker_is_still_dropped() -> None:
    adapter = CoinbaseAdapter("w")
    assert len(adapter.parse(_ticker(700), RECEIVED_NS).records) == 1
    adapter.parse(_ACK, RECEIVED_NS)  # a new connection
    assert adapter.parse(_ticker(700), RECEIVED_NS).duplicates == 1
    assert len(adapter.parse(_ticker(701), RECEIVED_NS).records) == 1
    # within the connection, a step back is a late or repeated message
    assert adapter.parse(_ticker(650), RECEIVED_NS).duplicates == 1


def test_a_count_that_starts_over_at_numbers_the_old_one_used_is_kept() -> None:
    """A test server counting from 1, restarted after 10 tickers: its new 1..10 were taken for
    replays of the old ones (all in the last 32 kept) and dropped."""
    adapter = CoinbaseAdapter("w")
    adapter.parse(_ACK, RECEIVED_NS)
    assert sum(len(adapter.parse(_ticker(seq), RECEIVED_NS).records)
               for seq in range(1, 11)) == 10
    adapter.parse(_ACK, RECEIVED_NS)  # the restarted server's connection
    kept = [len(adapter.parse(_ticker(seq), RECEIVED_NS).records) for seq in range(1, 15)]
    assert kept == [1] * 14


@pytest.mark.parametrize("decode", [load_json, decode_frame], ids=["generic", "shaped"])
def test_a_product_id_ending_in_a_newline_is_a_bad_product_id(decode: Decoder) -> None:
    """`$` matched before a final newline: "BTC-USD\n" became BTC/USD, with dedup state of its
    own, so the originals sent again under it were stored twice."""
    adapter = CoinbaseAdapter("w", decode)
    for seq in (500, 501):
        assert len(adapter.parse(_ticker(seq), RECEIVED_NS).records) == 1
    for seq in (500, 501, 502):
        with pytest.raises(ParseError, match="not a Coinbase product id"):
            adapter.parse(_ticker(seq, product_id="BTC-USD\n"), RECEIVED_NS)
    assert "BTC-USD\n" not in adapter._symbols and "BTC-USD\n" not in adapter._recent
    assert adapter.parse(_ticker(501), RECEIVED_NS).duplicates == 1
    for bad in ("BTC-USD\n", "\nBTC-USD", "BTC-USD\r\n"):
        with pytest.raises(ParseError):
            from_product(bad)


def test_junk_product_ids_do_not_crowd_out_a_subscribed_products_dedup() -> None:
    adapter = _restarted(("BTC-USD", 1_000))
    adapter.parse(_ACK, RECEIVED_NS)
    assert adapter.parse(_ticker(1_000), RECEIVED_NS).duplicates == 1  # the replay
    for i in range(5_000):  # the pipeline drops these (not subscribed); they leave no state
        adapter.parse(_ticker(i + 1, product_id=f"X{i}-USD"), RECEIVED_NS)
    assert adapter._recent.keys() <= {"BTC-USD"}
    kept = [len(adapter.parse(_ticker(seq), RECEIVED_NS).records)
            for seq in (2_000, 2_000, 3_000, 2_000)]
    assert kept == [1, 0, 1, 0]
