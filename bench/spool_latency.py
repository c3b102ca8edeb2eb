"""How long the parser's spool commits take while delivery claims and acknowledges batches.

The collector's commit pattern at a steady rate, on the spool alone (no sockets, no HTTP): one
thread appends `--chunk` records of ~400 bytes `--rate` times a second (what the parse thread
does at a few thousand tickers a second), another claims `--batch`-record batches as they fall
due, counts an attempt and acknowledges each (what the delivery threads do around a POST). With
the default fsync interval (1 s) the spool-fsync thread fsyncs and checkpoints the WAL meanwhile.
Reports the appends' latency percentiles, how long they waited for the spool's write lock (the
claims', attempts', acks' and checkpoints' share of that latency; timed by wrapping the spool's
private `_write_lock`), how long a claim took (`due_batch` returning a new batch), how many
batches went through, and the largest WAL file seen, for `--seconds` after a one-second
warm-up.

    .venv/bin/python bench/spool_latency.py                       # 1,000 appends/s for 8 s
    .venv/bin/python bench/spool_latency.py --rate 2000 --seconds 20 --dir /var/tmp

Session 6 measured SQLite's own checkpoints (run inside whichever commit crossed 1,000 pages)
against the spool-fsync thread's with this pattern; `docs/benchmarks.md` has the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import machine, percentile, write_results
from collectors.spool import Spool


class _TimedLock:
    """The spool's write lock, timing how long the appending thread waits for it."""

    def __init__(self, lock: Any, appender: threading.Thread) -> None:
        self._lock = lock
        self._appender = appender
        self.waits: list[float] = []  # µs
        self.measuring = False

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def acquire(self, *args: Any) -> bool:
        if threading.current_thread() is not self._appender:
            return bool(self._lock.acquire(*args))
        t0 = time.perf_counter()
        got = bool(self._lock.acquire(*args))
        if self.measuring:
            self.waits.append((time.perf_counter() - t0) * 1e6)
        return got

    def release(self) -> None:
        self._lock.release()


def run(directory: Path, rate: float, chunk: int, batch: int, seconds: float,
        fsync_interval_s: float) -> tuple[list[float], list[float], list[float], int, int]:
    """Append latencies, their waits for the write lock and claim times (µs, sorted) after the
    warm-up, batches acknowledged, largest WAL file (bytes)."""
    record = json.dumps({"symbol": "BTC/USD", "price": 1.0, "pad": "x" * 380}).encode()
    spool = Spool(directory, fsync_interval_s=fsync_interval_s)
    timed = _TimedLock(spool._write_lock, threading.current_thread())
    spool._write_lock = timed  # type: ignore[assignment]
    claims: list[float] = []
    wal = directory / "spool.db-wal"
    stop = threading.Event()
    acked = [0]

    def deliver() -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            claimed = spool.due_batch(batch, 5.0)
            if claimed is None:
                stop.wait(0.001)
                continue
            if timed.measuring:
                claims.append((time.perf_counter() - t0) * 1e6)
            spool.record_attempt(claimed.key)
            spool.ack(claimed.key)
            acked[0] += 1

    worker = threading.Thread(target=deliver, name="bench-delivery")
    worker.start()
    latencies: list[float] = []
    largest_wal = 0
    period = 1.0 / rate
    start = time.monotonic()
    warm_until = start + 1.0
    end = warm_until + seconds
    next_at = start
    try:
        while (now := time.monotonic()) < end:
            if next_at > now:
                time.sleep(next_at - now)
            next_at += period
            t0 = time.perf_counter()
            spool.append([record] * chunk)
            took = time.perf_counter() - t0
            if time.monotonic() >= warm_until:
                latencies.append(took * 1e6)
                timed.measuring = True
            if (size := _size(wal)) > largest_wal:
                largest_wal = size
    finally:
        stop.set()
        worker.join()
        spool.close()
    latencies.sort()
    return latencies, sorted(timed.waits), sorted(claims), acked[0], largest_wal


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--rate", type=float, default=1000.0, help="appends per second")
    parser.add_argument("--chunk", type=int, default=2, help="records per append")
    parser.add_argument("--batch", type=int, default=100, help="records per claimed batch")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds")
    parser.add_argument("--fsync-interval-s", type=float, default=1.0)
    parser.add_argument("--dir", type=Path, default=None, help="where the spool goes (a temp dir)")
    parser.add_argument("--name", default="spool_latency")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="chrono-bench-spool-", dir=args.dir) as tmp:
        lat, waits, claims, acked, largest_wal = run(
            Path(tmp) / "spool", args.rate, args.chunk, args.batch, args.seconds,
            args.fsync_interval_s)
    text = (f"### Spool commits under delivery: {args.rate:,.0f} appends/s of {args.chunk} "
            f"records, batches of {args.batch}\n\n{machine()}; fsync_interval_s "
            f"{args.fsync_interval_s:g}; {args.seconds:g} s measured after 1 s.\n\n"
            "| appends | batches acked | p50 µs | p99 µs | p99.9 µs | max µs | "
            "lock wait p99 / p99.9 µs | claim p50 / p99 µs | largest WAL MB |\n"
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
            f"| {len(lat):,} | {acked:,} | {percentile(lat, 50):,.0f} | "
            f"{percentile(lat, 99):,.0f} | {percentile(lat, 99.9):,.0f} | {lat[-1]:,.0f} | "
            f"{percentile(waits, 99):,.0f} / {percentile(waits, 99.9):,.0f} | "
            f"{percentile(claims, 50):,.0f} / {percentile(claims, 99):,.0f} | "
            f"{largest_wal / 1e6:.1f} |\n")
    write_results(args.name, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
