"""Delivery workers against a failing spool and a misbehaving API: a full disk does not end
them, the spool gauges follow the spool while they wait, a full spool's log stays readable, and
a fixed body limit costs a few 413s, not every other POST."""

from __future__ import annotations

import logging
import threading
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from collectors.delivery import Poster, Sender, SpoolWriter, encode
from collectors.errors import SpoolError
from collectors.metrics import Health, Metrics, MetricsServer
from collectors.model import PriceFeed
from collectors.spool import Spool
from tests.support.servers import TEST_API_KEY, iso_ago
from tests.support.waiting import wait_until
from tests.unit.test_sender import Rig, records, rig, stored_sequences, workers

LABELS = {"exchange": "coinbase"}


def test_a_spool_that_refuses_attempt_counts_and_acknowledgements_for_a_while(
        tmp_path: Path) -> None:
    # The disk is full while the API is up: neither the count of an attempt nor the deletion
    # of a stored batch commits. The workers carry on, and once the disk has room every
    # record is stored once and deleted from the spool.
    registry = CollectorRegistry()
    with rig(tmp_path) as r:
        refusing = threading.Event()
        refusing.set()
        refused = {"record_attempt": 0, "ack": 0}
        real_attempt, real_ack = r.spool.record_attempt, r.spool.ack

        def record_attempt(key: str) -> None:
            if refusing.is_set():
                refused["record_attempt"] += 1
                raise SpoolError("spool: record_attempt failed: database or disk is full")
            real_attempt(key)

        def ack(key: str) -> int:
            if refusing.is_set():
                refused["ack"] += 1
                raise SpoolError("spool: ack failed: database or disk is full")
            return real_ack(key)

        r.spool.record_attempt = record_attempt  # type: ignore[method-assign]
        r.spool.ack = ack  # type: ignore[method-assign]
        r.spool.append(records(100))
        with workers(r, 2, batch_size=10, registry=registry, ack_retry_s=0.05) as (_s, wake):
            assert r.faults.wait_for_completed(10, timeout_s=10)  # every batch stored...
            assert wait_until(lambda: refused["ack"] >= 20, timeout_s=10)  # ...none deleted
            assert r.spool.stats().batches_claimed == 10
            keys = r.faults.idempotency_keys
            assert len(keys) == len(set(keys)) == 10  # and none sent again meanwhile
            refusing.clear()  # room on the disk again
            assert wait_until(lambda: r.spool.stats().records == 0, timeout_s=10)
            # The workers are alive: new records go out too.
            r.spool.append(records(120)[100:])
            wake.set()
            assert wait_until(lambda: len(stored_sequences(r.db_path)) == 120, timeout_s=10)
        assert stored_sequences(r.db_path) == list(range(120))
        assert r.spool.stats().records == 0
        assert refused["record_attempt"] == 10
        errors = registry.get_sample_value("chrono_collector_spool_errors_total", LABELS)
        assert errors == refused["record_attempt"] + refused["ack"]  # each one counted
        delivered = registry.get_sample_value("chrono_collector_records_delivered_total",
                                              LABELS)
        assert delivered == 120  # once, when the deletion committed


def test_the_spool_gauges_follow_the_spool_during_a_long_retry_after(tmp_path: Path) -> None:
    registry = CollectorRegistry()

    def gauge(name: str) -> float | None:
        return registry.get_sample_value(f"chrono_collector_{name}", LABELS)

    with rig(tmp_path) as r:
        r.faults.respond(429, retry_after=600)
        r.spool.append(records(10))
        with workers(r, 1, batch_size=10, registry=registry) as (sender, _wake):
            assert wait_until(lambda: sender.failing, timeout_s=10)  # waiting out the 600 s
            r.spool.append(records(500)[10:])  # the parser goes on writing
            stats = r.spool.stats()
            assert stats.records == 500
            assert wait_until(lambda: gauge("spool_records") == 500, timeout_s=5)
            assert gauge("spool_bytes") == stats.payload_bytes
            assert gauge("spool_oldest_record_timestamp_seconds") == pytest.approx(
                (stats.oldest_record_ns or 0) / 1e9)
            assert r.faults.requests_seen == 1  # still the one 429


