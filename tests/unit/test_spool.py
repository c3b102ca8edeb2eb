"""Tests of the durable spool on real files: batches, full policy, threads, kill -9, damage."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import collectors
from collectors.errors import SpoolError
from collectors.spool import DEAD_LETTER_NAME, DISK_RESERVE_BYTES, PAGE_SIZE, Batch, Spool
from tests.support.waiting import wait_until

REPO_ROOT = Path(collectors.__file__).resolve().parents[1]
T0 = 1_764_403_200_000_000_000  # 2025-11-29T08:00:00Z
SECOND = 1_000_000_000
PAGE = PAGE_SIZE  # a new spool's page size


class FakeClock:
    def __init__(self, now_ns: int = T0) -> None:
        self.now_ns = now_ns

    def __call__(self) -> int:
        return self.now_ns

    def advance(self, seconds: float) -> None:
        self.now_ns += int(seconds * SECOND)


def rec(n: int, pad: int = 100) -> bytes:
    """A compact JSON record; the same size for every n below 10**6 (the pad absorbs digits)."""
    body = {"n": n, "symbol": "BTC/USD", "pad": "x" * (pad - len(str(n)))}
    return json.dumps(body, separators=(",", ":")).encode()


def numbers(records: tuple[bytes, ...] | list[bytes]) -> list[int]:
    return [int(json.loads(r)["n"]) for r in records]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def spool(spool_dir: Path, clock: FakeClock) -> Iterator[Spool]:
    s = Spool(spool_dir, clock_ns=clock)
    yield s
    s.close()


def drain_all(spool: Spool) -> list[bytes]:
    out: list[bytes] = []
    while (batch := spool.due_batch(1000, 0.0, force=True)) is not None:
        out.extend(batch.records)
        assert spool.ack(batch.key) == len(batch.records)
    return out


# ---------------------------------------------------------------------- basics


def test_round_trip_keeps_bytes_and_order(spool: Spool, clock: FakeClock) -> None:
    records = [rec(i) for i in range(10)] + [b'{"odd":"\\u00e9 \xc3\xa9"}']
    assert spool.append(records) == 0
    stats = spool.stats()
    assert (stats.records, stats.payload_bytes) == (11, sum(len(r) for r in records))
    assert stats.oldest_record_ns == T0
    batch = spool.due_batch(100, 0.0, force=True)
    assert batch is not None
    assert batch.records == tuple(records)
    assert batch.body() == b'{"feeds":[' + b",".join(records) + b"]}"
    assert json.loads(batch.body())["feeds"][0] == json.loads(records[0])
    assert (batch.attempts, batch.created_ns, len(batch.key), batch.size) == (0, T0, 32, 11)
    assert spool.ack(batch.key) == 11
    assert spool.ack(batch.key) == 0  # idempotent
    stats = spool.stats()
    assert (stats.records, stats.payload_bytes, stats.batches_claimed) == (0, 0, 0)
    assert stats.oldest_record_ns is None
    assert spool.due_batch(100, 0.0, force=True) is None


def test_empty_append_is_a_no_op(spool: Spool) -> None:
    assert spool.append([]) == 0
    assert spool.stats().records == 0


def test_claim_by_size(spool: Spool) -> None:
    spool.append([rec(i) for i in range(4)])
    assert spool.due_batch(5, 3600.0) is None  # 4 < 5 and young
    spool.append([rec(i) for i in range(4, 12)])
    batch = spool.due_batch(5, 3600.0)
    assert batch is not None
    assert numbers(batch.records) == [0, 1, 2, 3, 4]
    assert spool.stats().claimed_records == 5


def test_claim_by_age_uses_the_injected_clock(spool: Spool, clock: FakeClock) -> None:
    spool.append([rec(0), rec(1)])
    clock.advance(3)
    spool.append([rec(2)])
    clock.advance(6.999)
    assert spool.due_batch(100, 10.0) is None  # oldest is 9.999 s old
    clock.advance(0.001)
    batch = spool.due_batch(100, 10.0)
    assert batch is not None
    assert numbers(batch.records) == [0, 1, 2]
    assert batch.created_ns == T0


def test_force_claims_whatever_waits(spool: Spool) -> None:
    assert spool.due_batch(100, 3600.0, force=True) is None  # nothing waits
    spool.append([rec(0)])
    assert spool.due_batch(100, 3600.0) is None
    batch = spool.due_batch(100, 3600.0, force=True)
    assert batch is not None and numbers(batch.records) == [0]


def test_claimed_batch_comes_first_until_acked(spool: Spool) -> None:
    spool.append([rec(i) for i in range(10)])
    first = spool.due_batch(4, 0.0)
    assert first is not None
    spool.record_attempt(first.key)
    spool.record_attempt(first.key)
    again = spool.due_batch(4, 0.0)
    assert again is not None
    assert (again.key, again.records, again.attempts) == (first.key, first.records, 2)
    assert spool.due_batch(1, 0.0) == again  # a different max_records does not matter
    assert spool.ack(first.key) == 4
    second = spool.due_batch(4, 0.0)
    assert second is not None and second.key != first.key
    assert numbers(second.records) == [4, 5, 6, 7]  # claimed in record order


def test_record_attempt_on_unknown_key_raises(spool: Spool) -> None:
    with pytest.raises(SpoolError, match="no claimed batch"):
        spool.record_attempt("nope")
    assert spool.dead_letter("nope", 422, "x") == 0


def test_invalid_arguments(spool_dir: Path, spool: Spool) -> None:
    with pytest.raises(ValueError, match="max_records"):
        spool.due_batch(0, 1.0)
    with pytest.raises(ValueError, match="max_bytes"):
        Spool(spool_dir / "other", max_bytes=0)
    with pytest.raises(ValueError, match="fsync_interval_s"):
        Spool(spool_dir / "other", fsync_interval_s=-1)


def test_claimed_batch_survives_reopen(spool_dir: Path, clock: FakeClock) -> None:
    with Spool(spool_dir, clock_ns=clock) as spool:
        spool.append([rec(i) for i in range(7)])
        clock.advance(1)
        spool.append([rec(i) for i in range(7, 9)])
        batch = spool.due_batch(8, 0.0)
        assert batch is not None
        spool.record_attempt(batch.key)
    with Spool(spool_dir, clock_ns=clock) as spool:
        again = spool.due_batch(3, 0.0, force=True)
        assert again is not None
        assert again.key == batch.key
        assert again.records == batch.records
        assert again.body() == batch.body()
        assert (again.size, again.created_ns) == (8, T0)
        assert again.attempts == 1
        stats = spool.stats()
        assert (stats.records, stats.claimed_records, stats.batches_claimed) == (9, 8, 1)
        assert spool.ack(again.key) == 8
        rest = spool.due_batch(3, 0.0, force=True)
        assert rest is not None and numbers(rest.records) == [8]


def test_dead_letter_writes_one_json_line(spool_dir: Path, spool: Spool, clock: FakeClock) -> None:
    spool.append([rec(1), rec(2)])
    batch = spool.due_batch(10, 0.0, force=True)
    assert batch is not None
    clock.advance(1.5)
    assert spool.dead_letter(batch.key, 422, 'record 1: price must be > 0 "quoted"') == 2
    spool.append([rec(3)])
    second = spool.due_batch(10, 0.0, force=True)
    assert second is not None
    assert spool.dead_letter(second.key, 400, "bad") == 1
    path = spool_dir / DEAD_LETTER_NAME
    lines = path.read_bytes().splitlines()
    assert len(lines) == 2
    entry = json.loads(lines[0])
    assert entry == {
        "dead_lettered_at": "2025-11-29T08:00:01.500000Z",
        "idempotency_key": batch.key,
        "status": 422,
        "reason": 'record 1: price must be > 0 "quoted"',
        "feeds": [json.loads(rec(1)), json.loads(rec(2))],
    }
    assert json.loads(lines[1])["feeds"] == [json.loads(rec(3))]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    stats = spool.stats()
    assert (stats.records, stats.batches_claimed) == (0, 0)


def test_dead_letter_file_is_rotated_at_its_bound(
    spool_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = spool_dir / DEAD_LETTER_NAME
    rotated = spool_dir / (DEAD_LETTER_NAME + ".1")

    def dead_letter_one(spool: Spool, n: int) -> None:
        spool.append([rec(n, pad=400)])
        batch = spool.due_batch(10, 0.0, force=True)
        assert batch is not None
        assert spool.dead_letter(batch.key, 422, "bad") == 1

    caplog.set_level(logging.WARNING, logger="collectors.spool")
    with Spool(spool_dir, dead_letter_max_bytes=1500) as spool:
        for n in range(3):  # about 600 bytes a line: two fit, the third rotates
            dead_letter_one(spool, n)
        assert [numbers_of_lines(rotated), numbers_of_lines(path)] == [[0, 1], [2]]
        for n in range(3, 5):
            dead_letter_one(spool, n)
        # The older file is replaced: at most two files, each under the bound.
        assert [numbers_of_lines(rotated), numbers_of_lines(path)] == [[2, 3], [4]]
        assert rotated.stat().st_size <= 1500 and path.stat().st_size <= 1500
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    events = [r for r in caplog.records if r.getMessage() == "dead_letter_rotated"]
    assert len(events) == 2 and getattr(events[0], "rotated_to") == str(rotated)


def numbers_of_lines(path: Path) -> list[int]:
    return [int(feed["n"]) for line in path.read_bytes().splitlines()
            for feed in json.loads(line)["feeds"]]


def test_dead_letter_keeps_a_non_json_record_as_a_string(spool_dir: Path, spool: Spool) -> None:
    spool.append([b"not json", b'{"a":\r1}', rec(1)])
    batch = spool.due_batch(10, 0.0, force=True)
    assert batch is not None
    assert spool.dead_letter(batch.key, 400, "bad") == 3
    (line,) = (spool_dir / DEAD_LETTER_NAME).read_bytes().splitlines()  # still one line
    assert json.loads(line)["feeds"] == ["not json", '{"a":\r1}', json.loads(rec(1))]


def test_a_record_with_a_newline_is_refused_and_nothing_is_stored(spool: Spool) -> None:
    # Records are compact JSON, which never holds a raw newline: the spool's row framing.
    with pytest.raises(ValueError, match="newline"):
        spool.append([rec(1), b'{"a":\n1}'])
    assert spool.stats().records == 0
    spool.append([rec(2)])
    assert numbers(drain_all(spool)) == [2]


def test_directory_is_created_private(spool_dir: Path, spool: Spool) -> None:
    assert stat.S_IMODE(spool_dir.stat().st_mode) == 0o700
    assert spool.stats().file_bytes > 0


def test_closed_spool_refuses_calls(spool_dir: Path) -> None:
    spool = Spool(spool_dir)
    spool.close()
    spool.close()  # idempotent
    with pytest.raises(SpoolError, match="closed"):
        spool.append([rec(1)])
    with pytest.raises(SpoolError, match="closed"):
        spool.due_batch(1, 0.0)


def test_the_fsync_thread_checkpoints_the_wal_off_the_writers_path(spool_dir: Path) -> None:
    """Ten MiB of records: over twice the spool-fsync thread's threshold (about 1,000 pages,
    so at least 7 MB are copied back whatever the appends made meanwhile), under the writers'
    automatic checkpoint; SQLite's default would have run it in an append."""
    db = spool_dir / "spool.db"
    with Spool(spool_dir, fsync_interval_s=0.05) as spool:
        start = db.stat().st_size
        for i in range(100):
            spool.append([rec(i * 100 + j, pad=1000) for j in range(100)])
        assert wait_until(lambda: db.stat().st_size >= start + 6_000_000, timeout_s=10), (
            f"spool.db still {db.stat().st_size} bytes: the WAL was not checkpointed")
        # the writers' connections checkpoint only as a backstop
        for conn in (spool._append_conn, spool._conn):
            assert conn is not None
            assert conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 4000
    with Spool(spool_dir / "full", fsync_interval_s=0) as spool:
        assert spool._append_conn is not None
        assert spool._append_conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000


