"""Shared golden-fixture helpers: load `tests/fixtures/<venue>/cases.jsonl` and check one case
against a fresh adapter (kind, full records, and every other field of `Parsed`), with either
JSON decoder an adapter can be given."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from collectors.decoding import decode_frame
from collectors.errors import ParseError
from collectors.exchanges import create
from collectors.exchanges.base import Decoder, load_json

FIXTURES = Path(__file__).parents[1] / "fixtures"
VENUES = ("coinbase", "binance", "binanceus", "kraken")
#: The adapters' default (standard library) and the one the service gives them (msgspec).
DECODERS: dict[str, Decoder] = {"stdlib": load_json, "msgspec": decode_frame}


def load_cases(venue: str) -> list[dict[str, object]]:
    text = (FIXTURES / venue / "cases.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def frame_text(case: dict[str, object]) -> str:
    """The frame as the venue sent it (stored as text, or as a JSON object)."""
    frame = case["frame"]
    return frame if isinstance(frame, str) else json.dumps(frame)


def check_case(venue: str, case: dict[str, object], decode: Decoder = load_json) -> None:
    adapter = create(venue, f"worker-{venue}", decode)
    expect = case["expect"]
    received_ns = case["received_ns"]
    assert isinstance(expect, dict) and isinstance(received_ns, int)
    if "raises" in expect:
        with pytest.raises(ParseError, match=expect["match"]):
            adapter.parse(frame_text(case), received_ns)
        return
    parsed = adapter.parse(frame_text(case), received_ns)
    assert parsed.kind == expect["kind"]
    assert [r.to_json_dict() for r in parsed.records] == expect["records"]
    assert parsed.error == expect.get("error")
    assert list(parsed.rejected) == expect.get("rejected", [])
    assert list(parsed.subscribed) == expect.get("subscribed", [])
    assert parsed.reconnect == expect.get("reconnect", False)
    matches = expect.get("invalid_match", [])
    assert isinstance(matches, list)
    assert len(parsed.invalid) == len(matches)
    assert all(m in reason for m, reason in zip(matches, parsed.invalid, strict=True))
    assert parsed.duplicates == 0
