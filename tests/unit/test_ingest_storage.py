"""Storage backends (SQLite always; PostgreSQL with the postgres mark): one contract, both pass.

Every test runs against a real database: a temp SQLite file, or a throwaway PostgreSQL schema.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import cast

import psycopg
import pytest

from collectors.errors import StorageError
from collectors.ingest.storage import (
    Outcome,
    PostgresStorage,
    SQLiteStorage,
    Storage,
    migrate,
    open_storage,
)
from collectors.ingest.storage.postgres import _copy_payload, _key_lock_id
from collectors.ingest.validate import FeedBatch, ValidFeed, validate_batch, validate_body
from tests.support import postgres
from tests.support.servers import batch_body, iso_ago, make_feed


def feeds_of(*records: dict[str, object]) -> list[ValidFeed]:
    verdict = validate_body(batch_body(records), max_feeds=10_000, now_ns=time.time_ns())
    assert verdict.ok, verdict.problems
    return verdict.feeds


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    if request.param == "sqlite":
        store: Storage = SQLiteStorage.open(tmp_path / "db" / "ingest.db")
        try:
            yield store
        finally:
            store.close()
    else:
        with postgres.postgres_schema() as url:
            store = open_storage(url, max_connections=4)
            try:
                yield store
            finally:
                store.close()


def test_store_then_replay_then_conflict(storage: Storage) -> None:
    feeds = feeds_of(make_feed(), make_feed(symbol="ETH/USD", price=2500))
    first = storage.store_batch("key-1", sha("a"), feeds)
    assert (first.outcome, first.stored) == (Outcome.STORED, 2)
    again = storage.store_batch("key-1", sha("a"), feeds)
    assert (again.outcome, again.stored) == (Outcome.REPLAYED, 2)
    other = storage.store_batch("key-1", sha("b"), feeds[:1])
    assert (other.outcome, other.stored) == (Outcome.CONFLICT, 2)
    assert sum(s["count"] for s in storage.summary(60)) == 2
    # The lookup a refused request uses: this key with this body only.
    assert storage.stored_count("key-1", sha("a")) == 2
    assert storage.stored_count("key-1", sha("b")) is None
    assert storage.stored_count("key-2", sha("a")) is None


def test_latest_per_source_and_symbol(storage: Storage) -> None:
    storage.store_batch("k1", sha("1"), feeds_of(
        make_feed(price=100, timestamp=iso_ago(30)),
        make_feed(price=101, timestamp=iso_ago(10)),
        make_feed(price=99, timestamp=iso_ago(20)),
        make_feed(symbol="ETH/USD", price=2000, timestamp=iso_ago(5)),
        make_feed(source="kraken", worker_id="worker-kraken", price=102, timestamp=iso_ago(1)),
    ))
    rows = storage.latest()
    got = [(r["source"], r["symbol"], r["price"]) for r in rows]
    assert got == [("coinbase", "BTC/USD", 101.0), ("coinbase", "ETH/USD", 2000.0),
                   ("kraken", "BTC/USD", 102.0)]
    assert [r["price"] for r in storage.latest("kraken")] == [102.0]
    assert [r["source"] for r in storage.latest(symbol="BTC/USD")] == ["coinbase", "kraken"]
    assert [r["price"] for r in storage.latest("coinbase", "ETH/USD")] == [2000.0]
    assert storage.latest("nobody") == []
    row = rows[0]
    assert row["worker_id"] == "worker-coinbase"
    assert row["volume"] == 1234.56
    assert row["metadata"]["bid"] == 45123.4
    assert row["timestamp"].endswith("Z")
    assert row["received_at"].endswith("Z")
    assert len(storage.latest(limit=2)) == 2


def test_summary_window(storage: Storage) -> None:
    newest_coinbase = iso_ago(20)
    storage.store_batch("k1", sha("1"), feeds_of(
        make_feed(timestamp=iso_ago(30)),
        make_feed(symbol="ETH/USD", timestamp=newest_coinbase),
        make_feed(timestamp=iso_ago(3600)),
        make_feed(source="binance", worker_id="w-b", symbol="BTC/USDT", timestamp=iso_ago(10)),
    ))
    summary = storage.summary(10)
    assert [(s["source"], s["count"], s["distinct_symbols"]) for s in summary] == [
        ("binance", 1, 1), ("coinbase", 2, 2)]
    assert summary[1]["max_timestamp"] == newest_coinbase
    assert sum(s["count"] for s in storage.summary(120)) == 4


@pytest.mark.parametrize(("sent", "postgres_keeps"), [
    ("2024-02-29T23:59:59.9999995Z", "2024-02-29T23:59:59.999999Z"),  # rounding: next day
    ("2024-12-31T23:59:59.999999999Z", "2024-12-31T23:59:59.999999Z"),  # ... next year
    ("2024-05-09T10:00:00.1234567Z", "2024-05-09T10:00:00.123456Z"),
    ("2024-05-09T10:00:00.123456Z", "2024-05-09T10:00:00.123456Z"),
    ("2024-05-09T10:00:00.5Z", "2024-05-09T10:00:00.500000Z"),
])
def test_sub_microsecond_digits_are_truncated_never_rounded(storage: Storage, sent: str,
                                                           postgres_keeps: str) -> None:
    # timestamptz keeps microseconds and PostgreSQL ROUNDS the rest: 23:59:59.9999995 became
    # the next day. SQLite keeps the text as sent.
    body = batch_body([make_feed(timestamp=sent, symbol="A/USD")])
    batch = validate_batch(body, max_feeds=10, now_ns=time.time_ns()).feeds
    assert isinstance(batch, FeedBatch) and batch.metadata_plain  # COPY text from the columns
    records = feeds_of(make_feed(timestamp=sent, symbol="B/USD"))  # COPY text by record
    # psycopg's own row writer (a value the COPY text builder leaves to it)
    by_row = [cast(ValidFeed, {**feeds_of(make_feed(timestamp=sent, symbol="C/USD"))[0],
                               "price": 45123.5})]
    assert _copy_payload(by_row) is None
    for key, feeds in (("columns", batch), ("records", records), ("rows", by_row)):
        assert storage.store_batch(key, sha(key), feeds).stored == 1
    got = [(r["symbol"], r["timestamp"]) for r in storage.latest()]
    want = postgres_keeps if isinstance(storage, PostgresStorage) else sent
    assert got == [("A/USD", want), ("B/USD", want), ("C/USD", want)]


def test_concurrent_same_key_stored_once(storage: Storage) -> None:
    feeds = feeds_of(*[make_feed(price=100 + i) for i in range(200)])
    barrier = threading.Barrier(6)
    outcomes: list[Outcome] = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait(10)
        result = storage.store_batch("same-key", sha("x"), feeds)
        with lock:
            outcomes.append(result.outcome)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert outcomes.count(Outcome.STORED) == 1
    assert set(outcomes) <= {Outcome.STORED, Outcome.REPLAYED, Outcome.IN_FLIGHT}
    assert sum(s["count"] for s in storage.summary(60)) == 200


def test_batch_is_atomic(storage: Storage) -> None:
    """A batch the database refuses half-way stores nothing, and not its key either."""
    good = feeds_of(make_feed())
    bad = [*good, {**good[0], "symbol": None}]  # type: ignore[typeddict-item]
    with pytest.raises(StorageError):
        storage.store_batch("atomic", sha("1"), bad)  # type: ignore[arg-type]
    assert storage.summary(60) == []
    assert storage.store_batch("atomic", sha("1"), good).outcome is Outcome.STORED


def test_closed_storage_raises_storage_error(tmp_path: Path) -> None:
    store = SQLiteStorage.open(tmp_path / "x.db")
    store.close()
    store.close()  # idempotent
    with pytest.raises(StorageError):
        store.latest()
    with pytest.raises(StorageError):
        store.store_batch("k", sha("1"), feeds_of(make_feed()))


# --- SQLite specifics -----------------------------------------------------------------------


def test_sqlite_file_schema_and_check_query(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "ingest.db"
    store = SQLiteStorage.open(path)
    try:
        store.store_batch("k", sha("1"), feeds_of(
            make_feed(), make_feed(symbol="ETH/USD"),
            make_feed(source="kraken", worker_id="worker-kraken")))
    finally:
        store.close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        rows = conn.execute(
            "SELECT source, COUNT(*), COUNT(DISTINCT symbol), MAX(timestamp) "
            "FROM price_feeds GROUP BY source").fetchall()
        assert sorted((r[0], r[1], r[2]) for r in rows) == [("coinbase", 2, 2), ("kraken", 1, 1)]
        assert all(r[3].endswith("Z") for r in rows)
        columns = [r[1] for r in conn.execute("PRAGMA table_info(price_feeds)")]
        for name in ("id", "symbol", "price", "volume", "timestamp", "source", "worker_id",
                     "metadata", "received_at"):
            assert name in columns
        batch = conn.execute("SELECT idempotency_key, record_count, status FROM ingest_batches"
                             ).fetchall()
        assert batch == [("k", 3, "stored")]
    finally:
        conn.close()
    assert migrate(f"sqlite:///{path}") == []  # already current


def test_sqlite_in_flight_key_answers_at_once(tmp_path: Path) -> None:
    entered = threading.Event()
    proceed = threading.Event()

    class Gated(SQLiteStorage):
        def _store_locked(self, key: str, body_sha256: str, feeds: object) -> object:  # type: ignore[override]
            entered.set()
            assert proceed.wait(30)
            return super()._store_locked(key, body_sha256, feeds)  # type: ignore[arg-type]

    store = Gated.open(tmp_path / "g.db")
    feeds = feeds_of(make_feed())
    results: list[Outcome] = []
    first = threading.Thread(
        target=lambda: results.append(store.store_batch("k", sha("1"), feeds).outcome))
    try:
        first.start()
        assert entered.wait(10)
        assert store.store_batch("k", sha("1"), feeds).outcome is Outcome.IN_FLIGHT
        proceed.set()
        first.join(10)
        assert results == [Outcome.STORED]
        assert store.store_batch("k", sha("1"), feeds).outcome is Outcome.REPLAYED
    finally:
        proceed.set()
        first.join(10)
        store.close()


def test_sqlite_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(StorageError, match="newer"):
        SQLiteStorage.open(path)


def test_sqlite_unwritable_location(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StorageError):
        open_storage(f"sqlite:///{blocker}/sub/ingest.db")


# --- PostgreSQL specifics -------------------------------------------------------------------


@pytest.mark.postgres
def test_postgres_schema_types_and_exact_numeric() -> None:
    with postgres.postgres_schema() as url:
        store = open_storage(url, max_connections=2)
        try:
            store.store_batch("k", sha("1"), feeds_of(
                make_feed(price=0.1, volume=12345.678901234567),
                make_feed(symbol="ETH/USD", price=3, volume=None, metadata={"seq": 2**60})))
        finally:
            store.close()
        with postgres.connect(url) as conn:
            types = dict(conn.execute(
                "SELECT column_name, data_type FROM information_schema.columns"
                " WHERE table_name = 'price_feeds' AND table_schema = current_schema()"
            ).fetchall())
            assert types["price"] == "numeric"
            assert types["volume"] == "numeric"
            assert types["timestamp"] == "timestamp with time zone"
            assert types["metadata"] == "jsonb"
            assert types["received_at"] == "timestamp with time zone"
            assert types["id"] == "bigint"
            rows = conn.execute("SELECT symbol, price, volume, metadata FROM price_feeds"
                                " ORDER BY symbol").fetchall()
            assert rows[0][1] == Decimal("0.1")
            assert rows[0][2] == Decimal("12345.678901234567")
            assert rows[1][2] is None
            assert rows[1][3]["seq"] == 2**60
            versions = conn.execute("SELECT version FROM schema_migrations").fetchall()
            assert versions == [(1,)]
            indexes = {r[0] for r in conn.execute(
                "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()")}
            assert {"price_feeds_source_symbol_time_idx", "price_feeds_time_idx"} <= indexes
        assert migrate(url) == []


@pytest.mark.postgres
def test_postgres_stores_the_finest_number_validation_accepts() -> None:
    """Validation's scale limit is PostgreSQL's: what passes it is stored, digit for digit."""
    body = batch_body([make_feed()]).replace(b'"volume": 1234.56', b'"volume": 1e-16383')
    verdict = validate_body(body, max_feeds=10, now_ns=time.time_ns())
    assert verdict.ok and verdict.feeds[0]["volume"] == Decimal("1E-16383")
    with postgres.postgres_schema() as url:
        store = open_storage(url, max_connections=1)
        try:
            store.store_batch("finest", sha("finest"), verdict.feeds)
        finally:
            store.close()
        with postgres.connect(url) as conn:
            [(volume,)] = conn.execute("SELECT volume FROM price_feeds").fetchall()
        assert volume == Decimal("1E-16383")


@pytest.mark.postgres
def test_postgres_in_flight_key_across_sessions() -> None:
    """Another session (another ingest process) holding the key's lock means 409, not a wait."""
    with postgres.postgres_schema() as url:
        store = open_storage(url, max_connections=2)
        feeds = feeds_of(make_feed())
        try:
            with postgres.connect(url) as other:
                other.execute("SELECT pg_advisory_lock(%s)", (_key_lock_id("busy"),))
                assert store.store_batch("busy", sha("1"), feeds).outcome is Outcome.IN_FLIGHT
                other.execute("SELECT pg_advisory_unlock(%s)", (_key_lock_id("busy"),))
            assert store.store_batch("busy", sha("1"), feeds).outcome is Outcome.STORED
            assert store.store_batch("busy", sha("1"), feeds).outcome is Outcome.REPLAYED
        finally:
            store.close()


