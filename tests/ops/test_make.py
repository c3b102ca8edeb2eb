"""`make demo`/`make stop`/`make clean` for real, in a temporary checkout (the Makefile, a
.venv/bin linked to ours, a supervisord.conf whose [supervisord] part is the real one and whose
programs are this test's), so the checkout's var/ and a running `make demo` are never touched."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.ops.helpers import ROOT
from tests.support.waiting import free_port, wait_until

pytestmark = pytest.mark.slow

# Every variable the collectors and the ingest API read (the Makefile's CONTRACT_ENV).
CONTRACT_ENV = ("API_BASE_URL", "API_KEY", "API_KEY_FILE", "API_KEYS", "WORKER_ID", "SYMBOLS",
                "BATCH_SIZE", "BATCH_INTERVAL_MS", "LOG_LEVEL", "WS_URL", "METRICS_HOST",
                "METRICS_PORT", "SPOOL_DIR", "INGEST_HOST", "INGEST_PORT", "DATABASE_URL",
                "DELIVERY_CONCURRENCY", "DELIVERY_RETRY_MAX_S", "HTTP_CONNECT_TIMEOUT_S",
                "HTTP_READ_TIMEOUT_S", "INGEST_MAX_BODY_BYTES", "INGEST_MAX_FEEDS",
                "INGEST_THREADS", "SPOOL_FSYNC_INTERVAL_MS", "SPOOL_MAX_BYTES",
                "WS_LIVENESS_TIMEOUT_S")


@dataclass
class Checkout:
    here: Path

    def make(self, *args: str, env: dict[str, str] | None = None,
             timeout: float = 90) -> subprocess.CompletedProcess[str]:
        full_env = {**{k: v for k, v in os.environ.items() if k not in CONTRACT_ENV},
                    **(env or {})}
        return subprocess.run(["make", "--no-print-directory", *args, "START_WAIT_S=0"],
                              cwd=self.here, env=full_env, capture_output=True, text=True,
                              timeout=timeout, check=False)

    def ctl(self, *args: str) -> str:
        return subprocess.run([str(self.here / ".venv" / "bin" / "supervisorctl"), "-c",
                               str(self.here / "supervisord.conf"), *args], capture_output=True,
                              text=True, timeout=30, check=False).stdout

    def supervisord_pid(self) -> int:
        return int((self.here / "var" / "run" / "supervisord.pid").read_text())

    def ours(self) -> list[int]:
        """Every live process of this checkout (run from it or in it: we started them all)."""
        pids = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and (
                        str(self.here).encode() in (proc / "cmdline").read_bytes()
                        or Path(os.readlink(proc / "cwd")).is_relative_to(self.here)):
                    pids.append(int(proc.name))
            except OSError:
                continue
        return pids


def write_conf(here: Path, programs: str) -> None:
    """The real supervisord.conf up to its programs, then `programs`."""
    head = (ROOT / "supervisord.conf").read_text().split("\n[program:", 1)[0]
    (here / "supervisord.conf").write_text(head + "\n" + programs)


@pytest.fixture
def checkout(tmp_path: Path) -> Iterator[Checkout]:
    here = tmp_path / "co"
    (here / ".venv").mkdir(parents=True)
    (here / ".venv" / "bin").symlink_to(ROOT / ".venv" / "bin")
    for name in ("Makefile", "setup.cfg", "pyproject.toml", "constraints.txt"):
        (here / name).symlink_to(ROOT / name)
    (here / ".venv" / ".installed").touch()  # newer than its prerequisites: no pip install
    co = Checkout(here)
    try:
        yield co
    finally:
        if (here / "var" / "run" / "supervisord.pid").exists():
            co.make("stop")
        for pid in co.ours():
            os.kill(pid, signal.SIGKILL)


def exited_within(pid: int, timeout_s: float) -> bool:
    """Whether `pid` (not necessarily our child) exits within the timeout."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(timeout_s * 1000))
    finally:
        os.close(fd)


SLEEPER = """
[program:{name}]
command=/bin/sh -c 'env > %(here)s/var/{name}.env; exec sleep 600'
startsecs=1
stdout_logfile=%(here)s/var/log/{name}.log
redirect_stderr=true
"""


def test_the_shells_contract_variables_never_reach_the_programs(checkout: Checkout) -> None:
    # `API_KEY=foo make demo` made every collector FATAL ("both API_KEY and API_KEY_FILE")
    # and gave the ingest API one more accepted key.
    write_conf(checkout.here, SLEEPER.format(name="envdump"))
    leaked = {name: f"from-the-shell-{i}" for i, name in enumerate(CONTRACT_ENV)}
    result = checkout.make("demo", env=leaked)
    assert result.returncode == 0, result.stdout + result.stderr
    seen = dict(line.split("=", 1) for line in
                (checkout.here / "var" / "envdump.env").read_text().splitlines() if "=" in line)
    assert not {k for k, v in seen.items() if v.startswith("from-the-shell-")}, seen
    # what supervisord.conf sets still arrives
    assert seen["API_KEY_FILE"] == str(checkout.here / "var" / "secrets" / "api_key")
    assert checkout.make("stop").returncode == 0


