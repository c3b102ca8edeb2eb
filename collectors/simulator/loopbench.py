"""Burst ceiling on loopback: simulator burst -> a bare websocket-client recv loop.

`python -m collectors.simulator.loopbench [--records N] [--exchange coinbase]` prints one JSON
line per measurement: websocket-client with and without UTF-8 validation (its pure-Python
validator is the usual bottleneck), and a raw socket that only drains bytes (the simulator's own
send rate). The burst is pre-encoded before its first byte is sent and timing starts at the first
burst message, so encoding is not measured.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time

import websocket

from collectors.simulator.core import Simulator
from collectors.simulator.wsserver import Opcode, encode_frame

_SUBSCRIBE = {
    "coinbase": ("", {"type": "subscribe", "product_ids": ["BTC-USD", "ETH-USD"],
                      "channels": ["ticker"]}, 3),
    "kraken": ("", {"method": "subscribe",
                    "params": {"channel": "ticker", "symbol": ["BTC/USD", "ETH/USD"]}}, 5),
    "binance": ("/stream", {"method": "SUBSCRIBE", "params": ["btcusdt@ticker", "ethusdt@ticker"],
                            "id": 1}, 1),
}


def _client_rate(sim: Simulator, exchange: str, records: int, skip_utf8: bool) -> float:
    suffix, request, preamble = _SUBSCRIBE[exchange]
    ws = websocket.create_connection(sim.url + suffix, timeout=60,
                                     skip_utf8_validation=skip_utf8)
    try:
        ws.send(json.dumps(request))
        for _ in range(preamble):  # ack(s), status, snapshots / initial tickers
            ws.recv()
        sim.burst(records)
        ws.recv()
        start = time.perf_counter()
        for _ in range(records - 1):
            ws.recv()
        return (records - 1) / (time.perf_counter() - start)
    finally:
        ws.close()


def _raw_rate(sim: Simulator, exchange: str, records: int) -> tuple[float, float]:
    suffix, request, _ = _SUBSCRIBE[exchange]
    path = (sim.url + suffix).split(str(sim.port), 1)[1] or "/"
    with socket.create_connection((sim.host, sim.port), timeout=60) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     "Sec-WebSocket-Version: 13\r\n\r\n".encode())
        sock.sendall(encode_frame(Opcode.TEXT, json.dumps(request).encode(), mask=b"mask"))
        # Only this connection, subscribed (the websocket-client ones may still be closing).
        if not sim.wait_for(lambda: sim.active_connections == 1
                            and all(sim.subscriptions().values()), 10):
            raise RuntimeError("the raw connection did not subscribe")
        sock.settimeout(0.5)
        try:
            while sock.recv(1 << 20):  # the 101 answer and the preamble
                pass
        except TimeoutError:
            pass
        base = sim.sent_count
        sim.burst(records)
        # Start the clock when the first pre-encoded batch is written (a heartbeat may come
        # before it while the burst is being encoded).
        if not sim.wait_for(lambda: sim.sent_count > base, 60):
            raise RuntimeError("the burst did not start")
        start = last = time.perf_counter()
        total = 0
        sock.settimeout(0.5)
        try:
            while chunk := sock.recv(1 << 20):
                total += len(chunk)
                last = time.perf_counter()
        except TimeoutError:
            pass
        elapsed = max(last - start, 1e-9)
        return (sim.sent_count - base) / elapsed, total / elapsed / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m collectors.simulator.loopbench")
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--exchange", choices=sorted(_SUBSCRIBE), default="coinbase")
    args = parser.parse_args(argv)
    with Simulator(args.exchange, rate_hz=1e-6, seed=1, keep_sent=0) as sim:
        for skip in (False, True):
            rate = _client_rate(sim, args.exchange, args.records, skip)
            print(json.dumps({"exchange": args.exchange, "records": args.records,
                              "reader": "websocket-client", "skip_utf8_validation": skip,
                              "msg_per_s": round(rate)}), flush=True)
        rate, mb_s = _raw_rate(sim, args.exchange, args.records)
        print(json.dumps({"exchange": args.exchange, "records": args.records,
                          "reader": "raw socket", "msg_per_s": round(rate),
                          "mb_per_s": round(mb_s, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
