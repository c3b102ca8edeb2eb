"""Poster over real HTTP (a scripted stdlib server on 127.0.0.1), and the batch-splitting
policy's parsing of problem+json answers."""

from __future__ import annotations

import gzip
import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collectors.backoff import Outcome
from collectors.delivery import (
    MAX_INTERIM_RESPONSES,
    MAX_RESPONSE_BYTES,
    Poster,
    PostResult,
    _failure_reason,
)
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
    bodies: ClassVar[list[bytes]] = []
    dripped = threading.Event()  # never set: its wait() paces the drip


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        Script.bodies.append(self.rfile.read(length))
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
    Script.seen, Script.bodies = [], []
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


def test_each_post_carries_its_own_batch_and_key(server: str) -> None:
    # (the request is prepared once and copied: nothing of one batch may stick to the next)
    poster = Poster(server, "secret-key", connect_timeout_s=2, read_timeout_s=5)
    batches = [Batch.of("k-1", [b'{"a":1}']), Batch.of("k-2", [b'{"b":22}', b'{"c":333}']),
               Batch.of("k-3", [b'{"d":4}'])]
    try:
        assert [poster.post(b).outcome for b in batches] == [Outcome.STORED] * 3
    finally:
        poster.close()
    assert [h["Idempotency-Key"] for h in Script.seen] == ["k-1", "k-2", "k-3"]
    assert Script.bodies == [b.body() for b in batches]
    assert [int(h["Content-Length"]) for h in Script.seen] == [len(b.body()) for b in batches]
    assert all(h["Authorization"] == "Bearer secret-key" and "Cookie" not in h
               for h in Script.seen)


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


# ------------------------------------------------------------ hostile answers, byte by byte

class RawServer:
    """An HTTP server on 127.0.0.1 that answers with exact bytes: `answer(sock, n)` writes the
    answer to the n-th request (0-based) of the process; the connection stays open for the next
    request unless it returns False."""

    def __init__(self, answer: Callable[[socket.socket, int], bool | None]) -> None:
        self._answer = answer
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}/internal/ingest"
        self.requests = 0
        self.connections = 0
        self.heads: list[bytes] = []  # each request's request line and headers, as received
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            reader = conn.makefile("rb")
            while True:
                try:
                    head = b""
                    while not head.endswith(b"\r\n\r\n"):
                        line = reader.readline()
                        if not line:
                            return
                        head += line
                    length = next((int(h.split(b":")[1]) for h in head.split(b"\r\n")
                                   if h.lower().startswith(b"content-length:")), 0)
                    reader.read(length)
                    self.heads.append(head)
                    n, self.requests = self.requests, self.requests + 1
                    if self._answer(conn, n) is False:
                        reader.close()  # the socket's last reference: it closes now
                        return
                except OSError:
                    return

    def close(self) -> None:
        self._listener.close()


@contextmanager
def raw_server(answer: Callable[[socket.socket, int], bool | None]) -> Iterator[RawServer]:
    server = RawServer(answer)
    try:
        yield server
    finally:
        server.close()


def test_a_retry_after_that_only_looks_like_digits_is_ignored() -> None:
    def answer(sock: socket.socket, _n: int) -> None:
        sock.sendall(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: \xb2\r\n"
                     b"Content-Length: 0\r\n\r\n")

    with raw_server(answer) as server:
        result = post(server.url)
    assert (result.outcome, result.status, result.retry_after_s) == (Outcome.RETRY, 503, None)


@pytest.mark.parametrize(("status_line", "expected"), [
    # The status line and headers said stored: the unused body's failure changes nothing.
    (b"HTTP/1.1 200 OK", (Outcome.STORED, 200)),
    # Any other answer is only whole with its body (a reason cut short is no reason).
    (b"HTTP/1.1 400 Bad Request", (Outcome.RETRY, None)),
])
def test_a_chunked_answer_cut_mid_stream(status_line: bytes,
                                         expected: tuple[Outcome, int | None]) -> None:
    def answer(sock: socket.socket, _n: int) -> bool:
        sock.sendall(status_line + b"\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n{\"ok\":")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return False  # closed with a zero linger: a reset, mid-chunk

    with raw_server(answer) as server:
        result = post(server.url)
    assert (result.outcome, result.status) == expected


