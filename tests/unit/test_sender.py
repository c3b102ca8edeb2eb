"""Delivery workers (DELIVERY_CONCURRENCY): a real spool, real Posters, a real ingest server.

Several workers keep several POSTs in flight, and every record is stored once; while the API
fails, they send one request at a time (a probe), never one each.
"""

from __future__ import annotations

import contextlib
import itertools
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from collectors.delivery import Poster, Sender, encode
from collectors.errors import SpoolError
from collectors.ingest.app import IngestApp
from collectors.ingest.server import start_server
from collectors.ingest.storage import SQLiteStorage
from collectors.metrics import Metrics
from collectors.model import PriceFeed
from collectors.spool import Spool
from tests.support.faults import FaultScript
from tests.support.servers import TEST_API_KEY, iso_ago
from tests.support.waiting import wait_until

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment


@dataclass
class Seen:
    start: float
    end: float = 0.0
    status: str = ""


class Timeline:
    """WSGI middleware: when each POST started and ended, and its status line."""

    def __init__(self, app: WSGIApplication) -> None:
        self.app = app
        self._lock = threading.Lock()
        self.requests: list[Seen] = []

    def __call__(self, environ: WSGIEnvironment,
                 start_response: StartResponse) -> Iterable[bytes]:
        seen = Seen(time.monotonic())
        with self._lock:
            self.requests.append(seen)

        def recording(status: str, headers: list[tuple[str, str]], exc: object = None) -> object:
            seen.status = status
            return start_response(status, headers)

        try:
            return list(self.app(environ, recording))  # type: ignore[arg-type]
        finally:
            seen.end = time.monotonic()

    @property
    def max_body_bytes(self) -> int:
        return int(getattr(self.app, "max_body_bytes", 8 * 1024 * 1024))


@dataclass
class Rig:
    spool: Spool
    storage: SQLiteStorage
    faults: FaultScript
    timeline: Timeline
    url: str
    db_path: Path


@contextmanager
def rig(tmp_path: Path, *, max_body_bytes: int = 8 * 1024 * 1024) -> Iterator[Rig]:
    """The API refuses bodies over `max_body_bytes` (413); the server takes up to 8 MiB, so a
    test may raise the API's limit (`faults.app.max_body_bytes`) while it runs."""
    db_path = tmp_path / "ingest.db"
    storage = SQLiteStorage.open(db_path)
    faults = FaultScript(IngestApp(storage, [TEST_API_KEY], max_body_bytes, 10_000))
    timeline = Timeline(faults)
    server = start_server(timeline, threads=8, max_body_bytes=8 * 1024 * 1024)
    spool = Spool(tmp_path / "spool")
    try:
        yield Rig(spool, storage, faults, timeline, server.url + "/internal/ingest", db_path)
    finally:
        faults.release()
        server.stop()
        spool.close()
        storage.close()


def records(n: int) -> list[bytes]:
    return [encode(PriceFeed(symbol="BTC/USD", price=100.0 + i, volume=1.0,
                             timestamp=iso_ago(60), source="coinbase", worker_id="w",
                             metadata={"received_at": iso_ago(59), "sequence": i}))
            for i in range(n)]


