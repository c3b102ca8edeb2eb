"""Golden and edge tests for the Kraken WebSocket v2 adapter, on real message shapes."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest

from collectors.decoding import FrameDecoder, decode_frame
from collectors.errors import ConfigError, ParseError
from collectors.exchanges import create, kraken
from collectors.exchanges.base import Decoder, Kind, load_json
from collectors.exchanges.kraken import KrakenAdapter, from_pair
from tests.unit.golden import frame_text, load_cases

CASES = load_cases("kraken")
SAMPLES = Path(__file__).resolve().parents[1] / "fixtures" / "samples"
RECEIVED_NS = 1_715_772_043_100_000_000  # 2024-05-15T11:20:43.1Z


_frame = frame_text


def _case_with(text: str) -> dict[str, object]:
    return next(c for c in CASES if isinstance(c["frame"], str) and text in c["frame"])


SNAPSHOT_2024 = _frame(_case_with('"type":"snapshot","data":[{"symbol":"BTC/USD"'))
ALGO_WITH_TIME = _frame(_case_with('"symbol":"ALGO/USD"'))


# ---- attributes and requests --------------------------------------------------------------------

def test_attributes() -> None:
    adapter = create("kraken", "w")
    assert adapter.name == "kraken"
    assert adapter.default_ws_url == "wss://ws.kraken.com/v2"
    assert adapter.default_symbols == ("BTC/USD", "ETH/USD", "SOL/USD", "XRP/USD", "DOGE/USD")
    adapter.check_symbols(adapter.default_symbols)
    assert adapter.app_ping_interval_s == 5.0
    assert adapter.app_ping_interval_s < adapter.liveness_timeout_s < adapter.symbol_stale_after_s
    assert adapter.connect_url("wss://ws.kraken.com/v2", ["BTC/USD"]) == "wss://ws.kraken.com/v2"


def test_subscribe_message_matches_the_documented_request() -> None:
    # Kraken docs ticker request (shared/samples/kraken_v2.jsonl line 1) plus snapshot + req_id.
    [msg] = KrakenAdapter("w").subscribe_messages(["BTC/USD", "ALGO/USD"])
    assert json.loads(msg) == {"method": "subscribe",
                               "params": {"channel": "ticker", "symbol": ["BTC/USD", "ALGO/USD"],
                                          "snapshot": True},
                               "req_id": 1}
    assert KrakenAdapter("w").subscribe_messages([]) == []


def test_request_ids_increase_across_subscribe_and_ping() -> None:
    adapter = KrakenAdapter("w")
    ids = [json.loads(adapter.subscribe_messages(["BTC/USD"])[0])["req_id"]]
    for _ in range(3):
        ping = json.loads(adapter.ping_message() or "")
        assert ping["method"] == "ping"
        ids.append(ping["req_id"])
    ids.append(json.loads(adapter.subscribe_messages(["BTC/USD"])[0])["req_id"])
    assert ids == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(("symbol", "fix"), [("XBT/USD", "BTC/USD"), ("XDG/USD", "DOGE/USD"),
                                             ("ETH/XBT", "ETH/BTC"), ("XDG/XBT", "DOGE/BTC")])
def test_legacy_asset_codes_are_refused_with_the_v2_spelling(symbol: str, fix: str) -> None:
    with pytest.raises(ConfigError) as info:
        KrakenAdapter("w").check_symbols(["ETH/USD", symbol])
    assert info.value.variable == "SYMBOLS"
    assert symbol in info.value.problem and "v2 rejects" in info.value.problem
    assert info.value.allowed == f"use {fix}"


def test_non_canonical_symbols_are_refused() -> None:
    for bad in ("btc/usd", "BTCUSD", "BTC-USD", "BTC/USD/X", "BTC/USD\n"):
        with pytest.raises(ConfigError, match="not a BASE/QUOTE symbol"):
            KrakenAdapter("w").check_symbols([bad])


def test_pair_mapping() -> None:
    assert from_pair("BTC/USD") == "BTC/USD"
    assert from_pair("XBT/USD") == "BTC/USD"
    assert from_pair("XDG/EUR") == "DOGE/EUR"
    for bad in ("ANETx/USD", "BTCUSD", "", "BTC/USD\n", "XBT/USD\n", "\nBTC/USD"):
        with pytest.raises(ParseError):
            from_pair(bad)


# ---- ticker content -----------------------------------------------------------------------------

FIELDS = {"price": "last", "volume": "volume", "bid": "bid", "bid_size": "bid_qty", "ask": "ask",
          "ask_size": "ask_qty", "vwap": "vwap", "high_24h": "high", "low_24h": "low",
          "change": "change", "change_pct": "change_pct"}


@pytest.mark.parametrize("frame", [SNAPSHOT_2024, ALGO_WITH_TIME])
def test_numbers_print_back_as_the_decimal_kraken_sent(frame: str) -> None:
    [item] = json.loads(frame, parse_float=Decimal)["data"]
    rec = KrakenAdapter("w").parse(frame, RECEIVED_NS).records[0]
    values = {"price": rec.price, "volume": rec.volume, **rec.metadata}
    for ours, theirs in FIELDS.items():
        assert Decimal(repr(values[ours])) == Decimal(str(item[theirs])), ours


def test_exchange_timestamp_keeps_full_precision() -> None:
    frame = ALGO_WITH_TIME.replace("09:04:31.742648Z", "09:04:31.742648123Z")
    rec = KrakenAdapter("w").parse(frame, 1_695_632_671_800_000_000).records[0]
    assert rec.timestamp == "2023-09-25T09:04:31.742648123Z"
    assert rec.exchange_ns == 1_695_632_671_742_648_123
    assert rec.metadata["timestamp_source"] == "exchange"


def test_missing_timestamp_uses_receive_time() -> None:
    rec = KrakenAdapter("w").parse(SNAPSHOT_2024, RECEIVED_NS).records[0]
    assert rec.timestamp == rec.metadata["received_at"] == "2024-05-15T11:20:43.100000Z"
    assert (rec.exchange_ns, rec.received_ns) == (0, RECEIVED_NS)


def _message(*items: object) -> str:
    return json.dumps({"channel": "ticker", "type": "update", "data": list(items)})


def _item(**over: object) -> dict[str, object]:
    item = json.loads(SNAPSHOT_2024)["data"][0]
    assert isinstance(item, dict)
    return {**item, **over}


def test_invalid_items_are_skipped_and_reported_valid_ones_kept() -> None:
    parsed = KrakenAdapter("w").parse(
        _message(_item(last=0), _item(symbol="ETH/USD"), "junk", _item(symbol="XBT/EUR")),
        RECEIVED_NS)
    assert [r.symbol for r in parsed.records] == ["ETH/USD", "BTC/EUR"]
    assert len(parsed.invalid) == 2
    assert "BTC/USD: field 'last' must be > 0" in parsed.invalid[0]
    assert "ticker item is a str" in parsed.invalid[1]


def test_a_number_beyond_the_float_range_loses_its_item_not_the_message() -> None:
    # With the collector's msgspec decoder too (it hands such a frame to the stdlib's).
    frame = _message(_item(symbol="ETH/USD"), _item(last=0.5)).replace(
        '"last": 0.5', '"last": 1e400')
    assert "1e400" in frame
    for adapter in (KrakenAdapter("w"), KrakenAdapter("w", decode=FrameDecoder())):
        parsed = adapter.parse(frame, RECEIVED_NS)
        assert [r.symbol for r in parsed.records] == ["ETH/USD"]
        assert len(parsed.invalid) == 1 and "last" in parsed.invalid[0]


def test_a_message_whose_items_are_all_invalid_is_a_parse_error() -> None:
    with pytest.raises(ParseError, match="all 2 ticker items invalid"):
        KrakenAdapter("w").parse(_message(_item(last=-1), _item(volume=-1)), RECEIVED_NS)
    empty = KrakenAdapter("w").parse(_message(), RECEIVED_NS)
    assert (empty.kind, empty.records, empty.invalid) == (Kind.TICKER, (), ())


@pytest.mark.parametrize(
    ("over", "reason"),
    [
        ({"last": "abc"}, "not a number"),
        ({"last": None}, "missing field 'last'"),
        ({"last": True}, "boolean"),
        ({"last": 10**400}, "out of range"),
        ({"volume": -3}, "must be >= 0"),
        ({"symbol": 5}, "non-empty string"),
        ({"symbol": "btc/usd"}, "not a canonical"),
        ({"symbol": "BTC/USD\n"}, "not a canonical"),
    ],
)
def test_bad_items_name_the_problem(over: dict[str, object], reason: str) -> None:
    with pytest.raises(ParseError, match=reason):
        KrakenAdapter("w").parse(_message(_item(**over)), RECEIVED_NS)


@pytest.mark.parametrize("decode", [load_json, decode_frame], ids=["generic", "shaped"])
def test_a_pair_ending_in_a_newline_is_a_parse_error_and_stores_nothing(decode: Decoder) -> None:
    """`$` matched before a final newline: "BTC/USD\n" was taken for BTC/USD."""
    adapter = KrakenAdapter("w", decode)
    t = "2023-09-25T09:04:31.742599Z"
    bad = _update(t).replace('"BTC/USD"', '"BTC/USD\\n"')
    assert json.loads(bad)["data"][0]["symbol"] == "BTC/USD\n"
    with pytest.raises(ParseError, match="not a canonical BASE/QUOTE pair"):
        adapter.parse(bad, RECEIVED_NS)
    assert adapter._symbols == {} and adapter._last == {}
    # In a message with valid items, it is an invalid item: the others are kept.
    parsed = adapter.parse(_message(_item(symbol="BTC/USD\n"), _item(symbol="ETH/USD")),
                           RECEIVED_NS)
    assert [r.symbol for r in parsed.records] == ["ETH/USD"]
    assert len(parsed.invalid) == 1 and "not a canonical" in parsed.invalid[0]


def test_negative_changes_are_kept_and_bad_metadata_dropped() -> None:
    rec = KrakenAdapter("w").parse(_message(_item(change=-12.5, change_pct=-0.3, bid="x")),
                                   RECEIVED_NS).records[0]
    assert (rec.metadata["change"], rec.metadata["change_pct"]) == (-12.5, -0.3)
    assert "bid" not in rec.metadata


def test_a_repeated_snapshot_is_not_deduplicated() -> None:
    """Ticker has no sequence number: the snapshot replayed after a reconnect passes through."""
    adapter = KrakenAdapter("w")
    first = adapter.parse(SNAPSHOT_2024, RECEIVED_NS)
    again = adapter.parse(SNAPSHOT_2024, RECEIVED_NS + 1)
    assert (len(first.records), len(again.records), again.duplicates) == (1, 1, 0)


# ---- control messages ---------------------------------------------------------------------------

def test_subscribe_failure_without_a_symbol_is_still_an_error() -> None:
    parsed = KrakenAdapter("w").parse('{"method":"subscribe","success":false}', RECEIVED_NS)
    assert (parsed.kind, parsed.rejected) == (Kind.ERROR, ())
    assert parsed.error == "subscribe failed: no reason given"
    assert parsed.retry_subscribe == ()  # every symbol, again later


@pytest.mark.parametrize("error", ["Exceeded msg rate", "Internal error",
                                   "Service temporarily unavailable"])
def test_a_passing_subscribe_failure_is_retried_not_a_verdict_on_the_market(error: str) -> None:
    """Every failure used to drop its symbol for the life of the process, with the hint that
    the venue does not list it."""
    frame = json.dumps({"method": "subscribe", "success": False, "error": error,
                        "symbol": "BTC/USD", "req_id": 3})
    parsed = KrakenAdapter("w").parse(frame, RECEIVED_NS)
    assert (parsed.kind, parsed.rejected, parsed.retry_subscribe) == (
        Kind.ERROR, (), ("BTC/USD",))
    assert parsed.error == f"subscribe BTC/USD failed: {error}"


def test_an_unlisted_pair_is_rejected() -> None:
    frame = json.dumps({"method": "subscribe", "success": False, "symbol": "XBT/EUR",
                        "error": "Currency pair not supported XBT/EUR", "req_id": 3})
    parsed = KrakenAdapter("w").parse(frame, RECEIVED_NS)
    assert (parsed.rejected, parsed.retry_subscribe) == (("XBT/EUR",), None)


def test_websocket_v1_messages_name_the_v2_endpoint() -> None:
    """Pointed at v1 (wss://ws.kraken.com), every frame was a puzzling parse error while v1's
    heartbeats kept the connection up."""
    lines = (SAMPLES / "kraken_v1.jsonl").read_text().splitlines()
    assert len(lines) == 10
    for line in lines:
        with pytest.raises(ParseError, match=r"Kraken WebSocket v1 message.*wss://ws\.kraken\.com/v2"):
            KrakenAdapter("w", decode_frame).parse(line, RECEIVED_NS)


def test_a_repeated_subscription_is_not_a_rejection() -> None:
    """Wording assumed (not in the stored docs): any 'already subscribed' failure counts as ok."""
    parsed = KrakenAdapter("w").parse(
        '{"error":"Already subscribed","method":"subscribe","success":false,"symbol":"BTC/USD"}',
        RECEIVED_NS)
    assert (parsed.kind, parsed.subscribed, parsed.rejected) == (Kind.SUBSCRIBED, ("BTC/USD",), ())


def test_general_error_message_is_an_error() -> None:
    parsed = KrakenAdapter("w").parse(
        '{"error":"Malformed request","method":"error","status":"error"}', RECEIVED_NS)
    assert (parsed.kind, parsed.error) == (Kind.ERROR, "Malformed request")


def test_other_messages() -> None:
    adapter = KrakenAdapter("w")
    assert adapter.parse('{"channel":"book","data":[]}', RECEIVED_NS).kind is Kind.OTHER
    assert adapter.parse('{"method":"unsubscribe","success":true}', RECEIVED_NS).kind is Kind.OTHER
    assert adapter.parse('{"channel":"status","data":"?"}', RECEIVED_NS).kind is Kind.STATUS


@pytest.mark.parametrize("frame", ["{", "[]", "null", "{}", b"\xff", '{"channel": 1}',
                                   '{"channel":"ticker","data":{}}',
                                   '{"channel":"ticker","data":[{"last":NaN}]}'])
def test_malformed_frames_raise_parse_error(frame: str | bytes) -> None:
    with pytest.raises(ParseError):
        KrakenAdapter("w").parse(frame, RECEIVED_NS)


# ---- dedup by exchange time -----------------------------------------------------------------

def _update(ts: str, last: float = 100.5, bid: float = 100.4) -> str:
    return json.dumps({"channel": "ticker", "type": "update", "data": [{
        "symbol": "BTC/USD", "bid": bid, "bid_qty": 1.0, "ask": 100.6, "ask_qty": 1.0,
        "last": last, "volume": 10.0, "vwap": 100.0, "low": 99.0, "high": 101.0, "change": 1.0,
        "change_pct": 1.0, "timestamp": ts}]})


def test_repeated_snapshot_is_a_duplicate_but_a_distinct_update_at_the_same_time_is_kept() -> None:
    adapter = KrakenAdapter("w")
    t = "2023-09-25T09:04:31.742599Z"
    assert len(adapter.parse(_update(t), RECEIVED_NS).records) == 1
    assert adapter.parse(_update(t), RECEIVED_NS).duplicates == 1          # the replay
    assert len(adapter.parse(_update(t, last=100.7), RECEIVED_NS).records) == 1  # distinct
    # Kraken timestamps are neither unique nor ordered identifiers: an older one is kept.
    assert len(adapter.parse(_update("2023-09-25T09:04:30.000000Z"), RECEIVED_NS).records) == 1
    assert len(adapter.parse(_update("2023-09-25T09:04:32.000000Z"), RECEIVED_NS).records) == 1


def test_restored_mark_drops_the_replay_after_a_restart() -> None:
    first = KrakenAdapter("w")
    t = "2023-09-25T09:04:31.742599Z"
    [record] = first.parse(_update(t), RECEIVED_NS).records
    mark = first.dedup_mark(record)
    assert mark is not None
    restarted = KrakenAdapter("w")
    restarted.restore_marks(dict([mark]))
    assert restarted.parse(_update(t), RECEIVED_NS).duplicates == 1
    assert len(restarted.parse(_update("2023-09-25T09:04:32.000000Z"), RECEIVED_NS).records) == 1


def test_a_subscribe_message_without_success_is_no_answer() -> None:
    """The request itself (echoed back, or the sample's line 1) is no failure to retry."""
    request = (SAMPLES / "kraken_v2.jsonl").read_text().splitlines()[0]
    assert json.loads(request)["method"] == "subscribe"
    assert KrakenAdapter("w").parse(request, RECEIVED_NS).kind is Kind.OTHER


def test_the_dedup_mark_is_the_symbols_newest_time_even_when_items_come_out_of_order() -> None:
    """The stored mark was the last record's time: after items T2 then T1, a restart forgot
    T2 and stored the reconnect snapshot's replay of it again."""
    adapter = KrakenAdapter("w")
    [newer] = adapter.parse(ALGO_WITH_TIME, RECEIVED_NS).records
    older = json.loads(ALGO_WITH_TIME)
    older["data"][0]["timestamp"] = "2023-09-25T09:00:00.000000Z"  # before the fixture's
    older["data"][0]["last"] = 0.1
    [old_record] = adapter.parse(json.dumps(older), RECEIVED_NS).records
    mark = adapter.dedup_mark(old_record)
    assert mark == ("ALGO/USD", newer.exchange_ns)
    restarted = KrakenAdapter("w")
    restarted.restore_marks(dict([mark]))
    assert restarted.parse(ALGO_WITH_TIME, RECEIVED_NS).duplicates == 1


def test_dedup_state_stays_bounded_under_a_flood_of_pairs_nobody_subscribed_to() -> None:
    # Every distinct pair with a timestamp used to add an entry for good (369 MB for 800k); the
    # pipeline drops their records, so past the bound they get no dedup state at all.
    adapter = KrakenAdapter("w")
    t = "2023-09-25T09:04:31.742599Z"
    for i in range(kraken._SYMBOL_CACHE_MAX + 500):
        frame = _update(t).replace('"BTC/USD"', f'"X{i}/USD"')
        assert len(adapter.parse(frame, RECEIVED_NS).records) == 1
    assert len(adapter._last) == kraken._SYMBOL_CACHE_MAX
    # A pair already known keeps its state: its replay is still a duplicate.
    assert adapter.parse(_update(t).replace('"BTC/USD"', '"X0/USD"'), RECEIVED_NS).duplicates == 1
    # And a symbol subscribed to, whose first data comes after the flood, gets its own.
    adapter.subscribe_messages(["DOGE/USD"])
    doge = _update(t).replace('"BTC/USD"', '"DOGE/USD"')
    assert len(adapter.parse(doge, RECEIVED_NS).records) == 1
    assert adapter.parse(doge, RECEIVED_NS).duplicates == 1  # the snapshot after a reconnect