@pytest.mark.parametrize(("status_line", "expected"), [
    (b"HTTP/1.1 200 OK", (Outcome.STORED, 200)),
    (b"HTTP/1.1 503 Service Unavailable", (Outcome.RETRY, None)),
])
def test_a_chunked_answer_stalling_past_the_read_timeout(
        status_line: bytes, expected: tuple[Outcome, int | None]) -> None:
    release = threading.Event()

    def answer(sock: socket.socket, _n: int) -> None:
        sock.sendall(status_line + b"\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{\r\n")
        release.wait(10)

    with raw_server(answer) as server:
        try:
            result = post(server.url, read_timeout_s=0.3)
        finally:
            release.set()
    assert (result.outcome, result.status) == expected


def _chunked_mib(head: bytes, mib: int) -> tuple[Callable[[socket.socket, int], None],
                                                 threading.Event]:
    """An answer: `head` (status line and headers, chunked), then `mib` 1 MiB chunks; and an
    Event set only if all of it was written (a client that stops reading never lets it)."""
    sent_all = threading.Event()

    def answer(sock: socket.socket, _n: int) -> None:
        sock.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"100000\r\n" + b"x" * 0x100000 + b"\r\n"
        try:
            for _ in range(mib):
                sock.sendall(chunk)
            sock.sendall(b"0\r\n\r\n")
            sent_all.set()
        except OSError:
            pass

    return answer, sent_all


def test_a_small_content_length_beside_chunked_framing_does_not_unbound_the_answer() -> None:
    # The chunked framing wins over Content-Length; 32 MiB of chunks must not be read whole.
    answer, sent_all = _chunked_mib(b"HTTP/1.1 500 Oops\r\nContent-Length: 2\r\n", 32)
    with raw_server(answer) as server:
        result = post(server.url)
    assert (result.outcome, result.status) == (Outcome.RETRY, 500)
    assert len(result.body) == MAX_RESPONSE_BYTES
    assert not sent_all.is_set()  # the client stopped reading and closed


def test_a_compressed_answer_is_not_inflated() -> None:
    # We ask for identity; a server that gzips anyway (here 16 MiB of zeros in 16 KiB) gets
    # its bytes back as they came, never decompressed into memory.
    bomb = gzip.compress(b"\0" * (16 * 1024 * 1024), 9)

    def answer(sock: socket.socket, _n: int) -> None:
        sock.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Encoding: gzip\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(bomb), bomb))

    with raw_server(answer) as server:
        result = post(server.url)
    assert (result.outcome, result.status) == (Outcome.REJECT, 400)
    assert result.body == bomb[:MAX_RESPONSE_BYTES]


def _post_times(url: str, n: int) -> list[PostResult]:
    """`n` POSTs of BATCH through one Poster (one keep-alive session)."""
    poster = Poster(url, "secret-key", connect_timeout_s=2, read_timeout_s=5)
    try:
        return [poster.post(BATCH) for _ in range(n)]
    finally:
        poster.close()


def test_small_answers_keep_the_connection_alive() -> None:
    def answer(sock: socket.socket, _n: int) -> None:
        sock.sendall(b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 13\r\n\r\n{\"stored\":1}\n")

    with raw_server(answer) as server:
        results = _post_times(server.url, 3)
    assert [(r.outcome, r.body) for r in results] == [(Outcome.STORED, b'{"stored":1}\n')] * 3
    assert (server.requests, server.connections) == (3, 1)


def test_a_failed_answer_does_not_leave_its_connection_for_the_next_post() -> None:
    # An API (or a proxy) that answers 503, then writes a stray 201 on the same connection: the
    # retry, reusing it, read that 201 as its own answer and acknowledged a batch never
    # stored (10 of 45 batches lost in a review's run).
    def answer(sock: socket.socket, n: int) -> None:
        if n == 0:
            sock.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
            time.sleep(0.3)  # the stray answer comes later, after the retry was sent
            sock.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: 13\r\n\r\n"
                         b"{\"stored\":1}\n")
            return
        sock.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")

    with raw_server(answer) as server:
        poster = Poster(server.url, "secret-key", connect_timeout_s=2, read_timeout_s=5)
        try:
            first = poster.post(BATCH)
            second = poster.post(BATCH)  # at once: the stray answer is not there yet
        finally:
            poster.close()
    assert [(r.outcome, r.status) for r in (first, second)] == [(Outcome.RETRY, 503)] * 2
    assert (server.requests, server.connections) == (2, 2)


