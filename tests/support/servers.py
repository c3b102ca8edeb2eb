"""Start a real ingest server on 127.0.0.1 (port 0) for tests; yields url, key and storage.

    with running_ingest(tmp_path) as ingest:
        requests.post(ingest.url + "/internal/ingest", json=..., headers=ingest.headers())
        assert ingest.storage.latest() ...
        ingest.faults.respond(503, retry_after=1)   # the next POST fails

The app is always wrapped in a FaultScript (passing through until a test scripts a fault).
Everything is closed on exit, hangs released first, so no ResourceWarning leaks.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from collectors.ingest.app import IngestApp
from collectors.ingest.server import RunningServer, start_server
from collectors.ingest.storage import SQLiteStorage, Storage
from tests.support.faults import FaultScript

TEST_API_KEY = "test-key-0123456789abcdef"


@dataclass
class IngestServer:
    url: str
    key: str
    storage: Storage
    app: IngestApp
    faults: FaultScript
    server: RunningServer
    db_path: Path | None = None

    @property
    def ingest_url(self) -> str:
        return self.url + "/internal/ingest"

    def headers(self, idempotency_key: str | None = None, *,
                key: str | None = None) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {self.key if key is None else key}",
            "Content-Type": "application/json",
            "Idempotency-Key": idempotency_key or str(uuid.uuid4()),
        }


@contextmanager
def running_ingest(tmp_path: Path | None = None, *, storage: Storage | None = None,
                   api_key: str = TEST_API_KEY, extra_keys: Sequence[str] = (),
                   max_body_bytes: int = 8 * 1024 * 1024, max_feeds: int = 10_000,
                   threads: int = 4) -> Iterator[IngestServer]:
    """An ingest server over `storage` (or a new SQLite file under tmp_path). Closes all."""
    db_path: Path | None = None
    owned = storage is None
    if storage is None:
        if tmp_path is None:
            raise ValueError("give tmp_path or storage")
        db_path = tmp_path / "ingest" / "ingest.db"
        storage = SQLiteStorage.open(db_path)
    try:
        app = IngestApp(storage, [api_key, *extra_keys], max_body_bytes, max_feeds)
        faults = FaultScript(app)
        server = start_server(faults, threads=threads, max_body_bytes=max_body_bytes)
        try:
            yield IngestServer(server.url, api_key, storage, app, faults, server, db_path)
        finally:
            faults.release()
            server.stop()
    finally:
        if owned:
            storage.close()


def iso_ago(seconds: float = 60.0, *, now: datetime | None = None) -> str:
    """An ISO 8601 UTC time `seconds` before now, with microseconds."""
    moment = (now or datetime.now(UTC)) - timedelta(seconds=seconds)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def make_feed(**overrides: object) -> dict[str, object]:
    """A valid PriceFeed JSON record (one minute old); keyword arguments replace fields."""
    feed: dict[str, object] = {
        "symbol": "BTC/USD", "price": 45123.5, "volume": 1234.56,
        "timestamp": iso_ago(60), "source": "coinbase", "worker_id": "worker-coinbase",
        "metadata": {"bid": 45123.4, "ask": 45123.6, "received_at": iso_ago(59.9)},
    }
    feed.update(overrides)
    return feed


def batch_body(feeds: Sequence[Mapping[str, object]]) -> bytes:
    return json.dumps({"feeds": list(feeds)}).encode()
