"""The chunked lag histogram exposes exactly what prometheus_client's Histogram would."""

from __future__ import annotations

import ast
import json
import select
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest

import collectors
from collectors.backoff import Outcome, classify_status
from collectors.connection import PLANNED_REASONS
from collectors.delivery import PostResult, _failure_reason
from collectors.exchanges.base import Kind
from collectors.metrics import (
    FLUSH_FAILURE_REASONS,
    LAG_BUCKETS_S,
    MESSAGE_KINDS,
    METRICS_CONNECTION_TIMEOUT_S,
    METRICS_MAX_CONNECTIONS,
    RECONNECT_REASONS,
    ChunkHistogram,
    Health,
    Metrics,
    MetricsServer,
)
from collectors.service import thread_names
from tests.support.waiting import wait_until


def _lines(registry: CollectorRegistry) -> list[str]:
    return [line for line in generate_latest(registry).decode().splitlines()
            if "_created" not in line]


@settings(max_examples=200, deadline=None)
@given(chunks=st.lists(st.lists(st.floats(0, 100, allow_nan=False) | st.sampled_from(
    LAG_BUCKETS_S), max_size=20), max_size=5))
def test_chunk_histogram_matches_a_histogram_fed_one_by_one(chunks: list[list[float]]) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    chunked = ChunkHistogram("x_lag_seconds", "doc", "coinbase", LAG_BUCKETS_S, ours)
    reference = Histogram("x_lag_seconds", "doc", ["exchange"], buckets=LAG_BUCKETS_S,
                          registry=theirs).labels("coinbase")
    for chunk in chunks:
        chunked.observe_many(chunk)
        for value in chunk:
            reference.observe(value)
    # Sums may differ in the last bit (added in another order): compare them apart.
    strip = [line for line in _lines(ours) if "_sum" not in line]
    assert strip == [line for line in _lines(theirs) if "_sum" not in line]
    ours_sum = ours.get_sample_value("x_lag_seconds_sum", {"exchange": "coinbase"})
    theirs_sum = theirs.get_sample_value("x_lag_seconds_sum", {"exchange": "coinbase"})
    assert ours_sum is not None and theirs_sum is not None
    assert abs(ours_sum - theirs_sum) <= 1e-9 * max(1.0, theirs_sum)


def test_lag_histogram_is_registered_with_the_exchange_label() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, "kraken", "w1")
    metrics.lag.observe_many([0.0005, 0.002, 3.0])
    assert registry.get_sample_value("chrono_collector_lag_seconds_count",
                                     {"exchange": "kraken"}) == 3
    assert registry.get_sample_value("chrono_collector_lag_seconds_bucket",
                                     {"exchange": "kraken", "le": "0.001"}) == 1
    assert registry.get_sample_value("chrono_collector_lag_seconds_bucket",
                                     {"exchange": "kraken", "le": "+Inf"}) == 3


def test_metrics_server_serves_and_stops_without_waiting_for_its_poll() -> None:
    registry = CollectorRegistry()
    Metrics(registry, "coinbase", "w-1")
    server = MetricsServer(registry, lambda: Health(True, {"status": "ok"}), "127.0.0.1", 0)
    server.start()
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5) as resp:
        assert json.loads(resp.read()) == {"status": "ok"}
    started = time.monotonic()
    server.stop()
    # The serving loop polls once a second; stop() wakes it instead of waiting for the poll.
    assert time.monotonic() - started < 0.9
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=1).close()



def _wait_closed(socks: list[socket.socket], closed: set[int], count: int,
                 timeout_s: float) -> None:
    """Wait (poll, no sleep) until the server has closed `count` of `socks` (EOF or reset),
    adding their indices to `closed`."""
    poller = select.poll()
    fds = {sock.fileno(): i for i, sock in enumerate(socks) if i not in closed}
    for fd in fds:
        poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + timeout_s
    while len(closed) < count and time.monotonic() < deadline:
        for fd, _event in poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
            i = fds[fd]
            try:
                data = socks[i].recv(1)
            except ConnectionResetError:
                data = b""
            assert data == b"", data  # nothing is ever answered to a silent client
            closed.add(i)
            poller.unregister(fd)


def test_idle_connections_are_capped_and_closed_after_the_timeout(
        capfd: pytest.CaptureFixture[str]) -> None:
    # 100 idle connections held 100 server threads for ever: under the unit's TasksMax=64,
    # /metrics and /healthz stopped answering ("can't start new thread" tracebacks).
    registry = CollectorRegistry()
    Metrics(registry, "coinbase", "w-1")
    cap, timeout_s, count = 4, 3.0, 40
    server = MetricsServer(registry, lambda: Health(True, {"status": "ok"}), "127.0.0.1", 0,
                           connection_timeout_s=timeout_s, max_connections=cap)
    server.start()
    before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=10)
            for _ in range(count)]
    closed: set[int] = set()
    try:
        # beyond the cap: closed at once, unanswered, no thread started
        started = time.monotonic()
        _wait_closed(idle, closed, count - cap, timeout_s)
        assert len(closed) == count - cap
        assert threading.active_count() <= before + cap
        # the ones served are closed after the timeout
        _wait_closed(idle, closed, count, timeout_s + 5)
        assert len(closed) == count
        assert time.monotonic() - started >= timeout_s * 0.9
        # /metrics answers again, and the threads are gone
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics",
                                    timeout=5) as resp:
            assert b"chrono_collector_connected" in resp.read()
        assert wait_until(lambda: threading.active_count() <= before, 5)
    finally:
        for sock in idle:
            sock.close()
        server.stop()
    assert "Traceback" not in capfd.readouterr().err


