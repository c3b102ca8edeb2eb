"""Shared pieces of the collector benchmarks: an ingest server and a collector as subprocesses,
/proc readers for CPU and memory, percentiles, and writing a markdown table to stdout and to
bench/results/<name>.md.

Everything listens on 127.0.0.1 only; every wait here has a deadline.
"""

from __future__ import annotations

import json
import math
import os
import platform
import queue
import secrets
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from fractions import Fraction
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
API_KEY = "bench-key-" + secrets.token_hex(8)
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


# ---------------------------------------------------------------- /proc


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rpartition(")")[2].split()
    # after the command: state(0) ... utime is field 14 overall, i.e. index 11 here
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def threads(pid: int) -> dict[int, tuple[str, float]]:
    """(OS thread name, CPU seconds) of each thread of `pid`."""
    out: dict[int, tuple[str, float]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm", encoding="utf-8") as f:
                name = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/stat", encoding="ascii") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue  # the thread ended
        out[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / CLK_TCK)
    return out


def status_kb(pid: int, key: str) -> int:
    """A `VmRSS`/`VmHWM`-style line of /proc/<pid>/status, in KiB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{platform.python_implementation()} {platform.python_version()}, "
            f"{os.cpu_count()} CPUs ({model}), Linux {platform.release()}")


# ---------------------------------------------------------------- numbers


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100): the value of rank
    ceil(q/100 * n), clamped to 1..n (q taken as its decimal text, so 99.9 % of 1,000 is rank
    999, not 1,000 from float dust)."""
    if not sorted_values:
        return float("nan")
    n = len(sorted_values)
    rank = max(1, min(n, math.ceil(Fraction(str(q)) * n / 100)))
    return sorted_values[rank - 1]


def iso_to_ns(text: str) -> int:
    """`2026-11-29T10:00:00.123456Z` -> epoch ns (microsecond precision)."""
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return int(dt.timestamp()) * 1_000_000_000 + dt.microsecond * 1000


def write_results(name: str, text: str) -> Path:
    """Print `text` and store it as bench/results/<name>.md."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text(text)
    print(text, flush=True)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.02) -> bool:
    """Poll another process's state (rows, /proc): there is nothing to wait on across
    processes. Bounded by timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


# ---------------------------------------------------------------- ingest server


#: Where PostgreSQL runs on this kind of machine (override: CHRONO_TEST_POSTGRES_URL).
POSTGRES_URL = os.environ.get("CHRONO_TEST_POSTGRES_URL",
                              "postgresql://postgres@127.0.0.1:5432/test")


@contextmanager
def postgres_schema(base_url: str = POSTGRES_URL) -> Iterator[str]:
    """A throwaway schema: yields a DATABASE_URL whose search_path is it; dropped afterwards."""
    import psycopg  # only the PostgreSQL benchmarks need it

    schema = f"chrono_bench_{secrets.token_hex(4)}"
    with psycopg.connect(base_url, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")
        try:
            sep = "&" if "?" in base_url else "?"
            yield f"{base_url}{sep}options=-csearch_path%3D{schema}"
        finally:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


@dataclass
class Ingest:
    url: str
    db_path: Path
    pid: int
    database_url: str = ""  # a PostgreSQL URL when the ingest stores there, else SQLite

    def _query(self, sql: str) -> list[tuple[object, ...]]:
        if self.database_url.startswith("postgres"):
            import psycopg

            with psycopg.connect(self.database_url, connect_timeout=5) as conn:
                try:
                    return list(conn.execute(sql).fetchall())
                except psycopg.errors.UndefinedTable:
                    return []
        if not self.db_path.exists():
            return []
        conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=5)
        try:
            return conn.execute(sql).fetchall()
        except sqlite3.OperationalError:
            return []  # table not created yet
        finally:
            conn.close()

    def count(self) -> int:
        rows = self._query("SELECT COUNT(*) FROM price_feeds")
        return int(str(rows[0][0])) if rows else 0

    def times(self) -> list[tuple[int, int]]:
        """(collector receive ns, ingest store ns) of every stored record, in store order."""
        if self.database_url.startswith("postgres"):
            sql = ("SELECT metadata->>'received_at', (extract(epoch from received_at)"
                   " * 1e6)::bigint FROM price_feeds ORDER BY id")
            return [(iso_to_ns(str(a)), int(str(b)) * 1000) for a, b in self._query(sql)]
        sql = ("SELECT json_extract(metadata, '$.received_at'), received_at FROM price_feeds"
               " ORDER BY id")
        return [(iso_to_ns(str(a)), iso_to_ns(str(b))) for a, b in self._query(sql)]

    def rows(self, columns: str = "metadata, received_at") -> list[tuple[object, ...]]:
        return self._query(f"SELECT {columns} FROM price_feeds ORDER BY id")


@contextmanager
def ingest_process(tmp: Path, threads: int = 4, port: int = 0,
                   database_url: str | None = None) -> Iterator[Ingest]:
    """`python -m collectors.ingest` on 127.0.0.1 (port 0: any free) with a fresh SQLite file."""
    db_path = tmp / "ingest.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("API_KEY", "INGEST_"))}
    env.update({"API_KEY": API_KEY, "INGEST_PORT": str(port), "DATABASE_URL": database_url or f"sqlite:///{db_path}",
                "INGEST_THREADS": str(threads), "LOG_LEVEL": "info",
                "PYTHONPATH": str(REPO)})
    log = (tmp / "ingest.log").open("w")
    with subprocess.Popen([sys.executable, "-m", "collectors.ingest"], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        lines: queue.Queue[str] = queue.Queue()

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.put(line)
                log.write(line)

        reader = threading.Thread(target=pump, name="ingest-log", daemon=True)
        reader.start()
        try:
            deadline = time.monotonic() + 30
            url = None
            while url is None and time.monotonic() < deadline:
                try:
                    line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
                except queue.Empty:
                    break
                try:
                    doc = json.loads(line)
                except ValueError:
                    continue
                if doc.get("event") == "ingest_started":
                    url = str(doc["url"])
            if url is None:
                raise RuntimeError("ingest server did not start within 30 s")
            yield Ingest(url, db_path, proc.pid, database_url or "")
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)
            reader.join(10)
            log.close()


# ---------------------------------------------------------------- the bare loop

#: `python -c BARE_COINBASE_LOOP URL SECONDS [OUT]`: a bare websocket-client receive loop on the
#: Coinbase simulator's five default products that only `json.loads` each message, for
#: SECONDS; with OUT, it also writes [product, sequence, time_ns when recv() returned] of each
#: ticker there as JSON. What receiving alone costs, and how late, on this machine.
BARE_COINBASE_LOOP = r"""
import json, sys, time, websocket
url, seconds = sys.argv[1], float(sys.argv[2])
out_path = sys.argv[3] if len(sys.argv) > 3 else None
ws = websocket.create_connection(url, skip_utf8_validation=True, timeout=5)
ws.send(json.dumps({"type": "subscribe", "channels": ["ticker", "heartbeat"],
                    "product_ids": ["BTC-USD", "ETH-USD", "SOL-USD", "XRP-USD", "DOGE-USD"]}))
got = []
end = time.monotonic() + seconds
while time.monotonic() < end:
    raw = ws.recv()
    ns = time.time_ns()
    doc = json.loads(raw)
    if out_path and doc.get("type") == "ticker":
        got.append((doc["product_id"], doc["sequence"], ns))
ws.close()
if out_path:
    with open(out_path, "w") as f:
        json.dump(got, f)
"""


# ---------------------------------------------------------------- collector


@dataclass
class Collector:
    proc: subprocess.Popen[bytes]
    log_path: Path
    spool_dir: Path
    metrics_port: int

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout_s: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


@contextmanager
def collector_process(tmp: Path, exchange: str, ws_url: str, api_base_url: str, *,
                      argv: Sequence[str] | None = None, **env_over: str) -> Iterator[Collector]:
    """`chrono-collector run EXCHANGE` as a subprocess, configured like production except for
    the URLs and the paths (everything under tmp). Stopped with SIGTERM (flushes), killed if
    it does not exit within 20 s."""
    key_file = tmp / "api_key"
    key_file.write_text(API_KEY + "\n")
    key_file.chmod(0o400)
    port = free_port()
    spool = tmp / "spool"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(REPO),
        "API_BASE_URL": api_base_url,
        "API_KEY_FILE": str(key_file),
        "WS_URL": ws_url,
        "METRICS_PORT": str(port),
        "SPOOL_DIR": str(spool),
        "CHRONO_STATE_DIR": str(tmp / "state"),
        "LOG_LEVEL": "info",
        **env_over,
    }
    log_path = tmp / f"collector-{exchange}.log"
    cmd = list(argv) if argv else [sys.executable, "-m", "collectors", "run", exchange]
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                cwd=tmp)
    handle = Collector(proc, log_path, spool, port)
    try:
        yield handle
    finally:
        handle.stop()