@pytest.mark.parametrize(("echoed", "outcome"), [
    (b"another-batch", Outcome.RETRY), (None, Outcome.STORED), (b"KEY", Outcome.STORED),
    # the same UUID as a uuid column spells it (dashes, another case): the same key
    (b"0123ABCD-0123-4567-89AB-0123456789AB", Outcome.STORED)])
def test_a_2xx_naming_another_batch_is_not_counted_as_stored(echoed: bytes | None,
                                                            outcome: Outcome) -> None:
    body = b'{"stored":1}' if echoed is None else (
        b'{"stored":1,"idempotency_key":"' + echoed.replace(b"KEY", BATCH.key.encode()) + b'"}')

    def answer(sock: socket.socket, _n: int) -> None:
        sock.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: %d\r\n\r\n" % len(body) + body)

    batch = Batch.of("0123abcd0123456789ab0123456789ab", [b'{"a":1}']) if b"0123" in (
        echoed or b"") else BATCH
    with raw_server(answer) as server:
        poster = Poster(server.url, "secret-key", connect_timeout_s=2, read_timeout_s=5)
        try:
            results = [poster.post(batch) for _ in range(2)]
        finally:
            poster.close()
    assert [r.outcome for r in results] == [outcome] * 2
    # Out of step: its connection is not used again.
    assert server.connections == (2 if outcome is Outcome.RETRY else 1)


def test_stopping_cuts_a_dripping_answer_at_the_stop_deadline() -> None:
    release = threading.Event()

    def answer(sock: socket.socket, _n: int) -> None:
        # The headers never end (once they have, a 2xx is stored whatever its body does).
        sock.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        while not release.wait(0.2):  # a byte well within every read timeout, for ever
            sock.sendall(b"a")

    with raw_server(answer) as server:
        # Alone, this POST's total deadline is 2 * (5 + 10) = 30 s.
        poster = Poster(server.url, "secret-key", connect_timeout_s=5, read_timeout_s=10)
        try:
            threading.Timer(0.5, poster.stop_by, args=(time.monotonic() + 1.0,)).start()
            started = time.monotonic()
            result = poster.post(BATCH)
            took = time.monotonic() - started
            after = poster.post(BATCH)  # the deadline has passed: a later POST does not start
        finally:
            release.set()
            poster.close()
    assert (result.outcome, result.status) == (Outcome.RETRY, None)
    assert "stop deadline" in result.detail
    assert took < 5
    assert (after.outcome, after.status) == (Outcome.RETRY, None)
    assert "stop deadline" in after.detail
    assert server.requests == 1


# ------------------------------------------------- answers that once crashed the delivery thread

def test_a_retry_after_date_past_datetimes_range_is_ignored() -> None:
    # parsedate_to_datetime raises OverflowError on it: once a thread crash, then a restart into
    # the same batch, for ever.
    def answer(sock: socket.socket, _n: int) -> None:
        sock.sendall(b"HTTP/1.1 503 Service Unavailable\r\n"
                     b"Retry-After: Sun, 06 Nov 99999999999 08:49:37 GMT\r\n"
                     b"Content-Length: 0\r\n\r\n")

    with raw_server(answer) as server:
        result = post(server.url)
    assert (result.outcome, result.status, result.retry_after_s) == (Outcome.RETRY, 503, None)