@pytest.mark.postgres
def test_postgres_concurrent_migrations() -> None:
    with postgres.postgres_schema() as url:
        errors: list[BaseException] = []
        applied: list[list[int]] = []

        def run() -> None:
            try:
                applied.append(migrate(url))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert errors == []
        assert sorted(applied) == [[], [], [], [1]]


def test_postgres_unreachable_is_storage_error() -> None:
    with pytest.raises(StorageError) as info:
        PostgresStorage.connect("postgresql://postgres@127.0.0.1:1/test")
    assert "postgresql" in str(info.value)


@pytest.mark.postgres
def test_postgres_refuses_a_newer_schema() -> None:
    with postgres.postgres_schema() as url:
        migrate(url)
        with postgres.connect(url) as conn:
            conn.execute("INSERT INTO schema_migrations (version, name) VALUES (99, 'future')")
        with pytest.raises(StorageError, match="newer"):
            migrate(url)


@pytest.mark.postgres
def test_postgres_jsonb_metadata_round_trip() -> None:
    meta = {"note": "'); DROP TABLE price_feeds; --", "unicode": "ünï €", "flag": True}
    with postgres.postgres_schema() as url:
        store = open_storage(url, max_connections=2)
        try:
            store.store_batch("k", sha("1"), feeds_of(make_feed(metadata=meta)))
            assert store.latest()[0]["metadata"] == meta
        finally:
            store.close()
        with postgres.connect(url) as conn:
            got = conn.execute("SELECT metadata FROM price_feeds").fetchone()
            assert got is not None and got[0] == meta
            assert json.loads(json.dumps(got[0])) == meta



