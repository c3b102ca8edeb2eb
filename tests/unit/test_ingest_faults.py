"""FaultScript (tests/support/faults.py) scripting the real ingest app's misbehaviour."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.support.servers import IngestServer, batch_body, make_feed, running_ingest


@pytest.fixture
def ingest(tmp_path: Path) -> Iterator[IngestServer]:
    with running_ingest(tmp_path) as server:
        yield server


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


def stored(ingest: IngestServer) -> int:
    return sum(s["count"] for s in ingest.storage.summary(60))


def test_scripted_statuses_then_pass_through(http: requests.Session,
                                             ingest: IngestServer) -> None:
    ingest.faults.respond(503, retry_after=2).respond(429, retry_after="7", times=2).respond(500)
    body = batch_body([make_feed()])
    headers = ingest.headers("retry-me")
    answers = [http.post(ingest.ingest_url, data=body, headers=headers, timeout=10)
               for _ in range(5)]
    assert [a.status_code for a in answers] == [503, 429, 429, 500, 201]
    assert [a.headers.get("Retry-After") for a in answers[:4]] == ["2", "7", "7", None]
    assert answers[0].headers["Content-Type"] == "application/problem+json"
    assert ingest.faults.requests_seen == 5
    assert ingest.faults.idempotency_keys == ["retry-me"] * 5
    assert ingest.faults.applied == ["respond"] * 4 + ["pass"]
    assert ingest.faults.bodies == [body] * 5
    assert ingest.faults.pending == 0
    assert stored(ingest) == 1


def test_hang_times_out_the_client_and_the_retry_is_a_replay(http: requests.Session,
                                                             ingest: IngestServer) -> None:
    ingest.faults.hang(60)
    body = batch_body([make_feed()])
    headers = ingest.headers("hung-batch")
    with pytest.raises(requests.ReadTimeout):
        http.post(ingest.ingest_url, data=body, headers=headers, timeout=(5, 0.3))
    ingest.faults.release()
    assert ingest.faults.wait_for_completed(1)
    retry = http.post(ingest.ingest_url, data=body, headers=headers, timeout=10)
    assert retry.status_code == 200
    assert retry.headers["Idempotency-Replayed"] == "true"
    assert stored(ingest) == 1


def test_close_connection_without_response(http: requests.Session,
                                           ingest: IngestServer) -> None:
    ingest.faults.pass_through().close_connection()
    body = batch_body([make_feed()])
    assert http.post(ingest.ingest_url, data=body, headers=ingest.headers(),
                     timeout=10).status_code == 201
    with pytest.raises(requests.ConnectionError):
        http.post(ingest.ingest_url, data=body, headers=ingest.headers("dropped"), timeout=10)
    assert ingest.faults.wait_for_completed(2)
    again = http.post(ingest.ingest_url, data=body, headers=ingest.headers("dropped"),
                      timeout=10)
    assert again.status_code == 201  # the dropped request never reached storage
    assert stored(ingest) == 2
    assert ingest.faults.applied == ["pass", "close", "pass"]


def test_gets_are_never_scripted(http: requests.Session, ingest: IngestServer) -> None:
    ingest.faults.respond(500)
    assert http.get(ingest.url + "/healthz", timeout=10).status_code == 200
    assert ingest.faults.requests_seen == 0
    assert ingest.faults.pending == 1
    ingest.faults.clear()
    assert ingest.faults.pending == 0
