"""`chrono-collector run EXCHANGE` with one measuring hook, for bench/latency.py only.

The hook wraps `Handoff.put_many`, which only the parser calls (to hand its records to the
spool writer): it notes `time.time_ns()` once per call and, per record, the (symbol,
metadata.sequence) pair, in a preallocated list. At exit (SIGTERM stops the collector cleanly)
the stamps are written as JSON lines to $BENCH_STAMPS_PATH. Cost: one clock read per chunk and
one tuple per record, on the parser thread. Nothing else in the collector changes.

    BENCH_STAMPS_PATH=/tmp/stamps.jsonl python bench/stamped_collector.py run coinbase
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collectors.batching import Handoff
from collectors.cli import main

MAX_STAMPS = 2_000_000  # bounded: ~17 minutes at 2,000 records/s
_stamps: list[tuple[str, object, int]] = []
_original = Handoff.put_many


def _put_many(self: Handoff[object], items: list[object]) -> int:
    now_ns = time.time_ns()
    if len(_stamps) < MAX_STAMPS:
        for rec in items:
            meta = getattr(rec, "metadata", None)
            if isinstance(meta, dict):
                _stamps.append((getattr(rec, "symbol", ""), meta.get("sequence"), now_ns))
    return _original(self, items)


def _dump() -> None:
    path = os.environ.get("BENCH_STAMPS_PATH")
    if not path:
        return
    with open(path, "w", encoding="utf-8") as f:
        for symbol, sequence, ns in _stamps:
            f.write(json.dumps([symbol, sequence, ns]) + "\n")


Handoff.put_many = _put_many  # type: ignore[method-assign]
atexit.register(_dump)

if __name__ == "__main__":
    sys.exit(main())