def test_a_locked_database_fails_a_store_in_time_for_the_sender(storage: Storage) -> None:
    # Another process holds the write lock (a backup, a migration, an admin's LOCK TABLE): the
    # store fails with StorageError (a 503 with Retry-After) before the collectors' 10 s read
    # timeout, instead of answering after they gave up.
    if isinstance(storage, SQLiteStorage):
        other = sqlite3.connect(storage.path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
    else:
        url = storage._pool.conninfo  # type: ignore[attr-defined]
        other = psycopg.connect(url, autocommit=True)
        other.execute("BEGIN")
        other.execute("LOCK TABLE price_feeds IN ACCESS EXCLUSIVE MODE")
    try:
        started = time.monotonic()
        with pytest.raises(StorageError):
            storage.store_batch("key-locked", sha("a"), feeds_of(make_feed()))
        assert time.monotonic() - started < 9
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert storage.store_batch("key-locked", sha("a"), feeds_of(make_feed())).stored == 1


def test_sqlite_writers_queue_only_so_long(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("collectors.ingest.storage.sqlite.WRITE_QUEUE_TIMEOUT_S", 0.2)
    store = SQLiteStorage.open(tmp_path / "q.db")
    try:
        # The lock held: the batches ahead of this one.
        with store._write_lock, pytest.raises(StorageError, match="busy"):
            store.store_batch("k", sha("1"), feeds_of(make_feed()))
        assert store.store_batch("k", sha("1"), feeds_of(make_feed())).outcome is Outcome.STORED
    finally:
        store.close()
