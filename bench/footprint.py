"""Footprint of a quiet collector: RSS and CPU with five symbols at the simulator's realistic
rate, before and after an hour-equivalent of traffic.

One `chrono-collector run coinbase` subprocess (production defaults: BATCH_SIZE=100,
BATCH_INTERVAL_MS=5000, metrics on) against the Coinbase simulator (this process, 1 ticker/s per
symbol plus one heartbeat per product per second) and the ingest API (subprocess, SQLite).

1. idle: `--idle` seconds (default 60) of that traffic; RSS (VmRSS) sampled every second, CPU
   from /proc/<pid>/stat over the window.
2. hour-equivalent: a burst of 5 symbols x 1/s x 3600 s = 18,000 tickers, waited for until
   stored.
3. idle again for `--after` seconds (default 30): RSS and CPU once more, and the peak (VmHWM).

    .venv/bin/python bench/footprint.py                 # ~100 s
    .venv/bin/python bench/footprint.py --idle 20 --after 10 --burst 36000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import (
    collector_process,
    cpu_s,
    ingest_process,
    machine,
    status_kb,
    wait_until,
    write_results,
)
from collectors.simulator import Simulator


def window(pid: int, seconds: float) -> tuple[float, float, float, float]:
    """(CPU % of one core, RSS MB at start, RSS MB at end, max RSS MB sampled) over `seconds`."""
    cpu0, t0 = cpu_s(pid), time.monotonic()
    rss = [status_kb(pid, "VmRSS")]
    end = t0 + seconds
    while time.monotonic() < end:
        time.sleep(min(1.0, max(0.0, end - time.monotonic())))
        rss.append(status_kb(pid, "VmRSS"))
    cpu = (cpu_s(pid) - cpu0) / (time.monotonic() - t0)
    return cpu * 100, rss[0] / 1024, rss[-1] / 1024, max(rss) / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--idle", type=float, default=60.0, help="first idle window, s")
    parser.add_argument("--after", type=float, default=30.0, help="idle window after, s")
    parser.add_argument("--burst", type=int, default=18_000, help="hour-equivalent tickers")
    parser.add_argument("--name", default="footprint")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="chrono-bench-footprint-") as tmp_name:
        tmp = Path(tmp_name)
        with ingest_process(tmp) as ingest, \
                Simulator("coinbase", rate_hz=1.0, seed=3, keep_sent=1) as sim, \
                collector_process(tmp, "coinbase", sim.url, ingest.url) as collector:
            if not sim.wait_for(lambda: any(sim.subscriptions().values()), 30):
                raise RuntimeError(f"collector did not subscribe; see {collector.log_path}")
            time.sleep(2)  # start-up done
            pid = collector.pid
            cpu, rss0, rss1, rss_max = window(pid, args.idle)
            rows.append(f"| idle, 5 symbols x 1/s, {args.idle:g} s | {cpu:.2f} % | {rss0:.1f} "
                        f"| {rss1:.1f} | {rss_max:.1f} |")
            before = ingest.count()
            cpu_b0, t_b0 = cpu_s(pid), time.monotonic()
            sim.burst(args.burst)
            done = wait_until(lambda: ingest.count() >= before + args.burst, 90, 0.2)
            burst_s = time.monotonic() - t_b0
            rows.append(f"| hour-equivalent burst: {args.burst:,} tickers"
                        f"{'' if done else ' (incomplete)'} | "
                        f"{(cpu_s(pid) - cpu_b0) / burst_s * 100:.0f} % over {burst_s:.1f} s "
                        f"| - | {status_kb(pid, 'VmRSS') / 1024:.1f} | - |")
            time.sleep(5)  # the last batch interval
            cpu, rss0, rss1, rss_max = window(pid, args.after)
            rows.append(f"| idle again, {args.after:g} s | {cpu:.2f} % | {rss0:.1f} | "
                        f"{rss1:.1f} | {rss_max:.1f} |")
            hwm = status_kb(pid, "VmHWM") / 1024
    text = (f"### Footprint: quiet collector (Coinbase, 5 symbols)\n\n{machine()}; production "
            f"defaults (BATCH_SIZE=100, BATCH_INTERVAL_MS=5000, metrics on).\n\n"
            "| phase | CPU (of one core) | RSS MB start | RSS MB end | RSS MB max sampled |\n"
            "| --- | ---: | ---: | ---: | ---: |\n" + "\n".join(rows)
            + f"\n\nPeak RSS over the whole run (VmHWM): {hwm:.1f} MB.\n")
    write_results(args.name, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