def _scrapes_answered_beside(clients: int, first_bytes: bytes) -> None:
    """With `clients` connections held open (each having sent `first_bytes`) to a server
    capped at 4, /metrics and /healthz still answer."""
    registry = CollectorRegistry()
    Metrics(registry, "coinbase", "w-1")
    server = MetricsServer(registry, lambda: Health(True, {"status": "ok"}), "127.0.0.1", 0,
                           connection_timeout_s=30, max_connections=4)
    server.start()
    held = [socket.create_connection(("127.0.0.1", server.port), timeout=10)
            for _ in range(clients)]
    try:
        for sock in held:
            if first_bytes:
                sock.sendall(first_bytes)
        for path in ("/metrics", "/healthz", "/metrics"):  # one connection each, closed after
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}",
                                        timeout=5) as resp:
                assert resp.status == 200
    finally:
        for sock in held:
            sock.close()
        server.stop()


def test_metrics_still_answer_while_idle_connections_are_under_the_cap() -> None:
    _scrapes_answered_beside(3, b"")


def test_clients_that_hold_every_slot_do_not_shut_the_scrapes_out() -> None:
    # The timeout is per read: clients trickling a byte now and then held all the slots for
    # ever, and every scrape was refused (CollectorDown, `status` exiting 1). The oldest
    # connection is cut to make room.
    _scrapes_answered_beside(4, b"G")  # (a request line that never ends)


def test_the_shipped_limits_fit_the_units_task_limit() -> None:
    unit = (Path(collectors.__file__).parents[1] / "systemd" / "chrono-collector@.service")
    [tasks_max] = [int(line.split("=")[1]) for line in unit.read_text().splitlines()
                   if line.startswith("TasksMax=")]
    # the service's own threads (ws, parse, up to 16 delivery workers, spool, metrics...)
    # plus every metrics connection stay under TasksMax
    assert tasks_max > METRICS_MAX_CONNECTIONS + 16 + 10
    assert 1 <= METRICS_CONNECTION_TIMEOUT_S <= 15  # a scrape takes milliseconds


# --- counters that start at 0 (increase() and rate() see their first event) --------------------

