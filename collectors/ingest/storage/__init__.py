"""Ingest storage backends: the Storage protocol, SQLite and PostgreSQL, and their factory."""

from __future__ import annotations

from collectors.errors import StorageError
from collectors.ingest.storage.base import (
    LatestRow,
    Outcome,
    SourceSummary,
    Storage,
    StoreResult,
)
from collectors.ingest.storage.postgres import PostgresStorage, migrate_postgres
from collectors.ingest.storage.sqlite import SQLiteStorage, migrate_sqlite, sqlite_path

__all__ = [
    "LatestRow",
    "Outcome",
    "PostgresStorage",
    "SQLiteStorage",
    "SourceSummary",
    "Storage",
    "StoreResult",
    "migrate",
    "open_storage",
]


def _is_postgres(database_url: str) -> bool:
    return database_url.startswith(("postgresql://", "postgres://"))


def open_storage(database_url: str, *, max_connections: int = 8) -> Storage:
    """Open (and migrate) the backend the URL names. Raises StorageError."""
    if database_url.startswith("sqlite:///"):
        return SQLiteStorage.open(sqlite_path(database_url))
    if _is_postgres(database_url):
        return PostgresStorage.connect(database_url, max_connections=max_connections)
    raise StorageError("unsupported DATABASE_URL scheme (sqlite:/// or postgresql://)")


def migrate(database_url: str) -> list[int]:
    """Apply pending schema migrations; return the versions applied. Raises StorageError."""
    if database_url.startswith("sqlite:///"):
        return migrate_sqlite(sqlite_path(database_url))
    if _is_postgres(database_url):
        return migrate_postgres(database_url)
    raise StorageError("unsupported DATABASE_URL scheme (sqlite:/// or postgresql://)")
