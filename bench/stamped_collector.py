"""`chrono-collector run EXCHANGE` with four timing hooks, for bench/latency.py only.

Each hook notes `time.time_ns()` once per call and, per record, its (symbol, sequence) key, in
memory; at exit (SIGTERM stops the collector cleanly) the stamps are written as JSON lines to
$BENCH_STAMPS_PATH: `[point, ns, [[symbol, sequence(, received ns)], ...]]`. Nothing else in the collector
changes.

- `parsed`: `SpoolWriter.put_many_waiting` is entered (the parser hands a chunk's records on)
- `spooled`: the chunk's `Spool.append` (or `append_claiming`) returns (the chunk is
  committed to the spool: it survives `kill -9`, and it may be claimed into a batch); not when
  `put_many_waiting` returns, so whatever the writer does after its commit (waking the delivery
  thread) is not counted as the commit's
- `posted`: `Poster.post` is entered with a batch (its POST starts); the keys come from the
  batch's own bytes
- `sent`: urllib3's `HTTPConnection.request` returns for that POST: the request line, headers
  and the whole body were written to the socket (on loopback, handed to the kernel: the
  record has left the process)

Cost: two clock reads per chunk and a tuple per record on the parser thread; two clock reads and
two references to the batch's bytes a POST on the delivery thread, whose records are decoded at exit (decoding
them in the hook, about 0.5 ms of GIL a batch, delayed the other threads it measures).

    BENCH_STAMPS_PATH=/tmp/stamps.jsonl python bench/stamped_collector.py run coinbase
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import urllib3.connection

from collectors.cli import main
from collectors.delivery import Poster, PostResult, SpoolWriter
from collectors.model import PriceFeed
from collectors.spool import Batch, Spool

MAX_CALLS = 2_000_000  # bounded: far more than a benchmark's minutes make
# Tuples of str/int only: the cyclic GC stops tracking them after their first pass, so the
# stamps of a long run do not make the collector's full collections slower (a list of lists
# did: 38 ms gen-2 pauses that showed up as the bench's own p99.9).
_stamps: list[tuple[str, int, tuple[tuple[Any, ...], ...] | bytes]] = []
_put_many_waiting = SpoolWriter.put_many_waiting
_post = Poster.post
_append = Spool.append
_append_claiming = Spool.append_claiming  # the write that fills a batch for a waiting worker
_appended_ns = [0]  # when the parser thread's last Spool.append returned
_request = urllib3.connection.HTTPConnection.request
_posting = threading.local()  # the batch a delivery worker is POSTing (its bytes), for `sent`


def _note(point: str, ns: int, keys: tuple[tuple[Any, ...], ...] | bytes) -> None:
    if len(_stamps) < MAX_CALLS:
        _stamps.append((point, ns, keys))


def _key_of_record(rec: PriceFeed) -> tuple[str, object, int]:
    meta = rec.metadata if isinstance(rec.metadata, dict) else {}
    return rec.symbol, meta.get("sequence"), rec.received_ns


def _key_of_json(raw: bytes) -> tuple[str, object]:
    doc: dict[str, Any] = json.loads(raw)
    return str(doc.get("symbol")), (doc.get("metadata") or {}).get("sequence")


def append(self: Spool, records: Any, marks: Any = None) -> int:
    dropped = _append(self, records, marks)
    _appended_ns[0] = time.time_ns()
    return dropped


def append_claiming(self: Spool, *args: Any, **kwargs: Any) -> Any:
    result = _append_claiming(self, *args, **kwargs)
    _appended_ns[0] = time.time_ns()
    return result


def put_many_waiting(self: SpoolWriter, records: list[PriceFeed], stop: Any) -> int:
    parsed_ns = time.time_ns()
    not_taken = _put_many_waiting(self, records, stop)
    spooled_ns = _appended_ns[0]
    keys = tuple(_key_of_record(r) for r in records)
    _note("parsed", parsed_ns, keys)
    if not not_taken:
        _note("spooled", spooled_ns, keys)
    return not_taken


def post(self: Poster, batch: Batch) -> PostResult:
    _note("posted", time.time_ns(), batch.payload)  # decoded at exit
    _posting.payload = batch.payload
    try:
        return _post(self, batch)
    finally:
        _posting.payload = None


def request(self: urllib3.connection.HTTPConnection, *args: Any, **kwargs: Any) -> None:
    _request(self, *args, **kwargs)
    payload = getattr(_posting, "payload", None)
    if payload is not None:
        _note("sent", time.time_ns(), payload)
        _posting.payload = None


def _dump() -> None:
    path = os.environ.get("BENCH_STAMPS_PATH")
    if not path:
        return
    with open(path, "w", encoding="utf-8") as f:
        for point, ns, noted in _stamps:
            keys = noted if not isinstance(noted, bytes) else tuple(  # a batch's records
                _key_of_json(r) for r in noted.split(b"\n"))
            f.write(json.dumps([point, ns, keys]) + "\n")


SpoolWriter.put_many_waiting = put_many_waiting  # type: ignore[method-assign]
Spool.append = append  # type: ignore[method-assign]
Spool.append_claiming = append_claiming  # type: ignore[method-assign]
Poster.post = post  # type: ignore[method-assign]
urllib3.connection.HTTPConnection.request = request  # type: ignore[method-assign,assignment]
atexit.register(_dump)

if __name__ == "__main__":
    sys.exit(main())