def _reasons_emitted_in(path: Path, function_names: set[str]) -> set[str]:
    """The string constants the functions `function_names` of `path` return or pass as the
    reason of `request_reconnect(...)`/`PostResult(reason=...)` (read from the source, so a
    reason added without its Literal type is found even if the annotation was loosened)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and (
                node.name in function_names):
            for sub in ast.walk(node):
                if isinstance(sub, ast.Return) and isinstance(sub.value, ast.Constant) and (
                        isinstance(sub.value.value, str)):
                    found.add(sub.value.value)
                if isinstance(sub, ast.Assign) and isinstance(sub.value, ast.Constant) and (
                        any(isinstance(t, ast.Name) and t.id == "reason" for t in sub.targets)):
                    found.add(str(sub.value.value))
                if isinstance(sub, ast.AnnAssign) and isinstance(sub.value, ast.Constant) and (
                        isinstance(sub.target, ast.Name) and sub.target.id == "reason"):
                    found.add(str(sub.value.value))
        if isinstance(node, ast.Call):
            name = getattr(node.func, "attr", getattr(node.func, "id", ""))
            if name == "request_reconnect":
                found.update(str(a.value) for a in node.args if isinstance(a, ast.Constant))
            found.update(str(k.value.value) for k in node.keywords
                         if k.arg == "reason" and isinstance(k.value, ast.Constant)
                         and isinstance(k.value.value, str))
    return found


PACKAGE = Path(collectors.__file__).parent


def test_every_reconnect_reason_the_code_can_emit_starts_at_zero() -> None:
    emitted = _reasons_emitted_in(PACKAGE / "connection.py", {"_session", "_receive"})
    emitted |= _reasons_emitted_in(PACKAGE / "pipeline.py", set())
    assert {"connect_failed", "liveness_timeout", "max_age", "server_shutdown"} <= emitted
    # "stopped" ends the loop before anything is counted
    assert emitted - {"stopped"} <= set(RECONNECT_REASONS), emitted - set(RECONNECT_REASONS)
    assert set(RECONNECT_REASONS) >= PLANNED_REASONS
    registry = CollectorRegistry()
    Metrics(registry, "coinbase", "w")
    for reason in RECONNECT_REASONS:
        assert registry.get_sample_value("chrono_collector_reconnects_total",
                                         {"exchange": "coinbase", "reason": reason}) == 0, reason


def _every_post_result() -> list[PostResult]:
    out = [PostResult(Outcome.RETRY, None, None, "", reason=r) for r in FLUSH_FAILURE_REASONS]
    out.append(PostResult(Outcome.RETRY, None, None, "no answer"))
    for status in range(100, 600):
        out.append(PostResult(classify_status(status), status, None, ""))
    return out


def test_every_flush_failure_reason_the_code_can_emit_starts_at_zero() -> None:
    emitted = {_failure_reason(r) for r in _every_post_result()
               if r.outcome is not Outcome.STORED}
    emitted |= _reasons_emitted_in(PACKAGE / "delivery.py", {"_failure_reason"})
    assert {"network", "server_error", "throttled", "auth", "rejected"} <= emitted
    assert emitted <= set(FLUSH_FAILURE_REASONS), emitted - set(FLUSH_FAILURE_REASONS)
    registry = CollectorRegistry()
    Metrics(registry, "coinbase", "w")
    for reason in FLUSH_FAILURE_REASONS:
        assert registry.get_sample_value("chrono_collector_flush_failures_total",
                                         {"exchange": "coinbase", "reason": reason}) == 0, reason


def test_configured_symbols_and_threads_start_at_zero_and_nothing_else() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, "kraken", "w", symbols=("BTC/USD", "ETH/USD"),
                      threads=thread_names("kraken", 2))
    for symbol in ("BTC/USD", "ETH/USD"):
        labels = {"exchange": "kraken", "symbol": symbol}
        assert registry.get_sample_value("chrono_collector_subscription_errors_total",
                                         labels) == 0
        assert registry.get_sample_value("chrono_collector_symbol_rejected", labels) == 0
        # records and stale spells too: the first of each after a restart shows in increase()
        assert registry.get_sample_value("chrono_collector_records_total", labels) == 0
        assert registry.get_sample_value("chrono_collector_symbol_stale_events_total",
                                         labels) == 0
        assert registry.get_sample_value("chrono_collector_symbol_stale", labels) == 0
        assert registry.get_sample_value("chrono_collector_last_record_timestamp_seconds",
                                         labels) == 0  # reads 0 until known
    for thread in ("ws-kraken", "parse-kraken", "delivery", "delivery-2"):
        assert registry.get_sample_value("chrono_collector_thread_errors_total",
                                         {"exchange": "kraken", "thread": thread}) == 0, thread
    metrics.subscription_error("ETH/USD")
    metrics.symbol_rejected("ETH/USD")
    labels = {"exchange": "kraken", "symbol": "ETH/USD"}
    assert registry.get_sample_value("chrono_collector_subscription_errors_total", labels) == 1
    assert registry.get_sample_value("chrono_collector_symbol_rejected", labels) == 1
    records, _last = metrics.symbol_children("BTC/USD")  # the child created at 0
    records.inc(3)
    metrics.set_stale("BTC/USD", True)
    labels = {"exchange": "kraken", "symbol": "BTC/USD"}
    assert registry.get_sample_value("chrono_collector_records_total", labels) == 3
    assert registry.get_sample_value("chrono_collector_symbol_stale_events_total", labels) == 1
    # bounded: no series for a symbol that was not configured
    text = generate_latest(registry).decode()
    assert "SOL/USD" not in text


def test_the_connected_help_does_not_promise_a_subscription() -> None:
    registry = CollectorRegistry()
    Metrics(registry, "coinbase", "w")
    help_line = next(line for line in generate_latest(registry).decode().splitlines()
                     if line.startswith("# HELP chrono_collector_connected "))
    assert "subscribed" not in help_line and "before the subscribe" in help_line


def _message_kinds_counted_in(path: Path) -> set[str]:
    """The string constants passed (directly or through a conditional) to `.message(...)`."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "message":
            for arg in node.args:
                found.update(str(c.value) for c in ast.walk(arg)
                             if isinstance(c, ast.Constant) and isinstance(c.value, str))
    return found


def test_every_message_kind_starts_at_zero() -> None:
    counted = _message_kinds_counted_in(PACKAGE / "connection.py")
    assert {"ping", "pong"} <= counted
    kinds = {k.value for k in Kind} | counted  # the parser counts every Kind
    assert kinds <= set(MESSAGE_KINDS), kinds - set(MESSAGE_KINDS)
    registry = CollectorRegistry()
    metrics = Metrics(registry, "coinbase", "w")
    for kind in MESSAGE_KINDS:
        assert registry.get_sample_value("chrono_collector_messages_received_total",
                                         {"exchange": "coinbase", "kind": kind}) == 0, kind
    metrics.message("ping")
    assert registry.get_sample_value("chrono_collector_messages_received_total",
                                     {"exchange": "coinbase", "kind": "ping"}) == 1


def test_the_parse_errors_help_says_what_it_counts() -> None:
    registry = CollectorRegistry()
    Metrics(registry, "coinbase", "w")
    help_line = next(line for line in generate_latest(registry).decode().splitlines()
                     if line.startswith("# HELP chrono_collector_parse_errors_total "))
    # Whole frames, items inside a parsed frame, and records for symbols not subscribed
    # (pipeline.Parser._handle counts all three).
    assert "items within a frame" in help_line and "not subscribed" in help_line
