"""Delivery to a distant ingest API: stored records/s by DELIVERY_CONCURRENCY and batch size.

Production collectors rarely sit next to the API. Here a delay line on 127.0.0.1 (a TCP proxy
that holds every byte the API sends back for `--delay-ms` before passing it on, as a network
round trip would) stands between one collector and the ingest API (subprocess, SQLite). The
Coinbase simulator (this process) streams `--rate` tickers/s in all, well above what one POST at
a time can carry at that distance. After a warm-up, records stored per second are counted over
`--seconds`.

    .venv/bin/python bench/remote_api.py                         # 50 ms, ~2 min
    .venv/bin/python bench/remote_api.py --delay-ms 20 --concurrency 1,4 --batch 100

One POST at a time moves at most BATCH_SIZE records per round trip; DELIVERY_CONCURRENCY keeps
that many in flight. Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import collections
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import collector_process, ingest_process, machine, wait_until, write_results
from collectors.simulator import Simulator


class DelayLine:
    """A TCP proxy on 127.0.0.1: requests pass at once, answers arrive `delay_s` late."""

    def __init__(self, upstream_port: int, delay_s: float) -> None:
        self._upstream = ("127.0.0.1", upstream_port)
        self._delay_s = delay_s
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._stop = threading.Event()
        threading.Thread(target=self._accept, name="delay-accept", daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        self._listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._upstream, timeout=10)
            for target in (self._forward, self._delayed):
                threading.Thread(target=target, args=(client, upstream), daemon=True).start()

    @staticmethod
    def _forward(client: socket.socket, upstream: socket.socket) -> None:
        try:
            while data := client.recv(65536):
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            upstream.close()

    def _delayed(self, client: socket.socket, upstream: socket.socket) -> None:
        held: collections.deque[tuple[float, bytes]] = collections.deque()
        cond = threading.Condition()
        done = threading.Event()

        def read() -> None:
            try:
                while data := upstream.recv(65536):
                    with cond:
                        held.append((time.monotonic() + self._delay_s, data))
                        cond.notify()
            except OSError:
                pass
            finally:
                done.set()
                with cond:
                    cond.notify()

        threading.Thread(target=read, daemon=True).start()
        try:
            while True:
                with cond:
                    while not held and not done.is_set():
                        cond.wait(1.0)
                    if not held:
                        return
                    due, data = held.popleft()
                time.sleep(max(0.0, due - time.monotonic()))  # the line's delay, on purpose
                client.sendall(data)
        except OSError:
            pass
        finally:
            client.close()


def measure(delay_s: float, concurrency: int, batch: int, rate: float, warmup_s: float,
            seconds: float) -> tuple[float, float]:
    """(stored/s, sent/s) over the measured window: the simulator's own rate is measured too,
    since a Python simulator may not reach the rate asked of it on a busy machine."""
    with tempfile.TemporaryDirectory(prefix="chrono-bench-remote-") as tmp_name:
        tmp = Path(tmp_name)
        with ingest_process(tmp) as ingest, \
                Simulator("coinbase", rate_hz=rate / 5, seed=5, keep_sent=1) as sim:
            line = DelayLine(int(ingest.url.rsplit(":", 1)[1]), delay_s)
            try:
                with collector_process(tmp, "coinbase", sim.url, f"http://127.0.0.1:{line.port}",
                                       BATCH_SIZE=str(batch), BATCH_INTERVAL_MS="200",
                                       DELIVERY_CONCURRENCY=str(concurrency)) as collector:
                    if not wait_until(lambda: ingest.count() > 0, 30, 0.1):
                        raise RuntimeError(f"nothing stored; see {collector.log_path}")
                    time.sleep(warmup_s)  # reach the steady state first
                    n0, s0, t0 = ingest.count(), sim.sent_count, time.monotonic()
                    time.sleep(seconds)  # the measured window
                    n1, s1, t1 = ingest.count(), sim.sent_count, time.monotonic()
            finally:
                line.close()
    rate_stored, rate_sent = (n1 - n0) / (t1 - t0), (s1 - s0) / (t1 - t0)
    print(f"delay {delay_s * 1000:.0f} ms, concurrency {concurrency}, batch {batch}: "
          f"{rate_stored:,.0f} stored/s of {rate_sent:,.0f} sent/s", file=sys.stderr, flush=True)
    return rate_stored, rate_sent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--delay-ms", type=float, default=50.0)
    parser.add_argument("--concurrency", default="1,2,4,8",
                        type=lambda s: [int(x) for x in s.split(",") if x])
    parser.add_argument("--batch", default="100,1000",
                        type=lambda s: [int(x) for x in s.split(",") if x])
    parser.add_argument("--rate", type=float, default=5000.0, help="tickers/s sent in all")
    parser.add_argument("--warmup", type=float, default=4.0)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--name", default="remote_api")
    args = parser.parse_args()
    rows = []
    sent_rates: list[float] = []
    for batch in args.batch:
        results = [measure(args.delay_ms / 1000, c, batch, args.rate, args.warmup,
                           args.seconds) for c in args.concurrency]
        sent_rates += [sent for _stored, sent in results]
        rows.append(f"| {batch:,} | " + " | ".join(f"{r:,.0f}" for r, _s in results) + " |")
    head = " | ".join(f"DELIVERY_CONCURRENCY={c}" for c in args.concurrency)
    text = (f"### Delivery across {args.delay_ms:g} ms to the ingest API: stored records/s\n\n"
            f"{machine()}; Coinbase simulator at {args.rate:,.0f} tickers/s, one collector, "
            f"a delay line holding the API's answers {args.delay_ms:g} ms, ingest on SQLite; "
            f"{args.seconds:g} s measured after {args.warmup:g} s.\n\n"
            f"| BATCH_SIZE | {head} |\n| ---: |" + " ---: |" * len(args.concurrency) + "\n"
            + "\n".join(rows) + "\n\n"
            f"The simulator sent {min(sent_rates):,.0f}-{max(sent_rates):,.0f} tickers/s in the "
            f"measured windows (asked: {args.rate:,.0f}).\n")
    write_results(args.name, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
