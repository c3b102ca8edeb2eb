"""Shared helpers of the operations tests: ports, polling and a running collector stack."""

from __future__ import annotations

import json
import os
import shutil
import socket
import urllib.request
from pathlib import Path

import pytest

from tests.support.waiting import free_port

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = ROOT / ".venv" / "bin"
DASHBOARD = ROOT / "monitoring" / "grafana" / "dashboards" / "chrono-collectors.json"


def panel_expr(title: str) -> str:
    """The one query of the dashboard panel `title`, `$exchange` expanded as Grafana's "All"."""
    panels = [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["title"] == title]
    assert len(panels) == 1 and len(panels[0]["targets"]) == 1, title
    return str(panels[0]["targets"][0]["expr"]).replace("$exchange", ".*")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port_range(count: int) -> int:
    """First of `count` consecutive free ports on 127.0.0.1 (the simulator numbers its venues
    from one base port)."""
    for _ in range(200):
        base = free_port()
        if base + count < 65535 and all(_port_free(base + i) for i in range(count)):
            return base
    raise RuntimeError("no range of free ports")


def http_get(url: str, timeout: float = 2.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return str(resp.read().decode())


def require_tool(name: str) -> str:
    """Path of a command-line tool; skip with a reason when absent, but fail in CI."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (apt-get install -y prometheus / systemd)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + "; CI must run this test")
        pytest.skip(message)
    return path


def scrape_names(text: str) -> set[str]:
    """Every metric name a /metrics scrape declares or samples, histogram/summary series
    included (`# TYPE x histogram` declares x_bucket, x_sum, x_count)."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()[:4]
            names.add(name)
            if kind in ("histogram", "summary"):
                names.update({f"{name}_bucket", f"{name}_sum", f"{name}_count"})
            if kind == "counter" and not name.endswith("_total"):
                names.add(f"{name}_total")
        elif line and not line.startswith("#"):
            names.add(line.split("{", 1)[0].split(" ", 1)[0])
    return names
