"""`chrono-collector status` against a supervisord that does not answer: it must not hang."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from collectors.status import fetch_health, supervisor_processes


def test_a_supervisord_that_accepts_and_never_answers_times_out(tmp_path: Path) -> None:
    path = tmp_path / "supervisor.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    accepted: list[socket.socket] = []
    thread = threading.Thread(target=lambda: accepted.append(server.accept()[0]), daemon=True)
    thread.start()
    conf = tmp_path / "supervisord.conf"
    conf.write_text(f"[supervisorctl]\nserverurl=unix://{path}\n")
    try:
        started = time.monotonic()
        with pytest.raises(OSError):  # TimeoutError
            supervisor_processes(conf, timeout=0.5)
        assert time.monotonic() - started < 5
        assert accepted  # it did connect: the read timed out
    finally:
        for sock in accepted:
            sock.close()
        server.close()


def test_no_supervisord_socket_is_an_os_error(tmp_path: Path) -> None:
    conf = tmp_path / "supervisord.conf"
    conf.write_text(f"[supervisorctl]\nserverurl=unix://{tmp_path}/missing.sock\n")
    with pytest.raises(OSError):
        supervisor_processes(conf, timeout=0.5)


@pytest.mark.parametrize("args", [["--timeout", "0"], ["--timeout", "nan"], ["--timeout", "inf"],
                                  ["--wait", "-1"],
                                  ["--endpoint", "coinbase"],
                                  # http.client.InvalidURL from every request: a traceback
                                  ["--endpoint", "coinbase=http://127.0.0.1:abc"],
                                  ["--endpoint", "coinbase=http://127.0.0.1:0"],
                                  ["--endpoint", "coinbase=http://127.0.0.1:70000"],
                                  ["--endpoint", "coinbase=http://:9101"]])
def test_bad_arguments_are_one_line_on_stderr_and_exit_2(args: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", "collectors", "status", "--no-supervisor",
                             *args], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2, result
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


@contextlib.contextmanager
def healthz(doc: dict[str, object], code: int = 200) -> Iterator[ThreadingHTTPServer]:
    """A /healthz on 127.0.0.1 answering `doc` with `code` to every GET, for the `with`."""
    body = json.dumps(doc).encode()

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_without_supervisord_only_the_endpoints_given_are_checked() -> None:
    # A systemd host running only Kraken (deploy/install.sh kraken checks it this way): the
    # venues not named are not reported down.
    with healthz({"status": "ok", "connected": True, "last_message_age_s": 0.5}) as httpd:
        result = subprocess.run(
            [sys.executable, "-m", "collectors", "status", "--no-supervisor", "--json",
             "--endpoint", f"kraken=http://127.0.0.1:{httpd.server_port}"],
            capture_output=True, text=True, timeout=30, check=False)
    assert "kraken" in result.stdout
    for other in ("coinbase", "binance"):
        assert f'"{other}"' not in result.stdout, result.stdout


def _answer_garbage_once(server: socket.socket) -> threading.Thread:
    """Listen on the bound `server` and answer its first connection with no HTTP at all."""
    server.listen(1)

    def garbage() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"NOT HTTP AT ALL\r\n\r\n")

    thread = threading.Thread(target=garbage, daemon=True)
    thread.start()
    return thread


def test_a_control_socket_that_answers_garbage_is_reported_not_a_traceback(
        tmp_path: Path) -> None:
    path = tmp_path / "supervisor.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    _answer_garbage_once(server)
    conf = tmp_path / "supervisord.conf"
    conf.write_text(f"[supervisorctl]\nserverurl=unix://{path}\n")
    try:
        result = subprocess.run([sys.executable, "-m", "collectors", "status", "-c", str(conf),
                                 "--timeout", "2"], capture_output=True, text=True, timeout=30,
                                check=False)
    finally:
        server.close()
    assert result.returncode == 1
    assert "supervisord: not reachable" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_a_health_endpoint_that_is_not_http_is_unreachable_not_a_traceback() -> None:
    # http.client's errors (a bad status line, an invalid URL) are not OSError or ValueError
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    thread = _answer_garbage_once(server)
    try:
        assert fetch_health(f"http://127.0.0.1:{server.getsockname()[1]}", 2.0) is None
    finally:
        thread.join(5)
        server.close()
    assert fetch_health("http://127.0.0.1:abc", 2.0) is None


@pytest.mark.parametrize(("code", "status", "exit_code"), [
    (200, "ok", 0), (200, "degraded", 0), (503, "stale", 1), (503, "no_symbols", 1),
    (503, "down", 1)])
def test_status_agrees_with_what_healthz_answers(code: int, status: str, exit_code: int) -> None:
    # /healthz answers 200 while connected and fresh, stale symbols or not ("degraded"): the
    # status command calls the same collector up, and names the stale symbols.
    doc = {"status": status, "connected": code == 200,
           "stale_symbols": ["ETH/USD"] if status in ("degraded", "stale") else []}
    with healthz(doc, code) as httpd:
        result = subprocess.run(
            [sys.executable, "-m", "collectors", "status", "--no-supervisor",
             "--endpoint", f"kraken=http://127.0.0.1:{httpd.server_port}"],
            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == exit_code, result
    assert status in result.stdout
    if status in ("degraded", "stale"):
        assert "ETH/USD" in result.stdout


def test_an_exported_http_proxy_is_not_used_for_the_local_health_checks() -> None:
    # urllib sends even 127.0.0.1 through http_proxy: every collector read "unreachable".
    with healthz({"status": "ok", "connected": True}) as httpd:
        result = subprocess.run(
            [sys.executable, "-m", "collectors", "status", "--no-supervisor",
             "--endpoint", f"kraken=http://127.0.0.1:{httpd.server_port}"],
            capture_output=True, text=True, timeout=30, check=False,
            env={**os.environ, "http_proxy": "http://127.0.0.1:1",
                 "HTTP_PROXY": "http://127.0.0.1:1", "no_proxy": "", "NO_PROXY": ""})
    assert result.returncode == 0, result
    assert "ok" in result.stdout


def test_an_interrupted_wait_is_not_success() -> None:
    # Ctrl-C during `status --wait` exited 0 with no output: deploy/install.sh, which ends with
    # that check, would have reported the install good.
    listener = socket.create_server(("127.0.0.1", 0))
    asked = threading.Event()
    held: list[socket.socket] = []

    def accept() -> None:  # takes the health request and never answers it
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            held.append(conn)
            asked.set()

    threading.Thread(target=accept, daemon=True).start()
    try:
        with subprocess.Popen(
                [sys.executable, "-m", "collectors", "status", "--no-supervisor", "--endpoint",
                 f"kraken=http://127.0.0.1:{listener.getsockname()[1]}", "--wait", "60",
                 "--timeout", "30"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True) as proc:
            assert asked.wait(30)
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130
        assert "Traceback" not in err
    finally:
        listener.close()
        for conn in held:
            conn.close()


def test_each_programs_metrics_port_is_read_from_its_environment_line(tmp_path: Path) -> None:
    # status always asked 9101-9104, whatever METRICS_PORT supervisord.conf gave a program.
    from xmlrpc.server import SimpleXMLRPCServer

    rpc = SimpleXMLRPCServer(("127.0.0.1", 0), logRequests=False, allow_none=True)
    rpc.register_function(lambda: [{"name": "kraken", "statename": "RUNNING", "pid": 4242}],
                          "supervisor.getAllProcessInfo")
    threading.Thread(target=rpc.serve_forever, daemon=True).start()
    try:
        with healthz({"status": "ok", "connected": True}) as httpd:
            conf = tmp_path / "supervisord.conf"
            conf.write_text(
                f"[supervisorctl]\nserverurl=http://127.0.0.1:{rpc.server_address[1]}\n\n"
                "[program:kraken]\ncommand=true\n"
                f"environment=WS_URL=\"ws://x\",METRICS_PORT=\"{httpd.server_port}\","
                "LOG_LEVEL=info\n"
                "[program:coinbase]\ncommand=true\nenvironment=METRICS_PORT='0'\n")
            result = subprocess.run([sys.executable, "-m", "collectors", "status", "-c",
                                     str(conf), "--json"], capture_output=True, text=True,
                                    timeout=30, check=False)
    finally:
        rpc.shutdown()
        rpc.server_close()
    assert result.returncode == 0, result
    [row] = json.loads(result.stdout)["collectors"]
    assert (row["exchange"], row["health"], row["pid"]) == ("kraken", "ok", 4242)


def test_configured_metrics_ports_forms(tmp_path: Path) -> None:
    from collectors.status import configured_metrics_ports

    conf = tmp_path / "supervisord.conf"
    conf.write_text("[program:kraken]\nenvironment=METRICS_PORT=9300\n"
                    "[program:binance]\nenvironment=A=\"1,2\", METRICS_PORT = '9301'\n"
                    "[program:coinbase]\nenvironment=METRICS_PORT=\"abc\"\n"
                    "[program:ingest]\nenvironment=METRICS_PORT=\"9302\"\n")
    assert configured_metrics_ports(conf) == {"kraken": 9300, "binance": 9301}
    assert configured_metrics_ports(tmp_path / "missing.conf") == {}
