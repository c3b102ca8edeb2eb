"""Configuration: every variable validated, one clear error each, the key never shown."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from collectors import keys
from collectors.config import CollectorConfig
from collectors.errors import ConfigError
from collectors.keys import key_warnings

ROOT = Path(__file__).resolve().parents[2]
BASE = {"API_BASE_URL": "http://127.0.0.1:3000", "API_KEY": "s3cret-key-0123456789"}


def load(**over: str) -> CollectorConfig:
    return CollectorConfig.from_env("coinbase", {**BASE, **over})


def test_defaults_follow_the_contract(tmp_path: Path) -> None:
    cfg = CollectorConfig.from_env("coinbase", {**BASE, "CHRONO_STATE_DIR": str(tmp_path)})
    assert cfg.worker_id == "worker-coinbase"
    assert cfg.symbols == ("BTC/USD", "ETH/USD", "SOL/USD", "XRP/USD", "DOGE/USD")
    assert (cfg.batch_size, cfg.batch_interval_s) == (100, 5.0)
    assert cfg.ws_url == "wss://ws-feed.exchange.coinbase.com"
    assert (cfg.metrics_host, cfg.metrics_port) == ("127.0.0.1", 9101)
    assert cfg.spool_dir == tmp_path / "spool" / "coinbase"
    assert cfg.ingest_url == "http://127.0.0.1:3000/internal/ingest"
    assert cfg.log_level == "info"


def test_key_is_not_in_repr() -> None:
    cfg = load()
    assert "s3cret-key-0123456789" not in repr(cfg)
    assert cfg.api_key == "s3cret-key-0123456789"


def test_key_from_file(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("from-file-0123456789\n")
    env = {"API_BASE_URL": "http://127.0.0.1:3000", "API_KEY_FILE": str(key_file)}
    assert CollectorConfig.from_env("coinbase", env).api_key == "from-file-0123456789"


@pytest.mark.parametrize(
    ("env", "variable", "fragment"),
    [
        ({"API_BASE_URL": ""}, "API_BASE_URL", "is required"),
        ({"API_BASE_URL": "ftp://x"}, "API_BASE_URL", "not an http(s) URL"),
        ({"API_BASE_URL": "http://u:p@host"}, "API_BASE_URL", "credentials"),
        ({"API_BASE_URL": "http://host:99999"}, "API_BASE_URL", "invalid port"),
        ({"API_BASE_URL": "http://[::1"}, "API_BASE_URL", "is not a URL"),
        # never reachable: urllib3 refuses the host, or connects to port 80 for port 0
        ({"API_BASE_URL": "http://exa mple.com"}, "API_BASE_URL", "not a host name"),
        ({"API_BASE_URL": "http://exa\tmple.com"}, "API_BASE_URL", "not a host name"),
        ({"API_BASE_URL": "http://a..b"}, "API_BASE_URL", "not a host name"),
        ({"API_BASE_URL": "https://.ingest.example"}, "API_BASE_URL", "not a host name"),
        ({"API_BASE_URL": "http://127.0.0.1:0"}, "API_BASE_URL", "invalid port"),
        ({"WS_URL": "ws://[::1"}, "WS_URL", "is not a URL"),
        ({"WS_URL": "wss://user:s3cret-key-0123456789@host"}, "WS_URL", "credentials"),
        ({"API_BASE_URL": "ftp://user:s3cret-key-0123456789@host"}, "API_BASE_URL",
         "not an http(s) URL"),
        ({"API_KEY": ""}, "API_KEY", "is required"),
        ({"API_KEY": "has space 0123456789"}, "API_KEY", "whitespace"),
        # no header can carry it
        ({"API_KEY": "cl\u00e9-\u20ac-0123456789abc"}, "API_KEY", "non-ASCII"),
        ({"API_KEY_FILE": "/nonexistent/key"}, "API_KEY", "both"),
        ({"BATCH_SIZE": "0"}, "BATCH_SIZE", "out of range"),
        ({"BATCH_SIZE": "ten"}, "BATCH_SIZE", "not a whole number"),
        ({"BATCH_INTERVAL_MS": "-5"}, "BATCH_INTERVAL_MS", "out of range"),
        ({"LOG_LEVEL": "loud"}, "LOG_LEVEL", "not a level"),
        ({"WS_URL": "http://x"}, "WS_URL", "not a ws:// or wss:// URL"),
        ({"WS_URL": "ws://127.0.0.1:1/a b"}, "WS_URL", "whitespace"),
        ({"WS_URL": "ws://127.0.0.1:1/a#"}, "WS_URL", "fragment"),
        ({"API_BASE_URL": "http://*.example.com"}, "API_BASE_URL", "not a host name"),
        ({"WS_URL": "ws://127.0.0.1:1/a\x00"}, "WS_URL", "control characters"),
        ({"METRICS_PORT": "70000"}, "METRICS_PORT", "out of range"),
        ({"METRICS_HOST": "bad host"}, "METRICS_HOST", "not a host"),
        ({"SYMBOLS": "BTCUSD"}, "SYMBOLS", "not a BASE/QUOTE symbol"),
        ({"SYMBOLS": " , "}, "SYMBOLS", "lists no symbol"),
        ({"WORKER_ID": "a b"}, "WORKER_ID", "not allowed"),
        ({"HTTP_READ_TIMEOUT_S": "nan"}, "HTTP_READ_TIMEOUT_S", "out of range"),
        ({"DELIVERY_RETRY_MAX_S": "0"}, "DELIVERY_RETRY_MAX_S", "out of range"),
        ({"DELIVERY_CONCURRENCY": "0"}, "DELIVERY_CONCURRENCY", "out of range"),
        ({"DELIVERY_CONCURRENCY": "17"}, "DELIVERY_CONCURRENCY", "out of range"),
        ({"DELIVERY_CONCURRENCY": "two"}, "DELIVERY_CONCURRENCY", "not a whole number"),
        ({"WS_LIVENESS_TIMEOUT_S": "x"}, "WS_LIVENESS_TIMEOUT_S", "not a number"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], variable: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(**env)
    assert info.value.variable == variable
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)
    assert "s3cret-key-0123456789" not in str(info.value)


@pytest.mark.parametrize("url", ["wss://stream.binance.com:9443/stream?streams=btcusdt@ticker",
                                 "wss://stream.binance.com:9443/ws",
                                 "ws://127.0.0.1:9443/?x=1", "ws://127.0.0.1:9443?",
                                 "ws://127.0.0.1:9443/?"])
def test_a_binance_ws_url_is_the_base_address_alone(url: str) -> None:
    # The collector puts the streams in the path and query: `/ws` became `/ws/stream?...` and a
    # full stream URL had its streams twice, a broken URL the venue answered with an error.
    with pytest.raises(ConfigError) as info:
        CollectorConfig.from_env("binance", {**BASE, "WS_URL": url})
    assert info.value.variable == "WS_URL"
    assert "path or query" in str(info.value) and "/stream?streams=" in str(info.value)
    for venue, ok in (("binance", "ws://127.0.0.1:9443/"), ("kraken", "ws://127.0.0.1:1/v2"),
                      ("coinbase", "ws://127.0.0.1:1/feed?x=1")):
        assert CollectorConfig.from_env(venue, {**BASE, "WS_URL": ok}).ws_url == ok
    with pytest.raises(ConfigError, match="fragment"):
        CollectorConfig.from_env("kraken", {**BASE, "WS_URL": "ws://127.0.0.1:1/v2#x"})


@pytest.mark.parametrize(("url", "base"), [
    ("http://127.0.0.1:3000/internal/ingest", "http://127.0.0.1:3000"),
    ("http://127.0.0.1:3000/internal/ingest/", "http://127.0.0.1:3000"),
    ("https://gw.example.com/chrono/internal/ingest//", "https://gw.example.com/chrono"),
])
def test_the_full_ingest_url_is_refused_with_the_base_to_use(url: str, base: str) -> None:
    # Posted to .../internal/ingest/internal/ingest: 404, so every batch was dead-lettered
    # while the API was healthy.
    with pytest.raises(ConfigError) as info:
        load(API_BASE_URL=url)
    message = str(info.value)
    assert info.value.variable == "API_BASE_URL"
    assert "appends itself" in message and f"API_BASE_URL={base})" in message
    assert "\n" not in message and "s3cret-key-0123456789" not in message


@pytest.mark.parametrize("url", ["http://127.0.0.1:3000", "https://ingest.example.com/api%2Fv1",
                                 "http://[::1]:3000", "http://localhost:65535/", "http://h:1",
                                 "http://h/internal/ingest-v2", "http://h/my-internal/ingest"])
def test_good_api_base_urls_pass(url: str) -> None:
    assert load(API_BASE_URL=url).api_base_url == url.rstrip("/")


@pytest.mark.parametrize("url", ["http://127.0.0.1:0", "http://127.0.0.1:3000/internal/ingest"])
def test_a_bad_api_base_url_exits_2_with_one_line(tmp_path: Path, url: str) -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT),
           "API_KEY": "s3cret-key-0123456789", "API_BASE_URL": url,
           # loopback only, should it start anyway
           "WS_URL": "ws://127.0.0.1:1", "METRICS_PORT": "0", "CHRONO_STATE_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "collectors", "run", "coinbase"], env=env,
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2, result
    assert result.stderr.count("\n") == 1 and "API_BASE_URL" in result.stderr, result.stderr


def test_missing_key_file_is_named(tmp_path: Path) -> None:
    env = {"API_BASE_URL": "http://127.0.0.1:3000", "API_KEY_FILE": str(tmp_path / "nope")}
    with pytest.raises(ConfigError, match=r"API_KEY_FILE: .* does not exist"):
        CollectorConfig.from_env("coinbase", env)


def test_unknown_exchange_lists_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"known: .*coinbase"):
        CollectorConfig.from_env("mtgox", BASE)


def test_symbols_are_normalized_and_deduplicated() -> None:
    assert load(SYMBOLS="btc/usd, ETH/USD,BTC/USD").symbols == ("BTC/USD", "ETH/USD")


def test_log_level_accepts_any_case_and_warn() -> None:
    assert load(LOG_LEVEL="WARN").log_level == "warn"
    assert load(LOG_LEVEL="Debug").log_level == "debug"


def test_spool_dir_must_be_a_directory(tmp_path: Path) -> None:
    file = tmp_path / "f"
    file.write_text("")
    with pytest.raises(ConfigError, match=r"SPOOL_DIR: .* not a directory"):
        load(SPOOL_DIR=str(file))


def test_a_spool_dir_behind_a_parent_we_cannot_search_is_a_config_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # As a service user, Path.exists() raises PermissionError for such a path (root never does,
    # so the refusal is simulated here).
    def refuse(self: Path, *args: object, **kwargs: object) -> bool:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "exists", refuse)
    with pytest.raises(ConfigError) as info:
        load(SPOOL_DIR=str(tmp_path / "locked" / "spool"))
    assert info.value.variable == "SPOOL_DIR"
    assert "Permission denied" in str(info.value) and "\n" not in str(info.value)


KEY22 = "abcdefghijklmnopqrstuv"


@pytest.mark.parametrize("over", [
    {"API_BASE_URL": f"ftp://h/{KEY22}"},                    # "... is not an http(s) URL"
    {"API_BASE_URL": f"http://exa mple.com/{KEY22}"},        # "the host of ..."
    {"API_BASE_URL": f"http://a..b/{KEY22}"},
    {"WS_URL": f"http://h/{KEY22}"},                         # "... is not a ws:// URL"
    {"API_BASE_URL": f"ftp://h/{KEY22[:14]}"},               # a piece of the key
    {"API_BASE_URL": f"http://h/{KEY22}/internal/ingest"},   # "... ends in /internal/ingest"
])
def test_a_config_error_never_echoes_the_key(over: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as info:
        CollectorConfig.from_env("coinbase", {**BASE, "API_KEY": KEY22, **over})
    assert "[REDACTED]" in str(info.value)
    assert "abcdefghij" not in str(info.value)


def test_a_config_error_of_the_cli_never_prints_the_key(tmp_path: Path) -> None:
    # The reviewer's repro: API_BASE_URL=ftp://h/<key> printed the key on stderr.
    key_file = tmp_path / "key"
    key_file.write_text(KEY22 + "\n")
    for key_env in ({"API_KEY": KEY22}, {"API_KEY_FILE": str(key_file)}):
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT),
               "API_BASE_URL": f"ftp://h/{KEY22}", "CHRONO_STATE_DIR": str(tmp_path), **key_env}
        result = subprocess.run([sys.executable, "-m", "collectors", "run", "coinbase"], env=env,
                                capture_output=True, text=True, timeout=30, check=False)
        assert result.returncode == 2, result
        assert result.stderr.count("\n") == 1 and "API_BASE_URL" in result.stderr, result
        assert "abcdefghij" not in result.stderr + result.stdout


@pytest.mark.parametrize(("key", "problem"), [
    ("has space 0123456789", "whitespace"),
    ("tab\tin-0123456789", "control"),
    ("k" * 4097, "too long"),
])
def test_keys_a_header_cannot_carry_are_refused(key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(API_KEY=key)
    assert info.value.variable == "API_KEY" and problem in str(info.value)
    assert "\n" not in str(info.value) and key[:8] not in str(info.value)


@pytest.mark.parametrize(("key", "warnings"), [
    ("k", ["short"]),                                       # the API decides what it takes
    ("short-key-123", ["short"]),
    ('Sec"ret\'Key-0123456789abcdef', ["not_token68"]),     # quotes: escaped in logs
    ("key=with-an-inner-equals-sign", ["not_token68"]),    # '=' only at the end
    ("k" * 4096, []),
    ("abc+/def.ghi_jkl~mno-pq==", []),
])
def test_unwise_keys_are_accepted_and_warned_about(key: str, warnings: list[str]) -> None:
    assert load(API_KEY=key).api_key == key
    assert key_warnings([key]) == warnings


def test_every_key_the_project_makes_or_documents_fits() -> None:
    # `make run`/`make demo` make the shared key with secrets.token_urlsafe(32); README says so.
    for _ in range(200):
        key = secrets.token_urlsafe(32)
        assert load(API_KEY=key).api_key == key
    for text in ((ROOT / "Makefile").read_text(), (ROOT / "README.md").read_text()):
        assert "secrets.token_urlsafe(32)" in text
    assert load(API_KEY="abc+/def.ghi_jkl~mno-pq==").api_key == "abc+/def.ghi_jkl~mno-pq=="


def test_a_key_file_is_read_up_to_64_kib(tmp_path: Path) -> None:
    for path in ("/dev/zero", str(tmp_path / "big")):
        if path != "/dev/zero":
            Path(path).write_text("k" * (64 * 1024 + 1))
        env = {"API_BASE_URL": "http://127.0.0.1:3000", "API_KEY_FILE": path}
        with pytest.raises(ConfigError, match=r"API_KEY_FILE: .* is larger than 65536 bytes"):
            CollectorConfig.from_env("coinbase", env)


def test_a_key_file_that_is_a_pipe_is_read_until_its_writer_closes_it_within_a_bound(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A FIFO nobody writes to held the start for ever, with nothing said.
    monkeypatch.setattr(keys, "KEY_PIPE_WAIT_S", 0.3)
    fifo = tmp_path / "key.fifo"
    os.mkfifo(fifo)
    env = {"API_BASE_URL": "http://127.0.0.1:3000", "API_KEY_FILE": str(fifo)}
    with pytest.raises(ConfigError, match=r"API_KEY_FILE: .* is a pipe nothing was written"):
        CollectorConfig.from_env("coinbase", env)
    key = "s3cret-key-0123456789-pipe"

    def write() -> None:  # a secrets agent: opens, writes in two parts, closes
        with open(fifo, "wb", buffering=0) as out:
            out.write(key[:8].encode())
            out.write(key[8:].encode() + b"\n")

    monkeypatch.setattr(keys, "KEY_PIPE_WAIT_S", 10.0)
    writer = threading.Thread(target=write)
    writer.start()
    try:
        assert CollectorConfig.from_env("coinbase", env).api_key == key
    finally:
        writer.join(10)


@pytest.mark.parametrize("raw", ["1_0", "+5", "\u0663", "0x10", "1e2", "10 0"])
def test_integers_are_plain_digits_only(raw: str) -> None:
    # int() took "1_0" as 10.
    with pytest.raises(ConfigError) as info:
        load(BATCH_SIZE=raw)
    assert info.value.variable == "BATCH_SIZE" and "not a whole number" in str(info.value)
    assert load(BATCH_SIZE=" 10 ").batch_size == 10
