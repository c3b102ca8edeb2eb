"""The waitress server: start/stop in-process, and `python -m collectors.ingest` as a process."""

from __future__ import annotations

import errno
import json
import logging
import os
import queue
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
import requests

from collectors.ingest.config import IngestConfig
from collectors.ingest.server import start_server
from tests.support.servers import TEST_API_KEY, batch_body, make_feed, running_ingest

REPO = Path(__file__).resolve().parents[2]



def test_clients_that_hold_connections_open_do_not_lock_others_out(tmp_path: Path) -> None:
    # 150 connections that sent half a request and wait (waitress's default limit is 100):
    # the server still answers everyone else.
    cfg = IngestConfig(api_keys=(TEST_API_KEY,), database_url=f"sqlite:///{tmp_path}/i.db",
                       port=0, threads=2)
    server = start_server(cfg)
    held: list[socket.socket] = []
    try:
        for _ in range(150):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            sock.sendall(b"POST /internal/ingest HTTP/1.1\r\nHost: x\r\n")
            held.append(sock)
        with requests.Session() as http:
            assert http.get(server.url + "/healthz", timeout=10).json() == {"status": "ok"}
    finally:
        for sock in held:
            sock.close()
        server.stop()

def test_start_server_from_config_and_stop(tmp_path: Path) -> None:
    cfg = IngestConfig(api_keys=(TEST_API_KEY,), database_url=f"sqlite:///{tmp_path}/a/i.db",
                       port=0, threads=2)
    server = start_server(cfg)
    try:
        assert server.url == f"http://127.0.0.1:{server.port}"
        assert server.port > 0
        with requests.Session() as http:
            assert http.get(server.url + "/healthz", timeout=10).json() == {"status": "ok"}
            # keep-alive: this connection is still open when stop() runs
            response = http.post(server.url + "/internal/ingest", data=batch_body([make_feed()]),
                                 headers={"Authorization": f"Bearer {TEST_API_KEY}",
                                          "Content-Type": "application/json",
                                          "Idempotency-Key": "k"}, timeout=10)
            assert response.status_code == 201
            server.stop()
            assert not server.alive
            with pytest.raises(requests.ConnectionError):
                http.get(server.url + "/healthz", timeout=5)
    finally:
        server.stop()  # idempotent
    assert (tmp_path / "a" / "i.db").exists()


def test_stop_when_waitress_has_closed_its_trigger_already(tmp_path: Path) -> None:
    # waitress closes the loop's wake-up pipe with a listener that failed; stop() then cannot
    # wake the loop (CI once saw EBADF from it at a test's teardown) and must still stop it.
    cfg = IngestConfig(api_keys=(TEST_API_KEY,), database_url=f"sqlite:///{tmp_path}/i.db",
                       port=0, threads=2)
    server = start_server(cfg)
    try:
        with requests.Session() as http:
            assert http.get(server.url + "/healthz", timeout=10).status_code == 200
            server._server.trigger.close()  # one listener: waitress's plain WSGI server
            server.stop(timeout_s=5)
            assert not server.alive
            with pytest.raises(requests.ConnectionError):
                http.get(server.url + "/healthz", timeout=5)
    finally:
        server.stop()


def test_stop_lets_a_request_in_progress_finish(tmp_path: Path) -> None:
    with running_ingest(tmp_path) as ingest:
        ingest.faults.hang(30)
        results: list[int] = []

        def send() -> None:
            with requests.Session() as own:
                results.append(own.post(ingest.ingest_url, data=batch_body([make_feed()]),
                                        headers=ingest.headers(), timeout=30).status_code)

        sender = threading.Thread(target=send)
        sender.start()
        assert ingest.faults.wait_for_requests(1)
        stopper = threading.Thread(target=ingest.server.stop)
        stopper.start()
        ingest.faults.release()
        stopper.join(30)
        sender.join(30)
        assert results == [201]
        assert not ingest.server.alive


def test_waitress_level_errors_are_problem_json(tmp_path: Path) -> None:
    with running_ingest(tmp_path, max_body_bytes=2048) as ingest, requests.Session() as http:
        big = http.post(ingest.ingest_url, data=b"x" * 4096, headers=ingest.headers(), timeout=10)
        assert big.status_code == 413
        assert big.headers["Content-Type"] == "application/problem+json"
        assert "2048" in big.json()["detail"]
        bad_header = http.post(ingest.ingest_url, data=b"{}",
                               headers={**ingest.headers(), "X-Bad": "a\x7fb"}, timeout=10)
        assert bad_header.status_code == 400
        assert bad_header.headers["Content-Type"] == "application/problem+json"
        assert bad_header.headers["Server"] == "chrono-ingest"


