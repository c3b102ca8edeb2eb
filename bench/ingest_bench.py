"""Ingest API throughput: batches of 100 and 1000 records from concurrent clients, per backend.

Starts `python -m collectors.ingest` as a subprocess on 127.0.0.1 (port 0), so client threads and
server threads do not share a GIL, once per backend: a fresh SQLite file in a temp directory,
and a throwaway schema on PostgreSQL (dropped afterwards). Each client thread has its own
requests.Session and posts the same pre-serialised batch with a fresh Idempotency-Key each time
for `--duration` seconds per scenario (with --fresh-timestamps, each request's records are a
second later than the previous request's instead, as a collector's are: the same batch again
and again makes every insert land mid-index, so the database's cost grows with its size).
Prints a markdown table: records stored per second (from the server's `stored` answers,
cross-checked against /api/v1/summary), p50/p99 latency, and the server's CPU.

    .venv/bin/python bench/ingest_bench.py                      # both backends, ~1 minute
    .venv/bin/python bench/ingest_bench.py --backend sqlite --duration 3 --clients 8
    .venv/bin/python bench/ingest_bench.py --backend sqlite --clients 1 --fresh-timestamps
    .venv/bin/python bench/ingest_bench.py --postgres-url postgresql://postgres@127.0.0.1:5432/test

Bounded: every scenario stops after --duration seconds (plus at most one request's time);
the whole run fails rather than hangs if the server does not start within 30 s.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import API_KEY, ingest_process, postgres_schema

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Result:
    backend: str
    batch: int
    clients: int
    seconds: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    stored: int = 0
    errors: int = 0
    cpu: dict[str, float] = field(default_factory=dict)  # CPU-seconds per second, by process

    def row(self) -> str:
        lat = sorted(self.latencies_s)
        p50 = statistics.median(lat) * 1000 if lat else float("nan")
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000 if lat else float("nan")
        rate = self.stored / self.seconds if self.seconds else 0.0
        cpu = " | ".join(f"{self.cpu.get(k, float('nan')):.0%}" for k in CPU_COLUMNS)
        # server CPU-seconds per 100k records stored: what the ingest costs, however busy the
        # machine's other CPU is (records/s alone moves with whatever else runs)
        per_100k = (self.cpu.get("server", float("nan")) * self.seconds / self.stored * 1e5
                    if self.stored else float("nan"))
        return (f"| {self.backend} | {self.batch} | {self.clients} | {len(lat)} | {self.stored} "
                f"| {rate:,.0f} | {p50:.1f} | {p99:.1f} | {self.errors} | {cpu} "
                f"| {per_100k:.2f} |")


CPU_COLUMNS = ("server", "clients", "other")


def _process_cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_busy_s() -> float:
    """CPU-seconds the whole machine spent busy (all CPUs; Linux /proc/stat; NaN elsewhere)."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return float("nan")
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def cpu_snapshot(server_pid: int) -> tuple[float, float, float]:
    times = os.times()
    return _process_cpu_s(server_pid), times.user + times.system, _machine_busy_s()


def cpu_shares(before: tuple[float, float, float], after: tuple[float, float, float],
               seconds: float) -> dict[str, float]:
    """Share of one CPU used by the server process, the bench's clients, and everything else
    (mostly PostgreSQL) during a scenario: 2.0 would be both CPUs of a 2-CPU machine."""
    server, clients, busy = (a - b for a, b in zip(after, before, strict=True))
    return {"server": server / seconds, "clients": clients / seconds,
            "other": max(0.0, busy - server - clients) / seconds}


