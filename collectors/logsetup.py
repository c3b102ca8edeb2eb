"""JSON logs on stdout with python-json-logger (named so it never shadows stdlib `logging`).

Each line carries `timestamp`, `level`, `event` (the stable snake_case message), `logger`, the
process's static fields (`exchange`, `worker_id`, ...) and the call's `extra` data. A redaction
filter replaces any configured secret wherever it would appear, as a last line of defence.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Mapping
from typing import TextIO

from pythonjsonlogger.json import JsonFormatter

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "warn": logging.WARNING, "error": logging.ERROR}


class _RedactSecrets(logging.Filter):
    """Replace secrets in the message, its arguments and extra string fields."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self._secrets = tuple(s for s in secrets if s)

    def _clean(self, value: object) -> object:
        if isinstance(value, str):
            for secret in self._secrets:
                if secret in value:
                    value = value.replace(secret, "[REDACTED]")
        return value

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._secrets:
            return True
        record.msg = self._clean(record.getMessage())
        record.args = None
        for key, value in list(record.__dict__.items()):
            if isinstance(value, str) and key not in ("msg", "name", "levelname"):
                record.__dict__[key] = self._clean(value)
        if record.exc_info and record.exc_info[1] is not None:
            # Render the traceback now, redacted, so the formatter never sees the raw text.
            record.exc_text = str(self._clean(logging.Formatter().formatException(record.exc_info)))
            record.exc_info = None
        return True


def setup_logging(level: str = "info", *, static: Mapping[str, str] | None = None,
                  secrets: Iterable[str] = (), stream: TextIO | None = None) -> None:
    """Send every log record to `stream` (stdout) as one JSON object a line."""
    handler = logging.StreamHandler(stream or sys.stdout)
    formatter = JsonFormatter(
        "{asctime}{levelname}{message}{name}",
        style="{",
        rename_fields={"asctime": "timestamp", "levelname": "level", "message": "event",
                       "name": "logger"},
        static_fields=dict(static or {}),
        timestamp=False,
    )
    formatter.default_time_format = "%Y-%m-%dT%H:%M:%S"
    formatter.default_msec_format = "%s.%03dZ"
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    handler.addFilter(_RedactSecrets(secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(LEVELS.get(level.lower(), logging.INFO))
    # urllib3 logs every retry/connection at DEBUG with URLs; keep it at WARNING.
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    logging.getLogger("websocket").setLevel(logging.CRITICAL)

