"""The Storage protocol every ingest backend implements, and the values it returns."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypedDict

from collectors.ingest.validate import MetaScalar, ValidFeed


class Outcome(enum.Enum):
    STORED = "stored"  # this call stored the batch
    REPLAYED = "replayed"  # the key was seen with the same body: nothing stored again
    CONFLICT = "conflict"  # the key was seen with a different body: nothing stored
    IN_FLIGHT = "in_flight"  # another request with this key is being stored right now


@dataclass(frozen=True, slots=True)
class StoreResult:
    """What `store_batch` did. `stored` is the batch's record count (the original's on replay)."""

    outcome: Outcome
    stored: int


class LatestRow(TypedDict):
    symbol: str
    price: float
    volume: float | None
    timestamp: str
    source: str
    worker_id: str
    metadata: dict[str, MetaScalar]
    received_at: str


class SourceSummary(TypedDict):
    source: str
    count: int
    distinct_symbols: int
    max_timestamp: str


class Storage(Protocol):
    """A backend for the ingest API. Every method raises StorageError when the database fails."""

    def store_batch(self, idempotency_key: str, body_sha256: str,
                    feeds: Sequence[ValidFeed]) -> StoreResult:
        """Store every record and the key in one transaction, or none of them."""
        ...

    def stored_count(self, idempotency_key: str, body_sha256: str) -> int | None:
        """How many records the batch stored under this key with this body had, or None when
        no such batch was stored."""
        ...

    def latest(self, source: str | None = None, symbol: str | None = None, *,
               limit: int = 1000) -> list[LatestRow]:
        """The newest row (by exchange timestamp) per (source, symbol), sorted by both."""
        ...

    def summary(self, minutes: int) -> list[SourceSummary]:
        """Per source over the last `minutes` of exchange time: rows, symbols, newest time."""
        ...

    def ping(self) -> None:
        """Return when the database answers; raise StorageError otherwise."""
        ...

    def close(self) -> None:
        """Release every connection. Idempotent."""
        ...
