"""IngestApp over real HTTP (waitress on 127.0.0.1, requests) with real SQLite or PostgreSQL."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sqlite3
import threading
import uuid
from collections.abc import Iterator, Sequence
from decimal import Decimal
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import pytest
import requests

from collectors.errors import StorageError
from collectors.ingest.app import DEFAULT_VALIDATION_BUDGET_BYTES, IngestApp
from collectors.ingest.config import DEFAULT_MAX_BODY_BYTES, DEFAULT_THREADS
from collectors.ingest.storage import SQLiteStorage, StoreResult, open_storage
from collectors.ingest.validate import ValidFeed
from tests.support import postgres
from tests.support.servers import (
    TEST_API_KEY,
    IngestServer,
    batch_body,
    iso_ago,
    make_feed,
    running_ingest,
)
from tests.support.waiting import wait_until

MAX_BODY = 64 * 1024
PROBLEM = "application/problem+json"


@pytest.fixture
def ingest(tmp_path: Path) -> Iterator[IngestServer]:
    with running_ingest(tmp_path, max_body_bytes=MAX_BODY, max_feeds=200,
                        extra_keys=["rotated-key-abcdef"]) as server:
        yield server


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


def post(http: requests.Session, ingest: IngestServer, body: bytes,
         headers: dict[str, str] | None = None) -> requests.Response:
    return http.post(ingest.ingest_url, data=body, headers=headers or ingest.headers(),
                     timeout=30)


def stored_count(ingest: IngestServer) -> int:
    return sum(s["count"] for s in ingest.storage.summary(7 * 24 * 60))


def assert_problem(response: requests.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == PROBLEM
    doc: dict[str, Any] = response.json()
    assert doc["status"] == status
    assert doc["type"].startswith("urn:chrono:problem:")
    assert doc["title"] and doc["detail"]
    return doc


# --- the happy path and idempotency ----------------------------------------------------------


def test_store_201_then_replay_200(http: requests.Session, ingest: IngestServer) -> None:
    body = batch_body([make_feed(), make_feed(symbol="ETH/USD", price=2500.25)])
    headers = ingest.headers("batch-0001")
    first = post(http, ingest, body, headers)
    assert first.status_code == 201
    assert first.json() == {"stored": 2, "idempotency_key": "batch-0001"}
    assert "Idempotency-Replayed" not in first.headers
    again = post(http, ingest, body, headers)
    assert again.status_code == 200
    assert again.json() == {"stored": 2, "idempotency_key": "batch-0001"}
    assert again.headers["Idempotency-Replayed"] == "true"
    assert stored_count(ingest) == 2


def test_a_stored_batch_refused_by_todays_limits_is_still_a_replay(
        tmp_path: Path, http: requests.Session) -> None:
    # Stored under the old limits; after a restart with a lower INGEST_MAX_FEEDS the retry of
    # the same key and bytes is its replay, not a 413 (whose sender would split the batch and
    # store its records a second time under new keys). Other bodies get the new limit.
    body = batch_body([make_feed(symbol=s) for s in ("BTC/USD", "ETH/USD", "SOL/USD")])
    with running_ingest(tmp_path, max_feeds=10) as before:
        assert post(http, before, body, before.headers("batch-old")).status_code == 201
    with running_ingest(tmp_path, max_feeds=2) as after:
        again = post(http, after, body, after.headers("batch-old"))
        assert again.status_code == 200, again.text
        assert again.json() == {"stored": 3, "idempotency_key": "batch-old"}
        assert again.headers["Idempotency-Replayed"] == "true"
        assert_problem(post(http, after, body, after.headers("batch-new")), 413)
        assert stored_count(after) == 3


def test_unusual_bodies_are_checked_one_at_a_time(
        http: requests.Session, ingest: IngestServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # The stdlib path (malformed, invalid or unusual bodies) can take ~30x a body's size in
    # memory: while one such body is checked, the next waits SLOW_GATE_WAIT_S, then gets a 503
    # to retry; ordinary batches (the fast path) go on meanwhile.
    monkeypatch.setattr("collectors.ingest.app.SLOW_GATE_WAIT_S", 0.1)
    assert ingest.app._slow_gate.acquire(timeout=5)  # another unusual body is being checked
    try:
        busy = post(http, ingest, b'{"feeds": [1e1, 1e1]}', ingest.headers("slow-1"))
        assert_problem(busy, 503)
        assert busy.headers["Retry-After"] == "1"
        ordinary = post(http, ingest, batch_body([make_feed()]), ingest.headers("fast-1"))
        assert ordinary.status_code == 201, ordinary.text
    finally:
        ingest.app._slow_gate.release()
    assert_problem(post(http, ingest, b'{"feeds": [1e1, 1e1]}', ingest.headers("slow-1")), 422)


def test_same_key_different_body_is_422(http: requests.Session, ingest: IngestServer) -> None:
    headers = ingest.headers("batch-0002")
    assert post(http, ingest, batch_body([make_feed()]), headers).status_code == 201
    doc = assert_problem(post(http, ingest, batch_body([make_feed(price=1)]), headers), 422)
    assert doc["errors"][0]["field"] == "Idempotency-Key"
    assert stored_count(ingest) == 1


def test_concurrent_same_key_stored_once(http: requests.Session, ingest: IngestServer) -> None:
    body = batch_body([make_feed(price=100 + i) for i in range(150)])
    key = f"concurrent-{uuid.uuid4()}"
    barrier = threading.Barrier(8)
    statuses: list[int] = []
    replayed: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        with requests.Session() as own:
            barrier.wait(10)
            response = own.post(ingest.ingest_url, data=body, headers=ingest.headers(key),
                                timeout=30)
        with lock:
            statuses.append(response.status_code)
            replayed.append(response.headers.get("Idempotency-Replayed", ""))
            if response.status_code == 409:
                assert response.headers["Retry-After"] == "1"

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert statuses.count(201) == 1, statuses
    assert set(statuses) <= {201, 200, 409}
    assert all(r == "true" for s, r in zip(statuses, replayed, strict=True) if s == 200)
    assert stored_count(ingest) == 150


def test_in_flight_same_key_is_409_then_replay(tmp_path: Path, http: requests.Session) -> None:
    entered = threading.Event()
    proceed = threading.Event()

    class Gated(SQLiteStorage):
        def _store_locked(self, key: str, body_sha256: str,
                          feeds: Sequence[ValidFeed]) -> StoreResult:
            entered.set()
            assert proceed.wait(30)
            return super()._store_locked(key, body_sha256, feeds)

    storage = Gated.open(tmp_path / "gated.db")
    try:
        with running_ingest(storage=storage) as ingest:
            body = batch_body([make_feed()])
            headers = ingest.headers("slow-batch")
            first: list[requests.Response] = []

            def send_first() -> None:
                with requests.Session() as own:
                    first.append(own.post(ingest.ingest_url, data=body, headers=headers,
                                          timeout=30))

            sender = threading.Thread(target=send_first)
            sender.start()
            try:
                assert entered.wait(10)
                second = post(http, ingest, body, headers)
                assert_problem(second, 409)
                assert second.headers["Retry-After"] == "1"
            finally:
                proceed.set()
                sender.join(30)
            assert first[0].status_code == 201
            third = post(http, ingest, body, headers)
            assert third.status_code == 200
            assert third.headers["Idempotency-Replayed"] == "true"
    finally:
        storage.close()


# --- authentication --------------------------------------------------------------------------


@pytest.mark.parametrize("authorization", [
    None, "", "Bearer", "Bearer ", "Basic dGVzdDp0ZXN0", "Bearer wrong-key-XYZZY",
    "bearer " + TEST_API_KEY[:-1], "Bearer " + TEST_API_KEY + "x", "Bearer ünïcode-key",
])
def test_bad_or_missing_key_is_401(http: requests.Session, ingest: IngestServer,
                                   authorization: str | None) -> None:
    headers = ingest.headers()
    if authorization is None:
        del headers["Authorization"]
    else:
        headers["Authorization"] = authorization
    response = post(http, ingest, batch_body([make_feed()]), headers)
    assert_problem(response, 401)
    assert response.headers["WWW-Authenticate"].startswith('Bearer realm="chrono-ingest"')
    assert "XYZZY" not in response.text
    assert TEST_API_KEY not in response.text
    assert stored_count(ingest) == 0


def test_scheme_is_case_insensitive_and_rotated_keys_work(http: requests.Session,
                                                          ingest: IngestServer) -> None:
    headers = ingest.headers()
    headers["Authorization"] = "bearer " + TEST_API_KEY
    assert post(http, ingest, batch_body([make_feed()]), headers).status_code == 201
    rotated = ingest.headers(key="rotated-key-abcdef")
    assert post(http, ingest, batch_body([make_feed()]), rotated).status_code == 201


def test_keys_never_logged(http: requests.Session, ingest: IngestServer,
                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-secret-PRESENTED-987"
    post(http, ingest, batch_body([make_feed()]), ingest.headers(key=wrong))
    post(http, ingest, batch_body([make_feed()]), ingest.headers())
    post(http, ingest, b"{bad json", ingest.headers())
    post(http, ingest, batch_body([make_feed(price=-1)]), ingest.headers())
    http.get(ingest.url + "/api/v1/prices/latest",
             headers={"Authorization": "Bearer " + wrong}, timeout=10)
    assert any(r.getMessage() == "auth_failed" for r in caplog.records)
    for record in caplog.records:
        dump = json.dumps(record.__dict__, default=str)
        assert wrong not in dump
        assert TEST_API_KEY not in dump


def test_read_endpoints_need_the_key_but_health_does_not(http: requests.Session,
                                                         ingest: IngestServer) -> None:
    for path in ("/api/v1/prices/latest", "/api/v1/summary"):
        assert_problem(http.get(ingest.url + path, timeout=10), 401)
    health = http.get(ingest.url + "/healthz", timeout=10)
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}


# --- request checks --------------------------------------------------------------------------


def test_wrong_content_type_is_415(http: requests.Session, ingest: IngestServer) -> None:
    headers = ingest.headers()
    headers["Content-Type"] = "text/plain"
    assert_problem(post(http, ingest, batch_body([make_feed()]), headers), 415)
    headers["Content-Type"] = "application/json; charset=utf-8"
    assert post(http, ingest, batch_body([make_feed()]), headers).status_code == 201


def test_oversized_body_is_413_problem(http: requests.Session, ingest: IngestServer) -> None:
    body = batch_body([make_feed(metadata={"pad": "x" * 200})] * 300)
    assert len(body) > MAX_BODY
    doc = assert_problem(post(http, ingest, body), 413)
    assert str(MAX_BODY) in doc["detail"]
    assert ingest.faults.requests_seen == 0  # refused before the app saw it
    assert stored_count(ingest) == 0


def test_oversized_chunked_body_is_413(http: requests.Session, ingest: IngestServer) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(MAX_BODY // 1024 + 2):
            yield b" " * 1024

    response = http.post(ingest.ingest_url, data=chunks(), headers=ingest.headers(), timeout=30)
    assert_problem(response, 413)


def test_chunked_body_within_limit_is_stored(http: requests.Session,
                                             ingest: IngestServer) -> None:
    body = batch_body([make_feed()])
    response = http.post(ingest.ingest_url, data=iter([body[:10], body[10:]]),
                         headers=ingest.headers(), timeout=30)
    assert response.status_code == 201


def _padded_body(size: int) -> bytes:
    """A valid one-record batch of exactly `size` bytes (spaces before the closing brace)."""
    body = batch_body([make_feed()])
    return body[:-1] + b" " * (size - len(body)) + b"}"


def _chunked(body: bytes, chunk_bytes: int) -> bytes:
    framed = [b"%x\r\n%s\r\n" % (len(body[i:i + chunk_bytes]), body[i:i + chunk_bytes])
              for i in range(0, len(body), chunk_bytes)]
    return b"".join(framed) + b"0\r\n\r\n"


def _send_chunked(ingest: IngestServer, wire: bytes) -> tuple[int, bytes]:
    """POST `wire` (chunked framing, written as is) and return the status and body."""
    conn = HTTPConnection("127.0.0.1", ingest.server.port, timeout=30)
    try:
        conn.putrequest("POST", "/internal/ingest")
        for name, value in ingest.headers().items():
            conn.putheader(name, value)
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        with contextlib.suppress(OSError):  # refused as it arrived: the answer is waiting
            conn.send(wire)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.mark.parametrize("chunk_bytes", [1, 7, 4096, MAX_BODY])
def test_chunked_body_of_exactly_the_limit_is_stored_whatever_its_chunks(
        ingest: IngestServer, chunk_bytes: int) -> None:
    # waitress counted chunk framing against the limit: a body under it sent in chunks was 413.
    # The limit is on the body itself: exactly MAX_BODY passes, one byte more does not.
    status, answer = _send_chunked(ingest, _chunked(_padded_body(MAX_BODY), chunk_bytes))
    assert status == 201, answer
    status, answer = _send_chunked(ingest, _chunked(_padded_body(MAX_BODY + 1), chunk_bytes))
    assert status == 413, answer
    doc = json.loads(answer)
    assert doc["status"] == 413 and str(MAX_BODY) in doc["detail"]
    assert stored_count(ingest) == 1


def test_chunked_body_over_the_limit_is_refused_as_it_arrives(ingest: IngestServer) -> None:
    # Neither buffered whole (memory, disk) nor waited for: the 413 comes while the client is
    # still sending, as soon as the body's own bytes pass the limit.
    wire = _chunked(_padded_body(MAX_BODY + 1), 1024)[:-5]  # no last chunk: never complete
    status, answer = _send_chunked(ingest, wire)
    assert status == 413, answer


@pytest.mark.parametrize(("wire", "status", "detail"), [
    # chunk extensions are framing too: 1 body byte per ~1 KiB on the wire is cut off at the
    # hard cap (6 times the limit), long before the body is large
    (b"".join(b"1;x=" + b"a" * 1000 + b"\r\n \r\n" for _ in range(1000)) + b"0\r\n\r\n",
     413, "framing"),
    # a chunk-size line that never ends (waitress would hold and copy it on every read)
    (b"0" * 100_000, 400, "malformed"),
])
def test_chunk_framing_is_bounded(ingest: IngestServer, wire: bytes, status: int,
                                  detail: str) -> None:
    got, answer = _send_chunked(ingest, wire)
    assert got == status, answer
    doc = json.loads(answer)
    assert doc["status"] == status and detail in doc["detail"]
    assert stored_count(ingest) == 0


def test_too_many_records_is_413(http: requests.Session, ingest: IngestServer) -> None:
    doc = assert_problem(post(http, ingest, batch_body([make_feed()] * 201)), 413)
    assert doc["errors"][0]["field"] == "feeds"


@pytest.mark.parametrize("body", [b"", b"{", b"[1,", b"\xff\xfe", b'{"feeds": [] "x"}'])
def test_malformed_json_is_400(http: requests.Session, ingest: IngestServer,
                               body: bytes) -> None:
    assert_problem(post(http, ingest, body), 400)


@pytest.mark.parametrize("key", [None, "", "key\x7f", "tab\tkey", "k" * 256, "clé-ünï",
                                 "k1, k1", "a,b"])
def test_bad_idempotency_key_is_400(http: requests.Session, ingest: IngestServer,
                                    key: str | None) -> None:
    headers = ingest.headers()
    if key is None:
        del headers["Idempotency-Key"]
    else:
        headers["Idempotency-Key"] = key
    doc = assert_problem(post(http, ingest, batch_body([make_feed()]), headers), 400)
    if "errors" in doc:  # else waitress refused the header itself (DEL), also problem+json
        assert doc["errors"][0]["field"] == "Idempotency-Key"
    assert stored_count(ingest) == 0


def test_idempotency_key_sent_twice_is_400(ingest: IngestServer) -> None:
    # waitress joins a repeated header into "k, k": a new key, so a batch sent with the header
    # twice was stored again under it (and once more for each such retry).
    body = batch_body([make_feed()])
    for keys in (["dup-1", "dup-1"], ["dup-2", "dup-3"]):
        conn = HTTPConnection("127.0.0.1", ingest.server.port, timeout=30)
        try:
            conn.putrequest("POST", "/internal/ingest")
            for name, value in ingest.headers().items():
                if name != "Idempotency-Key":
                    conn.putheader(name, value)
            for key in keys:
                conn.putheader("Idempotency-Key", key)
            conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            response = conn.getresponse()
            doc = json.loads(response.read())
        finally:
            conn.close()
        assert response.status == 400
        assert response.getheader("Content-Type") == PROBLEM
        assert [e["field"] for e in doc["errors"]] == ["Idempotency-Key"]
        assert "Idempotency-Key" in doc["detail"]
    assert stored_count(ingest) == 0


def test_longest_idempotency_key_accepted(http: requests.Session, ingest: IngestServer) -> None:
    headers = ingest.headers("k" * 255)
    assert post(http, ingest, batch_body([make_feed()]), headers).status_code == 201


# --- 422: invalid records ---------------------------------------------------------------------


def _raw_feed(**replacements: str) -> bytes:
    """A batch of [valid, valid-with-raw-JSON-values] so index 1 carries the bad field."""
    text = json.dumps(make_feed(price=1.5, volume=2.5))
    for field, literal in replacements.items():
        sample = {"price": "1.5", "volume": "2.5"}[field]
        text = text.replace(f'"{field}": {sample}', f'"{field}": {literal}')
    return b'{"feeds": [' + json.dumps(make_feed()).encode() + b", " + text.encode() + b"]}"


@pytest.mark.parametrize(("body", "field"), [
    (_raw_feed(price="NaN"), "price"),
    (_raw_feed(price="Infinity"), "price"),
    (_raw_feed(volume="-Infinity"), "volume"),
    (_raw_feed(price="1e999"), "price"),
    (batch_body([make_feed(), make_feed(price=-45123.5)]), "price"),
    (batch_body([make_feed(), make_feed(price=True)]), "price"),
    (batch_body([make_feed(), make_feed(volume=-1)]), "volume"),
    (batch_body([make_feed(), make_feed(timestamp="0001-01-01T00:00:00Z")]), "timestamp"),
    (batch_body([make_feed(), make_feed(timestamp="2999-01-01T00:00:00Z")]), "timestamp"),
    (batch_body([make_feed(), make_feed(symbol="B" * 10_000)]), "symbol"),
    (batch_body([make_feed(), make_feed(symbol="BTC/USD'); DROP TABLE price_feeds;--")]),
     "symbol"),
    (batch_body([make_feed(), make_feed(source="x" * 65)]), "source"),
    (batch_body([make_feed(), make_feed(metadata={"deep": {"x": 1}})]), "metadata.deep"),
    (batch_body([make_feed(), {**make_feed(), "extra": 1}]), "extra"),
])
def test_invalid_record_is_422_naming_index_and_field(http: requests.Session,
                                                      ingest: IngestServer, body: bytes,
                                                      field: str) -> None:
    doc = assert_problem(post(http, ingest, body), 422)
    assert {"index": 1, "field": field} == {k: doc["errors"][0][k] for k in ("index", "field")}
    assert len(doc["errors"]) == 1
    assert len(json.dumps(doc)) < 2000  # the 10,000-character symbol is not echoed back
    assert stored_count(ingest) == 0  # the valid record 0 was not stored either


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def any_ingest(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[IngestServer]:
    """The ingest server on SQLite, then on PostgreSQL."""
    if request.param == "sqlite":
        with running_ingest(tmp_path, max_body_bytes=MAX_BODY, max_feeds=200) as server:
            yield server
        return
    with postgres.postgres_schema() as url:
        storage = open_storage(url, max_connections=4)
        try:
            with running_ingest(storage=storage, max_body_bytes=MAX_BODY,
                                max_feeds=200) as server:
                yield server
        finally:
            storage.close()


@pytest.mark.parametrize(("field", "literal", "status"), [
    ("volume", "-1e-400", 422), ("volume", "-1e-330", 422), ("volume", "-1e-1001", 422),
    ("volume", "-0", 201), ("volume", "-0.0", 201), ("volume", "1e-400", 201),
    ("price", "1e-400", 422), ("price", "-1e-400", 422),
])
def test_numbers_a_float_rounds_to_zero_are_judged_alike_on_both_backends(
        http: requests.Session, any_ingest: IngestServer, field: str, literal: str,
        status: int) -> None:
    # -1e-400 is -0.0 as a float: it passed validation, then SQLite stored 0.0 and PostgreSQL's
    # CHECK (volume >= 0) answered 503 on every retry, so the collector retried forever.
    for body in (_with_raw_value(field, literal),
                 _with_raw_value(field, literal).replace(b": ", b":").replace(b", ", b",")):
        response = post(http, any_ingest, body)
        if status == 201:
            assert response.status_code == 201, response.text
            continue
        doc = assert_problem(response, 422)
        assert [(e["index"], e["field"]) for e in doc["errors"]] == [(1, field)]
    assert stored_count(any_ingest) == (4 if status == 201 else 0)


def test_422_lists_every_bad_record(http: requests.Session, ingest: IngestServer) -> None:
    feeds = [make_feed(price=-1) if i in (3, 7, 42) else make_feed() for i in range(50)]
    doc = assert_problem(post(http, ingest, batch_body(feeds)), 422)
    assert [e["index"] for e in doc["errors"]] == [3, 7, 42]
    assert doc["detail"].startswith("3 invalid record(s)")


def test_sql_looking_text_is_stored_as_text(http: requests.Session, ingest: IngestServer) -> None:
    evil = "x'); DROP TABLE price_feeds; --"
    body = batch_body([make_feed(metadata={"note": evil, "q": "\" OR 1=1 --"})])
    assert post(http, ingest, body).status_code == 201
    row = ingest.storage.latest()[0]
    assert row["metadata"] == {"note": evil, "q": "\" OR 1=1 --"}
    assert stored_count(ingest) == 1


# --- read endpoints ---------------------------------------------------------------------------


def test_latest_and_summary(http: requests.Session, ingest: IngestServer) -> None:
    newest = iso_ago(5)
    body = batch_body([
        make_feed(price=100, timestamp=iso_ago(50)),
        make_feed(price=101, timestamp=newest),
        make_feed(symbol="ETH/USD", price=2000),
        make_feed(source="kraken", worker_id="worker-kraken", price=99),
        make_feed(source="kraken", worker_id="worker-kraken", timestamp=iso_ago(3600)),
    ])
    assert post(http, ingest, body).status_code == 201
    auth = {"Authorization": f"Bearer {ingest.key}"}
    latest = http.get(ingest.url + "/api/v1/prices/latest", headers=auth, timeout=10)
    assert latest.status_code == 200
    prices = latest.json()["prices"]
    assert [(p["source"], p["symbol"], p["price"]) for p in prices] == [
        ("coinbase", "BTC/USD", 101), ("coinbase", "ETH/USD", 2000), ("kraken", "BTC/USD", 99)]
    assert prices[0]["timestamp"] == newest
    filtered = http.get(ingest.url + "/api/v1/prices/latest",
                        params={"source": "coinbase", "symbol": "ETH/USD"}, headers=auth,
                        timeout=10).json()["prices"]
    assert [p["price"] for p in filtered] == [2000]
    summary = http.get(ingest.url + "/api/v1/summary", params={"minutes": 10}, headers=auth,
                       timeout=10)
    assert summary.status_code == 200
    assert summary.json() == {"minutes": 10, "sources": [
        {"source": "coinbase", "count": 3, "distinct_symbols": 2, "max_timestamp": newest},
        {"source": "kraken", "count": 1, "distinct_symbols": 1,
         "max_timestamp": summary.json()["sources"][1]["max_timestamp"]},
    ]}


@pytest.mark.parametrize(("path", "params"), [
    ("/api/v1/prices/latest", {"symbol": "btc-usd"}),
    ("/api/v1/prices/latest", {"source": "a b"}),
    ("/api/v1/prices/latest", {"sybmol": "BTC/USD"}),
    ("/api/v1/summary", {"minutes": "0"}),
    ("/api/v1/summary", {"minutes": "abc"}),
    ("/api/v1/summary", {"minutes": "\u00b2"}),  # "²".isdigit() is True; int("²") fails
    ("/api/v1/summary", {"minutes": "99999999"}),
    ("/api/v1/summary", {"minutes": ["1", "2"]}),
])
def test_bad_query_parameters_are_400(http: requests.Session, ingest: IngestServer, path: str,
                                      params: dict[str, object]) -> None:
    response = http.get(ingest.url + path, params=params,  # type: ignore[arg-type]
                        headers={"Authorization": f"Bearer {ingest.key}"}, timeout=10)
    assert_problem(response, 400)


def test_unknown_path_404_and_wrong_method_405(http: requests.Session,
                                               ingest: IngestServer) -> None:
    assert_problem(http.get(ingest.url + "/nope", timeout=10), 404)
    wrong = http.get(ingest.ingest_url, timeout=10)
    assert_problem(wrong, 405)
    assert wrong.headers["Allow"] == "POST"
    assert http.post(ingest.url + "/healthz", timeout=10).headers["Allow"] == "GET"


# --- failures ---------------------------------------------------------------------------------


class _BrokenStorage:
    """A storage whose database is down (StorageError) or buggy (RuntimeError)."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def store_batch(self, *_: object) -> StoreResult:
        raise self.error

    def stored_count(self, *_: object) -> int | None:
        raise self.error

    def latest(self, *_: object, **__: object) -> list[Any]:
        raise self.error

    def summary(self, minutes: int) -> list[Any]:
        raise self.error

    def ping(self) -> None:
        raise self.error

    def close(self) -> None:
        pass


