"""`chrono-collector status`: one table of every collector, for people, cron and health checks.

Reads supervisord over its unix control socket (XML-RPC, as supervisorctl does) and each
collector's `/healthz`. Exit 0 when every collector is running, connected and fresh (what
`/healthz` answers 200 for: "ok", or "degraded" when some symbols are stale, named in the STALE
column); 1 otherwise ("stale" when every symbol is, "no_symbols" when the venue rejected every
configured one, "down", unreachable).
"""

from __future__ import annotations

import argparse
import configparser
import http.client
import json
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.request
import xmlrpc.client
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from collectors import exchanges

#: The /healthz statuses answered with 200 (`CollectorService.health`: connected and fresh; a
#: stale symbol makes it "degraded", which a restart would not mend): up for `status` too.
HEALTHY = frozenset({"ok", "degraded"})


@dataclass(slots=True)
class Row:
    exchange: str
    process: str
    pid: int | None
    connected: bool | None
    health: str
    last_message_age_s: float | None
    records_per_s: float | None
    queue_records: int | None
    spool_records: int | None
    last_flush_age_s: float | None
    stale_symbols: list[str]

    @property
    def ok(self) -> bool:
        return self.process in ("RUNNING", "-") and self.health in HEALTHY


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", default="supervisord.conf",
                        help="supervisord config whose control socket to read "
                             "(default: supervisord.conf; use --no-supervisor without one)")
    parser.add_argument("--no-supervisor", action="store_true",
                        help="do not ask supervisord (collectors run under systemd)")
    parser.add_argument("--endpoint", action="append", default=[], metavar="EXCHANGE=URL",
                        help="health URL base of a collector, e.g. coinbase=http://127.0.0.1:9101"
                             " (default: on 127.0.0.1, the METRICS_PORT each program's environment="
                             " line in the supervisord config sets, else the venue's default); with"
                             " --no-supervisor, the collectors given are the ones checked")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser.add_argument("--wait", type=_seconds(0.0), default=0.0, metavar="SECONDS",
                        help="wait up to SECONDS for everything to be up before answering")
    parser.add_argument("--timeout", type=_seconds(0.01, 3600.0), default=2.0,
                        help="per-request timeout (s)")


