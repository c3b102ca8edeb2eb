"""JSON logs on stdout with python-json-logger (named so it never shadows stdlib `logging`).

Each line carries `timestamp`, `level`, `event` (the stable snake_case message), `logger`, the
process's static fields (`exchange`, `worker_id`, ...) and the call's `extra` data. A redaction
filter replaces any configured secret wherever it would appear, as a last line of defence: as
written, percent-encoded, JSON- or repr-escaped, and any long enough piece of it (collectors.keys).
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TextIO

from pythonjsonlogger.json import JsonFormatter

from collectors.keys import KEY_ADVICE, Redactor, key_warnings

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "warn": logging.WARNING, "error": logging.ERROR}


#: Containers in `extra` values are cleaned this many levels deep; a deeper one is logged as
#: a placeholder (never unredacted).
MAX_REDACT_DEPTH = 8
_CONTAINERS = (dict, list, tuple)
_TOO_DEEP = "[nested too deeply to log]"


class _RedactSecrets(logging.Filter):
    """Replace secrets in the message, its arguments and extra fields: strings, and the strings
    inside dicts, lists and tuples (such as the ingest's `first_problem`), keys included."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self._redact = Redactor(secrets)

    def _clean_text(self, value: str) -> str:
        return self._redact(value)

    def _clean(self, value: object, depth: int = 0) -> object:
        """`value` with every secret replaced; containers are copied, never changed in place
        (they may be the caller's)."""
        if isinstance(value, str):
            return self._clean_text(value)
        if not isinstance(value, _CONTAINERS):
            return value
        if depth >= MAX_REDACT_DEPTH:
            return _TOO_DEEP
        if isinstance(value, dict):
            return {self._clean_text(k) if isinstance(k, str) else k: self._clean(v, depth + 1)
                    for k, v in value.items()}
        items = [self._clean(v, depth + 1) for v in value]
        return tuple(items) if isinstance(value, tuple) else items

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._redact:
            return True
        record.msg = self._clean_text(record.getMessage())
        record.args = None
        for key, value in list(record.__dict__.items()):
            if isinstance(value, str):
                if key not in ("msg", "name", "levelname"):
                    record.__dict__[key] = self._clean_text(value)
            elif isinstance(value, _CONTAINERS) and key != "exc_info":
                record.__dict__[key] = self._clean(value)
        if record.exc_info and record.exc_info[1] is not None:
            # Render the traceback now, redacted, so the formatter never sees the raw text.
            record.exc_text = self._clean_text(logging.Formatter().formatException(
                record.exc_info))
            record.exc_info = None
        return True


#: Libraries whose records are tamed by _LibraryRecords (their loggers and every child).
LIBRARY_LOGGERS = ("urllib3", "requests")
#: A library's message (its template: the same warning about another URL is the same message)
#: is logged at most once in this many seconds.
LIBRARY_LOG_INTERVAL_S = 60.0
LIBRARY_DETAIL_CHARS = 300


class _LibraryRecords(logging.Filter):
    """A record of a library we use (urllib3, requests) becomes one line of ours: the stable
    event `library_warning` (or `library_error`), the library's own text in `detail` (cut
    short), no traceback, and at most once a minute per message, with the number dropped
    meanwhile in `suppressed`.

    urllib3 logs "Failed to parse headers" with a full traceback (`exc_info=True`) for every
    answer with a malformed header: an API that always sends one would put a free-text event
    and a traceback into our logs on every POST. The fact (the API's headers are broken, which
    URL) is worth a line; its traceback (urllib3's own frames) is not, and every failure that
    matters reaches our code as an exception and is logged there."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._clock = clock
        self._lock = threading.Lock()  # records come from every thread
        self._last: dict[tuple[str, str], tuple[float, int]] = {}  # -> (logged at, dropped)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.partition(".")[0] not in LIBRARY_LOGGERS:
            return True
        key = (record.name, str(record.msg))
        now = self._clock()
        with self._lock:
            if len(self._last) >= 1000:  # a library writing its data into the template
                self._last.clear()
            last, dropped = self._last.get(key, (None, 0))
            if last is not None and now - last < LIBRARY_LOG_INTERVAL_S:
                self._last[key] = (last, dropped + 1)
                return False
            self._last[key] = (now, 0)
        try:
            detail = record.getMessage()
        except (TypeError, ValueError):  # a library's bad %-arguments must not lose the line
            detail = str(record.msg)
        record.detail = detail[:LIBRARY_DETAIL_CHARS]
        record.msg = "library_error" if record.levelno >= logging.ERROR else "library_warning"
        record.args = None
        record.suppressed = dropped
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def warn_about_keys(keys: Iterable[str], variable: str) -> None:
    """Log a warning (never the key) for a key that is short or not an RFC 6750 token: it is
    accepted (the API decides which keys it takes), but easy to guess, or redacted from
    these logs only where it stands as a whole token."""
    for problem in key_warnings(keys):
        logging.getLogger(__name__).warning(f"api_key_{problem}", extra={
            "variable": variable, "hint": f"use {KEY_ADVICE}"})


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
    handler.addFilter(_LibraryRecords())  # first: what it keeps is redacted next
    handler.addFilter(_RedactSecrets(secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(LEVELS.get(level.lower(), logging.INFO))
    # urllib3 logs every retry/connection at DEBUG with URLs; keep it at WARNING (its warnings
    # are made one rate-limited line without a traceback by _LibraryRecords).
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    logging.getLogger("websocket").setLevel(logging.CRITICAL)


#: How often one kind of a repeated error line is logged, at most, and how many kinds per
#: interval (LogSampler): a flood of one defect does not hide another, and a peer that makes a
#: line repeat (endless different texts, oversized frames) cannot flood the log.
LOG_SAMPLE_INTERVAL_S = 10.0
LOG_SAMPLE_KINDS = 20
# What makes two messages differ only in detail: quoted values and numbers.
_REASON_DETAIL = re.compile(r"'[^']*'|\"[^\"]*\"|[0-9]+")


class LogSampler:
    """Decides which of a stream of error messages to log: each kind of message (its quoted
    values and numbers masked) at most once per `interval_s`, and at most `max_kinds` kinds per
    interval, so a flood of one defect does not hide another and a hostile peer sending endless
    different texts cannot flood the log (the caller passes the clock; thread-safe)."""

    def __init__(self, interval_s: float = LOG_SAMPLE_INTERVAL_S,
                 max_kinds: int = LOG_SAMPLE_KINDS) -> None:
        self.interval_s = interval_s
        self.max_kinds = max_kinds
        self._lock = threading.Lock()  # (a connection's requests come from other threads)
        # kind -> (time it was last logged, messages of that kind not logged since)
        self._logged: dict[str, tuple[float, int]] = {}

    def admit(self, message: str, now: float) -> int | None:
        """None when `message` is not to be logged now; else how many of its kind were not
        logged since one last was (the `since_last_log` of the log line)."""
        kind = _REASON_DETAIL.sub("_", message[:200])
        with self._lock:
            return self._admit(kind, now)

    def _admit(self, kind: str, now: float) -> int | None:
        logged = self._logged
        last = logged.get(kind)
        if last is not None and now - last[0] < self.interval_s:
            logged[kind] = (last[0], last[1] + 1)
            return None
        if last is None and len(logged) >= self.max_kinds:
            stale = now - 2 * self.interval_s
            for key in [k for k, (at, _n) in logged.items() if at <= stale]:
                del logged[key]
            if len(logged) >= self.max_kinds:
                return None
        logged[kind] = (now, 0)
        return 0 if last is None else last[1]
