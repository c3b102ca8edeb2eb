"""Soak: one collector at a steady rate for an hour, sampled every few seconds; does it grow?

One `chrono-collector run coinbase` subprocess with production defaults (BATCH_SIZE=100,
BATCH_INTERVAL_MS=5000, metrics on, spool fsync every 1 s) against the Coinbase simulator (this
process, five symbols at `--rate` tickers per second each, plus heartbeats) and the ingest API
(subprocess, SQLite). Every `--every` seconds it samples the collector's RSS (VmRSS), CPU
(/proc/<pid>/stat), threads, open file descriptors, spool files on disk and the rows stored.
At the end the simulator stops sending, the collector drains, and every ticker sent must be
stored exactly once (counted by the ingest's rows).

    .venv/bin/python bench/soak.py                               # 60 min at 5 x 50/s
    .venv/bin/python bench/soak.py --minutes 2 --rate 20         # a quick look

Writes bench/results/soak.md (a table per window, the RSS trend over the second half in MB/hour)
and bench/results/soak.csv (every sample). Plot it with
`/tmp/cf-venv/bin/python bench/plot_soak.py` (matplotlib lives in the peer's virtualenv).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from dataclasses import astuple, dataclass, fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import (
    RESULTS,
    collector_process,
    cpu_s,
    ingest_process,
    machine,
    status_kb,
    wait_until,
    write_results,
)
from collectors.simulator import Simulator


@dataclass
class Sample:
    t_s: float          # since the start of the steady traffic
    rss_mb: float
    cpu_s: float        # cumulative, since the start of the steady traffic
    threads: int
    fds: int
    spool_kb: float     # spool.db + -wal + -shm
    sent: int           # tickers the simulator sent
    stored: int         # rows in the ingest's database


def spool_kb(spool: Path) -> float:
    total = 0
    for name in ("spool.db", "spool.db-wal", "spool.db-shm"):
        try:
            total += (spool / name).stat().st_size
        except OSError:
            pass
    return total / 1024


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) points, per hour."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    sxy = sum((p[0] - mx) * (p[1] - my) for p in points)
    return sxy / sxx * 3600 if sxx else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=50.0, help="tickers/s per symbol")
    parser.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--windows", type=int, default=6, help="rows in the summary table")
    parser.add_argument("--name", default="soak")
    args = parser.parse_args()

    samples: list[Sample] = []
    with tempfile.TemporaryDirectory(prefix="chrono-bench-soak-") as tmp_name:
        tmp = Path(tmp_name)
        with ingest_process(tmp) as ingest, \
                Simulator("coinbase", rate_hz=args.rate, seed=7, keep_sent=1) as sim, \
                collector_process(tmp, "coinbase", sim.url, ingest.url) as collector:
            if not sim.wait_for(lambda: any(sim.subscriptions().values()), 30):
                raise RuntimeError(f"collector did not subscribe; see {collector.log_path}")
            pid = collector.pid
            time.sleep(5)  # start-up done, first batches out
            t0, cpu0 = time.monotonic(), cpu_s(pid)
            end = t0 + args.minutes * 60
            next_at = t0
            while True:
                now = time.monotonic()
                samples.append(Sample(
                    t_s=round(now - t0, 1), rss_mb=status_kb(pid, "VmRSS") / 1024,
                    cpu_s=round(cpu_s(pid) - cpu0, 2),
                    threads=len(os.listdir(f"/proc/{pid}/task")),
                    fds=len(os.listdir(f"/proc/{pid}/fd")), spool_kb=spool_kb(collector.spool_dir),
                    sent=sim.sent_count, stored=ingest.count()))
                last = samples[-1]
                print(f"t={last.t_s:7.0f}s rss={last.rss_mb:6.1f}MB cpu={last.cpu_s:7.1f}s "
                      f"threads={last.threads} fds={last.fds} spool={last.spool_kb:7.0f}KB "
                      f"sent={last.sent:,} stored={last.stored:,}", file=sys.stderr, flush=True)
                if now >= end:
                    break
                next_at += args.every
                time.sleep(max(0.0, min(next_at, end) - time.monotonic()))
            hwm = status_kb(pid, "VmHWM") / 1024
            for product in ("BTC-USD", "ETH-USD", "SOL-USD", "XRP-USD", "DOGE-USD"):
                sim.set_quiet(product)  # no more tickers; what was sent must all arrive
            time.sleep(0.5)  # a scheduler pass in progress may still send one round
            sent = sim.sent_count
            complete = wait_until(lambda: ingest.count() >= sent, 60, 0.5)
            stored = ingest.count()
            distinct = int(str(ingest.rows(
                "COUNT(DISTINCT json_extract(metadata, '$.sequence') || symbol)")[0][0]))

    with (RESULTS / f"{args.name}.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([fl.name for fl in fields(Sample)])
        writer.writerows(astuple(s) for s in samples)

    per = max(1, len(samples) // args.windows)
    rows = []
    for i in range(0, len(samples) - 1, per):
        a, b = samples[i], samples[min(i + per, len(samples) - 1)]
        span = b.t_s - a.t_s
        if span <= 0:
            continue
        rows.append(f"| {a.t_s / 60:.0f}-{b.t_s / 60:.0f} | {(b.sent - a.sent) / span:,.0f} "
                    f"| {(b.cpu_s - a.cpu_s) / span * 100:.2f} % | {a.rss_mb:.1f} "
                    f"| {b.rss_mb:.1f} | {b.threads} | {b.fds} | {b.spool_kb:,.0f} |")
    half = [(s.t_s, s.rss_mb) for s in samples if s.t_s >= samples[-1].t_s / 2]
    trend = slope_per_hour(half)
    first, last = samples[0], samples[-1]
    text = (
        f"### Soak: Coinbase collector, 5 symbols x {args.rate:g}/s for {args.minutes:g} min\n\n"
        f"{machine()}; production defaults (BATCH_SIZE=100, BATCH_INTERVAL_MS=5000, spool "
        f"fsync 1 s); a sample every {args.every:g} s ({len(samples)} samples, "
        f"bench/results/{args.name}.csv).\n\n"
        "| minutes | tickers/s | CPU (of one core) | RSS MB start | RSS MB end | threads | "
        "open fds | spool KB |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
        + "\n".join(rows) + "\n\n"
        f"- Tickers sent {sent:,}, stored {stored:,} (distinct sequence+symbol {distinct:,}); "
        f"{'all stored, none twice' if complete and stored == sent == distinct else 'MISMATCH'}"
        ".\n"
        f"- RSS {first.rss_mb:.1f} MB at the start, {last.rss_mb:.1f} MB at the end, peak "
        f"(VmHWM) {hwm:.1f} MB; trend over the second half {trend:+.2f} MB/hour.\n"
        f"- Threads {first.threads} -> {last.threads}, open fds {first.fds} -> {last.fds}.\n"
        f"- CPU {last.cpu_s:.1f} s over {last.t_s / 60:.1f} min = "
        f"{last.cpu_s / last.t_s * 100:.2f} % of a core, "
        f"{last.cpu_s / max(1, last.sent) * 1e5:.2f} s per 100k tickers.\n")
    write_results(args.name, text)
    return 0 if complete and stored == sent == distinct else 1


if __name__ == "__main__":
    sys.exit(main())