def test_a_surprise_inside_post_is_a_retry_not_a_crash(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # Stands in for any library failure we have not met yet: the stdlib date parser the
    # Retry-After reading relies on raises something nobody expects.
    import collectors.backoff

    def surprise(_value: str) -> object:
        raise RuntimeError("surprise")

    monkeypatch.setattr(collectors.backoff, "parsedate_to_datetime", surprise)

    def answer(sock: socket.socket, n: int) -> None:
        retry_after = b"Retry-After: Sun, 06 Nov 1994 08:49:37 GMT\r\n" if n < 2 else b""
        sock.sendall(b"HTTP/1.1 503 Service Unavailable\r\n%sContent-Length: 0\r\n\r\n"
                     % retry_after)

    with raw_server(answer) as server:
        results = _post_times(server.url, 3)
    for result in results[:2]:
        assert (result.outcome, result.status, result.reason) == (
            Outcome.RETRY, None, "client_error")
        assert result.detail == "client_error: RuntimeError: surprise"
    assert (results[2].outcome, results[2].status) == (Outcome.RETRY, 503)  # still usable
    logged = [r for r in caplog.records if r.getMessage() == "post_client_error"]
    assert len(logged) == 1  # once, not once a POST
    assert logged[0].exc_info is None  # one line, no traceback


def test_an_interrupt_inside_post_is_not_swallowed(monkeypatch: pytest.MonkeyPatch) -> None:
    import collectors.backoff

    def interrupt(_value: str) -> object:
        raise KeyboardInterrupt

    monkeypatch.setattr(collectors.backoff, "parsedate_to_datetime", interrupt)

    def answer(sock: socket.socket, _n: int) -> None:
        sock.sendall(b"HTTP/1.1 503 Service Unavailable\r\n"
                     b"Retry-After: Sun, 06 Nov 1994 08:49:37 GMT\r\nContent-Length: 0\r\n\r\n")

    with raw_server(answer) as server, pytest.raises(KeyboardInterrupt):
        post(server.url)


def test_rejected_indexes_of_a_deeply_nested_answer_is_none() -> None:
    # json.loads raises RecursionError on it: the batch must still be dead-lettered whole.
    for body in (b"[" * 5000, b'{"errors":' * 5000):
        assert PostResult(Outcome.REJECT, 422, None, "", body).rejected_indexes(5) is None


def test_a_redirect_with_an_endless_body_is_read_only_up_to_the_bound() -> None:
    # requests' redirect machinery (it runs even with allow_redirects=False) read such a body
    # whole: over 1 GiB in memory before the deadline cut it.
    # 64 MiB: "endless" for a client that reads 64 KiB
    answer, sent_all = _chunked_mib(b"HTTP/1.1 307 Temporary Redirect\r\nLocation: /x\r\n", 64)
    with raw_server(answer) as server:
        started = time.monotonic()
        result = post(server.url)
        took = time.monotonic() - started
    assert (result.outcome, result.status) == (Outcome.RETRY, 307)
    assert result.detail.startswith("redirect not followed (Location: '/x')")
    assert len(result.body) == MAX_RESPONSE_BYTES
    assert not sent_all.is_set()  # the client stopped reading and closed
    assert server.requests == 1  # and followed nothing
    assert took < 5


@pytest.mark.parametrize("location", [b"http://[::1/x", b"/\xff\xfe"])
def test_a_redirect_with_a_malformed_location_is_a_retry(location: bytes) -> None:
    # requests parsed these even with allow_redirects=False: ValueError / UnicodeDecodeError.
    def answer(sock: socket.socket, _n: int) -> None:
        sock.sendall(b"HTTP/1.1 301 Moved Permanently\r\nLocation: %s\r\n"
                     b"Content-Length: 0\r\n\r\n" % location)

    with raw_server(answer) as server:
        result = post(server.url)
    assert (result.outcome, result.status) == (Outcome.RETRY, 301)
    assert result.detail.startswith("redirect not followed (Location: ")


def test_a_stored_answer_whose_body_stalls_is_stored_and_its_connection_dropped() -> None:
    # Re-sending would never be acknowledged by an API that always does this: delivery stalled
    # for ever while the spool filled.
    release = threading.Event()

    def answer(sock: socket.socket, _n: int) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b'{"stored":')
        release.wait(10)  # the other 90 bytes never come

    with raw_server(answer) as server:
        poster = Poster(server.url, "secret-key", connect_timeout_s=2, read_timeout_s=0.5)
        try:
            started = time.monotonic()
            result = poster.post(BATCH)
            took = time.monotonic() - started
            assert server.requests == 1
            again = poster.post(BATCH)
        finally:
            release.set()
            poster.close()
    assert (result.outcome, result.status) == (Outcome.STORED, 200)
    assert took < 0.5 + 1.5  # about the read timeout, well inside the 5 s total deadline
    assert again.outcome is Outcome.STORED
    assert (server.requests, server.connections) == (2, 2)  # the stalled one was not reused


