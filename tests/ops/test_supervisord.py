"""supervisord.conf for real: supervisord from the venv runs the ingest API, the simulator and
the four collectors from a temporary copy of the config (own ports, own var/), so the checkout's
var/ and a running `make demo` are never touched."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import time
import xmlrpc.client
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.ops.helpers import ROOT, VENV_BIN, free_port_range
from tests.support.waiting import free_port, wait_until

EXCHANGES = ("coinbase", "binance", "binanceus", "kraken")
DEFAULT_METRICS = {"coinbase": 9101, "binance": 9102, "binanceus": 9103, "kraken": 9104}

pytestmark = pytest.mark.slow


@dataclass
class Stack:
    here: Path
    conf: Path
    proc: subprocess.Popen[bytes]
    metrics_ports: dict[str, int]
    sim_base: int

    def ctl(self, *args: str, timeout: float = 40) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(VENV_BIN / "supervisorctl"), "-c", str(self.conf), *args],
                              capture_output=True, text=True, timeout=timeout, check=False)

    def rpc(self) -> Any:
        from supervisor.xmlrpc import SupervisorTransport

        transport = SupervisorTransport(None, None, f"unix://{self.here}/var/run/supervisor.sock")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    def info(self, name: str) -> dict[str, Any]:
        proxy = self.rpc()
        try:
            return dict(proxy.supervisor.getProcessInfo(name))
        finally:
            proxy("close")()

    def log(self) -> str:
        return (self.here / "var" / "log" / "supervisord.log").read_text(errors="replace")

    def all_running(self) -> bool:
        try:
            proxy = self.rpc()
        except OSError:
            return False
        try:
            infos = proxy.supervisor.getAllProcessInfo()
        except OSError:  # the control socket is not there yet
            return False
        finally:
            proxy("close")()
        return len(infos) == 6 and all(i["statename"] == "RUNNING" for i in infos)


def make_config(here: Path, ingest_port: int, sim_base: int,
                metrics_ports: dict[str, int]) -> Path:
    """supervisord.conf with this test's ports; %(here)s is `here`, whose .venv links to ours."""
    text = (ROOT / "supervisord.conf").read_text()
    replacements = [
        ('API_BASE_URL="http://127.0.0.1:3000"', f'API_BASE_URL="http://127.0.0.1:{ingest_port}"'),
        ('INGEST_PORT="3000"', f'INGEST_PORT="{ingest_port}"'),
        ("--port 9201", f"--port {sim_base}"),
        # deliver every 200 ms so rows reach the store quickly
        ('CHRONO_STATE_DIR="%(here)s/var"', 'CHRONO_STATE_DIR="%(here)s/var",\n'
                                              '    BATCH_INTERVAL_MS="200"'),
    ] + [(f'METRICS_PORT="{DEFAULT_METRICS[ex]}"', f'METRICS_PORT="{metrics_ports[ex]}"')
         for ex in EXCHANGES]
    for old, new in replacements:
        assert text.count(old) == 1, f"supervisord.conf no longer contains {old!r} once"
        text = text.replace(old, new)
    conf = here / "supervisord.conf"
    conf.write_text(text)
    return conf


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    here = tmp_path / "chrono"
    (here / "var" / "secrets").mkdir(parents=True, mode=0o700)
    for sub in ("run", "log"):
        (here / "var" / sub).mkdir(mode=0o700)
    (here / ".venv").symlink_to(ROOT / ".venv")
    key = here / "var" / "secrets" / "api_key"
    key.write_text("ops-test-key-0123456789abcdef\n")
    key.chmod(0o400)
    ingest_port = free_port()
    sim_base = free_port_range(4)
    metrics_ports = {ex: free_port() for ex in EXCHANGES}
    conf = make_config(here, ingest_port, sim_base, metrics_ports)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "CHRONO_DEMO": "true",
        "CHRONO_COINBASE_WS_URL": f"ws://127.0.0.1:{sim_base}",
        "CHRONO_BINANCE_WS_URL": f"ws://127.0.0.1:{sim_base + 1}",
        "CHRONO_BINANCEUS_WS_URL": f"ws://127.0.0.1:{sim_base + 2}",
        "CHRONO_KRAKEN_WS_URL": f"ws://127.0.0.1:{sim_base + 3}/v2",
    }
    with (tmp_path / "supervisord.out").open("wb") as out:
        proc = subprocess.Popen([str(VENV_BIN / "supervisord"), "-n", "-c", str(conf)],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=here)
    st = Stack(here, conf, proc, metrics_ports, sim_base)
    try:
        yield st
    finally:
        if proc.poll() is None:
            st.ctl("shutdown", timeout=60)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def rows_by_source(db: Path) -> dict[str, int]:
    if not db.exists():
        return {}
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {str(s): int(n) for s, n in conn.execute(
            "SELECT source, COUNT(*) FROM price_feeds GROUP BY source")}
    except sqlite3.OperationalError:  # table not created yet
        return {}
    finally:
        conn.close()


