"""deploy/install.sh, staged below a temporary root (never the host's /etc or /opt): it lays
down the package, config, secret and units, and a second run changes nothing it should keep."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

from tests.ops.helpers import ROOT


def _install(root: Path, key_file: Path, base_url: str,
             path: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CHRONO_INSTALL_ROOT": str(root), "SYSTEMCTL": "true",
           "CHRONO_API_KEY_FILE": str(key_file), "CHRONO_API_BASE_URL": base_url}
    if path is not None:
        env["PATH"] = path
    return subprocess.run(["bash", str(ROOT / "deploy" / "install.sh"), "coinbase", "kraken"],
                          env=env, capture_output=True, text=True, timeout=300, check=False)


def fake_accounts(tmp_path: Path) -> tuple[str, Path]:
    """getent, useradd and chown stand-ins (the host's accounts are never touched): useradd
    creates a user getent then finds; every call is logged. Returns (PATH, log)."""
    bin_dir, log, users = tmp_path / "fakebin", tmp_path / "accounts.log", tmp_path / "users"
    bin_dir.mkdir()
    scripts = {
        "getent": f'echo "getent $*" >> {log}\n'
                  f'[ "$1" = passwd ] && grep -qx "$2" {users} 2>/dev/null || exit 2\n'
                  'echo "$2:x:999:999::/var/lib/chrono:/usr/sbin/nologin"\n',
        "useradd": f'echo "useradd $*" >> {log}\n'
                   f'for last; do :; done; echo "$last" >> {users}\n',
        "chown": f'echo "chown $*" >> {log}\n',
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod(0o755)
    return f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}", log


def test_install_is_complete_and_idempotent(tmp_path: Path) -> None:
    root = tmp_path / "root"
    key = tmp_path / "key"
    key.write_text("first-key\n")
    path, accounts = fake_accounts(tmp_path)
    first = _install(root, key, "http://127.0.0.1:3000", path)
    assert first.returncode == 0, first.stderr[-2000:]
    etc = root / "etc" / "chrono-collectors"
    assert (etc / "api_key").read_text() == "first-key\n"
    assert stat.S_IMODE((etc / "api_key").stat().st_mode) == 0o400
    # systemd reads the key as root and hands it to the dynamic user: no account, no chown
    assert not accounts.exists(), accounts.read_text()
    assert stat.S_IMODE((etc / "coinbase.env").stat().st_mode) == 0o600
    assert "API_BASE_URL=http://127.0.0.1:3000" in (etc / "kraken.env").read_text()
    units = root / "etc" / "systemd" / "system"
    assert {p.name for p in units.iterdir()} == {"chrono-collector@.service",
                                                 "chrono-supervisord.service"}
    cli = root / "opt" / "chrono-collectors" / "venv" / "bin" / "chrono-collector"
    version = subprocess.run([str(cli), "--version"], capture_output=True, text=True,
                             check=False, timeout=30)
    assert version.returncode == 0 and "chrono-collector" in version.stdout

    key.write_text("second-key\n")
    second = _install(root, key, "http://elsewhere")
    assert second.returncode == 0, second.stderr[-2000:]
    assert (etc / "api_key").read_text() == "first-key\n"      # an installed key is kept
    assert "http://127.0.0.1:3000" in (etc / "kraken.env").read_text()  # so is local config


def test_install_refuses_without_an_api_base_url(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("k\n")
    env = {**os.environ, "CHRONO_INSTALL_ROOT": str(tmp_path / "root"), "SYSTEMCTL": "true",
           "CHRONO_API_KEY_FILE": str(key)}
    env.pop("CHRONO_API_BASE_URL", None)
    result = subprocess.run(["bash", str(ROOT / "deploy" / "install.sh"), "coinbase"], env=env,
                            capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode != 0
    assert "CHRONO_API_BASE_URL" in result.stderr


def test_supervisord_layout_points_at_the_given_api_and_keeps_an_edited_config(
        tmp_path: Path) -> None:
    root = tmp_path / "root"
    key = tmp_path / "key"
    key.write_text("k\n")
    calls = tmp_path / "systemctl.log"
    fake = tmp_path / "systemctl"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    path, accounts = fake_accounts(tmp_path)
    env = {**os.environ, "CHRONO_INSTALL_ROOT": str(root), "SYSTEMCTL": str(fake),
           "CHRONO_API_KEY_FILE": str(key), "CHRONO_LAYOUT": "supervisord",
           "CHRONO_API_BASE_URL": "https://ingest.example/api%2Fv1", "PATH": path}
    script = str(ROOT / "deploy" / "install.sh")
    first = subprocess.run(["bash", script], env=env, capture_output=True, text=True,
                           timeout=300, check=False)
    assert first.returncode == 0, first.stderr[-2000:]
    # chrono-supervisord.service runs as User=chrono: the user is created and owns the key
    api_key = root / "etc" / "chrono-collectors" / "api_key"
    assert stat.S_IMODE(api_key.stat().st_mode) == 0o400
    assert accounts.read_text().splitlines() == [
        "getent passwd chrono",
        "useradd --system --user-group --home-dir /var/lib/chrono --shell /usr/sbin/nologin "
        "chrono",
        f"chown chrono:chrono {api_key}"]
    unit = (root / "etc" / "systemd" / "system" / "chrono-supervisord.service").read_text()
    assert "\nUser=chrono\n" in unit and "\nGroup=chrono\n" in unit
    conf = root / "etc" / "chrono-collectors" / "supervisord.conf"
    # supervisord expands %(...)s: the URL's own % is written %%.
    assert 'API_BASE_URL="https://ingest.example/api%%2Fv1"' in conf.read_text()
    assert "127.0.0.1:3000\"," not in conf.read_text()
    systemctl = calls.read_text().splitlines()
    assert "enable chrono-supervisord.service" in systemctl
    # One layout, not both: the per-exchange units are stopped, never enabled.
    assert not any(line.startswith(("enable chrono-collector@", "restart chrono-collector@"))
                   for line in systemctl)
    assert "disable --now chrono-collector@kraken.service" in systemctl

    conf.write_text(conf.read_text().replace("ingest.example", "edited.example"))
    second = subprocess.run(["bash", script], env={**env, "CHRONO_API_BASE_URL": "http://x"},
                            capture_output=True, text=True, timeout=300, check=False)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "edited.example" in conf.read_text()  # an installed config is kept
    # the user exists now: not created twice; the key is (still) its own
    calls = accounts.read_text().splitlines()
    assert sum(line.startswith("useradd") for line in calls) == 1, calls
    assert calls[-2:] == ["getent passwd chrono", f"chown chrono:chrono {api_key}"], calls


def test_a_layout_switch_names_the_other_layouts_spool_left_behind(tmp_path: Path) -> None:
    # The two layouts keep their spools in different places: records waiting in the old one
    # when the layout was switched sat there unsent, with no word about them.
    root = tmp_path / "root"
    key = tmp_path / "key"
    key.write_text("k\n")
    old = root / "var" / "lib" / "chrono" / "spool" / "kraken"
    old.mkdir(parents=True)
    (old / "spool.db").write_bytes(b"")
    result = _install(root, key, "http://127.0.0.1:3000")  # the systemd layout
    assert result.returncode == 0, result.stderr[-2000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(old) in warnings[0] and "kraken" in warnings[0]


def test_install_refuses_an_unknown_layout(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("k\n")
    env = {**os.environ, "CHRONO_INSTALL_ROOT": str(tmp_path / "root"), "SYSTEMCTL": "true",
           "CHRONO_API_KEY_FILE": str(key), "CHRONO_API_BASE_URL": "http://127.0.0.1:3000",
           "CHRONO_LAYOUT": "docker"}
    result = subprocess.run(["bash", str(ROOT / "deploy" / "install.sh")], env=env,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "CHRONO_LAYOUT" in result.stderr
    assert not (tmp_path / "root").exists()  # refused before changing anything
