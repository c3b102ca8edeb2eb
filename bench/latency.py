"""Latency at a steady 2,000 tickers/s: simulator send -> collector receive -> parser output ->
spool, per record, p50/p99/p99.9.

The Coinbase simulator runs in this process at 400 tickers/s for each of the five default
symbols (2,000/s) and notes `time.time_ns()` just before it writes each ticker to the socket,
keyed by (product, sequence). One collector runs as a subprocess through
bench/stamped_collector.py (the real `chrono-collector run coinbase` plus one hook that notes
when the parser hands each record to the records queue). Three points per record, all on the
same machine's wall clock (`time.time_ns()`, so the clocks agree):

- receive: `metadata.received_at` (µs), stamped by the ws thread right after the frame was read
- parsed: the parser's `put_many` of the chunk holding the record (the hook)
- spooled: the spool's `appended_ns`, taken by the spool writer when it starts the transaction
  that makes the record durable (the commit itself follows; fsync is every 1 s by default)

The deliberate batch wait is excluded by construction: API_BASE_URL points at a closed local
port, so every record stays in the spool (the delivery thread retries with backoff), and after a
clean stop the spool is read back. The first `--warmup` seconds are not counted.

    .venv/bin/python bench/latency.py                    # 20 s at 2,000/s, ~35 s in all
    .venv/bin/python bench/latency.py --rate 4000 --duration 30
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import (
    collector_process,
    cpu_s,
    free_port,
    iso_to_ns,
    machine,
    percentile,
    write_results,
)
from collectors.simulator import Simulator
from collectors.simulator.base import Rendered, Session
from collectors.simulator.market import Tick

STAMPED = Path(__file__).resolve().parent / "stamped_collector.py"
SYMBOLS = 5


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
        ok = super()._send_ticker(session, tick, rendered)  # type: ignore[misc]
        if ok and len(self.stamps) < self._max_stamps:
            with self._stamps_lock:
                self.stamps[(tick.symbol, tick.sequence)] = sent_ns
        return ok


def summarize(name: str, values_us: list[float]) -> str:
    v = sorted(values_us)
    return (f"| {name} | {len(v):,} | {percentile(v, 50):,.0f} | {percentile(v, 99):,.0f} "
            f"| {percentile(v, 99.9):,.0f} | {v[-1] if v else float('nan'):,.0f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--rate", type=float, default=2000.0, help="tickers/s in all")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--name", default="latency")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="chrono-bench-latency-") as tmp_name:
        tmp = Path(tmp_name)
        stamps_path = tmp / "stamps.jsonl"
        closed = f"http://127.0.0.1:{free_port()}"  # nothing listens: records stay spooled
        budget = int(args.rate * (args.duration + args.warmup + 10))
        with StampingSimulator("coinbase", rate_hz=args.rate / SYMBOLS, seed=2, keep_sent=1,
                               max_stamps=budget) as sim:
            with collector_process(
                    tmp, "coinbase", sim.url, closed,
                    argv=[sys.executable, str(STAMPED), "run", "coinbase"],
                    BENCH_STAMPS_PATH=str(stamps_path), BATCH_SIZE="10000",
                    BATCH_INTERVAL_MS="600000") as collector:
                if not sim.wait_for(lambda: any(sim.subscriptions().values()), 30):
                    raise RuntimeError(f"collector did not subscribe; see {collector.log_path}")
                time.sleep(args.warmup)
                start_ns = time.time_ns()
                sent0 = sim.sent_count
                cpu0 = cpu_s(collector.pid)
                time.sleep(args.duration)
                end_ns = time.time_ns()
                sent = sim.sent_count - sent0
                cpu = cpu_s(collector.pid) - cpu0
                code = collector.stop()
            sends = dict(sim.stamps)
        if not sends:
            raise RuntimeError("no send stamps: has Simulator._send_ticker been renamed?")
        if code != 0:
            raise RuntimeError(f"collector exited {code}; see {collector.log_path}")

        parsed: dict[tuple[str, int], int] = {}
        for line in stamps_path.read_text().splitlines():
            symbol, sequence, ns = json.loads(line)
            parsed[(str(symbol).replace("/", "-"), int(sequence))] = int(ns)
        conn = sqlite3.connect(f"file:{collector.spool_dir / 'spool.db'}?mode=ro", uri=True)
        try:
            # The API is never up here, so records wait in the spool: a chunk per row, joined
            # by newlines, all appended at the row's time. (The few in a claimed batch carry
            # only their batch's oldest time, so they are left out.)
            rows = [(ns, record) for ns, payload in conn.execute(
                "SELECT appended_ns, payload FROM waiting").fetchall()
                    for record in bytes(payload).split(b"\n")]
        finally:
            conn.close()

    recv_us: list[float] = []
    parse_us: list[float] = []
    spool_us: list[float] = []
    unmatched = 0
    for appended_ns, payload in rows:
        rec = json.loads(payload)
        meta = rec["metadata"]
        key = (rec["symbol"].replace("/", "-"), int(meta["sequence"]))
        sent_ns = sends.get(key)
        if sent_ns is None or not start_ns <= sent_ns < end_ns:
            unmatched += sent_ns is None
            continue
        recv_us.append((iso_to_ns(meta["received_at"]) - sent_ns) / 1000)
        if key in parsed:
            parse_us.append((parsed[key] - sent_ns) / 1000)
        spool_us.append((int(appended_ns) - sent_ns) / 1000)

    rate = sent / ((end_ns - start_ns) / 1e9)
    text = (f"### Latency at {rate:,.0f} tickers/s (Coinbase, 5 symbols)\n\n{machine()}; "
            f"{args.duration:g} s measured after {args.warmup:g} s warm-up; collector CPU "
            f"{cpu / args.duration:.1%} of one core; µs from the simulator's socket write.\n\n"
            "| point | records | p50 µs | p99 µs | p99.9 µs | max µs |\n"
            "| --- | ---: | ---: | ---: | ---: | ---: |\n"
            + "\n".join([summarize("received (ws thread, `metadata.received_at`)", recv_us),
                         summarize("parsed (record handed to the records queue)", parse_us),
                         summarize("spooled (spool-writer transaction start)", spool_us)])
            + f"\n\n{len(rows):,} records in the spool, {unmatched} without a send stamp "
              f"(the tickers sent on subscribe).\n")
    write_results(args.name, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