def test_storage_failure_is_503_with_retry_after(http: requests.Session) -> None:
    with running_ingest(storage=_BrokenStorage(StorageError("db down"))) as ingest:
        response = post(http, ingest, batch_body([make_feed()]))
        assert_problem(response, 503)
        assert int(response.headers["Retry-After"]) > 0
        assert "db down" not in response.text
        assert http.get(ingest.url + "/healthz", timeout=10).status_code == 503
        auth = {"Authorization": f"Bearer {ingest.key}"}
        assert http.get(ingest.url + "/api/v1/summary", headers=auth,
                        timeout=10).status_code == 503


def test_closed_sqlite_is_503(tmp_path: Path, http: requests.Session) -> None:
    storage = SQLiteStorage.open(tmp_path / "x.db")
    with running_ingest(storage=storage) as ingest:
        storage.close()
        assert_problem(post(http, ingest, batch_body([make_feed()])), 503)


def test_unexpected_exception_is_500_problem(http: requests.Session,
                                             caplog: pytest.LogCaptureFixture) -> None:
    with running_ingest(storage=_BrokenStorage(RuntimeError("bug"))) as ingest:
        doc = assert_problem(post(http, ingest, batch_body([make_feed()])), 500)
        assert "bug" not in doc["detail"]
    assert any(r.getMessage() == "request_failed" and r.exc_info for r in caplog.records)


