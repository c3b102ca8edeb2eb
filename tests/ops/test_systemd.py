"""The systemd units pass `systemd-analyze verify` with no output at all (verify exits 0 on
unknown keys and bad values, printing only warnings) and the template instance reaches an
exposure of at most 2.0 in `systemd-analyze security --offline=true`.

verify checks that ExecStart binaries exist, so it runs against a throw-away root: the host's
unit directory (for sysinit.target & co), our units in etc/systemd/system and stub executables
at the production paths. Nothing on the host is touched."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.ops.helpers import ROOT, require_tool

UNITS = ROOT / "systemd"
TEMPLATE = "chrono-collector@.service"
SUPERVISORD_UNIT = "chrono-supervisord.service"
EXCHANGES = ("coinbase", "binance", "binanceus", "kraken")
PRODUCTION_CONF = ROOT / "deploy" / "supervisord.production.conf"


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    tool = require_tool("systemd-analyze")
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=30,
                          check=False)


def exec_paths(unit: Path) -> list[str]:
    return [line.split("=", 1)[1].split()[0].lstrip("-@:+!")
            for line in unit.read_text().splitlines() if line.startswith(("ExecStart=",
                                                                            "ExecReload="))]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    system_units = Path("/usr/lib/systemd/system")
    if not system_units.is_dir():
        pytest.skip("no /usr/lib/systemd/system to borrow sysinit.target from")
    shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True)
    etc = root / "etc/systemd/system"
    etc.mkdir(parents=True)
    for unit in (TEMPLATE, SUPERVISORD_UNIT):
        shutil.copy(UNITS / unit, etc / unit)
        for path in exec_paths(UNITS / unit):
            stub = root / path.lstrip("/")
            stub.parent.mkdir(parents=True, exist_ok=True)
            stub.write_text("#!/bin/sh\nexit 0\n")
            stub.chmod(0o755)
    return root


def test_verify_prints_nothing(root: Path) -> None:
    units = [f"chrono-collector@{ex}.service" for ex in EXCHANGES] + [SUPERVISORD_UNIT]
    res = analyze("verify", f"--root={root}", *units)
    assert res.stdout + res.stderr == "", res.stdout + res.stderr
    assert res.returncode == 0


def test_verify_catches_a_bad_key(root: Path) -> None:
    """The check above would pass vacuously if verify ignored our files: it does not."""
    unit = root / "etc/systemd/system" / TEMPLATE
    unit.write_text(unit.read_text().replace("[Service]\n", "[Service]\nNoSuchKey=1\n"))
    res = analyze("verify", f"--root={root}", "chrono-collector@coinbase.service")
    assert "NoSuchKey" in res.stdout + res.stderr


def test_template_exposure_at_most_2(tmp_path: Path) -> None:
    instance = tmp_path / "chrono-collector@coinbase.service"
    shutil.copy(UNITS / TEMPLATE, instance)
    res = analyze("security", "--offline=true", "--threshold=20", str(instance))
    assert res.returncode == 0, res.stdout + res.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", res.stdout)
    assert match, res.stdout
    assert float(match.group(1)) <= 2.0, res.stdout


def _unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(path.read_text())
    return parser


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", value.strip())
    assert match, value
    return float(match.group(1)) * (60 if match.group(2) == "min" else 1)


def test_template_settings() -> None:
    svc = _unit(UNITS / TEMPLATE)["Service"]
    assert svc["Type"] == "notify" and _seconds(svc["WatchdogSec"]) == 30
    assert svc["ExecStart"] == "/opt/chrono-collectors/venv/bin/chrono-collector run %i"
    assert svc["DynamicUser"] == "yes" and svc["StateDirectory"] == "chrono/%i"
    assert svc["LoadCredential"] == "api_key:/etc/chrono-collectors/api_key"
    text = (UNITS / TEMPLATE).read_text()
    assert "Environment=API_KEY_FILE=%d/api_key" in text
    # systemd does not expand ${VARIABLES} in Environment= (systemd.exec(5)): such a value
    # reaches the collector literally (SPOOL_DIR=${STATE_DIRECTORY} was a relative path on a
    # read-only root: exit 2). The spool goes to $STATE_DIRECTORY/spool/<exchange> by default.
    assert not re.search(r"^Environment=.*\$\{", text, re.M)
    assert "Environment=SPOOL_DIR" not in text
    # prometheus-client's process_* metrics need /proc/stat, which ProcSubset=pid hides.
    assert not re.search(r"^ProcSubset=", text, re.M)
    assert "API_KEY=" not in text.replace("API_KEY_FILE=", "")  # never the key itself
    # worst-case drain: 5 s of delivery + one 10 s HTTP read timeout
    assert _seconds(svc["TimeoutStopSec"]) > 15


def test_supervisord_unit_outlasts_stopwaitsecs() -> None:
    svc = _unit(UNITS / SUPERVISORD_UNIT)["Service"]
    assert "-n -c /etc/chrono-collectors/supervisord.conf" in svc["ExecStart"]
    conf = configparser.RawConfigParser()
    conf.read(PRODUCTION_CONF)
    waits = [int(conf[s].get("stopwaitsecs", "10")) for s in conf.sections()
             if s.startswith("program:")]
    # supervisord stops its programs one after another: the waits add up.
    assert waits and _seconds(svc["TimeoutStopSec"]) > sum(waits)
    text = PRODUCTION_CONF.read_text()
    assert "%(here)s" not in text and "inet_http_server" not in text
    for path in ("/opt/chrono-collectors/venv/bin/", "/var/lib/chrono", "/run/chrono/",
                 "/var/log/chrono/"):
        assert path in text
    programs = [name.split(":", 1)[1] for name in conf.sections()
                if name.startswith("program:")]
    assert set(EXCHANGES) <= set(programs)
    assert not [name for name in conf.sections() if name.startswith("group:")]
