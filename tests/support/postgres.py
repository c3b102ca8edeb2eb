"""A throwaway PostgreSQL schema per test, on the server at 127.0.0.1:5432 (trust auth).

The URL comes from `CHRONO_TEST_POSTGRES_URL` (default postgresql://postgres@127.0.0.1:5432/test).
When the server cannot be reached the test is skipped with the reason, except under `CI=true`,
where it fails: CI must never pass by skipping the database.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"


def base_url() -> str:
    return os.environ.get("CHRONO_TEST_POSTGRES_URL", "").strip() or DEFAULT_URL


def _unreachable(reason: str) -> None:
    message = f"PostgreSQL at {base_url()} is not reachable: {reason}"
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(message + " (CI=true: the postgres tests must run)")
    pytest.skip(message)


@contextmanager
def postgres_schema() -> Iterator[str]:
    """Create schema chrono_test_<random>; yield a DATABASE_URL whose search_path is it."""
    url = base_url()
    try:
        admin = psycopg.connect(url, connect_timeout=3, autocommit=True)
    except psycopg.OperationalError as exc:
        _unreachable(str(exc).strip().splitlines()[0] if str(exc).strip() else "error")
        raise  # unreachable: skip/fail raise
    schema = f"chrono_test_{secrets.token_hex(6)}"
    try:
        admin.execute(f"CREATE SCHEMA {schema}")
        separator = "&" if "?" in url else "?"
        yield f"{url}{separator}options=-csearch_path%3D{schema}"
    finally:
        try:
            admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        finally:
            admin.close()


@contextmanager
def connect(url: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """An autocommit connection to the test schema, for assertions and the check queries."""
    conn = psycopg.connect(url, connect_timeout=3, autocommit=True)
    try:
        yield conn
    finally:
        conn.close()