def test_clean_refuses_while_supervisord_runs(checkout: Checkout) -> None:
    write_conf(checkout.here, SLEEPER.format(name="sleeper"))
    assert checkout.make("demo").returncode == 0
    refused = checkout.make("clean")
    assert refused.returncode != 0
    assert refused.stdout.count("\n") == 1 and "make stop first" in refused.stdout, refused
    assert (checkout.here / "var" / "secrets" / "api_key").exists()
    assert (checkout.here / "var" / "run" / "supervisor.sock").exists()
    assert checkout.make("stop").returncode == 0
    cleaned = checkout.make("clean")
    assert cleaned.returncode == 0, cleaned.stdout + cleaned.stderr
    assert not (checkout.here / "var").exists()


def test_demo_fails_naming_the_programs_that_did_not_start(checkout: Checkout) -> None:
    write_conf(checkout.here, SLEEPER.format(name="fine") + """
[program:broken]
command=/bin/sh -c 'echo cannot bind >&2; exit 1'
startsecs=1
startretries=1
stdout_logfile=%(here)s/var/log/broken.log
redirect_stderr=true
""")
    result = checkout.make("demo")
    assert result.returncode != 0, result.stdout
    assert "broken" in result.stdout and "FATAL" in result.stdout, result.stdout
    assert "did not start: broken (see var/log/broken.log" in result.stdout, result.stdout
    assert "fine " not in result.stdout.split("started; waiting")[1], result.stdout
    assert checkout.make("stop").returncode == 0


def test_after_supervisord_is_killed_its_programs_stop_and_stop_says_so_at_once(
        checkout: Checkout) -> None:
    # `simulate` stops with its supervisord (collectors.parentwatch); `stubborn` stands for a
    # program that does not (an older version): it is named, not waited for.
    write_conf(checkout.here, """
[program:simulator]
command=%(here)s/.venv/bin/chrono-collector simulate coinbase
stdout_logfile=%(here)s/var/log/simulator.log
redirect_stderr=true

[program:stubborn]
command=/usr/bin/env -u SUPERVISOR_ENABLED %(here)s/.venv/bin/chrono-collector simulate kraken
stdout_logfile=%(here)s/var/log/stubborn.log
redirect_stderr=true
""")
    started = checkout.make("demo")
    assert started.returncode == 0, started.stdout + started.stderr
    simulator = int(checkout.ctl("pid", "simulator"))
    stubborn = int(checkout.ctl("pid", "stubborn"))
    os.kill(checkout.supervisord_pid(), signal.SIGKILL)

    assert exited_within(simulator, 20), "the simulator outlived its supervisord"

    began = time.monotonic()
    stop = checkout.make("stop")
    assert time.monotonic() - began < 10
    assert stop.returncode != 0, stop.stdout
    lines = stop.stdout.splitlines()
    assert "supervisord is not running" in lines[0] and "killed?" in lines[0], stop.stdout
    assert any(line.split()[:1] == [str(stubborn)] for line in lines[1:]), stop.stdout
    assert str(simulator) not in stop.stdout

    # While it runs, a new supervisord would only see its programs go FATAL: refused.
    again = checkout.make("demo")
    assert again.returncode != 0 and str(stubborn) in again.stdout, again.stdout
    assert not (checkout.here / "var" / "run" / "supervisord.pid").exists()
    assert checkout.make("clean").returncode != 0

    os.kill(stubborn, signal.SIGTERM)
    assert exited_within(stubborn, 20)
    assert wait_until(lambda: stubborn not in checkout.ours(), 5)  # reaped by init
    quiet = checkout.make("stop")
    assert quiet.returncode == 0 and quiet.stdout.strip() == "not running", quiet.stdout


def test_run_warns_when_collectors_are_still_down(checkout: Checkout) -> None:
    # `make run` without internet said "started" (`status ... >/dev/null || true`) while no
    # collector ever connected. `coinbase` here runs but answers no health check. The service
    # does run (and connects when it can): exit 0, with the table and a warning.
    write_conf(checkout.here, f"""
[program:coinbase]
command=/bin/sh -c 'exec sleep 600'
environment=METRICS_PORT="{free_port()}"
startsecs=1
stdout_logfile=%(here)s/var/log/coinbase.log
redirect_stderr=true
""")
    result = checkout.make("run")
    assert result.returncode == 0, result.stdout + result.stderr
    after = result.stdout.split("started; waiting")[1]
    assert "EXCHANGE" in after and "coinbase" in after and "unreachable" in after, after
    assert "WARNING: collectors not connected" in after, after
    assert "make demo" in after, after
    assert "RUNNING" in checkout.ctl("status", "coinbase")  # left running, retrying
    assert checkout.make("stop").returncode == 0


