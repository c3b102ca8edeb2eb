"""Latency at a steady 2,000 tickers/s, from the simulator's socket write to the record leaving
the collector, the deliberate batch wait excluded; and the same bytes into a bare
websocket-client loop, for the floor this machine sets.

The Coinbase simulator runs in this process at 400 tickers/s for each of the five default
symbols and notes `time.time_ns()` just before it writes each ticker to a socket, keyed by
(product, sequence). Two phases, one after the other, at the same rate:

1. **floor**: a bare `websocket.create_connection(url, skip_utf8_validation=True)` loop in its own
   process notes `time.time_ns()` when `recv()` returns each ticker (then `json.loads` it).
2. **collector**: `chrono-collector run coinbase` through bench/stamped_collector.py (the real
   collector plus timing hooks), with the production batch settings (`BATCH_SIZE=100`,
   `BATCH_INTERVAL_MS=5000`) and the reference ingest API (SQLite) as a subprocess.

Per record, all on this machine's wall clock:

- received: `metadata.received_at`, stamped by the ws thread right after the frame was read
- parsed: the parser hands the record's chunk to the spool writer
- spooled: that chunk is committed to the spool (durable against `kill -9`; claimable)
- POST starts: the POST carrying the record starts (`Poster.post`), **minus the batch wait**:
  a batch is due when its last record is spooled (a full batch) or when its oldest has waited
  `BATCH_INTERVAL_MS`, whichever is first; `POST starts = spooled + (POST start - due)`. The
  wait for a batch to fill is deliberate; what is counted is the pipeline before the spool and
  the claim and wake-up after the batch is due.
- left: the POST's request, body and all, has been written to the socket (urllib3's
  `HTTPConnection.request` returns), minus the same batch wait: the record has left the
  process. This is the issue's "record leaving the process".

The first `--warmup` seconds of each phase are not counted.

    .venv/bin/python bench/latency.py                    # 20 s per phase, about 1 minute
    .venv/bin/python bench/latency.py --rate 4000 --duration 30
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import (
    BARE_COINBASE_LOOP,
    collector_process,
    cpu_s,
    ingest_process,
    machine,
    percentile,
    write_results,
)
from collectors.simulator import Simulator
from collectors.simulator.base import Rendered, Session
from collectors.simulator.market import Tick

STAMPED = Path(__file__).resolve().parent / "stamped_collector.py"
SYMBOLS = 5
BATCH_INTERVAL_S = 5.0  # the collector's default BATCH_INTERVAL_MS

class StampingSimulator(Simulator):
    """Notes the wall-clock time just before each ticker is written to a socket.

    Wraps the simulator's internal per-ticker send (`_send_ticker`, which the scheduler's
    broadcast and the venues call): the simulator has no public send-time hook. If that name
    changes, main() fails loudly (no stamps) rather than reporting nothing.
    """

    def __init__(self, *args: object, max_stamps: int, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.stamps: dict[tuple[str, int], int] = {}
        self._max_stamps = max_stamps
        self._stamps_lock = threading.Lock()

    def _send_ticker(self, session: Session, tick: Tick, rendered: Rendered) -> bool:
        sent_ns = time.time_ns()
        ok = super()._send_ticker(session, tick, rendered)
        if ok and len(self.stamps) < self._max_stamps:
            with self._stamps_lock:
                self.stamps[(tick.symbol, tick.sequence)] = sent_ns
        return ok


def row(name: str, values_us: list[float]) -> str:
    v = sorted(values_us)
    if not v:
        return f"| {name} | 0 | - | - | - | - |"
    return (f"| {name} | {len(v):,} | {percentile(v, 50):,.0f} | {percentile(v, 99):,.0f} "
            f"| {percentile(v, 99.9):,.0f} | {v[-1]:,.0f} |")


def floor_phase(rate: float, warmup: float, duration: float) -> list[float]:
    """µs from the simulator's write to a bare loop's recv() return, per ticker."""
    sim = StampingSimulator("coinbase", rate_hz=rate / SYMBOLS, seed=2, keep_sent=1,
                            max_stamps=int(rate * (warmup + duration + 10)))
    with tempfile.TemporaryDirectory(prefix="chrono-bench-floor-") as tmp, sim:
        out = Path(tmp) / "got.json"
        subprocess.run([sys.executable, "-c", BARE_COINBASE_LOOP, sim.url,
                        str(warmup + duration), str(out)],
                       check=True, timeout=warmup + duration + 60)
        sends = dict(sim.stamps)
        got = json.loads(out.read_text())
    if not sends:
        raise RuntimeError("no send stamps: has Simulator._send_ticker been renamed?")
    start = min(sends.values()) + int(warmup * 1e9)
    return [(ns - sends[(p, s)]) / 1000 for p, s, ns in got
            if (p, s) in sends and sends[(p, s)] >= start]


def collector_phase(rate: float, warmup: float, duration: float
                    ) -> tuple[dict[str, list[float]], float, int, int]:
    """Per point, µs from the simulator's write; the collector's CPU share; records counted;
    records sent in the window that never left."""
    with tempfile.TemporaryDirectory(prefix="chrono-bench-latency-") as tmp_name:
        tmp = Path(tmp_name)
        stamps_path = tmp / "stamps.jsonl"
        budget = int(rate * (duration + warmup + 10))
        sim = StampingSimulator("coinbase", rate_hz=rate / SYMBOLS, seed=2, keep_sent=1,
                                max_stamps=budget)
        with ingest_process(tmp) as ingest, sim:
            with collector_process(tmp, "coinbase", sim.url, ingest.url,
                                   argv=[sys.executable, str(STAMPED), "run", "coinbase"],
                                   BENCH_STAMPS_PATH=str(stamps_path)) as collector:
                if not sim.wait_for(lambda: any(sim.subscriptions().values()), 30):
                    raise RuntimeError(f"collector did not subscribe; see {collector.log_path}")
                time.sleep(warmup)
                start_ns = time.time_ns()
                cpu0 = cpu_s(collector.pid)
                time.sleep(duration)
                end_ns = time.time_ns()
                cpu = cpu_s(collector.pid) - cpu0
                # Batches holding the window's last records fill within a batch interval.
                time.sleep(BATCH_INTERVAL_S + 1)
                code = collector.stop()
            sends = dict(sim.stamps)
        if not sends:
            raise RuntimeError("no send stamps: has Simulator._send_ticker been renamed?")
        if code != 0:
            raise RuntimeError(f"collector exited {code}; see {collector.log_path}")

        received: dict[tuple[str, int], int] = {}
        parsed: dict[tuple[str, int], int] = {}
        spooled: dict[tuple[str, int], int] = {}
        batches: list[tuple[int, list[tuple[str, int]]]] = []
        sent_at: dict[tuple[tuple[str, int], ...], list[int]] = {}  # a batch's keys -> sent ns
        for line in stamps_path.read_text().splitlines():
            point, ns, keys = json.loads(line)
            ids = [(str(k[0]).replace("/", "-"), int(k[1])) for k in keys]
            if point == "parsed":
                for key, k in zip(ids, keys, strict=True):
                    parsed[key] = ns
                    received[key] = int(k[2])
            elif point == "spooled":
                spooled.update(dict.fromkeys(ids, ns))
            elif point == "posted":
                batches.append((ns, ids))
            elif point == "sent":
                sent_at.setdefault(tuple(ids), []).append(ns)

    posted: dict[tuple[str, int], int] = {}
    left: dict[tuple[str, int], int] = {}
    for posted_ns, ids in batches:
        times = [spooled[k] for k in ids if k in spooled]
        sends_of_batch = sent_at.get(tuple(ids))
        # (each POST's `sent` follows its `posted`: the first not before it is this POST's)
        sent_ns = next((ns for ns in sends_of_batch or () if ns >= posted_ns), None)
        if len(times) != len(ids):
            continue  # records spooled before the window's stamps (none after warm-up)
        due_ns = min(max(times), min(times) + int(BATCH_INTERVAL_S * 1e9))
        for key in ids:
            # A re-sent batch (a retry) keeps its first POST.
            posted.setdefault(key, spooled[key] + max(0, posted_ns - due_ns))
            if sent_ns is not None:
                left.setdefault(key, spooled[key] + max(0, sent_ns - due_ns))

    window = [k for k, ns in sends.items() if start_ns <= ns < end_ns]
    points: dict[str, list[float]] = {"received": [], "parsed": [], "spooled": [],
                                      "posted": [], "left": [], "to parsed": [],
                                      "to spooled": [], "to posted": [], "to left": []}
    stages = (("received", received), ("parsed", parsed), ("spooled", spooled),
              ("posted", posted), ("left", left))
    for key in window:
        sent_ns = sends[key]
        for name, table in stages:
            if key in table:
                points[name].append((table[key] - sent_ns) / 1000)
        # Each step on its own, per record: where a record's time goes.
        for (_, before), (name, after) in itertools.pairwise(stages):
            if key in before and key in after:
                points[f"to {name}"].append((after[key] - before[key]) / 1000)
    missing = sum(1 for k in window if k not in left)
    return points, cpu / duration, len(window), missing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--rate", type=float, default=2000.0, help="tickers/s in all")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--name", default="latency")
    args = parser.parse_args()

    floor = floor_phase(args.rate, args.warmup, args.duration)
    points, cpu_share, counted, missing = collector_phase(args.rate, args.warmup,
                                                          args.duration)
    text = (f"### Latency at {args.rate:,.0f} tickers/s (Coinbase, 5 symbols)\n\n{machine()}; "
            f"{args.duration:g} s measured per phase after {args.warmup:g} s warm-up; "
            f"collector CPU {cpu_share:.1%} of one core (with delivery to the ingest API); "
            "µs from the simulator's socket write.\n\n"
            "| point | records | p50 µs | p99 µs | p99.9 µs | max µs |\n"
            "| --- | ---: | ---: | ---: | ---: | ---: |\n"
            + "\n".join([
                row("floor: bare websocket-client `recv()` returns", floor),
                row("received (ws thread, `metadata.received_at`)", points["received"]),
                row("parsed (chunk handed to the spool writer)", points["parsed"]),
                row("spooled (chunk committed)", points["spooled"]),
                row("POST starts, batch wait excluded", points["posted"]),
                row("**left: request written to the socket, batch wait excluded**",
                    points["left"]),
            ])
            + "\n\nEach step alone, per record (µs; percentiles of the step, so they do not "
              "add up to the rows above):\n\n"
              "| step | records | p50 µs | p99 µs | p99.9 µs | max µs |\n"
              "| --- | ---: | ---: | ---: | ---: | ---: |\n"
            + "\n".join([
                row("received -> parsed (the parse thread's wake-up and work)",
                    points["to parsed"]),
                row("parsed -> spooled (the chunk's commit)", points["to spooled"]),
                row("spooled -> POST starts (batch due -> the worker's wake-up)",
                    points["to posted"]),
                row("POST starts -> left (requests and urllib3 write the request)",
                    points["to left"]),
            ])
            + f"\n\n{counted:,} tickers sent in the collector's window; {missing} of them not "
              "seen leaving (should be 0).\n")
    write_results(args.name, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
