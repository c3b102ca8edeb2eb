"""The collector speaks systemd's notify protocol: READY=1 once it runs, WATCHDOG=1 while its
threads make progress, STOPPING=1 on the way out."""

from __future__ import annotations

import socket
from pathlib import Path

from collectors.simulator import Simulator
from tests.integration.conftest import collector_process
from tests.support.servers import IngestServer


def test_ready_watchdog_and_stopping(tmp_path: Path, ingest: IngestServer,
                                     coinbase_sim: Simulator) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(15)
        with collector_process(tmp_path, coinbase_sim.url, ingest.url, ingest.key,
                               NOTIFY_SOCKET=str(path), WATCHDOG_USEC="1000000") as col:
            assert sock.recv(256) == b"READY=1"
            assert sock.recv(256) == b"WATCHDOG=1"
            assert sock.recv(256) == b"WATCHDOG=1"
            assert col.stop() == 0
        messages = []
        sock.settimeout(0.5)
        try:
            while True:
                messages.append(sock.recv(256))
        except TimeoutError:
            pass
        assert messages and messages[-1] == b"STOPPING=1"