def test_thread_init_runs_first_on_the_fsync_thread(spool_dir: Path) -> None:
    ran = threading.Event()
    names: list[str] = []

    def init() -> None:
        names.append(threading.current_thread().name)
        ran.set()

    with Spool(spool_dir, fsync_interval_s=0.05, thread_init=init):
        assert ran.wait(10)
    assert names == ["spool-fsync"]


def test_a_failing_thread_init_leaves_the_fsync_thread_working(
        spool_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    def init() -> None:
        raise OSError("no prctl here")

    with caplog.at_level(logging.ERROR, logger="collectors.spool"), Spool(
            spool_dir, fsync_interval_s=0.02, thread_init=init) as spool:
        spool.append([rec(1)])
        assert wait_until(lambda: spool._synced_gen == spool._commit_gen, timeout_s=10)
    assert [r.getMessage() for r in caplog.records] == ["spool_thread_init_failed"]


def test_fsync_thread_runs_only_with_an_interval(spool_dir: Path) -> None:
    def fsync_threads() -> int:
        return sum(t.name == "spool-fsync" for t in threading.enumerate())

    before = fsync_threads()
    with Spool(spool_dir / "a", fsync_interval_s=0.05) as spool:
        assert fsync_threads() == before + 1
        spool.append([rec(1)])
        spool.sync()
    assert fsync_threads() == before
    with Spool(spool_dir / "b", fsync_interval_s=0) as spool:
        assert fsync_threads() == before
        spool.append([rec(1)])
        assert numbers(drain_all(spool)) == [1]


def test_fsync_thread_sleeps_until_a_commit_then_syncs_it(spool_dir: Path) -> None:
    synced = threading.Event()
    with Spool(spool_dir, fsync_interval_s=0.02) as spool:
        real_sync = spool._sync_wal

        def sync() -> None:
            real_sync()
            synced.set()

        spool._sync_wal = sync  # type: ignore[method-assign]
        assert not synced.wait(0.3)  # nothing committed: nothing to sync, no wake-ups
        spool.append([rec(1)])
        assert synced.wait(10)
        assert spool._synced_gen == spool._commit_gen  # that commit is on stable storage
        synced.clear()
        assert not synced.wait(0.3)  # and it goes back to sleep


def test_batch_body_is_deterministic() -> None:
    batch = Batch.of("k", [b'{"a":1}', b'{"b":2}'], 0, T0)
    assert batch.body() == b'{"feeds":[{"a":1},{"b":2}]}'
    assert batch.records == (b'{"a":1}', b'{"b":2}') and batch.size == 2
    assert Batch.of("k", []).body() == b'{"feeds":[]}' and Batch.of("k", []).records == ()


# ---------------------------------------------------------------------- full policy


def test_full_drops_oldest_waiting(spool_dir: Path) -> None:
    size = len(rec(0))
    with Spool(spool_dir, max_bytes=10 * size) as spool:
        assert spool.append([rec(i) for i in range(8)]) == 0
        assert spool.append([rec(i) for i in range(8, 12)]) == 2
        stats = spool.stats()
        assert (stats.records, stats.payload_bytes, stats.dropped_total) == (10, 10 * size, 2)
        assert numbers(drain_all(spool)) == list(range(2, 12))


class FakeDisk:
    """The spool's file system as `disk_space` reports it: `free` of `size` bytes."""

    def __init__(self, free: int, size: int = 1024 * 1024 * 1024) -> None:
        self.free, self.size = free, size

    def __call__(self, _directory: Path) -> tuple[int, int]:
        return self.free, self.size


def test_a_disk_short_of_its_reserve_holds_the_spool_at_its_size(spool_dir: Path) -> None:
    # A spool that filled its disk could never empty itself: deleting a delivered batch and
    # checkpointing both need room to write, so every acknowledgement failed (SQLITE_FULL) and
    # delivery stopped for good. It now stops growing short of the reserve: new records take
    # the oldest waiting ones' place, and claims and acks go on.
    def big(n: int) -> bytes:
        return rec(n, pad=10_000)

    size = len(big(0))
    held = 1000  # 10 MB: more than the least the spool may hold (a quarter of the reserve)
    # (near the reserve once these are written: from then on every write reads the space)
    disk = FakeDisk(free=2 * DISK_RESERVE_BYTES + held * size)
    with Spool(spool_dir, disk_space=disk) as spool:
        assert spool.append([big(i) for i in range(held)]) == 0
        assert spool.last_drop_reason is None
        disk.free = DISK_RESERVE_BYTES - 1  # others write to the disk too
        assert spool.append([big(i) for i in range(held, held + 10)]) == 10
        assert spool.last_drop_reason == "disk_reserve"
        assert spool.stats().payload_bytes == held * size  # no more than it held then
        batch = spool.due_batch(30, 0.0)
        assert batch is not None and numbers(batch.records) == list(range(10, 40))
        assert spool.ack(batch.key) == 30
        assert spool.append([big(i) for i in range(held + 10, held + 40)]) == 0  # acked room
        disk.free = 4 * DISK_RESERVE_BYTES  # room again (twice the reserve): it may grow
        assert spool.append([big(i) for i in range(held + 40, held + 140)]) == 0
        assert spool.stats().records == held + 100
        assert numbers(drain_all(spool)) == list(range(40, held + 140))
        assert spool.stats().dropped_total == 10


def test_a_file_system_that_says_no_size_is_unknown_not_full(
        spool_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # ramfs and some FUSE file systems report 0 blocks: that read as a full disk with no
    # reserve, and every record was dropped for good (and a checkpoint ran on every commit).
    real = os.statvfs

    def no_size(path: object) -> os.statvfs_result:
        st = real(path)  # type: ignore[arg-type]
        return os.statvfs_result((st.f_bsize, st.f_frsize, 0, 0, 0, st.f_files, st.f_ffree,
                                  st.f_favail, st.f_flag, st.f_namemax))

    monkeypatch.setattr(os, "statvfs", no_size)
    with Spool(spool_dir) as spool:
        for i in range(0, 50, 10):
            assert spool.append([rec(n) for n in range(i, i + 10)]) == 0
        assert spool.stats().records == 50


def test_a_drained_backlogs_free_pages_are_used_before_anything_is_dropped(
        spool_dir: Path) -> None:
    # The hold counted only the records held: a backlog drained to a few records left its
    # pages free in the file, and new records were dropped that would have taken no more disk.
    def big(n: int) -> bytes:
        return rec(n, pad=10_000)

    # (near the reserve once these are written: from then on every write reads the space)
    disk = FakeDisk(free=2 * DISK_RESERVE_BYTES + 50_000_000)
    with Spool(spool_dir, disk_space=disk) as spool:
        assert spool.append([big(i) for i in range(3000)]) == 0  # 30 MB
        for _ in range(20):  # delivered (10 MB stay: no vacuum step yet): pages free in the file
            batch = spool.due_batch(100, 0.0)
            assert batch is not None and spool.ack(batch.key) == 100
        disk.free = DISK_RESERVE_BYTES - 1
        assert spool.append([big(i) for i in range(3000, 4000)]) == 0  # into the free pages
        assert spool.last_drop_reason is None


def test_a_first_open_that_fails_on_a_full_disk_leaves_no_empty_database(
        spool_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # SQLite creates spool.db before the first write fails; the empty file read as a damaged
    # spool at the next try (set aside, one lost record counted, on every retry).
    real = Spool._connect

    def full_disk(self: Spool, path: Path) -> sqlite3.Connection:
        sqlite3.connect(path).close()  # the file SQLite makes before its first write
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(Spool, "_connect", full_disk)
    with pytest.raises(SpoolError, match="disk is full"):
        Spool(spool_dir)
    assert not (spool_dir / "spool.db").exists()
    monkeypatch.setattr(Spool, "_connect", real)
    with Spool(spool_dir) as spool:  # space again
        assert spool.stats().corrupt_lost_total == 0
    assert not [p for p in spool_dir.iterdir() if ".corrupt-" in p.name]


def test_a_small_disk_keeps_a_quarter_of_itself(spool_dir: Path) -> None:
    size = len(rec(0))
    disk = FakeDisk(free=4 * 1024 * 1024 + 40 * size, size=16 * 1024 * 1024)  # reserve 4 MiB
    with Spool(spool_dir, disk_space=disk) as spool:
        assert spool.append([rec(i) for i in range(15)]) == 0
        disk.free = 1024 * 1024
        # At least a quarter of the reserve (1 MiB) stays usable: a spool nearly empty when
        # others filled the disk still takes records.
        assert spool.append([rec(i) for i in range(15, 30)]) == 0
        assert spool.last_drop_reason is None


def test_full_never_drops_claimed_records(spool_dir: Path) -> None:
    size = len(rec(0))
    with Spool(spool_dir, max_bytes=10 * size) as spool:
        spool.append([rec(i) for i in range(10)])
        claimed = spool.due_batch(6, 0.0)
        assert claimed is not None and numbers(claimed.records) == [0, 1, 2, 3, 4, 5]
        assert spool.append([rec(i) for i in range(10, 13)]) == 3  # drops 6, 7, 8
        assert spool.append([rec(i) for i in range(13, 20)]) == 7  # 9..12 and 13..15
        assert spool.due_batch(100, 0.0) == claimed
        assert spool.ack(claimed.key) == 6
        assert numbers(drain_all(spool)) == [16, 17, 18, 19]
        assert spool.stats().dropped_total == 10


def test_claim_rereads_rows_the_full_policy_dropped_while_it_read_them(
        spool_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A claim reads the waiting rows before it takes the write lock; an append that drops
    # some of them in between must not see them resurrected in the batch.
    size = len(rec(0))
    with Spool(spool_dir, max_bytes=10 * size, chunk_records=2) as spool:
        spool.append([rec(i) for i in range(10)])
    with Spool(spool_dir, max_bytes=10 * size, chunk_records=2) as spool:
        # Reopened with records waiting: claims read them from the database.
        read_chunks = spool._read_chunks
        calls = 0

        def read_then_append(*args: object) -> object:
            nonlocal calls
            calls += 1
            read = read_chunks(*args)  # type: ignore[arg-type]
            if calls == 1:
                assert spool.append([rec(i) for i in range(10, 13)]) == 3  # drops 0, 1, 2
            return read

        monkeypatch.setattr(spool, "_read_chunks", read_then_append)
        batch = spool.due_batch(4, 0.0)
        assert calls == 2  # read again under the lock
        assert batch is not None and numbers(batch.records) == [3, 4, 5, 6]
        stats = spool.stats()
        assert (stats.records, stats.claimed_records, stats.dropped_total) == (10, 4, 3)
        assert spool.ack(batch.key) == 4
        assert numbers(drain_all(spool)) == [7, 8, 9, 10, 11, 12]


def waiting_reads(spool: Spool) -> list[str]:
    """Start recording the statements that read waiting rows' payloads on the delivery
    connection (what a claim from the database runs)."""
    seen: list[str] = []
    assert spool._conn is not None
    spool._conn.set_trace_callback(
        lambda sql: seen.append(sql) if "crc32, crcs, payload FROM chunks" in sql else None)
    return seen


def test_claims_take_their_rows_from_memory_unless_a_backlog_built_up(
        spool_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("collectors.spool._RECENT_MAX_BYTES", 20 * len(rec(0)))
    with Spool(spool_dir, chunk_records=3) as spool:
        reads = waiting_reads(spool)

        def claim(max_records: int) -> list[int]:
            batch = spool.due_batch(max_records, 0.0)
            assert batch is not None and batch.fresh
            assert spool.ack(batch.key) == batch.size
            return numbers(batch.records)

        spool.append([rec(i) for i in range(5)])
        assert claim(4) == [0, 1, 2, 3]  # cuts a row in two: memory keeps the rest
        spool.append([rec(5)])
        assert claim(10) == [4, 5]
        assert reads == []
        spool.append([rec(i) for i in range(6, 30)])  # a backlog past the memory bound
        assert claim(10) == list(range(6, 16))
        assert len(reads) == 1  # read from the database
        assert claim(10) == list(range(16, 26))
        assert claim(10) == list(range(26, 30))  # ...until nothing waits
        reads.clear()
        spool.append([rec(30), rec(31)])
        assert claim(10) == [30, 31]
        assert reads == []  # from memory again
        assert spool.stats().records == 0


def test_records_put_back_are_claimed_from_the_database(spool_dir: Path) -> None:
    with Spool(spool_dir) as spool:
        reads = waiting_reads(spool)
        spool.append([rec(i) for i in range(6)])
        batch = spool.due_batch(4, 0.0)
        assert batch is not None
        spool.append([rec(6)])
        assert spool.release(batch.key) == 4  # in front again, behind memory's back
        again = spool.due_batch(10, 0.0)
        assert again is not None and numbers(again.records) == list(range(7))
        assert len(reads) == 1


def test_claimed_batches_filling_the_bound_drop_incoming(spool_dir: Path) -> None:
    size = len(rec(0))
    with Spool(spool_dir, max_bytes=4 * size) as spool:
        spool.append([rec(i) for i in range(4)])
        claimed = spool.due_batch(4, 0.0)
        assert claimed is not None
        assert spool.append([rec(4), rec(5)]) == 2
        assert spool.stats().records == 4
        assert spool.due_batch(9, 0.0) == claimed


def test_single_append_larger_than_the_bound_keeps_the_newest(spool_dir: Path) -> None:
    size = len(rec(0))
    with Spool(spool_dir, max_bytes=3 * size + size // 2) as spool:
        spool.append([rec(100)])
        assert spool.append([rec(i) for i in range(10)]) == 8  # rec(100) and 0..6
        assert numbers(drain_all(spool)) == [7, 8, 9]
        assert spool.append([rec(1, pad=10 * size)]) == 1  # one record bigger than the bound
        assert spool.stats().records == 0


# ---------------------------------------------------------------------- threads and crashes


def test_concurrent_append_and_drain_lose_and_duplicate_nothing(spool_dir: Path) -> None:
    total = 30_000
    expected = [rec(i, pad=20) for i in range(total)]
    delivered: list[bytes] = []
    failures: list[BaseException] = []
    done = threading.Event()
    with Spool(spool_dir, fsync_interval_s=0.01) as spool:

        def writer() -> None:
            try:
                for start in range(0, total, 100):
                    spool.append(expected[start : start + 100])
            except BaseException as exc:  # reported by the main thread
                failures.append(exc)
            finally:
                done.set()

        def drainer() -> None:
            try:
                while True:
                    finished = done.is_set()  # read first: then a forced claim sees everything
                    batch = spool.due_batch(250, 0.0, force=finished)
                    if batch is None:
                        if finished:
                            return
                        continue
                    delivered.extend(batch.records)
                    assert spool.ack(batch.key) == len(batch.records)
            except BaseException as exc:
                failures.append(exc)

        threads = [
            threading.Thread(target=writer, name="spool-writer"),
            threading.Thread(target=drainer, name="delivery"),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads)
        assert failures == []
        assert spool.stats().records == 0
    assert len(delivered) == total
    assert set(delivered) == set(expected)
    assert delivered == expected  # and in order


KILL_CHILD = """
import hashlib, json, sys
from pathlib import Path
from collectors.spool import Spool

spool = Spool(Path(sys.argv[1]), fsync_interval_s=1.0)
spool.append([b'{"n":-2}', b'{"n":-1}'])
batch = spool.due_batch(10, 0.0, force=True)
spool.record_attempt(batch.key)
print("claimed", batch.key, hashlib.sha256(batch.body()).hexdigest(), flush=True)
n = 0
while True:
    spool.append([json.dumps({"n": n + i, "pad": "x" * 300}).encode() for i in range(50)])
    n += 50
    print("committed", n, flush=True)
"""


def test_kill_minus_9_loses_no_committed_record(spool_dir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_CHILD, str(spool_dir)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    try:
        claimed = proc.stdout.readline().split()
        assert claimed[0] == "claimed", claimed
        committed = 0
        while committed < 20_000:
            line = proc.stdout.readline()
            assert line, "the child died on its own"
            committed = int(line.split()[1])
        proc.send_signal(signal.SIGKILL)  # mid-loop, wherever it is
        proc.wait(timeout=30)
        for line in proc.stdout:  # lines printed before the kill but not read yet
            if line.endswith("\n"):  # (the kill may cut the last one short)
                committed = max(committed, int(line.split()[1]))
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL

    with Spool(spool_dir) as spool:
        batch = spool.due_batch(1000, 0.0, force=True)
        assert batch is not None
        assert (batch.key, hashlib.sha256(batch.body()).hexdigest()) == (claimed[1], claimed[2])
        assert batch.attempts == 1
        assert numbers(batch.records) == [-2, -1]
        spool.ack(batch.key)
        found = numbers(drain_all(spool))
        assert spool.stats().corrupt_lost_total == 0
    assert len(found) >= committed  # anything after the last printed line may be there too
    assert found == list(range(len(found)))  # nothing lost, duplicated or reordered


# ---------------------------------------------------------------------- damaged files


def build_spool(directory: Path, n: int = 3000, claim: int = 50) -> Batch:
    """A closed spool of records 0..n-1, checkpointed into spool.db; the first `claim` claimed."""
    with Spool(directory) as spool:
        for start in range(0, n, 100):
            spool.append([rec(i) for i in range(start, min(n, start + 100))])
        batch = spool.due_batch(claim, 0.0)
        assert batch is not None
    assert not (directory / "spool.db-wal").exists()
    return batch


def build_spool_in_wal(directory: Path, n: int = 3000) -> None:
    """A spool killed before any checkpoint: the records live only in spool.db-wal."""
    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from collectors.spool import Spool\n"
        "s = Spool(Path(sys.argv[1]))\n"
        f"for i in range(0, {n}, 100):\n"
        "    s.append([('{\"n\":%d,\"pad\":\"' % j + 'x' * 100 + '\"}').encode()"
        " for j in range(i, i + 100)])\n"
        "os._exit(0)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run([sys.executable, "-c", code, str(directory)], check=True, env=env, timeout=60)
    assert (directory / "spool.db-wal").stat().st_size > 100 * PAGE


def corrupt_events(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    """The `spool_corrupt` log records, as dicts of their attributes (the `extra` data)."""
    return [
        dict(r.__dict__)
        for r in caplog.records
        if r.name == "collectors.spool" and r.getMessage() == "spool_corrupt"
    ]


def aside_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".corrupt-" in p.name)


def reopen_and_read(directory: Path) -> tuple[list[int], int, Batch | None]:
    """(numbers of every record, corrupt_lost_total, the claimed batch if any)."""
    with Spool(directory) as spool:
        lost = spool.stats().corrupt_lost_total
        batch = spool.due_batch(10_000, 0.0, force=True)
        found: list[int] = []
        if batch is not None:
            found += numbers(batch.records)
            spool.ack(batch.key)
        found += numbers(drain_all(spool))
    return found, lost, batch


def test_garbage_pages_salvage_the_readable_records(
    spool_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="collectors.spool")
    claimed = build_spool(spool_dir)
    db = spool_dir / "spool.db"
    with db.open("r+b") as f:
        f.seek(30 * PAGE)
        f.write(b"\xa5" * (3 * PAGE))  # three pages of garbage in the middle
    found, lost, batch = reopen_and_read(spool_dir)
    assert lost > 0
    assert len(found) + lost == 3000  # every record is either salvaged or counted lost
    assert found == sorted(found) and len(set(found)) == len(found)
    assert set(found) <= set(range(3000))
    assert batch is not None and batch.key == claimed.key  # the intact claimed batch kept its key
    assert batch.body() == claimed.body()
    events = corrupt_events(caplog)
    assert len(events) == 1
    event = events[0]
    assert event["levelno"] == logging.ERROR
    assert (event["salvaged_records"], event["lost_records"]) == (len(found), lost)
    assert event["lost_unknown"] is False
    assert aside_files(spool_dir) == [Path(str(event["moved_to"])).name]


def test_garbage_pages_in_a_claimed_batch_lose_only_what_they_cover(
    spool_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A claimed batch refers to the rows of its records (appends of 100 here): garbage in a
    # page of one damages records of that row only; the batch's other records are sent under
    # a new key (its body changed), before the records that waited.
    caplog.set_level(logging.ERROR, logger="collectors.spool")
    claimed = build_spool(spool_dir, claim=1000)
    with (spool_dir / "spool.db").open("r+b") as f:
        f.seek(12 * PAGE)
        f.write(b"\x5a" * PAGE)  # one page inside the claimed batch's records
    found, lost, batch = reopen_and_read(spool_dir)
    missing = sorted(set(range(3000)) - set(found))
    assert 0 < lost == len(missing) <= 100  # at most the row under the page, each counted
    assert missing == list(range(missing[0], missing[0] + lost)) and missing[-1] < 1000
    assert found == sorted(found) and len(set(found)) == len(found)
    assert batch is not None and batch.key != claimed.key and batch.size == 1000 - lost
    (event,) = corrupt_events(caplog)
    assert (event["lost_records"], event["lost_unknown"]) == (lost, False)


def test_bit_rot_in_a_claimed_batch_sends_the_rest_under_a_new_key(
    spool_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="collectors.spool")
    claimed = build_spool(spool_dir, n=300, claim=100)  # the batch is the first row
    members = list(claimed.records)
    members[7] = members[7].replace(b'"n":7', b'"n":8')  # damage SQLite cannot see
    conn = sqlite3.connect(spool_dir / "spool.db")
    try:
        with conn:
            conn.execute("UPDATE chunks SET payload = ? WHERE id = 1", (b"\n".join(members),))
    finally:
        conn.close()
    with Spool(spool_dir) as spool:
        batch = spool.due_batch(1000, 0.0)
        assert batch is not None and batch.key != claimed.key  # its body changed: new key
        assert numbers(batch.records) == [n for n in range(100) if n != 7]
        stats = spool.stats()
        assert (stats.records, stats.corrupt_lost_total) == (299, 1)
        spool.ack(batch.key)
        assert numbers(drain_all(spool)) == list(range(100, 300))
    line = json.loads((spool_dir / DEAD_LETTER_NAME).read_text())
    assert line["idempotency_key"] == claimed.key and line["feeds"] == [json.loads(members[7])]
    events = corrupt_events(caplog)
    assert [(e["lost_records"], e["records_waiting_again"]) for e in events] == [(1, 99)]


# Seeds 100, 142, 178 and 212 over-counted with the first salvage of chunked rows, which
# trusted a size read from a damaged row.
@pytest.mark.parametrize("seed", [*range(24), 100, 142, 178, 212])
def test_a_torn_page_never_counts_more_records_than_were_there(
    spool_dir: Path, seed: int
) -> None:
    # The collector's shape at a low rate: many small rows, one claimed batch, a torn page
    # anywhere. Salvaged + counted lost never exceeds what was stored (no double count).
    rng = random.Random(seed)
    total = 0
    with Spool(spool_dir) as spool:
        while total < 1500:
            n = rng.randint(1, 6)
            spool.append([rec(i) for i in range(total, total + n)])
            total += n
        assert spool.due_batch(100, 0.0) is not None
    db = spool_dir / "spool.db"
    size = db.stat().st_size
    with db.open("r+b") as f:
        f.seek(size // 2 if seed % 2 else rng.randrange(PAGE, size - PAGE))
        f.write(rng.randbytes(PAGE))
    found, lost, _ = reopen_and_read(spool_dir)
    assert set(found) <= set(range(total)) and len(set(found)) == len(found)
    assert len(found) + lost <= total


def test_garbage_header_is_moved_aside_and_the_spool_starts_afresh(
    spool_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="collectors.spool")
    build_spool(spool_dir)
    db = spool_dir / "spool.db"
    original_size = db.stat().st_size
    with db.open("r+b") as f:
        f.write(os.urandom(100))
    found, lost, _ = reopen_and_read(spool_dir)
    # How many records the header hid cannot be told: counted as one (a lower bound), so the
    # metric moves and the RecordsDropped alert fires (it read 0 for 1,250 records lost).
    assert (found, lost) == ([], 1)
    (event,) = corrupt_events(caplog)
    assert event["lost_unknown"] is True
    assert "not a database" in str(event["problem"])
    aside = spool_dir / aside_files(spool_dir)[0]
    assert aside.stat().st_size == original_size  # kept whole for forensics
    with Spool(spool_dir) as spool:  # and the fresh spool works and stays healthy
        spool.append([rec(1)])
        assert numbers(drain_all(spool)) == [1]
    assert len(corrupt_events(caplog)) == 1


def test_truncated_database(spool_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="collectors.spool")
    build_spool(spool_dir)
    db = spool_dir / "spool.db"
    os.truncate(db, db.stat().st_size // 2)
    found, lost, _ = reopen_and_read(spool_dir)
    assert 1000 < len(found) < 3000
    assert found == sorted(found) and set(found) <= set(range(3000))
    assert lost > 0
    (event,) = corrupt_events(caplog)
    assert event["salvaged_records"] == len(found)
    assert len(aside_files(spool_dir)) == 1


def test_zero_length_database(spool_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="collectors.spool")
    build_spool(spool_dir)
    os.truncate(spool_dir / "spool.db", 0)
    found, lost, _ = reopen_and_read(spool_dir)
    assert (found, lost) == ([], 1)  # unknown: counted as one (a lower bound)
    (event,) = corrupt_events(caplog)
    assert event["problem"] == "zero-length database file"
    assert event["lost_unknown"] is True
    assert len(aside_files(spool_dir)) == 1


def test_garbage_wal_header_is_rebuilt_and_nothing_is_lost(
    spool_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="collectors.spool")
    build_spool_in_wal(spool_dir)
    wal = spool_dir / "spool.db-wal"
    with wal.open("r+b") as f:
        f.write(os.urandom(32))  # the WAL header: SQLite alone would ignore the whole WAL
    found, lost, _ = reopen_and_read(spool_dir)
    assert found == list(range(3000))
    assert lost == 0
    (event,) = corrupt_events(caplog)
    assert event["lost_unknown"] is False
    assert event["wal_frames_dropped"] == 0
    assert aside_files(spool_dir) == [Path(str(event["moved_to"])).name]


def test_garbage_in_the_middle_of_the_wal(
    spool_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="collectors.spool")
    build_spool_in_wal(spool_dir)
    wal = spool_dir / "spool.db-wal"
    with wal.open("r+b") as f:
        f.seek(32 + 10 * (24 + PAGE) + 100)  # inside frame 10's page
        f.write(b"\x00garbage\xff" * 30)
    found, lost, _ = reopen_and_read(spool_dir)
    # SQLite alone would stop replaying at frame 10 (about 300 records in); the rebuilt WAL
    # keeps every other frame, so only the records of the damaged page are gone.
    assert len(found) > 2900
    assert found == sorted(found) and set(found) <= set(range(3000))
    assert len(found) + lost == 3000
    assert any(str(e["problem"]).startswith("WAL frame 10") for e in corrupt_events(caplog))


def test_entirely_garbage_wal(spool_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="collectors.spool")
    build_spool_in_wal(spool_dir)
    wal = spool_dir / "spool.db-wal"
    wal.write_bytes(os.urandom(wal.stat().st_size))
    found, lost, _ = reopen_and_read(spool_dir)
    assert (found, lost) == ([], 0)  # nothing readable, nothing countable ...
    (event,) = corrupt_events(caplog)
    assert event["lost_unknown"] is True  # ... and it says so
    assert len(aside_files(spool_dir)) == 1


def test_truncated_wal_keeps_a_prefix_of_commits(spool_dir: Path) -> None:
    build_spool_in_wal(spool_dir)
    wal = spool_dir / "spool.db-wal"
    os.truncate(wal, wal.stat().st_size // 2 + 1234)  # mid-frame, like a torn tail
    found, lost, _ = reopen_and_read(spool_dir)
    assert 0 < len(found) < 3000
    assert found == list(range(len(found)))  # whole commits, in order
    assert lost == 0


def test_checksum_mismatch_is_dead_lettered_not_sent(
    spool_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="collectors.spool")
    with Spool(spool_dir) as spool:
        spool.append([rec(i) for i in range(5)])
    # Damage SQLite cannot see: a payload changed behind its back (bit rot in a cell).
    conn = sqlite3.connect(spool_dir / "spool.db")
    try:
        with conn:
            (payload,) = conn.execute("SELECT payload FROM chunks").fetchone()
            parts = payload.split(b"\n")
            parts[2] = rec(999)
            conn.execute("UPDATE chunks SET payload = ?", (b"\n".join(parts),))
    finally:
        conn.close()
    with Spool(spool_dir) as spool:
        batch = spool.due_batch(10, 0.0, force=True)
        assert batch is not None and numbers(batch.records) == [0, 1, 3, 4]
        assert spool.stats().corrupt_lost_total == 1
        assert spool.stats().records == 4
    line = json.loads((spool_dir / DEAD_LETTER_NAME).read_text())
    assert line["feeds"] == [json.loads(rec(999))]
    assert line["status"] == 0 and "checksum" in line["reason"]
    assert len(corrupt_events(caplog)) == 1


# ---------------------------------------------------------------------- version 1 spools

V1_SCHEMA = (
    "CREATE TABLE records (id INTEGER PRIMARY KEY, appended_ns INTEGER NOT NULL, batch_id INTEGER,"
    " crc32 INTEGER NOT NULL, payload BLOB NOT NULL)",
    "CREATE TABLE batches (id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, first_id INTEGER"
    " NOT NULL, last_id INTEGER NOT NULL, n_records INTEGER NOT NULL, attempts INTEGER NOT NULL"
    " DEFAULT 0, created_ns INTEGER NOT NULL, claimed_ns INTEGER NOT NULL)",
    "CREATE TABLE marks (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
)


def build_v1_spool(directory: Path, bad: int | None = None) -> str:
    """A spool as version 1 wrote it (a row per record): records 0..9 claimed as one batch with
    two attempts, 10..2499 waiting, one mark. Record `bad` gets a wrong checksum."""
    directory.mkdir(mode=0o700, parents=True)
    conn = sqlite3.connect(directory / "spool.db", isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("BEGIN")
        for statement in V1_SCHEMA:
            conn.execute(statement)
        key = "a" * 32
        conn.execute("INSERT INTO batches VALUES (1, ?, 1, 10, 10, 2, ?, ?)", (key, T0, T0 + 5))
        for i in range(2500):
            payload = rec(i)
            crc = zlib.crc32(payload) ^ (1 if i == bad else 0)
            conn.execute("INSERT INTO records VALUES (?, ?, ?, ?, ?)",
                         (i + 1, T0 + i, 1 if i < 10 else None, crc, payload))
        conn.execute("INSERT INTO marks VALUES ('BTC-USD', 42)")
        conn.execute("PRAGMA user_version=1")
        conn.execute("COMMIT")
    finally:
        conn.close()
    return key


def test_a_version_1_spool_is_converted_keeping_batches_order_and_marks(
    spool_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="collectors.spool")
    key = build_v1_spool(spool_dir)
    v1_body = b'{"feeds":[' + b",".join(rec(i) for i in range(10)) + b"]}"
    with Spool(spool_dir, chunk_records=300) as spool:
        stats = spool.stats()
        assert (stats.records, stats.claimed_records, stats.batches_claimed) == (2500, 10, 1)
        assert stats.payload_bytes == sum(len(rec(i)) for i in range(2500))
        assert stats.oldest_record_ns == T0
        assert spool.marks() == {"BTC-USD": 42}
        batch = spool.due_batch(100, 0.0)
        assert batch is not None
        assert (batch.key, batch.attempts, batch.created_ns) == (key, 2, T0)
        assert batch.body() == v1_body  # the same key and the same bytes: the API dedups
        spool.ack(batch.key)
        assert numbers(drain_all(spool)) == list(range(10, 2500))
    with sqlite3.connect(spool_dir / "spool.db") as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert conn.execute("PRAGMA user_version").fetchone() == (3,)
    conn.close()
    assert tables == {"chunks", "front", "claimed", "marks", "state"}
    [event] = [r for r in caplog.records if r.getMessage() == "spool_converted"]
    assert (event.records, event.batches_kept, event.dead_lettered_records) == (2500, 1, 0)


def test_a_version_1_batch_with_a_bad_record_is_re_sent_under_a_new_key(
    spool_dir: Path,
) -> None:
    key = build_v1_spool(spool_dir, bad=3)
    with Spool(spool_dir) as spool:
        assert spool.stats().corrupt_lost_total == 1
        batch = spool.due_batch(100, 0.0)
        assert batch is not None and batch.key != key
        assert numbers(batch.records) == [n for n in range(101) if n != 3]
    line = json.loads((spool_dir / DEAD_LETTER_NAME).read_text())
    assert line["feeds"] == [json.loads(rec(3))]


def test_a_damaged_version_1_spool_is_salvaged_record_by_record(
    spool_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="collectors.spool")
    build_v1_spool(spool_dir)
    with sqlite3.connect(spool_dir / "spool.db") as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    v1_page = 4096  # build_v1_spool makes its database as version 1 did, with 4 KiB pages
    with (spool_dir / "spool.db").open("r+b") as f:
        f.seek(40 * v1_page)
        f.write(b"\xa5" * v1_page)
    found, lost, _ = reopen_and_read(spool_dir)
    assert 0 < lost < 100 and len(found) + lost == 2500
    assert found == sorted(found)
    (event,) = corrupt_events(caplog)
    assert event["batches_rekeyed"] == 1  # version 1 batches are re-sent under new keys


# ---------------------------------------------------------------------- environment errors


@pytest.fixture
def readonly_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory nobody can create files in, root included (chattr +i when root)."""
    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o500)
        yield path
        path.chmod(0o700)
        return
    if shutil.which("chattr") is None:
        pytest.skip("running as root without chattr: cannot make a directory unwritable")
    if (
        subprocess.run(["chattr", "+i", str(path)], check=False, capture_output=True).returncode
        != 0
    ):
        pytest.skip("running as root and chattr +i is not permitted here")
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_unwritable_directory_raises_a_clear_spool_error(readonly_dir: Path) -> None:
    with pytest.raises(SpoolError) as err:
        Spool(readonly_dir)
    message = str(err.value)
    assert str(readonly_dir) in message and "not writable" in message
    assert "\n" not in message
    with pytest.raises(SpoolError, match="cannot create it"):
        Spool(readonly_dir / "sub")


def test_path_that_is_a_file_raises(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(SpoolError, match="not a directory"):
        Spool(target)
    with pytest.raises(SpoolError, match="cannot create it"):
        Spool(target / "sub")


def test_second_process_on_the_same_spool_is_refused(spool_dir: Path, spool: Spool) -> None:
    with pytest.raises(SpoolError, match=f"in use by another process \\(pid {os.getpid()}\\)"):
        Spool(spool_dir)
    spool.append([rec(1)])  # the first one is unaffected


def test_newer_schema_is_left_alone(spool_dir: Path) -> None:
    Spool(spool_dir).close()
    conn = sqlite3.connect(spool_dir / "spool.db")
    try:
        conn.execute("PRAGMA user_version=99")
    finally:
        conn.close()
    with pytest.raises(SpoolError, match="schema version 99 is newer"):
        Spool(spool_dir)
    assert aside_files(spool_dir) == []


def test_disk_full_on_append_raises_and_keeps_the_spool_usable(spool: Spool) -> None:
    spool.append([rec(0)])
    # A real full disk needs a tiny file system; SQLite reports a page cap the same way.
    conn = spool._append_conn
    assert conn is not None
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count={pages}")
    with pytest.raises(SpoolError, match="database or disk is full"):
        spool.append([rec(i, pad=3000) for i in range(1, 50)])
    assert spool.stats().records == 1  # nothing half-stored
    conn.execute("PRAGMA max_page_count=1000000")
    assert spool.append([rec(1)]) == 0
    assert numbers(drain_all(spool)) == [0, 1]


def checkpoint(directory: Path) -> None:
    """Copy the whole WAL into spool.db and empty the WAL file now (the spool's own thread
    checkpoints only once about 1,000 pages were written, and a WAL file keeps its size up to
    journal_size_limit), so spool.db's size is what the spool keeps. A checkpoint of the
    spool's thread running at the same moment makes this one report busy: it tries again."""
    with contextlib.closing(sqlite3.connect(directory / "spool.db")) as conn:
        def done() -> bool:
            busy, log, copied = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            return bool(busy == 0 and log == copied)
        assert wait_until(done, timeout_s=10), "the WAL could not be checkpointed"


def test_file_shrinks_after_a_backlog_drains(spool_dir: Path) -> None:
    db = spool_dir / "spool.db"
    with Spool(spool_dir) as spool:
        for start in range(0, 40_000, 1000):
            spool.append([rec(i, pad=300) for i in range(start, start + 1000)])
        checkpoint(spool_dir)
        peak = db.stat().st_size
        assert peak > 10_000_000
        assert len(drain_all(spool)) == 40_000
        for _ in range(5):  # each ack returns at most a bounded step of free pages
            spool.append([rec(0)])
            drain_all(spool)
        checkpoint(spool_dir)
        assert db.stat().st_size < peak // 2
        assert spool.stats().file_bytes < peak


# ---------------------------------------------------------------------- model-based


def assert_rows_consistent(directory: Path) -> None:
    """Every stored row's n, crc32 and per-record CRCs match its payload; rows of `chunks` do
    not overlap (ids are record sequence numbers); a batch by reference names consecutive
    records before the cursor, held by rows of `chunks`, and no two batches share a record;
    and every row of `chunks` is still needed: it holds a waiting record or one of a batch."""
    conn = sqlite3.connect(f"file:{directory / 'spool.db'}?mode=ro", uri=True)
    try:
        (cursor,) = conn.execute("SELECT value FROM state WHERE name = 'cursor'").fetchone()
        refs = conn.execute("SELECT n, first_id, last_id FROM claimed WHERE first_id IS NOT NULL"
                            " ORDER BY first_id").fetchall()
        ref_end = None
        for n, first, last in refs:
            assert n == last - first + 1 and last < cursor
            assert ref_end is None or first > ref_end
            ref_end = last
        chunk_ids: set[int] = set()
        for table in ("chunks", "front", "claimed"):
            end = None
            where = " WHERE first_id IS NULL" if table == "claimed" else ""
            for rid, n, crc, crcs, payload in conn.execute(
                    f"SELECT id, n, crc32, crcs, payload FROM {table}{where} ORDER BY id"):
                parts = payload.split(b"\n")
                assert len(parts) == n >= 1
                assert crc == zlib.crc32(payload)
                assert crcs == b"".join(zlib.crc32(p).to_bytes(4, "little") for p in parts)
                if table == "chunks":
                    assert end is None or rid >= end
                    end = rid + n
                    ids = set(range(rid, rid + n))
                    chunk_ids |= ids
                    assert rid + n > cursor or any(
                        first <= rid + n - 1 and last >= rid for _n, first, last in refs), (
                        f"row {rid}+{n} is needed by nothing (cursor {cursor})")
        for _n, first, last in refs:
            assert set(range(first, last + 1)) <= chunk_ids
    finally:
        conn.close()


def test_a_stray_newline_in_a_record_loses_that_record_only(spool_dir: Path) -> None:
    # Bit rot that turns a byte of record 1 into a newline: the row reads back as four pieces,
    # and the counters must lose one record (not two), or a later claim miscounts what waits.
    with Spool(spool_dir) as spool:
        spool.append([rec(0), rec(1), rec(2)])
        spool.append([rec(3)])
    conn = sqlite3.connect(spool_dir / "spool.db")
    try:
        with conn:
            rid, payload = conn.execute(
                "SELECT id, payload FROM chunks ORDER BY id LIMIT 1").fetchone()
            parts = payload.split(b"\n")
            parts[1] = parts[1][:10] + b"\n" + parts[1][11:]
            conn.execute("UPDATE chunks SET payload = ? WHERE id = ?",
                         (b"\n".join(parts), rid))
    finally:
        conn.close()
    with Spool(spool_dir) as spool:
        batch = spool.due_batch(2, 0.0, force=True)
        assert batch is not None and numbers(batch.records) == [0, 2]
        spool.ack(batch.key)
        stats = spool.stats()
        assert (stats.records, stats.payload_bytes, stats.corrupt_lost_total) == (
            1, len(rec(3)), 1)
        spool.append([rec(i) for i in range(4, 8)])
        assert numbers(drain_all(spool)) == [3, 4, 5, 6, 7]
        assert spool.stats().records == 0
    line = json.loads((spool_dir / DEAD_LETTER_NAME).read_text())
    assert len(line["feeds"]) == 2  # the two pieces, as read


def test_a_damaged_row_checksum_alone_loses_nothing(spool_dir: Path) -> None:
    with Spool(spool_dir) as spool:
        spool.append([rec(i) for i in range(5)])
    conn = sqlite3.connect(spool_dir / "spool.db")
    try:
        with conn:
            conn.execute("UPDATE chunks SET crc32 = crc32 + 1")
    finally:
        conn.close()
    with Spool(spool_dir) as spool:  # the records' own checksums still verify: all are sent
        assert numbers(drain_all(spool)) == [0, 1, 2, 3, 4]
        assert spool.stats().corrupt_lost_total == 0


@dataclass
class ModelBatch:
    key: str
    records: list[tuple[bytes, int]]  # (record, appended_ns) as they were appended
    attempts: int
    created_ns: int


class SpoolModel(RuleBasedStateMachine):
    """The spool against a plain list model: append, claim (several batches at once), read
    the oldest claimed, attempt, ack / dead-letter / split / release any batch, reopen.

    Waiting records are modelled in two lists: `front` (put back: claimed first, in a batch of
    their own) and `chunks` (appended, claimed by reference). A batch released while it is the
    newest of a run of batches claimed by reference just before the cursor goes back in place
    (`tail`); any other goes to `front`."""

    MAX_BYTES = 700

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="spool-model-"))
        self.clock = FakeClock()
        self.spool = self.open()
        self.front: list[tuple[bytes, int]] = []
        self.chunks: list[tuple[bytes, int]] = []
        self.claimed: list[ModelBatch] = []  # in claim order
        # Batches by reference, each right after the one before, the last right before the
        # cursor: the last can go back by moving the cursor.
        self.tail: list[str] = []
        self.dropped = 0
        self.dead_lines = 0
        self.seq = 0

    def open(self) -> Spool:
        # Rows of at most 3 records: appends span rows and claims cut rows in two.
        return Spool(self.tmp / "spool", max_bytes=self.MAX_BYTES, chunk_records=3,
                     clock_ns=self.clock)

    def teardown(self) -> None:
        self.spool.close()
        shutil.rmtree(self.tmp)

    def waiting(self) -> list[tuple[bytes, int]]:
        return self.front + self.chunks

    def remove(self, index: int) -> ModelBatch:
        batch = self.claimed.pop(index)
        if batch.key in self.tail:
            self.tail = self.tail[self.tail.index(batch.key) + 1:]
        return batch

    def check_dead_letter(self, key: str, status: int, records: list[bytes]) -> None:
        self.dead_lines += 1
        lines = (self.tmp / "spool" / DEAD_LETTER_NAME).read_bytes().splitlines()
        assert len(lines) == self.dead_lines
        last = json.loads(lines[-1])
        assert (last["idempotency_key"], last["status"]) == (key, status)
        assert last["feeds"] == [json.loads(r) for r in records]

    @rule(pads=st.lists(st.integers(0, 120), max_size=8))
    def append(self, pads: list[int]) -> None:
        records = self.new_records(pads)
        dropped, incoming = self.model_append(records)
        assert self.spool.append(records) == dropped
        self.dropped += dropped
        self.chunks += [(r, self.clock.now_ns) for r in incoming]

    @rule(pads=st.lists(st.integers(0, 120), max_size=8), max_records=st.integers(0, 6),
          hold_all=st.booleans())
    def append_claiming(self, pads: list[int], max_records: int, hold_all: bool) -> None:
        # The claim `due_batch` would make right after the append, made in its transaction,
        # when every claimed batch is held (`exclude`) and the waiting records are appended
        # ones still in memory; else a plain append.
        records = self.new_records(pads)
        exclude = {b.key for b in self.claimed[(0 if hold_all else 1):]}
        in_memory = self.spool._recent_ok
        dropped, incoming = self.model_append(records)
        got_dropped, batch = self.spool.append_claiming(records, None, max_records, exclude)
        assert got_dropped == dropped
        self.dropped += dropped
        self.chunks += [(r, self.clock.now_ns) for r in incoming]
        due = (max_records > 0 and records and not dropped and not self.front
               and len(self.chunks) >= max_records and len(exclude) == len(self.claimed))
        if not (due and in_memory):
            assert batch is None
            return
        assert batch is not None and batch.fresh
        taken = self.chunks[:max_records]
        assert list(batch.records) == [r for r, _ in taken]
        assert (batch.attempts, batch.created_ns) == (0, taken[0][1])
        del self.chunks[:max_records]
        self.claimed.append(ModelBatch(batch.key, taken, 0, taken[0][1]))
        self.tail.append(batch.key)

    def new_records(self, pads: list[int]) -> list[bytes]:
        records = [
            json.dumps({"n": self.seq + i, "p": "x" * pad}).encode() for i, pad in enumerate(pads)
        ]
        self.seq += len(pads)
        return records

    def model_append(self, records: list[bytes]) -> tuple[int, list[bytes]]:
        """The full policy on the model: (records dropped, those of `records` kept)."""
        incoming = list(records)
        claimed_bytes = sum(len(r) for b in self.claimed for r, _ in b.records)
        excess = (claimed_bytes + sum(len(r) for r, _ in self.waiting())
                  + sum(len(r) for r in incoming) - self.MAX_BYTES)
        dropped = 0
        while excess > 0 and self.front:
            excess -= len(self.front.pop(0)[0])
            dropped += 1
        if excess > 0 and self.chunks:
            self.tail = []  # the cursor moves past the records dropped
        while excess > 0 and self.chunks:
            excess -= len(self.chunks.pop(0)[0])
            dropped += 1
        while excess > 0 and incoming:  # (the cursor does not move for these)
            excess -= len(incoming.pop(0))
            dropped += 1
        return dropped, incoming

    @rule(seconds=st.sampled_from([0.1, 1.0, 5.0]))
    def tick(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule(
        max_records=st.integers(1, 6),
        max_age_s=st.sampled_from([0.5, 3.0, 1000.0]),
        force=st.booleans(),
    )
    def claim(self, max_records: int, max_age_s: float, force: bool) -> None:
        batch = self.spool.due_batch(max_records, max_age_s, force=force,
                                     exclude={b.key for b in self.claimed})
        source = self.front or self.chunks
        due = bool(source) and (
            force
            or len(self.waiting()) >= max_records
            or self.clock.now_ns - source[0][1] >= max_age_s * 1e9
        )
        if not due:
            assert batch is None
            return
        assert batch is not None and batch.fresh
        taken = source[:max_records]
        assert list(batch.records) == [r for r, _ in taken]
        assert (batch.attempts, batch.created_ns) == (0, taken[0][1])
        assert batch.body() == b'{"feeds":[' + b",".join(r for r, _ in taken) + b"]}"
        del source[:max_records]
        self.claimed.append(ModelBatch(batch.key, taken, 0, taken[0][1]))
        if source is self.chunks:
            self.tail.append(batch.key)

    @precondition(lambda self: self.claimed)
    @rule()
    def read_oldest(self) -> None:
        oldest = self.claimed[0]
        batch = self.spool.due_batch(6, 1000.0)
        assert batch is not None
        assert (batch.key, list(batch.records), batch.attempts, batch.created_ns) == (
            oldest.key, [r for r, _ in oldest.records], oldest.attempts, oldest.created_ns)

    @precondition(lambda self: self.claimed)
    @rule(pick=st.integers(0, 5))
    def attempt(self, pick: int) -> None:
        batch = self.claimed[pick % len(self.claimed)]
        self.spool.record_attempt(batch.key)
        batch.attempts += 1

    @precondition(lambda self: self.claimed)
    @rule(pick=st.integers(0, 5))
    def ack(self, pick: int) -> None:
        batch = self.remove(pick % len(self.claimed))
        assert self.spool.ack(batch.key) == len(batch.records)

    @precondition(lambda self: self.claimed)
    @rule(pick=st.integers(0, 5), status=st.sampled_from([400, 413, 422]))
    def dead_letter(self, pick: int, status: int) -> None:
        batch = self.remove(pick % len(self.claimed))
        assert self.spool.dead_letter(batch.key, status, "rejected") == len(batch.records)
        self.check_dead_letter(batch.key, status, [r for r, _ in batch.records])

    @precondition(lambda self: self.claimed)
    @rule(pick=st.integers(0, 5), reject=st.sets(st.integers(0, 5), max_size=3))
    def split(self, pick: int, reject: set[int]) -> None:
        batch = self.remove(pick % len(self.claimed))
        bad = [r for i, (r, _) in enumerate(batch.records) if i in reject]
        good = [r for i, (r, _) in enumerate(batch.records) if i not in reject]
        assert self.spool.split(batch.key, reject, 422, "bad") == (len(bad), len(good))
        if bad:
            self.check_dead_letter(batch.key, 422, bad)
        self.front = [(r, batch.created_ns) for r in good] + self.front

    @precondition(lambda self: self.claimed)
    @rule(pick=st.integers(0, 5))
    def release(self, pick: int) -> None:
        index = pick % len(self.claimed)
        in_place = bool(self.tail) and self.tail[-1] == self.claimed[index].key
        if in_place:  # the cursor moves back: the batch before is now the newest
            batch = self.claimed.pop(index)
            self.tail.pop()
        else:
            batch = self.remove(index)
        assert self.spool.release(batch.key) == len(batch.records)
        if in_place:
            self.chunks = batch.records + self.chunks
        else:
            self.front = [(r, batch.created_ns) for r, _ in batch.records] + self.front

    @rule()
    def reopen(self) -> None:
        self.spool.close()
        self.spool = self.open()
        self.dropped = 0  # dropped_total counts since open

    @invariant()
    def stats_match(self) -> None:
        stats = self.spool.stats()
        claimed = [r for b in self.claimed for r, _ in b.records]
        everything = claimed + [r for r, _ in self.waiting()]
        assert stats.records == len(everything)
        assert stats.claimed_records == len(claimed)
        assert stats.payload_bytes == sum(len(r) for r in everything)
        assert stats.payload_bytes <= self.MAX_BYTES
        assert stats.batches_claimed == len(self.claimed)
        assert stats.dropped_total == self.dropped
        assert stats.corrupt_lost_total == 0
        times = [b.created_ns for b in self.claimed] + [ns for _, ns in self.waiting()[:1]]
        assert stats.oldest_record_ns == (min(times) if times else None)

    @invariant()
    def rows_in_memory_are_the_waiting_rows(self) -> None:
        spool = self.spool
        if not spool._recent_ok:
            return
        with spool._conn_lock:
            assert spool._conn is not None
            cursor = spool._cursor
            rows = spool._conn.execute("SELECT id, appended_ns, n, crc32, crcs, payload"
                                       " FROM chunks WHERE id + n > ? ORDER BY id",
                                       (cursor,)).fetchall()
        views = []
        for rid, ns, n, crc, crcs, payload in rows:
            if rid < cursor:  # the row holding the cursor: its waiting records
                k = cursor - rid
                tail = b"\n".join(payload.split(b"\n")[k:])
                views.append((cursor, ns, n - k, zlib.crc32(tail), crcs[4 * k:], tail))
            else:
                views.append((rid, ns, n, crc, crcs, payload))
        assert list(spool._recent) == views
        assert spool._recent_bytes == sum(len(r[5]) for r in views)

    @invariant()
    def rows_carry_their_own_checksums(self) -> None:
        # Claims copy and cut the stored CRCs rather than recompute them: check they still
        # describe every record, and that row ids stay record sequence numbers.
        assert_rows_consistent(self.tmp / "spool")


SpoolModel.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_spool_model = SpoolModel.TestCase


def test_split_dead_letters_the_named_records_and_releases_the_rest(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s")
    try:
        records = [b'{"n":%d}' % i for i in range(6)]
        spool.append(records)
        batch = spool.due_batch(4, 0.0, force=True)
        assert batch is not None and batch.records == tuple(records[:4])
        assert spool.split(batch.key, [1, 3], 422, "bad price") == (2, 2)
        assert spool.split(batch.key, [0], 422, "again") == (0, 0)  # unknown now
        # The records released go first, in a batch of their own.
        again = spool.due_batch(10, 0.0, force=True)
        assert again is not None and again.key != batch.key
        assert again.records == (records[0], records[2])
        stats = spool.stats()
        assert (stats.records, stats.claimed_records, stats.batches_claimed) == (4, 2, 1)
        spool.ack(again.key)
        rest = spool.due_batch(10, 0.0, force=True)
        assert rest is not None and rest.records == (records[4], records[5])
        lines = (tmp_path / "s" / "dead-letter.jsonl").read_text().splitlines()
        [entry] = [json.loads(x) for x in lines]
        assert entry["feeds"] == [{"n": 1}, {"n": 3}] and entry["status"] == 422
    finally:
        spool.close()


def test_a_batch_claimed_ahead_and_released_goes_back_in_order(spool: Spool) -> None:
    records = [b'{"n":%d}' % i for i in range(30)]
    spool.append(records)
    sent = spool.due_batch(10, 0.0)
    ahead = spool.due_batch(10, 0.0, exclude={sent.key} if sent else ())
    assert sent is not None and ahead is not None and sent.fresh and ahead.fresh
    # A claimed batch read back (a retry) is not fresh: it may have been sent.
    again = spool.due_batch(10, 0.0)
    assert again is not None and again.key == sent.key and not again.fresh
    # The batch claimed ahead goes back first, then the refused one is split in front of it:
    # the original order holds, and smaller batches take them.
    assert spool.release(ahead.key) == 10
    assert spool.release(ahead.key) == 0  # unknown now
    assert spool.split(sent.key, (), 413, "too large") == (0, 10)
    stats = spool.stats()
    assert (stats.records, stats.claimed_records, stats.batches_claimed) == (30, 0, 0)
    order: list[bytes] = []
    while (batch := spool.due_batch(5, 0.0, force=True)) is not None:
        assert batch.size == 5 and batch.key not in (sent.key, ahead.key)
        order += batch.records
        spool.ack(batch.key)
    assert order == records


def test_due_batch_skips_the_batches_other_workers_hold(spool: Spool) -> None:
    spool.append([b'{"n":%d}' % i for i in range(30)])
    first = spool.due_batch(10, 0.0)
    second = spool.due_batch(10, 0.0, exclude={first.key} if first else ())
    assert first is not None and second is not None
    assert first.key != second.key
    assert set(first.records).isdisjoint(second.records)
    # Without exclusions the oldest claimed batch comes back (a retry after a restart)...
    again = spool.due_batch(10, 0.0)
    assert again is not None and again.key == first.key and again.records == first.records
    # ...and with both held, a third is claimed; with all held and nothing waiting, none.
    third = spool.due_batch(10, 0.0, exclude={first.key, second.key})
    assert third is not None and third.key not in (first.key, second.key)
    assert spool.due_batch(10, 0.0, force=True, exclude={first.key, second.key,
                                                          third.key}) is None
    assert sorted(first.records + second.records + third.records) == sorted(
        b'{"n":%d}' % i for i in range(30))


def test_the_cached_age_of_the_oldest_waiting_record_follows_claims_and_splits(
        spool: Spool, clock: FakeClock) -> None:
    spool.append([rec(1)])
    clock.advance(5)
    assert spool.due_batch(100, 10.0) is None      # 5 s old (read, then cached)
    spool.append([rec(2)])                          # newer: the oldest is still rec(1)
    clock.advance(5)
    first = spool.due_batch(100, 10.0)
    assert first is not None and first.records == (rec(1), rec(2))
    spool.append([rec(3)])                          # the claim forgot the cached age
    clock.advance(9)
    assert spool.due_batch(100, 10.0, exclude={first.key}) is None  # rec(3) is 9 s old
    assert spool.split(first.key, (), 413, "too large") == (0, 2)
    # rec(1) and rec(2) wait again and are the oldest (19 s past the first append): due,
    # in a batch of their own; rec(3) is not due yet (9 s).
    again = spool.due_batch(100, 10.0)
    assert again is not None and again.records == (rec(1), rec(2))
    assert spool.due_batch(100, 10.0, exclude={again.key}) is None
    clock.advance(1)
    last = spool.due_batch(100, 10.0, exclude={again.key})
    assert last is not None and last.records == (rec(3),)


def test_seconds_until_due_follows_the_oldest_waiting_record(
        spool: Spool, clock: FakeClock) -> None:
    assert spool.seconds_until_due(5.0) is None  # nothing waits
    spool.append([rec(1)])
    clock.advance(2)
    spool.append([rec(2)])
    assert spool.seconds_until_due(5.0) == pytest.approx(3.0)
    clock.advance(4)
    assert spool.seconds_until_due(5.0) == 0.0
    batch = spool.due_batch(100, 5.0)
    assert batch is not None
    assert spool.seconds_until_due(5.0) is None  # all claimed


# ---------------------------------------------------------------------- claims by reference

V2_SCHEMA = (
    "CREATE TABLE waiting (id INTEGER PRIMARY KEY, appended_ns INTEGER NOT NULL,"
    " n INTEGER NOT NULL, crc32 INTEGER NOT NULL, crcs BLOB NOT NULL, payload BLOB NOT NULL)",
    "CREATE TABLE claimed (id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, n INTEGER NOT NULL,"
    " attempts INTEGER NOT NULL DEFAULT 0, created_ns INTEGER NOT NULL,"
    " claimed_ns INTEGER NOT NULL, crc32 INTEGER NOT NULL, crcs BLOB NOT NULL,"
    " payload BLOB NOT NULL)",
    "CREATE TABLE marks (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
)


def v2_row(members: list[bytes]) -> tuple[int, bytes, bytes]:
    payload = b"\n".join(members)
    crcs = b"".join(zlib.crc32(m).to_bytes(4, "little") for m in members)
    return zlib.crc32(payload), crcs, payload


def build_v2_spool(directory: Path) -> str:
    """A spool as version 2 wrote it: records 0..3 claimed as one batch (attempted once);
    4..5 put back in front (a negative id), 6..10 waiting in two rows; one mark."""
    directory.mkdir(mode=0o700, parents=True)
    conn = sqlite3.connect(directory / "spool.db", isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("BEGIN")
        for statement in V2_SCHEMA:
            conn.execute(statement)
        key = "b" * 32
        crc, crcs, payload = v2_row([rec(i) for i in range(4)])
        conn.execute("INSERT INTO claimed VALUES (1, ?, 4, 1, ?, ?, ?, ?, ?)",
                     (key, T0, T0 + 1, crc, crcs, payload))
        for rid, members, ns in ((-1, [4, 5], T0), (11, [6, 7, 8], T0 + 2), (14, [9, 10], T0 + 3)):
            crc, crcs, payload = v2_row([rec(i) for i in members])
            conn.execute("INSERT INTO waiting VALUES (?, ?, ?, ?, ?, ?)",
                         (rid, ns, len(members), crc, crcs, payload))
        conn.execute("INSERT INTO marks VALUES ('BTC-USD', 7)")
        conn.execute("PRAGMA user_version=2")
        conn.execute("COMMIT")
    finally:
        conn.close()
    return key


def test_a_version_2_spool_is_converted_in_place_keeping_batches_and_order(
    spool_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="collectors.spool")
    key = build_v2_spool(spool_dir)
    with Spool(spool_dir, chunk_records=3) as spool:
        stats = spool.stats()
        assert (stats.records, stats.claimed_records, stats.batches_claimed) == (11, 4, 1)
        assert stats.payload_bytes == sum(len(rec(i)) for i in range(11))
        assert stats.oldest_record_ns == T0
        assert spool.marks() == {"BTC-USD": 7}
        spool.append([rec(11), rec(12)])  # after everything version 2 left waiting
        batch = spool.due_batch(100, 0.0)
        assert batch is not None
        assert (batch.key, batch.attempts, batch.created_ns) == (key, 1, T0)
        assert numbers(batch.records) == [0, 1, 2, 3]  # the same key and the same bytes
        spool.ack(batch.key)
        assert numbers(drain_all(spool)) == list(range(4, 13))
        assert spool.stats().records == 0
    with sqlite3.connect(spool_dir / "spool.db") as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (3,)
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        left = conn.execute("SELECT (SELECT count(*) FROM chunks) + (SELECT count(*) FROM front)"
                            " + (SELECT count(*) FROM claimed)").fetchone()
    conn.close()
    assert tables == {"chunks", "front", "claimed", "marks", "state"}
    assert left == (0,)  # every row went with its last record
    [event] = [r for r in caplog.records if r.getMessage() == "spool_converted"]
    assert (event.__dict__["from_version"], event.__dict__["records"]) == (2, 7)


def claimed_rows(directory: Path) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(f"file:{directory / 'spool.db'}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT key, n, length(payload), first_id, last_id, bytes"
                            " FROM claimed ORDER BY id").fetchall()
    finally:
        conn.close()


def test_a_claim_refers_to_its_records_and_reads_them_back_after_a_restart(
        spool_dir: Path) -> None:
    with Spool(spool_dir, chunk_records=3) as spool:
        spool.append([rec(i) for i in range(7)])  # rows 1-3, 4-6, 7
        batch = spool.due_batch(5, 0.0)  # cuts the second row
        assert batch is not None and numbers(batch.records) == [0, 1, 2, 3, 4]
        spool.record_attempt(batch.key)
    # The batch's row holds no record: it names ids 1..5 and their size.
    assert claimed_rows(spool_dir) == [
        (batch.key, 5, 0, 1, 5, sum(len(rec(i)) for i in range(5)))]
    with Spool(spool_dir, chunk_records=3) as spool:
        stats = spool.stats()
        assert (stats.records, stats.claimed_records, stats.payload_bytes) == (
            7, 5, sum(len(rec(i)) for i in range(7)))
        again = spool.due_batch(5, 0.0)
        assert again is not None
        assert (again.key, again.body(), again.attempts) == (batch.key, batch.body(), 1)
        assert spool.ack(batch.key) == 5
        assert_rows_consistent(spool_dir)  # rows 1-3 gone; 4-6 kept: record 6 still waits
        assert numbers(drain_all(spool)) == [5, 6]
    assert_rows_consistent(spool_dir)


def test_rows_shared_by_two_batches_go_with_the_last_of_them(spool_dir: Path) -> None:
    with Spool(spool_dir, chunk_records=4) as spool:
        spool.append([rec(i) for i in range(8)])  # rows 1-4, 5-8
        first = spool.due_batch(3, 0.0)
        second = spool.due_batch(3, 0.0, exclude={first.key} if first else ())
        assert first is not None and second is not None
        assert numbers(second.records) == [3, 4, 5]  # shares row 1-4 with the first batch
        assert spool.ack(second.key) == 3  # out of claim order (two POSTs in flight)
        assert_rows_consistent(spool_dir)
        first_again = spool.due_batch(3, 0.0)
        assert first_again is not None and first_again.body() == first.body()
        assert spool.ack(first.key) == 3
        assert_rows_consistent(spool_dir)
        assert numbers(drain_all(spool)) == [6, 7]
    conn = sqlite3.connect(spool_dir / "spool.db")
    try:
        assert conn.execute("SELECT count(*) FROM chunks").fetchone() == (0,)
    finally:
        conn.close()


def test_a_released_batch_goes_back_in_place_when_newest_else_in_front(
        spool_dir: Path) -> None:
    with Spool(spool_dir, chunk_records=2) as spool:
        spool.append([rec(i) for i in range(6)])
        older = spool.due_batch(2, 0.0)
        newer = spool.due_batch(2, 0.0, exclude={older.key} if older else ())
        assert older is not None and newer is not None
        assert spool.release(newer.key) == 2  # the newest: the cursor moves back
        assert claimed_rows(spool_dir)[0][0] == older.key and len(claimed_rows(spool_dir)) == 1
        again = spool.due_batch(2, 0.0, exclude={older.key})
        assert again is not None and again.key != newer.key
        assert again.records == newer.records
        assert spool.release(older.key) == 2  # not the newest: its records go in front
        front = spool.due_batch(10, 0.0, exclude={again.key})
        assert front is not None and numbers(front.records) == [0, 1]
        assert_rows_consistent(spool_dir)
        spool.ack(front.key)
        spool.ack(again.key)
        assert numbers(drain_all(spool)) == [4, 5]
        assert spool.stats().records == 0
    assert_rows_consistent(spool_dir)


def test_a_damaged_row_shared_with_a_claimed_batch_keeps_the_batch_and_its_key(
        spool_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="collectors.spool")
    with Spool(spool_dir, chunk_records=6) as spool:
        spool.append([rec(i) for i in range(6)])
        batch = spool.due_batch(3, 0.0)  # records 0-2 of the row; 3-5 wait
        assert batch is not None
    members = [rec(i) for i in range(6)]
    members[4] = members[4].replace(b'"n":4', b'"n":9')  # a waiting record rots
    conn = sqlite3.connect(spool_dir / "spool.db")
    try:
        with conn:
            conn.execute("UPDATE chunks SET payload = ?", (b"\n".join(members),))
    finally:
        conn.close()
    with Spool(spool_dir, chunk_records=6) as spool:
        again = spool.due_batch(3, 0.0)  # the batch's own records still verify
        assert again is not None and (again.key, again.body()) == (batch.key, batch.body())
        rest = spool.due_batch(10, 0.0, exclude={batch.key})  # the row is set aside
        assert rest is not None and numbers(rest.records) == [3, 5]
        stats = spool.stats()
        assert (stats.records, stats.corrupt_lost_total) == (5, 1)
        spool.ack(rest.key)
        spool.ack(batch.key)
        assert spool.stats().records == 0 and drain_all(spool) == []
    line = json.loads((spool_dir / DEAD_LETTER_NAME).read_text())
    assert line["feeds"] == [json.loads(members[4])]
    assert [e["lost_records"] for e in corrupt_events(caplog)] == [1]
    assert_rows_consistent(spool_dir)


@pytest.mark.parametrize("claim_first", [True, False])
def test_a_row_whose_framing_broke_is_read_once_never_twice(
        spool_dir: Path, claim_first: bool) -> None:
    # A stray newline in a waiting record of a row whose head is in a claimed batch: which
    # piece is whose is unknown, so every verified piece waits again (sent again rather than
    # lost), once: whether the batch or a claim of the waiting records meets the row first.
    with Spool(spool_dir, chunk_records=6) as spool:
        spool.append([rec(i) for i in range(6)])
        batch = spool.due_batch(3, 0.0)
        assert batch is not None
        spool.append([rec(6)])
    conn = sqlite3.connect(spool_dir / "spool.db")
    try:
        with conn:
            (payload,) = conn.execute("SELECT payload FROM chunks WHERE id = 1").fetchone()
            parts = payload.split(b"\n")
            parts[4] = parts[4][:10] + b"\n" + parts[4][11:]
            conn.execute("UPDATE chunks SET payload = ? WHERE id = 1", (b"\n".join(parts),))
    finally:
        conn.close()
    sent: list[int] = []
    with Spool(spool_dir, chunk_records=6) as spool:
        if not claim_first:  # the batch meets it first (a retry after a restart)
            first = spool.due_batch(3, 0.0)
            assert first is not None and first.key != batch.key
            sent += numbers(first.records)
            spool.ack(first.key)
        while (next_batch := spool.due_batch(10, 0.0, force=True,
                                             exclude={batch.key})) is not None:
            sent += numbers(next_batch.records)
            spool.ack(next_batch.key)
        if claim_first:
            last = spool.due_batch(10, 0.0, force=True)
            if last is not None:
                sent += numbers(last.records)
                spool.ack(last.key)
        assert spool.due_batch(10, 0.0, force=True) is None
        stats = spool.stats()
        assert (stats.records, stats.claimed_records, stats.payload_bytes) == (0, 0, 0)
    assert sorted(sent) == [0, 1, 2, 3, 5, 6]  # each once; 4 is dead-lettered in pieces
    assert_rows_consistent(spool_dir)


class FailingCommit:
    """A connection whose next COMMIT fails as a full disk makes it fail."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn, self.armed = conn, True

    def execute(self, sql: str, *args: object) -> object:
        if self.armed and sql == "COMMIT":
            self.armed = False
            raise sqlite3.OperationalError("database or disk is full")
        return self.conn.execute(sql, *args)

    def __getattr__(self, name: str) -> object:
        return getattr(self.conn, name)


def test_a_failed_append_leaves_the_cursor_where_the_database_has_it(spool_dir: Path) -> None:
    # The full policy moves the cursor inside the append's transaction; the commit fails
    # ("nothing is stored then"): a claim from a moved cursor skipped records, and the
    # acknowledgement after it deleted the row still holding them.
    size = len(rec(0))
    with Spool(spool_dir, max_bytes=10 * size, fsync_interval_s=0) as spool:
        spool.append([rec(i) for i in range(10)])  # one row
        batch = spool.due_batch(5, 0.0, force=True)
        assert batch is not None
        real = spool._append_conn
        spool._append_conn = FailingCommit(real)  # type: ignore[assignment]
        with pytest.raises(SpoolError, match="full"):
            spool.append([rec(100 + i) for i in range(5)])  # would drop 5..9
        spool._append_conn = real
        assert spool.ack(batch.key) == 5
        assert numbers(drain_all(spool)) == [5, 6, 7, 8, 9]
    with Spool(spool_dir, fsync_interval_s=0) as spool:
        assert spool.stats().records == 0


def test_a_real_full_disk_under_the_full_policy_loses_nothing(spool_dir: Path) -> None:
    big = [b'{"n":%d,"p":"%s"}' % (i, b"x" * 2000) for i in range(13)]
    with Spool(spool_dir, max_bytes=10 * len(big[0]) + 50, fsync_interval_s=0,
               chunk_records=10) as spool:
        spool.append(big[:10])
        batch = spool.due_batch(5, 0.0, force=True)
        assert batch is not None
        conn = spool._append_conn
        assert conn is not None
        (pages,) = conn.execute("PRAGMA page_count").fetchone()
        conn.execute(f"PRAGMA max_page_count={pages}")  # the disk is full
        with pytest.raises(SpoolError, match="full"):
            spool.append(big[10:13])  # its full policy would drop 5..7 first
        conn.execute("PRAGMA max_page_count=1073741823")
        rest = spool.due_batch(100, 0.0, force=True, exclude={batch.key})
        assert rest is not None and rest.records == tuple(big[5:10])


def test_a_failed_split_leaves_the_batch_claimed_and_claims_going(spool_dir: Path) -> None:
    with Spool(spool_dir, fsync_interval_s=0) as spool:
        spool.append([rec(i) for i in range(10)])
        batch = spool.due_batch(4, 0.0, force=True)
        assert batch is not None
        real = spool._conn
        spool._conn = FailingCommit(real)  # type: ignore[assignment]
        with pytest.raises(SpoolError):
            spool.split(batch.key, (), 413, "too large")  # rolled back: still claimed
        spool._conn = real
        assert spool.ack(batch.key) == 4
        assert numbers(drain_all(spool)) == [4, 5, 6, 7, 8, 9]


def test_a_rotted_count_does_not_hide_the_records_that_wait(spool_dir: Path) -> None:
    with Spool(spool_dir, chunk_records=10) as spool:
        spool.append([rec(i) for i in range(10)])  # row 1-10
        spool.append([rec(10), rec(11)])
        batch = spool.due_batch(5, 0.0)
        assert batch is not None
        spool.ack(batch.key)  # the row stays: 5..9 wait
    conn = sqlite3.connect(spool_dir / "spool.db")
    try:
        with conn:
            conn.execute("UPDATE chunks SET n = 5 WHERE id = 1")  # the row now "ends" at 5
    finally:
        conn.close()
    with Spool(spool_dir, chunk_records=10) as spool:
        assert numbers(drain_all(spool)) == list(range(5, 12))
        assert spool.stats().corrupt_lost_total == 0
    assert_rows_consistent(spool_dir)


def test_deletes_only_free_their_pages(spool: Spool) -> None:
    # Debian builds SQLite with SECURE_DELETE on: every acknowledgement then wrote the
    # batch's pages again, as zeros (8x the CPU of an ack of 1,000 records).
    for conn in (spool._conn, spool._append_conn, spool._checkpoint_conn):
        assert conn is not None and conn.execute("PRAGMA secure_delete").fetchone() == (0,)


def test_acks_look_at_the_free_list_once_a_second_when_there_is_nothing_to_vacuum(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    looks: list[str] = []
    assert spool._conn is not None
    spool._conn.set_trace_callback(
        lambda sql: looks.append(sql) if "freelist_count" in sql else None)
    now = [1000.0]
    monkeypatch.setattr("collectors.spool.time.monotonic", lambda: now[0])
    for i in range(5):
        spool.append([rec(i)])
        assert len(drain_all(spool)) == 1
    assert len(looks) == 1
    now[0] += 1.0
    spool.append([rec(9)])
    drain_all(spool)
    assert len(looks) == 2


def test_a_claim_beside_an_append_that_fails_after_its_full_policy_skips_nothing(
        spool_dir: Path) -> None:
    # The claim reads the rows without the write lock. An append at the bound moved the cursor
    # inside its transaction, then failed (disk full) and put it back: the claim, having read
    # the moved cursor, committed a batch from there, and the records between were never sent.
    size = len(rec(0))
    spool = Spool(spool_dir, max_bytes=100 * size, fsync_interval_s=0, chunk_records=10)
    try:
        appended = 0
        while spool.append([rec(appended)]) == 0:  # to the bound, a record a row
            appended += 1
        first_kept = 1  # the append that crossed the bound dropped record 0
        appended += 1
        spool._forget_recent()  # a backlog: the claim reads the database
        in_txn, go_on, reading = threading.Event(), threading.Event(), threading.Event()
        real_conn, real_read = spool._append_conn, spool._read_chunks

        class FailingInsert:
            def __init__(self) -> None:
                self.armed = True

            def execute(self, sql: str, *args: object) -> object:
                if self.armed and sql.startswith("INSERT INTO chunks"):
                    self.armed = False
                    in_txn.set()  # the full policy has moved the cursor by now
                    assert go_on.wait(5)
                    raise sqlite3.OperationalError("database or disk is full")
                return real_conn.execute(sql, *args)  # type: ignore[union-attr]

            executemany = execute

            def __getattr__(self, name: str) -> object:
                return getattr(real_conn, name)

        def read_during_the_append(*args: object) -> object:
            reading.set()
            assert in_txn.wait(5)
            try:
                return real_read(*args)  # type: ignore[arg-type]
            finally:
                go_on.set()

        spool._append_conn = FailingInsert()  # type: ignore[assignment]
        spool._read_chunks = read_during_the_append  # type: ignore[method-assign]
        failed: list[BaseException] = []

        def parser() -> None:
            assert reading.wait(5)
            try:
                spool.append([rec(appended + i) for i in range(20)])
            except SpoolError as exc:
                failed.append(exc)

        thread = threading.Thread(target=parser)
        thread.start()
        batch = spool.due_batch(5, 0.0, force=True)
        thread.join(10)
        spool._read_chunks = real_read  # type: ignore[method-assign]
        spool._append_conn = real_conn
        assert failed and batch is not None
        sent = numbers(batch.records)
        spool.ack(batch.key)
        sent += numbers(drain_all(spool))
        assert sent == list(range(first_kept, appended))
        assert spool.stats().records == 0
    finally:
        spool.close()


def rot_count(directory: Path, n: int) -> None:
    """One rotted integer: the first row of `chunks` says it holds `n` records."""
    conn = sqlite3.connect(directory / "spool.db")
    try:
        with conn:
            conn.execute("UPDATE chunks SET n = ? WHERE id = 1", (n,))
    finally:
        conn.close()


@pytest.mark.parametrize("head_acked", [False, True])
def test_a_rotted_count_leaves_the_counters_true(spool_dir: Path, head_acked: bool) -> None:
    # A claim meeting the row sized its waiting part by the rotted count, while the counters
    # had counted the records as appended: 64 phantom records, nothing claimed any more.
    spool = Spool(spool_dir, chunk_records=1000, fsync_interval_s=0)
    try:
        spool.append([rec(i) for i in range(10)])
        head = spool.due_batch(5, 0.0, force=True)
        assert head is not None
        if head_acked:
            spool.ack(head.key)
        spool._forget_recent()  # a backlog: claims read the database
        rot_count(spool_dir, 74)
        sent = numbers(drain_all_but(spool, head.key))
        if not head_acked:
            spool.ack(head.key)
        assert sent == [5, 6, 7, 8, 9]
        stats = spool.stats()
        assert (stats.records, stats.payload_bytes, stats.corrupt_lost_total) == (0, 0, 0)
    finally:
        spool.close()
    assert_rows_consistent(spool_dir)


def drain_all_but(spool: Spool, key: str) -> list[bytes]:
    out: list[bytes] = []
    while (batch := spool.due_batch(1000, 0.0, force=True, exclude={key})) is not None:
        out.extend(batch.records)
        spool.ack(batch.key)
    return out


def test_a_row_whose_count_rotted_goes_with_its_batch(spool_dir: Path) -> None:
    with Spool(spool_dir, chunk_records=1000, fsync_interval_s=0) as spool:
        spool.append([rec(i) for i in range(5)])
        batch = spool.due_batch(5, 0.0, force=True)
        assert batch is not None
        rot_count(spool_dir, 69)
        spool.ack(batch.key)
    with Spool(spool_dir, fsync_interval_s=0) as spool:
        assert spool.stats().records == 0
        assert spool.due_batch(50, 0.0, force=True) is None
        assert spool.seconds_until_due(1.0) is None  # no phantom record to wait for
    assert_rows_consistent(spool_dir)


def test_append_claiming_claims_the_batch_the_append_fills(spool_dir: Path,
                                                             clock: FakeClock) -> None:
    spool = Spool(spool_dir, clock_ns=clock)
    records = [b'{"n":%d}' % i for i in range(7)]
    try:
        assert spool.append(records[:3], {"BTC-USD": 3}) == 0
        # Not yet a batch's worth: a plain append.
        assert spool.append_claiming(records[3:4], None, 5) == (0, None)
        assert spool.stats().batches_claimed == 0
        dropped, batch = spool.append_claiming(records[4:], {"BTC-USD": 7}, 5)
        assert dropped == 0 and batch is not None and batch.fresh
        assert batch.records == tuple(records[:5])
        assert spool.marks() == {"BTC-USD": 7}
        stats = spool.stats()
        assert (stats.records, stats.claimed_records, stats.batches_claimed) == (7, 5, 1)
        assert spool.waiting_records == 2
        # The claim is the one due_batch hands out: read back under its key after a restart.
        spool.close()
        spool = Spool(spool_dir, clock_ns=clock)
        again = spool.due_batch(5, 1000.0)
        assert again is not None and (again.key, again.records) == (batch.key, batch.records)
        assert not again.fresh
        assert spool.ack(batch.key) == 5
        rest = spool.due_batch(5, 0.0, force=True)
        assert rest is not None and rest.records == tuple(records[5:])
    finally:
        spool.close()


def test_append_claiming_leaves_the_claim_to_due_batch_when_another_batch_comes_first(
        spool: Spool) -> None:
    records = [b'{"n":%d}' % i for i in range(20)]
    spool.append(records[:5])
    held = spool.due_batch(5, 1000.0)
    assert held is not None
    # A claimed batch no worker holds (a retry owed first): no claim.
    assert spool.append_claiming(records[5:10], None, 5, exclude=()) == (0, None)
    # Held by a worker: the waiting records are claimed.
    _, batch = spool.append_claiming(records[10:11], None, 5, exclude={held.key})
    assert batch is not None and batch.records == tuple(records[5:10])
    # Records put back wait in front: due_batch claims them first, in a batch of their own.
    assert spool.release(held.key) == 5
    assert spool.append_claiming(records[11:20], None, 5, exclude={batch.key}) == (0, None)
    first = spool.due_batch(5, 1000.0, exclude={batch.key})
    assert first is not None and first.records == tuple(records[:5])
    # Size 0: a plain append.
    assert spool.append_claiming([b'{"n":20}'], None, 0, exclude={batch.key, first.key}) == (
        0, None)


def test_append_claiming_does_not_claim_when_the_full_policy_drops(spool_dir: Path,
                                                                    clock: FakeClock) -> None:
    spool = Spool(spool_dir, max_bytes=100, clock_ns=clock)
    try:
        assert spool.append([b'{"n":%d,"pad":"xxxxxxxxxx"}' % i for i in range(3)]) == 0
        dropped, batch = spool.append_claiming([b'{"n":9,"pad":"xxxxxxxxxx"}'], None, 2)
        assert dropped == 1 and batch is None
        claimed = spool.due_batch(2, 1000.0)
        assert claimed is not None and claimed.records[0] == b'{"n":1,"pad":"xxxxxxxxxx"}'
    finally:
        spool.close()


def test_a_disk_too_full_for_a_new_connection_is_a_spool_error_that_says_so(
        spool_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A nearly full disk failed the append connection's first PRAGMA with a raw sqlite3 error:
    # the service, which waits out a full disk on a SpoolError, crashed with a traceback.
    from collectors.spool import is_disk_full

    Spool(spool_dir).close()
    real_connect = Spool._connect
    calls: list[int] = []

    def connect(self: Spool, path: Path) -> sqlite3.Connection:
        calls.append(1)
        if len(calls) == 2:  # the append connection, after the main one opened
            full = sqlite3.OperationalError("database or disk is full")
            full.sqlite_errorname = "SQLITE_FULL"  # type: ignore[attr-defined]
            raise full
        return real_connect(self, path)

    monkeypatch.setattr(Spool, "_connect", connect)
    with pytest.raises(SpoolError, match="database or disk is full") as caught:
        Spool(spool_dir)
    assert is_disk_full(caught.value)
    monkeypatch.setattr(Spool, "_connect", real_connect)
    Spool(spool_dir).close()  # the lock was released
