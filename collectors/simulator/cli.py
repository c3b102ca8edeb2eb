"""`chrono-collector simulate EXCHANGE [EXCHANGE...]`: run simulators until SIGTERM/SIGINT.

Prints one JSON line per venue on startup,
`{"event":"simulator_listening","exchange":"coinbase","url":"ws://127.0.0.1:PORT","port":PORT}`,
then serves until SIGTERM or SIGINT and exits 0. Exit 2: unknown exchange, a bad argument (a
non-loopback host included), or a port that cannot be listened on (in use: `--port`).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from collectors.errors import ConfigError
from collectors.simulator.core import EXCHANGES, Simulator, check_loopback


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `simulate` command's arguments to `parser`."""
    known = ", ".join(sorted(EXCHANGES))
    parser.add_argument("exchanges", nargs="+", metavar="EXCHANGE",
                        help=f"venues to simulate: {known}")
    parser.add_argument("--host", default="127.0.0.1",
                        help="loopback address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0,
                        help="port of the first exchange, the next ones get +1, +2, ... "
                             "(default 0: free ports)")
    parser.add_argument("--rate", type=float, default=1.0, metavar="HZ",
                        help="tickers per second per subscribed symbol; 0 = as fast as the "
                             "socket takes them (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="price-path seed (default 0)")
    parser.add_argument("--record", type=Path, default=None, metavar="FILE",
                        help="append every ticker sent as one JSON line; with several "
                             "exchanges, FILE gets the exchange name before its suffix")
    parser.add_argument("--burst", type=int, default=0, metavar="N",
                        help="send N pre-encoded tickers as fast as possible when a "
                             "connection first subscribes (default 0: none)")


def _record_path(path: Path | None, exchange: str, several: bool) -> Path | None:
    if path is None or not several:
        return path
    return path.with_name(f"{path.stem}.{exchange}{path.suffix}")


def _fail(message: str) -> int:
    print(f"chrono-collector simulate: {message}", file=sys.stderr)
    return 2


def main(args: argparse.Namespace) -> int:
    """Run the simulators in the foreground. Returns the exit code."""
    exchanges: list[str] = list(args.exchanges)
    unknown = [name for name in exchanges if name not in EXCHANGES]
    if unknown:
        return _fail(f"unknown exchange {', '.join(unknown)}; known: "
                     f"{', '.join(sorted(EXCHANGES))}")
    try:
        host = check_loopback(args.host)
    except ConfigError as exc:
        return _fail(str(exc))
    if args.rate < 0:
        return _fail("--rate must be 0 or more")
    if args.burst < 0:
        return _fail("--burst must be 0 or more")
    if args.port < 0 or args.port + len(exchanges) - 1 > 65535:
        return _fail(f"--port {args.port} leaves no room for {len(exchanges)} exchanges")

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    sims: list[Simulator] = []
    try:
        for index, exchange in enumerate(exchanges):
            sim = Simulator(exchange, host=host, port=args.port + index if args.port else 0,
                            rate_hz=args.rate, seed=args.seed,
                            record_path=_record_path(args.record, exchange, len(exchanges) > 1),
                            burst_on_subscribe=args.burst,
                            keep_sent=0)  # a long demo run must not grow in memory
            try:
                sim.start()
            except OSError as exc:
                # Where to listen is configuration: exit 2, as `run` for METRICS_PORT and
                # `ingest` for INGEST_PORT.
                where = f"{host}:{args.port + index}" if args.port else host
                print(f"chrono-collector simulate: --port: cannot listen for {exchange} on "
                      f"{where} ({exc.strerror or exc}; a free port, or 0 for any)",
                      file=sys.stderr)
                return 2
            sims.append(sim)
            print(json.dumps({"event": "simulator_listening", "exchange": exchange,
                              "url": sim.url, "port": sim.port}), flush=True)
        stop.wait()  # until SIGTERM/SIGINT; the handler runs in this (main) thread
        return 0
    finally:
        for sim in sims:
            sim.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