def feed(i: int) -> PriceFeed:
    return PriceFeed(symbol="BTC/USD", price=100.0 + i, volume=1.0, timestamp=iso_ago(60),
                     source="coinbase", worker_id="w",
                     metadata={"received_at": iso_ago(59), "sequence": i})


def test_a_full_spool_logs_its_drops_once_per_interval_and_counts_every_one(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="collectors.delivery")
    registry = CollectorRegistry()
    now = [1000.0]
    with Spool(tmp_path / "spool", max_bytes=4096, fsync_interval_s=0) as spool:
        writer = SpoolWriter(spool, Metrics(registry, "coinbase", "w"), threading.Event(),
                             clock=lambda: now[0])
        stop = threading.Event()

        def lines() -> list[logging.LogRecord]:
            return [rec for rec in caplog.records
                    if rec.getMessage() == "spool_full_dropped_oldest"]

        i = 0
        while not lines():  # until the spool is full
            assert writer.put_many_waiting([feed(i)], stop) == 0
            i += 1
            assert i < 1000
        for _ in range(200):  # 200 writes, each dropping, within 10 s: no line
            now[0] += 0.04
            writer.put_many_waiting([feed(i)], stop)
            i += 1
        assert len(lines()) == 1
        now[0] += 2.5  # 10 s after the first line: the next write logs what was dropped since
        writer.put_many_waiting([feed(i)], stop)
        dropped_total = spool.stats().dropped_total
    first, second = lines()
    assert first.dropped >= 1  # type: ignore[attr-defined]
    assert second.over_s == 10.5  # type: ignore[attr-defined]
    assert first.dropped + second.dropped == dropped_total  # type: ignore[attr-defined]
    counted = registry.get_sample_value("chrono_collector_spool_dropped_records_total", LABELS)
    assert counted == dropped_total >= 201