def _raw_request(port: int, request: bytes) -> tuple[bytes, bytes]:
    """Send `request` as is; return the status line and the body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0], body


@pytest.mark.parametrize("header_block", [
    # a bare LF inside the Authorization line: waitress quoted the whole line, key included
    b"Authorization: Bearer @KEY@\nX-Other: 1\r\n",
    # a continuation line first: quoted as well
    b" Authorization: Bearer @KEY@\r\n",
])
def test_waitress_parse_errors_never_echo_header_content(tmp_path: Path,
                                                         header_block: bytes) -> None:
    with running_ingest(tmp_path) as ingest:
        key = ingest.key.encode()
        request = (b"POST /internal/ingest HTTP/1.1\r\n" + header_block.replace(b"@KEY@", key)
                   + b"Host: x\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
                   b"Connection: close\r\n\r\n{}")
        status, body = _raw_request(ingest.server.port, request)
    assert status.split(b" ")[1] == b"400", status
    doc = json.loads(body)
    assert doc["status"] == 400 and doc["detail"] == "malformed HTTP request"
    assert key not in body and b"Bearer" not in body and b"Authorization" not in body


def test_bind_failure_is_oserror(tmp_path: Path) -> None:
    with running_ingest(tmp_path) as ingest:
        cfg = IngestConfig(api_keys=(TEST_API_KEY,), database_url=f"sqlite:///{tmp_path}/b.db",
                           port=ingest.server.port)
        with pytest.raises(OSError):
            start_server(cfg)


# --- the process ------------------------------------------------------------------------------


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("API_KEY", "INGEST_", "DATABASE_URL", "LOG_LEVEL"))}
    env.update({"API_KEY": TEST_API_KEY, "INGEST_PORT": "0",
                "DATABASE_URL": f"sqlite:///{tmp_path}/state/ingest.db", "LOG_LEVEL": "debug",
                "PYTHONPATH": str(REPO)})
    env.update(extra)
    return env


@contextmanager
def ingest_process(env: dict[str, str], *args: str) -> Iterator[
        tuple[subprocess.Popen[str], queue.Queue[str]]]:
    with subprocess.Popen([sys.executable, "-m", "collectors.ingest", *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        lines: queue.Queue[str] = queue.Queue()

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.put(line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            yield proc, lines
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)
            reader.join(10)


def _wait_for_event(lines: queue.Queue[str], event: str, seen: list[str]) -> dict[str, object]:
    while True:
        line = lines.get(timeout=30)
        seen.append(line)
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if doc.get("event") == event:
            return dict(doc)


def test_process_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    seen: list[str] = []
    with ingest_process(_env(tmp_path)) as (proc, lines):
        started = _wait_for_event(lines, "ingest_started", seen)
        url = str(started["url"])
        with requests.Session() as http:
            auth = {"Authorization": f"Bearer {TEST_API_KEY}",
                    "Content-Type": "application/json"}
            ok = http.post(url + "/internal/ingest", data=batch_body([make_feed()]),
                           headers={**auth, "Idempotency-Key": "proc-1"}, timeout=10)
            assert ok.status_code == 201
            bad = http.post(url + "/internal/ingest", data=batch_body([make_feed()]),
                            headers={**auth, "Authorization": "Bearer wrong-PRESENTED-key",
                                     "Idempotency-Key": "proc-2"}, timeout=10)
            assert bad.status_code == 401
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        _wait_for_event(lines, "ingest_stopped", seen)
    text = "".join(seen)
    assert TEST_API_KEY not in text
    assert "wrong-PRESENTED-key" not in text
    assert '"auth_failed"' in text
    assert all(json.loads(line) for line in seen)  # every line is JSON
    conn = sqlite3.connect(tmp_path / "state" / "ingest.db")
    try:
        assert conn.execute("SELECT COUNT(*) FROM price_feeds").fetchone() == (1,)
    finally:
        conn.close()


def test_process_stops_on_sigint(tmp_path: Path) -> None:
    seen: list[str] = []
    with ingest_process(_env(tmp_path)) as (proc, lines):
        _wait_for_event(lines, "ingest_started", seen)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0


@pytest.mark.parametrize(("extra", "variable"), [
    ({"INGEST_PORT": "http"}, "INGEST_PORT"),
    ({"API_KEY": ""}, "API_KEY"),
    ({"DATABASE_URL": "mysql://nope"}, "DATABASE_URL"),
])
def test_process_config_error_exits_2(tmp_path: Path, extra: dict[str, str],
                                      variable: str) -> None:
    result = subprocess.run([sys.executable, "-m", "collectors.ingest"], cwd=REPO,
                            env=_env(tmp_path, **extra), capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert variable in lines[0]


def test_a_database_path_that_cannot_be_used_is_a_configuration_error(tmp_path: Path) -> None:
    # It exited 1 with a JSON log line: supervisord restarted it into the same failure, and
    # the line did not name the setting to fix (the collector's SPOOL_DIR says so, exit 2).
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = subprocess.run([sys.executable, "-m", "collectors.ingest"], cwd=REPO,
                            env=_env(tmp_path, DATABASE_URL=f"sqlite:///{blocker}/x/i.db"),
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("chrono-collector ingest: DATABASE_URL: ") and "cannot create" in line


def test_a_database_down_at_start_is_waited_for_not_exited_on(tmp_path: Path) -> None:
    # It exited 1 at once, and supervisord gave up on it (FATAL) within seconds: nothing was
    # stored until someone restarted it by hand. PostgreSQL is "down" behind a relay on
    # 127.0.0.1 that hangs up on every connection until it is let through to the real server.
    from tests.support.postgres import postgres_schema

    up = threading.Event()
    with postgres_schema() as url, _relay_to_postgres(url, up) as relayed:
        env = _env(tmp_path, DATABASE_URL=relayed)
        seen: list[str] = []
        with ingest_process(env) as (proc, lines):
            waiting = _wait_for_event(lines, "storage_unavailable", seen)
            assert waiting["retry_in_s"] and proc.poll() is None
            up.set()
            started = _wait_for_event(lines, "ingest_started", seen)
            with requests.Session() as http:
                ok = http.post(str(started["url"]) + "/internal/ingest",
                               data=batch_body([make_feed()]),
                               headers={"Authorization": f"Bearer {TEST_API_KEY}",
                                        "Content-Type": "application/json",
                                        "Idempotency-Key": "after-the-wait"}, timeout=10)
            assert ok.status_code == 201
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0


def test_a_database_that_does_not_exist_is_a_configuration_error(tmp_path: Path) -> None:
    # (not waited for: no restart of the server brings a database into being)
    from tests.support.postgres import postgres_schema

    with postgres_schema() as url:  # the server is up (else skipped, or failed under CI)
        missing = url.split("?", 1)[0].rsplit("/", 1)[0] + "/chrono_no_such_database"
        result = subprocess.run([sys.executable, "-m", "collectors.ingest"], cwd=REPO,
                                env=_env(tmp_path, DATABASE_URL=missing),
                                capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2, result
    [line] = result.stderr.strip().splitlines()
    assert "DATABASE_URL" in line and "chrono_no_such_database" in line


def test_which_postgresql_failures_at_start_are_waited_for() -> None:
    # libpq reports connect-time failures as text without a SQLSTATE: only those that may
    # pass by themselves are waited for; a refused role or SSL the server lacks need a person
    # (they looped on storage_unavailable for ever).
    import psycopg

    from collectors.ingest.storage.postgres import _transient
    from tests.support.postgres import postgres_schema

    def verdict(url: str) -> bool:
        try:
            psycopg.connect(url, connect_timeout=3).close()
        except psycopg.Error as exc:
            return _transient(exc)
        raise AssertionError(f"{url} connected")

    with postgres_schema() as url:  # the server is up (else skipped, or failed under CI)
        base = url.split("?", 1)[0]
        server = base.split("@", 1)[1].split("/", 1)[0]
        with socket.socket() as probe:  # a port nothing listens on
            probe.bind(("127.0.0.1", 0))
            closed = probe.getsockname()[1]
        assert verdict(f"postgresql://postgres@127.0.0.1:{closed}/test") is True
        assert verdict(f"postgresql://chrono_no_such_role@{server}/test") is False
        assert verdict(base + "?sslmode=require") is False


@contextmanager
def _relay_to_postgres(url: str, up: threading.Event) -> Iterator[str]:
    """`url` through a relay on 127.0.0.1: hangs up on each connection until `up` is set, then
    pipes each one to the real server."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    target = (parts.hostname or "127.0.0.1", parts.port or 5432)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    opened: list[socket.socket] = []
    threads: list[threading.Thread] = []

    def pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def serve() -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            if not up.is_set():
                client.close()  # "server closed the connection unexpectedly"
                continue
            server = socket.create_connection(target)
            opened.extend((client, server))
            for a, b in ((client, server), (server, client)):
                threads.append(threading.Thread(target=pipe, args=(a, b), daemon=True))
                threads[-1].start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        netloc = parts.netloc.rsplit("@", 1)
        host = f"127.0.0.1:{port}"
        yield urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2
                                        else host))
    finally:
        listener.close()
        thread.join(5)
        for s in opened:
            with suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for t in threads:
            t.join(5)
        for s in opened:
            s.close()


