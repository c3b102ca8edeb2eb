"""Where state lives: `$CHRONO_STATE_DIR`, else systemd's `$STATE_DIRECTORY`, else `./var`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def state_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    explicit = env.get("CHRONO_STATE_DIR", "").strip()
    if explicit:
        return Path(explicit)
    systemd = env.get("STATE_DIRECTORY", "").strip()
    if systemd:
        # systemd may pass several colon-separated directories; the first is ours.
        return Path(systemd.split(":")[0])
    return Path.cwd() / "var"
