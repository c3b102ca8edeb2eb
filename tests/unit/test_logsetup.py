"""logsetup: one JSON object a line, and no configured secret in any of it."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import random
import time
from collections.abc import Iterator
from urllib.parse import quote

import pytest

from collectors.ingest.validate import validate_body
from collectors.keys import Redactor, fragment_chars
from collectors.logsetup import (
    LIBRARY_LOG_INTERVAL_S,
    MAX_REDACT_DEPTH,
    _LibraryRecords,
    setup_logging,
)
from tests.support.servers import batch_body, make_feed

SECRET = "test-key-0123456789abcdef"


@contextlib.contextmanager
def logging_into_buffer(secret: str, **static: str) -> Iterator[io.StringIO]:
    """setup_logging into a buffer (with `secret` to redact); the root logger restored after."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    stream = io.StringIO()
    setup_logging("debug", static=static, secrets=[secret], stream=stream)
    try:
        yield stream
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    """setup_logging into a buffer (with SECRET to redact)."""
    with logging_into_buffer(SECRET, service="test") as stream:
        yield stream


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


def _urllib3_header_warning(url: str) -> None:
    """What urllib3.connection logs for an answer with a malformed header, traceback and all."""
    try:
        raise ValueError("[MissingHeaderBodySeparatorDefect()], unparsed data: 'X-Broken'")
    except ValueError as exc:
        logging.getLogger("urllib3.connection").warning(
            "Failed to parse headers (url=%s): %s", url, exc, exc_info=True)


def test_a_library_warning_is_one_line_without_its_traceback(lines: io.StringIO) -> None:
    for port in (1, 2, 3):  # the same message about another URL is the same message
        _urllib3_header_warning(f"http://127.0.0.1:{port}/internal/ingest?k={SECRET}")
    try:
        raise RuntimeError("ours")
    except RuntimeError:
        logging.getLogger("collectors.delivery").exception("thread_crashed")
    [library, ours] = _logged(lines)
    assert library == {
        "timestamp": library["timestamp"], "level": "WARNING", "event": "library_warning",
        "logger": "urllib3.connection", "service": "test", "suppressed": 0,
        "detail": "Failed to parse headers (url=http://127.0.0.1:1/internal/ingest?k=[REDACTED])"
                  ": [MissingHeaderBodySeparatorDefect()], unparsed data: 'X-Broken'"}
    # Our own records keep their tracebacks.
    assert ours["event"] == "thread_crashed" and "RuntimeError: ours" in str(ours["exc_info"])


def test_a_library_message_is_logged_once_a_window_with_the_count_dropped() -> None:
    now = [100.0]
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    handler.addFilter(_LibraryRecords(clock=lambda: now[0]))
    log = logging.getLogger("urllib3.connectionpool")
    log.addHandler(handler)
    try:
        for step in (0.0, 1.0, 1.0, LIBRARY_LOG_INTERVAL_S, 1.0):
            now[0] += step
            log.warning("Connection pool is full, discarding connection: %s", "127.0.0.1")
        log.error("Certificate did not match expected hostname: %s", "h")  # another message
    finally:
        log.removeHandler(handler)
    assert [(r.getMessage(), getattr(r, "suppressed", None)) for r in records] == [
        ("library_warning", 0), ("library_warning", 2), ("library_error", 0)]
    assert [getattr(r, "detail", None) for r in records] == [
        "Connection pool is full, discarding connection: 127.0.0.1"] * 2 + [
        "Certificate did not match expected hostname: h"]


# A token68 key with every character that percent-encoding changes (`+`, `/`, `=`).
PLUS_KEY = "Sec+ret/Key-0123456789abcdefghijkl=="


@pytest.fixture
def plus_lines() -> Iterator[io.StringIO]:
    """As `lines`, with PLUS_KEY as the secret."""
    with logging_into_buffer(PLUS_KEY) as stream:
        yield stream


def _forms(key: str) -> list[str]:
    """The key as written, percent-encoded (either hex case), JSON- and repr-escaped."""
    lower_hex = "".join(f"%{ord(c):02x}" if c in "+/=" else c for c in key)
    return [key, quote(key, safe=""), quote(key), lower_hex, json.dumps(key), repr(key),
            json.dumps(repr(key)), key.replace("/", "\\/")]