def test_setup_makes_what_supervisord_by_hand_needs(checkout: Checkout) -> None:
    # README's "run supervisord by hand" failed on a fresh clone: var/log and the key missing.
    result = checkout.make("setup")
    assert result.returncode == 0, result.stdout + result.stderr
    for path in ("var/log", "var/run"):
        assert (checkout.here / path).is_dir()
    assert (checkout.here / "var" / "secrets" / "api_key").stat().st_mode & 0o777 == 0o400
    readme = (ROOT / "README.md").read_text()
    by_hand = readme.split("To run supervisord by hand", 1)[1][:400]
    assert "make setup" in by_hand


STUBBORN = """
[program:{name}]
command=/bin/sh -c 'trap "" TERM; exec sleep 600'
startsecs=1
stopwaitsecs={wait}
stdout_logfile=%(here)s/var/log/{name}.log
redirect_stderr=true
"""


def test_stop_waits_as_long_as_supervisord_may_take_and_says_so(checkout: Checkout) -> None:
    # supervisord stops its programs one after another, each up to its stopwaitsecs: with a
    # hung ingest API a shutdown took ~43 s, and `make stop` gave up after 30 s ("still
    # stopping", exit 2) while the shutdown went on as it should. Here two programs ignore
    # SIGTERM for 17 s each (killed at their stopwaitsecs): 34 s.
    write_conf(checkout.here, STUBBORN.format(name="slow1", wait=17)
               + STUBBORN.format(name="slow2", wait=17))
    started = checkout.make("demo")
    assert started.returncode == 0, started.stdout + started.stderr
    supervisord = checkout.supervisord_pid()
    began = time.monotonic()
    stop = checkout.make("stop")
    took = time.monotonic() - began
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert took > 30 and exited_within(supervisord, 0), (took, stop.stdout)
    progress = [line for line in stop.stdout.splitlines() if line.startswith("still stopping")]
    # one line every 10 s, naming what supervisord still waits for
    assert len(progress) == 3, stop.stdout
    assert "slow1" in progress[0] or "slow2" in progress[0], progress
    assert "up to 44 s" in progress[0], progress  # 17 + 17, plus a margin of 10 s
    assert "supervisord is still stopping" not in stop.stdout


def test_demo_reads_the_simulator_ports_from_supervisord_conf(checkout: Checkout) -> None:
    # The ports were written twice (Makefile and supervisord.conf); changing only the
    # simulator's --port left the collectors connecting to the old one.
    conf = (ROOT / "supervisord.conf").read_text()
    assert "simulate coinbase binance binanceus kraken --port 9201\n" in conf
    (checkout.here / "supervisord.conf").write_text(conf.replace("--port 9201", "--port 9301"))
    dry = checkout.make("-n", "demo")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert ("CHRONO_COINBASE_WS_URL=ws://127.0.0.1:9301 CHRONO_BINANCE_WS_URL=ws://127.0.0.1:9302"
            " CHRONO_BINANCEUS_WS_URL=ws://127.0.0.1:9303"
            " CHRONO_KRAKEN_WS_URL=ws://127.0.0.1:9304/v2 ") in dry.stdout, dry.stdout
    # options before the venues (argparse takes them anywhere): the venues were not found
    (checkout.here / "supervisord.conf").write_text(conf.replace(
        "simulate coinbase binance binanceus kraken --port 9201",
        "simulate --port=9401 --seed 3 coinbase binance binanceus kraken"))
    dry = checkout.make("-n", "demo")
    assert ("CHRONO_COINBASE_WS_URL=ws://127.0.0.1:9401 CHRONO_BINANCE_WS_URL=ws://127.0.0.1:9402"
            " CHRONO_BINANCEUS_WS_URL=ws://127.0.0.1:9403"
            " CHRONO_KRAKEN_WS_URL=ws://127.0.0.1:9404/v2 ") in dry.stdout, dry.stdout
    # the shipped one: the addresses the simulator listens on
    (checkout.here / "supervisord.conf").write_text(conf)
    dry = checkout.make("-n", "demo")
    assert "CHRONO_COINBASE_WS_URL=ws://127.0.0.1:9201 " in dry.stdout, dry.stdout
    assert "CHRONO_KRAKEN_WS_URL=ws://127.0.0.1:9204/v2 " in dry.stdout, dry.stdout


def test_the_read_only_targets_never_reinstall_into_the_live_venv() -> None:
    # `make status` and `make check-db` depended on the install stamp: after a `git pull` (or
    # any newer setup.cfg/pyproject.toml) they pip-installed into the .venv the running
    # collectors use. Asked as if pyproject.toml had just changed (`-W`), dry run.
    def plan(target: str) -> str:
        res = subprocess.run(["make", "-n", "-W", "pyproject.toml", target], cwd=ROOT,
                             capture_output=True, text=True, timeout=60, check=False)
        assert res.returncode == 0, res.stderr
        return res.stdout

    for target in ("status", "check-db"):
        assert "pip install" not in plan(target), target
    assert "pip install" in plan("test")  # (what the -W stands for: a changed pyproject)
