"""PostgresStorage: the PostgreSQL backend (psycopg 3, psycopg_pool, COPY, advisory locks).

`price` and `volume` are `numeric`: the validator keeps each JSON number as the exact decimal the
collector sent, and `numeric` stores exactly that, so an oracle price reads back digit for digit
(no binary rounding such as 0.1 -> 0.1000000000000000055), and sums and comparisons in SQL are
exact. The cost (a few bytes more per row, slower arithmetic than double precision) is small
next to the per-row overheads of the table and its indexes.

`timestamp` is `timestamptz`, which holds microseconds. Digits beyond those (the validator accepts
up to nine) are truncated before the text reaches PostgreSQL, which would round them: rounded,
`2026-11-29T23:59:59.9999995Z` would be stored as the next day. So the stored second (and day) is
always the one the exchange sent. (SQLite keeps the text exactly as sent.)
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, LiteralString

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus
from psycopg_pool import ConnectionPool

from collectors.errors import StorageError
from collectors.ingest.storage.base import LatestRow, Outcome, SourceSummary, StoreResult
from collectors.ingest.validate import FeedBatch, MetaScalar, ValidFeed

CONNECT_TIMEOUT_S = 5  # a database that does not answer in 5 s is down: fail, let callers retry
# A batch is answered (503 and Retry-After when the database is slow) within the collectors'
# 10 s read timeout (HTTP_READ_TIMEOUT_S): a free connection within ACQUIRE_TIMEOUT_S, then its
# three statements (the claim, the COPY, the COMMIT), each cut at STORE_STATEMENT_TIMEOUT_MS.
# Reads (latest, summary) get STATEMENT_TIMEOUT_MS.
ACQUIRE_TIMEOUT_S = 3.0
STORE_STATEMENT_TIMEOUT_MS = 2_000
STATEMENT_TIMEOUT_MS = 8_000
# Arbitrary constants, so our advisory locks never collide with another application's.
_MIGRATION_LOCK_ID = 0x6368726F6E6F0001
_KEY_LOCK_SALT = b"chrono-ingest-idempotency:"

# Each entry moves the schema from version N-1 to N; never edit one that has shipped.
MIGRATIONS: tuple[tuple[int, str, tuple[LiteralString, ...]], ...] = (
    (1, "price_feeds and ingest_batches", (
        """CREATE TABLE price_feeds (
            id bigserial PRIMARY KEY,
            symbol text NOT NULL,
            price numeric NOT NULL CHECK (price > 0),
            volume numeric CHECK (volume >= 0),
            timestamp timestamptz NOT NULL,
            source text NOT NULL,
            worker_id text NOT NULL,
            metadata jsonb NOT NULL DEFAULT '{}'::jsonb,
            received_at timestamptz NOT NULL DEFAULT now()
        )""",
        # latest per (source, symbol): a skip scan seeks each pair, newest first
        "CREATE INDEX price_feeds_source_symbol_time_idx ON price_feeds "
        "(source, symbol, timestamp DESC, id DESC)",
        # the summary and the check queries: WHERE timestamp > now() - interval ...
        "CREATE INDEX price_feeds_time_idx ON price_feeds (timestamp)",
        """CREATE TABLE ingest_batches (
            idempotency_key text PRIMARY KEY,
            body_sha256 text NOT NULL,
            record_count integer NOT NULL,
            status text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now()
        )""",
    )),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]

_COPY_FEEDS: LiteralString = (
    "COPY price_feeds (symbol, price, volume, timestamp, source, worker_id, metadata)"
    " FROM STDIN"
)
# BEGIN and the transaction's statement timeout, then in one statement: take the key's
# advisory lock (held until commit) and, only if it was taken, insert the key (ON CONFLICT DO
# NOTHING tells us it was seen). One row back: (lock taken, key inserted).
_CLAIM: LiteralString = (
    "BEGIN;"
    " SET LOCAL statement_timeout = {timeout};"
    " WITH l AS (SELECT pg_try_advisory_xact_lock({lock}) AS got),"
    " ins AS (INSERT INTO ingest_batches (idempotency_key, body_sha256, record_count, status)"
    "  SELECT {key}, {sha}, {count}, 'stored' FROM l WHERE l.got"
    "  ON CONFLICT (idempotency_key) DO NOTHING RETURNING 1)"
    " SELECT l.got, EXISTS (SELECT 1 FROM ins) FROM l"
)
_NULL = "\\N"  # COPY text format's NULL
#: `YYYY-MM-DDTHH:MM:SS.ffffffZ`: the longest canonical timestamp PostgreSQL holds exactly
_MICROSECOND_STAMP_CHARS = 27
_COPY_UNSAFE = ("\t", "\n", "\r", "\\")
_LATEST_COLUMNS: LiteralString = (
    "symbol, price, volume, timestamp, source, worker_id, metadata, received_at"
)


def migrate_postgres(database_url: str) -> list[int]:
    """Bring the schema up to date; return the versions applied now. Raises StorageError."""
    try:
        conn = psycopg.connect(database_url, connect_timeout=CONNECT_TIMEOUT_S)
    except psycopg.Error as exc:
        raise StorageError(f"postgresql: cannot connect: {_brief(exc)}",
                           transient=_transient(exc)) from exc
    try:
        with conn:
            return _migrate(conn)
    except psycopg.Error as exc:
        raise StorageError(f"postgresql: migration failed: {_brief(exc)}",
                           transient=_transient(exc)) from exc


#: What libpq says at connect time when the server is down, unreachable, starting or full:
#: it reports a connect-time failure as text, without its SQLSTATE. Anything else (a refused
#: password or role, no access rule, an unknown database, SSL required, a malformed URL) needs
#: a person.
_MAY_PASS = ("connection refused", "timeout expired", "timed out",
             "server closed the connection unexpectedly", "connection reset",
             "could not connect to server", "no such file or directory", "is starting up",
             "is shutting down", "in recovery mode", "not yet accepting connections",
             "too many clients", "remaining connection slots are reserved",
             "could not translate host name", "network is unreachable", "no route to host",
             "terminating connection due to administrator command", "eof detected")


def _transient(exc: psycopg.Error) -> bool:
    """Whether the server may take us later as we are: down, unreachable, starting or full
    (SQLSTATE class 08 connection exception, 53 insufficient resources, 57 operator
    intervention; or libpq's words for those when it gives no SQLSTATE). Not a refused
    password or role (28), an unknown database (3D), a missing privilege (42), SSL the server
    does not offer, a malformed URL."""
    state = exc.sqlstate
    if state is not None:
        return state[:2] in ("08", "53", "57")
    text = str(exc).lower()
    return any(words in text for words in _MAY_PASS)


def _migrate(conn: psycopg.Connection[Any]) -> list[int]:
    applied: list[int] = []
    with conn.transaction():
        # Several ingest processes may start together: one migrates, the others wait here and
        # then find nothing left to do.
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK_ID,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())")
        done = {int(r[0]) for r in conn.execute("SELECT version FROM schema_migrations")}
        newer = [v for v in done if v > SCHEMA_VERSION]
        if newer:
            raise StorageError(f"postgresql: schema version {max(newer)} is newer than this "
                               f"program ({SCHEMA_VERSION}); upgrade chrono-collectors")
        for version, name, statements in MIGRATIONS:
            if version in done:
                continue
            for statement in statements:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                         (version, name))
            applied.append(version)
    return applied


def _configure(conn: psycopg.Connection[Any]) -> None:
    # Times come back as UTC; a stuck statement fails in time for the client to retry.
    conn.execute("SET TIME ZONE 'UTC'")
    conn.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
    conn.commit()


class PostgresStorage:
    """Storage on PostgreSQL through a connection pool. Create with `PostgresStorage.connect`."""

    def __init__(self, pool: ConnectionPool[psycopg.Connection[Any]], *,
                 acquire_timeout_s: float = ACQUIRE_TIMEOUT_S) -> None:
        self._pool = pool
        # Waiting longer for a free connection than this means the database is the bottleneck:
        # answer 503 (the collector keeps the batch and retries) rather than pile up requests.
        self._acquire_timeout_s = acquire_timeout_s

    @classmethod
    def connect(cls, database_url: str, *, max_connections: int = 8) -> PostgresStorage:
        """Migrate, then open a pool of up to `max_connections`. Raises StorageError."""
        migrate_postgres(database_url)
        pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            database_url,
            min_size=1,
            max_size=max(1, max_connections),
            open=False,
            # autocommit: store_batch sends its own BEGIN with its first statement
            kwargs={"connect_timeout": CONNECT_TIMEOUT_S, "autocommit": True},
            configure=_configure,
            # One empty query on checkout: after a database restart a stale connection is
            # replaced here instead of failing one request per pooled connection.
            check=ConnectionPool.check_connection,
            name="chrono-ingest",
            timeout=10.0,  # default wait for getconn(); store/read pass acquire_timeout_s
        )
        try:
            pool.open(wait=True, timeout=CONNECT_TIMEOUT_S * 2)
        except psycopg.Error as exc:  # (the migration's own connection just worked)
            pool.close()
            raise StorageError(f"postgresql: cannot connect: {_brief(exc)}",
                               transient=True) from exc
        return cls(pool)

    @contextmanager
    def _connection(self, what: str) -> Iterator[psycopg.Connection[Any]]:
        try:
            with self._pool.connection(timeout=self._acquire_timeout_s) as conn:
                yield conn
        except StorageError:
            raise
        except psycopg.Error as exc:
            raise StorageError(f"postgresql: {what} failed: {_brief(exc)}") from exc

    def store_batch(self, idempotency_key: str, body_sha256: str,
                    feeds: Sequence[ValidFeed]) -> StoreResult:
        payload = _copy_payload(feeds)  # built before taking a connection
        claim = sql.SQL(_CLAIM).format(timeout=STORE_STATEMENT_TIMEOUT_MS,
                                       lock=_key_lock_id(idempotency_key), key=idempotency_key,
                                       sha=body_sha256, count=len(feeds))
        with self._connection("storing a batch") as conn, conn.cursor() as cur:
            # The pool's connections are in autocommit mode, so BEGIN travels with the claim
            # (one round trip, simple query protocol: every value is a quoted literal); the
            # COPY follows and COMMIT ends it: three round trips per batch.
            try:
                cur.execute(claim)
                cur.nextset()  # the BEGIN's and the SET's results come first, then the
                cur.nextset()  # claim's row
                got = cur.fetchone()
                if got is None or not got[0]:
                    # Held until commit: a concurrent request with the same key, in this
                    # process or another, fails to take it and gets IN_FLIGHT (409).
                    conn.execute("ROLLBACK")
                    return StoreResult(Outcome.IN_FLIGHT, 0)
                if not got[1]:  # the unique key was seen before: ON CONFLICT DO NOTHING
                    cur.execute("SELECT body_sha256, record_count FROM ingest_batches"
                                " WHERE idempotency_key = %s", (idempotency_key,))
                    seen = cur.fetchone()
                    conn.execute("ROLLBACK")
                    if seen is None:  # cannot happen while we hold the key's lock
                        raise StorageError("postgresql: idempotency row vanished")
                    outcome = Outcome.REPLAYED if seen[0] == body_sha256 else Outcome.CONFLICT
                    return StoreResult(outcome, int(seen[1]))
                # All rows in one COPY stream, in the same transaction as the key.
                with cur.copy(_COPY_FEEDS) as copy:
                    if payload is None:
                        for f in feeds:
                            copy.write_row((f["symbol"], f["price"], f["volume"],
                                            _to_microseconds(f["timestamp"]), f["source"],
                                            f["worker_id"], f["metadata_json"]))
                    else:
                        copy.write(payload)
                conn.execute("COMMIT")
            except BaseException:
                _rollback_quietly(conn)
                raise
        return StoreResult(Outcome.STORED, len(feeds))

    def latest(self, source: str | None = None, symbol: str | None = None, *,
               limit: int = 1000) -> list[LatestRow]:
        conditions: list[sql.Composable] = [sql.SQL("TRUE")]
        if source is not None:
            conditions.append(sql.SQL("f.source = {}").format(source))
        if symbol is not None:
            conditions.append(sql.SQL("f.symbol = {}").format(symbol))
        where = sql.SQL(" AND ").join(conditions)
        # A skip scan (recursive CTE): seek the index to each distinct (source, symbol), then
        # take its newest row. O(pairs * log rows) where DISTINCT ON would read every row.
        query = sql.SQL(
            "WITH RECURSIVE pairs AS ("
            " (SELECT f.source, f.symbol FROM price_feeds f WHERE {where}"
            "  ORDER BY f.source, f.symbol LIMIT 1)"
            " UNION ALL"
            " SELECT n.source, n.symbol FROM pairs p CROSS JOIN LATERAL ("
            "  SELECT f.source, f.symbol FROM price_feeds f"
            "  WHERE (f.source, f.symbol) > (p.source, p.symbol) AND {where}"
            "  ORDER BY f.source, f.symbol LIMIT 1) n"
            ")"
            " SELECT r.* FROM pairs p CROSS JOIN LATERAL ("
            "  SELECT " + _LATEST_COLUMNS + " FROM price_feeds f"
            "  WHERE f.source = p.source AND f.symbol = p.symbol"
            "  ORDER BY f.timestamp DESC, f.id DESC LIMIT 1) r"
            " ORDER BY r.source, r.symbol LIMIT {limit}"
        ).format(where=where, limit=limit)
        with self._connection("reading latest prices") as conn:
            rows = conn.execute(query).fetchall()
        return [_latest_row(r) for r in rows]

    def summary(self, minutes: int) -> list[SourceSummary]:
        with self._connection("reading the summary") as conn:
            rows = conn.execute(
                "SELECT source, COUNT(*), COUNT(DISTINCT symbol), MAX(timestamp)"
                " FROM price_feeds WHERE timestamp > now() - make_interval(mins => %s)"
                " GROUP BY source ORDER BY source", (minutes,)).fetchall()
        return [SourceSummary(source=str(r[0]), count=int(r[1]), distinct_symbols=int(r[2]),
                              max_timestamp=_iso(r[3])) for r in rows]

    def stored_count(self, idempotency_key: str, body_sha256: str) -> int | None:
        with self._connection("looking up a batch") as conn:
            row = conn.execute("SELECT record_count FROM ingest_batches WHERE"
                               " idempotency_key = %s AND body_sha256 = %s",
                               (idempotency_key, body_sha256)).fetchone()
        return None if row is None else int(row[0])

    def ping(self) -> None:
        with self._connection("ping") as conn:
            conn.execute("SELECT 1 FROM ingest_batches LIMIT 1").fetchall()

    def close(self) -> None:
        self._pool.close()


def _copy_payload(feeds: Sequence[ValidFeed]) -> str | None:
    """All rows as COPY text format, or None when a value needs psycopg's general dumpers.

    Validated records hold plain text (symbol, source and worker_id match strict patterns,
    the timestamp is canonical ASCII), Decimals and compact JSON whose only COPY-special
    character can be a backslash (JSON escapes tabs and newlines itself).
    """
    if isinstance(feeds, FeedBatch) and feeds.metadata_plain:
        # The same lines from its columns: its texts are str() of the records' Decimals, which
        # is what the f-string below writes, and every volume is present. (A metadata text with
        # a COPY-special character takes the record path; a FeedBatch comes from a body without
        # backslashes, so there is none.)
        stamps = feeds.timestamps
        if max(map(len, stamps), default=0) > _MICROSECOND_STAMP_CHARS:
            stamps = list(map(_to_microseconds, stamps))
        rows = zip(feeds.symbols, feeds.price_texts, feeds.volume_texts, stamps,
                   feeds.sources, feeds.worker_ids, feeds.metadata_json, strict=True)
        lines = list(map("\t".join, rows))
        lines.append("")  # the last line's newline
        return "\n".join(lines)
    try:
        plain = "".join([f["symbol"] + f["timestamp"] + f["source"] + f["worker_id"]
                         for f in feeds])
        if any(ch in plain for ch in _COPY_UNSAFE):
            return None
        lines = []
        for f in feeds:
            price, volume, meta = f["price"], f["volume"], f["metadata_json"]
            if type(price) is not Decimal or (volume is not None and type(volume) is not Decimal) \
                    or type(meta) is not str or "\n" in meta or "\r" in meta or "\t" in meta:
                return None
            if "\\" in meta:
                meta = meta.replace("\\", "\\\\")
            stamp = f["timestamp"]
            if len(stamp) > _MICROSECOND_STAMP_CHARS:
                stamp = _to_microseconds(stamp)
            lines.append(f"{f['symbol']}\t{price}\t{_NULL if volume is None else volume}\t"
                         f"{stamp}\t{f['source']}\t{f['worker_id']}\t{meta}\n")
    except (TypeError, KeyError):
        return None
    return "".join(lines)


def _to_microseconds(stamp: str) -> str:
    """A validated (canonical) timestamp cut to microseconds: `...59.9999995Z` ->
    `...59.999999Z`. PostgreSQL would round the extra digits, and rounding can move the second,
    the minute, even the day; truncating never does."""
    if len(stamp) <= _MICROSECOND_STAMP_CHARS:
        return stamp
    return stamp[:_MICROSECOND_STAMP_CHARS - 1] + "Z"


def _rollback_quietly(conn: psycopg.Connection[Any]) -> None:
    if conn.closed or conn.pgconn.transaction_status == TransactionStatus.IDLE:
        return
    with contextlib.suppress(psycopg.Error):  # a broken connection: the pool discards it
        conn.execute("ROLLBACK")


def _key_lock_id(key: str) -> int:
    digest = hashlib.sha256(_KEY_LOCK_SALT + key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _iso(value: object) -> str:
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return str(value)


def _float(value: object) -> float:
    if isinstance(value, (Decimal, float, int)):
        return float(value)
    raise StorageError(f"postgresql: unexpected numeric value of type {type(value).__name__}")


def _latest_row(row: tuple[Any, ...]) -> LatestRow:
    metadata = row[6]
    meta: dict[str, MetaScalar] = dict(metadata) if isinstance(metadata, dict) else {}
    return LatestRow(symbol=str(row[0]), price=_float(row[1]),
                     volume=None if row[2] is None else _float(row[2]),
                     timestamp=_iso(row[3]), source=str(row[4]), worker_id=str(row[5]),
                     metadata=meta, received_at=_iso(row[7]))


def _brief(exc: BaseException) -> str:
    """The driver's first line: enough to diagnose, never a connection string."""
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
