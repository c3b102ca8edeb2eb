"""Fault injection: the ingest API and the collector process misbehave on purpose; every test
asserts the delivery guarantee: what the simulator sent is stored exactly once, apart from what
the collector counted as dropped or dead-lettered."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from collectors.ingest.app import IngestApp
from collectors.ingest.server import RunningServer, start_server
from collectors.ingest.storage import SQLiteStorage
from collectors.simulator import Simulator
from tests.integration.conftest import (
    collector_process,
    free_port,
    stored_count,
    stored_rows,
    wait_until,
)
from tests.support.faults import FaultScript
from tests.support.servers import IngestServer

KEY = "fault-test-key-0123456789"


def _ids(rows: list[dict[str, object]]) -> list[tuple[object, object]]:
    return [(r["symbol"], r["metadata"]["sequence"]) for r in rows]  # type: ignore[index]


def _claimed_attempts(spool_dir: Path, key: str) -> int | None:
    """The attempt count the collector's spool has on disk for claimed batch `key` (read from
    another process, as a restart would see it), or None while there is no such batch."""
    conn = sqlite3.connect(f"file:{spool_dir / 'spool.db'}?mode=ro", uri=True, timeout=5)
    try:
        row = conn.execute("SELECT attempts FROM claimed WHERE key = ?", (key,)).fetchone()
    finally:
        conn.close()
    return None if row is None else int(row[0])


def _sent_ids(sim: Simulator) -> set[tuple[object, object]]:
    return {(str(t["product_id"]).replace("-", "/"), int(str(t["sequence"])))
            for t in sim.sent_tickers()}


def assert_exactly_once(ingest: IngestServer | Ingest, sent: set[tuple[object, object]],
                        *, allowed_missing: int = 0) -> None:
    ids = _ids(stored_rows(ingest))  # type: ignore[arg-type]
    assert len(ids) == len(set(ids)), "a record was stored twice"
    missing = sent - set(ids)
    assert len(missing) <= allowed_missing, f"{len(missing)} records lost: {sorted(missing)[:5]}"
    assert set(ids) <= sent, "stored something the simulator never sent"


class Ingest:
    """An ingest API that can be taken down and brought back on the same port and database."""

    def __init__(self, tmp_path: Path) -> None:
        self.db_path = tmp_path / "ingest" / "ingest.db"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = KEY
        self._storage: SQLiteStorage | None = None
        self._server: RunningServer | None = None
        self.faults: FaultScript | None = None

    def up(self) -> None:
        self._storage = SQLiteStorage.open(self.db_path)
        self.faults = FaultScript(IngestApp(self._storage, [KEY], 8 * 1024 * 1024, 10_000))
        self._server = start_server(self.faults, port=self.port, threads=4)

    def down(self) -> None:
        if self.faults:
            self.faults.release()
        if self._server:
            self._server.stop()
        if self._storage:
            self._storage.close()
        self._server = self._storage = None


@contextmanager
def ingest_on_fixed_port(tmp_path: Path) -> Iterator[Ingest]:
    ingest = Ingest(tmp_path)
    ingest.up()
    try:
        yield ingest
    finally:
        ingest.down()


@pytest.mark.parametrize("concurrency", ["1", "3"])
def test_server_errors_and_throttling_lose_nothing(
        tmp_path: Path, ingest: IngestServer, coinbase_sim: Simulator, concurrency: str) -> None:
    ingest.faults.respond(500, times=2).respond(429, retry_after=1).respond(
        503, retry_after=1, times=2)
    with collector_process(tmp_path, coinbase_sim.url, ingest.url, ingest.key,
                           DELIVERY_CONCURRENCY=concurrency) as col:
        assert wait_until(lambda: stored_count(ingest) >= 50, 30)
        coinbase_sim.go_silent(True)
        sent = _sent_ids(coinbase_sim)
        assert wait_until(lambda: stored_count(ingest) >= len(sent), 15)
        assert col.metric("chrono_collector_flush_failures_total") == 5
        assert col.stop() == 0
    assert_exactly_once(ingest, sent)
    assert ingest.faults.applied[:5] == ["respond"] * 5


def test_api_hanging_past_the_read_timeout_is_retried_and_stored_once(
        tmp_path: Path, ingest: IngestServer, coinbase_sim: Simulator) -> None:
    ingest.faults.hang(3.0, times=2)  # then answers; the collector gave up after 1 s
    with collector_process(tmp_path, coinbase_sim.url, ingest.url, ingest.key,
                           HTTP_READ_TIMEOUT_S="1") as col:
        assert wait_until(lambda: ingest.faults.requests_seen >= 3, 20)
        assert wait_until(lambda: stored_count(ingest) >= 50, 30)
        coinbase_sim.go_silent(True)
        sent = _sent_ids(coinbase_sim)
        assert wait_until(lambda: stored_count(ingest) >= len(sent), 15)
        # Reached but no answer in time: a timeout, not a network failure.
        assert col.metric("chrono_collector_flush_failures_total", reason="timeout") >= 1
        assert col.metric("chrono_collector_flush_failures_total", reason="network") == 0
        assert col.stop() == 0
    assert_exactly_once(ingest, sent)  # the late answers were replays, not second copies


@pytest.mark.parametrize("concurrency", ["1", "3"])
def test_api_down_for_a_while_then_back(tmp_path: Path, coinbase_sim: Simulator,
                                        concurrency: str) -> None:
    with ingest_on_fixed_port(tmp_path) as ingest, collector_process(
            tmp_path, coinbase_sim.url, ingest.url, ingest.key, DELIVERY_RETRY_MAX_S="1",
            DELIVERY_CONCURRENCY=concurrency) as col:
        assert wait_until(lambda: stored_count(ingest) >= 20, 20)  # type: ignore[arg-type]
        ingest.down()
        assert wait_until(lambda: col.metric("chrono_collector_flush_failures_total",
                                             reason="network") >= 2, 20)
        assert wait_until(lambda: col.metric("chrono_collector_spool_records") >= 50, 20)
        ingest.up()
        coinbase_sim.go_silent(True)
        sent = _sent_ids(coinbase_sim)
        assert wait_until(lambda: stored_count(ingest) >= len(sent), 60)  # type: ignore[arg-type]
        assert col.stop() == 0
        assert_exactly_once(ingest, sent)


def test_sigkill_mid_stream_with_the_api_down_then_restart(
        tmp_path: Path, coinbase_sim: Simulator) -> None:
    with ingest_on_fixed_port(tmp_path) as ingest:
        assert ingest.faults is not None
        ingest.faults.respond(503, times=1_000_000)
        with collector_process(tmp_path, coinbase_sim.url, ingest.url, ingest.key) as col:
            assert wait_until(lambda: col.metric("chrono_collector_spool_records") >= 100, 30)
            kill_at = time.time()
            os.kill(col.proc.pid, signal.SIGKILL)
            col.proc.wait(5)
        sent_before_kill = {(str(t["product_id"]).replace("-", "/"), int(str(t["sequence"])))
                            for t in coinbase_sim.sent_tickers()}
        ingest.faults.clear()
        with collector_process(tmp_path, coinbase_sim.url, ingest.url, ingest.key,
                               name="restarted") as col2:
            assert wait_until(lambda: stored_count(ingest) >= 100, 30)  # type: ignore[arg-type]
            coinbase_sim.go_silent(True)
            sent = _sent_ids(coinbase_sim)
            rows_wanted = len(sent) - len(sent_before_kill) + 100
            assert wait_until(lambda: stored_count(ingest) >= rows_wanted, 30)  # type: ignore[arg-type]
            assert col2.stop() == 0
        rows = stored_rows(ingest)  # type: ignore[arg-type]
        ids = _ids(rows)
        assert len(ids) == len(set(ids)), "a record was stored twice"
        # Everything received more than 200 ms before the kill survived it.
        lost = [i for i in sent_before_kill - set(ids)]
        times = {(str(t["product_id"]).replace("-", "/"), int(str(t["sequence"]))): t["time"]
                 for t in coinbase_sim.sent_tickers()}
        from collectors.model import parse_iso

        late = [i for i in lost if parse_iso(str(times[i]))[1] / 1e9 > kill_at - 0.2]
        assert len(lost) == len(late), f"lost {len(lost) - len(late)} records older than 200 ms"


def test_sigkill_after_batches_reached_the_api_does_not_store_them_twice(
        tmp_path: Path, coinbase_sim: Simulator) -> None:
    """A batch the API stored whose answer never arrived is re-sent with its key after a
    restart and not stored again."""
    with ingest_on_fixed_port(tmp_path) as ingest:
        assert ingest.faults is not None
        ingest.faults.hang(30.0, times=1)  # the first batch is held inside the API...
        with collector_process(tmp_path, coinbase_sim.url, ingest.url, ingest.key,
                               HTTP_READ_TIMEOUT_S="60") as col:
            assert ingest.faults.wait_for_requests(1, 20)
            first_key = ingest.faults.idempotency_keys[0]
            # The attempt is counted on disk while the POST is on the wire (a kill in that
            # instant would lose only the count, and the restart would not call the re-send a
            # replay): kill once it is there.
            assert wait_until(lambda: _claimed_attempts(col.spool_dir, first_key) == 1, 10)
            os.kill(col.proc.pid, signal.SIGKILL)  # ...while the collector dies
            col.proc.wait(5)
        ingest.faults.release()  # ...and then the API stores it
        assert ingest.faults.wait_for_completed(1, 10)
        stored_first = stored_count(ingest)  # type: ignore[arg-type]
        assert stored_first > 0
        with collector_process(tmp_path, coinbase_sim.url, ingest.url, ingest.key,
                               name="restarted") as col2:
            assert wait_until(lambda: first_key in ingest.faults.idempotency_keys[1:], 20)  # type: ignore[union-attr]
            assert wait_until(lambda: stored_count(ingest) > stored_first + 20, 20)  # type: ignore[arg-type]
            assert col2.metric("chrono_collector_spool_replayed_records_total") == stored_first
            assert col2.stop() == 0
        ids = _ids(stored_rows(ingest))  # type: ignore[arg-type]
        assert len(ids) == len(set(ids)), "the replayed batch was stored twice"


def test_full_spool_drops_oldest_and_counts_them(tmp_path: Path) -> None:
    with Simulator("coinbase", rate_hz=0.5, seed=2) as sim, \
            ingest_on_fixed_port(tmp_path) as ingest:
        assert ingest.faults is not None
        ingest.faults.respond(503, times=1_000_000)
        with collector_process(tmp_path, sim.url, ingest.url, ingest.key,
                               SPOOL_MAX_BYTES=str(1024 * 1024), DELIVERY_RETRY_MAX_S="1") as col:
            # Subscribed, not just connected: a burst goes only to subscribed connections.
            assert sim.wait_for(lambda: any(sim.subscriptions().values()), 10)
            [conn_id] = sim.connection_ids()
            assert sim.burst(6000) == 1
            assert sim.wait_for(lambda: sim.sent_count >= 6000, 30)
            assert wait_until(lambda: col.metric("chrono_collector_spool_dropped_records_total")
                              > 0, 30)
            sim.go_silent(True)
            sent = _sent_ids(sim)
            assert wait_until(lambda: col.metric("chrono_collector_spool_dropped_records_total")
                              + col.metric("chrono_collector_spool_records") >= len(sent), 30)
            dropped = int(col.metric("chrono_collector_spool_dropped_records_total"))
            assert col.events("spool_full_dropped_oldest")
            assert col.metric("chrono_collector_spool_bytes") <= 1024 * 1024
            ingest.faults.clear()
            assert wait_until(lambda: stored_count(ingest) >= len(sent) - dropped, 30)  # type: ignore[arg-type]
            assert col.stop() == 0
        ids = _ids(stored_rows(ingest))  # type: ignore[arg-type]
        assert len(ids) == len(set(ids)) == len(sent) - dropped
        # The newest survived: dropping is oldest-first.
        newest = max(int(str(t["sequence"])) for t in sim.sent_tickers(conn_id)
                     if t["product_id"] == "BTC-USD")
        assert ("BTC/USD", newest) in set(ids)


def test_torn_spool_file_is_salvaged_without_a_crash_loop(
        tmp_path: Path, coinbase_sim: Simulator) -> None:
    with ingest_on_fixed_port(tmp_path) as ingest:
        assert ingest.faults is not None
        ingest.faults.respond(503, times=1_000_000)
        with collector_process(tmp_path, coinbase_sim.url, ingest.url, ingest.key) as col:
            assert wait_until(lambda: col.metric("chrono_collector_spool_records") >= 200, 30)
            spool_dir = col.spool_dir
            assert col.stop() == 0
        db = spool_dir / "spool.db"
        size = db.stat().st_size
        with db.open("r+b") as fh:  # a torn write: garbage over a page in the middle
            fh.seek(size // 2)
            fh.write(os.urandom(4096))
        ingest.faults.clear()
        coinbase_sim.go_silent(True)
        sent = _sent_ids(coinbase_sim)
        with collector_process(tmp_path, coinbase_sim.url, ingest.url, ingest.key,
                               name="restarted") as col2:
            assert wait_until(lambda: bool(col2.events("spool_corrupt")), 20)
            assert wait_until(lambda: col2.metric("chrono_collector_spool_records") == 0, 30)
            assert col2.proc.poll() is None
            lost = col2.metric("chrono_collector_spool_corrupt_lost_records_total")
            assert col2.stop() == 0
        ids = _ids(stored_rows(ingest))  # type: ignore[arg-type]
        assert set(ids) <= sent
        assert len(ids) + lost <= len(sent) + 1
        assert len(ids) > 0, "no good record was kept"
        assert list(spool_dir.glob("spool.db.corrupt-*")), "the bad file was not kept aside"


# SIGHUP: its default action killed the collector at once, losing what it held.
@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT", "SIGHUP"])
def test_stop_signals_flush_and_exit_0(tmp_path: Path, ingest: IngestServer,
                                       coinbase_sim: Simulator, signal_name: str) -> None:
    with collector_process(tmp_path, coinbase_sim.url, ingest.url, ingest.key,
                           BATCH_INTERVAL_MS="60000", BATCH_SIZE="10000") as col:
        assert wait_until(lambda: col.metric("chrono_collector_spool_records") >= 30, 20)
        coinbase_sim.go_silent(True)
        sent = _sent_ids(coinbase_sim)
        assert stored_count(ingest) == 0  # held: the batch interval is a minute
        col.proc.send_signal(getattr(signal, signal_name))
        assert col.proc.wait(timeout=5) == 0
    assert_exactly_once(ingest, sent)


def test_a_stop_ends_within_supervisords_stop_timeout_whatever_holds_a_thread(
        tmp_path: Path, ingest: IngestServer, coinbase_sim: Simulator) -> None:
    # A spool that stops answering (here another process holds it locked: a stand-in for a
    # stalled disk) while the API hangs: every spool call of the stop waited SQLite's busy
    # timeout, each thread's join its own 23 s, and the stop took 46-64 s (supervisord's
    # SIGKILL comes at stopwaitsecs=30); the process then waited for the held thread at exit.
    ingest.faults.hang(4, times=1000)  # every answer 4 s late
    with collector_process(tmp_path, coinbase_sim.url, ingest.url, ingest.key,
                           BATCH_SIZE="2", BATCH_INTERVAL_MS="200") as col:
        assert ingest.faults.wait_for_requests(1, 20)
        db = sqlite3.connect(col.spool_dir / "spool.db", timeout=5, isolation_level=None)
        try:
            db.execute("BEGIN EXCLUSIVE")
            started = time.monotonic()
            col.proc.send_signal(signal.SIGTERM)
            code = col.proc.wait(timeout=40)
            took = time.monotonic() - started
        finally:
            db.close()
            ingest.faults.release()
    assert took < 25, f"the stop took {took:.1f} s"
    [stopped] = col.events("collector_stopped")
    assert code == (1 if stopped.get("threads_still_running") else 0)


def test_a_batch_too_large_for_the_api_is_split_and_all_stored(
        tmp_path: Path, ingest: IngestServer, coinbase_sim: Simulator) -> None:
    ingest.faults.respond(413, times=2)
    with collector_process(tmp_path, coinbase_sim.url, ingest.url, ingest.key,
                           BATCH_SIZE="40", BATCH_INTERVAL_MS="2000") as col:
        assert wait_until(lambda: stored_count(ingest) >= 100, 30)
        coinbase_sim.go_silent(True)
        sent = _sent_ids(coinbase_sim)
        assert wait_until(lambda: stored_count(ingest) >= len(sent), 20)
        assert col.events("batch_too_large_split")
        assert col.metric("chrono_collector_dead_letter_records_total") == 0
        assert col.stop() == 0
    assert_exactly_once(ingest, sent)
    sizes = [body.count(b'"symbol"') for body in ingest.faults.bodies]
    assert sizes[0] == 40 and sizes[1] == 20 and sizes[2] <= 10  # halved after each 413


def test_a_422_naming_records_dead_letters_only_those(
        tmp_path: Path, ingest: IngestServer, coinbase_sim: Simulator) -> None:
    ingest.faults.respond(422, problem={
        "type": "urn:chrono:problem:invalid-records", "title": "Unprocessable Content",
        "status": 422, "detail": "2 records are invalid",
        "errors": [{"index": 1, "field": "price", "problem": "must be > 0"},
                   {"index": 3, "field": "symbol", "problem": "unknown market"}]})
    with collector_process(tmp_path, coinbase_sim.url, ingest.url, ingest.key) as col:
        assert wait_until(lambda: stored_count(ingest) >= 60, 30)
        coinbase_sim.go_silent(True)
        sent = _sent_ids(coinbase_sim)
        assert wait_until(lambda: stored_count(ingest) >= len(sent) - 2, 20)
        assert col.metric("chrono_collector_dead_letter_records_total") == 2
        [event] = col.events("records_rejected")
        assert (event["rejected"], event["status"]) == (2, 422)
        assert col.stop() == 0
    import json

    [entry] = [json.loads(x) for x in (col.spool_dir / "dead-letter.jsonl").read_text()
               .splitlines()]
    first_body = json.loads(ingest.faults.bodies[0])["feeds"]
    assert entry["feeds"] == [first_body[1], first_body[3]]
    dead = {(f["symbol"], f["metadata"]["sequence"]) for f in entry["feeds"]}
    assert_exactly_once(ingest, sent - dead)


@pytest.mark.parametrize(("seed", "concurrency"), [(11, "1"), (12, "1"), (13, "3")])
def test_a_chaotic_api_gets_everything_once_and_in_order(
        tmp_path: Path, ingest: IngestServer, coinbase_sim: Simulator, seed: int,
        concurrency: str) -> None:
    # A random mix of retryable failures, slow answers and 413s between successes, while
    # batches are claimed ahead during POSTs: nothing is lost or stored twice (with one POST
    # in flight or three), and with one every symbol's updates are stored in the order the
    # venue sent them (a 413's halves and a batch claimed ahead keep their places).
    rng = random.Random(seed)
    for _ in range(24):
        kind = rng.choice(["pass", "pass", "pass", "503", "429", "close", "hang", "413"])
        if kind == "pass":
            ingest.faults.pass_through()
        elif kind == "503":
            ingest.faults.respond(503, retry_after=0.3)
        elif kind == "429":
            ingest.faults.respond(429)
        elif kind == "close":
            ingest.faults.close_connection()
        elif kind == "hang":
            # A slow answer, within HTTP_READ_TIMEOUT_S: batches are claimed ahead meanwhile.
            # (Not past it: this script's next 413 would then refuse the retry of a batch the
            # hung request goes on to store, an API contradicting itself; the split stores
            # those records twice, at least once. Timeouts have their own test above.)
            ingest.faults.hang(0.6)
        else:
            ingest.faults.respond(413)
    with collector_process(tmp_path, coinbase_sim.url, ingest.url, ingest.key,
                           BATCH_SIZE="10", HTTP_READ_TIMEOUT_S="1",
                           DELIVERY_RETRY_MAX_S="0.5",
                           DELIVERY_CONCURRENCY=concurrency) as col:
        assert wait_until(lambda: ingest.faults.pending == 0, 60), ingest.faults.applied
        assert wait_until(lambda: stored_count(ingest) >= 100, 30)
        coinbase_sim.go_silent(True)
        sent = _sent_ids(coinbase_sim)
        # A 413 for a single record dead-letters it (the API refuses it whatever the size).
        dead_letters = col.spool_dir / "dead-letter.jsonl"

        def dead() -> set[tuple[object, object]]:
            if not dead_letters.exists():
                return set()
            return {(f["symbol"], f["metadata"]["sequence"])
                    for line in dead_letters.read_text().splitlines()
                    for f in json.loads(line)["feeds"]}

        assert wait_until(lambda: stored_count(ingest) + len(dead()) >= len(sent), 20)
        assert col.metric("chrono_collector_dead_letter_records_total") == len(dead())
        assert col.stop() == 0
    assert not dead() & {tuple(i) for i in _ids(stored_rows(ingest))}
    assert_exactly_once(ingest, sent - dead())
    if concurrency != "1":
        return  # several POSTs in flight: batches may be stored out of order (documented)
    by_symbol: dict[object, list[int]] = {}
    for symbol, sequence in _ids(stored_rows(ingest)):
        by_symbol.setdefault(symbol, []).append(int(str(sequence)))
    for symbol, sequences in by_symbol.items():
        assert sequences == sorted(sequences), f"{symbol} stored out of order"
