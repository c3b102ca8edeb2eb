"""IngestConfig: the ingest API's settings, read and validated from the environment at start."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

from psycopg import Error as PsycopgError
from psycopg.conninfo import conninfo_to_dict

from collectors import paths
from collectors.errors import ConfigError
from collectors.keys import KEY_ADVICE, Redactor, check_key, read_key_file
from collectors.logsetup import LEVELS

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 3000
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_FEEDS = 10_000
DEFAULT_THREADS = 8

_HOST_RE = re.compile(r"[A-Za-z0-9.:_\[\]-]+")
_INT_RE = re.compile(r"[0-9]{1,12}")


@dataclass(frozen=True, slots=True)
class IngestConfig:
    """Everything `chrono-collector ingest` needs. Keys and the database URL stay out of repr."""

    api_keys: tuple[str, ...] = field(repr=False)
    database_url: str = field(repr=False)
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_feeds: int = DEFAULT_MAX_FEEDS
    threads: int = DEFAULT_THREADS
    log_level: str = "info"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> IngestConfig:
        """Read every variable; raises ConfigError naming the first bad one (the keys are
        read first, and a later error that echoes a value says it with the keys redacted)."""
        api_keys = api_keys_from_env(env)
        try:
            return cls._from_env(env, api_keys)
        except ConfigError as exc:
            redact = Redactor(api_keys)
            raise ConfigError(exc.variable, redact(exc.problem), redact(exc.allowed)) from None

    @classmethod
    def _from_env(cls, env: Mapping[str, str], api_keys: tuple[str, ...]) -> IngestConfig:
        return cls(
            api_keys=api_keys,
            database_url=database_url_from_env(env),
            host=_host(env),
            port=_int(env, "INGEST_PORT", DEFAULT_PORT, 0, 65535,
                      allowed="0 (any free port) to 65535"),
            max_body_bytes=_int(env, "INGEST_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES,
                                1024, 1024 * 1024 * 1024, allowed="bytes, 1024 to 1073741824"),
            max_feeds=_int(env, "INGEST_MAX_FEEDS", DEFAULT_MAX_FEEDS, 1, 1_000_000,
                           allowed="records per batch, 1 to 1000000"),
            threads=_int(env, "INGEST_THREADS", DEFAULT_THREADS, 1, 256, allowed="1 to 256"),
            log_level=log_level_from_env(env),
        )

    @property
    def database_url_redacted(self) -> str:
        """The database URL with any password replaced, fit for logs."""
        return redact_url(self.database_url)

    def secrets(self) -> tuple[str, ...]:
        """Strings the log redaction filter must never let through."""
        return (*self.api_keys, *database_secrets(self.database_url))


def api_keys_from_env(env: Mapping[str, str]) -> tuple[str, ...]:
    """The accepted keys from API_KEY, API_KEYS and API_KEY_FILE together (key rotation)."""
    keys: list[str] = []
    single = env.get("API_KEY", "").strip()
    if single:
        keys.append(_check_key("API_KEY", single))
    for part in env.get("API_KEYS", "").split(","):
        if part.strip():
            keys.append(_check_key("API_KEYS", part.strip()))
    key_file = env.get("API_KEY_FILE", "").strip()
    if key_file:
        # Read as the collector reads it: at most 64 KiB (API_KEY_FILE=/dev/zero is refused).
        keys.append(_check_key("API_KEY_FILE", read_key_file("API_KEY_FILE", key_file)))
    if not keys:
        raise ConfigError("API_KEY", "no API key is set",
                          "set API_KEY, API_KEYS (comma-separated) or API_KEY_FILE")
    return tuple(dict.fromkeys(keys))


def database_url_from_env(env: Mapping[str, str]) -> str:
    """DATABASE_URL, checked, or the default SQLite file in the state directory."""
    url = env.get("DATABASE_URL", "").strip()
    if not url:
        return f"sqlite:///{paths.state_dir(env)}/ingest.db"
    check_database_url(url)
    return url


def check_database_url(url: str) -> None:
    """Raises ConfigError (naming DATABASE_URL, never echoing a password) for a bad URL."""
    allowed = "sqlite:///path/to/file.db or postgresql://user@host:port/db"
    if url.startswith("sqlite:///"):
        if not url[len("sqlite:///"):].strip() or "?" in url:
            raise ConfigError("DATABASE_URL", "sqlite URL without a file path", allowed)
        return
    if url.startswith(("postgresql://", "postgres://")):
        try:
            conninfo_to_dict(url)
        except PsycopgError:
            raise ConfigError("DATABASE_URL", f"not a valid PostgreSQL URL: {redact_url(url)}",
                              allowed) from None
        return
    scheme = url.split(":", 1)[0][:20] if ":" in url else "(none)"
    raise ConfigError("DATABASE_URL", f"unsupported scheme {scheme!r}", allowed)


def database_secrets(url: str) -> tuple[str, ...]:
    """The password in a PostgreSQL URL, as written and decoded, for log redaction."""
    if not url.startswith(("postgresql://", "postgres://")):
        return ()
    try:
        raw = urlsplit(url).password
        decoded = conninfo_to_dict(url).get("password")
    except (ValueError, PsycopgError):
        return ()
    return tuple(dict.fromkeys(p for p in (raw, decoded) if isinstance(p, str) and p))


def log_level_from_env(env: Mapping[str, str]) -> str:
    level = env.get("LOG_LEVEL", "").strip().lower() or "info"
    if level not in LEVELS:
        raise ConfigError("LOG_LEVEL", f"unknown level {level[:20]!r}",
                          "debug, info, warning (or warn), error")
    return level


def redact_url(url: str) -> str:
    """`scheme://user:***@host/db` for a URL with a password; other URLs unchanged."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rsplit("@", 1)[1]
        user = parts.username or ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))
    except ValueError:
        return "(unparseable URL)"


def _check_key(variable: str, key: str) -> str:
    # What a header can carry, and no comma (API_KEYS splits on commas); never echoing the
    # key, not even in part.
    if "," in key:
        raise ConfigError(variable, "a key contains a comma", KEY_ADVICE)
    return check_key(variable, key)


def _host(env: Mapping[str, str]) -> str:
    host = env.get("INGEST_HOST", "").strip() or DEFAULT_HOST
    if _HOST_RE.fullmatch(host) is None or len(host) > 253:
        raise ConfigError("INGEST_HOST", f"not a host name or address: {host[:40]!r}",
                          "an IP address or host name, e.g. 127.0.0.1 or 0.0.0.0")
    return host


def _int(env: Mapping[str, str], variable: str, default: int, low: int, high: int, *,
         allowed: str) -> int:
    raw = env.get(variable, "").strip()
    if not raw:
        return default
    if _INT_RE.fullmatch(raw) is None:
        raise ConfigError(variable, f"not a whole number: {raw[:20]!r}", allowed)
    value = int(raw)
    if not low <= value <= high:
        raise ConfigError(variable, f"{value} is out of range", allowed)
    return value
