"""Collector configuration: one frozen dataclass built from the environment, all validation here.

Nothing happens at import time. `CollectorConfig.from_env(exchange, env)` raises ConfigError
naming the variable, the problem and what is allowed; the CLI turns it into one line on stderr
and exit code 2. The API key is held with `repr=False` and never appears in a message.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import SplitResult, urlsplit, urlunsplit

import requests
from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url

from collectors import exchanges, paths
from collectors.errors import ConfigError
from collectors.keys import Redactor, check_key, read_key_file
from collectors.logsetup import LEVELS
from collectors.model import canonical_symbol_ok

_WORKER_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
#: Appended to API_BASE_URL by the collector (contract.md, "Ingest HTTP API").
INGEST_PATH = "/internal/ingest"
MAX_SYMBOLS = 1000


@dataclass(frozen=True, slots=True)
class CollectorConfig:
    """Everything one collector process needs, validated."""

    exchange: str
    api_base_url: str
    api_key: str = field(repr=False)
    worker_id: str
    symbols: tuple[str, ...]
    batch_size: int
    batch_interval_s: float
    log_level: str
    ws_url: str
    metrics_host: str
    metrics_port: int
    spool_dir: Path
    spool_max_bytes: int
    spool_fsync_interval_s: float
    http_connect_timeout_s: float
    http_read_timeout_s: float
    liveness_timeout_s: float
    retry_max_s: float
    delivery_concurrency: int = 1

    @property
    def ingest_url(self) -> str:
        return self.api_base_url.rstrip("/") + INGEST_PATH

    @classmethod
    def from_env(cls, exchange: str, env: Mapping[str, str] | None = None) -> CollectorConfig:
        env = os.environ if env is None else env
        # The key first: every later error may echo a value (a URL) the key could hide in,
        # and is said with the key redacted (_echo_safe).
        api_key = _api_key(env)
        with _echo_safe(api_key):
            return cls._from_env(exchange, env, api_key)

    @classmethod
    def _from_env(cls, exchange: str, env: Mapping[str, str], api_key: str) -> CollectorConfig:
        if exchange not in exchanges.REGISTRY:
            raise ConfigError("EXCHANGE", f"unknown exchange {exchange!r}",
                              "known: " + ", ".join(exchanges.known()))
        adapter = exchanges.create(exchange, "config-check")

        symbols = _symbols(env.get("SYMBOLS"), adapter.default_symbols)
        adapter.check_symbols(symbols)
        metrics_port_default = exchanges.DEFAULT_METRICS_PORTS.get(exchange, 9100)
        return cls(
            exchange=exchange,
            api_base_url=_api_base_url(env),
            api_key=api_key,
            worker_id=_worker_id(env, f"worker-{exchange}"),
            symbols=symbols,
            batch_size=_int(env, "BATCH_SIZE", 100, 1, 10_000),
            batch_interval_s=_int(env, "BATCH_INTERVAL_MS", 5000, 10, 3_600_000) / 1000.0,
            log_level=_log_level(env),
            ws_url=_ws_url(env, adapter.default_ws_url, base_only=adapter.ws_url_is_base),
            metrics_host=_host(env, "METRICS_HOST", "127.0.0.1"),
            metrics_port=_int(env, "METRICS_PORT", metrics_port_default, 0, 65535),
            spool_dir=_path(env, "SPOOL_DIR", paths.state_dir(env) / "spool" / exchange),
            spool_max_bytes=_int(env, "SPOOL_MAX_BYTES", 2 * 1024**3, 1024 * 1024, 1024**4),
            spool_fsync_interval_s=_int(env, "SPOOL_FSYNC_INTERVAL_MS", 1000, 0, 60_000) / 1000.0,
            http_connect_timeout_s=_float(env, "HTTP_CONNECT_TIMEOUT_S", 3.0, 0.1, 60.0),
            http_read_timeout_s=_float(env, "HTTP_READ_TIMEOUT_S", 10.0, 0.1, 300.0),
            liveness_timeout_s=_float(env, "WS_LIVENESS_TIMEOUT_S", adapter.liveness_timeout_s,
                                      1.0, 600.0),
            retry_max_s=_float(env, "DELIVERY_RETRY_MAX_S", 30.0, 0.5, 600.0),
            delivery_concurrency=_int(env, "DELIVERY_CONCURRENCY", 1, 1, 16),
        )


@contextmanager
def _echo_safe(*keys: str) -> Iterator[None]:
    """A ConfigError raised inside is raised again with every form of `keys` redacted."""
    try:
        yield
    except ConfigError as exc:
        redact = Redactor(keys)
        raise ConfigError(exc.variable, redact(exc.problem), redact(exc.allowed)) from None


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None:
        return None
    value = value.strip()
    return value or None


def _int(env: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = _get(env, name)
    if raw is None:
        return default
    # Plain digits only (a minus sign is said to be out of range): int() would also take
    # "1_0" (as 10), "+5" and non-ASCII digits.
    digits = raw[1:] if raw.startswith("-") else raw
    if not (digits.isascii() and digits.isdigit()):
        raise ConfigError(name, f"{raw[:40]!r} is not a whole number",
                          f"digits only, an integer from {lo} to {hi}")
    value = int(raw, 10)
    if not lo <= value <= hi:
        raise ConfigError(name, f"{value} is out of range", f"an integer from {lo} to {hi}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, lo: float, hi: float) -> float:
    raw = _get(env, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(name, f"{raw[:40]!r} is not a number", f"a number from {lo} to {hi}") \
            from None
    if not lo <= value <= hi:  # also rejects NaN
        raise ConfigError(name, f"{raw[:40]} is out of range", f"a number from {lo} to {hi}")
    return value


def _http_url(env: Mapping[str, str], name: str) -> str:
    raw = _get(env, name)
    if raw is None:
        raise ConfigError(name, "is required", "e.g. http://127.0.0.1:3000")
    parts = _split_url(name, raw, "e.g. http://127.0.0.1:3000")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(name, f"{_shown_url(parts)!r} is not an http(s) URL",
                          "e.g. http://127.0.0.1:3000")
    if parts.username or parts.password:
        raise ConfigError(name, "must not contain credentials", "put the key in API_KEY_FILE")
    if parts.query or parts.fragment:
        raise ConfigError(name, "must not have a query or fragment", "a base URL like https://host")
    try:
        port = parts.port  # raises ValueError for a bad port
    except ValueError:
        raise ConfigError(name, "has an invalid port", "1-65535") from None
    if port == 0:  # urllib3 would quietly connect to the scheme's default port instead
        raise ConfigError(name, "has an invalid port (0)", "1-65535")
    _check_host(name, raw)
    return raw.rstrip("/")


def _api_base_url(env: Mapping[str, str]) -> str:
    """API_BASE_URL, refused when it is the full ingest URL: the collector would POST to
    .../internal/ingest/internal/ingest, get 404 and (a 4xx: the contract's dead letter)
    dead-letter every batch while the API is healthy."""
    url = _http_url(env, "API_BASE_URL")
    parts = urlsplit(url)  # _http_url split it already: no ValueError
    path = parts.path.rstrip("/")
    if path.endswith(INGEST_PATH):
        base = urlunsplit(parts._replace(path=path.removesuffix(INGEST_PATH)))
        # (credentials were refused before: the URL may be echoed; _echo_safe hides a key)
        raise ConfigError("API_BASE_URL",
                          f"{_shown_url(parts)!r} ends in {INGEST_PATH}, which the collector "
                          "appends itself",
                          f"set the base URL: API_BASE_URL={base[:80]}")
    return url


def _check_host(name: str, raw: str) -> None:
    """The URL's host as the sender will see it (urllib3's parser): no whitespace, no empty
    label (`a..b`, `.a`), so an address that can never be reached is refused at start."""
    try:
        host = parse_url(raw).host or ""
    except LocationParseError:  # e.g. a space in the host
        host = ""
    bad = not host or any(ch.isspace() for ch in host) or "" in host.split(".")
    if not bad:
        # What requests itself refuses when it prepares the POST (`*.example.com`, a label
        # IDNA cannot encode): it was a traceback at start.
        try:
            requests.models.PreparedRequest().prepare_url(raw, None)
        except requests.exceptions.RequestException:
            bad = True
    if bad:
        # (credentials were refused before: the URL may be echoed)
        raise ConfigError(name, f"the host of {raw[:80]!r} is not a host name or address",
                          "e.g. http://127.0.0.1:3000 or https://ingest.example.com")


def _ws_url(env: Mapping[str, str], default: str, *, base_only: bool = False) -> str:
    """`base_only`: the venue's path and query are the adapter's (Binance puts the streams
    there), so WS_URL is the base address alone."""
    raw = _get(env, "WS_URL")
    if raw is None:
        return default
    parts = _split_url("WS_URL", raw, f"e.g. {default}")
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ConfigError("WS_URL", f"{_shown_url(parts)!r} is not a ws:// or wss:// URL",
                          f"e.g. {default}")
    if any(ch.isspace() or not ch.isprintable() for ch in raw):
        # (a venue answers the request line it makes with 400, for ever)
        raise ConfigError("WS_URL", "contains whitespace or control characters",
                          f"percent-encode them, e.g. %20; e.g. {default}")
    if "#" in raw:
        raise ConfigError("WS_URL", "has a #fragment, which is never sent", f"e.g. {default}")
    if base_only and (parts.path not in ("", "/") or "?" in raw):
        raise ConfigError("WS_URL", f"{_shown_url(parts)!r} has a path or query",
                          f"the base address alone, e.g. {default}: the collector adds "
                          "/stream?streams=... for the symbols")
    if parts.username or parts.password:  # it is logged: no secrets in it
        raise ConfigError("WS_URL", "must not contain credentials", "public market data needs none")
    try:
        parts.port  # noqa: B018
    except ValueError:
        raise ConfigError("WS_URL", "has an invalid port", "1-65535") from None
    return raw


def _split_url(name: str, raw: str, expected: str) -> SplitResult:
    try:
        return urlsplit(raw)
    except ValueError as exc:  # e.g. "Invalid IPv6 URL" for http://[::1
        raise ConfigError(name, f"is not a URL ({exc})", expected) from None


def _shown_url(parts: SplitResult) -> str:
    """A URL as it may be echoed: without credentials, at most 80 characters."""
    netloc = parts.netloc.rpartition("@")[2] if "@" in parts.netloc else parts.netloc
    return urlunsplit(parts._replace(netloc=netloc))[:80]


def _api_key(env: Mapping[str, str]) -> str:
    direct = env.get("API_KEY")
    path = _get(env, "API_KEY_FILE")
    if direct is not None and direct.strip() and path:
        raise ConfigError("API_KEY", "both API_KEY and API_KEY_FILE are set", "set only one")
    if path:
        return check_key("API_KEY_FILE", read_key_file("API_KEY_FILE", path))
    key = (direct or "").strip()
    if not key:
        raise ConfigError("API_KEY", "is required (empty or unset)",
                          "set API_KEY, or API_KEY_FILE to a file holding the key")
    # Said without echoing any part of the key: a bearer token's characters only, so the key
    # can be sent, and found in the logs in every form it may take there (collectors.keys).
    return check_key("API_KEY", key)


def _worker_id(env: Mapping[str, str], default: str) -> str:
    raw = _get(env, "WORKER_ID")
    if raw is None:
        return default
    if not _WORKER_ID_RE.fullmatch(raw):
        raise ConfigError("WORKER_ID", f"{raw[:80]!r} is not allowed",
                          "1-64 characters of A-Z a-z 0-9 . _ -")
    return raw


def _symbols(raw: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    if raw is None or not raw.strip():
        return default
    out: list[str] = []
    for item in raw.split(","):
        symbol = item.strip().upper()
        if not symbol:
            continue
        if not canonical_symbol_ok(symbol):
            raise ConfigError("SYMBOLS", f"{item.strip()[:40]!r} is not a BASE/QUOTE symbol",
                              "comma-separated like BTC/USD,ETH/USD")
        if symbol not in out:
            out.append(symbol)
    if not out:
        raise ConfigError("SYMBOLS", "lists no symbol", "comma-separated like BTC/USD,ETH/USD")
    if len(out) > MAX_SYMBOLS:
        raise ConfigError("SYMBOLS", f"lists {len(out)} symbols", f"at most {MAX_SYMBOLS}")
    return tuple(out)


def _log_level(env: Mapping[str, str]) -> str:
    raw = _get(env, "LOG_LEVEL")
    if raw is None:
        return "info"
    if raw.lower() not in LEVELS:
        raise ConfigError("LOG_LEVEL", f"{raw[:40]!r} is not a level",
                          "debug, info, warning (or warn), error")
    return raw.lower()


def _host(env: Mapping[str, str], name: str, default: str) -> str:
    raw = _get(env, name)
    if raw is None:
        return default
    if len(raw) > 253 or not re.fullmatch(r"[A-Za-z0-9.:_-]+", raw):
        raise ConfigError(name, f"{raw[:80]!r} is not a host name or address",
                          "e.g. 127.0.0.1 or 0.0.0.0 (IPv4)")
    return raw


def _path(env: Mapping[str, str], name: str, default: Path) -> Path:
    raw = _get(env, name)
    path = Path(raw) if raw is not None else default
    try:
        if path.exists() and not path.is_dir():
            raise ConfigError(name, f"{path} exists and is not a directory", "a directory path")
    except OSError as exc:  # a parent we may not search
        raise ConfigError(name, f"{path} cannot be checked: {exc.strerror}",
                          "a directory this user can reach") from None
    return path
