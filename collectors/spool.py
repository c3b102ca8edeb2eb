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
    dead-letter.jsonl.1                    the previous one, once that reached 64 MiB
    spool.db.corrupt-<UTC time>[-wal]      a damaged database set aside (kept for forensics)

Schema (``PRAGMA user_version`` = 3). Records are stored a chunk per row, so the cost of the
database is paid per append, per batch and per acknowledgement, not per record:

* ``chunks(id, appended_ns, n, crc32, crcs, payload)``: the records appended, oldest first. A
  row holds the ``n`` records of one append (at most ``chunk_records``), ``payload`` is their
  JSON joined by ``\\n``, ``crc32`` the payload's CRC-32 and ``crcs`` each record's own (4 bytes
  each, little-endian). ``id`` is the sequence number of the row's first record and the row
  holds ``id .. id + n - 1``. A row is never rewritten: it is deleted once none of its records
  is waiting or in a batch.
* ``state('cursor', value)``: the first record of ``chunks`` that waits. Every record from the
  cursor on waits; those before it are in a batch, or delivered (or dropped) and waiting for
  the rest of their row to go.
* ``front(...)``: the same layout, for records put back in front of every waiting record (a
  batch split after a 400/413/422, a batch whose records failed their checksums, a batch
  released out of order, a version 2 spool's waiting records); ids below the smallest,
  negative if need be. They are claimed first, in batches of their own.
* ``claimed(id, key, n, attempts, created_ns, claimed_ns, crc32, crcs, payload, first_id,
  last_id, bytes)``: one row per claimed, unacknowledged batch (its Idempotency-Key), in claim
  order. A batch of ``chunks`` is claimed *by reference*: ``first_id .. last_id`` name its
  records (consecutive ids), ``bytes`` their size, and ``payload`` is empty. A batch of
  ``front`` holds its records (``payload`` with ``crc32`` and ``crcs``, as in ``chunks``).
* ``marks(key, value)``: per-key dedup marks (the last exchange sequence or event time seen)
  written with the records that set them.

A claim by reference writes one small row and moves the cursor: nothing is copied (a claim used
to copy the batch's records into its row, which wrote every record twice, and deleting that row
at the acknowledgement walked its pages again: about a quarter of the collector's CPU in a
burst, see docs/benchmarks.md). Its records are read back from their rows when the batch has
to be sent again (a retry, a restart). An acknowledgement deletes the batch's row and the rows
of ``chunks`` that nothing needs any more: those wholly inside the batch at once, and a row it
shares with a neighbour once that neighbour is gone too. A batch released before it was sent
(claimed ahead, then the POST before it failed) goes back by moving the cursor back when it is
the newest; otherwise its records go to ``front``. Records never contain a raw newline: they are
compact JSON, whose strings escape control characters (``append`` refuses anything else). The
checksums guard against damage SQLite cannot see (the database file has no page checksums): a
row is read with one CRC over its payload; only when that fails are its records checked one by
one, and a record is sent only if its own checksum verifies. A claim meeting a damaged row of
``chunks`` moves its verified waiting records to ``front`` and the others to the dead-letter
file; a batch by reference whose rows fail is taken apart the same way.

Most claims read nothing: while nothing backs up, the spool keeps every waiting row of
``chunks`` in memory too, exactly as committed (the row holding the cursor cut to its waiting
records; at most ``_RECENT_MAX_BYTES``), and a claim joins those; what it sends is what
``append`` was given, so there is nothing to check. Appends and claims keep that copy exact;
the full policy, a batch moved back, or a backlog past the bound turn it off, and claims read
(and check) the database until one leaves nothing waiting.

Older spools are converted in one transaction when opened. Version 2 (batches holding their
records, waiting rows in ``waiting``): ``waiting`` becomes ``front`` and the batches keep their
rows, keys and attempts; nothing is copied. Version 1 (a row per record): claimed batches keep
their keys, bodies and attempts; waiting records keep their order.

Threads: the parser thread calls ``append``; the delivery threads call everything else.
There are two connections: the append connection (used only by ``append``) and the delivery
connection, each behind its own lock so even a caller that mixes threads stays safe. Every write
transaction also holds ``_write_lock``: SQLite admits one writer at a time anyway, and
serialising writers here keeps the in-memory counters (records, bytes) exactly in step with the
database. Reads (the claimed batch, the due check, stats) take no write lock: in WAL mode a reader
never blocks the writer, so a slow drain never stalls ``append``. A claim from the database, too,
reads, checks and joins its rows first and takes the write lock only to commit them as a batch
(re-reading them if the full policy dropped waiting rows meanwhile), so ``append`` waits for a
short write, not for the whole claim; a claim from memory holds the write lock throughout (a
join, then the same write). All write transactions are ``BEGIN IMMEDIATE`` so no transaction
ever has to upgrade a stale read snapshot.

Durability: every method that changes the spool has committed when it returns, and a commit is in
the WAL (the OS page cache at least), so it survives ``kill -9`` of the process. Against a power
cut, ``fsync_interval_s`` is the bound:

* ``fsync_interval_s == 0``: ``synchronous=FULL``; SQLite fsyncs the WAL at every commit, so a
  returned call is on stable storage.
* ``fsync_interval_s > 0``: ``synchronous=NORMAL`` (SQLite fsyncs only at checkpoints: the WAL
  before its frames are copied back, the database after) plus the ``spool-fsync`` thread, which
  every ``fsync_interval_s`` fsyncs the WAL file whenever something was committed since its last
  pass. A commit is therefore on stable storage at most ``fsync_interval_s`` (plus the duration
  of one fsync, or of one checkpoint, which fsyncs the WAL itself first) after it returned, or
  earlier if a checkpoint ran; a power cut loses at most the commits of that last interval,
  never a torn or reordered state (WAL frames are checksummed and recovery keeps a prefix of
  commits). The thread exists because the bound must hold when no
  call arrives at all (an idle market, a stalled API).

Checkpoints: with ``fsync_interval_s > 0`` the same thread also copies the WAL back into the
database, on a connection of its own, as soon as about ``_CHECKPOINT_MIN_FRAMES`` were written
(counted by the writers), and at least every ``_CHECKPOINT_MAX_AGE_S`` while commits go on. Left
to SQLite, that checkpoint runs inside whichever commit crosses 1,000 pages, and that commit of
the parser's took 1-10 ms instead of 0.1: most of the collector's latency tail
(bench/latency.py). Here it is two ``PASSIVE`` checkpoints, which never wait for a reader or
writer: the first copies the bulk while the writers go on; the second, holding ``_write_lock``,
copies only what they committed meanwhile, so that the next commit starts the WAL file over
instead of growing it (a WAL that always has a frame left keeps growing until a lull). The
second pass still makes the two fsyncs SQLite makes around any checkpoint (0.5-1 ms on the
disks measured; a slower disk stalls the writers that long), where before the writer ran the
whole checkpoint with the same fsyncs. SQLite's automatic checkpoint stays as a backstop at
``_AUTOCHECKPOINT_BACKSTOP_PAGES``, for a burst that outruns the thread or a thread that cannot
checkpoint: the WAL stays bounded either way. With ``fsync_interval_s == 0`` there is no thread
and SQLite checkpoints as usual.

Size bound and full policy: ``max_bytes`` bounds the payload bytes (the records' own bytes,
separators not counted). When an append would exceed it, the oldest *waiting* records are
dropped first (for a price oracle the newest prices matter most); if that is not enough
(claimed batches fill the bound) the oldest of the incoming records are dropped, so a single
append larger than the whole bound keeps its newest records that fit. Records of a claimed
batch are never dropped: the API may already have stored them and their batch must be re-sent
with identical bytes. Drops are returned by ``append`` and counted in ``stats().dropped_total``.

Corruption: SQLite replays a WAL only up to the first frame that fails its checksum chain, and
not at all when the WAL header is bad, silently. So at open a damaged WAL (bad header, or a bad
frame followed by more frames of the same generation) is moved aside as
``spool.db.corrupt-<time>-wal`` and replaced by a rebuilt WAL holding every frame that still
verifies, re-signed. Then ``PRAGMA quick_check`` runs. A database that fails it, or raises
SQLite's CORRUPT/NOTADB errors, or is zero-length, is moved aside as ``spool.db.corrupt-<time>``
(its WAL with it), a fresh spool is created, and every row still readable by SELECT is copied
over in one transaction, skipping unreadable regions row by row. Claimed batches whose records
all verify keep their key and attempts (so the re-send dedups at the API); the verified records
of damaged batches go back to waiting, in front, to be sent under a new key (the API may then
store some twice: at-least-once beats loss). Records that read back but fail their checksum go
to the dead-letter file. What could not be read is counted in ``stats().corrupt_lost_total`` and
logged at ERROR as ``spool_corrupt``; when it cannot be counted (an unreadable header, dropped
WAL frames, which hold pages rather than records) ``lost_unknown`` says so. The process always
goes on: a damaged spool never causes a crash loop. Environmental failures (unwritable directory,
disk full) raise :class:`SpoolError` instead; the caller decides.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import json
import logging
import math
import os
import sqlite3
import sys
import threading
import time
import uuid
import zlib
from array import array
from collections import deque
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from collectors import spool_repair
from collectors.errors import SpoolError
from collectors.model import iso_from_ns

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3
DB_NAME = "spool.db"
LOCK_NAME = "spool.lock"
DEAD_LETTER_NAME = "dead-letter.jsonl"
#: When a dead letter would take dead-letter.jsonl past this size, the file becomes
#: dead-letter.jsonl.1 (replacing the one before) and a new one starts: an API that refuses
#: everything for weeks fills at most twice this, not the disk the spool needs.
DEAD_LETTER_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_BYTES = 256 * 1024 * 1024  # about 600k records of 400 bytes: hours of API outage
DEFAULT_CHUNK_RECORDS = 1000
#: The spool leaves this much of its file system free (a quarter of a smaller one): an append
#: that would eat into it drops the oldest waiting records first, as past `max_bytes`. A spool
#: that filled its disk could never empty itself: deleting a delivered batch and checkpointing
#: the WAL both need room to write, so every acknowledgement failed with SQLITE_FULL and
#: delivery stopped for good, the API healthy, until someone freed space by hand.
DISK_RESERVE_BYTES = 32 * 1024 * 1024
_DISK_CHECK_S = 1.0  # free space is read (statvfs) at most this often while appends go on

# A table of rows of records (`chunks`, `front`): a row holds the `n` records of one append.
_ROWS_TABLE = """(
        id INTEGER PRIMARY KEY,
        appended_ns INTEGER NOT NULL,
        n INTEGER NOT NULL,
        crc32 INTEGER NOT NULL,
        crcs BLOB NOT NULL,
        payload BLOB NOT NULL
    )"""
_SCHEMA = (
    "CREATE TABLE chunks " + _ROWS_TABLE,
    "CREATE TABLE front " + _ROWS_TABLE,
    # A batch either holds its records (`payload`, as version 2 did: a batch claimed from
    # `front`) or refers to the records `first_id` .. `last_id` of `chunks` (`payload` empty,
    # `bytes` their size): a claim by reference.
    """CREATE TABLE claimed (
        id INTEGER PRIMARY KEY,
        key TEXT NOT NULL UNIQUE,
        n INTEGER NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        created_ns INTEGER NOT NULL,
        claimed_ns INTEGER NOT NULL,
        crc32 INTEGER NOT NULL,
        crcs BLOB NOT NULL,
        payload BLOB NOT NULL,
        first_id INTEGER,
        last_id INTEGER,
        bytes INTEGER
    )""",
    # Per-key dedup marks (e.g. the last exchange sequence per product) of the records
    # committed here, so a restarted collector drops the venue's replay of what it already has.
    """CREATE TABLE IF NOT EXISTS marks (
        key TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    )""",
    # `cursor`: the id of the first record of `chunks` not claimed (nor dropped).
    """CREATE TABLE state (
        name TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    )""",
)

# Every wait on another connection is bounded; with one process per spool (the flock) and
# writers serialised in Python, only a checkpoint can make SQLite wait at all.
_BUSY_TIMEOUT_S = 10.0
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26
_WAL_SCAN_LIMIT_BYTES = 64 * 1024 * 1024  # larger WALs are left to SQLite's own recovery
_WAL_SIZE_LIMIT_BYTES = 8 * 1024 * 1024  # journal_size_limit: a reset WAL is cut back to this
# The spool-fsync thread's checkpoints (module docstring). The writers count WAL frames as
# their payload's pages plus _FRAMES_PER_TXN a commit: an estimate, only used to decide when to
# checkpoint (1,000 counted were 500-800 real frames for appends of one or two tickers,
# 1,500-1,750 for appends of ten; the backstop below bounds the WAL either way).
_CHECKPOINT_MIN_FRAMES = 1000  # SQLite's own default threshold (4 MiB of 4 KiB pages)
_FRAMES_PER_TXN = 3  # a small commit: a table leaf, an index or freelist page, the header
_CHECKPOINT_MAX_AGE_S = 60.0  # while commits go on, frames are checkpointed at least this often
#: SQLite's automatic checkpoint (wal_autocheckpoint, pages) while the thread checkpoints: only
#: reached when the WAL outgrows the thread (a burst) or the thread cannot checkpoint; the WAL
#: file then holds at most about 16 MiB plus one transaction.
_AUTOCHECKPOINT_BACKSTOP_PAGES = 4000
#: The waiting rows kept in memory for claims (see Spool._recent) while their payloads stay
#: under this (2,500 tickers of 400 bytes: a few batches); past it (a backlog: the API is down
#: or slower than the feed) claims read the database until one takes every waiting record.
_RECENT_MAX_BYTES = 1024 * 1024
_VACUUM_MIN_FREE_BYTES = 4 * 1024 * 1024  # this much free space is kept for reuse
_VACUUM_STEP_BYTES = 4 * 1024 * 1024  # bounded so one ack never holds the write lock for long
_VACUUM_LOOK_INTERVAL_S = 1.0  # how often an ack looks whether free pages can be given back
_NL = b"\n"
#: A row of `chunks` or `front` as stored: (id, appended_ns, n, crc32, crcs, payload).
_Row = tuple[int, int, int, int, bytes, bytes]
_ROW_COLUMNS = "id, appended_ns, n, crc32, crcs, payload"
_INSERT_CHUNK = f"INSERT INTO chunks ({_ROW_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)"
_SET_CURSOR = "UPDATE state SET value = ? WHERE name = 'cursor'"
#: The row of `chunks` holding record `?1` or, when none does, the first row after it (`?1`
#: twice): rows never overlap, so only the last row starting at or before it can hold it.
_FROM_ROW_OF = "id >= coalesce((SELECT max(id) FROM chunks WHERE id <= ?), ?)"
_UPSERT_MARK = ("INSERT INTO marks (key, value) VALUES (?, ?)"
                " ON CONFLICT(key) DO UPDATE SET value = excluded.value")
#: Page size of a new spool database: SQLite's default, chosen by measurement. 16 KiB pages made
#: 1000-record appends and drains 1.4-1.7x faster in bench/spool_bench.py (a batch row's chain
#: of overflow pages is a quarter as long) but the collector's commonest write, a few records
#: and their dedup marks, 25 % dearer in CPU and 50 % in time (each commit writes whole pages to
#: the WAL), with no gain end to end (bench/throughput.py). A spool keeps the page size it was
#: created with.
PAGE_SIZE = 4096

if array("I").itemsize != 4:  # pragma: no cover - every platform CPython supports today
    raise ImportError("collectors.spool needs a 4-byte array('I')")


def _crcs(records: Sequence[bytes]) -> bytes:
    """The records' CRC-32s, 4 bytes each, little-endian (the on-disk `crcs` column)."""
    out = array("I", map(zlib.crc32, records))
    if sys.byteorder != "little":  # pragma: no cover
        out.byteswap()
    return out.tobytes()


def _crc_list(blob: bytes) -> list[int]:
    out = array("I")
    out.frombytes(blob[: len(blob) - len(blob) % 4])
    if sys.byteorder != "little":  # pragma: no cover
        out.byteswap()
    return out.tolist()


def _intact(payload: bytes, n: int, crc: object, crcs: bytes) -> bool:
    """Whether a stored row reads back as written: one CRC over the payload, and its framing."""
    return (crc == zlib.crc32(payload) and len(crcs) == 4 * n
            and payload.count(_NL) == n - 1)


def _cut(payload: bytes, k: int) -> tuple[bytes, bytes]:
    """(the first `k` records, the rest) of a stored payload holding more than `k`."""
    parts = payload.split(_NL, k)
    head = sum(map(len, parts[:k])) + k - 1
    return payload[:head], parts[k]


def _verify(payload: bytes, n: int, crcs: bytes) -> tuple[list[bytes], list[bytes]]:
    """(records that verify, records that do not) of one stored row, in order.

    A record passes only when its own CRC-32 is the stored one. When the row's framing is
    damaged too (the count of records, of newlines or of CRCs disagree), a piece passes when
    its CRC is one of the row's stored CRCs, each used once.
    """
    parts = payload.split(_NL)
    if len(parts) == n and len(crcs) == 4 * n and _crcs(parts) == crcs:
        return parts, []  # the common case: one comparison of two byte strings
    stored = _crc_list(crcs)
    good: list[bytes] = []
    bad: list[bytes] = []
    if len(parts) == len(stored):
        for part, crc in zip(parts, stored, strict=True):
            (good if zlib.crc32(part) == crc else bad).append(part)
        return good, bad
    remaining: dict[int, int] = {}
    for crc in stored:
        remaining[crc] = remaining.get(crc, 0) + 1
    for part in parts:
        crc = zlib.crc32(part)
        if remaining.get(crc, 0) > 0:
            remaining[crc] -= 1
            good.append(part)
        else:
            bad.append(part)
    return good, bad


def _placed(parts: list[bytes], stored: list[int],
            framed: bool) -> list[tuple[int | None, bytes, bool]]:
    """(position in the row, piece, whether it verifies) of each piece of a stored row: by
    order when the row's framing holds; else each piece at the first unused position whose
    stored CRC it matches (None: no such place, it does not verify)."""
    if framed:
        return [(i, p, zlib.crc32(p) == c)
                for i, (p, c) in enumerate(zip(parts, stored, strict=True))]
    free: dict[int, list[int]] = {}
    for i, crc in enumerate(stored):
        free.setdefault(crc, []).append(i)
    out: list[tuple[int | None, bytes, bool]] = []
    for part in parts:
        places = free.get(zlib.crc32(part))
        out.append((places.pop(0), part, True) if places else (None, part, False))
    return out


def _shape(payload: bytes, n: int, crcs: bytes) -> int | None:
    """How many records a stored row holds, when its parts agree: its `n`, or (a rotted `n`)
    the count its CRCs and its newline-separated pieces agree on; None when they disagree."""
    if _framed(payload, n, crcs):
        return n
    count = len(crcs) // 4
    if count and len(crcs) % 4 == 0 and payload.count(_NL) == count - 1:
        return count
    return None


def _waiting_part(rid: int, n: int, payload: bytes, crcs: bytes,
                  cursor: int) -> tuple[int, int]:
    """(records, bytes) of a row of `chunks` that wait, as the counters count them: from its
    size (its `n`, or the size its CRCs and pieces agree on when `n` alone rotted, as appended;
    a whole row's bytes are its payload less n - 1 separators), so that a damaged row is
    counted alike wherever it is met."""
    n = _shape(payload, n, crcs) or n
    if rid + n <= cursor:
        return 0, 0
    size = len(payload) - (n - 1)
    if rid >= cursor:
        return n, size
    k = cursor - rid
    return rid + n - cursor, size - sum(map(len, payload.split(_NL, k)[:k]))


def _last_record_id(row: tuple[object, ...]) -> int:
    """The last record id a waiting row read as (id, appended_ns, n, ...) covers."""
    rid, n, crcs, payload = row[0], row[2], row[4], row[5]
    if not isinstance(rid, int):
        return 0
    if isinstance(n, int) and isinstance(crcs, bytes) and isinstance(payload, bytes) and _framed(
            payload, n, crcs):
        return rid + n - 1
    return rid  # a size that does not agree with itself is not trusted


def _framed(payload: bytes, n: int, crcs: bytes) -> bool:
    """Whether a stored row's parts agree on its size: `n` records, `n` CRCs, `n` pieces."""
    return n > 0 and len(crcs) == 4 * n and payload.count(_NL) == n - 1


def _size(payload: bytes, n: int) -> int:
    """The records' own bytes in a stored payload (what max_bytes bounds)."""
    return len(payload) - (n - 1) if n > 0 else 0


@dataclass(frozen=True, slots=True)
class Batch:
    """A claimed batch: what one POST sends, identical on every retry and after a restart."""

    key: str  # Idempotency-Key (uuid4 hex), persisted with the batch
    payload: bytes  # the records' compact JSON exactly as appended, joined by b"\n"
    size: int  # how many records
    attempts: int  # delivery attempts recorded so far (persisted)
    created_ns: int  # epoch ns when the oldest record was appended
    # Claimed by the call that returned it, so never sent (see `release`); not part of the
    # batch's identity: read back later, the same batch compares equal.
    fresh: bool = field(default=False, compare=False)

    @classmethod
    def of(cls, key: str, records: Sequence[bytes], attempts: int = 0,
           created_ns: int = 0) -> Batch:
        """A batch of these records (for tests and tools; the spool builds its own)."""
        return cls(key, _NL.join(records), len(records), attempts, created_ns)

    @property
    def records(self) -> tuple[bytes, ...]:
        """Each record's bytes, in order."""
        return tuple(self.payload.split(_NL)) if self.size else ()

    def body(self) -> bytes:
        """The request body, byte for byte the same for the same batch."""
        return b'{"feeds":[' + self.payload.replace(_NL, b",") + b"]}"


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


@dataclass(slots=True)
class _Salvage:
    """What was copied out of a damaged database."""

    salvaged: int = 0  # records copied over (waiting, claimed or put back)
    lost: int = 0  # records counted lost: unreadable, or failing their checksum
    unknown: bool = False  # some loss could not be counted (`lost` is then a lower bound)
    bad: list[bytes] = field(default_factory=list)  # pieces read that failed their checksum
    put_back: list[bytes] = field(default_factory=list)  # verified records of damaged batches
    put_back_ns: int | None = None
    kept: int = 0  # claimed batches kept whole, with their key
    rekeyed: int = 0  # claimed batches whose verified records wait again


@dataclass(frozen=True, slots=True)
class _SalvageRef:
    """A batch by reference read from a damaged spool, to be rebuilt from its rows."""

    rid: int
    key: str
    n: int
    attempts: int
    created_ns: int
    claimed_ns: int
    first_id: int
    last_id: int


@dataclass(slots=True)
class _ClaimPlan:
    """A claim read and checked, not yet written (see `Spool._claim`)."""

    first_id: int  # the first waiting row taken
    first_ns: int  # append time of the oldest record taken
    taken: int = 0  # records in the batch
    last_id: int = 0  # the last record taken (a claim of `chunks`: its rows are contiguous)
    payload: bytes = b""  # the batch's records joined by b"\n"
    crcs: bytes = b""  # their CRC-32s
    whole_upto: int | None = None  # waiting rows up to this id go whole
    # The row cut in two, if one is: its id, and the waiting row that keeps the rest.
    cut: tuple[int, _Row] | None = None
    bad: list[bytes] = field(default_factory=list)  # pieces failing their checksum
    # What damaged rows lose, as the counters count it (a row's `n`; its payload's length less
    # n - 1 separators): a record cut in two by a stray newline is one record, two pieces.
    lost_records: int = 0
    lost_bytes: int = 0


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
        chunk_records: int = DEFAULT_CHUNK_RECORDS,
        clock_ns: Callable[[], int] = time.time_ns,
        dead_letter_max_bytes: int = DEAD_LETTER_MAX_BYTES,
        thread_init: Callable[[], object] | None = None,
        disk_space: Callable[[Path], tuple[int, int] | None] | None = None,
    ) -> None:
        """`thread_init` runs first on the spool-fsync thread (the service names the OS thread
        with it). `disk_space(directory)` says (free bytes, size) of the directory's file
        system, None when unknown (default: statvfs)."""
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        if not fsync_interval_s >= 0:  # also rejects NaN
            raise ValueError(f"fsync_interval_s must be >= 0, got {fsync_interval_s}")
        if chunk_records < 1:
            raise ValueError(f"chunk_records must be >= 1, got {chunk_records}")
        self._dir = Path(directory)
        self._db_path = self._dir / DB_NAME
        self._wal_path = self._dir / (DB_NAME + "-wal")
        self._shm_path = self._dir / (DB_NAME + "-shm")
        self._dead_letter_path = self._dir / DEAD_LETTER_NAME
        self._dead_letter_max_bytes = dead_letter_max_bytes
        self._max_bytes = max_bytes
        self._fsync_interval_s = fsync_interval_s
        self._chunk_records = chunk_records
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
        self._next_id = 1  # the sequence number of the next appended record
        # The first record of `chunks` not claimed or dropped (persisted in `state`); every
        # record of `chunks` from here on waits. Records put back wait in `front` (`_front` of
        # them), in front of these.
        self._cursor = 1
        self._front = 0
        # Append time of the oldest waiting record, cached for the due check (which runs on
        # every wake-up of the delivery thread); None: unknown, read it. Appends never add an
        # older one, so only claims, splits and drops forget it.
        self._oldest_waiting_ns: int | None = None
        # Bumped after each commit that dropped waiting rows (the full policy): a claim that
        # read them before compares it (see _claim).
        self._drop_gen = 0
        # Every waiting row, oldest first, exactly as committed, while `_recent_ok`: a claim
        # takes its rows from here instead of reading and checking them from the database.
        # Appends and claims keep it exact; anything else that changes waiting rows (the full
        # policy, records put back) or a backlog past _RECENT_MAX_BYTES turns it off until a
        # claim leaves nothing waiting. Guarded by _write_lock.
        self._recent: deque[_Row] = deque()
        self._recent_bytes = 0
        self._recent_ok = False
        self._dropped_total = 0
        self._corrupt_lost_total = 0
        # The file system's free space as last read, bytes written since (an estimate: twice
        # the records', WAL then database), when it was read, and the reserve it keeps.
        self._disk_space = disk_space or _disk_space
        self._disk_free: int | None = None
        self._disk_written = 0
        self._disk_read_at = -_DISK_CHECK_S
        self._disk_reserve = DISK_RESERVE_BYTES
        self._disk_held: int | None = None  # the limit while the disk is short (_disk_limit)
        #: why the last append dropped records: "max_bytes" or "disk_reserve" (None: none yet)
        self.last_drop_reason: str | None = None
        self._page_bytes: int | None = None  # the open database's page size, read once
        self._vacuum_look_at = 0.0  # monotonic time of the next look at the free list
        self._commit_gen = 0  # bumped after each commit; the fsync thread compares it
        self._synced_gen = 0
        # WAL frames written since the last checkpoint of the spool-fsync thread (an estimate,
        # see _FRAMES_PER_TXN), and when that checkpoint ran (monotonic).
        self._wal_frames = 0
        self._checkpointed_at = time.monotonic()
        self._checkpoint_conn: sqlite3.Connection | None = None  # the spool-fsync thread's
        self._last_checkpoint_error_log = 0.0
        self._committed = threading.Event()  # set by each commit: the fsync thread has work
        self._checkpoint_wanted = threading.Event()  # _CHECKPOINT_MIN_FRAMES were written
        self._stop = threading.Event()
        self._syncer: threading.Thread | None = None
        self._thread_init = thread_init

        self._open()
        if fsync_interval_s > 0:
            self._syncer = threading.Thread(target=self._sync_loop, name="spool-fsync", daemon=True)
            self._syncer.start()

    # ------------------------------------------------------------------ public API

    def append(self, records: Sequence[bytes],
               marks: Mapping[str, int] | None = None) -> int:
        """Store `records` in one transaction; committed (survives kill -9) when it returns.

        `marks` sets per-key dedup marks in the same transaction (the value given replaces the
        stored one, lower or not: an adapter may start a count over), so a mark is on disk
        exactly when the records that set it are.

        Returns how many records the full policy dropped (old waiting ones or, when claimed
        batches fill the bound, the oldest of `records`). Raises ValueError for a record that
        holds a newline byte (records are compact JSON) and SpoolError if the write fails (for
        example "database or disk is full"); nothing is stored then.
        """
        return self._append(records, marks, 0, ())[0]

    def append_claiming(
        self, records: Sequence[bytes], marks: Mapping[str, int] | None, max_records: int,
        exclude: Collection[str] = (),
    ) -> tuple[int, Batch | None]:
        """`append`, and in the same transaction the claim `due_batch(max_records, ...)` would
        make right after it when the append fills a batch: (dropped, the batch or None).

        For a delivery worker that waits for a batch: the claim costs no transaction and no
        wake-up of its own, and a commit of the parser's cannot hold it up. Claimed only when
        it is the batch `due_batch` would return: `max_records` records wait after the append,
        none of them put back (`front`), all still in memory, none dropped by the full policy,
        and every claimed batch is in `exclude` (none is owed a send first). Else nothing is
        claimed and the batch comes from `due_batch` as before. `max_records` 0: plain append.
        """
        return self._append(records, marks, max_records, exclude)

    def _append(self, records: Sequence[bytes], marks: Mapping[str, int] | None,
                claim: int, exclude: Collection[str]) -> tuple[int, Batch | None]:
        if not records:
            return 0, None
        joined = _NL.join(records)
        if joined.count(_NL) != len(records) - 1:
            raise ValueError("a spool record must not contain a newline byte (compact JSON)")
        total = len(joined) - (len(records) - 1)
        now_ns = self._clock_ns()
        with self._write_lock:
            conn = self._require(self._append_conn)
            freed_records = freed_bytes = skip = 0
            dropping = False
            plan: _ClaimPlan | None = None
            key = ""
            with self._txn(conn, f"append of {len(records)} records"):
                # Claimed bytes count against the bound but cannot be freed (see the docstring).
                excess = self._bytes + total - self._max_bytes
                short = self._bytes + total - self._disk_limit(total)
                if excess > 0 or short > 0:
                    self.last_drop_reason = "max_bytes" if excess >= short else "disk_reserve"
                    excess = max(excess, short)
                    dropping = True
                    freed_records, freed_bytes = self._drop_oldest_waiting(conn, excess)
                    excess -= freed_bytes
                    while excess > 0 and skip < len(records):
                        excess -= len(records[skip])
                        skip += 1
                kept = records[skip:] if skip else records
                step = self._chunk_records
                next_id = self._next_id
                rows = []
                for start in range(0, len(kept), step):
                    part = kept[start:start + step]
                    payload = joined if len(part) == len(records) else _NL.join(part)
                    rows.append((next_id, now_ns, len(part), zlib.crc32(payload), _crcs(part),
                                 payload))
                    next_id += len(part)
                # execute() for one row: executemany() costs ~7 µs more a call, and most
                # appends are one row (a chunk of a few frames) with a mark or two.
                if len(rows) == 1:
                    conn.execute(_INSERT_CHUNK, rows[0])
                elif rows:
                    conn.executemany(_INSERT_CHUNK, rows)
                if marks:
                    if len(marks) == 1:
                        conn.execute(_UPSERT_MARK, next(iter(marks.items())))
                    else:
                        conn.executemany(_UPSERT_MARK, list(marks.items()))
                if (claim > 0 and not dropping and self._recent_ok and not self._front
                        and self._records + len(kept) - self._claimed_records >= claim
                        and self._all_claimed_in(conn, exclude)):
                    plan = self._plan_recent(rows, claim)
                    if plan is not None:
                        key = self._insert_ref_claim(conn, plan)
            self._next_id = next_id
            self._wrote(len(joined) // PAGE_SIZE)
            kept_bytes = total - sum(len(r) for r in records[:skip])
            self._records += len(kept) - freed_records
            self._bytes += kept_bytes - freed_bytes
            dropped = freed_records + skip
            self._dropped_total += dropped
            if dropping:  # after the commit: see _claim
                self._drop_gen += 1
            elif self._recent_ok:
                self._recent.extend(rows)
                self._recent_bytes += sum(len(row[5]) for row in rows)
            batch = None if plan is None else self._ref_claimed(plan, key)
            if self._recent_bytes > _RECENT_MAX_BYTES:
                self._forget_recent()
        return dropped, batch  # the caller counts and logs drops (one place, one metric)

    def _disk_limit(self, adding: int) -> int:
        """The most record bytes the spool may hold after writing `adding` more, for its file
        system to keep its reserve (DISK_RESERVE_BYTES); `max_bytes` when there is room, or
        when the space is unknown. The caller holds _write_lock.

        Once writing would eat into the reserve, the spool holds no more than it did then, plus
        what its file's free pages hold (at least a quarter of the reserve): new records take
        the place of the oldest waiting
        ones, whose pages SQLite reuses, so the files stop growing (freed pages stay in the
        file: dropping more would not give the disk back anything). The limit is lifted when
        twice the reserve is free again."""
        now = time.monotonic()
        free = self._disk_free
        if now - self._disk_read_at >= _DISK_CHECK_S or (
                free is not None and free - self._disk_written < 2 * self._disk_reserve):
            # (read again on every write once near the reserve: others write to the disk too)
            self._disk_read_at, self._disk_written = now, 0
            space = self._disk_space(self._dir)
            free = self._disk_free = None if space is None else space[0]
            if space is not None:
                self._disk_reserve = min(DISK_RESERVE_BYTES, space[1] // 4)
        if free is None:
            self._disk_held = None
            return self._max_bytes
        self._disk_written += 2 * adding  # the WAL's copy, then the database's
        left = free - self._disk_written
        if left < self._disk_reserve:
            if self._disk_held is None:
                # (and what the file's free pages hold: a drained backlog leaves them, and
                # records written there take no more disk)
                self._disk_held = max(self._bytes + self._free_page_bytes(),
                                      self._disk_reserve // 4)
        elif left >= 2 * self._disk_reserve:
            self._disk_held = None
        return self._max_bytes if self._disk_held is None else self._disk_held

    def _free_page_bytes(self) -> int:
        """Bytes of the database's free pages (0 when they cannot be read)."""
        conn = self._append_conn
        if conn is None:
            return 0
        try:
            free = _int_or_none(conn.execute("PRAGMA freelist_count").fetchone()) or 0
        except sqlite3.Error:
            return 0
        return free * (self._page_bytes or PAGE_SIZE)

    def _all_claimed_in(self, conn: sqlite3.Connection, exclude: Collection[str]) -> bool:
        """Whether every claimed batch's key is in `exclude` (the caller holds the write
        lock; no batch is claimed meanwhile)."""
        if self._batches <= 0:
            return True
        keys = conn.execute("SELECT key FROM claimed").fetchall()
        return all(str(k) in exclude for (k,) in keys)

    def _plan_recent(self, rows: list[_Row], max_records: int) -> _ClaimPlan | None:
        """The claim of the oldest `max_records` waiting records, all in `_recent` or in
        `rows` (appended in the open transaction, after them)."""
        taken: list[_Row] = []
        count = 0
        for row in itertools.chain(self._recent, rows):
            if count >= max_records:
                break
            taken.append(row)
            count += row[2]
        return self._plan_rows(taken, count, max_records, math.inf, False, check=False)

    def marks(self) -> dict[str, int]:
        """The dedup marks stored by `append`. Raises SpoolError."""
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
            if self._batches:  # claimed batches exist (else no need to look)
                batch = self._oldest_claimed(conn, exclude)
                if batch is not None:
                    return batch
            if not self._looks_due(conn, max_records, max_age_s, force):
                return None
            return self._claim(conn, max_records, max_age_s, force)

    @property
    def waiting_records(self) -> int:
        """Records not yet in a batch (from the in-memory counters: no database read)."""
        return self._records - self._claimed_records

    def seconds_until_due(self, max_age_s: float) -> float | None:
        """How long until the oldest waiting record is `max_age_s` old (0: now), or None when
        nothing waits. For the delivery thread's sleep between checks; raises SpoolError."""
        if self._records - self._claimed_records <= 0:
            return None
        oldest_ns = self._oldest_waiting_ns
        if oldest_ns is None:
            with self._conn_lock:
                conn = self._require(self._conn)
                oldest_ns = self._read_oldest_waiting(conn)
            if oldest_ns is None:
                return None
        return max(0.0, oldest_ns / 1e9 + max_age_s - self._clock_ns() / 1e9)

    def record_attempt(self, key: str) -> None:
        """Count one delivery attempt of the claimed batch `key` (persisted).

        Raises SpoolError if no claimed batch has that key or the database fails.
        """
        with self._conn_lock, self._write_lock:
            conn = self._require(self._conn)
            with self._txn(conn, "record_attempt"):
                cur = conn.execute(
                    "UPDATE claimed SET attempts = attempts + 1 WHERE key = ?", (key,)
                )
                if cur.rowcount != 1:
                    raise SpoolError(f"spool {self._db_path}: no claimed batch with key {key!r}")

    def ack(self, key: str) -> int:
        """The API stored batch `key`: delete it. Returns how many records (0 if unknown key).

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
        "feeds": [records]} and fsyncs it, then deletes the batch. Returns how many records (0
        if unknown key). A crash between the two steps writes the line again on the next
        attempt: the file may hold a batch twice, never lose one. Raises SpoolError if the file
        or the database cannot be written (the batch then stays claimed).
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
        others back to waiting, in front of every waiting record and in their original order,
        to be claimed into new batches under new keys. Returns (dead-lettered, released);
        (0, 0) for an unknown key. Raises SpoolError.
        """
        with self._conn_lock:
            conn = self._require(self._conn)
            with self._write_lock, self._txn(conn, "split"):
                found = self._claimed_row(conn, key)
                if found is None:
                    return 0, 0
                batch_id, n, created_ns, size, ref = found
                members = self._batch_records(conn, found)
                drop = {i for i in reject if 0 <= i < len(members)}
                bad = [members[i] for i in sorted(drop)]
                good = [m for i, m in enumerate(members) if i not in drop]
                if bad:
                    self._write_dead_letter(key, status, reason, bad)
                self._put_back(conn, good, created_ns)
                conn.execute("DELETE FROM claimed WHERE id = ?", (batch_id,))
                if ref is not None:
                    self._collect(conn, *ref)
            self._oldest_waiting_ns = None  # the released records are waiting again
            # (`members` are the records as stored: a damaged one is sent, or dead-lettered,
            # as the API answers for it; they count as the batch did.)
            bad_bytes = sum(len(p) for p in bad)
            self._records -= len(bad)
            self._bytes -= bad_bytes
            self._claimed_records -= n
            self._claimed_bytes -= size
            self._batches -= 1
            self._records += len(good) - (n - len(bad))  # == 0 unless the batch was damaged
            self._bytes += sum(map(len, good)) - (size - bad_bytes)
            return len(bad), len(good)

    def release(self, key: str) -> int:
        """Put claimed batch `key` back in front of every waiting record, in order, as if it
        had never been claimed; its key is dropped. Only for a batch that was never sent (a
        `fresh` one claimed ahead of need): a batch the API may have stored must be re-sent
        under its key. Returns how many records (0 for an unknown key). Raises SpoolError.

        The newest batch claimed by reference goes back by moving the cursor back: nothing is
        copied."""
        with self._conn_lock:
            conn = self._require(self._conn)
            with self._write_lock:
                found = self._claimed_row(conn, key)
                if found is None:
                    return 0
                batch_id, n, _created_ns, size, ref = found
                if ref is not None and ref[1] + 1 == self._cursor:
                    with self._txn(conn, "release"):
                        conn.execute("DELETE FROM claimed WHERE id = ?", (batch_id,))
                        conn.execute(_SET_CURSOR, (ref[0],))
                    self._cursor = ref[0]
                    self._forget_recent()  # its rows wait again: memory no longer holds all
                    self._oldest_waiting_ns = None
                    self._claimed_records -= n
                    self._claimed_bytes -= size
                    self._batches -= 1
                    return n
        return self.split(key, (), 0, "")[1]

    def stats(self) -> SpoolStats:
        """Counts for metrics. Raises SpoolError if the spool is closed or the database fails."""
        stats = self._stats(None)
        assert stats is not None  # waits as long as it takes
        return stats

    def stats_within(self, wait_s: float) -> SpoolStats | None:
        """`stats()`, or None when another operation has held the spool for `wait_s` (a disk
        that stalls an fsync holds the spool's locks): for a metrics scrape or a health check,
        which must answer whatever the disk does. Raises SpoolError as `stats()` does."""
        return self._stats(wait_s)

    def _stats(self, wait_s: float | None) -> SpoolStats | None:
        timeout = -1 if wait_s is None else wait_s
        if not self._conn_lock.acquire(timeout=timeout):
            return None
        try:
            conn = self._require(self._conn)
            try:
                claimed = conn.execute("SELECT min(created_ns) FROM claimed").fetchone()
            except sqlite3.Error as exc:
                raise self._error("stats", exc) from exc
            oldest = self._read_oldest_waiting(conn)  # raises SpoolError itself
            waiting = None if oldest is None else (oldest,)
            if not self._write_lock.acquire(timeout=timeout):
                return None
            try:
                counts = (
                    self._records,
                    self._claimed_records,
                    self._bytes,
                    self._batches,
                    self._dropped_total,
                    self._corrupt_lost_total,
                )
            finally:
                self._write_lock.release()
        finally:
            self._conn_lock.release()
        times = [int(r[0]) for r in (claimed, waiting) if r is not None and r[0] is not None]
        file_bytes = 0
        for path in (self._db_path, self._wal_path):
            with contextlib.suppress(OSError):
                file_bytes += path.stat().st_size
        return SpoolStats(
            records=counts[0],
            claimed_records=counts[1],
            payload_bytes=counts[2],
            file_bytes=file_bytes,
            oldest_record_ns=min(times) if times else None,
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
        self._committed.set()  # wakes the fsync thread
        self._checkpoint_wanted.set()
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
            if self._fsync_interval_s > 0:
                self._checkpoint_conn = self._connect(self._db_path)
            self._load_counters()
            self._recent_ok = self._nothing_waits()
            self._fsync_dir()
        except sqlite3.Error as exc:
            # (Damage was dealt with in _open_main: this is the environment's, a disk too full
            # for a new connection's first write, say: one line, and is_disk_full can tell.)
            self._close_connections()
            self._release_lock()
            raise SpoolError(f"spool database {self._db_path}: cannot open: {exc}") from exc
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
            # page_size and auto_vacuum only take effect on a new, empty database, so they must
            # come before the journal mode (which writes the first page); an existing database
            # keeps its own.
            conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
            row = conn.execute("PRAGMA journal_mode=WAL").fetchone()
            if row is None or str(row[0]).lower() != "wal":
                raise SpoolError(f"spool database {path}: cannot switch to WAL mode ({row!r})")
            sync = "FULL" if self._fsync_interval_s == 0 else "NORMAL"
            conn.execute(f"PRAGMA synchronous={sync}")
            # Debian's SQLite zeroes every deleted record's pages (SECURE_DELETE on by
            # default), writing each batch a second time as it is acknowledged. The spool
            # holds public market data, never a secret: deletes only free their pages.
            conn.execute("PRAGMA secure_delete=OFF")
            if self._fsync_interval_s > 0:  # the spool-fsync thread checkpoints
                conn.execute(f"PRAGMA wal_autocheckpoint={_AUTOCHECKPOINT_BACKSTOP_PAGES}")
            # A checkpointed WAL is reused, not shrunk; cap what a burst leaves on disk.
            conn.execute(f"PRAGMA journal_size_limit={_WAL_SIZE_LIMIT_BYTES}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _open_main(self) -> str | None:
        """Open spool.db into self._conn; return why it is damaged instead, or None."""
        created = False  # spool.db did not exist: this open makes it
        try:
            empty = self._db_path.stat().st_size == 0
        except FileNotFoundError:
            empty, created = False, True
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
                if version == 1:
                    self._migrate_v1(conn)
                elif version == 2:
                    self._migrate_v2(conn)
        except sqlite3.DatabaseError as exc:
            if conn is not None:
                conn.close()
            if _is_corruption(exc):
                return str(exc)
            if created:
                self._remove_empty_db()
            raise SpoolError(f"spool database {self._db_path}: cannot open: {exc}") from exc
        except BaseException:
            if conn is not None:
                conn.close()
            raise
        self._conn = conn
        return None

    def _remove_empty_db(self) -> None:
        """The first open failed (a full disk) after SQLite created spool.db: an empty file it
        leaves would read as a damaged spool at the next try (and count a lost record)."""
        with contextlib.suppress(OSError):
            if self._db_path.stat().st_size == 0:
                self._db_path.unlink()
                for path in (self._wal_path, self._shm_path):
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            _create_tables(conn)
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise

    def _migrate_v2(self, conn: sqlite3.Connection) -> None:
        """Convert a version 2 spool in one transaction, moving no record: its waiting rows
        become `front` (claimed first, by copy, as version 2 did) and its claimed batches keep
        their rows; new appends go to the new `chunks`."""
        with self._write_lock, self._txn(conn, "conversion of a version 2 spool"):
            conn.execute("ALTER TABLE waiting RENAME TO front")
            conn.execute("CREATE TABLE chunks " + _ROWS_TABLE)
            for column in ("first_id", "last_id", "bytes"):
                conn.execute(f"ALTER TABLE claimed ADD COLUMN {column} INTEGER")
            conn.execute(_SCHEMA[-1])  # state
            conn.execute("INSERT INTO state (name, value) VALUES ('cursor', 1)")
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            waiting, batches = conn.execute(
                "SELECT (SELECT coalesce(sum(n), 0) FROM front),"
                " (SELECT count(*) FROM claimed)").fetchone()
        log.info("spool_converted", extra={"spool_path": str(self._db_path), "from_version": 2,
                                           "to_version": SCHEMA_VERSION,
                                           "records": int(waiting), "batches_kept": int(batches),
                                           "dead_lettered_records": 0})

    def _migrate_v1(self, conn: sqlite3.Connection) -> None:
        """Convert a version 1 spool (a row per record) in one transaction.

        Claimed batches whose records all verify keep key, attempts and body; the records of
        the others, and every waiting record, wait in their original order. Records failing
        their checksum go to the dead-letter file, as a claim would have sent them there.
        """
        migrated = kept = 0
        bad: list[bytes] = []
        with self._write_lock, self._txn(conn, "conversion of a version 1 spool"):
            conn.execute("ALTER TABLE records RENAME TO records_v1")
            conn.execute("ALTER TABLE batches RENAME TO batches_v1")
            _create_tables(conn)
            whole: set[int] = set()
            for bid, key, first_id, last_id, n_records, attempts, created_ns, claimed_ns in (
                    conn.execute("SELECT id, key, first_id, last_id, n_records, attempts,"
                                 " created_ns, claimed_ns FROM batches_v1 ORDER BY first_id, id"
                                 ).fetchall()):
                rows = conn.execute(
                    "SELECT crc32, payload FROM records_v1 WHERE id BETWEEN ? AND ?"
                    " AND batch_id = ? ORDER BY id", (first_id, last_id, bid)).fetchall()
                members = [bytes(p) for _, p in rows]
                if (len(members) == n_records and members and all(
                        zlib.crc32(p) == int(c) and _NL not in p for c, p in rows)):
                    payload = _NL.join(members)
                    conn.execute(
                        "INSERT INTO claimed (key, n, attempts, created_ns, claimed_ns, crc32,"
                        " crcs, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (key, len(members), attempts, created_ns, claimed_ns,
                         zlib.crc32(payload), _crcs(members), payload))
                    whole.add(int(bid))
                    kept += 1
                    migrated += len(members)
            cur = conn.execute("SELECT appended_ns, batch_id, crc32, payload FROM records_v1"
                               " ORDER BY id")
            chunk: list[bytes] = []
            chunk_ns = 0
            while rows := cur.fetchmany(1000):
                for appended_ns, batch_id, crc, payload in rows:
                    if batch_id is not None and int(batch_id) in whole:
                        continue
                    record = bytes(payload)
                    if zlib.crc32(record) != int(crc) or _NL in record:
                        bad.append(record)
                        continue
                    if not chunk:
                        chunk_ns = int(appended_ns)
                    chunk.append(record)
                    if len(chunk) >= self._chunk_records:
                        self._insert_waiting(conn, chunk, chunk_ns)
                        migrated += len(chunk)
                        chunk = []
            if chunk:
                self._insert_waiting(conn, chunk, chunk_ns)
                migrated += len(chunk)
            if bad:
                self._write_dead_letter(None, 0, "spool_corrupt: record failed its checksum"
                                        " (version 1 spool)", bad)
            conn.execute("DROP TABLE records_v1")
            conn.execute("DROP TABLE batches_v1")
        self._corrupt_lost_total += len(bad)
        log.info("spool_converted", extra={"spool_path": str(self._db_path), "from_version": 1,
                                           "to_version": SCHEMA_VERSION, "records": migrated,
                                           "batches_kept": kept,
                                           "dead_lettered_records": len(bad)})

    def _insert_waiting(self, conn: sqlite3.Connection, records: list[bytes],
                        appended_ns: int) -> None:
        """Append one row of `chunks` at the end (the caller holds the write lock, in a txn)."""
        self._insert_row(conn, "chunks", self._next_id, appended_ns, records)
        self._next_id += len(records)

    @staticmethod
    def _insert_row(conn: sqlite3.Connection, table: str, rid: int, appended_ns: int,
                    records: Sequence[bytes]) -> None:
        payload = _NL.join(records)
        conn.execute(f"INSERT INTO {table} ({_ROW_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                     (rid, appended_ns, len(records), zlib.crc32(payload), _crcs(records),
                      payload))

    def _load_counters(self) -> None:
        conn = self._require(self._conn)
        try:
            (cursor,) = conn.execute("SELECT value FROM state WHERE name = 'cursor'").fetchone()
            cursor = int(cursor)
            front = conn.execute(
                "SELECT coalesce(sum(n), 0), coalesce(sum(length(payload) - n + 1), 0)"
                " FROM front").fetchone()
            claimed = conn.execute(
                "SELECT coalesce(sum(n), 0), coalesce(sum(CASE WHEN first_id IS NULL"
                " THEN length(payload) - n + 1 ELSE bytes END), 0), count(*) FROM claimed"
            ).fetchone()
            # The rows of `chunks` after the cursor wait whole; the one holding it, its tail.
            # A row whose CRC blob disagrees with its `n` (damage) is sized by _waiting_part.
            chunks = conn.execute(
                "SELECT coalesce(sum(n), 0), coalesce(sum(length(payload) - n + 1), 0)"
                " FROM chunks WHERE id >= ? AND length(crcs) = 4 * n", (cursor,)).fetchone()
            odd = conn.execute("SELECT id, n, payload, crcs FROM chunks WHERE id >= ?"
                               " AND length(crcs) != 4 * n", (cursor,)).fetchall()
            held = conn.execute(
                "SELECT id, n, payload, crcs FROM chunks WHERE id < ? ORDER BY id DESC LIMIT 1",
                (cursor,)).fetchone()
            last = conn.execute("SELECT id, n FROM chunks ORDER BY id DESC LIMIT 1").fetchone()
        except (sqlite3.Error, TypeError) as exc:  # TypeError: no cursor row
            raise SpoolError(f"spool {self._db_path}: reading counters failed: {exc}") from exc
        tail_n = tail_bytes = 0
        for rid, n, payload, crcs in odd:
            part_n, part_bytes = _waiting_part(int(rid), int(n), bytes(payload), bytes(crcs),
                                               cursor)
            tail_n, tail_bytes = tail_n + part_n, tail_bytes + part_bytes
        if held is not None:
            part_n, part_bytes = _waiting_part(int(held[0]), int(held[1]), bytes(held[2]),
                                               bytes(held[3]), cursor)
            tail_n, tail_bytes = tail_n + part_n, tail_bytes + part_bytes
        self._cursor = cursor
        self._front = int(front[0])
        self._claimed_records, self._claimed_bytes = int(claimed[0]), int(claimed[1])
        self._records = int(front[0]) + int(chunks[0]) + tail_n + self._claimed_records
        self._bytes = int(front[1]) + int(chunks[1]) + tail_bytes + self._claimed_bytes
        self._batches = int(claimed[2])
        self._next_id = max(1, cursor, 1 if last is None else int(last[0]) + int(last[1]))

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
        problem = spool_repair.wal_problem(data)
        if problem is not None:
            self._set_aside_wal(problem, size, spool_repair.wal_rebuild(data, self._db_page_size()))

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

        found = _Salvage()
        # One transaction: the salvage lands whole or not at all.
        with self._write_lock, self._txn(conn, "salvage"):
            src = spool_repair.open_damaged(aside, _BUSY_TIMEOUT_S)
            if src is None:
                found.unknown = True
            else:
                try:
                    self._copy_damaged(src, conn, found)
                finally:
                    src.close()
            if found.put_back:
                self._put_back(conn, found.put_back, found.put_back_ns or self._clock_ns())
            if found.bad:
                self._write_dead_letter(
                    None, 0, f"spool_corrupt: checksum mismatch while salvaging {aside.name}",
                    found.bad)
        # The read-only connection leaves an index and maybe an empty WAL behind: not evidence.
        with contextlib.suppress(FileNotFoundError):
            Path(str(aside) + "-shm").unlink()
        aside_wal = Path(str(aside) + "-wal")
        with contextlib.suppress(OSError):
            if aside_wal.stat().st_size == 0:
                aside_wal.unlink()

        lost = found.lost
        # Damage that hides how much it took (an unreadable header, a file cut short) counts
        # at least one record: the metric is then a lower bound, but it moves, and the
        # RecordsDropped alert fires (it read 0 for 1,250 records lost with the header).
        self._corrupt_lost_total += max(lost, 1) if found.unknown else lost
        log.error(
            "spool_corrupt",
            extra={
                "spool_path": str(self._db_path),
                "moved_to": str(aside),
                "problem": problem,
                "salvaged_records": found.salvaged,
                "lost_records": lost,
                "lost_unknown": found.unknown,
                "dead_lettered_records": len(found.bad),
                "batches_kept": found.kept,
                "batches_rekeyed": found.rekeyed,
            },
        )

    def _copy_damaged(self, src: sqlite3.Connection, dst: sqlite3.Connection,
                      found: _Salvage) -> None:
        """Copy every verifiable record of the damaged database `src` into `dst`, and count
        what is lost.

        Sizes read from a damaged row are not trusted: garbage can parse as a row. A row's `n`
        counts only when its framing agrees with it (as many CRCs and newline-separated pieces
        as `n`). Waiting rows' ids are record sequence numbers without gaps, so what lies
        between two trusted rows is counted exactly by their ids; the copy renumbers the rows it
        keeps, so the new spool has no gaps either.
        """
        tables = spool_repair.table_names(src)
        if tables is None or not tables & {"waiting", "front", "chunks", "claimed", "records"}:
            found.unknown = True
            return
        refs: list[_SalvageRef] = []
        if "claimed" in tables:
            self._copy_damaged_claimed(src, dst, found, refs)
        # Every waiting record lands in `chunks`, in order: version 2's waiting rows and the
        # records put back (`front`) before those appended. Batches by reference become
        # batches holding their records.
        next_id = 1
        for table in ("waiting", "front"):
            if table in tables:
                next_id = self._copy_damaged_rows(src, dst, found, table, next_id)
        if "chunks" in tables:
            ok, cursor = spool_repair.query_int(
                src, "SELECT value FROM state WHERE name = 'cursor'")
            if not ok or cursor is None:
                # Unknown: after the last batch by reference (the rows before it were
                # acknowledged), else every record of `chunks` waits (sent again, not lost).
                found.unknown |= not ok
                cursor = max((ref.last_id + 1 for ref in refs), default=None)
            ref_records: dict[int, bytes] = {}
            next_id = self._copy_damaged_rows(src, dst, found, "chunks", next_id,
                                              cursor=cursor, refs=refs, ref_records=ref_records)
            self._rebuild_refs(dst, found, refs, ref_records)
        elif refs:
            self._rebuild_refs(dst, found, refs, {})
        self._next_id = next_id
        if "records" in tables:
            self._copy_damaged_v1(src, dst, found)
        if "marks" in tables:
            with contextlib.suppress(sqlite3.DatabaseError):
                dst.executemany(
                    "INSERT OR IGNORE INTO marks (key, value) VALUES (?, ?)",
                    [(k, v) for k, v in src.execute("SELECT key, value FROM marks")
                     if isinstance(k, str) and isinstance(v, int)])

    def _copy_damaged_claimed(self, src: sqlite3.Connection, dst: sqlite3.Connection,
                              found: _Salvage, refs: list[_SalvageRef]) -> None:
        handled: set[int] = set()
        try:
            columns = {str(r[1]) for r in src.execute("PRAGMA table_info(claimed)")}
        except sqlite3.DatabaseError:
            columns = set()
        ref_columns = "first_id, last_id" if "first_id" in columns else "NULL, NULL"

        def claimed_row(row: tuple[object, ...]) -> None:
            rid, key, n, attempts, created_ns, claimed_ns, crc, crcs, payload, first, last = row
            ints = (rid, n, attempts, created_ns, claimed_ns)
            if not (all(isinstance(v, int) for v in ints) and isinstance(key, str)
                    and isinstance(crcs, bytes) and isinstance(payload, bytes)):
                return  # counted below, from its header if that still reads
            assert isinstance(rid, int) and isinstance(n, int) and isinstance(created_ns, int)
            assert isinstance(attempts, int) and isinstance(claimed_ns, int)
            if isinstance(first, int) and isinstance(last, int) and first <= last:
                handled.add(rid)  # a batch by reference: rebuilt from `chunks`
                refs.append(_SalvageRef(rid, key, n, attempts, created_ns, claimed_ns, first,
                                        last))
                return
            handled.add(rid)
            if _intact(payload, n, crc, crcs):
                found.salvaged += n
                dst.execute("INSERT INTO claimed (id, key, n, attempts, created_ns, claimed_ns,"
                            " crc32, crcs, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (rid, key, n, attempts, created_ns, claimed_ns, crc, crcs, payload))
                found.kept += 1
                return
            good, bad = _verify(payload, n, crcs)
            found.bad += bad
            found.salvaged += len(good)
            if _framed(payload, n, crcs):
                found.lost += len(bad)
            else:
                found.unknown = True
            found.put_back += good
            found.rekeyed += 1
            found.put_back_ns = min(created_ns, found.put_back_ns or created_ns)

        spool_repair.read_table(
            src, "claimed", "id, key, n, attempts, created_ns, claimed_ns, crc32, crcs, payload,"
            f" {ref_columns}", claimed_row)
        # A batch whose row cannot be read whole is lost as a whole: its size counts when its
        # header still reads and agrees with itself.
        try:
            ids = [r[0] for r in src.execute("SELECT id FROM claimed")]
        except sqlite3.DatabaseError:
            found.unknown = True
            ids = []
        for rid in ids:
            if not isinstance(rid, int) or rid in handled:
                continue
            try:
                row = src.execute("SELECT n, length(crcs) FROM claimed WHERE id = ?",
                                  (rid,)).fetchone()
            except sqlite3.DatabaseError:
                row = None
            if row is not None and isinstance(row[0], int) and row[0] > 0 and row[1] == 4 * row[0]:
                found.lost += row[0]
            else:
                found.unknown = True

    def _copy_damaged_rows(self, src: sqlite3.Connection, dst: sqlite3.Connection,
                           found: _Salvage, table: str, next_id: int, *,
                           cursor: int | None = None, refs: Sequence[_SalvageRef] = (),
                           ref_records: dict[int, bytes] | None = None) -> int:
        """Copy the waiting records of a table of rows (version 2's `waiting`, `front`, or
        `chunks` from `cursor` on) into `dst`'s `chunks`, numbered from `next_id`; returns the
        id after the last. Records of `chunks` before the cursor that batches by reference
        (`refs`) name go to `ref_records` instead, by id."""
        ok_min, first_id = spool_repair.query_int(src, f"SELECT min(id) FROM {table}")
        ok_max, last_id = spool_repair.query_int(src, f"SELECT max(id) FROM {table}")
        found.unknown |= not (ok_min and ok_max)
        if cursor is not None and first_id is not None:
            first_id = max(first_id, cursor)
        end: int | None = first_id  # the id after the last trusted row
        between = 0  # records salvaged from untrusted rows since the last trusted one
        gaps = 0  # records missing between trusted rows
        ranges = sorted((ref.first_id, ref.last_id) for ref in refs)

        def claimed_part(rid: int, placed: list[tuple[int | None, bytes, bool]]) -> None:
            """Keep the records of batches by reference that lie in this row."""
            for i, part, ok in placed:
                if i is None or not any(lo <= rid + i <= hi for lo, hi in ranges):
                    continue
                if ok and ref_records is not None:
                    ref_records[rid + i] = part
                elif not ok:
                    found.bad.append(part)

        def waiting_row(row: tuple[object, ...]) -> None:
            nonlocal end, between, next_id, gaps
            rid, appended_ns, n, crc, crcs, payload = row
            if not (isinstance(rid, int) and isinstance(appended_ns, int)
                    and isinstance(n, int) and isinstance(crcs, bytes)
                    and isinstance(payload, bytes)):
                return
            good: list[bytes]
            bad: list[bytes] = []
            framed = _framed(payload, n, crcs)
            if cursor is not None:
                # Each record's place in the row says whether it waits (from the cursor on)
                # or belongs to a batch (before it): by its position when the row's framing
                # holds, else by its checksum's place among the row's stored ones.
                placed = _placed(payload.split(_NL), _crc_list(crcs), framed)
                claimed_part(rid, placed)
                if framed and rid + n <= cursor:
                    return
                good = [p for i, p, ok in placed if ok and i is not None and rid + i >= cursor]
                bad = [p for i, p, ok in placed
                       if i is None or (not ok and rid + i >= cursor)]
                found.bad += bad
                if framed:
                    skip = max(0, cursor - rid)
                    rid, n = rid + skip, n - skip
            elif _intact(payload, n, crc, crcs):
                good = payload.split(_NL)
            else:
                good, bad = _verify(payload, n, crcs)
                found.bad += bad
            if good:
                self._insert_row(dst, "chunks", next_id, appended_ns, good)
                next_id += len(good)
                found.salvaged += len(good)
            if not framed or (end is not None and rid < end):
                between += len(good)  # its size is not trusted: the ids around it count
                return
            if end is not None:
                gaps += max(0, rid - end - between)
            found.lost += len(bad)
            between = 0
            end = rid + n

        read = spool_repair.read_table(
            src, table, _ROW_COLUMNS, waiting_row, last_id_of=_last_record_id,
            count_from=cursor)
        if last_id is not None and end is not None and last_id >= end:
            gaps += max(0, last_id - end + 1 - between)  # the last rows: 1 record at least
            found.unknown = True
        # The reader's count of the ids it jumped over is a lower bound as well (it misses the
        # size of the last row before a damaged region); it is all there is when the table's
        # end cannot be read. (For `chunks`, only from the cursor on: ids before it may be
        # acknowledged records; the batches that still need theirs count what they miss.)
        found.lost += max(gaps, read.skipped_ids)
        found.unknown |= read.tail_unknown or read.head_unknown
        return next_id

    def _rebuild_refs(self, dst: sqlite3.Connection, found: _Salvage,
                      refs: Sequence[_SalvageRef], ref_records: dict[int, bytes]) -> None:
        """Batches by reference of a damaged spool, as batches holding their records: whole,
        under their key; else their verified records wait again, in front, under a new key."""
        for ref in refs:
            records = [ref_records.get(i) for i in range(ref.first_id, ref.last_id + 1)]
            good = [r for r in records if r is not None]
            if len(good) == len(records) == ref.n:
                payload = _NL.join(good)
                dst.execute("INSERT INTO claimed (id, key, n, attempts, created_ns, claimed_ns,"
                            " crc32, crcs, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (ref.rid, ref.key, ref.n, ref.attempts, ref.created_ns,
                             ref.claimed_ns, zlib.crc32(payload), _crcs(good), payload))
                found.kept += 1
                found.salvaged += ref.n
                continue
            found.lost += max(0, ref.n - len(good))
            found.salvaged += len(good)
            found.put_back += good
            found.rekeyed += 1
            found.put_back_ns = min(ref.created_ns, found.put_back_ns or ref.created_ns)

    def _copy_damaged_v1(self, src: sqlite3.Connection, dst: sqlite3.Connection,
                         found: _Salvage) -> None:
        """A damaged version 1 spool: a row per record, each record's checksum beside it. Its
        batches are re-sent under new keys."""
        ok, count = spool_repair.query_int(src, "SELECT count(*) FROM records")
        batch_ids: set[int] = set()
        salvaged = bad_records = 0

        def v1_row(row: tuple[object, ...]) -> None:
            nonlocal salvaged, bad_records
            rid, appended_ns, batch_id, crc, payload = row
            if not (isinstance(rid, int) and isinstance(appended_ns, int)
                    and isinstance(crc, int) and isinstance(payload, bytes)):
                return
            if isinstance(batch_id, int):
                batch_ids.add(batch_id)
            if zlib.crc32(payload) != crc or _NL in payload:
                found.bad.append(payload)
                bad_records += 1
                return
            salvaged += 1
            self._insert_waiting(dst, [payload], appended_ns)

        read = spool_repair.read_table(
            src, "records", "id, appended_ns, batch_id, crc32, payload", v1_row)
        found.salvaged += salvaged
        if ok and count is not None:
            found.lost += max(0, count - salvaged)
        else:
            found.lost += read.skipped_ids + bad_records
            found.unknown |= read.tail_unknown or read.head_unknown
        found.rekeyed += len(batch_ids)  # version 1 batches are re-sent under new keys

    # ------------------------------------------------------------------ transactions

    @contextlib.contextmanager
    def _txn(self, conn: sqlite3.Connection, what: str) -> Iterator[None]:
        """One write transaction. The caller holds _write_lock.

        The state kept beside the tables (the cursor, `front`'s count, the next record id) may
        change inside the transaction; when it fails it goes back with the tables (a full
        disk fails an append after its full policy moved the cursor: a claim from the moved
        one would skip records, an acknowledgement delete their row)."""
        state = (self._cursor, self._front, self._next_id)
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            _rollback(conn)
            self._cursor, self._front, self._next_id = state
            raise self._error(what, exc) from exc
        except BaseException:
            _rollback(conn)
            self._cursor, self._front, self._next_id = state
            raise
        self._commit_gen += 1
        self._wrote(_FRAMES_PER_TXN)

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
        for attr in ("_checkpoint_conn", "_append_conn", "_conn"):
            conn: sqlite3.Connection | None = getattr(self, attr)
            if conn is not None:
                setattr(self, attr, None)
                try:
                    conn.close()
                except sqlite3.Error as exc:
                    log.warning("spool_close_failed", extra={"error": str(exc)})

    # ------------------------------------------------------------------ the work

    def _read_oldest_waiting(self, conn: sqlite3.Connection) -> int | None:
        """Append time of the oldest waiting record: the first row of `front`, else the row
        of `chunks` holding the cursor (or the first after it). None when nothing waits."""
        try:
            if self._front:
                row = conn.execute(
                    "SELECT appended_ns FROM front ORDER BY id LIMIT 1").fetchone()
                if row is not None:
                    return int(row[0])
            cursor = self._cursor
            for rid, n, appended_ns in conn.execute(
                    f"SELECT id, n, appended_ns FROM chunks WHERE {_FROM_ROW_OF}"
                    " ORDER BY id LIMIT 2", (cursor, cursor)).fetchall():
                if int(rid) + int(n) > cursor:
                    return int(appended_ns)
        except sqlite3.Error as exc:
            raise self._error("due check", exc) from exc
        return None

    def _drop_oldest_waiting(self, conn: sqlite3.Connection, excess: int) -> tuple[int, int]:
        """Drop the oldest waiting records until `excess` bytes are free (or none are left):
        those of `front` first, then those of `chunks` from the cursor on. Returns (records,
        bytes) dropped. The caller holds the write lock, in a transaction."""
        self._oldest_waiting_ns = None
        self._forget_recent()
        count = freed = 0
        if self._front:
            count, freed = self._drop_front(conn, excess)
            self._front = max(0, self._front - count)
        if freed < excess:
            more, more_bytes = self._drop_chunks(conn, excess - freed)
            count += more
            freed += more_bytes
        return count, freed

    def _drop_front(self, conn: sqlite3.Connection, excess: int) -> tuple[int, int]:
        """`_drop_oldest_waiting` in `front`: whole rows, and the row that crosses the line
        keeps its newest records."""
        freed = count = 0
        upto: int | None = None  # rows up to this id go whole
        trim_id: int | None = None  # the row cut in two
        cur = conn.execute("SELECT id, n, length(payload) FROM front ORDER BY id")
        try:
            while freed < excess:
                row = cur.fetchone()
                if row is None:
                    break
                rid, n, length = int(row[0]), int(row[1]), int(row[2])
                size = length - (n - 1)
                if freed + size <= excess:
                    upto, freed, count = rid, freed + size, count + n
                    continue
                trim_id = rid
                break
        finally:
            cur.close()
        if upto is not None:
            conn.execute("DELETE FROM front WHERE id <= ?", (upto,))
        if trim_id is not None:
            rid = trim_id
            appended_ns, payload = conn.execute(
                "SELECT appended_ns, payload FROM front WHERE id = ?", (rid,)).fetchone()
            members = bytes(payload).split(_NL)
            k = 0
            while freed < excess and k < len(members):
                freed += len(members[k])
                k += 1
            count += k
            rest = members[k:]
            conn.execute("DELETE FROM front WHERE id = ?", (rid,))
            if rest:
                self._insert_row(conn, "front", rid + k, int(appended_ns), rest)
        return count, freed

    def _drop_chunks(self, conn: sqlite3.Connection, excess: int) -> tuple[int, int]:
        """`_drop_oldest_waiting` in `chunks`: the cursor moves past the records dropped (a row
        is never rewritten), then the rows left holding nothing any batch needs are deleted."""
        start_cursor = cursor = self._cursor
        freed = count = 0
        cur = conn.execute(f"SELECT id, n, length(payload) FROM chunks WHERE {_FROM_ROW_OF}"
                           " ORDER BY id", (cursor, cursor))
        try:
            while freed < excess:
                row = cur.fetchone()
                if row is None:
                    break
                rid, n, length = int(row[0]), int(row[1]), int(row[2])
                if rid + n <= start_cursor:
                    continue  # the row before the cursor's: nothing of it waits
                first = max(start_cursor, rid) - rid  # its first waiting record
                if first == 0 and freed + length - (n - 1) <= excess:
                    freed += length - (n - 1)
                    count += n
                    cursor = rid + n
                    continue
                (payload,) = conn.execute("SELECT payload FROM chunks WHERE id = ?",
                                          (rid,)).fetchone()
                members = bytes(payload).split(_NL)[first:]
                k = 0
                while freed < excess and k < len(members):
                    freed += len(members[k])
                    k += 1
                count += k
                cursor = rid + first + k
                if k < len(members):
                    break
        finally:
            cur.close()
        if cursor != start_cursor:
            conn.execute(_SET_CURSOR, (cursor,))
            self._cursor = cursor
            # Rows wholly dropped (none of them was claimed: they lay after the cursor).
            conn.execute("DELETE FROM chunks WHERE id >= ? AND id < ? AND id + n <= ?",
                         (start_cursor, cursor, cursor))
            self._collect(conn, start_cursor, start_cursor)  # the row that held the cursor
        return count, freed

    def _oldest_claimed(self, conn: sqlite3.Connection,
                        exclude: Collection[str] = ()) -> Batch | None:
        """The oldest claimed batch not in `exclude`. A batch whose records no longer verify
        (damage SQLite cannot see) is taken apart: its verified records wait again, in front,
        and the others go to the dead-letter file."""
        skip = sorted(exclude)
        where = f" WHERE key NOT IN ({', '.join(['?'] * len(skip))})" if skip else ""
        while True:
            try:
                row = conn.execute(
                    "SELECT key, n, attempts, created_ns, crc32, crcs, payload, first_id,"
                    f" last_id FROM claimed{where} ORDER BY id LIMIT 1", skip).fetchone()
                if row is None:
                    return None
                key, n, attempts, created_ns, crc, crcs, payload, first_id, last_id = row
                n = int(n)
                if first_id is not None:
                    good, bad, intact = self._read_ref(conn, int(first_id), int(last_id), n)
                    if intact:
                        return Batch(str(key), _NL.join(good), n, int(attempts),
                                     int(created_ns))
            except sqlite3.Error as exc:
                raise self._error("reading the claimed batch", exc) from exc
            if first_id is None:
                payload, crcs = bytes(payload), bytes(crcs)
                if n > 0 and _intact(payload, n, crc, crcs):
                    return Batch(str(key), payload, n, int(attempts), int(created_ns))
                good, bad = _verify(payload, n, crcs)
            with self._write_lock:
                self._take_apart(conn, str(key), good, bad)

    def _take_apart(self, conn: sqlite3.Connection, key: str, good: list[bytes],
                    bad: list[bytes]) -> None:
        with self._txn(conn, "taking apart a damaged batch"):
            found = self._claimed_row(conn, key)
            if found is None:
                return
            batch_id, n, created_ns, size, ref = found
            if bad:
                self._write_dead_letter(key, 0, "spool_corrupt: record failed its checksum", bad)
            self._put_back(conn, good, created_ns)
            conn.execute("DELETE FROM claimed WHERE id = ?", (batch_id,))
            waiting = waiting_bytes = 0
            if ref is not None:
                waiting, waiting_bytes = self._drop_unframed(conn, *ref)
                self._collect(conn, *ref)
        # The batch's records, and the waiting ones of rows it took whole (see _read_ref),
        # are now those put back.
        lost = max(0, n + waiting - len(good))
        self._oldest_waiting_ns = None
        self._claimed_records -= n
        self._claimed_bytes -= size
        self._records += len(good) - n - waiting
        self._bytes += sum(map(len, good)) - size - waiting_bytes
        self._batches -= 1
        self._corrupt_lost_total += lost
        # Damage: the tables say what is left (a size that rotted misleads any arithmetic on
        # the counters, which were made from the sizes as appended).
        self._load_counters()
        log.error("spool_corrupt", extra={
            "spool_path": str(self._db_path), "problem": "claimed batch failed its checksum",
            "idempotency_key": key, "lost_records": lost, "dead_lettered_records": len(bad),
            "records_waiting_again": len(good)})

    def _drop_unframed(self, conn: sqlite3.Connection, first: int,
                       last: int) -> tuple[int, int]:
        """Delete the rows of records `first` .. `last` whose framing is damaged: `_read_ref`
        gave every verified piece of theirs to the batch being taken apart (put back: sent
        again rather than lost), so nothing may read them again; the cursor moves past one
        that held it. Returns the (records, bytes) the counters held waiting in them. The
        caller holds the write lock, in a transaction."""
        waiting = waiting_bytes = 0
        for row in conn.execute(
                f"SELECT id, n, crcs, payload FROM chunks WHERE {_FROM_ROW_OF} AND id <= ?"
                " ORDER BY id", (first, first, last)).fetchall():
            rid, rn, crcs, payload = int(row[0]), int(row[1]), bytes(row[2]), bytes(row[3])
            if rid + rn <= first or _framed(payload, rn, crcs):
                continue
            cursor = self._cursor
            if rid + rn > cursor:  # as the counters count it (from its stored n)
                part_n, part_bytes = _waiting_part(rid, rn, payload, crcs, cursor)
                waiting += part_n
                waiting_bytes += part_bytes
                after = conn.execute("SELECT min(id) FROM chunks WHERE id > ?",
                                     (rid,)).fetchone()[0]
                self._cursor = max(cursor, int(after) if after is not None else self._next_id)
                conn.execute(_SET_CURSOR, (self._cursor,))
                self._next_id = max(self._next_id, self._cursor)
                self._forget_recent()
            conn.execute("DELETE FROM chunks WHERE id = ?", (rid,))
        return waiting, waiting_bytes

    def _claimed_row(self, conn: sqlite3.Connection,
                     key: str) -> tuple[int, int, int, int, tuple[int, int] | None] | None:
        """(row id, records, created_ns, their bytes, (first, last) record of `chunks` for a
        batch claimed by reference, else None) of claimed batch `key`; None if unknown."""
        row = conn.execute("SELECT id, n, created_ns, length(payload), first_id, last_id, bytes"
                           " FROM claimed WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        n = int(row[1])
        if row[4] is None:
            return int(row[0]), n, int(row[2]), int(row[3]) - (n - 1) if n else 0, None
        return int(row[0]), n, int(row[2]), int(row[6]), (int(row[4]), int(row[5]))

    def _batch_records(self, conn: sqlite3.Connection,
                       found: tuple[int, int, int, int, tuple[int, int] | None]) -> list[bytes]:
        """The records of a claimed batch as stored (not checked: for the dead-letter file
        and a split, which keep whatever is there)."""
        batch_id, n, _created_ns, _size, ref = found
        if ref is None:
            (payload,) = conn.execute("SELECT payload FROM claimed WHERE id = ?",
                                      (batch_id,)).fetchone()
            return bytes(payload).split(_NL) if n else []
        good, bad, _whole = self._read_ref(conn, ref[0], ref[1], n)
        return good + bad

    def _read_ref(self, conn: sqlite3.Connection, first: int, last: int,
                  n: int) -> tuple[list[bytes], list[bytes], bool]:
        """The records `first` .. `last` of `chunks` (a batch claimed by reference, `n` of
        them): (those that verify, those that do not, whether all `n` are there and verify, so
        the body is the one first sent).

        A row is checked with one CRC over its payload; only a damaged one is checked record
        by record (damage elsewhere in a row shared with other records does not touch the
        batch). When a damaged row's framing no longer says which record is which, all of its
        verified records count as the batch's (sent again rather than lost)."""
        good: list[bytes] = []
        bad: list[bytes] = []
        intact = True
        expect = first  # the next record the batch needs
        for row in conn.execute(
                f"SELECT {_ROW_COLUMNS} FROM chunks WHERE {_FROM_ROW_OF} AND id <= ?"
                " ORDER BY id", (first, first, last)).fetchall():
            rid, rn, crc = int(row[0]), int(row[2]), row[3]
            crcs, payload = bytes(row[4]), bytes(row[5])
            if rid + rn <= first:
                continue  # the row before: it ends before the batch starts
            lo, hi = max(first, rid) - rid, min(last, rid + rn - 1) - rid
            if rid + lo != expect:
                intact = False  # records missing: the rows holding them are gone
            expect = rid + hi + 1
            if _intact(payload, rn, crc, crcs):
                good += payload.split(_NL)[lo:hi + 1]
                continue
            if _framed(payload, rn, crcs):  # positions hold: the batch's own records only
                stored = _crc_list(crcs)
                for i, part in enumerate(payload.split(_NL)[lo:hi + 1], start=lo):
                    (good if zlib.crc32(part) == stored[i] else bad).append(part)
            else:  # which pieces are the batch's is unknown: its body cannot be trusted
                intact = False
                row_good, row_bad = _verify(payload, rn, crcs)
                good += row_good
                bad += row_bad
        if expect != last + 1 or len(good) != n or bad:
            intact = False
        return good, bad, intact

    def _collect(self, conn: sqlite3.Connection, first: int, last: int) -> None:
        """Delete the rows of `chunks` no longer needed now that the batch of records `first`
        .. `last` is gone (acknowledged, dead-lettered, split or taken apart): a row goes
        when all of its records lie before the cursor and no other batch refers to any of
        them. The caller holds the write lock, in a transaction."""
        # One statement: the rows holding any of these records that lie wholly before the
        # cursor and hold no record of another batch. (A row whose CRC blob contradicts its
        # `n` is not trusted to end where `n` says, and stays.)
        conn.execute(
            f"DELETE FROM chunks WHERE {_FROM_ROW_OF} AND id <= ? AND id + n <= ?"
            " AND length(crcs) = 4 * n AND NOT EXISTS (SELECT 1 FROM claimed"
            " WHERE first_id IS NOT NULL AND first_id < chunks.id + chunks.n"
            " AND last_id >= chunks.id)", (first, first, last, self._cursor))
        # Such a row (damage, rare) goes by the size its CRCs and pieces agree on, if they do.
        for rid, rn, crcs, payload in conn.execute(
                f"SELECT id, n, crcs, payload FROM chunks WHERE {_FROM_ROW_OF} AND id <= ?"
                " AND length(crcs) != 4 * n", (first, first, last)).fetchall():
            size = _shape(bytes(payload), int(rn), bytes(crcs))
            if size is None or int(rid) + size > self._cursor:
                continue
            shared = conn.execute(
                "SELECT 1 FROM claimed WHERE first_id IS NOT NULL AND first_id < ?"
                " AND last_id >= ? LIMIT 1", (int(rid) + size, int(rid))).fetchone()
            if shared is None:
                conn.execute("DELETE FROM chunks WHERE id = ?", (int(rid),))

    def _put_back(self, conn: sqlite3.Connection, records: list[bytes],
                  appended_ns: int) -> None:
        """Insert `records` as one row of `front`, in front of every waiting record (the
        caller holds the write lock, in a transaction)."""
        if not records:
            return
        row = conn.execute("SELECT min(id) FROM front").fetchone()
        first = 0 if row is None or row[0] is None else int(row[0])
        self._insert_row(conn, "front", first - len(records), appended_ns, records)
        self._front += len(records)

    def _looks_due(
        self, conn: sqlite3.Connection, max_records: int, max_age_s: float, force: bool
    ) -> bool:
        """Cheap pre-check without the write lock; _claim decides again on the rows it takes."""
        waiting = self._records - self._claimed_records
        if waiting <= 0:
            return False
        if force or waiting >= max_records:
            return True
        oldest_ns = self._oldest_waiting_ns
        if oldest_ns is None:
            oldest_ns = self._read_oldest_waiting(conn)
            if oldest_ns is None:
                return False
            # A race with a drop can only leave this too old: _claim checks again.
            self._oldest_waiting_ns = oldest_ns
        return self._clock_ns() - oldest_ns >= max_age_s * 1e9

    def _claim(
        self, conn: sqlite3.Connection, max_records: int, max_age_s: float, force: bool
    ) -> Batch | None:
        """Claim the oldest waiting records as a new batch. The caller holds _conn_lock.

        Records put back (`front`) go first, copied into the batch's row. The others are
        claimed by reference: the batch's row names the first and last record of `chunks` it
        takes and the cursor moves past them; nothing is copied, and the rows are deleted when
        the batch is gone. Their rows come from memory (`_recent`) when it holds them. Else
        they are read and checked before the write lock is taken (a WAL reader never blocks
        the writer), so the parser's commits wait only for the short write that follows. Only
        an append's full policy can change those rows or the cursor meanwhile (every other
        writer uses this connection, under _conn_lock): when it dropped records (`_drop_gen`
        moved), they are read again under the lock.
        """
        self._oldest_waiting_ns = None
        if self._front:
            # Put back, so the oldest waiting: due whenever a batch is.
            waiting = self._records - self._claimed_records
            return self._claim_front(conn, max_records, max_age_s,
                                     force or waiting >= max_records)
        with self._write_lock:
            if self._recent_ok:
                rows: list[_Row] = []
                count = 0
                for row in self._recent:
                    if count >= max_records:
                        break
                    rows.append(row)
                    count += row[2]
                plan = self._plan_rows(rows, count, max_records, max_age_s, force, check=False)
                return None if plan is None else self._write_ref_claim(conn, plan)
            drop_gen, cursor = self._drop_gen, self._cursor
        rows, damaged = self._read_chunks(conn, max_records, cursor)
        with self._write_lock:
            if self._drop_gen != drop_gen or self._cursor != cursor:
                rows, damaged = self._read_chunks(conn, max_records, self._cursor)
            if damaged is None:
                plan = self._plan_rows(rows, sum(row[2] for row in rows), max_records,
                                       max_age_s, force, check=False)
                return None if plan is None else self._write_ref_claim(conn, plan)
            self._quarantine(conn, damaged)
        # Its verified records wait in `front` now: they go first.
        return self._claim(conn, max_records, max_age_s, force)

    def _read_chunks(self, conn: sqlite3.Connection, max_records: int,
                     cursor: int) -> tuple[list[_Row], _Row | None]:
        """The waiting rows of `chunks` from the database, oldest first, checked: (rows, None),
        the row holding the cursor cut to its waiting records, up to `max_records` records and
        up to the first gap in ids (a batch by reference is a run of consecutive records). Or
        ([], row) for a damaged first row; a damaged row after others ends the run."""
        rows: list[_Row] = []
        count = 0
        expect: int | None = None
        try:
            cur = conn.execute(f"SELECT {_ROW_COLUMNS} FROM chunks WHERE {_FROM_ROW_OF}"
                               " ORDER BY id", (cursor, cursor))
            try:
                while count < max_records and (row := cur.fetchone()) is not None:
                    rid, row_ns, n, crc = int(row[0]), int(row[1]), int(row[2]), int(row[3])
                    crcs, payload = bytes(row[4]), bytes(row[5])
                    if not _intact(payload, n, crc, crcs):
                        # Its size is checked before it is used: a rotted `n` must not hide
                        # records that wait.
                        shape = _shape(payload, n, crcs)
                        if shape is not None and rid + shape <= cursor:
                            continue  # damaged, but all of it is a batch's: the batch's care
                        if rows:
                            break  # the next claim meets it first
                        return [], (rid, row_ns, n, crc, crcs, payload)
                    if rid + n <= cursor:
                        continue  # the row before the cursor's: nothing of it waits
                    if expect is not None and rid != expect:
                        break
                    if rid < cursor:  # only its tail waits
                        k = cursor - rid
                        payload = _cut(payload, k)[1]
                        rid, n, crcs, crc = cursor, n - k, crcs[4 * k:], zlib.crc32(payload)
                    rows.append((rid, row_ns, n, crc, crcs, payload))
                    count += n
                    expect = rid + n
            finally:
                cur.close()
        except sqlite3.Error as exc:
            raise self._error("claim a batch", exc) from exc
        return rows, None

    def _quarantine(self, conn: sqlite3.Connection, row: _Row) -> None:
        """A damaged row of `chunks` that a claim met (damage SQLite cannot see): its waiting
        records that verify move to `front`, in order, to go first; those that do not go to
        the dead-letter file; the cursor moves past the row. The caller holds the write lock.

        When the row's framing no longer says which of its records were already claimed, all
        of its verified records wait again: sent twice rather than lost."""
        rid, _row_ns, n, _crc, crcs, payload = row
        cursor = self._cursor
        first = max(cursor, rid) - rid
        counted, counted_bytes = _waiting_part(rid, n, payload, crcs, cursor)  # as counted
        parts = payload.split(_NL)
        shape = _shape(payload, n, crcs)  # its true size, when its pieces and CRCs agree
        framed = shape == n
        if shape is not None:
            stored = _crc_list(crcs)
            good = [p for i, p in enumerate(parts) if i >= first and zlib.crc32(p) == stored[i]]
            bad = [p for i, p in enumerate(parts) if i >= first and zlib.crc32(p) != stored[i]]
        else:
            good, bad = _verify(payload, n, crcs)
        lost = max(0, counted - len(good))
        with self._txn(conn, "setting a damaged row aside"):
            after = conn.execute("SELECT min(id) FROM chunks WHERE id > ?", (rid,)).fetchone()
            new_cursor = max(cursor, int(after[0]) if after[0] is not None
                             else max(self._next_id, rid + 1))
            if bad:
                self._write_dead_letter(None, 0, "spool_corrupt: record failed its checksum",
                                        bad)
            appended_ns = row[1]
            self._put_back(conn, good, appended_ns)
            conn.execute(_SET_CURSOR, (new_cursor,))
            self._cursor = new_cursor
            self._next_id = max(self._next_id, new_cursor)
            if framed:
                self._collect(conn, rid, rid)  # kept while a batch still needs its head
            elif shape is not None:  # only its `n` is wrong: kept while a batch needs it
                shared = conn.execute(
                    "SELECT 1 FROM claimed WHERE first_id IS NOT NULL AND first_id <= ?"
                    " AND last_id >= ? LIMIT 1", (rid + shape - 1, rid)).fetchone()
                if shared is None:
                    conn.execute("DELETE FROM chunks WHERE id = ?", (rid,))
            else:
                # Which piece is whose is unknown (and its size could reach past the cursor,
                # to be met again): it goes. Every verified piece of it waits in `front` now,
                # a batch's too; that batch, missing them, is taken apart when next read.
                conn.execute("DELETE FROM chunks WHERE id = ?", (rid,))
        self._forget_recent()
        self._oldest_waiting_ns = None
        # `front` gained `good`, the row's waiting records are gone. (From a row whose framing
        # broke, `good` may hold a claimed batch's records too: that batch, missing them when
        # next read, is taken apart and its count goes then.)
        self._records += len(good) - counted
        self._bytes += sum(map(len, good)) - counted_bytes
        self._corrupt_lost_total += lost
        self._load_counters()  # as in _take_apart
        log.error("spool_corrupt", extra={
            "spool_path": str(self._db_path), "problem": "record checksum mismatch",
            "lost_records": lost, "dead_lettered_records": len(bad),
            "records_waiting_again": len(good)})

    def _claim_front(
        self, conn: sqlite3.Connection, max_records: int, max_age_s: float, force: bool
    ) -> Batch | None:
        """Claim the oldest records of `front` (put back), copying them into the batch's row:
        read and checked before the write lock is taken, like a claim of `chunks`."""
        with self._write_lock:
            drop_gen = self._drop_gen
        plan = self._plan_claim(conn, max_records, max_age_s, force)
        with self._write_lock:
            if self._drop_gen != drop_gen:
                plan = self._plan_claim(conn, max_records, max_age_s, force)
            if plan is None:
                return None
            return self._write_claim(conn, plan)

    def _plan_claim(
        self, conn: sqlite3.Connection, max_records: int, max_age_s: float, force: bool
    ) -> _ClaimPlan | None:
        """Read the oldest rows of `front` for a batch; None when none is due."""
        rows: list[_Row] = []
        count = 0
        try:
            cur = conn.execute(f"SELECT {_ROW_COLUMNS} FROM front ORDER BY id")
            try:
                while count < max_records and (row := cur.fetchone()) is not None:
                    rows.append((int(row[0]), int(row[1]), int(row[2]), row[3], bytes(row[4]),
                                 bytes(row[5])))
                    count += int(row[2])
            finally:
                cur.close()
        except sqlite3.Error as exc:
            raise self._error("claim a batch", exc) from exc
        return self._plan_rows(rows, count, max_records, max_age_s, force, check=True)

    def _plan_rows(self, rows: list[_Row], count: int, max_records: int, max_age_s: float,
                   force: bool, *, check: bool) -> _ClaimPlan | None:
        """The claim of the oldest waiting `rows` (holding `count` records), None when it is
        not due. `check`: the rows were read back from the database, verify their checksums
        (rows from memory are what was committed)."""
        if not rows:
            return None
        age_ns = self._clock_ns() - rows[0][1]
        if not (force or count >= max_records or age_ns >= max_age_s * 1e9):
            return None
        plan = _ClaimPlan(first_id=rows[0][0], first_ns=rows[0][1])
        # Whole rows go into the batch as they are (payload and CRCs copied, not split); only
        # the last row read may be cut in two.
        payloads: list[bytes] = []
        crc_parts: list[bytes] = []
        for rid, row_ns, stored_n, crc, stored_crcs, stored in rows:
            payload, crcs, n = stored, stored_crcs, stored_n
            if check and not _intact(payload, n, crc, crcs):
                good, damaged = _verify(payload, n, crcs)
                plan.bad += damaged
                plan.lost_records += max(0, stored_n - len(good))
                plan.lost_bytes += len(stored) - (stored_n - 1) - sum(map(len, good))
                payload, crcs, n = _NL.join(good), _crcs(good), len(good)
            room = max_records - plan.taken
            if n <= room:
                if n:
                    payloads.append(payload)
                    crc_parts.append(crcs)
                    plan.taken += n
                plan.whole_upto = rid
                plan.last_id = rid + n - 1
                continue
            head, tail = _cut(payload, room)
            payloads.append(head)
            crc_parts.append(crcs[: 4 * room])
            plan.taken += room
            plan.last_id = rid + room - 1
            plan.cut = (rid, (rid + stored_n - (n - room), row_ns, n - room, zlib.crc32(tail),
                              crcs[4 * room:], tail))
        plan.payload = _NL.join(payloads)
        plan.crcs = b"".join(crc_parts)
        return plan

    def _write_claim(self, conn: sqlite3.Connection, plan: _ClaimPlan) -> Batch | None:
        """Commit a planned claim of `front`: the records copied into the batch's row. The
        caller holds both locks."""
        batch: Batch | None = None
        bad = plan.bad
        with self._txn(conn, "claim a batch"):
            if plan.cut is not None:
                rid, tail_row = plan.cut
                conn.execute("DELETE FROM front WHERE id = ?", (rid,))
                conn.execute(f"INSERT INTO front ({_ROW_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                             tail_row)
            if plan.whole_upto is not None:
                conn.execute("DELETE FROM front WHERE id BETWEEN ? AND ?",
                             (plan.first_id, plan.whole_upto))
            if bad:
                self._write_dead_letter(
                    None, 0, "spool_corrupt: record failed its checksum", bad)
            if plan.taken:
                key = uuid.uuid4().hex
                conn.execute(
                    "INSERT INTO claimed (key, n, attempts, created_ns, claimed_ns, crc32, crcs,"
                    " payload) VALUES (?, ?, 0, ?, ?, ?, ?, ?)",
                    (key, plan.taken, plan.first_ns, self._clock_ns(), zlib.crc32(plan.payload),
                     plan.crcs, plan.payload),
                )
                batch = Batch(key, plan.payload, plan.taken, 0, plan.first_ns, fresh=True)
        self._front = max(0, self._front - plan.taken - plan.lost_records)
        self._records -= plan.lost_records
        self._bytes -= plan.lost_bytes
        self._corrupt_lost_total += plan.lost_records
        if bad:
            log.error(
                "spool_corrupt",
                extra={
                    "spool_path": str(self._db_path),
                    "problem": "record checksum mismatch",
                    "lost_records": plan.lost_records,
                    "dead_lettered_records": len(bad),
                },
            )
        if batch is not None:
            self._claimed_records += batch.size
            self._claimed_bytes += len(batch.payload) - (batch.size - 1)
            self._batches += 1
            self._wrote(len(batch.payload) // PAGE_SIZE)
        return batch

    def _write_ref_claim(self, conn: sqlite3.Connection, plan: _ClaimPlan) -> Batch:
        """Commit a planned claim of `chunks` by reference: a small row naming the batch's
        first and last record, and the cursor past them. The caller holds both locks."""
        with self._txn(conn, "claim a batch"):
            key = self._insert_ref_claim(conn, plan)
        return self._ref_claimed(plan, key)

    def _insert_ref_claim(self, conn: sqlite3.Connection, plan: _ClaimPlan) -> str:
        """The writes of a claim by reference, in the caller's transaction; its key."""
        key = uuid.uuid4().hex
        conn.execute(
            "INSERT INTO claimed (key, n, attempts, created_ns, claimed_ns, crc32, crcs,"
            " payload, first_id, last_id, bytes) VALUES (?, ?, 0, ?, ?, 0, x'', x'', ?, ?, ?)",
            (key, plan.taken, plan.first_ns, self._clock_ns(), plan.first_id, plan.last_id,
             len(plan.payload) - (plan.taken - 1)))
        conn.execute(_SET_CURSOR, (plan.last_id + 1,))
        return key

    def _ref_claimed(self, plan: _ClaimPlan, key: str) -> Batch:
        """The state beside the tables once a claim by reference has committed."""
        size = len(plan.payload) - (plan.taken - 1)
        self._cursor = plan.last_id + 1
        self._oldest_waiting_ns = None
        if self._recent_ok:
            self._claimed_from_recent(plan)
        self._claimed_records += plan.taken
        self._claimed_bytes += size
        self._batches += 1
        self._wrote(0)
        if self._records == self._claimed_records and not self._recent_ok:
            # Nothing waits, by the counters: memory holds it all (the table is asked too, on
            # the way back from the database only, so a miscount can never hide a row).
            self._recent_ok = self._nothing_waits()
        return Batch(key, plan.payload, plan.taken, 0, plan.first_ns, fresh=True)

    def _nothing_waits(self) -> bool:
        """Whether no record waits in `front` or `chunks` (False when they cannot be read)."""
        try:
            conn = self._require(self._conn)
            if conn.execute("SELECT 1 FROM front LIMIT 1").fetchone() is not None:
                return False
            cursor = self._cursor
            return all(int(rid) + int(n) <= cursor for rid, n in conn.execute(
                f"SELECT id, n FROM chunks WHERE {_FROM_ROW_OF} ORDER BY id LIMIT 2",
                (cursor, cursor)).fetchall())
        except (sqlite3.Error, SpoolError):
            return False

    def _claimed_from_recent(self, plan: _ClaimPlan) -> None:
        """Take the rows a committed claim removed off the front of `_recent`."""
        recent = self._recent
        if plan.whole_upto is not None:
            while recent and recent[0][0] <= plan.whole_upto:
                self._recent_bytes -= len(recent.popleft()[5])
        if plan.cut is not None:
            rid, tail_row = plan.cut
            if not recent or recent[0][0] != rid:  # pragma: no cover - a claim takes the front
                self._forget_recent()
                return
            self._recent_bytes -= len(recent.popleft()[5])
            recent.appendleft(tail_row)
            self._recent_bytes += len(tail_row[5])

    def _forget_recent(self) -> None:
        """Stop serving claims from memory (the caller holds _write_lock)."""
        self._recent.clear()
        self._recent_bytes = 0
        self._recent_ok = False

    def _remove_batch(
        self, conn: sqlite3.Connection, key: str, what: str, dead: tuple[int, str] | None
    ) -> int:
        """Delete batch `key` (writing its records to the dead-letter file first)."""
        with self._txn(conn, what):
            found = self._claimed_row(conn, key)
            if found is None:
                return 0
            batch_id, count, _created_ns, size, ref = found
            if dead is not None:
                self._write_dead_letter(key, dead[0], dead[1], self._batch_records(conn, found))
            conn.execute("DELETE FROM claimed WHERE id = ?", (batch_id,))
            if ref is not None:
                self._collect(conn, *ref)
        self._records -= count
        self._bytes -= size
        self._claimed_records -= count
        self._claimed_bytes -= size
        self._batches -= 1
        return count

    def _maybe_vacuum(self, conn: sqlite3.Connection) -> None:
        """Give free pages back to the file system a step at a time after a backlog drained.

        Not while more than `_VACUUM_MIN_FREE_BYTES` of records are still on disk: the pages a
        draining backlog frees are reused by the appends meanwhile, and a vacuum step moves
        the live pages behind them (10-30 ms an acknowledgement in a burst's drain, holding
        the write lock the parser needs)."""
        if self._bytes > _VACUUM_MIN_FREE_BYTES:
            return
        now = time.monotonic()
        if now < self._vacuum_look_at:
            return
        try:
            free = _int_or_none(conn.execute("PRAGMA freelist_count").fetchone()) or 0
            pages = _int_or_none(conn.execute("PRAGMA page_count").fetchone()) or 0
            page_bytes = self._page_bytes
            if page_bytes is None:  # the database's own (a spool made before may differ)
                page_bytes = self._page_bytes = _int_or_none(
                    conn.execute("PRAGMA page_size").fetchone()) or PAGE_SIZE
            if free * page_bytes < _VACUUM_MIN_FREE_BYTES or free * 2 < pages:
                # Nothing to give back: look again in a while, not at every acknowledgement
                # (two PRAGMAs, ~80 µs, 20 times a second at 2,000 tickers/s).
                self._vacuum_look_at = now + _VACUUM_LOOK_INTERVAL_S
                return
            step = max(1, _VACUUM_STEP_BYTES // page_bytes)
            with self._write_lock:
                # executescript, because a Python execute() steps this pragma only once, which
                # frees a single page; in autocommit mode it runs as one transaction of its own.
                conn.executescript(f"PRAGMA incremental_vacuum({step});")
                self._commit_gen += 1
                self._wrote(step)
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
        try:
            size: int | None = path.stat().st_size
        except FileNotFoundError:
            size = None
        except OSError as exc:
            raise SpoolError(f"dead-letter file {path}: cannot stat: {exc.strerror}") from exc
        if size and size + len(line) > self._dead_letter_max_bytes:
            rotated = path.with_name(path.name + ".1")
            try:
                os.replace(path, rotated)
            except OSError as exc:
                raise SpoolError(f"dead-letter file {path}: cannot rotate to {rotated.name}:"
                                 f" {exc.strerror}") from exc
            log.warning("dead_letter_rotated", extra={
                "spool_path": str(path), "rotated_to": str(rotated), "bytes": size})
            size = None
        created = size is None
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

    def _wrote(self, frames: int) -> None:
        """Note a commit of about `frames` WAL frames. The caller holds _write_lock."""
        self._wal_frames += frames
        self._committed.set()
        # (on a small file system, sooner: the WAL must fit in a quarter of the reserve, which
        # is all the room a spool held at its size has to write in; see _disk_limit)
        threshold = min(_CHECKPOINT_MIN_FRAMES, self._disk_reserve // (4 * PAGE_SIZE))
        if self._wal_frames >= threshold and self._checkpoint_conn is not None:
            self._checkpoint_wanted.set()

    def _sync_loop(self) -> None:
        # The power-cut bound must hold even when nobody calls us, hence a thread of our own.
        # It sleeps until something is committed (an idle collector commits nothing), then
        # fsyncs at most fsync_interval_s later, covering every commit made until then.
        # Meanwhile it checkpoints whenever _CHECKPOINT_MIN_FRAMES were written, so the WAL
        # stays about that long (module docstring: Checkpoints).
        if self._thread_init is not None:
            try:
                self._thread_init()
            except Exception:  # a nicety (the thread's name), never worth the fsyncs
                log.exception("spool_thread_init_failed")
        while True:
            self._committed.wait()
            sync_at = time.monotonic() + self._fsync_interval_s
            while (left := sync_at - time.monotonic()) > 0 and not self._stop.is_set():
                if self._checkpoint_wanted.wait(left) and not self._stop.is_set():
                    self._checkpoint()
            if self._stop.is_set():
                return  # close() syncs once more itself
            self._committed.clear()  # before the fsync: a commit after it sets it again
            try:
                self._sync_wal()
            except OSError as exc:
                log.error(
                    "spool_fsync_failed",
                    extra={"spool_path": str(self._wal_path), "error": exc.strerror},
                )
            # Also a checkpoint wanted since the loop above ended (the wake-up was used up
            # there), or the age rule.
            aged = time.monotonic() - self._checkpointed_at >= _CHECKPOINT_MAX_AGE_S
            if self._checkpoint_wanted.is_set() or (self._wal_frames and aged):
                self._checkpoint()

    def _checkpoint(self) -> None:
        """Copy the WAL's frames back into the database on the spool-fsync thread's own
        connection (module docstring: Checkpoints); SQLite releases the GIL meanwhile. A
        failure is logged, not raised: SQLite's automatic checkpoint still bounds the WAL."""
        with self._write_lock:  # frames written from now on count towards the next one
            self._wal_frames = 0
            self._checkpoint_wanted.clear()
        self._checkpointed_at = time.monotonic()
        conn = self._checkpoint_conn
        if conn is None:
            return
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            # What was committed meanwhile, holding the write lock: then every frame is back
            # in the database and the next commit starts the WAL over (without this pass a
            # writer nearly always found frames left: the WAL grew to 13 MB within 5 s at
            # 1,000 commits a second). A few frames: 0.5-0.9 ms at that rate.
            with self._write_lock:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:
            now = time.monotonic()
            if now - self._last_checkpoint_error_log >= 60:
                self._last_checkpoint_error_log = now
                log.warning("spool_checkpoint_failed",
                            extra={"spool_path": str(self._db_path), "error": str(exc)})

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


def _create_tables(conn: sqlite3.Connection) -> None:
    """The current schema, in the caller's transaction."""
    for statement in _SCHEMA:
        conn.execute(statement)
    conn.execute("INSERT INTO state (name, value) VALUES ('cursor', 1)")
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _int_or_none(row: object) -> int | None:
    if isinstance(row, tuple) and row and isinstance(row[0], int):
        return row[0]
    return None


def _disk_space(directory: Path) -> tuple[int, int] | None:
    """(bytes free to us, size) of the file system holding `directory`; None when unknown."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    if st.f_blocks <= 0 or st.f_frsize <= 0:
        return None  # ramfs, some FUSE file systems: no size said, none to go by
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def is_disk_full(exc: BaseException) -> bool:
    """Whether a SpoolError (or what caused it) is a full disk or quota: a passing condition,
    not a setting to fix."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(cause, sqlite3.Error) and getattr(
                cause, "sqlite_errorname", "") == "SQLITE_FULL":
            return True
        cause = cause.__cause__ or cause.__context__
    return False


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