# --- the WSGI app without a server (paths waitress never lets through) ------------------------


def _call(app: IngestApp, environ: dict[str, Any]) -> tuple[str, dict[str, str], bytes]:
    captured: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]],
                       exc_info: object = None) -> Any:
        captured["status"] = status
        captured["headers"] = dict(headers)

    body = b"".join(app(environ, start_response))  # type: ignore[arg-type]
    return captured["status"], captured["headers"], body


def _environ(body: bytes, **extra: Any) -> dict[str, Any]:
    env: dict[str, Any] = {
        "REQUEST_METHOD": "POST", "PATH_INFO": "/internal/ingest",
        "CONTENT_TYPE": "application/json", "HTTP_AUTHORIZATION": f"Bearer {TEST_API_KEY}",
        "HTTP_IDEMPOTENCY_KEY": "k1", "wsgi.input": io.BytesIO(body),
    }
    env.update(extra)
    return env


def test_wsgi_length_rules(tmp_path: Path) -> None:
    storage = SQLiteStorage.open(tmp_path / "x.db")
    try:
        app = IngestApp(storage, [TEST_API_KEY], max_body_bytes=1024, max_feeds=10)
        body = batch_body([make_feed()])
        status, headers, _ = _call(app, _environ(body, CONTENT_LENGTH="5000"))
        assert status.startswith("413") and headers["Content-Type"] == PROBLEM
        status, _, _ = _call(app, _environ(body))  # no length, input not terminated
        assert status.startswith("411")
        status, _, _ = _call(app, _environ(b"x" * 2000, **{"wsgi.input_terminated": True}))
        assert status.startswith("413")
        status, _, _ = _call(app, _environ(body, **{"wsgi.input_terminated": True}))
        assert status.startswith("201")
        status, _, _ = _call(app, _environ(body, CONTENT_LENGTH="abc"))
        assert status.startswith("400")
        status, _, _ = _call(app, _environ(body[:10], CONTENT_LENGTH=str(len(body)),
                                           HTTP_IDEMPOTENCY_KEY="k2"))
        assert status.startswith("400")
    finally:
        storage.close()


