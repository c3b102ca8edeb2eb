"""`make check-db` (python -m collectors.checkdb): the check query, or one line saying why not."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from collectors import checkdb
from tests.support.waiting import free_port


def test_the_check_query_on_a_sqlite_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "ingest.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE price_feeds (source TEXT, symbol TEXT, timestamp TEXT)")
        conn.executemany("INSERT INTO price_feeds VALUES (?, ?, ?)",
                         [("coinbase", "BTC/USD", "2026-11-30T00:00:01Z"),
                          ("coinbase", "ETH/USD", "2026-11-30T00:00:02Z")])
    conn.close()
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{db}")
    assert checkdb.main() == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["coinbase", "2", "2", "2026-11-30T00:00:02Z"]


def test_a_file_that_is_not_a_database_is_one_line(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "ingest.db"
    bad.write_bytes(b"not a database, just text " * 10)
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{bad}")
    assert checkdb.main() == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be read" in err and "Traceback" not in err


def test_an_unreachable_postgresql_is_one_line_without_the_password(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DATABASE_URL",
                       f"postgresql://postgres:hunter2@127.0.0.1:{free_port()}/test")
    assert checkdb.main() == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("PostgreSQL cannot be read")
    assert "hunter2" not in err