def straddling(key: str) -> bytes:
    """An answer naming `key` across the cuts at 200, 500 and 1000 characters (the log and
    dead-letter cuts of a detail), once as the whole `Bearer <key>` value."""
    body = b""
    for cut, prefix in ((200, b"Bearer "), (500, b""), (1000, b"")):
        body += b"y" * (cut - 4 - len(prefix) - len(body)) + prefix + key.encode()
    return body


def test_an_answer_echoing_the_key_has_it_redacted_before_it_is_cut() -> None:
    key = "sk-live-0123456789abcdef"
    body = straddling(key)

    def answer(sock: socket.socket, _n: int) -> None:
        sock.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))

    with raw_server(answer) as server:
        poster = Poster(server.url, key, connect_timeout_s=2, read_timeout_s=5)
        try:
            result = poster.post(BATCH)
        finally:
            poster.close()
    assert (result.outcome, result.status) == (Outcome.REJECT, 400)
    assert "[REDACTED]" in result.detail
    assert key[:6] not in result.detail



def test_a_key_in_the_url_path_is_redacted_percent_encoded_when_the_api_is_down() -> None:
    # With the key inside API_BASE_URL's path and the ingest down, batch_retry's detail showed
    # it as requests writes the URL: percent-encoded (`/Sec%2Bret%2FKey...`).
    key = "Sec+ret/Key-0123456789abcdef=="
    url = f"http://127.0.0.1:{free_port()}/{quote(key, safe='')}/internal/ingest"
    poster = Poster(url, key, connect_timeout_s=2, read_timeout_s=2)
    try:
        result = poster.post(BATCH)
    finally:
        poster.close()
    assert result.outcome is Outcome.RETRY and result.status is None
    assert "127.0.0.1" in result.detail and "[REDACTED]" in result.detail, result.detail
    assert "0123456789" not in result.detail


# ------------------------------------------------------------------- interim (1xx) answers

def test_interim_answers_are_skipped_for_the_final_one() -> None:
    # RFC 9110 15.2. http.client skips only 100 Continue: the 103 was taken for the answer and
    # the stored batch re-sent for ever.
    def answer(sock: socket.socket, _n: int) -> None:
        sock.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n"
                     b"Link: </app.js>; rel=preload\r\n\r\n"
                     b"HTTP/1.1 102 Processing\r\n\r\n"
                     b"HTTP/1.1 100 Continue\r\n\r\n"
                     b"HTTP/1.1 201 Created\r\nContent-Length: 13\r\n\r\n{\"stored\":1}\n")

    with raw_server(answer) as server:
        results = _post_times(server.url, 2)
    assert [(r.outcome, r.status, r.body) for r in results] == [
        (Outcome.STORED, 201, b'{"stored":1}\n')] * 2
    # Read to its end: the keep-alive connection serves the next POST.
    assert (server.requests, server.connections) == (2, 1)


