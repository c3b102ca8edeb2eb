"""The chunked lag histogram exposes exactly what prometheus_client's Histogram would."""

from __future__ import annotations

import json
import socket
import time
import urllib.request

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from collectors.metrics import LAG_BUCKETS_S, ChunkHistogram, Health, Metrics, MetricsServer


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
