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

Decoding is cryptofeed's own: the subclass's `message_handler` decodes with the very `json`
module cryptofeed's Binance feed imports (`from yapic import json`, i.e. yapic.json, with
`parse_float=Decimal`, as `Binance.message_handler` does), unwraps the combined stream the same
way, and hands each 24hrTicker to cryptofeed's own `_ticker`; any other message goes to
cryptofeed's own `Binance.message_handler` unchanged. (That handler cannot take the 24hrTicker
itself: it logs any `e` it does not know as unexpected.) The event loop is plain asyncio:
cryptofeed's default config turns uvloop on (installed with it), this bench turns it off
(`"uvloop": False`); the results header says so.

The simulator (`chrono-collector simulate binance --seed 1 --rate 0.000001 --burst N`, a
subprocess from the project venv) sends N pre-encoded tickers when the connection opens: the same
options as bench/throughput.py's in-process `Simulator("binance", rate_hz=1e-6, seed=1)` and the
same five streams in the same order, so the same frames (same prices, sizes, trade ids, same
length) except the wall-clock fields (`E`, `O`, `C`), which differ between any two runs. The
callback only counts; the rate is first to last callback. CPU is this process's (one asyncio
loop, like the collector's one process). Writes bench/results/peer_cryptofeed.md.

`--backend postgres` (needs `/tmp/cf-venv/bin/pip install asyncpg`) adds cryptofeed's own
storage: its `TickerPostgres` backend, which batches whatever its in-memory queue holds into one
INSERT, into a `ticker` table shaped like cryptofeed's examples/postgres_tables.sql in a
throwaway schema of the local PostgreSQL, plus a `stored_at` column (default clock_timestamp())
so the end-to-end rate is measured the way bench/throughput.py measures ours: first ticker
received to last row stored. Compare with `bench/throughput.py --venues binance --backend
postgres`. Writes bench/results/peer_cryptofeed_postgres.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cryptofeed import FeedHandler
from cryptofeed.connection import WebsocketEndpoint, WSAsyncConn
from cryptofeed.defines import BINANCE, TICKER
from cryptofeed.exchanges import Binance
from cryptofeed.exchanges import binance as cf_binance
from cryptofeed.symbols import Symbols

REPO = Path(__file__).resolve().parents[1]
SEED = 1  # bench/throughput.py's Simulator(..., seed=1)
START_TIMEOUT_S = 30.0  # the simulator's first line (bench/throughput.py's start deadline)
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
            # Binance.message_handler's own steps for the combined stream (its module's `json`,
            # yapic.json, with its Decimal; the stream split), plus the 24hrTicker route.
            doc = cf_binance.json.loads(msg, parse_float=cf_binance.Decimal)
            _pair = doc["stream"].split("@", 1)[0].upper()  # unused, as in Binance's handler
            data = doc["data"]
            if data.get("e") == "24hrTicker":
                await self._ticker(data, timestamp)
            else:
                await super().message_handler(msg, conn, timestamp)

    return LocalBinance


@contextmanager
def burst_simulator(args: argparse.Namespace) -> Iterator[str]:
    """`chrono-collector simulate binance --seed 1 --burst N` as a subprocess; yields its ws://
    URL, with cryptofeed's Binance symbol table pre-filled (instead of a REST call to Binance).
    Its listening line must come within START_TIMEOUT_S."""
    sim = subprocess.Popen([args.simulate, "simulate", "binance", "--rate", "0.000001",
                            "--seed", str(SEED), "--burst", str(args.records)],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert sim.stdout is not None
        ready, _, _ = select.select([sim.stdout], [], [], START_TIMEOUT_S)
        if not ready:
            raise RuntimeError(f"{args.simulate} simulate printed no listening line within "
                               f"{START_TIMEOUT_S:.0f} s")
        line = sim.stdout.readline()  # printed whole and flushed: a readable pipe has it all
        if not line:
            raise RuntimeError(f"{args.simulate} simulate exited (code {sim.wait(10)}) "
                               f"before printing its port")
        doc = json.loads(line)
        Symbols.set(BINANCE, dict(PAIRS), {"tick_size": {}, "instrument_type": {}})
        yield f"ws://127.0.0.1:{doc['port']}"
    finally:
        sim.terminate()
        sim.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--records", type=int, default=60_000)
    parser.add_argument("--simulate", default=str(REPO / ".venv" / "bin" / "chrono-collector"))
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--backend", choices=("none", "postgres"), default="none")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    if args.backend == "postgres":
        return run_postgres(args)

    with burst_simulator(args) as url:
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
    n = int(state["n"])
    seconds = state["last"] - state["first"]
    cpu = (usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime)
    rate = n / seconds if seconds else 0.0
    text = (f"### Peer: cryptofeed 2.4.1, Binance `@ticker` (combined stream), callback only\n\n"
            f"{platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} "
            f"CPUs; plain asyncio loop (uvloop off; cryptofeed's default config turns it on), "
            f"websockets, cryptofeed's own Binance decoding (yapic.json, parse_float=Decimal); "
            f"simulator seed {SEED} as bench/throughput.py (same frames but the clock fields)."
            f"\n\n| tickers | seen | msgs/s | CPU s/100k (incl. connect) | peak RSS MB |\n"
            f"| ---: | ---: | ---: | ---: | ---: |\n| {args.records:,} | {n:,} | {rate:,.0f} "
            f"| {cpu / max(n, 1) * 100_000:.2f} | {usage1.ru_maxrss / 1024:.1f} |\n")
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "peer_cryptofeed.md").write_text(text)
    print(text)
    return 0 if n >= args.records else 1