def test_supervisord_runs_stops_restarts_the_collectors(stack: Stack) -> None:
    assert wait_until(lambda: stack.proc.poll() is not None or stack.all_running(), 20, 0.2), \
        stack.ctl("status").stdout + stack.log()
    status = stack.ctl("status")
    assert status.returncode == 0, status.stdout
    for name in ("ingest", "simulator", *EXCHANGES):
        assert re.search(rf"^{re.escape(name)}\s+RUNNING", status.stdout, re.M), status.stdout

    # `chrono-collector status --json` sees every collector, connected and healthy.
    endpoints = [arg for ex, port in stack.metrics_ports.items()
                 for arg in ("--endpoint", f"{ex}=http://127.0.0.1:{port}")]
    res = subprocess.run([str(VENV_BIN / "chrono-collector"), "status", "-c", str(stack.conf),
                          "--json", "--wait", "15", *endpoints],
                         capture_output=True, text=True, timeout=30, check=False)
    report = json.loads(res.stdout)
    by_name = {row["exchange"]: row for row in report["collectors"]}
    assert sorted(by_name) == sorted(EXCHANGES), res.stdout
    for ex in EXCHANGES:
        assert by_name[ex]["process"] == "RUNNING", res.stdout
        assert by_name[ex]["connected"] is True, res.stdout
    assert report["ok"] is True and res.returncode == 0, res.stdout

    # A clean stop: SIGTERM, the collector flushes and exits 0 long before stopwaitsecs=30.
    started = time.monotonic()
    stop = stack.ctl("stop", "coinbase")
    took = time.monotonic() - started
    assert stop.returncode == 0 and "stopped" in stop.stdout, stop.stdout + stop.stderr
    assert took < 15, f"stop took {took:.1f}s"
    info = stack.info("coinbase")
    assert info["statename"] == "STOPPED" and info["exitstatus"] == 0, info
    assert "stopped: coinbase (exit status 0)" in stack.log()
    assert "SIGKILL" not in stack.log()

    start = stack.ctl("start", "coinbase")
    assert start.returncode == 0 and "started" in start.stdout, start.stdout + start.stderr
    assert stack.info("coinbase")["statename"] == "RUNNING"

    # A crash (SIGKILL) is unexpected: supervisord starts the collector again.
    old_pid = int(stack.info("kraken")["pid"])
    os.kill(old_pid, signal.SIGKILL)

    def restarted() -> bool:
        info = stack.info("kraken")
        return info["statename"] == "RUNNING" and int(info["pid"]) not in (0, old_pid)

    assert wait_until(restarted, 15, 0.2), stack.info("kraken")
    assert "exited: kraken (terminated by SIGKILL; not expected)" in stack.log()

    # Rows from every venue reached the SQLite store of the ingest API.
    db = stack.here / "var" / "ingest.db"
    assert wait_until(lambda: set(rows_by_source(db)) >= set(EXCHANGES), 15, 0.2), \
        rows_by_source(db)
