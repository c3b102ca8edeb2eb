"""The ceiling: the same ticker burst into a bare websocket-client receive loop that only decodes
JSON, and the collector's end-to-end rate as a ratio of it.

For each venue the simulator (this process) sends `--records` pre-encoded tickers, exactly as in
bench/throughput.py, to a client subprocess (`ceiling.py --client`, its own process and GIL like
the collector) that connects with `websocket.create_connection`, sends the collector adapter's
own subscribe frames to the URL the adapter builds, and runs
`while True: msg = ws.recv(); d = json.loads(msg)` until it has seen every ticker. Two settings:
`skip_utf8_validation=True` (what the collector uses) and the library's defaults (pure-Python
UTF-8 validation, unless wsaccel is installed; it is not in the project venv). The rate is
first to last ticker received.

    .venv/bin/python bench/ceiling.py                              # 3 venues, ~1 minute
    .venv/bin/python bench/ceiling.py --venues coinbase --records 100000
    .venv/bin/python bench/ceiling.py --throughput bench/results/throughput.md   # add ratios

With `--throughput`, the "stored/s" column of a throughput results file (same machine, same
--records) is divided by the skip_utf8 ceiling.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import machine, write_results
from collectors import exchanges
from collectors.simulator import Simulator

VENUES = ("coinbase", "binance", "kraken")


def is_ticker(venue: str, d: object) -> bool:
    if not isinstance(d, dict):
        return False
    if venue == "coinbase":
        return d.get("type") == "ticker"
    if venue == "kraken":
        return d.get("channel") == "ticker" and d.get("type") == "update"
    return "data" in d  # binance combined stream


def client(venue: str, url: str, records: int, skip_utf8: bool, timeout_s: float) -> int:
    """Runs in the subprocess; prints one JSON line with the result."""
    import websocket  # the project's websocket-client, as the collector uses it

    adapter = exchanges.create(venue, "bench")
    symbols = list(adapter.default_symbols)
    ws = websocket.create_connection(adapter.connect_url(url, symbols), timeout=timeout_s,
                                     skip_utf8_validation=skip_utf8)
    for message in adapter.subscribe_messages(symbols):
        ws.send(message)
    # Drain what the venue sends on subscribe (acks, Coinbase's first tickers, Kraken's
    # snapshot) so that only the burst is timed; the simulator encodes the whole burst before
    # its first byte, which takes longer than this.
    ws.settimeout(0.05)
    drain_until = time.monotonic() + 0.5
    while time.monotonic() < drain_until:
        try:
            ws.recv()
        except websocket.WebSocketTimeoutException:
            pass
    ws.settimeout(timeout_s)
    print(json.dumps({"event": "subscribed"}), flush=True)
    seen = 0
    first = last = 0.0
    loads = json.loads
    deadline = time.monotonic() + timeout_s
    try:
        while seen < records and time.monotonic() < deadline:
            msg = ws.recv()
            d = loads(msg)
            if is_ticker(venue, d):
                if seen == 0:
                    first = time.perf_counter()
                seen += 1
                last = time.perf_counter()
    except websocket.WebSocketTimeoutException:
        pass
    finally:
        ws.close()
    print(json.dumps({"event": "done", "tickers": seen, "seconds": last - first}), flush=True)
    return 0


def run(venue: str, records: int, skip_utf8: bool, timeout_s: float) -> tuple[int, float]:
    # The snapshot tickers a venue sends on subscribe (Kraken) are not counted: only updates.
    with Simulator(venue, rate_hz=1e-6, seed=1, keep_sent=1) as sim:
        cmd = [sys.executable, __file__, "--client", "--venues", venue, "--url", sim.url,
               "--records", str(records), "--timeout", str(timeout_s)]
        if not skip_utf8:
            cmd.append("--validate-utf8")
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if '"subscribed"' not in line:
                raise RuntimeError(f"client did not subscribe: {line!r}")
            if not sim.wait_for(lambda: any(sim.subscriptions().values()), 10):
                raise RuntimeError("no subscription at the simulator")
            sim.burst(records)
            out, _ = proc.communicate(timeout=timeout_s + 30)
    doc = json.loads(out.strip().splitlines()[-1])
    return int(doc["tickers"]), float(doc["seconds"])


def stored_rates(path: Path) -> dict[str, float]:
    """venue -> stored/s from a throughput results table."""
    rates: dict[str, float] = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) >= 6 and cells[0] in VENUES:
            rates[cells[0]] = float(re.sub(r"[^0-9.]", "", cells[5]) or 0)
    return rates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--venues", default=",".join(VENUES),
                        type=lambda s: [v for v in s.split(",") if v])
    parser.add_argument("--records", type=int, default=60_000)
    parser.add_argument("--timeout", type=float, default=40.0)
    parser.add_argument("--throughput", type=Path, default=None,
                        help="a bench/throughput.py results file, for the ratio column")
    parser.add_argument("--name", default="ceiling")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--validate-utf8", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        return client(args.venues[0], args.url, args.records, not args.validate_utf8,
                      args.timeout)

    collector = stored_rates(args.throughput) if args.throughput else {}
    rows = []
    for venue in args.venues:
        cells = [venue]
        rates = []
        for skip in (True, False):
            seen, seconds = run(venue, args.records, skip, args.timeout)
            rate = seen / seconds if seconds else 0.0
            rates.append(rate)
            cells.append(f"{rate:,.0f}" + ("" if seen >= args.records else f" ({seen} seen)"))
            print(f"{venue} skip_utf8={skip}: {seen} in {seconds:.3f} s", file=sys.stderr,
                  flush=True)
        stored = collector.get(venue)
        cells.append(f"{stored:,.0f}" if stored else "-")
        cells.append(f"{stored / rates[0]:.2f}x" if stored and rates[0] else "-")
        rows.append("| " + " | ".join(cells) + " |")
    text = (f"### Ceiling: bare websocket-client `recv()` + `json.loads`\n\n{machine()}; "
            f"{args.records:,} tickers per venue, receiver in its own process.\n\n"
            "| venue | msgs/s skip_utf8_validation=True | msgs/s defaults | collector stored/s "
            "| collector / ceiling |\n| --- | ---: | ---: | ---: | ---: |\n"
            + "\n".join(rows) + "\n")
    write_results(args.name, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
