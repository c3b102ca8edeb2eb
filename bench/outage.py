"""Memory through an ingest outage: the backlog must live on disk, not in memory.

    .venv/bin/python bench/outage.py [--records 200000]

The ingest API is down (API_BASE_URL points at a closed port on 127.0.0.1) while the simulator
bursts `--records` Coinbase tickers into one collector. Then the API comes up and the backlog
drains. Reports RSS before/peak/after, the spool's size and bytes on disk per record, and the
drain rate. The peak is the kernel's high-water mark, VmHWM in /proc/<pid>/status, read once the
backlog is all spooled (before the API comes up): the process's largest RSS up to then, not a
sample that could miss a short spike.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import (
    collector_process,
    free_port,
    ingest_process,
    machine,
    status_kb,
    wait_until,
    write_results,
)
from collectors.simulator import Simulator


def spool_records(spool: Path) -> int:
    db = spool / "spool.db"
    if not db.exists():
        return 0
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        # Waiting in `front` and in `chunks` from the cursor on, and in claimed batches.
        return int(conn.execute(
            "SELECT (SELECT coalesce(sum(n), 0) FROM front)"
            " + (SELECT coalesce(sum(min(n, id + n - value)), 0) FROM chunks, state"
            "    WHERE name = 'cursor' AND id + n > value)"
            " + (SELECT coalesce(sum(n), 0) FROM claimed)").fetchone()[0])
    finally:
        conn.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--records", type=int, default=200_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_s, Simulator("coinbase", rate_hz=1, seed=4,
                                                           keep_sent=0) as sim:
        tmp = Path(tmp_s)
        down_port = free_port()  # nothing listens here until the API comes up below
        # The simulator encodes a whole burst before its first byte and sends no heartbeat
        # meanwhile (a newer heartbeat would make the burst's tickers look late): 200,000
        # tickers take ~10 s here, the collector's default liveness timeout, which would then
        # replace the connection and the burst would go nowhere. Hence a longer one.
        with collector_process(tmp, "coinbase", sim.url, f"http://127.0.0.1:{down_port}",
                               BATCH_SIZE="1000", BATCH_INTERVAL_MS="1000",
                               WS_LIVENESS_TIMEOUT_S="60") as col:
            # Subscribed, not merely connected: a burst finds no subscriber otherwise, and the
            # run would wait out its deadline measuring nothing.
            assert sim.wait_for(lambda: any(sim.subscriptions().values()), 20)
            time.sleep(2)  # settle: the idle baseline
            rss_idle = status_kb(col.proc.pid, "VmRSS") / 1024
            if sim.burst(args.records) != 1:
                raise RuntimeError("the burst found no subscribed connection")
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                if sim.bursts_active == 0 and spool_records(col.spool_dir) >= args.records:
                    break
                time.sleep(0.25)  # polling another process's spool
            peak = status_kb(col.proc.pid, "VmHWM") / 1024  # the high-water mark so far
            spooled = spool_records(col.spool_dir)
            if spooled < args.records:
                raise RuntimeError(f"only {spooled:,} of {args.records:,} tickers reached the "
                                   f"spool; see {col.log_path}")
            rss_backlog = status_kb(col.proc.pid, "VmRSS") / 1024
            files = sum(p.stat().st_size for p in col.spool_dir.glob("spool.db*"))
            with ingest_process(tmp, port=down_port) as ingest:  # the API is back
                started = time.monotonic()
                assert wait_until(lambda: spool_records(col.spool_dir) == 0, 300, 0.25)
                drain_s = time.monotonic() - started
                rss_after = status_kb(col.proc.pid, "VmRSS") / 1024
                # The first POST waits out the retry backoff the outage built up (up to
                # DELIVERY_RETRY_MAX_S); the drain itself runs from the first row stored.
                stored = sorted(t[1] for t in ingest.times())
                store_s = (stored[-1] - stored[0]) / 1e9 if len(stored) > 1 else 0.0
    text = "\n".join([
        "# Memory through an ingest outage", "",
        machine() + f"; {args.records:,} Coinbase tickers burst while the API is down; RSS peak:"
        " the collector's VmHWM once the backlog is spooled.", "",
        "| RSS idle MB | RSS peak MB | RSS with backlog MB | backlog on disk | disk bytes/record"
        " | API up -> drained s | first to last row stored s | drain records/s"
        " | RSS after drain MB |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {rss_idle:.1f} | {peak:.1f} | {rss_backlog:.1f} | {spooled:,} | "
        f"{files / max(spooled, 1):.0f} | {drain_s:.1f} | {store_s:.1f} | "
        f"{len(stored) / max(store_s, 1e-9):,.0f} | {rss_after:.1f} |", ""])
    print(text)
    write_results("outage", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
