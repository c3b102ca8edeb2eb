"""IngestConfig.from_env: defaults, every variable's validation, keys never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from collectors.errors import ConfigError
from collectors.ingest.config import IngestConfig, redact_url

KEY = "s3cret-key-value-123456"


def test_defaults(tmp_path: Path) -> None:
    cfg = IngestConfig.from_env({"API_KEY": KEY, "CHRONO_STATE_DIR": str(tmp_path)})
    assert cfg.host == "127.0.0.1"
    assert cfg.port == 3000
    assert cfg.api_keys == (KEY,)
    assert cfg.database_url == f"sqlite:///{tmp_path}/ingest.db"
    assert cfg.max_body_bytes == 8 * 1024 * 1024
    assert cfg.max_feeds == 10_000
    assert cfg.threads == 8
    assert cfg.log_level == "info"


def test_all_variables(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("  file-key-abcdef-0123\n")
    cfg = IngestConfig.from_env({
        "API_KEY": KEY, "API_KEYS": "k1-aaaa-0123456789, k2-bbbb-0123456789,,",
        "API_KEY_FILE": str(key_file),
        "INGEST_HOST": "0.0.0.0", "INGEST_PORT": "0", "DATABASE_URL": "postgres://u@h:5433/db",
        "INGEST_MAX_BODY_BYTES": "65536", "INGEST_MAX_FEEDS": "500", "INGEST_THREADS": "2",
        "LOG_LEVEL": "WARN",
    })
    assert cfg.api_keys == (KEY, "k1-aaaa-0123456789", "k2-bbbb-0123456789", "file-key-abcdef-0123")
    assert (cfg.host, cfg.port) == ("0.0.0.0", 0)
    assert cfg.database_url == "postgres://u@h:5433/db"
    assert (cfg.max_body_bytes, cfg.max_feeds, cfg.threads) == (65536, 500, 2)
    assert cfg.log_level == "warn"


@pytest.mark.parametrize("url", [
    "sqlite:///relative/path.db", "sqlite:////abs/path.db",
    "postgresql://postgres@127.0.0.1:5432/test", "postgres://u:pw@db.example:5432/x",
])
def test_database_urls_accepted(url: str) -> None:
    assert IngestConfig.from_env({"API_KEY": KEY, "DATABASE_URL": url}).database_url == url


@pytest.mark.parametrize(("env", "variable"), [
    ({}, "API_KEY"),
    ({"API_KEY": "  "}, "API_KEY"),
    ({"API_KEY": "has space"}, "API_KEY"),
    ({"API_KEYS": "ok-key,bad key"}, "API_KEYS"),
    ({"API_KEY_FILE": "/nonexistent/key"}, "API_KEY_FILE"),
    ({"API_KEY": KEY, "INGEST_PORT": "70000"}, "INGEST_PORT"),
    ({"API_KEY": KEY, "INGEST_PORT": "http"}, "INGEST_PORT"),
    ({"API_KEY": KEY, "INGEST_PORT": "-1"}, "INGEST_PORT"),
    ({"API_KEY": KEY, "INGEST_PORT": "9" * 5000}, "INGEST_PORT"),
    ({"API_KEY": KEY, "INGEST_HOST": "bad host"}, "INGEST_HOST"),
    ({"API_KEY": KEY, "DATABASE_URL": "mysql://x/y"}, "DATABASE_URL"),
    ({"API_KEY": KEY, "DATABASE_URL": "sqlite:///"}, "DATABASE_URL"),
    ({"API_KEY": KEY, "DATABASE_URL": "sqlite://relative.db"}, "DATABASE_URL"),
    ({"API_KEY": KEY, "DATABASE_URL": "postgresql://[broken"}, "DATABASE_URL"),
    ({"API_KEY": KEY, "INGEST_MAX_BODY_BYTES": "10"}, "INGEST_MAX_BODY_BYTES"),
    ({"API_KEY": KEY, "INGEST_MAX_FEEDS": "0"}, "INGEST_MAX_FEEDS"),
    ({"API_KEY": KEY, "INGEST_THREADS": "1.5"}, "INGEST_THREADS"),
    ({"API_KEY": KEY, "LOG_LEVEL": "verbose"}, "LOG_LEVEL"),
])
def test_bad_values_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as info:
        IngestConfig.from_env(env)
    assert info.value.variable == variable
    assert "\n" not in str(info.value)
    assert str(info.value).startswith(variable + ":")


def test_empty_key_file(tmp_path: Path) -> None:
    empty = tmp_path / "key"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="API_KEY_FILE"):
        IngestConfig.from_env({"API_KEY_FILE": str(empty)})


def test_keys_never_in_repr_or_errors(tmp_path: Path) -> None:
    cfg = IngestConfig.from_env({"API_KEY": KEY,
                                 "DATABASE_URL": "postgresql://u:hunter2pw@h/db"})
    assert KEY not in repr(cfg)
    assert "hunter2pw" not in repr(cfg)
    assert "hunter2pw" not in cfg.database_url_redacted
    assert KEY in cfg.secrets()
    assert "hunter2pw" in cfg.secrets()
    secret = "bad key-with-a-space-SECRETPART"
    with pytest.raises(ConfigError) as info:
        IngestConfig.from_env({"API_KEY": secret})
    assert "SECRETPART" not in str(info.value)
    bad_file = tmp_path / "key"
    bad_file.write_text("two words SECRETPART")
    with pytest.raises(ConfigError) as info:
        IngestConfig.from_env({"API_KEY_FILE": str(bad_file)})
    assert "SECRETPART" not in str(info.value)


def test_redact_url() -> None:
    assert redact_url("postgresql://u:pw@h:1/db") == "postgresql://u:***@h:1/db"
    assert redact_url("postgresql://u@h/db") == "postgresql://u@h/db"
    assert redact_url("sqlite:///x.db") == "sqlite:///x.db"


@pytest.mark.parametrize(("env", "variable", "problem"), [
    ({"API_KEY": "has space-0123456789"}, "API_KEY", "whitespace"),
    ({"API_KEYS": f"{KEY},Sec\"ret Key-0123456789"}, "API_KEYS", "whitespace"),
    ({"API_KEY": "k" * 4097}, "API_KEY", "too long"),
])
def test_keys_a_header_cannot_carry_are_refused(env: dict[str, str], variable: str,
                                                problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        IngestConfig.from_env(env)
    assert info.value.variable == variable and problem in str(info.value)
    assert "0123456789" not in str(info.value) and "kkkkkkkk" not in str(info.value)


def test_short_and_unusual_keys_are_accepted() -> None:
    # The collectors' operator and the API's agree on a key; the API does not judge it.
    config = IngestConfig.from_env({"API_KEYS": "k,Sec%22ret-Key-0123456789"})
    assert config.api_keys == ("k", "Sec%22ret-Key-0123456789")


def test_the_key_file_is_read_up_to_64_kib() -> None:
    # read_text() of /dev/zero ended in MemoryError.
    with pytest.raises(ConfigError, match=r"API_KEY_FILE: /dev/zero is larger than 65536"):
        IngestConfig.from_env({"API_KEY_FILE": "/dev/zero"})


def test_a_later_error_echoing_the_key_is_redacted() -> None:
    with pytest.raises(ConfigError) as info:
        IngestConfig.from_env({"API_KEY": KEY, "INGEST_HOST": f"x {KEY}"})
    assert info.value.variable == "INGEST_HOST"
    assert "[REDACTED]" in str(info.value) and "value-12" not in str(info.value)
