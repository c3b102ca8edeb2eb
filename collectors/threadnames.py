"""OS-level thread names: CPython 3.11 names only its own `threading.Thread` objects, so `top -H`,
`ps -L` and /proc would show every thread of the collector as the program's name."""

from __future__ import annotations

import ctypes

_PR_SET_NAME = 15


def name_native_thread(name: str) -> bool:
    """Give the calling thread's OS thread the name `name` (first 15 bytes), so `top -H`,
    `ps -L` and /proc show which thread uses the CPU (CPython 3.11 names only its own Thread
    objects). Linux only; elsewhere, or if it fails, nothing happens. True when named."""
    try:
        prctl = ctypes.CDLL(None).prctl  # the process's own symbols: libc's on Linux
    except (OSError, AttributeError):
        return False
    return bool(prctl(_PR_SET_NAME, name.encode("utf-8", "replace")[:15], 0, 0, 0) == 0)