def run_postgres(args: argparse.Namespace) -> int:
    """The same bytes through cryptofeed's TickerPostgres backend into PostgreSQL."""
    import secrets

    import asyncpg
    from cryptofeed.backends.postgres import TickerPostgres

    schema = f"chrono_peer_{secrets.token_hex(4)}"

    async def admin(sql: str) -> object:
        conn = await asyncpg.connect(args.postgres)
        try:
            return await conn.execute(sql)  # simple protocol: several statements are fine
        finally:
            await conn.close()

    asyncio.run(admin(f"CREATE SCHEMA {schema}; CREATE TABLE {schema}.ticker ("
                      "id serial PRIMARY KEY, timestamp TIMESTAMP, receipt_timestamp TIMESTAMP,"
                      " exchange VARCHAR(32), symbol VARCHAR(32), bid NUMERIC(64, 32),"
                      " ask NUMERIC(64, 32), stored_at TIMESTAMPTZ DEFAULT clock_timestamp())"))
    with burst_simulator(args) as url:
        fh = FeedHandler(config={"log": {"disabled": True}, "uvloop": False})
        backend = TickerPostgres(host="127.0.0.1", user="postgres", db="test", port=5432,
                                 table=f"{schema}.ticker")
        fh.add_feed(make_feed_class(url)(symbols=list(PAIRS), channels=[TICKER],
                                         callbacks={TICKER: backend}))
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        counter: dict[str, object] = {"conn": None, "n": 0}

        async def watch() -> None:
            # Poll the table (nothing to wait on across processes), bounded by --timeout.
            conn = await asyncpg.connect(args.postgres)
            try:
                while True:
                    counter["n"] = await conn.fetchval(f"SELECT count(*) FROM {schema}.ticker")
                    if int(str(counter["n"])) >= args.records:
                        break
                    await asyncio.sleep(0.05)
            finally:
                await conn.close()
                loop.stop()

        loop.call_later(args.timeout, loop.stop)
        usage0 = resource.getrusage(resource.RUSAGE_SELF)
        fh.run(start_loop=False)
        watcher = loop.create_task(watch())
        loop.run_forever()
        watcher.cancel()
        usage1 = resource.getrusage(resource.RUSAGE_SELF)

    async def spans() -> list[object]:
        conn = await asyncpg.connect(args.postgres)
        try:
            row = await conn.fetchrow(
                f"SELECT count(*), extract(epoch from max(stored_at) - min(receipt_timestamp)"
                f" AT TIME ZONE 'UTC'), extract(epoch from max(receipt_timestamp)"
                f" - min(receipt_timestamp)) FROM {schema}.ticker")
            return list(row)
        finally:
            await conn.close()

    stored, e2e_s, recv_s = asyncio.run(spans())
    asyncio.run(admin(f"DROP SCHEMA {schema} CASCADE"))
    n = int(str(stored))
    e2e, recv = float(str(e2e_s or 0)), float(str(recv_s or 0))
    cpu = (usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime)
    text = (f"### Peer: cryptofeed 2.4.1, Binance `@ticker` -> its TickerPostgres backend -> "
            f"PostgreSQL\n\n{platform.python_implementation()} {platform.python_version()}, "
            f"{os.cpu_count()} CPUs; plain asyncio loop (uvloop off; cryptofeed's default "
            f"config turns it on), cryptofeed's own Binance decoding (yapic.json, "
            f"parse_float=Decimal), asyncpg, one multi-row INSERT per queue drain; the row holds "
            f"bid and ask only; simulator seed {SEED} as bench/throughput.py.\n\n"
            f"| tickers | stored | recv/s | stored/s (end to end) | end-to-end s "
            f"| CPU s/100k | peak RSS MB |\n| ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
            f"| {args.records:,} | {n:,} | {n / recv if recv else 0:,.0f} "
            f"| {n / e2e if e2e else 0:,.0f} | {e2e:.2f} | {cpu / max(n, 1) * 100_000:.2f} "
            f"| {usage1.ru_maxrss / 1024:.1f} |\n")
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "peer_cryptofeed_postgres.md").write_text(text)
    print(text)
    return 0 if n >= args.records else 1


if __name__ == "__main__":
    sys.exit(main())
