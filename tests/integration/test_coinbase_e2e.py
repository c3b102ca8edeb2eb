"""simulator -> `chrono-collector run coinbase` (real process) -> ingest API -> SQLite."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from collectors.simulator import Simulator
from tests.integration.conftest import (
    ROOT,
    collector_process,
    stored_count,
    stored_rows,
    wait_until,
)
from tests.support.servers import IngestServer


def _expected(ticker: dict[str, object]) -> tuple[object, ...]:
    """What the stored row must say about a ticker the simulator sent (Coinbase strings)."""
    return (str(ticker["product_id"]).replace("-", "/"), float(str(ticker["price"])),
            float(str(ticker["volume_24h"])), float(str(ticker["best_bid"])),
            float(str(ticker["best_ask"])), str(ticker["time"]), int(str(ticker["sequence"])))


def _actual(row: dict[str, object]) -> tuple[object, ...]:
    meta = row["metadata"]
    assert isinstance(meta, dict)
    return (row["symbol"], row["price"], row["volume"], meta["bid"], meta["ask"],
            row["timestamp"], meta["sequence"])


def test_every_ticker_is_stored_once_with_its_content(
        tmp_path: Path, ingest: IngestServer, coinbase_sim: Simulator) -> None:
    with collector_process(tmp_path, coinbase_sim.url, ingest.url, ingest.key) as col:
        assert wait_until(lambda: stored_count(ingest) >= 60, 20)
        coinbase_sim.go_silent(True)
        sent = coinbase_sim.sent_tickers()
        assert wait_until(lambda: stored_count(ingest) >= len(sent), 10)
        assert col.stop() == 0

    rows = stored_rows(ingest)
    assert sorted(_actual(r) for r in rows) == sorted(_expected(t) for t in sent)
    assert {r["source"] for r in rows} == {"coinbase"}
    assert {r["worker_id"] for r in rows} == {"worker-coinbase"}
    keys = ingest.faults.idempotency_keys
    assert keys and all(keys) and len(set(keys)) == len(keys)
    assert col.events("collector_stopped")


def test_dropped_connection_reconnects_resubscribes_and_continues(
        tmp_path: Path, ingest: IngestServer, coinbase_sim: Simulator) -> None:
    with collector_process(tmp_path, coinbase_sim.url, ingest.url, ingest.key) as col:
        assert wait_until(lambda: stored_count(ingest) >= 20, 20)
        coinbase_sim.drop_all()
        assert coinbase_sim.wait_for(lambda: coinbase_sim.connections_total >= 2, 10)
        before = stored_count(ingest)
        assert wait_until(lambda: stored_count(ingest) >= before + 20, 20)
        # The new connection subscribed again to every symbol, ticker and heartbeat.
        [topics] = coinbase_sim.subscriptions().values()
        assert sorted(topics) == sorted(f"{ch}:{p}" for ch in ("ticker", "heartbeat") for p in
                                        ("BTC-USD", "ETH-USD", "SOL-USD", "XRP-USD", "DOGE-USD"))
        reconnected = [e for e in col.events("ws_connected") if "reconnect_after_s" in e]
        assert reconnected, col.log_lines()
        assert col.metric("chrono_collector_reconnects_total") >= 1
        assert col.metric("chrono_collector_last_reconnect_duration_seconds") > 0
        assert col.stop() == 0
    rows = stored_rows(ingest)
    ids = [(r["symbol"], r["metadata"]["sequence"]) for r in rows]  # type: ignore[index]
    assert len(ids) == len(set(ids)), "a ticker was stored twice"


def test_silent_connection_is_replaced(tmp_path: Path, ingest: IngestServer,
                                       coinbase_sim: Simulator) -> None:
    with collector_process(tmp_path, coinbase_sim.url, ingest.url, ingest.key,
                           WS_LIVENESS_TIMEOUT_S="2") as col:
        assert wait_until(lambda: stored_count(ingest) >= 10, 20)
        coinbase_sim.go_silent(True)
        assert wait_until(lambda: bool(col.events("ws_liveness_timeout")), 10)
        coinbase_sim.go_silent(False)
        assert coinbase_sim.wait_for(lambda: coinbase_sim.connections_total >= 2, 10)
        before = stored_count(ingest)
        assert wait_until(lambda: stored_count(ingest) > before, 10)
        assert col.metric("chrono_collector_reconnects_total", reason="liveness_timeout") >= 1
        assert col.stop() == 0


def test_malformed_frames_are_counted_and_skipped(
        tmp_path: Path, ingest: IngestServer, coinbase_sim: Simulator) -> None:
    good = dict(coinbase_sim.sent_tickers()[0]) if coinbase_sim.sent_tickers() else None
    with collector_process(tmp_path, coinbase_sim.url, ingest.url, ingest.key) as col:
        assert wait_until(lambda: stored_count(ingest) >= 10, 20)
        good = dict(coinbase_sim.sent_tickers()[-1])
        bad_frames: list[str | bytes] = [
            "{not json", "[1,2,3]", '"just a string"', '{"type": 5}',
            json.dumps({**good, "price": "abc", "sequence": 1}),
            json.dumps({**good, "price": "-5", "sequence": 1}),
            json.dumps({k: v for k, v in good.items() if k != "price"}),
            json.dumps({**good, "product_id": None}),
            b"\xff\xfe\x00garbage",
            "x" * (2 * 1024 * 1024),           # a 2 MB frame: received, refused by the parser
            "y" * (5 * 1024 * 1024),           # above the 4 MiB limit: discarded unread
        ]
        for frame in bad_frames:
            coinbase_sim.send_raw(frame)
        before = stored_count(ingest)
        assert wait_until(lambda: stored_count(ingest) >= before + 20, 20)
        assert col.metric("chrono_collector_parse_errors_total") >= len(bad_frames) - 1
        assert col.metric("chrono_collector_oversized_frames_total") == 1
        assert col.events("parse_failed")
        assert col.proc.poll() is None
        assert col.stop() == 0
    for row in stored_rows(ingest):
        assert isinstance(row["price"], float) and row["price"] > 0


def test_unknown_product_is_named_and_the_rest_subscribed(
        tmp_path: Path, ingest: IngestServer, coinbase_sim: Simulator) -> None:
    with collector_process(tmp_path, coinbase_sim.url, ingest.url, ingest.key,
                           SYMBOLS="BTC/USD,FOO/USD,ETH/USD") as col:
        assert wait_until(lambda: bool(col.events("symbol_rejected")), 10)
        assert wait_until(lambda: stored_count(ingest) >= 10, 20)
        [event] = col.events("symbol_rejected")
        assert event["symbols"] == ["FOO/USD"]
        assert event["remaining"] == ["BTC/USD", "ETH/USD"]
        assert col.metric("chrono_collector_subscription_errors_total", symbol="FOO/USD") == 1
        assert col.stop() == 0
    assert {r["symbol"] for r in stored_rows(ingest)} == {"BTC/USD", "ETH/USD"}


def test_api_key_never_appears_in_logs_or_metrics(
        tmp_path: Path, ingest: IngestServer, coinbase_sim: Simulator) -> None:
    ingest.faults.respond(401, times=1)  # an auth failure is logged: still without the key
    with collector_process(tmp_path, coinbase_sim.url, ingest.url, ingest.key,
                           LOG_LEVEL="debug", HTTP_READ_TIMEOUT_S="2") as col:
        assert wait_until(lambda: bool(col.events("ingest_auth_failed")), 20)
        metrics = col.metrics_text()
        with __import__("urllib.request").request.urlopen(
                f"http://127.0.0.1:{col.metrics_port}/healthz", timeout=2) as resp:
            health = resp.read().decode()
        assert col.stop() == 0
    assert ingest.key not in col.log_path.read_text()
    assert ingest.key not in metrics
    assert ingest.key not in health


def test_rejected_batch_goes_to_the_dead_letter_file(
        tmp_path: Path, ingest: IngestServer, coinbase_sim: Simulator) -> None:
    ingest.faults.respond(422, times=1)
    with collector_process(tmp_path, coinbase_sim.url, ingest.url, ingest.key) as col:
        dead = col.spool_dir / "dead-letter.jsonl"
        assert wait_until(dead.exists, 20)
        assert wait_until(lambda: stored_count(ingest) >= 10, 20)
        assert col.metric("chrono_collector_dead_letter_records_total") >= 1
        assert col.events("batch_rejected")
        assert col.stop() == 0
    [entry] = [json.loads(line) for line in dead.read_text().splitlines()]
    assert entry["status"] == 422 and entry["feeds"] and entry["idempotency_key"]


def test_retries_reuse_the_idempotency_key_and_honour_retry_after(
        tmp_path: Path, ingest: IngestServer, coinbase_sim: Simulator) -> None:
    ingest.faults.respond(503, retry_after=1, times=2)
    with collector_process(tmp_path, coinbase_sim.url, ingest.url, ingest.key) as col:
        assert wait_until(lambda: stored_count(ingest) >= 10, 20)
        assert col.stop() == 0
    keys = ingest.faults.idempotency_keys
    assert keys[0] == keys[1] == keys[2], "a retried batch must keep its Idempotency-Key"
    assert len(set(keys[2:])) == len(keys[2:])
    rows = stored_rows(ingest)
    ids = [(r["symbol"], r["metadata"]["sequence"]) for r in rows]  # type: ignore[index]
    assert len(ids) == len(set(ids))


def test_sigterm_with_the_api_down_keeps_records_for_the_next_start(
        tmp_path: Path, ingest: IngestServer, coinbase_sim: Simulator) -> None:
    ingest.faults.respond(503, times=10_000)
    with collector_process(tmp_path, coinbase_sim.url, ingest.url, ingest.key) as col:
        assert wait_until(lambda: col.metric("chrono_collector_spool_records") >= 20, 20)
        coinbase_sim.go_silent(True)
        sent = len(coinbase_sim.sent_tickers())
        assert col.stop(timeout_s=15) == 0
    ingest.faults.clear()
    with collector_process(tmp_path, coinbase_sim.url, ingest.url, ingest.key,
                           name="restarted") as col2:
        assert wait_until(lambda: stored_count(ingest) >= sent, 20)
        assert col2.stop() == 0
    rows = stored_rows(ingest)
    ids = [(r["symbol"], r["metadata"]["sequence"]) for r in rows]  # type: ignore[index]
    assert len(ids) == len(set(ids)) == sent


def _run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "collectors", *args], capture_output=True,
                          text=True, env={"PYTHONPATH": str(ROOT), **env}, timeout=30,
                          check=False)


def test_bad_configuration_exits_2_with_one_line(tmp_path: Path) -> None:
    base = {"API_BASE_URL": "http://127.0.0.1:9", "API_KEY": "test-key-0123456789",
            "METRICS_PORT": "0", "SPOOL_DIR": str(tmp_path / "s")}
    for over, variable in [({"API_BASE_URL": ""}, "API_BASE_URL"),
                           ({"BATCH_SIZE": "lots"}, "BATCH_SIZE"),
                           ({"LOG_LEVEL": "chatty"}, "LOG_LEVEL"),
                           ({"WS_URL": "http://nope"}, "WS_URL"),
                           ({"SYMBOLS": "BTC-USD"}, "SYMBOLS")]:
        result = _run_cli("run", "coinbase", env={**base, **over})
        assert result.returncode == 2, result
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and variable in lines[0], result.stderr
        assert "Traceback" not in result.stderr + result.stdout


def test_unknown_exchange_lists_the_known_ones() -> None:
    result = _run_cli("run", "mtgox", env={})
    assert result.returncode == 2
    assert "mtgox" in result.stderr and "coinbase" in result.stderr and "kraken" in result.stderr


def test_help_works_on_every_command() -> None:
    for args in (["--help"], ["run", "--help"], ["ingest", "--help"], ["simulate", "--help"],
                 ["status", "--help"]):
        result = _run_cli(*args, env={})
        assert result.returncode == 0 and "usage:" in result.stdout, (args, result.stderr)
