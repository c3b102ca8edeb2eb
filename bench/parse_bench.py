"""Per-message CPU cost of the collector's in-process stages, on real simulator frames.

For each venue: the exchange simulator (this process) bursts `--records` tickers to a bare
websocket-client connection, which keeps the frames as received. Then, with no I/O, each stage
runs over those same bytes, single-threaded, best of `--repeat` runs:

- decode: the JSON decoder the collector uses, frames -> objects;
- adapter: `Adapter.parse` (decode included), frames -> records;
- parser: the parser thread's `_handle` over chunks of 2000 frames (adapter, lag histogram,
  per-symbol counters, freshness, hand-off to an in-memory queue), i.e. the parse thread's
  work without the spool commit (bench/spool_bench.py measures that);
- encode: the spool writer's record -> JSON bytes (on the parse thread too).

    .venv/bin/python bench/parse_bench.py                     # 3 venues x 50k, ~20 s
    .venv/bin/python bench/parse_bench.py --venues coinbase --records 100000

Numbers are microseconds per message (per record for `encode`), CPU time of this process
(time.process_time), so another load on the machine moves them less than wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import websocket

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prometheus_client import CollectorRegistry

from bench.ceiling import is_ticker
from bench.harness import machine, write_results
from collectors import exchanges
from collectors.batching import Handoff
from collectors.connection import Connection, Frame
from collectors.decoding import decode_frame
from collectors.delivery import encode
from collectors.exchanges.base import Adapter
from collectors.metrics import Metrics
from collectors.model import PriceFeed
from collectors.pipeline import PARSE_CHUNK_MAX, Parser
from collectors.simulator import Simulator

VENUES = ("coinbase", "binance", "kraken")


def is_ticker_data(venue: str, payload: bytes) -> bool:
    """A ticker data frame, not an ack, status, heartbeat or snapshot (as bench/ceiling.py
    counts them)."""
    try:
        return is_ticker(venue, json.loads(payload))
    except ValueError:
        return False


def capture(venue: str, records: int) -> list[Frame]:
    """Frames as the collector sees them (acks, snapshots, heartbeats included) up to the
    `records`-th ticker data frame."""
    adapter = exchanges.create(venue, "bench")
    symbols = adapter.default_symbols
    with Simulator(venue, rate_hz=1e-6, seed=1) as sim:
        ws = websocket.create_connection(adapter.connect_url(sim.url, symbols), timeout=30,
                                         skip_utf8_validation=True)
        try:
            for message in adapter.subscribe_messages(symbols):
                ws.send(message)
            if not sim.wait_for(lambda: any(sim.subscriptions().values()), 10):
                raise RuntimeError(f"{venue}: no subscription")
            time.sleep(0.3)
            sim.burst(records)
            frames: list[Frame] = []
            tickers = 0
            deadline = time.monotonic() + 60 + records / 5_000  # heartbeats keep recv() busy
            while tickers < records:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{venue}: only {tickers:,} of {records:,} tickers")
                data = ws.recv()
                payload = data.encode() if isinstance(data, str) else data
                frames.append((payload, time.time_ns()))
                if is_ticker_data(venue, payload):
                    tickers += 1
            return frames
        finally:
            ws.close()


def best_of(repeat: int, run: Callable[[], None]) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        run()
        best = min(best, time.process_time() - t0)
    return best


def fresh_parser(venue: str) -> tuple[Parser, Adapter, Handoff[PriceFeed]]:
    adapter = exchanges.create(venue, "bench", decode_frame)
    metrics = Metrics(CollectorRegistry(), venue, "bench")
    frames: Handoff[Frame] = Handoff(1)
    records: Handoff[PriceFeed] = Handoff(10_000_000)
    conn = Connection(adapter, "ws://127.0.0.1:9", adapter.default_symbols, frames, metrics,
                      threading.Event())
    parser = Parser(adapter, frames, records, conn, metrics, threading.Event())
    return parser, adapter, records


def measure(venue: str, records: int, repeat: int) -> str:
    frames = capture(venue, records)
    n = len(frames)
    payloads = [f[0] for f in frames]
    decode = decode_frame  # what the service gives the adapters

    def run_decode() -> None:
        for p in payloads:
            decode(p)

    def run_adapter() -> None:
        adapter = exchanges.create(venue, "bench", decode_frame)
        parse = adapter.parse
        for p, ns in frames:
            parse(p, ns)

    def run_parser() -> None:
        parser, _adapter, _records = fresh_parser(venue)
        for i in range(0, n, PARSE_CHUNK_MAX):
            # (with each chunk's place in the queue, as the parser's loop gives it: the
            # bookkeeping of which frame answered a subscribe is part of the work)
            parser._handle(frames[i:i + PARSE_CHUNK_MAX], i)

    parser, _adapter, out = fresh_parser(venue)
    for i in range(0, n, PARSE_CHUNK_MAX):
        parser._handle(frames[i:i + PARSE_CHUNK_MAX])
    recs = out.get_all(0.0)

    def run_encode() -> None:
        for r in recs:
            encode(r)

    us = [best_of(repeat, f) / n * 1e6 for f in (run_decode, run_adapter, run_parser)]
    enc = best_of(repeat, run_encode) / max(1, len(recs)) * 1e6
    row = (f"| {venue} | {n:,} | {len(recs):,} | {us[0]:.2f} | {us[1]:.2f} | {us[2]:.2f} "
           f"| {enc:.2f} | {us[2] + enc:.2f} |")
    print(row, file=sys.stderr, flush=True)
    return row


HEADER = ("| venue | frames | records | decode µs | adapter µs (incl. decode) "
          "| parser thread µs | encode µs | parse + encode µs |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--venues", default=",".join(VENUES),
                        type=lambda s: [v for v in s.split(",") if v])
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--name", default="parse")
    args = parser.parse_args()
    rows = [measure(v, args.records, args.repeat) for v in args.venues]
    text = (f"### Parser stages: CPU µs per message, best of {args.repeat}\n\n{machine()}; "
            f"{args.records:,} simulator tickers per venue, captured over loopback, then "
            f"replayed in-process.\n\n{HEADER}\n" + "\n".join(rows) + "\n")
    write_results(args.name, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
