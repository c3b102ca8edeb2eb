"""SQLiteStorage: the embedded default backend (stdlib sqlite3, WAL, one writer).

SQLite allows one writer at a time anyway; a process-local lock serialises writers so they queue
in Python rather than spin on SQLITE_BUSY, while readers use their own connections and, thanks to
WAL, never wait for the writer. `synchronous=FULL` because a 2xx tells the collector it may
delete its copy of the batch: the rows must survive a power cut, not only a process crash.

`price` and `volume` are REAL, 64-bit floats: the nearest double to the decimal the collector
sent (about 15 to 17 significant digits; a volume of `1e-400` is stored as 0.0), where
PostgreSQL's `numeric` keeps every digit. `timestamp` is the validated text, every fractional
digit kept (PostgreSQL keeps microseconds), with `timestamp_ns` to order by.
"""

from __future__ import annotations

import errno
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from collectors.errors import StorageError
from collectors.ingest.storage.base import LatestRow, Outcome, SourceSummary, StoreResult
from collectors.ingest.validate import FeedBatch, MetaScalar, ValidFeed
from collectors.model import iso_from_ns

# A batch is answered (503 and Retry-After when the database is busy) within the collectors'
# 10 s read timeout (HTTP_READ_TIMEOUT_S): at most WRITE_QUEUE_TIMEOUT_S in this process's
# queue of writers, then at most BUSY_TIMEOUT_MS for another process's write lock (a migration,
# a backup), then the write itself.
WRITE_QUEUE_TIMEOUT_S = 3.0
BUSY_TIMEOUT_MS = 4_000

# Each entry moves the schema from version N-1 to N; never edit one that has shipped.
MIGRATIONS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (1, "price_feeds and ingest_batches", (
        """CREATE TABLE price_feeds (
            id INTEGER PRIMARY KEY,
            symbol TEXT NOT NULL,
            price REAL NOT NULL,
            volume REAL,
            timestamp TEXT NOT NULL,
            timestamp_ns INTEGER NOT NULL,
            source TEXT NOT NULL,
            worker_id TEXT NOT NULL,
            metadata TEXT NOT NULL DEFAULT '{}',
            received_at TEXT NOT NULL
        )""",
        # latest per (source, symbol): seek to each pair, newest first
        "CREATE INDEX price_feeds_source_symbol_time ON price_feeds "
        "(source, symbol, timestamp_ns DESC, id DESC)",
        # summary over the last N minutes
        "CREATE INDEX price_feeds_time ON price_feeds (timestamp_ns)",
        """CREATE TABLE ingest_batches (
            idempotency_key TEXT PRIMARY KEY,
            body_sha256 TEXT NOT NULL,
            record_count INTEGER NOT NULL,
            status TEXT NOT NULL,
            created_at TEXT NOT NULL
        ) WITHOUT ROWID""",
    )),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]

# OR FAIL, not the default OR ABORT: a statement that may abort after writing some of its rows
# makes SQLite keep a statement journal (a temp file of every page the statement changes, to
# undo just that statement), which costs more than the rows. Nothing is lost without it: any
# error rolls the whole transaction back (so a failed batch stores nothing either way), and
# validated rows meet every constraint.
_INSERT_FEEDS = (
    "INSERT OR FAIL INTO price_feeds (symbol, price, volume, timestamp, timestamp_ns, source,"
    " worker_id, metadata, received_at) VALUES "
)
# A row's own values, in _INSERT_FEEDS's order; received_at is one parameter shared by all.
_ROW_VALUES = 8
# Rows per INSERT statement: one multi-row INSERT costs much less than as many one-row
# executions (executemany steps, resets and rebinds a statement per row), and 50 rows take
# 401 parameters, within every SQLite's limit (999 before 3.32).
_ROWS_PER_INSERT = 50
_LATEST_COLUMNS = "symbol, price, volume, timestamp, source, worker_id, metadata, received_at"


def sqlite_path(database_url: str) -> Path:
    """`sqlite:///rel/path.db` -> rel/path.db, `sqlite:////abs/path.db` -> /abs/path.db."""
    return Path(database_url.removeprefix("sqlite:///"))


