"""CPU of one collector at a steady rate, thread by thread, beside a bare websocket-client loop
reading the same stream.

The Coinbase simulator (this process) sends `--rate` tickers/s over the five default symbols to
one `chrono-collector run coinbase` subprocess with the production defaults (`BATCH_SIZE=100`,
`BATCH_INTERVAL_MS=5000`), delivering to the reference ingest API (subprocess, SQLite). After a
warm-up, each thread's utime+stime is read from /proc/<pid>/task/*/stat over `--duration`
seconds; the collector names its OS threads (`ws-coinbase`, `parse-coinbase`, `delivery`), so
the table says which does what. Then the same stream goes into a bare
`websocket.create_connection(url, skip_utf8_validation=True)` loop that only `json.loads` each
message, in its own process: what receiving alone costs on this machine.

    .venv/bin/python bench/steady.py                     # 2,000/s, 20 s each, ~1 minute
    .venv/bin/python bench/steady.py --rate 500 --duration 30
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import (
    BARE_COINBASE_LOOP,
    collector_process,
    cpu_s,
    ingest_process,
    machine,
    threads,
    write_results,
)
from collectors.simulator import Simulator

SYMBOLS = 5


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--rate", type=float, default=2000.0, help="tickers/s in all")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--name", default="steady")
    args = parser.parse_args()

    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="chrono-bench-steady-") as tmp_name:
        tmp = Path(tmp_name)
        with ingest_process(tmp) as ingest, \
                Simulator("coinbase", rate_hz=args.rate / SYMBOLS, seed=2) as sim, \
                collector_process(tmp, "coinbase", sim.url, ingest.url) as collector:
            if not sim.wait_for(lambda: any(sim.subscriptions().values()), 30):
                raise RuntimeError(f"collector did not subscribe; see {collector.log_path}")
            time.sleep(args.warmup)
            before, sent0 = threads(collector.pid), sim.sent_count
            ingest0 = cpu_s(ingest.pid)
            time.sleep(args.duration)
            after, sent = threads(collector.pid), sim.sent_count - sent0
            ingest_cpu = cpu_s(ingest.pid) - ingest0
            if collector.stop() != 0:
                raise RuntimeError(f"collector failed; see {collector.log_path}")
        by_name: dict[str, float] = {}
        for tid, (name, cpu) in after.items():
            by_name[name] = by_name.get(name, 0.0) + cpu - before.get(tid, (name, 0.0))[1]
        rows = sorted(by_name.items(), key=lambda kv: -kv[1])
        bare_cpu, bare_sent = bare_loop(args)

    def line(name: str, cpu: float, n: int) -> str:
        return (f"| {name} | {cpu / args.duration:.1%} | {cpu / max(n, 1) * 1e6:,.1f} |")

    total = sum(cpu for _, cpu in rows)
    text = (f"### CPU at a steady {sent / args.duration:,.0f} tickers/s (Coinbase, 5 symbols)\n\n"
            f"{machine()}; production batch settings, delivering to the ingest API (SQLite); "
            f"{args.duration:g} s after {args.warmup:g} s warm-up; CPU from /proc.\n\n"
            "| thread | CPU (of one core) | µs per ticker |\n| --- | ---: | ---: |\n"
            + "\n".join(line(f"`{name}`", cpu, sent) for name, cpu in rows if cpu > 0)
            + "\n" + line("**collector, all threads**", total, sent)
            + "\n" + line("ingest API (another process)", ingest_cpu, sent)
            + "\n" + line("bare websocket-client loop, same stream (own process)", bare_cpu,
                          bare_sent)
            + "\n")
    write_results(args.name, text)
    return 0


def bare_loop(args: argparse.Namespace) -> tuple[float, int]:
    """CPU seconds of the bare loop over `duration`, and the tickers sent meanwhile."""
    with Simulator("coinbase", rate_hz=args.rate / SYMBOLS, seed=2) as sim:
        proc = subprocess.Popen([sys.executable, "-c", BARE_COINBASE_LOOP, sim.url,
                                 str(args.warmup + args.duration + 1)])
        try:
            if not sim.wait_for(lambda: any(sim.subscriptions().values()), 30):
                raise RuntimeError("the bare loop did not subscribe")
            time.sleep(args.warmup)
            cpu0, sent0 = cpu_s(proc.pid), sim.sent_count
            time.sleep(args.duration)
            return cpu_s(proc.pid) - cpu0, sim.sent_count - sent0
        finally:
            proc.wait(timeout=60)


if __name__ == "__main__":
    sys.exit(main())
