"""Shared helpers for the simulator tests (no tests here): a websocket-client wrapper that
closes its socket, reads JSON with a deadline and reports the close code it received."""

from __future__ import annotations

import json
import re
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import websocket

ISO_US = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


class Client:
    """One websocket-client connection. Every helper has a deadline; nothing sleeps."""

    def __init__(self, url: str, timeout_s: float = 5.0) -> None:
        self.ws = websocket.create_connection(url, timeout=timeout_s)
        self.close_code: int | None = None

    def send(self, message: Any) -> None:
        self.ws.send(message if isinstance(message, str) else json.dumps(message))

    def recv_json(self) -> Any:
        """The next data message, parsed. Pings are answered by websocket-client."""
        while True:
            opcode, frame = self.ws.recv_data_frame(control_frame=True)
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                self._closed(frame.data)
                raise websocket.WebSocketConnectionClosedException("server closed")
            if opcode in (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY):
                return json.loads(frame.data)

    def recv_until(self, predicate: Callable[[Any], bool], limit: int = 500) -> tuple[Any, list]:
        """(first message matching, messages before it)."""
        before = []
        for _ in range(limit):
            message = self.recv_json()
            if predicate(message):
                return message, before
            before.append(message)
        raise AssertionError(f"no matching message in {limit}")

    def recv_n(self, count: int, predicate: Callable[[Any], bool] = lambda m: True) -> list:
        out = []
        while len(out) < count:
            message = self.recv_json()
            if predicate(message):
                out.append(message)
        return out

    def _closed(self, data: bytes) -> None:
        self.close_code = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else None

    def wait_closed(self, timeout_s: float = 5.0) -> int | None:
        """Read until the server closes; the close code it sent (None: TCP closed without one).
        """
        self.ws.settimeout(timeout_s)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                opcode, frame = self.ws.recv_data_frame(control_frame=True)
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    self._closed(frame.data)
                    return self.close_code
        except (websocket.WebSocketConnectionClosedException, ConnectionError, OSError):
            return None
        raise AssertionError("server did not close the connection")

    def close(self) -> None:
        try:
            self.ws.close(timeout=1)
        except Exception:
            pass
        finally:
            self.ws.shutdown()


@contextmanager
def client(url: str, timeout_s: float = 5.0) -> Iterator[Client]:
    c = Client(url, timeout_s)
    try:
        yield c
    finally:
        c.close()
