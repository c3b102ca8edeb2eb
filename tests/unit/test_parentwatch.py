"""collectors.parentwatch: a program started by supervisord stops when supervisord is killed."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from collectors.parentwatch import PR_SET_PDEATHSIG, stop_with_supervisord
from collectors.simulator import Simulator
from tests.support.servers import running_ingest
from tests.support.waiting import free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")

# A stand-in for supervisord: starts the program (argv after the log path) with its stdout in
# the log, prints the program's pid, and waits to be killed.
PARENT = """
import subprocess, sys, time
with open(sys.argv[1], "ab") as log:
    child = subprocess.Popen(sys.argv[2:], stdout=log, stderr=subprocess.STDOUT)
print(child.pid, flush=True)
time.sleep(600)
"""


def events(log: Path) -> list[str]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            out.append(str(obj.get("event")))
    return out


def exited_within(pidfd: int, timeout_s: float) -> bool:
    """Whether the process behind `pidfd` (not our child: we cannot wait for it) exits within
    the timeout; a pidfd becomes readable when its process exits."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(timeout_s * 1000))


@contextmanager
def orphaned(tmp_path: Path, args: list[str], env: dict[str, str],
             ready: Callable[[list[str]], bool]) -> Iterator[tuple[Path, Callable[[], bool]]]:
    """Start `chrono-collector ARGS` under a parent holding SUPERVISOR_ENABLED=1 as supervisord
    does; once `ready`, kill -9 the parent. Yields the log and `exited()` (waits up to 20 s)."""
    log = tmp_path / "program.log"
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT),
                "SUPERVISOR_ENABLED": "1", "CHRONO_STATE_DIR": str(tmp_path / "state"), **env}
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(log), sys.executable, "-m",
                               "collectors", *args], stdout=subprocess.PIPE, env=full_env)
    assert parent.stdout is not None
    child_pid = int(parent.stdout.readline())
    pidfd = os.pidfd_open(child_pid)
    try:
        assert wait_until(lambda: ready(events(log)), 20), log.read_text()
        parent.kill()
        parent.wait(10)
        yield log, lambda: exited_within(pidfd, 20)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
        parent.stdout.close()
        if not exited_within(pidfd, 0):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        os.close(pidfd)


def test_a_collector_drains_and_stops_when_supervisord_is_killed(tmp_path: Path) -> None:
    with Simulator("coinbase", rate_hz=20, seed=5) as sim, running_ingest(tmp_path) as ingest:
        key = tmp_path / "api_key"
        key.write_text(ingest.key + "\n")
        env = {"API_BASE_URL": ingest.url, "API_KEY_FILE": str(key), "WS_URL": sim.url,
               "METRICS_PORT": str(free_port()), "SPOOL_DIR": str(tmp_path / "spool"),
               "BATCH_INTERVAL_MS": "100"}
        with orphaned(tmp_path, ["run", "coinbase"], env,
                      lambda ev: "batch_delivered" in ev or "ws_connected" in ev) as (log, exited):
            assert exited(), "the collector outlived its parent: " + log.read_text()[-2000:]
            assert {"stop_requested", "collector_stopped"} <= set(events(log)), log.read_text()


def test_the_ingest_api_stops_when_supervisord_is_killed(tmp_path: Path) -> None:
    key = tmp_path / "api_key"
    key.write_text("parentwatch-test-key-0123456789\n")
    env = {"API_KEY_FILE": str(key), "INGEST_HOST": "127.0.0.1", "INGEST_PORT": str(free_port())}
    with orphaned(tmp_path, ["ingest"], env, lambda ev: "ingest_started" in ev) as (log, exited):
        assert exited(), "the ingest API outlived its parent: " + log.read_text()[-2000:]
        assert {"stop_requested", "ingest_stopped"} <= set(events(log)), log.read_text()


def test_the_simulator_stops_when_supervisord_is_killed(tmp_path: Path) -> None:
    with orphaned(tmp_path, ["simulate", "coinbase"], {},
                  lambda ev: "simulator_listening" in ev) as (log, exited):
        assert exited(), "the simulator outlived its parent: " + log.read_text()[-2000:]


def test_not_under_supervisord_nothing_is_asked() -> None:
    # systemd units (and a shell) have no SUPERVISOR_ENABLED; a unit's parent is PID 1.
    calls: list[tuple[int, int]] = []
    assert stop_with_supervisord(os.getppid(), {},
                                 prctl=lambda o, a: calls.append((o, a)) or 0)
    assert calls == []


def test_a_parent_gone_before_the_request_took_effect_is_reported() -> None:
    calls: list[tuple[int, int]] = []
    assert not stop_with_supervisord(4242, {"SUPERVISOR_ENABLED": "1"}, getppid=lambda: 1,
                                     prctl=lambda o, a: calls.append((o, a)) or 0)
    assert calls == [(PR_SET_PDEATHSIG, signal.SIGTERM)]
    assert stop_with_supervisord(4242, {"SUPERVISOR_ENABLED": "1"}, getppid=lambda: 4242,
                                 prctl=lambda o, a: 0)


def test_a_parent_gone_before_main_read_it_is_reported() -> None:
    """supervisord died between the fork and main(): the parent main() saw is already init."""
    assert not stop_with_supervisord(1, {"SUPERVISOR_ENABLED": "1"}, getppid=lambda: 1,
                                     prctl=lambda o, a: 0)


def test_a_parent_gone_before_start_makes_the_program_exit_1() -> None:
    # What a program sees when supervisord died between fork and prctl: its parent changed.
    code = ("import os, sys; from collectors import cli; os.getppid = iter([4242, 1]).__next__;"
            " sys.exit(cli.main(['simulate', 'coinbase']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=30, check=False, cwd=ROOT,
                            env={**os.environ, "SUPERVISOR_ENABLED": "1"})
    assert result.returncode == 1, result
    assert result.stderr.count("\n") == 1 and "exited before" in result.stderr, result.stderr
    assert "simulator_listening" not in result.stdout


def test_the_death_signal_is_really_set_under_supervisord() -> None:
    code = ("import os, sys; from collectors.parentwatch import stop_with_supervisord, "
            "death_signal; assert death_signal() == 0; "
            "ok = stop_with_supervisord(os.getppid()); print(ok, death_signal())")
    for env, expected in (({"SUPERVISOR_ENABLED": "1"}, f"True {int(signal.SIGTERM)}"),
                          ({}, "True 0")):
        clean = {k: v for k, v in os.environ.items() if k != "SUPERVISOR_ENABLED"}
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                timeout=30, check=False, cwd=ROOT, env={**clean, **env})
        assert result.stdout.strip() == expected, result


def test_supervisord_is_recognised_by_its_program_not_by_an_argument(
        tmp_path: Path) -> None:
    """`docker-init -- supervisord -n` only mentions supervisord: it is not supervisord."""
    from collectors import parentwatch

    fake = tmp_path / "supervisord"  # a Python script named supervisord, as the venv's is
    fake.write_text(f"#!{sys.executable}\nimport sys; sys.stdin.read()\n")
    fake.chmod(0o755)
    for argv, expected in (([str(fake)], True),
                           (["/bin/sh", "-c", "read x", "supervisord", "-n"], False)):
        with subprocess.Popen(argv, stdin=subprocess.PIPE) as proc:
            try:
                # the kernel has run the program once its command line reads back as exec'd
                assert wait_until(lambda p=proc: b"supervisord" in Path(
                    f"/proc/{p.pid}/cmdline").read_bytes(), 5)
                assert parentwatch._is_supervisord(proc.pid) is expected, argv
            finally:
                proc.kill()
