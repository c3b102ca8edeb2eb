"""Spool throughput and size on this machine's disk; prints a markdown table.

    .venv/bin/python bench/spool_bench.py                     # 200k records of ~400 bytes
    .venv/bin/python bench/spool_bench.py --records 50000 --append-size 100 --dir /var/tmp

For each fsync_interval_s (1.0: synchronous=NORMAL + the fsync thread; 0: synchronous=FULL,
an fsync per commit) it appends `--records` realistic PriceFeed records in transactions of
`--append-size`, then drains them with due_batch + record_attempt + ack in batches of
`--batch` (three commits per batch, as the delivery thread does). "disk B/rec" is spool.db plus
spool.db-wal divided by the records held, measured when all are appended.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from collectors.spool import Spool


def make_record(i: int) -> bytes:
    """A compact PriceFeed as the collectors produce it (about 400 bytes)."""
    price = 45_000 + (i % 1000) * 0.5
    feed = {
        "symbol": "BTC/USD",
        "price": price,
        "volume": 12_345.678_91,
        "timestamp": "2026-11-29T10:00:00.123456Z",
        "source": "coinbase",
        "worker_id": "worker-coinbase",
        "metadata": {
            "bid": price - 0.01,
            "ask": price + 0.01,
            "bid_size": 0.123_45,
            "ask_size": 1.234_5,
            "high_24h": 46_123.45,
            "low_24h": 44_012.34,
            "open_24h": 45_500.01,
            "sequence": 81_234_567_890 + i,
            "trade_id": 612_345_678 + i,
            "last_size": 0.004_21,
            "received_at": "2026-11-29T10:00:00.130012Z",
        },
    }
    return json.dumps(feed, separators=(",", ":")).encode()


def run(
    directory: Path, fsync_interval_s: float, records: list[bytes], append_size: int, batch: int
) -> dict[str, float]:
    with Spool(directory, max_bytes=1 << 40, fsync_interval_s=fsync_interval_s) as spool:
        start = time.perf_counter()
        for i in range(0, len(records), append_size):
            spool.append(records[i : i + append_size])
        append_s = time.perf_counter() - start
        stats = spool.stats()
        assert stats.records == len(records)
        disk_per_record = stats.file_bytes / stats.records
        payload_per_record = stats.payload_bytes / stats.records

        drained = 0
        start = time.perf_counter()
        while (b := spool.due_batch(batch, 0.0, force=True)) is not None:
            spool.record_attempt(b.key)
            drained += spool.ack(b.key)
        drain_s = time.perf_counter() - start
        assert drained == len(records)
    return {
        "append_rps": len(records) / append_s,
        "drain_rps": drained / drain_s,
        "disk_per_record": disk_per_record,
        "payload_per_record": payload_per_record,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument(
        "--append-size",
        type=int,
        default=500,
        help="records per append transaction (the parser commits a chunk of 1-2000 frames)",
    )
    parser.add_argument("--batch", type=int, default=500, help="records per delivery batch")
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="where to create the spool (default: a temporary directory)",
    )
    args = parser.parse_args()

    records = [make_record(i) for i in range(args.records)]
    rows = []
    for fsync_interval_s in (1.0, 0.0):
        base = Path(tempfile.mkdtemp(prefix="spool-bench-", dir=args.dir))
        try:
            result = run(base / "spool", fsync_interval_s, records, args.append_size, args.batch)
        finally:
            shutil.rmtree(base)
        rows.append((fsync_interval_s, result))

    print(
        f"spool_bench: {args.records} records, append {args.append_size}/txn, "
        f"drain batches of {args.batch}; Python {platform.python_version()}, "
        f"SQLite {sqlite3.sqlite_version}, {os.cpu_count()} CPUs, {platform.system()} "
        f"{platform.release()}"
    )
    print()
    print("| fsync_interval_s | appended rec/s | drained rec/s | payload B/rec | disk B/rec |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for fsync_interval_s, r in rows:
        print(
            f"| {fsync_interval_s:g} | {r['append_rps']:,.0f} | {r['drain_rps']:,.0f} "
            f"| {r['payload_per_record']:.0f} | {r['disk_per_record']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