@contextmanager
def workers(r: Rig, n: int, batch_size: int,
            batch_interval_s: float = 0.01, *, registry: CollectorRegistry | None = None,
            ack_retry_s: float = 1.0, refusal_memory_s: float = 600.0,
            ) -> Iterator[tuple[Sender, threading.Event]]:
    """`n` delivery workers on threads; on exit they are stopped, drained and joined."""
    stop, writer_done, wake = threading.Event(), threading.Event(), threading.Event()
    posters = [Poster(r.url, TEST_API_KEY, connect_timeout_s=2, read_timeout_s=10)
               for _ in range(n)]
    metrics = Metrics(registry or CollectorRegistry(), "coinbase", "w")
    sender = Sender(r.spool, posters, metrics,
                    batch_size=batch_size, batch_interval_s=batch_interval_s, stop=stop,
                    writer_finished=writer_done, wake=wake, drain_timeout_s=5.0,
                    retry_max_s=1.0, ack_retry_s=ack_retry_s,
                    refusal_memory_s=refusal_memory_s)
    threads = [threading.Thread(target=sender.run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    try:
        yield sender, wake
    finally:
        writer_done.set()
        stop.set()
        for t in threads:
            t.join(15)
        for p in posters:
            p.close()
        assert not any(t.is_alive() for t in threads)


def stored_sequences(db_path: Path) -> list[int]:
    """Every stored record's sequence, sorted (duplicates would show twice)."""
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        rows = conn.execute("SELECT json_extract(metadata, '$.sequence') FROM price_feeds")
        return sorted(int(row[0]) for row in rows)


def test_workers_keep_several_posts_in_flight_and_store_everything_once(
        tmp_path: Path) -> None:
    with rig(tmp_path) as r:
        r.faults.hang(10, times=3)  # the first three POSTs wait until released
        r.spool.append(records(30))
        with workers(r, 3, batch_size=10):
            # Three batches in flight at once: one worker would never get past the first.
            assert r.faults.wait_for_requests(3, timeout_s=10)
            r.faults.release()
            assert r.faults.wait_for_completed(3, timeout_s=10)
        assert r.spool.stats().records == 0
        assert len(set(r.faults.idempotency_keys)) == 3
        assert stored_sequences(r.db_path) == list(range(30))


def test_a_failing_api_gets_one_request_at_a_time(tmp_path: Path) -> None:
    with rig(tmp_path) as r:
        r.faults.respond(503, retry_after=1, times=3)
        r.spool.append(records(10))
        with workers(r, 4, batch_size=10) as (sender, wake):
            # The first batch fails: from now on the API is known to be failing...
            assert wait_until(lambda: sender.failing, timeout_s=10)
            known_failing_at = time.monotonic()
            # ...so the batches that arrive now go out one at a time, each after the wait.
            r.spool.append(records(40)[10:])
            wake.set()
            assert r.faults.wait_for_completed(3 + 4, timeout_s=30)  # 3 failures, 4 stored
        assert stored_sequences(r.db_path) == list(range(40))
        seen = sorted(r.timeline.requests, key=lambda s: s.start)
        first_success_end = min(s.end for s in seen if s.status.startswith("201"))
        probes = [s for s in seen if known_failing_at <= s.start < first_success_end]
        t0 = seen[0].start
        timeline = [(round(x.start - t0, 3), round(x.end - t0, 3), x.status[:3]) for x in seen]
        assert len(probes) == 3, timeline  # two failures, then the success
        for a, b in itertools.pairwise(probes):
            # One at a time, each after the Retry-After (1 s) of the failure before it.
            assert b.start - a.end >= 0.95, timeline


def test_one_worker_stores_batches_in_spool_order(tmp_path: Path) -> None:
    with rig(tmp_path) as r:
        r.spool.append(records(50))
        with workers(r, 1, batch_size=10):
            assert r.faults.wait_for_completed(5, timeout_s=10)
        bodies = r.faults.bodies
        firsts = [int(b.split(b'"sequence":', 1)[1].split(b"}", 1)[0]) for b in bodies]
        assert firsts == [0, 10, 20, 30, 40]


def first_sequences(bodies: list[bytes]) -> list[int]:
    return [int(b.split(b'"sequence":', 1)[1].split(b"}", 1)[0]) for b in bodies]


def test_the_next_batch_is_claimed_while_a_post_is_on_the_wire(tmp_path: Path) -> None:
    with rig(tmp_path) as r:
        r.faults.hang(10, times=1)  # the first POST waits until released
        r.spool.append(records(30))
        with workers(r, 1, batch_size=10):
            assert r.faults.wait_for_requests(1, timeout_s=10)
            # The bookkeeping thread claims the second batch while the first is on the wire.
            assert wait_until(lambda: r.spool.stats().batches_claimed == 2, timeout_s=10)
            assert r.faults.requests_seen == 1  # ...but does not send it before its turn
            r.faults.release()
            assert r.faults.wait_for_completed(3, timeout_s=10)
        assert first_sequences(r.faults.bodies) == [0, 10, 20]
        assert r.spool.stats().records == 0  # every acknowledgement committed before the end
        assert stored_sequences(r.db_path) == list(range(30))


def test_the_write_that_fills_a_batch_claims_it_for_the_waiting_worker(tmp_path: Path) -> None:
    with rig(tmp_path) as r:
        sent = records(25)
        with workers(r, 1, batch_size=10, batch_interval_s=60.0) as (sender, _wake):
            assert wait_until(lambda: sender._idle == 1, timeout_s=10)  # waiting for a batch
            assert sender.append(sent[:9], {}) == 0
            assert r.spool.waiting_records == 9  # not a batch yet: nothing claimed
            # The write that fills the batch claims it in its own transaction and hands it to
            # the worker (nobody set the wake event here: the hand-over does).
            assert sender.append(sent[9:12], {"BTC-USD": 11}) == 0
            assert r.spool.waiting_records == 2
            assert r.spool.marks() == {"BTC-USD": 11}
            assert r.faults.wait_for_completed(1, timeout_s=10)
            assert wait_until(lambda: sender._idle == 1, timeout_s=10)
            assert sender.append(sent[12:25], {}) == 0
            assert r.faults.wait_for_completed(2, timeout_s=10)
            assert r.spool.waiting_records == 5
        # The drain at the stop sent the rest; one worker keeps the spool's order.
        assert first_sequences(r.faults.bodies) == [0, 10, 20]
        assert stored_sequences(r.db_path) == list(range(25))


def test_a_stop_during_a_post_still_drains_what_was_not_due_at_its_start(
        tmp_path: Path) -> None:
    with rig(tmp_path) as r:
        r.faults.hang(10, times=1)  # the first POST waits until released
        with workers(r, 1, batch_size=10, batch_interval_s=60.0) as (sender, wake):
            r.spool.append(records(15))
            wake.set()
            assert r.faults.wait_for_requests(1, timeout_s=10)
            # The look-ahead claim ran during the POST and found nothing due (5 records, young).
            assert wait_until(lambda: (ahead := sender._ahead[0]) is not None and ahead.done(),
                              timeout_s=10)
            sender._writer_finished.set()  # the service stops while the POST is on the wire
            sender._stop.set()
            r.faults.release()
            assert r.faults.wait_for_completed(2, timeout_s=10)
        assert stored_sequences(r.db_path) == list(range(15))
        assert r.spool.stats().records == 0


def test_a_batch_claimed_ahead_goes_back_behind_the_failed_one(tmp_path: Path) -> None:
    with rig(tmp_path) as r:
        r.faults.respond(503, retry_after=0.3, times=1)
        r.spool.append(records(30))
        with workers(r, 1, batch_size=10):
            assert r.faults.wait_for_completed(4, timeout_s=10)  # one failure, three stored
        keys = r.faults.idempotency_keys
        # The failed batch is re-sent first, under its key; the one claimed meanwhile went
        # back to waiting (never sent) and follows, under a key of its own.
        assert first_sequences(r.faults.bodies) == [0, 0, 10, 20]
        assert keys[0] == keys[1] and len(set(keys)) == 3
        assert stored_sequences(r.db_path) == list(range(30))
        assert r.spool.stats().records == 0


def test_a_failed_acknowledgement_keeps_the_worker_and_the_batch_until_it_commits(
        tmp_path: Path) -> None:
    """The acknowledgement runs on the bookkeeping thread. Its failure used to end the worker,
    and so the service (exit 1, losing the frames it held in memory); but a full disk passes.
    Now the batch stays claimed on disk and out of claims (the API has it: never re-POSTed
    meanwhile), and the deletion is tried again until the spool takes it."""
    with rig(tmp_path) as r:
        r.spool.append(records(10))
        refusing = threading.Event()
        refusing.set()
        refused: list[str] = []
        real_ack = r.spool.ack

        def ack(key: str) -> int:
            if refusing.is_set():
                refused.append(key)
                raise SpoolError("spool: ack failed: database or disk is full (SQLITE_FULL)")
            return real_ack(key)

        r.spool.ack = ack  # type: ignore[method-assign]
        with workers(r, 1, batch_size=10, ack_retry_s=0.1):
            assert wait_until(lambda: len(refused) >= 3, timeout_s=10)  # tried again, and again
            assert r.faults.requests_seen == 1  # ...but the stored batch is not sent again
            assert r.spool.stats().batches_claimed == 1  # the spool still holds it
            refusing.clear()  # the disk has room again
            assert wait_until(lambda: r.spool.stats().records == 0, timeout_s=10)
        assert r.faults.requests_seen == 1
        assert set(refused) == set(r.faults.idempotency_keys)
        assert stored_sequences(r.db_path) == list(range(10))


# ------------------------------------------------------------------- stopping and draining

def test_stopping_cuts_a_long_retry_wait_short_for_one_more_try(tmp_path: Path) -> None:
    with rig(tmp_path) as r:
        r.faults.respond(503, retry_after=600)  # then the API is healthy again
        r.spool.append(records(10))
        with workers(r, 1, batch_size=10) as (sender, _wake):
            assert wait_until(lambda: sender.failing, timeout_s=10)
            stopping_at = time.monotonic()
        # Leaving stops the worker while it waits out the 600 s: it tries once more, within
        # the drain window (5 s), and the backlog is delivered rather than left behind.
        assert time.monotonic() - stopping_at < 5
        assert r.faults.requests_seen == 2
        assert r.spool.stats().records == 0
        assert stored_sequences(r.db_path) == list(range(10))


@contextmanager
def stoppable(r: Rig, *, drain_timeout_s: float) -> Iterator[
        tuple[Sender, Poster, CollectorRegistry, threading.Event]]:
    """One worker's Sender and Poster, not started; on exit the service's stop is mimicked
    for a test that did not stop it, and everything closes."""
    stop, writer_done = threading.Event(), threading.Event()
    registry = CollectorRegistry()
    poster = Poster(r.url, TEST_API_KEY, connect_timeout_s=2, read_timeout_s=10)
    sender = Sender(r.spool, [poster], Metrics(registry, "coinbase", "w"), batch_size=10,
                    batch_interval_s=0.01, stop=stop, writer_finished=writer_done,
                    wake=threading.Event(), drain_timeout_s=drain_timeout_s, retry_max_s=1.0)
    try:
        yield sender, poster, registry, stop
    finally:
        writer_done.set()
        stop.set()
        r.faults.release()
        sender.close()
        poster.close()


def flush_counts(registry: CollectorRegistry) -> tuple[float, float]:
    """(POSTs attempted, POSTs failed) as the metrics count them."""
    labels = {"exchange": "coinbase"}
    attempts = registry.get_sample_value("chrono_collector_flushes_total", labels) or 0.0
    failures = sum(s.value for m in registry.collect() for s in m.samples
                   if s.name == "chrono_collector_flush_failures_total")
    return attempts, failures


def test_the_drain_window_starts_at_the_stop_request_not_after_the_post_in_flight(
        tmp_path: Path) -> None:
    with rig(tmp_path) as r, stoppable(r, drain_timeout_s=1.0) as (sender, poster, registry,
                                                                  stop):
        r.faults.hang(30)  # the first POST is on the wire when the stop comes
        r.spool.append(records(20))
        thread = threading.Thread(target=sender.run, daemon=True)
        thread.start()
        assert r.faults.wait_for_requests(1, timeout_s=10)
        # What the service does on SIGTERM: stop, and cut every POST at window + 1 s.
        stop.set()
        stop_by = time.monotonic() + 1.0 + 1
        poster.stop_by(stop_by)
        thread.join(10)
        ended = time.monotonic()
        assert not thread.is_alive()
    # The window closed while the POST was on the wire: the worker ends when it is cut, and
    # starts no POST that stop_by would refuse unsent (a fake failure in logs and metrics).
    assert ended - stop_by < 0.5
    assert flush_counts(registry) == (1, 1)
    assert r.faults.requests_seen == 1


def test_no_post_starts_once_the_stop_deadline_has_passed(tmp_path: Path) -> None:
    with rig(tmp_path) as r, stoppable(r, drain_timeout_s=5.0) as (sender, poster, registry,
                                                                  stop):
        r.spool.append(records(10))
        poster.stop_by(time.monotonic())  # come already: a POST would be refused unsent
        stop.set()
        started = time.monotonic()
        sender.run(0)
        took = time.monotonic() - started
        assert r.spool.stats().records == 10  # on disk for the next start
    assert took < 1  # not the 5 s drain window spent on refusals
    assert flush_counts(registry) == (0, 0)
    assert r.faults.requests_seen == 0
