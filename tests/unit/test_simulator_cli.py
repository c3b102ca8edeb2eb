"""`simulate` command: startup lines, SIGTERM exit 0, argument errors exit 2."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from collectors.simulator.cli import add_arguments, main
from tests.unit.test_simulator_support import client

ROOT = Path(__file__).resolve().parents[2]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def start(*argv: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "collectors.simulator", *argv], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_arguments_and_defaults() -> None:
    args = parse(["coinbase", "kraken", "--port", "9000", "--rate", "0", "--burst", "10"])
    assert args.exchanges == ["coinbase", "kraken"]
    assert (args.host, args.port, args.rate, args.seed, args.record, args.burst) == (
        "127.0.0.1", 9000, 0.0, 0, None, 10)


@pytest.mark.parametrize(("argv", "message"), [
    (["coinbase", "ftx"], "unknown exchange ftx; known: binance, binanceus, coinbase, kraken"),
    (["coinbase", "--host", "0.0.0.0"], "not a loopback address"),
    (["coinbase", "--rate", "-1"], "--rate"),
    (["coinbase", "--burst", "-1"], "--burst"),
    (["coinbase", "kraken", "--port", "65535"], "--port"),
])
def test_bad_arguments_exit_2(argv: list[str], message: str,
                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(parse(argv)) == 2
    assert message in capsys.readouterr().err


def test_runs_until_sigterm_and_prints_one_line_per_venue(tmp_path: Path) -> None:
    record = tmp_path / "ticks.jsonl"
    proc = start("coinbase", "kraken", "--rate", "20", "--seed", "4", "--record", str(record))
    try:
        assert proc.stdout is not None
        lines = [json.loads(proc.stdout.readline()) for _ in range(2)]
        assert [line["exchange"] for line in lines] == ["coinbase", "kraken"]
        assert all(line["event"] == "simulator_listening" for line in lines)
        assert lines[0]["url"] == f"ws://127.0.0.1:{lines[0]['port']}"
        assert lines[1]["url"] == f"ws://127.0.0.1:{lines[1]['port']}/v2"
        with client(lines[0]["url"]) as c:
            c.send({"type": "subscribe", "product_ids": ["BTC-USD"], "channels": ["ticker"]})
            c.recv_json()
            tickers = c.recv_n(3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    recorded = [json.loads(x) for x in (tmp_path / "ticks.coinbase.jsonl").read_text().split(
        "\n") if x]
    assert recorded[:3] == tickers


def test_sigint_also_exits_0_and_unknown_exchange_exits_2() -> None:
    proc = start("binance", "--port", "0")
    try:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["exchange"] == "binance"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.communicate()
    bad = start("bitmex")
    _, err = bad.communicate(timeout=30)
    assert bad.returncode == 2
    assert "known: binance, binanceus, coinbase, kraken" in err


def test_a_port_in_use_is_a_configuration_error() -> None:
    # (it exited 1, where `run` and `ingest` exit 2 for a port they cannot listen on)
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        proc = start("coinbase", "--port", str(taken.getsockname()[1]))
        _, err = proc.communicate(timeout=30)
    finally:
        taken.close()
    assert proc.returncode == 2
    [line] = err.strip().splitlines()
    assert "--port" in line and "coinbase" in line


def test_loopbench_reports_three_rates(capsys: pytest.CaptureFixture[str]) -> None:
    from collectors.simulator import loopbench

    assert loopbench.main(["--records", "300"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(x["reader"], x.get("skip_utf8_validation")) for x in lines] == [
        ("websocket-client", False), ("websocket-client", True), ("raw socket", None)]
    assert all(x["msg_per_s"] > 0 for x in lines)
