"""Poster over real HTTP (a scripted stdlib server on 127.0.0.1), and the batch-splitting
policy's parsing of problem+json answers."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collectors.backoff import Outcome
from collectors.delivery import MAX_RESPONSE_BYTES, Poster, PostResult
from collectors.spool import Batch
from tests.support.waiting import free_port

BATCH = Batch.of("k-123", [b'{"a":1}'])


class Script:
    """What the server answers next (reset by the fixture)."""

    status = 200
    headers: ClassVar[dict[str, str]] = {}
    body = b"{}"
    chunked = False
    drip_s = 0.0  # > 0: answer one byte at a time, this far apart
    seen: ClassVar[list[dict[str, str]]] = []
    dripped = threading.Event()  # never set: its wait() paces the drip


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        self.rfile.read(length)
        Script.seen.append(dict(self.headers))
        if Script.drip_s:
            answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
            try:
                for i in range(len(answer)):
                    self.wfile.write(answer[i:i + 1])
                    self.wfile.flush()
                    Script.dripped.wait(Script.drip_s)  # the pace of a hostile server
            except OSError:
                pass
            return
        self.send_response(Script.status)
        for k, v in Script.headers.items():
            self.send_header(k, v)
        if Script.chunked:
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Connection", "close")
            self.end_headers()
            chunk = b"x" * 65536
            try:
                for _ in range(160):  # 10 MiB, never read in full by the client
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.write(b"0\r\n\r\n")
            except OSError:
                pass
            return
        self.send_header("Content-Length", str(len(Script.body)))
        self.end_headers()
        self.wfile.write(Script.body)


@pytest.fixture
def server() -> Iterator[str]:
    Script.status, Script.headers, Script.body, Script.chunked = 200, {}, b"{}", False
    Script.drip_s, Script.dripped = 0.0, threading.Event()
    Script.seen = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}/internal/ingest"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def post(url: str, read_timeout_s: float = 5, connect_timeout_s: float = 2) -> PostResult:
    poster = Poster(url, "secret-key", connect_timeout_s=connect_timeout_s,
                    read_timeout_s=read_timeout_s)
    try:
        return poster.post(BATCH)
    finally:
        poster.close()


def test_stored_with_the_contract_headers(server: str) -> None:
    result = post(server)
    assert result.outcome is Outcome.STORED and result.status == 200
    [headers] = Script.seen
    assert headers["Authorization"] == "Bearer secret-key"
    assert headers["Idempotency-Key"] == "k-123"
    assert headers["Content-Type"] == "application/json"


def test_throttled_with_retry_after(server: str) -> None:
    Script.status, Script.headers = 503, {"Retry-After": "7"}
    result = post(server)
    assert (result.outcome, result.status, result.retry_after_s) == (Outcome.RETRY, 503, 7.0)


def test_bad_key_is_auth_not_reject(server: str) -> None:
    Script.status = 401
    assert post(server).outcome is Outcome.AUTH


def test_a_huge_answer_is_read_only_up_to_the_bound(server: str) -> None:
    Script.status, Script.chunked = 500, True
    result = post(server)
    assert result.outcome is Outcome.RETRY
    assert 0 < len(result.body) <= MAX_RESPONSE_BYTES
    assert len(result.detail) <= 1000


def test_an_answer_dripped_a_byte_at_a_time_hits_the_total_deadline(server: str) -> None:
    """Each byte arrives well inside the read timeout, so only a total deadline ends it."""
    Script.drip_s = 0.4  # the 40-byte answer would take 16 s
    started = time.monotonic()
    # Total deadline 2 * (0.5 + 0.5) = 2 s; every byte arrives within the 0.5 s read timeout.
    result = post(server, read_timeout_s=0.5, connect_timeout_s=0.5)
    took = time.monotonic() - started
    assert (result.outcome, result.status) == (Outcome.RETRY, None)
    assert "no complete answer within 2 s" in result.detail
    assert took < 8  # cut at the deadline, not at the end of the 16 s drip


def test_connection_refused_is_a_network_retry() -> None:
    result = post(f"http://127.0.0.1:{free_port()}/internal/ingest")
    assert (result.outcome, result.status) == (Outcome.RETRY, None)
    assert "secret-key" not in result.detail


def _problem(errors: object) -> PostResult:
    body = json.dumps({"status": 422, "errors": errors}).encode()
    return PostResult(Outcome.REJECT, 422, None, "", body)


def test_rejected_indexes_from_problem_json() -> None:
    assert _problem([{"index": 3, "field": "price"}, {"index": 0}]).rejected_indexes(5) == [0, 3]
    assert _problem([{"index": 5}]).rejected_indexes(5) is None      # out of range
    assert _problem([{"index": True}]).rejected_indexes(5) is None   # not an index
    assert _problem([{"field": "price"}]).rejected_indexes(5) is None
    assert _problem([]).rejected_indexes(5) is None
    assert PostResult(Outcome.REJECT, 400, None, "", b"<html>").rejected_indexes(5) is None


def test_a_record_encodes_to_the_contract_json() -> None:
    from collectors.delivery import encode
    from collectors.model import PriceFeed

    record = PriceFeed(symbol="BTC/USD", price=45123.5, volume=None,
                       timestamp="2026-11-29T10:00:00.123456Z", source="coinbase",
                       worker_id="worker-coinbase",
                       metadata={"bid": 45123.4, "sequence": 7, "timestamp_source": "exchange"})
    assert json.loads(encode(record)) == {
        "symbol": "BTC/USD", "price": 45123.5, "timestamp": "2026-11-29T10:00:00.123456Z",
        "source": "coinbase", "worker_id": "worker-coinbase",
        "metadata": {"bid": 45123.4, "sequence": 7, "timestamp_source": "exchange"}}
    assert b" " not in encode(record)  # compact


_finite = st.floats(allow_nan=False, allow_infinity=False)
_meta_value = st.one_of(_finite, st.integers(-(2**63), 2**63 - 1), st.text(max_size=20),
                        st.booleans())


@settings(max_examples=300, deadline=None)
@given(symbol=st.text(max_size=12), price=_finite, volume=st.none() | _finite,
       timestamp=st.text(max_size=30), source=st.text(max_size=10),
       worker_id=st.text(max_size=10),
       metadata=st.dictionaries(st.text(max_size=12), _meta_value, max_size=16))
def test_encode_writes_the_bytes_of_the_records_json_dict(
        symbol: str, price: float, volume: float | None, timestamp: str, source: str,
        worker_id: str, metadata: dict[str, float | int | str | bool]) -> None:
    # encode() builds Structs instead of a dict per record: the bytes must not change (they
    # are what the spool keeps and the API stores, and a retry must send the same body).
    import msgspec

    from collectors.delivery import encode
    from collectors.model import PriceFeed

    record = PriceFeed(symbol=symbol, price=price, volume=volume, timestamp=timestamp,
                       source=source, worker_id=worker_id, metadata=metadata)
    assert encode(record) == msgspec.json.encode(record.to_json_dict())