def _connect(path: Path, *, readonly: bool) -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a transaction is exactly the
    # statements between them. check_same_thread=False: waitress threads share these
    # connections, always under our locks (writer) or one thread at a time (readers).
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                           check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA synchronous = FULL")
        if readonly:
            conn.execute("PRAGMA query_only = 1")
    except sqlite3.Error:
        conn.close()
        raise
    return conn


def migrate_sqlite(path: Path) -> list[int]:
    """Bring the schema up to date; return the versions applied now. Raises StorageError."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"sqlite: cannot create {path.parent}: {exc.strerror}",
                           transient=exc.errno in (errno.ENOSPC, errno.EDQUOT)) from exc
    try:
        conn = _connect(path, readonly=False)
    except sqlite3.Error as exc:
        raise StorageError(f"sqlite: cannot open {path}: {exc}",
                           transient=_transient(exc)) from exc
    try:
        return _migrate(conn)
    finally:
        conn.close()


def _transient(exc: sqlite3.Error) -> bool:
    """A full disk (SQLITE_FULL; an I/O error, such as growing the shared-memory file of an
    existing WAL database on a full disk), or the file locked by another process for longer
    than the busy timeout: what may pass by itself (a read-only file or folder, a file that is
    no database, do not)."""
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF  # (the primary result code)
    return code in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_BUSY,
                    sqlite3.SQLITE_LOCKED)


def _migrate(conn: sqlite3.Connection) -> list[int]:
    applied: list[int] = []
    try:
        # WAL is a property of the file; it cannot change inside a transaction.
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        if mode is None or str(mode[0]).lower() != "wal":
            raise StorageError(f"sqlite: cannot switch to WAL mode (got {mode!r})")
        for version, _name, statements in MIGRATIONS:
            # BEGIN IMMEDIATE takes the write lock first, so two processes starting together
            # apply each migration once: the second re-reads user_version after the first.
            conn.execute("BEGIN IMMEDIATE")
            try:
                current = _user_version(conn)
                if current > SCHEMA_VERSION:
                    raise StorageError(f"sqlite: schema version {current} is newer than this "
                                       f"program ({SCHEMA_VERSION}); upgrade chrono-collectors")
                if current >= version:
                    conn.execute("COMMIT")
                    continue
                for statement in statements:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {version}")
                conn.execute("COMMIT")
                applied.append(version)
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
    except sqlite3.Error as exc:
        raise StorageError(f"sqlite: migration failed: {exc}", transient=_transient(exc)) from exc
    return applied


def _user_version(conn: sqlite3.Connection) -> int:
    row = conn.execute("PRAGMA user_version").fetchone()
    return int(row[0]) if row else 0


class SQLiteStorage:
    """Storage on one SQLite file. Thread-safe; create with `SQLiteStorage.open(path)`."""

    def __init__(self, path: Path, writer: sqlite3.Connection, *,
                 clock_ns: Callable[[], int] = time.time_ns) -> None:
        self.path = path
        self._writer = writer
        self._clock_ns = clock_ns
        # Serialises writers in-process (SQLite has one writer; queue here, not on SQLITE_BUSY).
        self._write_lock = threading.Lock()
        # Guards the idle-reader list, the in-flight key set and the closed flag.
        self._lock = threading.Lock()
        self._idle_readers: list[sqlite3.Connection] = []
        self._in_flight: set[str] = set()
        self._closed = False

    @classmethod
    def open(cls, path: Path, *, clock_ns: Callable[[], int] = time.time_ns) -> SQLiteStorage:
        """Create the file and its folder if missing, migrate, open. Raises StorageError."""
        migrate_sqlite(path)
        try:
            writer = _connect(path, readonly=False)
        except sqlite3.Error as exc:
            raise StorageError(f"sqlite: cannot open {path}: {exc}",
                               transient=_transient(exc)) from exc
        return cls(path, writer, clock_ns=clock_ns)

    def store_batch(self, idempotency_key: str, body_sha256: str,
                    feeds: Sequence[ValidFeed]) -> StoreResult:
        with self._lock:
            if self._closed:
                raise StorageError("sqlite: storage is closed")
            # A second request with the same key while the first is queued or writing gets
            # IN_FLIGHT (409) at once instead of waiting and then replaying.
            if idempotency_key in self._in_flight:
                return StoreResult(Outcome.IN_FLIGHT, 0)
            self._in_flight.add(idempotency_key)
        try:
            if not self._write_lock.acquire(timeout=WRITE_QUEUE_TIMEOUT_S):
                raise StorageError(f"sqlite: busy: the batches ahead held the database for "
                                   f"{WRITE_QUEUE_TIMEOUT_S:g} s")
            try:
                return self._store_locked(idempotency_key, body_sha256, feeds)
            finally:
                self._write_lock.release()
        finally:
            with self._lock:
                self._in_flight.discard(idempotency_key)

    def _store_locked(self, key: str, body_sha256: str,
                      feeds: Sequence[ValidFeed]) -> StoreResult:
        conn = self._writer
        received_at = iso_from_ns(self._clock_ns())
        values = _row_values(feeds)
        count = len(values) // _ROW_VALUES
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                seen = conn.execute(
                    "SELECT body_sha256, record_count FROM ingest_batches"
                    " WHERE idempotency_key = ?", (key,)).fetchone()
                if seen is not None:
                    conn.execute("ROLLBACK")
                    outcome = Outcome.REPLAYED if seen[0] == body_sha256 else Outcome.CONFLICT
                    return StoreResult(outcome, int(seen[1]))
                # The rows in order, _ROWS_PER_INSERT to a statement (the last one fewer).
                step = _ROWS_PER_INSERT * _ROW_VALUES
                for start in range(0, len(values), step):
                    params = values[start:start + step]
                    params.append(received_at)
                    conn.execute(_insert_rows(len(params) // _ROW_VALUES), params)
                conn.execute(
                    "INSERT INTO ingest_batches (idempotency_key, body_sha256, record_count,"
                    " status, created_at) VALUES (?, ?, ?, 'stored', ?)",
                    (key, body_sha256, count, received_at))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StorageError(f"sqlite: storing a batch failed: {exc}") from exc
        return StoreResult(Outcome.STORED, count)

    def latest(self, source: str | None = None, symbol: str | None = None, *,
               limit: int = 1000) -> list[LatestRow]:
        where, params = _filters(source, symbol)
        out: list[LatestRow] = []
        with self._reader() as conn:
            try:
                # One read transaction: every lookup below sees the same snapshot.
                conn.execute("BEGIN")
                try:
                    # A skip scan: seek the index to each distinct (source, symbol), then read
                    # its newest row. O(pairs * log rows) instead of reading every row.
                    last: tuple[str, str] | None = None
                    while len(out) < limit:
                        after = "" if last is None else " AND (source, symbol) > (?, ?)"
                        pair = conn.execute(
                            f"SELECT source, symbol FROM price_feeds WHERE {where}{after}"
                            " ORDER BY source, symbol LIMIT 1",
                            params + (last or ())).fetchone()
                        if pair is None:
                            break
                        last = (str(pair[0]), str(pair[1]))
                        row = conn.execute(
                            f"SELECT {_LATEST_COLUMNS} FROM price_feeds"
                            " WHERE source = ? AND symbol = ?"
                            " ORDER BY timestamp_ns DESC, id DESC LIMIT 1", last).fetchone()
                        if row is not None:
                            out.append(_latest_row(row))
                finally:
                    if conn.in_transaction:
                        conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StorageError(f"sqlite: reading latest prices failed: {exc}") from exc
        return out

    def summary(self, minutes: int) -> list[SourceSummary]:
        cutoff_ns = self._clock_ns() - minutes * 60 * 1_000_000_000
        with self._reader() as conn:
            try:
                # With exactly one max() aggregate, SQLite takes the bare column `timestamp`
                # from the row holding the maximum: the newest time as the exchange wrote it.
                # INDEXED BY: the window is recent, so a time range scan beats the planner's
                # default (walking the whole (source, ...) index to avoid a sort).
                rows = conn.execute(
                    "SELECT source, COUNT(*), COUNT(DISTINCT symbol), MAX(timestamp_ns), timestamp"
                    " FROM price_feeds INDEXED BY price_feeds_time WHERE timestamp_ns > ?"
                    " GROUP BY source ORDER BY source",
                    (cutoff_ns,)).fetchall()
            except sqlite3.Error as exc:
                raise StorageError(f"sqlite: reading the summary failed: {exc}") from exc
        return [SourceSummary(source=str(r[0]), count=int(r[1]), distinct_symbols=int(r[2]),
                              max_timestamp=str(r[4])) for r in rows]

    def stored_count(self, idempotency_key: str, body_sha256: str) -> int | None:
        with self._reader() as conn:
            try:
                row = conn.execute("SELECT record_count FROM ingest_batches WHERE"
                                   " idempotency_key = ? AND body_sha256 = ?",
                                   (idempotency_key, body_sha256)).fetchone()
            except sqlite3.Error as exc:
                raise StorageError(f"sqlite: looking up a batch failed: {exc}") from exc
        return None if row is None else int(row[0])

    def ping(self) -> None:
        with self._reader() as conn:
            try:
                conn.execute("SELECT 1 FROM ingest_batches LIMIT 1").fetchall()
            except sqlite3.Error as exc:
                raise StorageError(f"sqlite: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            idle, self._idle_readers = self._idle_readers, []
        for conn in idle:
            conn.close()
        with self._write_lock:  # let a write in progress finish first
            self._writer.close()

    @contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._closed:
                raise StorageError("sqlite: storage is closed")
            conn = self._idle_readers.pop() if self._idle_readers else None
        if conn is None:
            try:
                conn = _connect(self.path, readonly=True)
            except sqlite3.Error as exc:
                raise StorageError(f"sqlite: cannot open {self.path}: {exc}") from exc
        try:
            yield conn
        finally:
            with self._lock:
                keep = not self._closed
                if keep:
                    self._idle_readers.append(conn)
            if not keep:
                conn.close()


def _row_values(feeds: Sequence[ValidFeed]) -> list[object]:
    """Every row's values (_ROW_VALUES a row, in order), as SQLite stores them: price and
    volume as floats (REAL), the rest as the validator gave them."""
    if isinstance(feeds, FeedBatch):
        # Its columns, interleaved by slice assignment (C loops: no tuple or dict per record).
        values: list[object] = [None] * (_ROW_VALUES * len(feeds))
        values[0::_ROW_VALUES] = feeds.symbols
        values[1::_ROW_VALUES] = feeds.price_floats
        values[2::_ROW_VALUES] = feeds.volume_floats
        values[3::_ROW_VALUES] = feeds.timestamps
        values[4::_ROW_VALUES] = feeds.timestamps_ns
        values[5::_ROW_VALUES] = feeds.sources
        values[6::_ROW_VALUES] = feeds.worker_ids
        values[7::_ROW_VALUES] = feeds.metadata_json
        return values
    values = []
    extend = values.extend
    for f in feeds:
        volume = f["volume"]
        extend((f["symbol"], float(f["price"]), None if volume is None else float(volume),
                f["timestamp"], f["timestamp_ns"], f["source"], f["worker_id"],
                f["metadata_json"]))
    return values


@lru_cache(maxsize=_ROWS_PER_INSERT)
def _insert_rows(rows: int) -> str:
    """INSERT of `rows` rows: parameters 1-8 are the first row's values, 9-16 the second's...,
    and the last one is received_at, shared by all."""
    shared = f"?{rows * _ROW_VALUES + 1}"
    return _INSERT_FEEDS + ",".join(
        "(" + ",".join(f"?{row * _ROW_VALUES + column}" for column in range(1, _ROW_VALUES + 1))
        + f",{shared})" for row in range(rows))


def _filters(source: str | None, symbol: str | None) -> tuple[str, tuple[str, ...]]:
    clauses: list[str] = ["1 = 1"]
    params: list[str] = []
    if source is not None:
        clauses.append("source = ?")
        params.append(source)
    if symbol is not None:
        clauses.append("symbol = ?")
        params.append(symbol)
    return " AND ".join(clauses), tuple(params)


def _latest_row(row: tuple[Any, ...]) -> LatestRow:
    metadata = json.loads(str(row[6]))
    meta: dict[str, MetaScalar] = dict(metadata) if isinstance(metadata, dict) else {}
    volume = row[2]
    return LatestRow(symbol=str(row[0]), price=float(row[1]),
                     volume=None if volume is None else float(volume),
                     timestamp=str(row[3]), source=str(row[4]), worker_id=str(row[5]),
                     metadata=meta, received_at=str(row[7]))
