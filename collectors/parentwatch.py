"""Stop with supervisord: the kernel sends SIGTERM to a program whose supervisord dies (Linux).

supervisord starts each program itself (fork, exec) and sets SUPERVISOR_ENABLED in its
environment. A supervisord killed with SIGKILL (or by the OOM killer) used to leave its programs
running under PID 1, holding their ports and spool locks, so the next supervisord's programs
went FATAL. `prctl(PR_SET_PDEATHSIG, SIGTERM)` asks the kernel to send SIGTERM the moment the
parent dies: the program's normal stop path (drain, exit). Not under systemd (no
SUPERVISOR_ENABLED): a unit's parent is PID 1, which never dies, and systemd stops units itself.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable, Mapping

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PR_GET_PDEATHSIG = 2


def _libc_prctl(option: int, arg: int) -> int:
    """prctl(2) through ctypes; returns 0, or the errno of a failure."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), ctypes.c_ulong(0),
                  ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        return ctypes.get_errno() or -1
    return 0


def death_signal() -> int:
    """The signal this process gets when its parent dies (0: none); 0 off Linux."""
    if sys.platform != "linux":
        return 0
    value = ctypes.c_int(0)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(ctypes.c_int(PR_GET_PDEATHSIG), ctypes.byref(value), ctypes.c_ulong(0),
                  ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        return 0
    return value.value


def stop_with_supervisord(parent_pid: int, env: Mapping[str, str] | None = None, *,
                          getppid: Callable[[], int] = os.getppid,
                          prctl: Callable[[int, int], int] = _libc_prctl) -> bool:
    """Under supervisord, have SIGTERM sent to this process when its parent dies.

    `parent_pid` is the parent seen at process start (`os.getppid()` first thing in main).
    Returns False when that parent is already gone (it died before the request took effect,
    so no signal will come: the caller must not start). Returns True otherwise, also when not
    under supervisord or not on Linux. A refused prctl is one line on stderr. Raises nothing.
    """
    env = os.environ if env is None else env
    if not env.get("SUPERVISOR_ENABLED") or sys.platform != "linux":
        return True
    error = prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if error:
        print(f"chrono-collector: warning: prctl(PR_SET_PDEATHSIG) failed "
              f"({os.strerror(error) if error > 0 else 'unknown error'}): this program will "
              "keep running if supervisord is killed", file=sys.stderr, flush=True)
        return True
    # A parent that died before prctl sent nothing: this process is someone else's child now.
    # It may have died before `parent_pid` was read, too: then the parent seen is init (unless
    # supervisord is init itself, as in a container).
    if parent_pid == 1 and not _is_supervisord(1):
        return False
    return getppid() == parent_pid


def _is_supervisord(pid: int) -> bool:
    """Whether process `pid` runs supervisord: its program, or the script its Python runs, is
    named `supervisord` (an init such as tini whose arguments merely mention it is not). True
    when that cannot be told: /proc unreadable, or another PID namespace's (no false alarm)."""
    try:
        if int(os.readlink("/proc/self")) != os.getpid():
            return True
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except (OSError, ValueError):
        return True
    names = [os.path.basename(arg) for arg in argv[:2]]
    return names[0] == b"supervisord" or (
        names[0].startswith(b"python") and len(names) > 1 and names[1] == b"supervisord")
