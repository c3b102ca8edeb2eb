"""A delivery worker (real spool, real Poster) against an ingest API that misbehaves byte by byte
on 127.0.0.1: no answer may end the worker (a crash restarts the process into the same batch, for
ever), and every batch ends stored, dead-lettered or waiting, never re-sent for ever."""

from __future__ import annotations

import json
import logging
import random
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from collectors.backoff import Backoff, Outcome
from collectors.delivery import Poster, Sender, encode
from collectors.metrics import Metrics
from collectors.model import PriceFeed
from collectors.spool import DEAD_LETTER_NAME, Batch, Spool
from tests.support.waiting import wait_until
from tests.unit.test_delivery import RawServer, raw_server, straddling
from tests.unit.test_logsetup import logging_into_buffer

KEY = "sk-live-0123456789abcdef"


def records(n: int) -> list[bytes]:
    return [encode(PriceFeed(symbol="BTC/USD", price=100.0 + i, volume=1.0,
                             timestamp="2026-11-29T10:00:00Z", source="coinbase",
                             worker_id="w", metadata={"sequence": i}))
            for i in range(n)]


@dataclass
class Worker:
    spool: Spool
    metrics: Metrics
    sender: Sender
    errors: list[BaseException] = field(default_factory=list)

    def settled(self) -> bool:
        """Nothing waits in the spool any more, or the worker died."""
        return bool(self.errors) or self.spool.stats().records == 0

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(f"chrono_collector_{name}",
                                                       {"exchange": "coinbase", **labels})
        return value or 0.0


@contextmanager
def worker(tmp_path: Path, server: RawServer, *, n: int = 10, read_timeout_s: float = 5.0,
           backoff: Backoff | None = None, batch_size: int | None = None) -> Iterator[Worker]:
    """One delivery worker sending `n` spooled records as one batch; stopped on exit."""
    spool = Spool(tmp_path / "spool")
    spool.append(records(n))
    stop, writer_done, wake = threading.Event(), threading.Event(), threading.Event()
    poster = Poster(server.url, KEY, connect_timeout_s=2, read_timeout_s=read_timeout_s)
    metrics = Metrics(CollectorRegistry(), "coinbase", "w")
    sender = Sender(spool, [poster], metrics, batch_size=batch_size or n,
                    batch_interval_s=0.01, stop=stop, writer_finished=writer_done, wake=wake,
                    drain_timeout_s=2.0, retry_max_s=0.5, backoff=backoff)
    w = Worker(spool, metrics, sender)

    def run() -> None:
        try:
            sender.run(0)
        except BaseException as exc:  # what would end the thread in the service
            w.errors.append(exc)

    thread = threading.Thread(target=run, name="delivery", daemon=True)
    thread.start()
    try:
        yield w
    finally:
        writer_done.set()
        stop.set()
        thread.join(15)
        sender.close()
        poster.close()
        spool.close()
        assert not thread.is_alive()


def test_an_unreadable_retry_after_date_does_not_end_the_worker(tmp_path: Path) -> None:
    def answer(sock: socket.socket, n: int) -> None:
        if n == 0:
            sock.sendall(b"HTTP/1.1 503 Service Unavailable\r\n"
                         b"Retry-After: Sun, 06 Nov 99999999999 08:49:37 GMT\r\n"
                         b"Content-Length: 0\r\n\r\n")
        else:
            sock.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\n{}")

    with raw_server(answer) as server, worker(tmp_path, server) as w:
        assert wait_until(w.settled)
        assert w.errors == []
        assert server.requests == 2  # the 503, then the retry (its wait our own backoff)


class _Ceiling(random.Random):
    """Full jitter at its top: the backoff's delay is its ceiling, every time."""

    def uniform(self, a: float, b: float) -> float:
        return b