def _seconds(least: float, most: float = 86400.0) -> Callable[[str], float]:
    """An argparse type: a number of seconds from `least` to `most` (argparse names the
    option)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if not least <= value <= most:  # also refuses NaN and inf
            raise argparse.ArgumentTypeError(f"{text!r}: must be from {least:g} to {most:g}")
        return value
    return parse


def main(args: argparse.Namespace) -> int:
    # Without supervisord, --endpoint names the collectors to check (a host running only some
    # of them); without any, every venue at its default metrics port. With supervisord, its
    # programs are the ones checked, and --endpoint only moves a health URL.
    endpoints = {} if args.endpoint and args.no_supervisor else {
        name: f"http://127.0.0.1:{port}"
        for name, port in exchanges.DEFAULT_METRICS_PORTS.items() if name in exchanges.REGISTRY}
    if not args.no_supervisor:
        # Each program's METRICS_PORT as supervisord.conf sets it (0: metrics off, no health
        # to ask); a config that cannot be read is reported by `collect`.
        for name, port in configured_metrics_ports(Path(args.config)).items():
            if port:
                endpoints[name] = f"http://127.0.0.1:{port}"
            else:
                endpoints.pop(name, None)
    for item in args.endpoint:
        name, sep, url = item.partition("=")
        if not sep or not url.startswith(("http://", "https://")) or not _host_port_ok(url):
            print(f"chrono-collector: error: --endpoint {item!r}: expected "
                  "EXCHANGE=http://host:port", file=sys.stderr)
            return 2
        endpoints[name] = url.rstrip("/")
    deadline = time.monotonic() + max(0.0, args.wait)
    while True:
        rows, problem = collect(args, endpoints)
        if (all(r.ok for r in rows) and rows and not problem) or time.monotonic() >= deadline:
            break
        time.sleep(0.5)  # polling other processes: there is no event to wait on
    if args.json:
        print(json.dumps({"ok": bool(rows) and all(r.ok for r in rows) and not problem,
                          "problem": problem, "collectors": [asdict(r) for r in rows]}, indent=2))
    else:
        print(render(rows))
        if problem:
            print(problem)
    return 0 if rows and all(r.ok for r in rows) and not problem else 1


def _host_port_ok(url: str) -> bool:
    """A host, and a port that is a number from 1 to 65535 if there is one (`:abc` made every
    health request raise http.client.InvalidURL)."""
    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError unless digits from 0 to 65535
    except ValueError:
        return False
    return bool(parts.hostname) and port != 0


def collect(args: argparse.Namespace, endpoints: dict[str, str]) -> tuple[list[Row], str | None]:
    processes: dict[str, tuple[str, int | None]] = {}
    problem = None
    if not args.no_supervisor:
        try:
            processes = supervisor_processes(Path(args.config), args.timeout)
        except (OSError, xmlrpc.client.Error, http.client.HTTPException, ValueError,
                configparser.Error) as exc:
            problem = f"supervisord: not reachable via {args.config} ({type(exc).__name__}: {exc})"
    names = sorted(processes) if processes else sorted(endpoints)
    rows = []
    for name in names:
        state, pid = processes.get(name, ("-", None))
        url = endpoints.get(name)
        body = fetch_health(url, args.timeout) if url and state in ("RUNNING", "-") else None
        rows.append(_row(name, state, pid, body))
    return rows, problem


def _row(name: str, state: str, pid: int | None, body: dict[str, object] | None) -> Row:
    def num(key: str) -> float | None:
        value = (body or {}).get(key)
        return float(value) if isinstance(value, int | float) else None

    def count(key: str) -> int | None:
        value = (body or {}).get(key)
        return int(value) if isinstance(value, int) else None

    stale = (body or {}).get("stale_symbols")
    connected = (body or {}).get("connected")
    return Row(
        exchange=name, process=state, pid=pid,
        connected=connected if isinstance(connected, bool) else None,
        health=str((body or {}).get("status", "unreachable" if state in ("RUNNING", "-")
                                   else "down")),
        last_message_age_s=num("last_message_age_s"), records_per_s=num("records_per_s"),
        queue_records=count("queue_records"), spool_records=count("spool_records"),
        last_flush_age_s=num("last_flush_age_s"),
        stale_symbols=[str(s) for s in stale] if isinstance(stale, list) else [],
    )


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over a unix socket, with a timeout on connect and on every read (supervisor's own
    transport sets none: a supervisord that accepts and never answers hung `status`)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class _TimedTransport(xmlrpc.client.Transport):
    """XML-RPC to supervisord's `serverurl` (unix:// or http://) with a timeout."""

    def __init__(self, serverurl: str, timeout: float) -> None:
        super().__init__()
        self._serverurl = serverurl
        self._timeout = timeout

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        if self._serverurl.startswith("unix://"):
            conn: http.client.HTTPConnection = _UnixConnection(
                self._serverurl[len("unix://"):], self._timeout)
            self._connection = host, conn  # so close() closes it, as for http://
            return conn
        conn = super().make_connection(host)
        conn.timeout = self._timeout
        return conn


#: `METRICS_PORT=...` in a supervisord `environment=` line (KEY="v",KEY='v' or KEY=v, comma
#: separated): the value in its quotes or up to the next comma.
_METRICS_PORT_RE = re.compile(
    r"""(?:^|,)\s*METRICS_PORT\s*=\s*(?:"([^"]*)"|'([^']*)'|([^,]*))""")