def test_every_form_of_the_key_is_redacted(plus_lines: io.StringIO) -> None:
    # The key in API_BASE_URL's path reached the log percent-encoded by requests
    # (`/Sec%2Bret%2FKey...`) in batch_retry's detail; the ingest logged it JSON/repr-escaped.
    for form in _forms(PLUS_KEY):
        logging.getLogger("x").warning("batch_retry", extra={
            "detail": f"ConnectionError: http://127.0.0.1:9/{form}/internal/ingest"})
    text = plus_lines.getvalue()
    for doc in _logged(plus_lines):
        assert "[REDACTED]" in str(doc["detail"]), doc
    for form in _forms(PLUS_KEY):
        assert form.strip("\"'") not in text
    assert "0123456789" not in text


def test_a_key_cut_short_by_the_ingests_echo_is_redacted(lines: io.StringIO) -> None:
    # `symbol: "Bearer <key>"` was echoed cut at 32 characters: the key's first 25 were logged.
    long_key = "Sec-ret_Key-0123456789abcdefghijklmnopqrstu"
    stream = io.StringIO()
    setup_logging("debug", secrets=[long_key], stream=stream)
    verdict = validate_body(batch_body([make_feed(symbol=f"Bearer {long_key}")]), max_feeds=10,
                            now_ns=time.time_ns())
    first = verdict.problems[0].as_dict()
    assert long_key[:20] in str(first["problem"])  # the echo is cut inside the key
    logging.getLogger("collectors.ingest.app").warning("batch_rejected", extra={
        "first_problem": first})
    text = stream.getvalue()
    # No run of fragment_chars(key) (here 12) of the key's characters is left.
    least = fragment_chars(long_key)
    assert least == 12
    assert not any(long_key[i:i + least] in text for i in range(len(long_key) - least + 1)), text
    assert "Bearer [REDACTED]" in text


@pytest.mark.parametrize("key", ["0123456789abcdef", "Sec-ret_Key-0123456789abcdefghijklmnopqrstu",
                                 "A" * 256])
def test_no_piece_of_fragment_length_survives(key: str) -> None:
    redact = Redactor([key])
    least = fragment_chars(key)
    for start in range(len(key) - least + 1):
        for end in range(start + least, len(key) + 1, max(1, len(key) // 16)):
            piece = key[start:end]
            cleaned = redact(f"<{piece}>")
            assert cleaned == "<[REDACTED]>", (piece, cleaned)
    # a piece one shorter is left alone: fixed text around a key is not garbled
    assert redact("<" + key[:least - 1] + ">") == "<" + key[:least - 1] + ">"


def test_a_short_key_is_redacted_only_as_a_token_of_its_own() -> None:
    # A short key is accepted (the API decides what it takes) but its characters are too
    # likely to be ordinary text: "short" turned the event `api_key_short` into
    # `api_key_[REDACTED]`, "k" every word with a k in it.
    for key, text, expected in [
        ("k", "networking failed", "networking failed"),
        ("short", "api_key_short", "api_key_short"),
        ("short", "Authorization: Bearer short", "Authorization: Bearer [REDACTED]"),
        ("s3cret", "url /s3cret/internal/ingest", "url /[REDACTED]/internal/ingest"),
        ("a+b", "GET /a%2Bb?x=1", "GET /[REDACTED]?x=1"),
        ("q'k", "symbol 'q\\'k' refused", "symbol '[REDACTED]' refused"),
    ]:
        assert Redactor([key])(text) == expected, (key, text)


def test_fixed_fields_are_not_garbled_by_a_key(lines: io.StringIO) -> None:
    # Only runs of a third of a key (6 or more characters) are replaced, and a key under 16
    # characters only whole.
    logging.getLogger("x").warning("api_key_short", extra={
        "hint": "use at least 16 random characters", "exchange": "coinbase"})
    [doc] = _logged(lines)
    assert doc["event"] == "api_key_short"
    assert doc["hint"] == "use at least 16 random characters"


def test_a_key_past_256_characters_is_redacted_by_runs_twice_the_fragment() -> None:
    # Its pieces are looked for at every fragment_chars offset (bounding the redactor's work):
    # any run of 2 x 12 characters of it still holds one.
    key = "".join(random.Random(7).choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijk0123456789")
                  for _ in range(1000))
    redact = Redactor([key])
    assert redact(f"x {key} y") == "x [REDACTED] y"
    for start in range(0, len(key) - 24, 37):
        piece = key[start:start + 24]
        assert piece not in redact(f"<{piece}>"), start