def make_body(records: int, now: datetime | None = None) -> bytes:
    now = datetime.now(UTC) if now is None else now
    symbols = ["BTC/USD", "ETH/USD", "SOL/USD", "XRP/USD", "ADA/USD"]
    feeds = []
    for i in range(records):
        ts = (now - timedelta(seconds=30, microseconds=i)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        feeds.append({
            "symbol": symbols[i % len(symbols)], "price": 45123.5 + i / 100,
            "volume": 1234.56, "timestamp": ts, "source": "coinbase",
            "worker_id": "worker-coinbase",
            "metadata": {"bid": 45123.4, "ask": 45123.6, "received_at": ts, "sequence": i},
        })
    return json.dumps({"feeds": feeds}).encode()


# Fresh bodies: the Nth request of the run (over every scenario) has its records in the second
# an hour ago plus N seconds; a run of up to 86,400 + 3,600 requests stays within the API's
# window (at most a day in the future). next() on a count is atomic under the GIL.
_FRESH_START = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
_FRESH_SECONDS = itertools.count(1)


class Bodies:
    """The body of each request: the same batch each time, or (fresh) the batch with its times
    moved a second later for each request, so that every request's records are newer than
    the last request's, as a collector's are."""

    def __init__(self, records: int, fresh: bool) -> None:
        # every record half a second past _FRESH_START, minus a microsecond each: one second
        self._body = make_body(records, _FRESH_START + timedelta(seconds=30.5))
        self._prefix = _FRESH_START.strftime("%Y-%m-%dT%H:%M:%S").encode()
        self._fresh = fresh
        if fresh:
            assert self._body.count(self._prefix) == 2 * records  # timestamp, received_at

    def next(self) -> bytes:
        if not self._fresh:
            return self._body
        later = _FRESH_START + timedelta(seconds=next(_FRESH_SECONDS))
        return self._body.replace(self._prefix, later.strftime("%Y-%m-%dT%H:%M:%S").encode())


def run_scenario(url: str, backend: str, batch: int, clients: int,
                 duration_s: float, *, fresh: bool = False) -> Result:
    bodies = Bodies(batch, fresh)
    result = Result(backend, batch, clients)
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    stop_at: list[float] = []

    def client() -> None:
        local: list[float] = []
        stored = errors = 0
        with requests.Session() as http:
            headers = {"Authorization": f"Bearer {API_KEY}",
                       "Content-Type": "application/json"}
            start.wait(30)
            while time.monotonic() < stop_at[0]:
                body = bodies.next()
                t0 = time.perf_counter()
                try:
                    response = http.post(url + "/internal/ingest", data=body, timeout=60,
                                         headers={**headers, "Idempotency-Key": str(uuid.uuid4())})
                except requests.RequestException:
                    errors += 1
                    continue
                local.append(time.perf_counter() - t0)
                if response.status_code == 201:
                    stored += int(response.json()["stored"])
                else:
                    errors += 1
        with lock:
            result.latencies_s.extend(local)
            result.stored += stored
            result.errors += errors

    threads = [threading.Thread(target=client, name=f"bench-{i}") for i in range(clients)]
    for t in threads:
        t.start()
    began = time.monotonic()
    stop_at.append(began + duration_s)
    start.wait(30)
    for t in threads:
        t.join(duration_s + 120)
    result.seconds = time.monotonic() - began
    return result


def count_stored(url: str) -> int:
    with requests.Session() as http:
        doc = http.get(url + "/api/v1/summary", params={"minutes": 10080}, timeout=60,
                       headers={"Authorization": f"Bearer {API_KEY}"}).json()
    return sum(int(s["count"]) for s in doc["sources"])


def bench_backend(backend: str, database_url: str, args: argparse.Namespace) -> list[Result]:
    results = []
    with tempfile.TemporaryDirectory(prefix="chrono-ingest-bench-") as tmp, \
            ingest_process(Path(tmp), threads=args.threads, database_url=database_url) as ingest:
        url, pid = ingest.url, ingest.pid
        run_scenario(url, backend, 10, 1, 0.5)  # warm-up: connections, page cache, JIT-less
        before = count_stored(url)
        for batch in args.batch_sizes:
            cpu_before = cpu_snapshot(pid)
            result = run_scenario(url, backend, batch, args.clients, args.duration,
                                  fresh=args.fresh_timestamps)
            result.cpu = cpu_shares(cpu_before, cpu_snapshot(pid), result.seconds)
            results.append(result)
            print(result.row(), file=sys.stderr, flush=True)
        counted = count_stored(url) - before
        claimed = sum(r.stored for r in results)
        if counted != claimed:
            raise RuntimeError(f"{backend}: answers claim {claimed} stored, database has {counted}")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--backend", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument("--batch-sizes", default="100,1000",
                        type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--clients", type=int, default=4, help="concurrent client threads")
    parser.add_argument("--threads", type=int, default=8, help="server INGEST_THREADS")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per scenario")
    parser.add_argument("--fresh-timestamps", action="store_true",
                        help="each request's records a second newer than the last (as a "
                             "collector's are) instead of the same batch every time")
    parser.add_argument("--postgres-url", default=os.environ.get(
        "CHRONO_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"))
    args = parser.parse_args()

    results: list[Result] = []
    if args.backend in ("sqlite", "both"):
        with tempfile.TemporaryDirectory() as tmp:
            results += bench_backend("sqlite", f"sqlite:///{tmp}/bench.db", args)
    if args.backend in ("postgres", "both"):
        with postgres_schema(args.postgres_url) as url:
            results += bench_backend("postgresql", url, args)

    print(f"\n{platform.python_implementation()} {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, {args.clients} client threads, server INGEST_THREADS="
          f"{args.threads}, {args.duration:g} s per row"
          f"{', fresh timestamps' if args.fresh_timestamps else ''}\n")
    print("| backend | batch | clients | requests | records stored | records/s | p50 ms "
          "| p99 ms | errors | CPU server | CPU clients | CPU other | server CPU s/100k |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
          "| ---: |")
    for r in results:
        print(r.row())
    return 1 if any(r.errors for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
