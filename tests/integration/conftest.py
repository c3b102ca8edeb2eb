"""Real processes over real sockets: simulator (in this process) -> `chrono-collector run`
(a subprocess) -> ingest server (in this process) -> SQLite."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from collectors.simulator import Simulator
from tests.support.servers import IngestServer, running_ingest
from tests.support.waiting import free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class CollectorProcess:
    proc: subprocess.Popen[bytes]
    log_path: Path
    metrics_port: int
    spool_dir: Path
    env: dict[str, str] = field(default_factory=dict)

    def log_lines(self) -> list[dict[str, object]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                obj = json.loads(line)
            except ValueError:
                out.append({"event": "<non-json>", "line": line})
                continue
            out.append(obj if isinstance(obj, dict) else {"event": "<non-object>"})
        return out

    def events(self, name: str) -> list[dict[str, object]]:
        return [line for line in self.log_lines() if line.get("event") == name]

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                    timeout=2) as resp:
            return str(resp.read().decode())

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels` (0 when absent)."""
        total = 0.0
        for line in self.metrics_text().splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            head, _, value = line.rpartition(" ")
            metric_name = head.split("{", 1)[0]
            if metric_name != name:
                continue
            if all(f'{k}="{v}"' in head for k, v in labels.items()):
                total += float(value)
        return total

    def stop(self, timeout_s: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)


@contextmanager
def collector_process(tmp_path: Path, ws_url: str, api_base_url: str, api_key: str,
                      name: str = "collector", exchange: str = "coinbase",
                      **env_over: str) -> Iterator[CollectorProcess]:
    key_file = tmp_path / "api_key"
    key_file.write_text(api_key + "\n")
    key_file.chmod(0o400)
    port = free_port()
    spool = tmp_path / "spool"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(ROOT),
        "API_BASE_URL": api_base_url,
        "API_KEY_FILE": str(key_file),
        "WS_URL": ws_url,
        "METRICS_PORT": str(port),
        "SPOOL_DIR": str(spool),
        "CHRONO_STATE_DIR": str(tmp_path / "state"),
        "BATCH_INTERVAL_MS": "100",
        "LOG_LEVEL": "info",
        **env_over,
    }
    log_path = tmp_path / f"{name}.log"
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "collectors", "run", exchange],
                                stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    handle = CollectorProcess(proc, log_path, port, spool, env)
    try:
        assert wait_until(lambda: _metrics_up(port) or proc.poll() is not None, 15), \
            "collector did not start"
        assert proc.poll() is None, log_path.read_text()
        yield handle
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def _metrics_up(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=0.5):
            return True
    except OSError:
        return False


def stored_rows(ingest: IngestServer) -> list[dict[str, object]]:
    assert ingest.db_path is not None
    conn = sqlite3.connect(f"file:{ingest.db_path}?mode=ro", uri=True)
    try:
        conn.row_factory = sqlite3.Row
        rows = conn.execute("SELECT symbol, price, volume, timestamp, source, worker_id, "
                            "metadata FROM price_feeds ORDER BY id").fetchall()
    finally:
        conn.close()
    out = []
    for row in rows:
        d = dict(row)
        d["metadata"] = json.loads(str(d["metadata"]))
        out.append(d)
    return out


def stored_count(ingest: IngestServer) -> int:
    assert ingest.db_path is not None
    if not ingest.db_path.exists():
        return 0
    conn = sqlite3.connect(f"file:{ingest.db_path}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM price_feeds").fetchone()[0])
    finally:
        conn.close()


@pytest.fixture
def ingest(tmp_path: Path) -> Iterator[IngestServer]:
    with running_ingest(tmp_path) as server:
        yield server


@pytest.fixture
def coinbase_sim() -> Iterator[Simulator]:
    with Simulator("coinbase", rate_hz=20, seed=7) as sim:
        yield sim
