"""Durable on-disk spool of undelivered records: one SQLite database in WAL mode per collector.

Why SQLite and not a home-made file format: SQLite is a well-kept building block whose WAL frames
are checksummed, whose commits are atomic, and whose crash recovery (replaying the valid prefix of
the WAL, ignoring a torn tail) has been tested far harder than anything we would write. What is
left for us is small and visible here: the schema, the batch bookkeeping, the size bound, the
fsync schedule and what to do when the file is damaged anyway.

Files in the spool directory (created 0700)::

    spool.db, spool.db-wal, spool.db-shm   the database; nothing else may open it while we run
    spool.lock                             flock held while open: one process per spool
    dead-letter.jsonl                      batches the API refused for good, one JSON line each
    spool.db.corrupt-<UTC time>[-wal]      a damaged database set aside (kept for forensics)

Schema (``PRAGMA user_version`` = 1): ``records(id, appended_ns, batch_id, crc32, payload BLOB)``
in append order, ``batch_id`` NULL while waiting; ``batches(id, key, first_id, last_id,
n_records, attempts, created_ns, claimed_ns)``, one row per claimed, unacknowledged batch;
``marks(key, value)``, per-key dedup high-water marks written with the records that set them. A
batch's members are the rows with its ``batch_id`` inside ``[first_id, last_id]`` (a rowid
range scan, no extra index). ``crc32`` guards each payload against damage SQLite cannot see (the
main database file has no page checksums).

Threads: the spool-writer thread calls ``append``; the delivery thread calls everything else.
There are two connections: the append connection (used only by ``append``) and the delivery
connection, each behind its own lock so even a caller that mixes threads stays safe. Every write
transaction also holds ``_write_lock``: SQLite admits one writer at a time anyway, and
serialising writers here keeps the in-memory counters (records, bytes) exactly in step with the
database. Reads (the claimed batch, the due check, stats) take no write lock: in WAL mode a reader
never blocks the writer, so a slow drain never stalls ``append``. All write transactions are
``BEGIN IMMEDIATE`` so no transaction ever has to upgrade a stale read snapshot.

Durability: every method that changes the spool has committed when it returns, and a commit is in
the WAL (the OS page cache at least), so it survives ``kill -9`` of the process. Against a power
cut, ``fsync_interval_s`` is the bound:

* ``fsync_interval_s == 0``: ``synchronous=FULL``; SQLite fsyncs the WAL at every commit, so a
  returned call is on stable storage.
* ``fsync_interval_s > 0``: ``synchronous=NORMAL`` (SQLite fsyncs only at checkpoints: the WAL
  before its frames are copied back, the database after) plus the ``spool-fsync`` thread, which
  every ``fsync_interval_s`` fsyncs the WAL file whenever something was committed since its last
  pass. A commit is therefore on stable storage at most ``fsync_interval_s`` (plus the duration
  of one fsync) after it returned, or earlier if a checkpoint ran; a power cut loses at most the
  commits of that last interval, never a torn or reordered state (WAL frames are checksummed and
  recovery keeps a prefix of commits). The thread exists because the bound must hold when no
  call arrives at all (an idle market, a stalled API).

Size bound and full policy: ``max_bytes`` bounds the payload bytes. When an append would exceed
it, the oldest *unclaimed* records are dropped first (for a price oracle the newest prices matter
most); if that is not enough (claimed batches fill the bound) the oldest of the incoming records
are dropped, so a single append larger than the whole bound keeps its newest records that fit.
Records of a claimed batch are never dropped: the API may already have stored them and their
batch must be re-sent with identical bytes. Drops are returned by ``append`` and counted in
``stats().dropped_total``.

Corruption: SQLite replays a WAL only up to the first frame that fails its checksum chain, and
not at all when the WAL header is bad, silently. So at open a damaged WAL (bad header, or a bad
frame followed by more frames of the same generation) is moved aside as
``spool.db.corrupt-<time>-wal`` and replaced by a rebuilt WAL holding every frame that still
verifies, re-signed. Then ``PRAGMA quick_check`` runs. A database that fails it, or raises
SQLite's CORRUPT/NOTADB errors, or is zero-length, is moved aside as ``spool.db.corrupt-<time>``
(its WAL with it), a fresh spool is created, and every row still readable by SELECT is copied
over in one transaction, skipping unreadable regions row by row. Claimed batches whose members
all survived keep their key and attempts (so the re-send dedups at the API); the survivors of
incomplete batches go back to waiting under a new key (the API may then store some twice:
at-least-once beats loss). Rows that read back but fail their checksum go to the dead-letter file.
What could not be read is counted in ``stats().corrupt_lost_total`` and logged at ERROR as
``spool_corrupt``; when it cannot be counted (an unreadable header, dropped WAL frames, which
hold pages rather than records) ``lost_unknown`` says so. The process always goes on: a damaged
spool never causes a crash loop. Environmental failures (unwritable directory, disk full) raise
:class:`SpoolError` instead; the caller decides.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sqlite3
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

from collectors.errors import SpoolError
from collectors.model import iso_from_ns

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DB_NAME = "spool.db"
LOCK_NAME = "spool.lock"
DEAD_LETTER_NAME = "dead-letter.jsonl"
DEFAULT_MAX_BYTES = 256 * 1024 * 1024  # about 600k records of 400 bytes: hours of API outage

_SCHEMA = (
    """CREATE TABLE records (
        id INTEGER PRIMARY KEY,
        appended_ns INTEGER NOT NULL,
        batch_id INTEGER,
        crc32 INTEGER NOT NULL,
        payload BLOB NOT NULL
    )""",
    """CREATE TABLE batches (
        id INTEGER PRIMARY KEY,
        key TEXT NOT NULL UNIQUE,
        first_id INTEGER NOT NULL,
        last_id INTEGER NOT NULL,
        n_records INTEGER NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        created_ns INTEGER NOT NULL,
        claimed_ns INTEGER NOT NULL
    )""",
    # Per-key high-water marks (e.g. the last exchange sequence per product) of the records
    # committed here, so a restarted collector drops the venue's replay of what it already has.
    """CREATE TABLE marks (
        key TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    )""",
)

# Every wait on another connection is bounded; with one process per spool (the flock) and
# writers serialised in Python, only a checkpoint can make SQLite wait at all.
_BUSY_TIMEOUT_S = 10.0
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26
_MAX_ROWID = 2**63 - 1
_WAL_MAGICS = (0x377F0682, 0x377F0683)
_WAL_VERSION = 3007000
_WAL_SCAN_LIMIT_BYTES = 64 * 1024 * 1024  # larger WALs are left to SQLite's own recovery
_WAL_SIZE_LIMIT_BYTES = 8 * 1024 * 1024  # journal_size_limit: a reset WAL is cut back to this
_VACUUM_MIN_FREE_PAGES = 1024  # 4 MiB of free pages are kept for reuse
_VACUUM_STEP_PAGES = 1024  # bounded so one ack never holds the write lock for long


@dataclass(frozen=True, slots=True)
class Batch:
    """A claimed batch: what one POST sends, identical on every retry and after a restart."""

    key: str  # Idempotency-Key (uuid4 hex), persisted with the batch
    records: tuple[bytes, ...]  # each record's compact JSON, exactly as appended
    first_id: int
    last_id: int
    attempts: int  # delivery attempts recorded so far (persisted)
    created_ns: int  # epoch ns when the oldest record was appended

    def body(self) -> bytes:
        """The request body, byte for byte the same for the same batch."""
        return b'{"feeds":[' + b",".join(self.records) + b"]}"


@dataclass(frozen=True, slots=True)
class SpoolStats:
    """A snapshot of the spool for metrics and `chrono-collector status`."""

    records: int  # records on disk, waiting or claimed
    claimed_records: int  # of which belong to claimed batches
    payload_bytes: int  # sum of record sizes (what max_bytes bounds)
    file_bytes: int  # spool.db + spool.db-wal on disk
    oldest_record_ns: int | None  # append time of the oldest record
    batches_claimed: int
    dropped_total: int  # dropped by the full policy since open
    corrupt_lost_total: int  # lost to file damage since open (salvage + checksum failures)


_Row = tuple[int, int, int | None, int, bytes]  # id, appended_ns, batch_id, crc32, payload
_SALVAGE_CHUNK = 5000


@dataclass(slots=True)
class _Salvage:
    """What could be read out of a damaged database."""

    sink: Callable[[list[_Row]], None]  # receives the good rows, a chunk at a time
    salvaged: int = 0
    members: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # count, first, last
    batches: dict[int, tuple[str, int, int, int, int, int, int]] = field(default_factory=dict)
    bad_payloads: list[bytes] = field(default_factory=list)  # read, but failed the checksum
    count: int | None = None  # count(*) of the damaged table, when readable
    skipped_ids: int = 0  # ids jumped over in unreadable regions (an upper bound)
    tail_unknown: bool = False  # the end of the table could not be reached
    batches_complete: bool = True


class Spool:
    """The on-disk buffer between parsing and delivery. See the module docstring for the design.

    Raises SpoolError when the directory or database cannot be used (one line: path, what failed).
    """

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        fsync_interval_s: float = 1.0,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        if not fsync_interval_s >= 0:  # also rejects NaN
            raise ValueError(f"fsync_interval_s must be >= 0, got {fsync_interval_s}")
        self._dir = Path(directory)
        self._db_path = self._dir / DB_NAME
        self._wal_path = self._dir / (DB_NAME + "-wal")
        self._shm_path = self._dir / (DB_NAME + "-shm")
        self._dead_letter_path = self._dir / DEAD_LETTER_NAME
        self._max_bytes = max_bytes
        self._fsync_interval_s = fsync_interval_s
        # Epoch time, not monotonic: append times are persisted and compared after a restart.
        self._clock_ns = clock_ns

        # _conn_lock guards the delivery connection, _write_lock every write transaction and
        # the counters below; order is always _conn_lock before _write_lock.
        self._conn_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._append_conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._records = 0
        self._bytes = 0
        self._claimed_records = 0
        self._claimed_bytes = 0
        self._batches = 0
        # Append time of the oldest waiting record, cached for the due check (which runs on
        # every wake-up of the delivery thread); None: unknown, read it. Appends never add an
        # older one, so only claims, splits and drops forget it.
        self._oldest_waiting_ns: int | None = None
        self._dropped_total = 0
        self._corrupt_lost_total = 0
        self._commit_gen = 0  # bumped after each commit; the fsync thread compares it
        self._synced_gen = 0
        self._stop = threading.Event()
        self._syncer: threading.Thread | None = None

        self._open()
        if fsync_interval_s > 0:
            self._syncer = threading.Thread(target=self._sync_loop, name="spool-fsync", daemon=True)
            self._syncer.start()

    # ------------------------------------------------------------------ public API

    def append(self, records: Sequence[bytes],
               marks: Mapping[str, int] | None = None) -> int:
        """Store `records` in one transaction; committed (survives kill -9) when it returns.

        `marks` raises per-key high-water marks in the same transaction (never lowers them), so
        a mark is on disk exactly when the records that set it are.

        Returns how many records the full policy dropped (old waiting ones or, when claimed
        batches fill the bound, the oldest of `records`). Raises SpoolError if the write fails
        (for example "database or disk is full"); nothing is stored then.
        """
        if not records:
            return 0
        now_ns = self._clock_ns()
        sizes = [len(r) for r in records]
        with self._write_lock:
            conn = self._require(self._append_conn)
            freed_records = freed_bytes = skip = 0
            with self._txn(conn, f"append of {len(records)} records"):
                # Claimed bytes count against the bound but cannot be freed (see the docstring).
                excess = self._bytes + sum(sizes) - self._max_bytes
                if excess > 0:
                    freed_records, freed_bytes = self._drop_oldest_waiting(conn, excess)
                    excess -= freed_bytes
                while excess > 0 and skip < len(records):
                    excess -= sizes[skip]
                    skip += 1
                rows = [
                    (now_ns, zlib.crc32(records[i]), records[i]) for i in range(skip, len(records))
                ]
                if rows:
                    conn.executemany(
                        "INSERT INTO records (appended_ns, crc32, payload) VALUES (?, ?, ?)", rows
                    )
                if marks:
                    conn.executemany(
                        "INSERT INTO marks (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE"
                        " SET value = max(value, excluded.value)", list(marks.items()))
            self._records += len(rows) - freed_records
            self._bytes += sum(sizes[skip:]) - freed_bytes
            dropped = freed_records + skip
            self._dropped_total += dropped
        return dropped  # the caller counts and logs drops (one place, one metric)

    def marks(self) -> dict[str, int]:
        """The high-water marks stored by `append`. Raises SpoolError."""
        with self._conn_lock:
            conn = self._require(self._conn)
            try:
                rows = conn.execute("SELECT key, value FROM marks").fetchall()
            except sqlite3.Error as exc:
                raise self._error("reading marks", exc) from exc
        return {str(k): int(v) for k, v in rows}

    def due_batch(self, max_records: int, max_age_s: float, *, force: bool = False,
                  exclude: Collection[str] = ()) -> Batch | None:
        """The batch to send now, or None.

        1. The oldest claimed but unacknowledged batch whose key is not in `exclude` (the
           batches other delivery workers hold), with its original key and records.
        2. Else a new batch claiming (persisting key and membership) the oldest waiting records,
           up to `max_records`, when at least `max_records` wait, or the oldest waiting one is
           `max_age_s` old, or `force` (the shutdown drain).
        Raises SpoolError if the database fails.
        """
        if max_records < 1:
            raise ValueError(f"max_records must be >= 1, got {max_records}")
        with self._conn_lock:
            conn = self._require(self._conn)
            batch: Batch | None = None
            while self._batches:  # claimed batches exist (else no need to look)
                batch = self._oldest_claimed(conn, exclude)
                if batch is None or batch.records:
                    break
                self._forget_empty_batch(conn, batch.key)  # cannot happen unless hand-edited
            if batch is not None:
                return batch
            if not self._looks_due(conn, max_records, max_age_s, force):
                return None
            with self._write_lock:
                return self._claim(conn, max_records, max_age_s, force)

    def seconds_until_due(self, max_age_s: float) -> float | None:
        """How long until the oldest waiting record is `max_age_s` old (0: now), or None when
        nothing waits. For the delivery thread's sleep between checks; raises SpoolError."""
        if self._records - self._claimed_records <= 0:
            return None
        oldest_ns = self._oldest_waiting_ns
        if oldest_ns is None:
            with self._conn_lock:
                conn = self._require(self._conn)
                try:
                    row = conn.execute("SELECT appended_ns FROM records WHERE batch_id IS NULL"
                                       " ORDER BY id LIMIT 1").fetchone()
                except sqlite3.Error as exc:
                    raise self._error("due check", exc) from exc
            if row is None:
                return None
            oldest_ns = int(row[0])
        return max(0.0, oldest_ns / 1e9 + max_age_s - self._clock_ns() / 1e9)

    def record_attempt(self, key: str) -> None:
        """Count one delivery attempt of the claimed batch `key` (persisted).

        Raises SpoolError if no claimed batch has that key or the database fails.
        """
        with self._conn_lock, self._write_lock:
            conn = self._require(self._conn)
            with self._txn(conn, "record_attempt"):
                cur = conn.execute(
                    "UPDATE batches SET attempts = attempts + 1 WHERE key = ?", (key,)
                )
                if cur.rowcount != 1:
                    raise SpoolError(f"spool {self._db_path}: no claimed batch with key {key!r}")

    def ack(self, key: str) -> int:
        """The API stored batch `key`: delete its records. Returns how many (0 if unknown key).

        Raises SpoolError if the database fails (the batch then stays claimed).
        """
        with self._conn_lock:
            conn = self._require(self._conn)
            with self._write_lock:
                removed = self._remove_batch(conn, key, "ack", None)
            if removed:
                self._maybe_vacuum(conn)
            return removed

    def dead_letter(self, key: str, status: int, reason: str) -> int:
        """Move batch `key` to dead-letter.jsonl with the API's status and reason.

        Appends one JSON line {"dead_lettered_at", "idempotency_key", "status", "reason",
        "feeds": [records]} and fsyncs it, then deletes the records. Returns how many (0 if
        unknown key). A crash between the two steps writes the line again on the next attempt:
        the file may hold a batch twice, never lose one. Raises SpoolError if the file or the
        database cannot be written (the batch then stays claimed).
        """
        with self._conn_lock:
            conn = self._require(self._conn)
            with self._write_lock:
                removed = self._remove_batch(conn, key, "dead_letter", (status, reason))
            if removed:
                self._maybe_vacuum(conn)
            return removed

    def split(self, key: str, reject: Collection[int], status: int, reason: str) -> tuple[int, int]:
        """Break up batch `key` that the API refused as a whole (it stored none of it): the
        records at positions `reject` (0-based, batch order) go to the dead-letter file, the
        others back to waiting, in their original order, to be claimed into new batches under
        new keys. Returns (dead-lettered, released); (0, 0) for an unknown key. Raises SpoolError.
        """
        with self._conn_lock:
            conn = self._require(self._conn)
            with self._write_lock, self._txn(conn, "split"):
                row = conn.execute(
                    "SELECT id, first_id, last_id FROM batches WHERE key = ?", (key,)
                ).fetchone()
                if row is None:
                    return 0, 0
                batch_id, first_id, last_id = (int(v) for v in row)
                span = (first_id, last_id, batch_id)
                members = [(int(r[0]), bytes(r[1])) for r in conn.execute(
                    "SELECT id, payload FROM records WHERE id BETWEEN ? AND ? AND batch_id = ?"
                    " ORDER BY id", span)]
                bad = [members[i] for i in sorted(set(reject)) if 0 <= i < len(members)]
                if bad:
                    self._write_dead_letter(key, status, reason, [p for _, p in bad])
                    conn.executemany("DELETE FROM records WHERE id = ?", [(i,) for i, _ in bad])
                conn.execute("UPDATE records SET batch_id = NULL WHERE id BETWEEN ? AND ?"
                             " AND batch_id = ?", span)
                conn.execute("DELETE FROM batches WHERE id = ?", (batch_id,))
            self._oldest_waiting_ns = None  # the released records are waiting again
            bad_bytes = sum(len(p) for _, p in bad)
            self._records -= len(bad)
            self._bytes -= bad_bytes
            self._claimed_records -= len(members)
            self._claimed_bytes -= sum(len(p) for _, p in members)
            self._batches -= 1
            return len(bad), len(members) - len(bad)

    def stats(self) -> SpoolStats:
        """Counts for metrics. Raises SpoolError if the spool is closed or the database fails."""
        with self._conn_lock:
            conn = self._require(self._conn)
            try:
                row = conn.execute("SELECT appended_ns FROM records ORDER BY id LIMIT 1").fetchone()
            except sqlite3.Error as exc:
                raise self._error("stats", exc) from exc
            with self._write_lock:
                counts = (
                    self._records,
                    self._claimed_records,
                    self._bytes,
                    self._batches,
                    self._dropped_total,
                    self._corrupt_lost_total,
                )
        file_bytes = 0
        for path in (self._db_path, self._wal_path):
            with contextlib.suppress(OSError):
                file_bytes += path.stat().st_size
        return SpoolStats(
            records=counts[0],
            claimed_records=counts[1],
            payload_bytes=counts[2],
            file_bytes=file_bytes,
            oldest_record_ns=None if row is None else int(row[0]),
            batches_claimed=counts[3],
            dropped_total=counts[4],
            corrupt_lost_total=counts[5],
        )

    def sync(self) -> None:
        """Make every commit so far durable against power loss now (fsync the WAL).

        Raises SpoolError if the fsync fails.
        """
        try:
            self._sync_wal()
        except OSError as exc:
            raise SpoolError(f"spool {self._wal_path}: fsync failed: {exc.strerror}") from exc

    def close(self) -> None:
        """Stop the fsync thread, close the database (SQLite checkpoints it) and the lock.

        Idempotent. Later calls to other methods raise SpoolError.
        """
        self._stop.set()
        if self._syncer is not None:
            self._syncer.join(timeout=max(10.0, 2 * self._fsync_interval_s))
            self._syncer = None
        with self._conn_lock, self._write_lock:
            if self._conn is None and self._append_conn is None and self._lock_fd is None:
                return
            with contextlib.suppress(OSError):
                self._sync_wal()
            self._close_connections()
            self._release_lock()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ opening

    def _open(self) -> None:
        self._prepare_directory()
        self._acquire_lock()
        try:
            self._check_wal()
            problem = self._open_main()
            if problem is not None:
                self._salvage(problem)
            self._append_conn = self._connect(self._db_path)
            self._load_counters()
            self._fsync_dir()
        except BaseException:
            self._close_connections()
            self._release_lock()
            raise

    def _prepare_directory(self) -> None:
        where = f"spool directory {self._dir}"
        try:
            self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except FileExistsError as exc:
            raise SpoolError(f"{where}: exists and is not a directory") from exc
        except OSError as exc:
            raise SpoolError(f"{where}: cannot create it: {exc.strerror}") from exc
        if not self._dir.is_dir():
            raise SpoolError(f"{where}: exists and is not a directory")
        # Probe with a real create+write+fsync: permission bits lie to root, and a read-only
        # mount, an immutable directory or a full disk show up only when you try.
        probe = self._dir / f".probe-{os.getpid()}-{threading.get_ident()}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, b"probe\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            probe.unlink()
        except OSError as exc:
            with contextlib.suppress(OSError):
                probe.unlink()
            raise SpoolError(f"{where}: not writable: {exc.strerror}") from exc

    def _acquire_lock(self) -> None:
        path = self._dir / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise SpoolError(f"spool lock {path}: cannot open: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise SpoolError(
                f"spool directory {self._dir}: in use by another process (pid {holder})"
            ) from exc
        except OSError as exc:
            os.close(fd)
            raise SpoolError(f"spool lock {path}: cannot lock: {exc.strerror}") from exc
        with contextlib.suppress(OSError):  # the pid is only a diagnostic for the error above
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def _connect(self, path: Path) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                str(path),
                timeout=_BUSY_TIMEOUT_S,
                isolation_level=None,  # we issue BEGIN IMMEDIATE / COMMIT ourselves
                check_same_thread=False,  # each connection is guarded by its own lock
            )
        except sqlite3.Error as exc:
            raise SpoolError(f"spool database {path}: cannot open: {exc}") from exc
        try:
            # auto_vacuum only takes effect on a new, empty database, so it must come before
            # the journal mode (which writes the first page); on ours it is already set.
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
            row = conn.execute("PRAGMA journal_mode=WAL").fetchone()
            if row is None or str(row[0]).lower() != "wal":
                raise SpoolError(f"spool database {path}: cannot switch to WAL mode ({row!r})")
            sync = "FULL" if self._fsync_interval_s == 0 else "NORMAL"
            conn.execute(f"PRAGMA synchronous={sync}")
            # A checkpointed WAL is reused, not shrunk; cap what a burst leaves on disk.
            conn.execute(f"PRAGMA journal_size_limit={_WAL_SIZE_LIMIT_BYTES}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _open_main(self) -> str | None:
        """Open spool.db into self._conn; return why it is damaged instead, or None."""
        try:
            empty = self._db_path.stat().st_size == 0
        except FileNotFoundError:
            empty = False
        except OSError as exc:
            raise SpoolError(
                f"spool database {self._db_path}: cannot stat: {exc.strerror}"
            ) from exc
        # Setting WAL mode writes the first page at once, so a spool.db we created is never empty:
        # an empty one means the file system lost its content.
        if empty and self._wal_bytes() == 0:
            return "zero-length database file"
        conn: sqlite3.Connection | None = None
        try:
            conn = self._connect(self._db_path)
            version = _int_or_none(conn.execute("PRAGMA user_version").fetchone())
            if version == 0:
                tables = conn.execute("SELECT name FROM sqlite_master").fetchall()
                if tables:
                    raise SpoolError(
                        f"spool database {self._db_path}: not a spool database "
                        f"(user_version 0 with tables {[str(t[0]) for t in tables][:5]})"
                    )
                self._create_schema(conn)
            elif version is None or version > SCHEMA_VERSION:
                raise SpoolError(
                    f"spool database {self._db_path}: schema version {version} is newer than "
                    f"this program's {SCHEMA_VERSION}; refusing to touch it"
                )
            else:
                result = [str(r[0]) for r in conn.execute("PRAGMA quick_check").fetchall()]
                if result != ["ok"]:
                    conn.close()
                    return "quick_check: " + "; ".join(result[:3])
        except sqlite3.DatabaseError as exc:
            if conn is not None:
                conn.close()
            if _is_corruption(exc):
                return str(exc)
            raise SpoolError(f"spool database {self._db_path}: cannot open: {exc}") from exc
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        self._conn = conn
        return None

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise

    def _load_counters(self) -> None:
        conn = self._require(self._conn)
        try:
            total = conn.execute(
                "SELECT count(*), coalesce(sum(length(payload)), 0) FROM records"
            ).fetchone()
            claimed = conn.execute(
                "SELECT count(*), coalesce(sum(length(payload)), 0) FROM records"
                " WHERE batch_id IS NOT NULL"
            ).fetchone()
            batches = conn.execute("SELECT count(*) FROM batches").fetchone()
        except sqlite3.Error as exc:
            raise self._error("reading counters", exc) from exc
        self._records, self._bytes = int(total[0]), int(total[1])
        self._claimed_records, self._claimed_bytes = int(claimed[0]), int(claimed[1])
        self._batches = int(batches[0])

    # ------------------------------------------------------------------ damaged files

    def _wal_bytes(self) -> int:
        try:
            return self._wal_path.stat().st_size
        except FileNotFoundError:
            return 0

    def _check_wal(self) -> None:
        """Repair a damaged WAL before SQLite silently ignores all or part of it.

        SQLite replays the WAL only up to the first frame failing its checksum chain, and not
        at all when the header is bad. The damaged file is moved aside; in its place goes a
        rebuilt WAL holding every frame of the current generation that still verifies (each
        frame header stores the running checksum, so a frame can be checked on its own given
        its predecessor's header), re-signed under a valid header.
        """
        size = self._wal_bytes()
        if size == 0:
            return
        if not self._db_path.exists():
            self._set_aside_wal("WAL without its database file", size, None)
            return
        if size > _WAL_SCAN_LIMIT_BYTES:
            return  # too big to scan at open; SQLite's own recovery still applies
        try:
            data = self._wal_path.read_bytes()
        except OSError as exc:
            raise SpoolError(f"spool WAL {self._wal_path}: cannot read: {exc.strerror}") from exc
        problem = _wal_problem(data)
        if problem is not None:
            self._set_aside_wal(problem, size, _wal_rebuild(data, self._db_page_size()))

    def _db_page_size(self) -> int | None:
        try:
            with self._db_path.open("rb") as f:
                head = f.read(18)
        except OSError:
            return None
        if len(head) < 18 or not head.startswith(b"SQLite format 3\0"):
            return None
        size = int.from_bytes(head[16:18], "big")
        return 65536 if size == 1 else size

    def _set_aside_wal(
        self, problem: str, size: int, rebuilt: tuple[bytes, int, int] | None
    ) -> None:
        wal_aside = Path(str(self._aside_path()) + "-wal")
        try:
            os.replace(self._wal_path, wal_aside)
            if rebuilt is not None:
                tmp = self._wal_path.with_name(self._wal_path.name + ".tmp")
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
                try:
                    view = memoryview(rebuilt[0])
                    while view:
                        view = view[os.write(fd, view) :]
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, self._wal_path)
            # The -shm index describes the old WAL; no connection is open yet (we hold the
            # directory lock), so drop it and let SQLite index the rebuilt WAL from scratch.
            with contextlib.suppress(FileNotFoundError):
                self._shm_path.unlink()
            self._fsync_dir()
        except OSError as exc:
            raise SpoolError(
                f"spool WAL {self._wal_path}: damaged ({problem}) and cannot be set aside: "
                f"{exc.strerror}"
            ) from exc
        kept, dropped = (rebuilt[1], rebuilt[2]) if rebuilt is not None else (0, None)
        log.error(
            "spool_corrupt",
            extra={
                "spool_path": str(self._wal_path),
                "moved_to": str(wal_aside),
                "problem": problem,
                "wal_bytes": size,
                "wal_frames_kept": kept,
                "wal_frames_dropped": dropped,
                # Frames hold pages, not records: what they held cannot be counted.
                "lost_records": 0,
                "lost_unknown": dropped != 0,
            },
        )

    def _aside_path(self) -> Path:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        base = self._dir / f"{DB_NAME}.corrupt-{stamp}"
        candidate, n = base, 1
        while candidate.exists() or Path(str(candidate) + "-wal").exists():
            candidate = Path(f"{base}-{n}")
            n += 1
        return candidate

    def _salvage(self, problem: str) -> None:
        """Move the damaged database aside, start afresh, copy over what can still be read."""
        aside = self._aside_path()
        try:
            if self._db_path.exists():
                os.replace(self._db_path, aside)
            if self._wal_bytes():
                os.replace(self._wal_path, str(aside) + "-wal")
            with contextlib.suppress(FileNotFoundError):
                self._wal_path.unlink()  # an empty WAL holds nothing worth keeping
            with contextlib.suppress(FileNotFoundError):
                self._shm_path.unlink()
            self._fsync_dir()
        except OSError as exc:
            raise SpoolError(
                f"spool database {self._db_path}: damaged ({problem}) and cannot be moved "
                f"aside: {exc.strerror}"
            ) from exc
        conn = self._connect(self._db_path)
        try:
            self._create_schema(conn)
        except sqlite3.Error as exc:
            conn.close()
            raise SpoolError(f"spool database {self._db_path}: cannot create: {exc}") from exc
        self._conn = conn

        def insert(rows: list[_Row]) -> None:
            conn.executemany(
                "INSERT INTO records (id, appended_ns, batch_id, crc32, payload)"
                " VALUES (?, ?, ?, ?, ?)",
                rows,
            )

        # One transaction, streamed in chunks (a full spool need not fit in memory): the
        # salvage lands whole or not at all.
        with self._write_lock, self._txn(conn, "salvage"):
            found = _read_salvage(aside, insert)
            # Only whole batches keep their key (same key, same body); the members of the
            # others go back to waiting and will be sent under a new key.
            kept = {
                bid: info
                for bid, info in found.batches.items()
                if found.members.get(bid) == (info[3], info[1], info[2])
            }
            conn.executemany(
                "INSERT INTO batches (id, key, first_id, last_id, n_records, attempts,"
                " created_ns, claimed_ns) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(bid, *info) for bid, info in kept.items()],
            )
            conn.execute(
                "UPDATE records SET batch_id = NULL WHERE batch_id IS NOT NULL"
                " AND batch_id NOT IN (SELECT id FROM batches)"
            )
            if found.bad_payloads:
                self._write_dead_letter(
                    None,
                    0,
                    f"spool_corrupt: checksum mismatch while salvaging {aside.name}",
                    found.bad_payloads,
                )
        rekeyed = len([b for b in found.members if b not in kept])
        # The read-only connection leaves an index and maybe an empty WAL behind: not evidence.
        with contextlib.suppress(FileNotFoundError):
            Path(str(aside) + "-shm").unlink()
        aside_wal = Path(str(aside) + "-wal")
        with contextlib.suppress(OSError):
            if aside_wal.stat().st_size == 0:
                aside_wal.unlink()

        if found.count is not None:
            lost = max(0, found.count - found.salvaged)
        else:
            lost = found.skipped_ids + len(found.bad_payloads)
        lost_unknown = found.tail_unknown and found.count is None
        self._corrupt_lost_total += lost
        log.error(
            "spool_corrupt",
            extra={
                "spool_path": str(self._db_path),
                "moved_to": str(aside),
                "problem": problem,
                "salvaged_records": found.salvaged,
                "lost_records": lost,
                "lost_unknown": lost_unknown,
                "dead_lettered_records": len(found.bad_payloads),
                "batches_kept": len(kept),
                "batches_rekeyed": rekeyed,
                "batches_table_complete": found.batches_complete,
            },
        )

    # ------------------------------------------------------------------ transactions

    @contextlib.contextmanager
    def _txn(self, conn: sqlite3.Connection, what: str) -> Iterator[None]:
        """One write transaction. The caller holds _write_lock."""
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            _rollback(conn)
            raise self._error(what, exc) from exc
        except BaseException:
            _rollback(conn)
            raise
        self._commit_gen += 1

    def _error(self, what: str, exc: sqlite3.Error) -> SpoolError:
        name = getattr(exc, "sqlite_errorname", "")
        suffix = f" ({name})" if name else ""
        return SpoolError(f"spool {self._db_path}: {what} failed: {exc}{suffix}")

    def _require(self, conn: sqlite3.Connection | None) -> sqlite3.Connection:
        if conn is None:
            raise SpoolError(f"spool {self._dir} is closed")
        return conn

    def _close_connections(self) -> None:
        # The delivery connection closes last: the last close checkpoints and removes the WAL.
        for attr in ("_append_conn", "_conn"):
            conn: sqlite3.Connection | None = getattr(self, attr)
            if conn is not None:
                setattr(self, attr, None)
                try:
                    conn.close()
                except sqlite3.Error as exc:
                    log.warning("spool_close_failed", extra={"error": str(exc)})

    # ------------------------------------------------------------------ the work

    def _drop_oldest_waiting(self, conn: sqlite3.Connection, excess: int) -> tuple[int, int]:
        """Delete the oldest unclaimed records until `excess` bytes are free (or none are left)."""
        self._oldest_waiting_ns = None
        waiting = self._records - self._claimed_records
        waiting_bytes = self._bytes - self._claimed_bytes
        if waiting <= 0:
            return 0, 0
        if excess >= waiting_bytes:
            conn.execute("DELETE FROM records WHERE batch_id IS NULL")
            return waiting, waiting_bytes
        freed = count = 0
        upto = None
        cur = conn.execute(
            "SELECT id, length(payload) FROM records WHERE batch_id IS NULL ORDER BY id"
        )
        try:
            while freed < excess:
                chunk = cur.fetchmany(256)
                if not chunk:
                    break
                for rid, size in chunk:
                    upto = int(rid)
                    freed += int(size)
                    count += 1
                    if freed >= excess:
                        break
        finally:
            cur.close()
        if upto is not None:
            conn.execute("DELETE FROM records WHERE batch_id IS NULL AND id <= ?", (upto,))
        return count, freed

    def _oldest_claimed(self, conn: sqlite3.Connection,
                        exclude: Collection[str] = ()) -> Batch | None:
        skip = sorted(exclude)
        where = f" WHERE key NOT IN ({', '.join(['?'] * len(skip))})" if skip else ""
        try:
            conn.execute("BEGIN")  # one snapshot for the batch row and its members
            try:
                row = conn.execute(
                    "SELECT id, key, first_id, last_id, attempts, created_ns FROM batches"
                    f"{where} ORDER BY first_id, id LIMIT 1", skip
                ).fetchone()
                if row is None:
                    return None
                batch_id, key, first_id, last_id, attempts, created_ns = row
                payloads = conn.execute(
                    "SELECT payload FROM records WHERE id BETWEEN ? AND ? AND batch_id = ?"
                    " ORDER BY id",
                    (first_id, last_id, batch_id),
                ).fetchall()
            finally:
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            _rollback(conn)
            raise self._error("reading the claimed batch", exc) from exc
        return Batch(
            key=str(key),
            records=tuple(bytes(p[0]) for p in payloads),
            first_id=int(first_id),
            last_id=int(last_id),
            attempts=int(attempts),
            created_ns=int(created_ns),
        )

    def _forget_empty_batch(self, conn: sqlite3.Connection, key: str) -> None:
        with self._write_lock, self._txn(conn, "forget an empty batch"):
            if conn.execute("DELETE FROM batches WHERE key = ?", (key,)).rowcount:
                self._batches -= 1

    def _looks_due(
        self, conn: sqlite3.Connection, max_records: int, max_age_s: float, force: bool
    ) -> bool:
        """Cheap pre-check without the write lock; _claim decides again inside its transaction."""
        waiting = self._records - self._claimed_records
        if waiting <= 0:
            return False
        if force or waiting >= max_records:
            return True
        oldest_ns = self._oldest_waiting_ns
        if oldest_ns is None:
            try:
                row = conn.execute(
                    "SELECT appended_ns FROM records WHERE batch_id IS NULL ORDER BY id LIMIT 1"
                ).fetchone()
            except sqlite3.Error as exc:
                raise self._error("due check", exc) from exc
            if row is None:
                return False
            # A race with a drop can only leave this too old: _claim checks again.
            oldest_ns = self._oldest_waiting_ns = int(row[0])
        return self._clock_ns() - oldest_ns >= max_age_s * 1e9

    def _claim(
        self, conn: sqlite3.Connection, max_records: int, max_age_s: float, force: bool
    ) -> Batch | None:
        """Claim the oldest waiting records as a new batch. The caller holds both locks."""
        self._oldest_waiting_ns = None
        batch: Batch | None = None
        good: list[tuple[int, int, bytes]] = []
        bad: list[tuple[int, bytes]] = []
        with self._txn(conn, "claim a batch"):
            rows = conn.execute(
                "SELECT id, appended_ns, crc32, payload FROM records WHERE batch_id IS NULL"
                " ORDER BY id LIMIT ?",
                (max_records,),
            ).fetchall()
            if not rows:
                return None
            age_ns = self._clock_ns() - int(rows[0][1])
            if not (force or len(rows) >= max_records or age_ns >= max_age_s * 1e9):
                return None
            for rid, appended_ns, crc, payload in rows:
                data = bytes(payload)
                if zlib.crc32(data) == int(crc):
                    good.append((int(rid), int(appended_ns), data))
                else:
                    bad.append((int(rid), data))
            if bad:
                self._write_dead_letter(
                    None, 0, "spool_corrupt: record failed its checksum", [b[1] for b in bad]
                )
                conn.executemany("DELETE FROM records WHERE id = ?", [(b[0],) for b in bad])
            if good:
                key = uuid.uuid4().hex
                first_id, last_id = good[0][0], good[-1][0]
                cur = conn.execute(
                    "INSERT INTO batches (key, first_id, last_id, n_records, attempts,"
                    " created_ns, claimed_ns) VALUES (?, ?, ?, ?, 0, ?, ?)",
                    (key, first_id, last_id, len(good), good[0][1], self._clock_ns()),
                )
                updated = conn.execute(
                    "UPDATE records SET batch_id = ? WHERE id BETWEEN ? AND ? AND batch_id IS NULL",
                    (cur.lastrowid, first_id, last_id),
                ).rowcount
                if updated != len(good):
                    raise SpoolError(
                        f"spool {self._db_path}: claim marked {updated} records, expected "
                        f"{len(good)}"
                    )
                batch = Batch(key, tuple(g[2] for g in good), first_id, last_id, 0, good[0][1])
        good_bytes = sum(len(g[2]) for g in good)
        bad_bytes = sum(len(b[1]) for b in bad)
        self._records -= len(bad)
        self._bytes -= bad_bytes
        self._corrupt_lost_total += len(bad)
        if bad:
            log.error(
                "spool_corrupt",
                extra={
                    "spool_path": str(self._db_path),
                    "problem": "record checksum mismatch",
                    "lost_records": len(bad),
                    "dead_lettered_records": len(bad),
                },
            )
        if batch is not None:
            self._claimed_records += len(good)
            self._claimed_bytes += good_bytes
            self._batches += 1
        return batch

    def _remove_batch(
        self, conn: sqlite3.Connection, key: str, what: str, dead: tuple[int, str] | None
    ) -> int:
        """Delete batch `key` and its records (writing them to the dead-letter file first)."""
        with self._txn(conn, what):
            row = conn.execute(
                "SELECT id, first_id, last_id FROM batches WHERE key = ?", (key,)
            ).fetchone()
            if row is None:
                return 0
            batch_id, first_id, last_id = (int(v) for v in row)
            span = (first_id, last_id, batch_id)
            if dead is not None:
                payloads = [
                    bytes(p[0])
                    for p in conn.execute(
                        "SELECT payload FROM records WHERE id BETWEEN ? AND ? AND batch_id = ?"
                        " ORDER BY id",
                        span,
                    )
                ]
                count, size = len(payloads), sum(len(p) for p in payloads)
                self._write_dead_letter(key, dead[0], dead[1], payloads)
            else:
                count_row = conn.execute(
                    "SELECT count(*), coalesce(sum(length(payload)), 0) FROM records"
                    " WHERE id BETWEEN ? AND ? AND batch_id = ?",
                    span,
                ).fetchone()
                count, size = int(count_row[0]), int(count_row[1])
            conn.execute("DELETE FROM records WHERE id BETWEEN ? AND ? AND batch_id = ?", span)
            conn.execute("DELETE FROM batches WHERE id = ?", (batch_id,))
        self._records -= count
        self._bytes -= size
        self._claimed_records -= count
        self._claimed_bytes -= size
        self._batches -= 1
        return count

    def _maybe_vacuum(self, conn: sqlite3.Connection) -> None:
        """Give free pages back to the file system a step at a time after a backlog drained."""
        try:
            free = _int_or_none(conn.execute("PRAGMA freelist_count").fetchone()) or 0
            pages = _int_or_none(conn.execute("PRAGMA page_count").fetchone()) or 0
            if free < _VACUUM_MIN_FREE_PAGES or free * 2 < pages:
                return
            with self._write_lock:
                # executescript, because a Python execute() steps this pragma only once, which
                # frees a single page; in autocommit mode it runs as one transaction of its own.
                conn.executescript(f"PRAGMA incremental_vacuum({_VACUUM_STEP_PAGES});")
                self._commit_gen += 1
        except (sqlite3.Error, SpoolError) as exc:
            # Only disk space is at stake and the next ack tries again.
            log.warning("spool_vacuum_failed", extra={"error": str(exc)})

    def _write_dead_letter(
        self, key: str | None, status: int, reason: str, payloads: Sequence[bytes]
    ) -> None:
        head = json.dumps(
            {
                "dead_lettered_at": iso_from_ns(self._clock_ns()),
                "idempotency_key": key,
                "status": status,
                "reason": reason,
            },
            separators=(",", ":"),
            ensure_ascii=False,
        ).encode()
        line = head[:-1] + b',"feeds":[' + b",".join(_json_value(p) for p in payloads) + b"]}\n"
        path = self._dead_letter_path
        created = not path.exists()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise SpoolError(f"dead-letter file {path}: cannot open: {exc.strerror}") from exc
        try:
            start = os.fstat(fd).st_size
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except OSError as exc:
                with contextlib.suppress(OSError):  # never leave half a line behind
                    os.ftruncate(fd, start)
                raise SpoolError(f"dead-letter file {path}: cannot write: {exc.strerror}") from exc
        finally:
            os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                self._fsync_dir()

    # ------------------------------------------------------------------ durability

    def _sync_loop(self) -> None:
        # The power-cut bound must hold even when nobody calls us, hence a thread of our own.
        while not self._stop.wait(self._fsync_interval_s):
            try:
                self._sync_wal()
            except OSError as exc:
                log.error(
                    "spool_fsync_failed",
                    extra={"spool_path": str(self._wal_path), "error": exc.strerror},
                )

    def _sync_wal(self) -> None:
        gen = self._commit_gen  # read first: commits after this point wait for the next pass
        if gen == self._synced_gen:
            return
        try:
            fd = os.open(self._wal_path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            # No WAL: the last close checkpointed everything into the (synced) database.
            self._synced_gen = gen
            return
        try:
            os.fsync(fd)  # any descriptor of the file flushes all of its dirty pages
        finally:
            os.close(fd)
        self._synced_gen = gen

    def _fsync_dir(self) -> None:
        """Make created, renamed and removed directory entries durable."""
        fd = os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------- helpers


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _int_or_none(row: object) -> int | None:
    if isinstance(row, tuple) and row and isinstance(row[0], int):
        return row[0]
    return None


def _is_corruption(exc: sqlite3.DatabaseError) -> bool:
    """SQLITE_CORRUPT / SQLITE_NOTADB; environmental errors (full, I/O, locked) are not."""
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    return not isinstance(exc, sqlite3.OperationalError)


def _json_value(payload: bytes) -> bytes:
    """A record as a JSON value for the dead-letter line: itself if it is one line of JSON."""
    try:
        json.loads(payload)
    except ValueError:  # includes UnicodeDecodeError
        pass
    else:
        if b"\n" not in payload and b"\r" not in payload:
            return payload
    return json.dumps(payload.decode("utf-8", "replace")).encode()


def _wal_checksum(data: bytes, big_endian: bool, s0: int, s1: int) -> tuple[int, int]:
    """SQLite's WAL checksum (a Fletcher-like sum over 32-bit words), continued from (s0, s1)."""
    for x0, x1 in struct.iter_unpack(">II" if big_endian else "<II", data):
        s0 = (s0 + x0 + s1) & 0xFFFFFFFF
        s1 = (s1 + x1 + s0) & 0xFFFFFFFF
    return s0, s1


def _wal_header(data: bytes) -> tuple[int, int, bytes] | None:
    """(magic, page size, salts) of a valid WAL header, else None."""
    if len(data) < 32:
        return None
    magic, version, page_size, _seq, _s1, _s2, ck1, ck2 = struct.unpack(">8I", data[:32])
    if (
        magic not in _WAL_MAGICS
        or version != _WAL_VERSION
        or page_size < 512
        or page_size & (page_size - 1)
    ):
        return None
    if _wal_checksum(data[:24], bool(magic & 1), 0, 0) != (ck1, ck2):
        return None
    return magic, page_size, data[16:24]


def _frame_checksum(
    data: bytes, offset: int, frame_size: int, big_endian: bool, prev: tuple[int, int]
) -> tuple[int, int]:
    s = _wal_checksum(data[offset : offset + 8], big_endian, *prev)
    return _wal_checksum(data[offset + 24 : offset + frame_size], big_endian, *s)


def _u32_pair(data: bytes, offset: int) -> tuple[int, int]:
    first, second = struct.unpack_from(">II", data, offset)
    return int(first), int(second)


def _frame_ck(data: bytes, offset: int) -> tuple[int, int]:
    """The running checksum stored in the header of the frame at `offset`."""
    return _u32_pair(data, offset + 16)


def _wal_problem(data: bytes) -> str | None:
    """Why this WAL content is damaged, or None.

    A torn tail (the last frames of a commit that never finished) and stale frames of an earlier
    WAL generation (other salts) are normal and SQLite ignores them. Damage is a bad header, or a
    frame failing its checksum that is followed by more frames of the same generation.
    """
    header = _wal_header(data)
    if header is None:
        return "WAL header is not valid" if len(data) >= 32 else "WAL header truncated"
    magic, page_size, salts = header
    big_endian = bool(magic & 1)
    frame_size = 24 + page_size
    prev = _u32_pair(data, 24)
    bad_frame: int | None = None
    offset, index = 32, 0
    while offset + frame_size <= len(data) and data[offset + 8 : offset + 16] == salts:
        if bad_frame is not None:
            return f"WAL frame {bad_frame} is damaged and frames after it were discarded"
        if _frame_checksum(data, offset, frame_size, big_endian, prev) != _frame_ck(data, offset):
            bad_frame = index
        prev = _frame_ck(data, offset)
        offset += frame_size
        index += 1
    return None


def _wal_guess(data: bytes, page_size_hint: int | None) -> tuple[int, int, bytes, int] | None:
    """For a WAL with a damaged header: (magic, page size, salts, first frame index).

    The first frame index is the first of two consecutive frames with the same salts where the
    second verifies against the first's stored checksum; that settles page size and byte order.
    """
    sizes = [page_size_hint] if page_size_hint else []
    sizes += [4096, 1024, 2048, 8192, 16384, 32768, 65536, 512]
    for page_size in dict.fromkeys(sizes):
        frame_size = 24 + page_size
        frames = (len(data) - 32) // frame_size
        for j in range(frames - 1):
            a = 32 + j * frame_size
            b = a + frame_size
            salts = data[a + 8 : a + 16]
            if data[b + 8 : b + 16] != salts:
                continue
            for magic in _WAL_MAGICS:
                ck = _frame_checksum(data, b, frame_size, bool(magic & 1), _frame_ck(data, a))
                if ck == _frame_ck(data, b):
                    return magic, page_size, salts, j
    return None


def _wal_rebuild(data: bytes, page_size_hint: int | None) -> tuple[bytes, int, int] | None:
    """A valid WAL with every verifiable frame of the current generation: (bytes, kept, dropped).

    With a damaged header, the first frame found by _wal_guess cannot be verified (its checksum
    chains from the lost header) and is trusted; quick_check and the record checksums back it.
    None when nothing can be rebuilt.
    """
    header = _wal_header(data)
    if header is not None:
        magic, page_size, salts = header
        first = 0
        prev: tuple[int, int] | None = _u32_pair(data, 24)
        head = bytearray(data[:32])
    else:
        guess = _wal_guess(data, page_size_hint)
        if guess is None:
            return None
        magic, page_size, salts, first = guess
        prev = None
        head = bytearray(struct.pack(">6I", magic, _WAL_VERSION, page_size, 0, 0, 0))
        head[16:24] = salts
        head += struct.pack(">II", *_wal_checksum(bytes(head), bool(magic & 1), 0, 0))
    big_endian = bool(magic & 1)
    frame_size = 24 + page_size
    kept: list[int] = []
    dropped = first
    offset = 32 + first * frame_size
    while offset + frame_size <= len(data) and data[offset + 8 : offset + 16] == salts:
        stored = _frame_ck(data, offset)
        if prev is None or _frame_checksum(data, offset, frame_size, big_endian, prev) == stored:
            kept.append(offset)
        else:
            dropped += 1
        prev = stored
        offset += frame_size
    out = bytearray(head)
    chain = _u32_pair(bytes(head), 24)
    for offset in kept:
        frame = bytearray(data[offset : offset + frame_size])
        chain = _frame_checksum(bytes(frame), 0, frame_size, big_endian, chain)
        struct.pack_into(">II", frame, 16, *chain)
        out += frame
    return bytes(out), len(kept), dropped


def _query_int(
    conn: sqlite3.Connection, sql: str, args: tuple[int, ...] = ()
) -> tuple[bool, int | None]:
    """(ok, value) of a one-integer query on a damaged database."""
    try:
        row = conn.execute(sql, args).fetchone()
    except sqlite3.DatabaseError:
        return False, None
    return True, _int_or_none(row)


def _next_readable(
    conn: sqlite3.Connection, after: int, max_id: int | None
) -> tuple[int, int | None] | None:
    """After a read error past id `after`: the smallest probe p whose `id >= p` seek works.

    Returns (p, first id >= p or None at the end); ids in (after, p) are unreadable. Probes
    double, then bisect, so a damaged page costs O(log n) seeks. None when no seek past `after`
    works at all (the end of the table is unreachable).
    """
    sql = "SELECT min(id) FROM records WHERE id >= ?"
    last_fail, step = 0, 1
    found: tuple[int, int | None] | None = None
    while after + step <= _MAX_ROWID:
        ok, value = _query_int(conn, sql, (after + step,))
        if ok:
            found = (step, value)
            break
        last_fail = step
        if max_id is not None and after + step > max_id:
            return None
        step *= 2
    if found is None:
        return None
    good_step, value = found
    while good_step - last_fail > 1:
        mid = (last_fail + good_step) // 2
        ok, mid_value = _query_int(conn, sql, (after + mid,))
        if ok:
            good_step, value = mid, mid_value
        else:
            last_fail = mid
    return after + good_step, value


def _read_salvage(path: Path, sink: Callable[[list[_Row]], None]) -> _Salvage:
    """Read every row still readable from the damaged database at `path` (read-only).

    Good rows go to `sink` in id order, a chunk at a time.
    """
    found = _Salvage(sink)
    uri = f"file:{quote(str(path))}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=_BUSY_TIMEOUT_S)
    except sqlite3.Error:
        found.tail_unknown = True
        return found
    try:
        # Read past what a normal open refuses: a file shorter than its header says (a
        # truncated database) and cells whose sizes do not add up.
        with contextlib.suppress(sqlite3.Error):
            conn.execute("PRAGMA writable_schema=ON")
            conn.execute("PRAGMA cell_size_check=ON")
        _salvage_batches(conn, found)
        ok, count = _query_int(conn, "SELECT count(*) FROM records")
        found.count = count if ok else None
        ok, max_id = _query_int(conn, "SELECT max(id) FROM records")
        max_id = max_id if ok else None
        chunk: list[_Row] = []
        _salvage_records(conn, found, max_id, chunk)
        if chunk:
            sink(chunk)
    finally:
        conn.close()
    return found


def _salvage_batches(conn: sqlite3.Connection, found: _Salvage) -> None:
    try:
        for row in conn.execute(
            "SELECT id, key, first_id, last_id, n_records, attempts, created_ns, claimed_ns"
            " FROM batches ORDER BY id"
        ):
            bid, key, first_id, last_id, n_records, attempts, created_ns, claimed_ns = row
            ints = (bid, first_id, last_id, n_records, attempts, created_ns, claimed_ns)
            if isinstance(key, str) and all(isinstance(v, int) for v in ints):
                found.batches[bid] = (
                    key,
                    first_id,
                    last_id,
                    n_records,
                    attempts,
                    created_ns,
                    claimed_ns,
                )
            else:
                found.batches_complete = False
    except sqlite3.DatabaseError:
        found.batches_complete = False


def _salvage_records(
    conn: sqlite3.Connection, found: _Salvage, max_id: int | None, chunk: list[_Row]
) -> None:
    after = 0  # rowids we assign start at 1
    failed_at: int | None = None  # `after` at the previous read error
    while True:
        start = after
        try:
            for rid, appended_ns, batch_id, crc, payload in conn.execute(
                "SELECT id, appended_ns, batch_id, crc32, payload FROM records WHERE id > ?"
                " ORDER BY id",
                (after,),
            ):
                after = int(rid)
                if (
                    isinstance(payload, bytes)
                    and isinstance(appended_ns, int)
                    and isinstance(crc, int)
                    and (batch_id is None or isinstance(batch_id, int))
                    and zlib.crc32(payload) == crc
                ):
                    chunk.append((after, appended_ns, batch_id, crc, payload))
                    found.salvaged += 1
                    if batch_id is not None:
                        count, first, _last = found.members.get(batch_id, (0, after, after))
                        found.members[batch_id] = (count + 1, first, after)
                    if len(chunk) >= _SALVAGE_CHUNK:
                        found.sink(chunk)
                        chunk.clear()
                elif isinstance(payload, (bytes, str)):
                    raw = payload if isinstance(payload, bytes) else payload.encode()
                    found.bad_payloads.append(raw)
                else:
                    found.skipped_ids += 1
            return
        except sqlite3.DatabaseError:
            pass
        nxt = _next_readable(conn, after, max_id)
        if nxt is None:
            found.tail_unknown = True
            return
        probe, next_id = nxt
        if next_id is None:
            end = probe if max_id is None else min(probe, max_id + 1)
            found.skipped_ids += max(0, end - after - 1)
            return
        if next_id == after + 1 and failed_at == after and start == after:
            # Its key is readable but its content is not: skip this one row.
            found.skipped_ids += 1
            after = next_id
            continue
        failed_at = after
        found.skipped_ids += probe - after - 1
        after = next_id - 1