@pytest.mark.parametrize(("interim", "why"), [
    # A protocol switch we never asked for: the connection is no longer HTTP/1.1.
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n", "101"),
    (b"HTTP/1.1 103 Early Hints\r\n\r\n" * (MAX_INTERIM_RESPONSES + 1), "interim"),
])
def test_a_switch_or_endless_interim_answers_are_a_retry(interim: bytes, why: str) -> None:
    def answer(sock: socket.socket, _n: int) -> bool:
        sock.sendall(interim + b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\n{}")
        return False

    with raw_server(answer) as server:
        result = post(server.url)
    assert (result.outcome, result.status, result.reason) == (Outcome.RETRY, None, "network")
    assert why in result.detail


# ---------------------------------------------------------------------------- no cookie state

def test_cookies_the_api_sets_are_never_sent_back() -> None:
    # A Session kept them all and sent them on every POST: a Cookie header of 27 MB, then 400
    # (dead letter) on every batch behind a proxy's header limit.
    def answer(sock: socket.socket, n: int) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\n"
                     b"Set-Cookie: c%d=%s; Path=/\r\n"
                     b"Set-Cookie: d%d=v; Domain=127.0.0.1; Path=/internal; Max-Age=3600\r\n"
                     b"Set-Cookie2: e%d=v; Version=1\r\n"
                     b"Content-Length: 2\r\n\r\n{}" % (n, b"v" * 3000, n, n))

    with raw_server(answer) as server:
        results = _post_times(server.url, 4)
    assert [r.outcome for r in results] == [Outcome.STORED] * 4
    assert len(server.heads) == 4
    for head in server.heads:
        assert b"\r\ncookie" not in head.lower(), head


# --------------------------------------------------------- failure reasons: timeout or network

def test_an_api_that_never_answers_is_a_timeout() -> None:
    def answer(_sock: socket.socket, _n: int) -> None:
        pass  # reads the request, never answers (the client gives up and closes)

    with raw_server(answer) as server:
        result = post(server.url, read_timeout_s=0.3)
    assert (result.outcome, result.status) == (Outcome.RETRY, None)
    assert "ReadTimeout" in result.detail
    assert (result.reason, _failure_reason(result)) == ("timeout", "timeout")


def test_an_api_that_never_reads_the_body_is_a_timeout() -> None:
    # The send stalls once the socket buffers are full: urllib3 wraps the socket timeout in
    # ProtocolError("Connection aborted.", TimeoutError(...)), requests in ConnectionError.
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[tuple[socket.socket, object]] = []
    accepting = threading.Thread(target=lambda: held.append(listener.accept()), daemon=True)
    accepting.start()
    try:
        poster = Poster(f"http://127.0.0.1:{listener.getsockname()[1]}/internal/ingest",
                        "k" * 24, connect_timeout_s=1, read_timeout_s=0.5)
        try:
            result = poster.post(Batch.of("k1", [b'{"x":"' + b"a" * 200_000 + b'"}'] * 100))
        finally:
            poster.close()
    finally:
        for sock, _addr in held:
            sock.close()
        listener.close()
    assert (result.outcome, result.status) == (Outcome.RETRY, None)
    assert (result.reason, _failure_reason(result)) == ("timeout", "timeout"), result.detail


def test_an_answer_cut_by_our_deadline_is_a_timeout(server: str) -> None:
    Script.drip_s = 0.2  # every byte inside the read timeout; the whole past the deadline
    result = post(server, read_timeout_s=0.5, connect_timeout_s=0.5)
    assert "no complete answer within 2 s" in result.detail
    assert _failure_reason(result) == "timeout"


def test_a_refused_or_reset_connection_is_a_network_failure() -> None:
    refused = post(f"http://127.0.0.1:{free_port()}/internal/ingest")

    def answer(sock: socket.socket, _n: int) -> bool:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return False  # closed with a zero linger, no answer: a reset

    with raw_server(answer) as server:
        reset = post(server.url)
    for result in (refused, reset):
        assert (result.outcome, result.status) == (Outcome.RETRY, None)
        assert _failure_reason(result) == "network", result.detail