class _BudgetWatch:
    """A storage that notes the app's budget in use while it stores a batch."""

    def __init__(self, inner: SQLiteStorage) -> None:
        self.inner = inner
        self.app: IngestApp | None = None
        self.in_use: list[int] = []

    def store_batch(self, key: str, sha: str, feeds: Sequence[ValidFeed]) -> StoreResult:
        assert self.app is not None
        self.in_use.append(self.app._validating_bytes)
        return self.inner.store_batch(key, sha, feeds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_bodies_are_validated_and_stored_within_a_memory_budget(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A body takes ~10x its size from its parse until its records are stored (eight 8 MiB
    # bodies at once took 640 MB): past the budget a body waits VALIDATION_BUDGET_WAIT_S, then
    # gets a 503.
    monkeypatch.setattr("collectors.ingest.app.VALIDATION_BUDGET_WAIT_S", 0.1)
    small = batch_body([make_feed()])
    storage = SQLiteStorage.open(tmp_path / "x.db")
    try:
        watch = _BudgetWatch(storage)
        app = IngestApp(watch, [TEST_API_KEY], max_body_bytes=MAX_BODY,  # type: ignore[arg-type]
                        max_feeds=200, validation_budget_bytes=4 * len(small))
        watch.app = app

        def send(body: bytes, key: str) -> tuple[str, dict[str, str], bytes]:
            return _call(app, _environ(body, CONTENT_LENGTH=str(len(body)),
                                       HTTP_IDEMPOTENCY_KEY=key))

        assert app._take_budget(3 * len(small))  # other requests' bodies being checked
        try:
            assert send(small, "fits")[0].startswith("201")  # 3 + 1 bodies: within it
            status, headers, answer = send(small + b" ", "no-room")
            assert status.startswith("503"), answer
            assert headers["Retry-After"] == "1" and headers["Content-Type"] == PROBLEM
            assert json.loads(answer)["type"].endswith(":busy")
        finally:
            app._return_budget(3 * len(small))
        assert send(small + b" ", "no-room")[0].startswith("201")  # its retry, with room
        big = batch_body([make_feed()] * 40)
        assert len(big) > 4 * len(small)
        assert send(big, "alone")[0].startswith("201")  # larger than the budget: goes alone
        assert app._validating_bytes == 0
        # held until the records are stored (the validated batch is most of the memory)
        assert watch.in_use == [4 * len(small), len(small) + 1, len(big)]

        # A body waiting for room goes on as soon as there is some.
        monkeypatch.setattr("collectors.ingest.app.VALIDATION_BUDGET_WAIT_S", 30.0)
        assert app._take_budget(4 * len(small))
        results: list[str] = []
        waiter = threading.Thread(target=lambda: results.append(send(small, "waits")[0]))
        waiter.start()
        app._return_budget(4 * len(small))
        waiter.join(30)
        assert [r[:3] for r in results] == ["201"]
    finally:
        storage.close()


def test_the_budget_lets_bodies_in_in_the_order_they_came(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A large body waiting for room was passed by every small one that fitted, for ever: a
    steady stream of small batches answered it 503 on every retry (its collector stuck)."""
    monkeypatch.setattr("collectors.ingest.app.VALIDATION_BUDGET_WAIT_S", 5.0)
    storage = SQLiteStorage.open(tmp_path / "x.db")
    try:
        app = IngestApp(storage, [TEST_API_KEY], max_body_bytes=MAX_BODY,
                        validation_budget_bytes=100)
        assert app._take_budget(60)  # a body being checked
        admitted: list[str] = []
        big_waiting = threading.Event()

        def take(name: str, size: int) -> None:
            if name == "big":
                big_waiting.set()
            assert app._take_budget(size)
            admitted.append(name)

        big = threading.Thread(target=take, args=("big", 80))
        big.start()
        assert big_waiting.wait(5)
        assert wait_until(lambda: len(app._budget_queue) == 1, 5)
        small = threading.Thread(target=take, args=("small", 30))  # would fit: 60 + 30
        small.start()
        assert wait_until(lambda: len(app._budget_queue) == 2, 5)
        assert admitted == []  # behind the big one
        app._return_budget(60)
        big.join(5)
        assert admitted == ["big"]  # 80: the small one (80 + 30) still waits
        app._return_budget(80)
        small.join(5)
        assert admitted == ["big", "small"]
        app._return_budget(30)
        assert (app._validating_bytes, len(app._budget_queue)) == (0, 0)
    finally:
        storage.close()


def test_the_budget_grows_with_the_largest_body_allowed(tmp_path: Path) -> None:
    storage = SQLiteStorage.open(tmp_path / "x.db")
    try:
        app = IngestApp(storage, [TEST_API_KEY], max_body_bytes=64 * 1024 * 1024)
        assert app._budget_bytes == 128 * 1024 * 1024
    finally:
        storage.close()


def test_default_budget_never_holds_up_ordinary_batches() -> None:
    thousand = batch_body([make_feed(symbol=f"S{i % 50}/USD") for i in range(1000)])
    # every worker thread validating a 1000-record batch at once fits, as do two of the largest
    assert DEFAULT_THREADS * len(thousand) <= DEFAULT_VALIDATION_BUDGET_BYTES
    assert 2 * DEFAULT_MAX_BODY_BYTES <= DEFAULT_VALIDATION_BUDGET_BYTES


def _with_raw_value(field: str, literal: str) -> bytes:
    """[valid, valid with `literal` as the raw JSON of `field` (a price, volume or metadata
    value)], written as the collectors write JSON (compact) or as json.dumps does."""
    key = field.partition(".")[2]
    bad = make_feed(**({"metadata": {key: "@n@"}} if key else {field: "@n@"}))
    text = json.dumps({"feeds": [make_feed(), bad]}).replace('"@n@"', literal)
    return text.encode()


@pytest.mark.parametrize("literal", [
    "1e999999999999999999999", "-1e999999999999999999999", "1E+999999999999999999999",
    "1e-999999999999999999999", "-1e-999999999999999999999", "1" + "0" * 400,
])
@pytest.mark.parametrize("field", ["price", "volume", "metadata.bid"])
def test_wsgi_numbers_beyond_decimal_range_are_422(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                   field: str, literal: str) -> None:
    # Decimal(literal) raises InvalidOperation for the exponents: that was an unhandled 500.
    caplog.set_level(logging.DEBUG)
    body = _with_raw_value(field, literal)
    for raw in (body, body.replace(b": ", b":").replace(b", ", b",")):
        storage = SQLiteStorage.open(tmp_path / f"{len(raw)}.db")
        try:
            app = IngestApp(storage, [TEST_API_KEY], max_body_bytes=MAX_BODY, max_feeds=10)
            status, headers, answer = _call(app, _environ(raw, CONTENT_LENGTH=str(len(raw))))
            stored = sum(s["count"] for s in storage.summary(7 * 24 * 60))
        finally:
            storage.close()
        exponent = literal.lower().partition("e")[2]
        if field.startswith("metadata") and (not exponent or exponent.startswith("-")):
            # metadata keeps a float literal's float (0.0, as for 1e-400) and an exact int
            assert status.startswith("201"), answer
            assert stored == 2
            continue
        assert status.startswith("422"), answer
        assert headers["Content-Type"] == PROBLEM
        doc = json.loads(answer)
        assert doc["status"] == 422
        assert [(e["index"], e["field"]) for e in doc["errors"]] == [(1, field)]
        assert stored == 0
    assert not any(r.exc_info or r.getMessage() == "request_failed" for r in caplog.records)


# --- the original design's check queries, verbatim ---------------------------------------------


def test_sqlite_check_query_verbatim(http: requests.Session, ingest: IngestServer) -> None:
    body = batch_body([make_feed(), make_feed(symbol="ETH/USD"),
                       make_feed(source="binance", worker_id="worker-binance",
                                 symbol="BTC/USDT")])
    assert post(http, ingest, body).status_code == 201
    assert ingest.db_path is not None
    conn = sqlite3.connect(ingest.db_path)
    try:
        rows = conn.execute(
            "SELECT source, COUNT(*), COUNT(DISTINCT symbol), MAX(timestamp) "
            "FROM price_feeds GROUP BY source").fetchall()
    finally:
        conn.close()
    assert sorted(r[:3] for r in rows) == [("binance", 1, 1), ("coinbase", 2, 2)]


@pytest.mark.postgres
def test_postgres_check_queries_verbatim(http: requests.Session) -> None:
    with postgres.postgres_schema() as url:
        storage = open_storage(url, max_connections=4)
        try:
            with running_ingest(storage=storage) as ingest:
                newest = iso_ago(2)
                body = batch_body([
                    make_feed(price=0.1, timestamp=iso_ago(30)),
                    make_feed(symbol="ETH/USD", price=2500.125, timestamp=newest),
                    make_feed(source="kraken", worker_id="worker-kraken", volume=None),
                    make_feed(timestamp=iso_ago(3600)),  # outside the 10 minutes
                ])
                assert post(http, ingest, body).status_code == 201
                assert post(http, ingest, body, ingest.headers()).status_code == 201
        finally:
            storage.close()
        with postgres.connect(url) as conn:
            summary = conn.execute(
                "SELECT source, COUNT(*), COUNT(DISTINCT symbol), MAX(timestamp) FROM "
                "price_feeds WHERE timestamp > NOW() - INTERVAL '10 minutes' GROUP BY source"
            ).fetchall()
            got = sorted((r[0], r[1], r[2]) for r in summary)
            assert got == [("coinbase", 4, 2), ("kraken", 2, 1)]
            coinbase = next(r for r in summary if r[0] == "coinbase")
            assert coinbase[3].strftime("%Y-%m-%dT%H:%M:%S.%fZ") == newest
            cursor = conn.execute("SELECT * FROM price_feeds ORDER BY timestamp DESC LIMIT 10")
            columns = [c.name for c in cursor.description or ()]
            rows = cursor.fetchall()
        assert columns == ["id", "symbol", "price", "volume", "timestamp", "source",
                           "worker_id", "metadata", "received_at"]
        assert len(rows) == 8
        first = dict(zip(columns, rows[0], strict=True))
        assert first["symbol"] == "ETH/USD"
        assert first["price"] == Decimal("2500.125")
        assert isinstance(first["metadata"], dict)
        assert [r[2] for r in rows].count(Decimal("0.1")) == 2
