"""Where a burst's end-to-end time goes: batch by batch, and the CPU of each process over time.

The same run as bench/throughput.py (one venue: simulator burst -> one `chrono-collector run`
process -> ingest API on SQLite, BATCH_SIZE=1000, BATCH_INTERVAL_MS=100), plus two views of it:

- the batches as the ingest API stored them (its `received_at` per record: one value per
  batch): when the first was stored, the gap between consecutive stores (p50, p90, max), and
  how far storing lagged behind receiving;
- every 100 ms, the CPU each process used (/proc/<pid>/stat, in cores; 10 ms clock ticks, so
  each figure is +-0.1): whether the collector or the ingest API is the one saturated;
- the whole burst's CPU per record, thread by thread for the collector (its OS thread names),
  and for the ingest API and this process (the simulator, from its first frame sent: the
  frames are encoded before) in all: what each record costs the cores they share.

    .venv/bin/python bench/drain_timeline.py                   # coinbase, 60k tickers
    .venv/bin/python bench/drain_timeline.py --venue kraken --records 100000

Bounded: the burst waits at most --timeout s for the ingest API to hold every ticker.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import (
    collector_process,
    cpu_s,
    ingest_process,
    machine,
    threads,
    wait_until,
    write_results,
)
from bench.throughput import subscribed
from collectors.simulator import Simulator

SAMPLE_S = 0.1


def run(venue: str, records: int, timeout_s: float) -> str:
    samples: list[tuple[int, float, float]] = []  # (time ns, collector CPU s, ingest CPU s)
    with tempfile.TemporaryDirectory(prefix=f"chrono-drain-{venue}-") as tmp_name:
        tmp = Path(tmp_name)
        with ingest_process(tmp) as ingest, \
                Simulator(venue, rate_hz=1e-6, seed=1, keep_sent=1) as sim, \
                collector_process(tmp, venue, sim.url, ingest.url, BATCH_SIZE="1000",
                                  BATCH_INTERVAL_MS="100") as collector:
            if not sim.wait_for(lambda: subscribed(sim), timeout_s=30):
                raise RuntimeError(f"{venue}: collector did not subscribe")
            time.sleep(0.5)  # let start-up work finish
            wait_until(lambda: ingest.count() > 0 or venue == "binance", 5)
            time.sleep(0.3)
            baseline = ingest.count()
            done = threading.Event()

            def sample() -> None:
                while not done.wait(SAMPLE_S):
                    samples.append((time.time_ns(), cpu_s(collector.pid), cpu_s(ingest.pid)))

            sampler = threading.Thread(target=sample, name="cpu-sampler", daemon=True)
            threads0, ingest0 = threads(collector.pid), cpu_s(ingest.pid)
            samples.append((time.time_ns(), cpu_s(collector.pid), cpu_s(ingest.pid)))
            sampler.start()
            sent0 = sim.sent_count
            sim.burst(records)
            # The burst's frames are all encoded before its first byte goes out: the
            # simulator's CPU counts from there (the others idle meanwhile).
            sim.wait_for(sent0 + 1, timeout_s=timeout_s)
            bench0 = own_cpu_s()
            complete = wait_until(lambda: ingest.count() >= baseline + records, timeout_s, 0.05)
            done.set()
            sampler.join()
            threads1, ingest1, bench1 = threads(collector.pid), cpu_s(ingest.pid), own_cpu_s()
            times = ingest.times()[baseline:]
    if not times:
        raise RuntimeError(f"{venue}: nothing stored")
    received = sorted(t[0] for t in times)
    stored = sorted(t[1] for t in times)
    r0 = received[0]
    per_batch = Counter(stored)
    batch_times = sorted(per_batch)
    gaps = [(b - a) / 1e6 for a, b in itertools.pairwise(batch_times)]
    e2e_s = (stored[-1] - r0) / 1e9
    lines = [
        f"### Drain timeline: {records:,} {venue} tickers{'' if complete else ' (incomplete)'}",
        "",
        f"{machine()}; BATCH_SIZE=1000, BATCH_INTERVAL_MS=100, one POST in flight, ingest on "
        "SQLite.",
        "",
        "| received in | stored in (end to end) | stored/s | batches | first stored after "
        "| gap between stores p50 / p90 / max |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {(received[-1] - r0) / 1e6:,.0f} ms | {e2e_s * 1000:,.0f} ms "
        f"| {len(stored) / e2e_s:,.0f} | {len(batch_times)} "
        f"| {(batch_times[0] - r0) / 1e6:.0f} ms "
        + (f"| {statistics.median(gaps):.1f} / {sorted(gaps)[int(len(gaps) * 0.9)]:.1f} / "
           f"{max(gaps):.1f} ms |" if gaps else "| - |"),
        "",
        "CPU per 100 ms window, in cores (time from the first ticker received; received and "
        "stored: records so far):",
        "",
        "| t ms | collector | ingest API | received | stored |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for (t0, c0, i0), (t1, c1, i1) in itertools.pairwise(samples):
        dt = (t1 - t0) / 1e9
        if t1 < r0 or t0 > stored[-1]:
            continue
        got = sum(1 for x in received if x <= t1)
        kept = sum(1 for x in stored if x <= t1)
        lines.append(f"| {(t1 - r0) / 1e6:,.0f} | {(c1 - c0) / dt:.2f} | {(i1 - i0) / dt:.2f} "
                     f"| {got:,} | {kept:,} |")
    per_thread: Counter[str] = Counter()
    for tid, (name, cpu) in threads1.items():
        per_thread[name] += cpu - threads0.get(tid, (name, 0.0))[1]
    collector_total = sum(per_thread.values())
    lines += [
        "",
        "CPU of the whole burst, µs per record stored (10 ms clock ticks: ±0.1 µs a record "
        "per 100k):",
        "",
        "| process | thread | CPU µs per record |",
        "| --- | --- | ---: |",
    ]
    lines += [f"| collector | `{name}` | {cpu / records * 1e6:.2f} |"
              for name, cpu in per_thread.most_common() if cpu > 0]
    lines += [
        f"| **collector** | all threads | **{collector_total / records * 1e6:.2f}** |",
        f"| **ingest API** | all threads | **{(ingest1 - ingest0) / records * 1e6:.2f}** |",
        f"| bench (simulator sending, sampler) | all threads "
        f"| {(bench1 - bench0) / records * 1e6:.2f} |",
    ]
    return "\n".join(lines) + "\n"


def own_cpu_s() -> float:
    """This process's CPU seconds (the simulator's threads, the sampler, the waits)."""
    usage = os.times()
    return usage.user + usage.system


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--venue", default="coinbase",
                        choices=("coinbase", "binance", "kraken"))
    parser.add_argument("--records", type=int, default=60_000)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--name", default=None,
                        help="results file name (default: drain_timeline for coinbase, "
                             "drain_timeline-VENUE for the others)")
    args = parser.parse_args()
    if args.name is None:
        args.name = "drain_timeline" + ("" if args.venue == "coinbase" else f"-{args.venue}")
    write_results(args.name, run(args.venue, args.records, args.timeout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
