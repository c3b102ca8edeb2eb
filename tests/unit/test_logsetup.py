"""logsetup: one JSON object a line, and no configured secret in any of it."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator

import pytest

from collectors.ingest.validate import validate_body
from collectors.logsetup import MAX_REDACT_DEPTH, setup_logging, warn_if_short
from tests.support.servers import batch_body, make_feed

SECRET = "test-key-0123456789abcdef"


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    """setup_logging into a buffer (with SECRET to redact); the root logger restored after."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    stream = io.StringIO()
    setup_logging("debug", static={"service": "test"}, secrets=[SECRET], stream=stream)
    try:
        yield stream
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)


def _logged(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_collector_style_strings_are_redacted(lines: io.StringIO) -> None:
    log = logging.getLogger("collectors.delivery")
    log.error("batch_rejected %s", f"Bearer {SECRET}",
              extra={"detail": f"echoed: Authorization: Bearer {SECRET}", "records": 5})
    [doc] = _logged(lines)
    assert SECRET not in lines.getvalue()
    assert doc["event"] == "batch_rejected Bearer [REDACTED]"
    assert doc["detail"] == "echoed: Authorization: Bearer [REDACTED]"
    assert doc["records"] == 5 and doc["service"] == "test"


def test_ingest_style_nested_fields_are_redacted(lines: io.StringIO) -> None:
    # The ingest logs a refused batch's first problem as a dict: a record whose source is the
    # API key plus '!' put the key in the log.
    verdict = validate_body(batch_body([make_feed(source=SECRET + "!")]), max_feeds=10,
                            now_ns=time.time_ns())
    first = verdict.problems[0].as_dict()
    assert SECRET in str(first["problem"])
    logging.getLogger("collectors.ingest.app").warning("batch_rejected", extra={
        "idempotency_key": "k", "invalid_records": 1, "first_problem": first})
    [doc] = _logged(lines)
    assert SECRET not in lines.getvalue()
    assert doc["first_problem"] == {"index": 0, "field": "source",
                                    "problem": str(first["problem"]).replace(SECRET, "[REDACTED]")}
    assert SECRET in str(first["problem"])  # the caller's dict is left as it was


def test_lists_tuples_keys_and_depth(lines: io.StringIO) -> None:
    nested: object = SECRET
    for _ in range(MAX_REDACT_DEPTH + 2):
        nested = [nested]
    logging.getLogger("x").info("event", extra={
        "items": [1, None, SECRET, {"k": (SECRET, 2.5)}], "pair": (SECRET, True),
        "by_key": {SECRET: 1}, "deep": nested})
    [doc] = _logged(lines)
    assert SECRET not in lines.getvalue()
    assert doc["items"] == [1, None, "[REDACTED]", {"k": ["[REDACTED]", 2.5]}]
    assert doc["pair"] == ["[REDACTED]", True]
    assert doc["by_key"] == {"[REDACTED]": 1}
    deep = doc["deep"]
    for _ in range(MAX_REDACT_DEPTH):
        assert isinstance(deep, list) and len(deep) == 1
        deep = deep[0]
    assert deep == "[nested too deeply to log]"


def test_tracebacks_are_redacted(lines: io.StringIO) -> None:
    try:
        raise RuntimeError(f"failed with {SECRET}")
    except RuntimeError:
        logging.getLogger("x").exception("thread_crashed")
    assert SECRET not in lines.getvalue()
    assert "failed with [REDACTED]" in lines.getvalue()


def test_a_short_key_is_warned_about_without_being_shown(lines: io.StringIO) -> None:
    warn_if_short(["k3y", SECRET], "API_KEYS")
    warn_if_short([SECRET], "API_KEY")  # long enough: nothing
    [doc] = _logged(lines)
    assert doc["event"] == "api_key_short"
    assert (doc["variable"], doc["characters"], doc["level"]) == ("API_KEYS", 3, "WARNING")
    assert "k3y" not in lines.getvalue() and SECRET not in lines.getvalue()
