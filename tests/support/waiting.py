"""Waiting on other processes, and free loopback ports, for tests that run real processes."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0,
               interval_s: float = 0.02) -> bool:
    """Poll another process's observable state (rows, files, /metrics) with a deadline: there
    is no event to wait on across processes, so this checks a condition often rather than
    sleeping blindly. Returns the predicate's last value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


def free_port() -> int:
    """A port free on 127.0.0.1 right now (the caller binds it soon after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
