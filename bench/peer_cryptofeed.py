"""The peer: cryptofeed 2.4.1 normalizing the same Binance `@ticker` bytes into a counting callback.

Runs in its OWN virtualenv (cryptofeed is never a project dependency):

    python3.11 -m venv /tmp/cf-venv && /tmp/cf-venv/bin/pip install cryptofeed==2.4.1
    /tmp/cf-venv/bin/python bench/peer_cryptofeed.py                # 60k tickers, ~15 s
    /tmp/cf-venv/bin/python bench/peer_cryptofeed.py --records 100000 \
        --simulate /work/main/.venv/bin/chrono-collector

Why Binance: cryptofeed's `Coinbase` is Coinbase Advanced Trade (no ticker channel) and its
`Kraken` speaks Kraken's v1 WebSocket API while the collector (and the simulator) speak v2, so
Binance's combined stream `<symbol>@ticker` (24hrTicker) is the one channel where both consume
identical bytes. cryptofeed maps its TICKER to `bookTicker` and its handler does not route
`24hrTicker` events, so the subclass below (a) subscribes to `@ticker`, (b) routes `24hrTicker`
to cryptofeed's own `_ticker` (which reads `s`, `b`, `a`, `E`, all present), (c) points the
endpoint at the local simulator (cryptofeed refuses non-`wss://` addresses, so that check is
bypassed) and (d) pre-fills its symbol table instead of calling Binance's REST API.

The simulator (`chrono-collector simulate binance --burst N`, a subprocess from the project
venv) sends N pre-encoded tickers when the connection opens. The callback only counts; the rate
is first to last callback. CPU is this process's (one asyncio loop, like the collector's one
process). Writes bench/results/peer_cryptofeed.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from cryptofeed import FeedHandler
from cryptofeed.connection import WebsocketEndpoint, WSAsyncConn
from cryptofeed.defines import BINANCE, TICKER
from cryptofeed.exchanges import Binance
from cryptofeed.symbols import Symbols

REPO = Path(__file__).resolve().parents[1]
PAIRS = {"BTC-USDT": "BTCUSDT", "ETH-USDT": "ETHUSDT", "SOL-USDT": "SOLUSDT",
         "XRP-USDT": "XRPUSDT", "DOGE-USDT": "DOGEUSDT"}

_orig_init = WSAsyncConn.__init__


def _init_allowing_ws(self: WSAsyncConn, address: str, conn_id: str, **kwargs: object) -> None:
    _orig_init(self, address.replace("ws://", "wss://", 1), conn_id, **kwargs)
    self.address = address  # loopback simulator: plain ws://


WSAsyncConn.__init__ = _init_allowing_ws  # type: ignore[method-assign]


def make_feed_class(url: str) -> type[Binance]:
    class LocalBinance(Binance):  # type: ignore[misc]
        websocket_endpoints = [WebsocketEndpoint(url)]
        websocket_channels = {**Binance.websocket_channels, TICKER: "ticker"}

        async def message_handler(self, msg: str, conn: object, timestamp: float) -> None:
            # Same as Binance.message_handler for the combined stream, plus 24hrTicker.
            doc = json.loads(msg, parse_float=__import__("decimal").Decimal)
            data = doc["data"]
            if data.get("e") == "24hrTicker":
                await self._ticker(data, timestamp)
            else:
                await super().message_handler(msg, conn, timestamp)

    return LocalBinance


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--records", type=int, default=60_000)
    parser.add_argument("--simulate", default=str(REPO / ".venv" / "bin" / "chrono-collector"))
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()

    sim = subprocess.Popen([args.simulate, "simulate", "binance", "--rate", "0.000001",
                            "--burst", str(args.records)], stdout=subprocess.PIPE, text=True)
    try:
        assert sim.stdout is not None
        doc = json.loads(sim.stdout.readline())
        url = f"ws://127.0.0.1:{doc['port']}"
        Symbols.set(BINANCE, dict(PAIRS), {"tick_size": {}, "instrument_type": {}})

        state = {"n": 0, "first": 0.0, "last": 0.0}
        fh = FeedHandler(config={"log": {"disabled": True}, "uvloop": False})

        async def on_ticker(ticker: object, receipt_timestamp: float) -> None:
            if state["n"] == 0:
                state["first"] = time.perf_counter()
            state["n"] += 1
            state["last"] = time.perf_counter()
            if state["n"] >= args.records:
                asyncio.get_event_loop().stop()

        feed_cls = make_feed_class(url)
        fh.add_feed(feed_cls(symbols=list(PAIRS), channels=[TICKER],
                             callbacks={TICKER: on_ticker}))
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        loop.call_later(args.timeout, loop.stop)  # bounded
        usage0 = resource.getrusage(resource.RUSAGE_SELF)
        fh.run(start_loop=False)
        loop.run_forever()
        usage1 = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        sim.terminate()
        sim.wait(10)
    n = int(state["n"])
    seconds = state["last"] - state["first"]
    cpu = (usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime)
    rate = n / seconds if seconds else 0.0
    text = (f"### Peer: cryptofeed 2.4.1, Binance `@ticker` (combined stream), callback only\n\n"
            f"{platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} "
            f"CPUs; asyncio loop (no uvloop), websockets, its own json.loads(parse_float="
            f"Decimal).\n\n| tickers | seen | msgs/s | CPU s/100k (incl. connect) | peak RSS MB |\n"
            f"| ---: | ---: | ---: | ---: | ---: |\n| {args.records:,} | {n:,} | {rate:,.0f} "
            f"| {cpu / max(n, 1) * 100_000:.2f} | {usage1.ru_maxrss / 1024:.1f} |\n")
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "peer_cryptofeed.md").write_text(text)
    print(text)
    return 0 if n >= args.records else 1


if __name__ == "__main__":
    sys.exit(main())
