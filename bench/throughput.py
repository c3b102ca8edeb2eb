"""End-to-end throughput: simulator burst -> one `chrono-collector run` process -> ingest -> SQLite.

For each venue (Coinbase, Binance, Kraken): the exchange simulator runs in this process; one
collector runs as a subprocess (`python -m collectors run EXCHANGE`, its default five symbols,
`BATCH_SIZE=1000`, `BATCH_INTERVAL_MS=100`, spool fsync every 1 s as in production); the
reference ingest API runs as another subprocess on a fresh SQLite file (`synchronous=FULL`).
Once the collector has subscribed, the simulator sends `--records` pre-encoded tickers
(round-robin over the five symbols) as fast as the socket takes them, then this script waits
until the ingest database holds all of them.

    .venv/bin/python bench/throughput.py                        # 3 venues x 60k records, ~1.5 min
    .venv/bin/python bench/throughput.py --venues coinbase --records 100000

Columns: "recv/s" is the collector's receive rate (first to last `metadata.received_at`, the
ws thread's clock); "stored/s" is end to end, from the first record received by the collector to
the last one stored by the ingest API (its `received_at` column), so it includes parsing,
spooling, batching and the API. "CPU s/100k" is the collector process's user+system CPU
(/proc/<pid>/stat) between the subscription and the last record stored, per 100k records;
"peak RSS" is the collector's VmHWM (/proc/<pid>/status) at the end.

Bounded: every wait has a deadline (start 30 s, the burst --timeout s); a venue that does not
finish in time is reported as such.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import (
    collector_process,
    cpu_s,
    ingest_process,
    machine,
    postgres_schema,
    status_kb,
    wait_until,
    write_results,
)
from collectors.simulator import Simulator

VENUES = ("coinbase", "binance", "kraken")


@dataclass
class Result:
    venue: str
    records: int
    stored: int = 0
    recv_span_s: float = 0.0
    e2e_span_s: float = 0.0
    cpu_s: float = 0.0
    ingest_cpu_s: float = 0.0
    peak_rss_kb: int = 0
    frame_bytes: float = 0.0
    complete: bool = False

    @property
    def recv_rate(self) -> float:
        return self.stored / self.recv_span_s if self.recv_span_s else 0.0

    @property
    def stored_rate(self) -> float:
        return self.stored / self.e2e_span_s if self.e2e_span_s else 0.0

    def row(self) -> str:
        cpu = self.cpu_s / self.stored * 100_000 if self.stored else float("nan")
        ingest_cpu = self.ingest_cpu_s / self.stored * 100_000 if self.stored else float("nan")
        note = "" if self.complete else " (incomplete)"
        return (f"| {self.venue}{note} | {self.records:,} | {self.frame_bytes:.0f} "
                f"| {self.stored:,} | {self.recv_rate:,.0f} | {self.stored_rate:,.0f} "
                f"| {self.e2e_span_s:.2f} | {cpu:.2f} | {ingest_cpu:.2f} "
                f"| {self.peak_rss_kb / 1024:.1f} |")


HEADER = ("| venue | tickers sent | frame bytes | stored | recv/s | stored/s (end to end) "
          "| end-to-end s | CPU s/100k | ingest CPU s/100k | peak RSS MB |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")


def subscribed(sim: Simulator) -> bool:
    return any(any(t.startswith(("ticker", "btc", "eth")) or "@ticker" in t for t in topics)
               for topics in sim.subscriptions().values())


def run_venue(venue: str, records: int, timeout_s: float,
              around: Callable[[int], AbstractContextManager[object]] | None = None,
              backend: str = "sqlite", concurrency: int = 1) -> Result:
    """One venue's run. `around(pid)`, when given, wraps the burst (bench/profile.py attaches
    py-spy to the collector's pid with it)."""
    result = Result(venue, records)
    with tempfile.TemporaryDirectory(prefix=f"chrono-bench-{venue}-") as tmp_name, \
            (postgres_schema() if backend == "postgres" else nullcontext(None)) as pg_url:
        tmp = Path(tmp_name)
        # rate_hz tiny: no background tickers, only the burst (heartbeats/pings stay on).
        with ingest_process(tmp, database_url=pg_url) as ingest, \
                Simulator(venue, rate_hz=1e-6, seed=1, keep_sent=1) as sim, \
                collector_process(tmp, venue, sim.url, ingest.url, BATCH_SIZE="1000",
                                  BATCH_INTERVAL_MS="100",
                                  DELIVERY_CONCURRENCY=str(concurrency)) as collector:
            if not sim.wait_for(lambda: subscribed(sim), timeout_s=30):
                raise RuntimeError(f"{venue}: collector did not subscribe; see "
                                   f"{collector.log_path}")
            time.sleep(0.5)  # let start-up work (imports, first metrics) finish
            # The tickers sent on subscribe (Coinbase, Kraken) are stored by now; skip them.
            wait_until(lambda: ingest.count() > 0 or venue == "binance", 5)
            time.sleep(0.3)
            baseline = ingest.count()
            with around(collector.pid) if around else nullcontext():
                cpu0, ingest_cpu0 = cpu_s(collector.pid), cpu_s(ingest.pid)
                sim.burst(records)
                result.complete = wait_until(lambda: ingest.count() >= baseline + records,
                                             timeout_s, 0.1)
                cpu1, ingest_cpu1 = cpu_s(collector.pid), cpu_s(ingest.pid)
            result.cpu_s = cpu1 - cpu0
            result.ingest_cpu_s = ingest_cpu1 - ingest_cpu0
            result.peak_rss_kb = status_kb(collector.pid, "VmHWM")
            sent = sim.sent_tickers()
            if sent:
                result.frame_bytes = len(json.dumps(sent[-1], separators=(",", ":")))
            times = ingest.times()[baseline:]
            result.stored = len(times)
            if times:
                received = sorted(t[0] for t in times)
                stored_at = max(t[1] for t in times)
                result.recv_span_s = (received[-1] - received[0]) / 1e9
                result.e2e_span_s = (stored_at - received[0]) / 1e9
    print(result.row(), file=sys.stderr, flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--venues", default=",".join(VENUES),
                        type=lambda s: [v for v in s.split(",") if v])
    parser.add_argument("--records", type=int, default=60_000, help="tickers per venue")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per venue burst")
    parser.add_argument("--name", default=None,
                        help="results file name (default: throughput, plus -postgres for "
                             "--backend postgres and -cN for --concurrency N other than 1, "
                             "e.g. throughput-postgres-c2)")
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite",
                        help="the ingest API's store (postgres: a throwaway schema on "
                             "CHRONO_TEST_POSTGRES_URL or 127.0.0.1:5432/test)")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="the collector's DELIVERY_CONCURRENCY (POSTs in flight)")
    args = parser.parse_args()
    if args.name is None:
        args.name = "throughput" + ("-postgres" if args.backend == "postgres" else "") + (
            f"-c{args.concurrency}" if args.concurrency != 1 else "")
    results = [run_venue(v, args.records, args.timeout, backend=args.backend,
                         concurrency=args.concurrency) for v in args.venues]
    store = "PostgreSQL" if args.backend == "postgres" else "SQLite"
    text = (f"### Throughput: simulator burst -> collector -> ingest ({store})\n\n"
            f"{machine()}; one collector process, BATCH_SIZE=1000, BATCH_INTERVAL_MS=100, "
            f"DELIVERY_CONCURRENCY={args.concurrency}, "
            f"ingest INGEST_THREADS=4, {args.records:,} tickers per venue over loopback "
            f"(frame bytes: the last ticker's JSON text).\n\n{HEADER}\n"
            + "\n".join(r.row() for r in results) + "\n")
    write_results(args.name, text)
    return 0 if all(r.complete for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
