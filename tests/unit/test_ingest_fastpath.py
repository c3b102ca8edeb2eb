"""The all-valid fast paths (validation, COPY text) agree with the detailed reference paths."""

from __future__ import annotations

import json
import time
from decimal import Decimal

import pytest

from collectors.ingest.storage.postgres import _copy_payload
from collectors.ingest.validate import _fast_feeds, _validate_feed, parse_body
from tests.support.servers import make_feed

NOW_NS = time.time_ns()


def _both(feeds: list[dict[str, object]]) -> tuple[object, list[object]]:
    doc = parse_body(json.dumps({"feeds": feeds}).encode())
    assert isinstance(doc, dict)
    reference = []
    for index, item in enumerate(doc["feeds"]):
        problems: list[object] = []
        reference.append(_validate_feed(index, item, NOW_NS, problems))  # type: ignore[arg-type]
        assert problems == []
    return _fast_feeds(doc["feeds"], NOW_NS), reference


@pytest.mark.parametrize("changes", [
    {},
    {"volume": None, "metadata": None},
    {"volume": 0, "price": 7},
    {"timestamp": "2026-01-02T03:04:05+00:00"},
    {"timestamp": "2026-01-02T03:04:05.1-0000"},
    {"metadata": {"ünï": "€ \\ \" \t\n", "big": 2**62, "f": 1e300, "t": True, "n": None}},
    {"metadata": {f"k{i}": "v" * 100 for i in range(30)}},  # over 1024 chars, under 4096 bytes
])
def test_fast_path_builds_the_same_records(changes: dict[str, object]) -> None:
    fast, reference = _both([make_feed(**changes), make_feed()])
    assert fast == reference


@pytest.mark.parametrize("changes", [
    {"price": -1}, {"price": True}, {"volume": -0.5}, {"symbol": "btc/usd"},
    {"timestamp": "2026-02-30T00:00:00Z"}, {"timestamp": "2026-01-01T00:00:00+01:00"},
    {"metadata": {"k": [1]}}, {"metadata": {"": 1}}, {"metadata": {"nul": "a\u0000"}},
    {"metadata": {f"k{i}": "v" * 200 for i in range(30)}}, {"exchange": "x"},
])
def test_fast_path_declines_what_the_reference_refuses(changes: dict[str, object]) -> None:
    doc = parse_body(json.dumps({"feeds": [make_feed(), make_feed(**changes)]}).encode())
    assert isinstance(doc, dict)
    assert _fast_feeds(doc["feeds"], NOW_NS) is None


def test_copy_payload_escapes_and_declines() -> None:
    doc = parse_body(json.dumps({"feeds": [make_feed(volume=None,
                                                     metadata={"q": "a\\b\tc"})]}).encode())
    assert isinstance(doc, dict)
    feeds = _fast_feeds(doc["feeds"], NOW_NS)
    assert feeds is not None
    payload = _copy_payload(feeds)
    assert payload is not None
    assert payload.count("\n") == 1 and payload.count("\t") == 6
    assert "\t\\N\t" in payload  # NULL volume
    assert '"a\\\\\\\\b\\\\tc"' in payload  # JSON's backslashes doubled for COPY text
    bad = [{**feeds[0], "symbol": None}]
    assert _copy_payload(bad) is None  # type: ignore[arg-type]
    assert _copy_payload([{**feeds[0], "source": "a\tb"}]) is None
    assert _copy_payload([{**feeds[0], "price": 1.5}]) is None  # type: ignore[typeddict-item]
    assert Decimal(payload.split("\t")[1]) == feeds[0]["price"]


@pytest.mark.postgres
def test_postgres_copy_text_round_trip() -> None:
    from collectors.ingest.storage import open_storage
    from tests.support import postgres

    meta = {"q": "a\\b\t\"c\"\n", "u": "ünï €", "f": 0.1}
    doc = parse_body(json.dumps({"feeds": [make_feed(metadata=meta, volume=None)]}).encode())
    assert isinstance(doc, dict)
    feeds = _fast_feeds(doc["feeds"], NOW_NS)
    assert feeds is not None and _copy_payload(feeds) is not None
    with postgres.postgres_schema() as url:
        store = open_storage(url, max_connections=2)
        try:
            store.store_batch("k", "0" * 64, feeds)
            row = store.latest()[0]
            assert row["metadata"] == meta
            assert row["volume"] is None and row["price"] == 45123.5
        finally:
            store.close()