def test_process_migrate(tmp_path: Path) -> None:
    env = _env(tmp_path, API_KEY="")  # migrate needs no key
    result = subprocess.run([sys.executable, "-m", "collectors.ingest", "migrate"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert '"migrations_applied"' in result.stdout
    conn = sqlite3.connect(tmp_path / "state" / "ingest.db")
    try:
        assert conn.execute("PRAGMA user_version").fetchone() == (1,)
    finally:
        conn.close()


def test_help_lists_the_environment() -> None:
    result = subprocess.run([sys.executable, "-m", "collectors.ingest", "--help"], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0
    assert "DATABASE_URL" in result.stdout
    assert "migrate" in result.stdout


def test_a_port_in_use_is_one_line_naming_ingest_port_and_exit_2(tmp_path: Path) -> None:
    # It was a JSON `listen_failed` log line and exit 1; the collector says METRICS_PORT the
    # same way: configuration, exit 2, one line on stderr.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "collectors", "ingest"], cwd=REPO,
                                env=_env(tmp_path, INGEST_HOST="127.0.0.1",
                                         INGEST_PORT=str(port)),
                                capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "INGEST_PORT" in lines[0] and str(port) in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_a_host_waitress_cannot_use_is_one_line_naming_ingest_host_and_exit_2(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    # INGEST_HOST=nosuch.invalid (or 999.1.1.1) printed a 38-line traceback ending in
    # waitress's `ValueError: Invalid host/port specified.` (its name lookup is simulated: no
    # DNS in tests).
    from collectors.ingest import server

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise ValueError("Invalid host/port specified.")

    monkeypatch.setattr(server, "start_server", refuse)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        code = server.serve(_env(tmp_path, INGEST_HOST="nosuch.invalid"),
                            stop=threading.Event())
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "INGEST_HOST" in lines[0] and "nosuch.invalid" in lines[0], lines


@pytest.mark.parametrize(("error", "variable"), [
    (OSError(errno.EADDRINUSE, "Address already in use"), "INGEST_PORT"),
    (OSError(errno.EACCES, "Permission denied"), "INGEST_PORT"),
    (OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address"), "INGEST_HOST"),
    (socket.gaierror(-2, "Name or service not known"), "INGEST_HOST"),
    (ValueError("Invalid host/port specified."), "INGEST_HOST"),
])
def test_listen_errors_name_the_variable_to_fix(error: OSError | ValueError,
                                                 variable: str) -> None:
    from collectors.ingest.server import _listen_error

    config = IngestConfig(api_keys=(TEST_API_KEY,), database_url="sqlite:///x.db",
                          host="h.example", port=3000)
    assert _listen_error(config, error).variable == variable


def test_process_drains_and_exits_0_on_sighup(tmp_path: Path) -> None:
    seen: list[str] = []
    with ingest_process(_env(tmp_path)) as (proc, lines):
        _wait_for_event(lines, "ingest_started", seen)
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(30) == 0
        _wait_for_event(lines, "ingest_stopped", seen)


def test_an_unbounded_key_file_is_refused_not_read_whole(tmp_path: Path) -> None:
    # API_KEY_FILE=/dev/zero ended in MemoryError.
    result = subprocess.run([sys.executable, "-m", "collectors", "ingest"], cwd=REPO,
                            env=_env(tmp_path, API_KEY="", API_KEY_FILE="/dev/zero"),
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "API_KEY_FILE" in lines[0] and "larger than" in lines[0], lines