def test_the_last_drops_are_said_too_when_drops_stop_or_the_writer_stops(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The count since the last line was said only by a later drop: the last ones of an
    # outage never appeared in any line (2,905 of 17,915 records in a reviewer's run).
    caplog.set_level(logging.ERROR, logger="collectors.delivery")
    now = [1000.0]
    with Spool(tmp_path / "spool", max_bytes=4096, fsync_interval_s=0) as spool:
        writer = SpoolWriter(spool, Metrics(CollectorRegistry(), "coinbase", "w"),
                             threading.Event(), clock=lambda: now[0])
        stop = threading.Event()

        def said() -> list[int]:
            return [rec.dropped for rec in caplog.records  # type: ignore[attr-defined]
                    if rec.getMessage() == "spool_full_dropped_oldest"]

        i = 0
        while not said():  # until the spool is full: the first drop is said at once
            writer.put_many_waiting([feed(i)], stop)
            i += 1
        for _ in range(5):  # more drops within the interval: counted, not said yet
            now[0] += 1.0
            writer.put_many_waiting([feed(i)], stop)
            i += 1
        batch = spool.due_batch(1000, 0.0)  # delivery makes room: writes drop nothing now
        assert batch is not None and spool.ack(batch.key)
        now[0] += 6.0
        writer.put_many_waiting([feed(i)], stop)
        assert sum(said()) == spool.stats().dropped_total  # said once the interval was up
        assert [rec.reason for rec in caplog.records  # type: ignore[attr-defined]
                if rec.getMessage() == "spool_full_dropped_oldest"][-1] == "max_bytes"
        while spool.stats().dropped_total == sum(said()):  # full again: a drop not said yet
            i += 1
            writer.put_many_waiting([feed(i)], stop)
        writer.flush_log()  # the stop says what is left
        assert sum(said()) == spool.stats().dropped_total


def posts(r: Rig) -> list[tuple[str, int]]:
    """(status, records) of every POST so far, in order (one worker: one at a time)."""
    statuses = [s.status[:3] for s in sorted(r.timeline.requests, key=lambda s: s.start)]
    sizes = [body.count(b'"symbol"') for body in r.faults.bodies]
    return list(zip(statuses, sizes, strict=True))


def test_a_fixed_body_limit_costs_a_few_413s_not_every_other_post(tmp_path: Path) -> None:
    body_per_record = len(records(1)[0]) + 1
    limit = 60 * body_per_record  # about 60 records fit, 100 (the batch size) do not
    with rig(tmp_path, max_body_bytes=limit) as r:
        r.spool.append(records(3000))
        with workers(r, 1, batch_size=100):
            assert wait_until(lambda: r.spool.stats().records == 0, timeout_s=60)
        seen = posts(r)
        refused = [i for i, (status, _n) in enumerate(seen) if status == "413"]
        # A bisection between what was stored and what was refused finds the limit (the
        # records' sizes vary a little, so it may take a few more)...
        assert len(refused) <= 8, seen
        # ...and then every POST is stored (before: every other one was a 413, forever)...
        assert len(seen) - refused[-1] > 30, seen
        # ...in batches close to the limit.
        assert len(seen) <= 3000 // 50 + 15, seen
        assert stored_sequences(r.db_path) == list(range(3000))


def test_a_refused_size_is_tried_again_after_a_while_and_a_raised_limit_found(
        tmp_path: Path) -> None:
    body_per_record = len(records(1)[0]) + 1
    with rig(tmp_path, max_body_bytes=60 * body_per_record) as r:
        sent = records(20_000)
        r.spool.append(sent[:1000])
        with workers(r, 1, batch_size=100, refusal_memory_s=0.5) as (_sender, wake):
            assert wait_until(lambda: r.spool.stats().records == 0, timeout_s=30)
            assert max(n for status, n in posts(r) if status == "201") < 100
            r.faults.app.max_body_bytes = 8 * 1024 * 1024  # type: ignore[attr-defined]
            # Once the refusal is half a second old, a batch of the size refused is tried,
            # stored, and the cap grows back to the batch size.
            more = iter(range(1000, 20_000, 200))

            def full_batch_stored() -> bool:
                if ("201", 100) in posts(r):
                    return True
                start = next(more)
                r.spool.append(sent[start:start + 200])
                wake.set()
                return False

            assert wait_until(full_batch_stored, timeout_s=15, interval_s=0.02)


def test_an_api_saying_retry_at_once_gets_one_retry_line_per_interval(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # `503 Retry-After: 0` is obeyed (a 0.25 s floor): a warning per failure was four lines a
    # second for as long as the API kept answering so.
    registry = CollectorRegistry()
    with rig(tmp_path) as r:
        r.faults.respond(503, retry_after=0, times=6)
        r.spool.append(records(10))
        with caplog.at_level(logging.WARNING, logger="collectors.delivery"), \
                workers(r, 1, batch_size=10, registry=registry):
            assert r.faults.wait_for_completed(7, timeout_s=15)  # six 503s, then stored
        assert stored_sequences(r.db_path) == list(range(10))
    lines = [rec for rec in caplog.records if rec.getMessage() == "batch_retry"]
    assert len(lines) == 1 and lines[0].retries_since_last_log == 1  # type: ignore[attr-defined]
    assert registry.get_sample_value("chrono_collector_flush_failures_total",
                                     {**LABELS, "reason": "server_error"}) == 6


def _big_record() -> bytes:
    return encode(PriceFeed(symbol="BTC/USD", price=1.0, volume=1.0, timestamp=iso_ago(60),
                            source="coinbase", worker_id="w",
                            metadata={"received_at": iso_ago(59), "sequence": -1,
                                      "note": "x" * 200_000}))


def test_one_record_too_large_for_any_batch_does_not_pin_the_batch_size(
        tmp_path: Path) -> None:
    # The 413s on the way down to the one oversized record were its, not a batch size limit:
    # the bisection kept every batch at 2 records for 10 minutes after it was dead-lettered.
    normal = records(1600)
    with rig(tmp_path, max_body_bytes=150 * (len(normal[0]) + 1)) as r:
        r.spool.append([_big_record(), *normal])
        with workers(r, 1, batch_size=100):
            assert wait_until(lambda: r.spool.stats().records == 0, timeout_s=60)
        assert stored_sequences(r.db_path) == list(range(1600))
        assert (tmp_path / "spool" / "dead-letter.jsonl").read_text().count("\n") == 1
        statuses = [seen.status[:3] for seen in sorted(r.timeline.requests,
                                                       key=lambda seen: seen.start)]
        sizes = [body.count(b'"symbol"') for body in r.faults.bodies]
        last_413 = max(i for i, status in enumerate(statuses) if status == "413")
        assert max(sizes[last_413:]) == 100
        assert len(sizes) < 60  # not 800 batches of 2


def test_a_refused_batch_the_spool_cannot_set_aside_is_not_posted_back_to_back_at_stop(
        tmp_path: Path) -> None:
    # A 413 while the disk is full (the split fails): the batch is sent again after a pause.
    # Near the drain deadline the pause ended at once, and the batch went out again and again.
    with rig(tmp_path) as r:
        r.faults.respond(413, times=100_000)

        def split(*_a: object, **_k: object) -> tuple[int, int]:
            raise SpoolError("spool: split failed: database or disk is full")

        r.spool.split = split  # type: ignore[method-assign]
        r.spool.append(records(10))
        stop, writer_done, wake = threading.Event(), threading.Event(), threading.Event()
        poster = Poster(r.url, TEST_API_KEY, connect_timeout_s=2, read_timeout_s=10)
        sender = Sender(r.spool, [poster], Metrics(CollectorRegistry(), "coinbase", "w"),
                        batch_size=10, batch_interval_s=0.01, stop=stop,
                        writer_finished=writer_done, wake=wake, drain_timeout_s=0.9)
        thread = threading.Thread(target=sender.run, daemon=True)
        thread.start()
        try:
            assert r.faults.wait_for_requests(1, timeout_s=10)
            before = r.faults.requests_seen
            writer_done.set()
            stop.set()  # a 0.9 s drain window, within the 1 s pause
            thread.join(10)
            assert not thread.is_alive()
            assert r.faults.requests_seen - before <= 1
        finally:
            stop.set()
            sender.close()
            poster.close()


def test_a_scrape_answers_while_a_spool_operation_hangs_on_the_disk(tmp_path: Path) -> None:
    # The spool gauges are read at scrape time: a spool operation stuck on a stalled disk
    # (holding the spool's locks) made every scrape of /metrics hang with it.
    disk_hung, release = threading.Event(), threading.Event()
    registry = CollectorRegistry()
    with rig(tmp_path) as r:
        real = r.spool._write_dead_letter

        def hung(*args: object, **kwargs: object) -> None:  # under both of the spool's locks
            disk_hung.set()
            release.wait(30)
            real(*args, **kwargs)  # type: ignore[arg-type]

        r.spool._write_dead_letter = hung  # type: ignore[method-assign]
        r.faults.respond(400)  # the batch is dead-lettered
        server = MetricsServer(registry, lambda: Health(True, {}), "127.0.0.1", 0)
        server.start()
        try:
            with workers(r, 1, batch_size=10, registry=registry) as (sender, wake):
                r.spool.append(records(10))
                wake.set()
                assert disk_hung.wait(10)
                sender._gauges_at = float("-inf")  # the snapshot is older than a second
                url = f"http://127.0.0.1:{server.port}/metrics"
                with urllib.request.urlopen(url, timeout=3) as resp:
                    assert b"chrono_collector_spool_records" in resp.read()
                release.set()
        finally:
            release.set()
            server.stop()