def configured_metrics_ports(config: Path) -> dict[str, int]:
    """{program: METRICS_PORT} for every collector program whose `environment=` line in the
    supervisord config sets one to a port number (a value from supervisord's own environment,
    `%(ENV_X)s`, is looked up in ours). Never raises: an unreadable config sets nothing."""
    parser = configparser.RawConfigParser()
    try:
        if not parser.read(config):
            return {}
    except (configparser.Error, OSError, UnicodeDecodeError):
        return {}
    out: dict[str, int] = {}
    for section in parser.sections():
        name = section.removeprefix("program:")
        if not section.startswith("program:") or name not in exchanges.REGISTRY:
            continue
        found = _METRICS_PORT_RE.search(parser.get(section, "environment", fallback=""))
        if found is None:
            continue
        value = next(group for group in found.groups() if group is not None).strip()
        value = re.sub(r"%\(ENV_(\w+)\)s", lambda m: os.environ.get(m.group(1), ""), value)
        if value.isascii() and value.isdigit() and int(value) <= 65535:
            out[name] = int(value)
    return out


def supervisor_processes(config: Path, timeout: float) -> dict[str, tuple[str, int | None]]:
    """{program: (state, pid)} for every collector program (named after its exchange), over
    supervisord's control socket; every request bounded by `timeout`."""
    parser = configparser.RawConfigParser()
    if not parser.read(config):
        raise OSError(f"cannot read {config}")
    serverurl = parser.get("supervisorctl", "serverurl",
                           fallback="unix://%(here)s/var/run/supervisor.sock")
    serverurl = serverurl.replace("%(here)s", str(config.resolve().parent))
    target = serverurl if serverurl.startswith("http") else "http://127.0.0.1"
    with xmlrpc.client.ServerProxy(target,
                                   transport=_TimedTransport(serverurl, timeout)) as proxy:
        infos = proxy.supervisor.getAllProcessInfo()
    out: dict[str, tuple[str, int | None]] = {}
    for info in infos if isinstance(infos, list) else []:
        if isinstance(info, dict) and info.get("name") in exchanges.REGISTRY:
            pid = info.get("pid")
            out[str(info.get("name"))] = (str(info.get("statename")),
                                          pid if isinstance(pid, int) and pid else None)
    return out


def fetch_health(base_url: str, timeout: float) -> dict[str, object] | None:
    # Straight to the collector's metrics port on this machine: an exported `http_proxy`
    # (urllib uses it even for 127.0.0.1) showed every collector "unreachable".
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with direct.open(base_url + "/healthz", timeout=timeout) as resp:
            data = json.loads(resp.read(65536))
    except urllib.error.HTTPError as exc:  # 503 still carries the JSON body
        try:
            data = json.loads(exc.read(65536))
        except (OSError, ValueError, http.client.HTTPException):
            return None
        finally:
            exc.close()
    # (http.client's own errors, a bad status line or an invalid URL, are not OSErrors)
    except (OSError, ValueError, http.client.HTTPException):
        return None
    return data if isinstance(data, dict) else None


def render(rows: list[Row]) -> str:
    def age(v: float | None) -> str:
        if v is None:
            return "-"
        return f"{v:.1f}s" if v < 120 else f"{v / 60:.0f}m"

    header = ("EXCHANGE", "PROCESS", "CONNECTED", "HEALTH", "LAST MSG", "REC/S", "QUEUE",
              "SPOOL", "LAST FLUSH", "STALE")
    lines = [header]
    for r in rows:
        lines.append((r.exchange, r.process + (f" ({r.pid})" if r.pid else ""),
                      {True: "yes", False: "no", None: "-"}[r.connected], r.health,
                      age(r.last_message_age_s),
                      "-" if r.records_per_s is None else f"{r.records_per_s:.1f}",
                      "-" if r.queue_records is None else str(r.queue_records),
                      "-" if r.spool_records is None else str(r.spool_records),
                      age(r.last_flush_age_s), ",".join(r.stale_symbols) or "-"))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
                     for line in lines)