@pytest.mark.parametrize(("retry_after", "low", "high"), [
    (b"0", 1.5, 2.0),  # says nothing: the backoff's 2 s, not 0.25 s
    (b"1", 0.5, 1.0),  # as the API asks, not the backoff's 2 s
])
def test_a_retry_after_of_0_waits_the_backoff_and_another_is_obeyed(
        tmp_path: Path, retry_after: bytes, low: float, high: float) -> None:
    # `Retry-After: 0` (or a date already past, on a clock behind ours) replaced the backoff:
    # retried four times a second for as long as the outage lasted.
    def answer(sock: socket.socket, _n: int) -> None:
        sock.sendall(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: %s\r\n"
                     b"Content-Length: 0\r\n\r\n" % retry_after)

    backoff = Backoff(base_s=2.0, cap_s=2.0, rng=_Ceiling())
    with raw_server(answer) as server, worker(tmp_path, server, backoff=backoff) as w:
        assert wait_until(lambda: w.sender._resume_at > 0)
        assert low < w.sender._resume_at - time.monotonic() <= high
        assert server.requests == 1


def test_an_api_refusing_part_of_every_batch_is_one_line_per_interval(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # 422 naming the first record of every batch: each split re-sends the rest, refused again,
    # a `records_rejected` line each (66 ERROR lines in 3 s in a review's run).
    body = json.dumps({"status": 422, "errors": [{"index": 0, "detail": "bad price"}]}).encode()

    def answer(sock: socket.socket, _n: int) -> None:
        sock.sendall(b"HTTP/1.1 422 Unprocessable Content\r\n"
                     b"Content-Type: application/problem+json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)

    with caplog.at_level(logging.ERROR, logger="collectors.delivery"), \
            raw_server(answer) as server, worker(tmp_path, server) as w:
        assert wait_until(w.settled)
        assert w.sample("dead_letter_records_total") == 10  # every one, counted
    lines = [r for r in caplog.records if r.getMessage() in ("records_rejected",
                                                             "batch_rejected")]
    assert server.requests == 10
    assert [(r.getMessage(), getattr(r, "since_last_log", None)) for r in lines] == [
        ("records_rejected", 0), ("batch_rejected", 0)]  # (the last one's batch was whole)


def test_a_said_failure_is_followed_by_its_recovery_and_only_a_said_one(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The recovery line was sampled on a clock of its own, apart from the retry line's: a
    # healthy collector's last line could be a batch_retry warning. Two failures and their
    # recoveries within the sampling interval: the first pair said, the second neither.
    answers = iter([503, 201, 503, 201])

    def answer(sock: socket.socket, _n: int) -> None:
        status = next(answers, 201)
        sock.sendall(b"HTTP/1.1 %d X\r\nContent-Length: 2\r\n\r\n{}" % status)

    with caplog.at_level(logging.INFO, logger="collectors.delivery"), \
            raw_server(answer) as server, worker(tmp_path, server, n=4, batch_size=2) as w:
        assert wait_until(w.settled)
        assert server.requests == 4
    said = [r.getMessage() for r in caplog.records
            if r.getMessage() in ("batch_retry", "delivery_recovered")]
    assert said == ["batch_retry", "delivery_recovered"]


def test_a_deeply_nested_rejection_dead_letters_the_batch(tmp_path: Path) -> None:
    def answer(sock: socket.socket, _n: int) -> None:
        body = b"[" * 5000
        sock.sendall(b"HTTP/1.1 422 Unprocessable Content\r\n"
                     b"Content-Type: application/problem+json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    with raw_server(answer) as server, worker(tmp_path, server) as w:
        assert wait_until(w.settled)
        assert w.errors == []
        assert wait_until(lambda: w.sample("dead_letter_records_total") == 10)
    [line] = (tmp_path / "spool" / DEAD_LETTER_NAME).read_text().splitlines()
    dead = json.loads(line)
    assert (dead["status"], len(dead["feeds"])) == (422, 10)
    assert server.requests == 1


def test_an_answer_echoing_the_key_leaks_it_nowhere(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The key straddles every cut of the reason (200 and 500 in logs, 1000 kept): cut first,
    # the log filter could not match it any more.
    body = json.dumps({"detail": "bad request", "echo": straddling(KEY).decode(),
                       "authorization": f"Bearer {KEY}"}).encode()

    def answer(sock: socket.socket, _n: int) -> None:
        sock.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))

    caplog.set_level(logging.DEBUG)
    with raw_server(answer) as server, worker(tmp_path, server) as w:
        assert wait_until(w.settled)
        assert w.errors == []
    dead_letter = (tmp_path / "spool" / DEAD_LETTER_NAME).read_text()
    assert json.loads(dead_letter)["status"] == 400
    assert "[REDACTED]" in dead_letter
    logged = [record.getMessage() for record in caplog.records] + [
        value for record in caplog.records for value in vars(record).values()
        if isinstance(value, str)]
    assert any("[REDACTED]" in text for text in logged)
    for text in [dead_letter, *logged]:
        assert KEY[:6] not in text  # not whole, not a piece left by a cut


def test_a_stored_answer_whose_body_stalls_is_acknowledged_once(tmp_path: Path) -> None:
    release = threading.Event()

    def answer(sock: socket.socket, _n: int) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b'{"stored":')
        release.wait(10)  # the other 90 bytes never come

    try:
        with raw_server(answer) as server, worker(tmp_path, server, read_timeout_s=0.5) as w:
            # Acknowledged after about the read timeout (0.5 s), not re-sent for ever.
            assert wait_until(w.settled, timeout_s=3)
            assert w.errors == []
            assert wait_until(lambda: w.sample("records_delivered_total") == 10)
            assert server.requests == 1
    finally:
        release.set()


def test_interim_answers_before_the_final_one_store_the_batch_once(tmp_path: Path) -> None:
    # The 103 (a CDN's Early Hints) was taken for the answer: a retry of a stored batch, for
    # ever, and nothing ever counted delivered.
    def answer(sock: socket.socket, _n: int) -> None:
        sock.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
                     b"HTTP/1.1 102 Processing\r\n\r\n"
                     b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\n{}")

    with raw_server(answer) as server, worker(tmp_path, server) as w:
        assert wait_until(w.settled)
        assert w.errors == []
        assert wait_until(lambda: w.sample("records_delivered_total") == 10)
        assert server.requests == 1
        assert w.sample("flush_failures_total", reason="other") == 0


def test_an_api_that_never_answers_counts_timeouts_not_network_failures(
        tmp_path: Path) -> None:
    def answer(sock: socket.socket, n: int) -> None:
        if n > 0:
            sock.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\n{}")
        # the first request is read and never answered

    with raw_server(answer) as server, worker(tmp_path, server, read_timeout_s=0.3) as w:
        assert wait_until(w.settled)
        assert w.errors == []
        assert wait_until(lambda: w.sample("records_delivered_total") == 10)
        assert w.sample("flush_failures_total", reason="timeout") == 1
        assert w.sample("flush_failures_total", reason="network") == 0


def test_a_malformed_header_in_every_answer_is_one_line_without_a_traceback(
        tmp_path: Path) -> None:
    # urllib3 logged "Failed to parse headers ..." with a full traceback on every POST.
    def answer(sock: socket.socket, _n: int) -> None:
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                     b"X-Broken-Header-Without-Colon\r\n\r\n{}")

    with logging_into_buffer(KEY) as stream, raw_server(answer) as server:
        for i in range(3):
            poster = Poster(server.url, KEY, connect_timeout_s=2, read_timeout_s=5)
            try:
                assert poster.post(Batch.of(f"k-{i}", records(1))).outcome is Outcome.STORED
            finally:
                poster.close()
    assert "Traceback" not in stream.getvalue()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    from_urllib3 = [doc for doc in lines if str(doc["logger"]).startswith("urllib3")]
    assert len(from_urllib3) == 1, lines  # once a minute, not once a POST
    [doc] = from_urllib3
    assert doc["event"] == "library_warning" and doc["level"] == "WARNING"
    assert "Failed to parse headers" in str(doc["detail"])
    assert "exc_info" not in doc
