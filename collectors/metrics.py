"""Every Prometheus metric of a collector process, on an injected registry, plus the HTTP
endpoint serving `/metrics` and `/healthz`.

Naming follows Prometheus practice: prefix `chrono_collector_`, base units, counters end in
`_total`, timestamps rather than ages (alert on `time() - x`), a total counter plus a failures
counter rather than an outcome label, and no `symbol` label on histograms. Every metric carries
the `exchange` label, so scrape configs must not add one.
"""

from __future__ import annotations

import bisect
import contextlib
import io
import json
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any, Literal, get_args
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from collectors.exchanges.base import Kind
from collectors.threadnames import name_native_thread

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

log = logging.getLogger(__name__)
PREFIX = "chrono_collector"

FLUSH_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LAG_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0, 60.0)

# The label values of the reason-labelled counters: the one list of them. The code that emits a
# reason is typed with these (mypy refuses any other), and `Metrics` creates every child at 0,
# so the first event of each shows in increase()/rate() (a child created at its first event
# starts at 1, and Prometheus sees no increase).
#: Why a connection was replaced (`connection.py`; the planned ones are its PLANNED_REASONS).
ReconnectReason = Literal["connect_failed", "handshake_rejected", "error", "liveness_timeout",
                          "closed_by_server", "server_shutdown", "max_age", "protocol_error",
                          "all_symbols_stale", "subscribe_unanswered"]
RECONNECT_REASONS: tuple[ReconnectReason, ...] = get_args(ReconnectReason)
#: Why a batch POST failed (`delivery._failure_reason`).
FlushFailureReason = Literal["network", "client_error", "throttled", "server_error", "auth",
                             "rejected", "redirect", "timeout", "other"]
FLUSH_FAILURE_REASONS: tuple[FlushFailureReason, ...] = get_args(FlushFailureReason)
#: The `kind` label values of messages_received_total: what the parser classifies a frame as
#: (`Kind`), plus the WebSocket pings the connection counts itself (its pongs are `Kind.PONG`).
MESSAGE_KINDS: tuple[str, ...] = (*(k.value for k in Kind), "ping")


class Metrics:
    """The metric families, bound to one exchange. Construct once per process (or per test)."""

    def __init__(self, registry: CollectorRegistry, exchange: str, worker_id: str,
                 version: str = "", *, symbols: Iterable[str] = (),
                 threads: Iterable[str] = ()) -> None:
        """`symbols` (the configured ones) and `threads` (the names of the threads run under
        `thread_error`) get their counters created at 0, like every reason: bounded by the
        configuration, never by what a venue sends."""
        self.registry = registry
        self.exchange = exchange
        ex = ["exchange"]
        r = registry

        def counter(name: str, doc: str, labels: Iterable[str] = ()) -> Counter:
            return Counter(f"{PREFIX}_{name}", doc, [*ex, *labels], registry=r)

        def gauge(name: str, doc: str, labels: Iterable[str] = ()) -> Gauge:
            return Gauge(f"{PREFIX}_{name}", doc, [*ex, *labels], registry=r)

        info = Gauge(f"{PREFIX}_build_info", "Constant 1, labelled with version and worker id.",
                     ["exchange", "worker_id", "version"], registry=r)
        info.labels(exchange, worker_id, version).set(1)

        self.connected = gauge("connected", "1 while the exchange WebSocket is connected (set "
                               "once the handshake is done, before the subscribe is sent and "
                               "answered), else 0.").labels(exchange)
        self.connect_attempts = counter("connect_attempts_total",
                                        "WebSocket connection attempts.").labels(exchange)
        self._reconnects = counter("reconnects_total", "Connections replaced, by reason.",
                                   ["reason"])
        self.last_reconnect_duration = gauge(
            "last_reconnect_duration_seconds",
            "Time from losing the previous connection to the next subscribed one.",
        ).labels(exchange)
        self.last_message_ts = gauge("last_message_timestamp_seconds",
                                     "Unix time of the last frame of any kind (0 before the "
                                     "first).").labels(exchange)
        self._messages = counter("messages_received_total", "Frames received, by kind.",
                                 ["kind"])
        self.parse_errors = counter(
            "parse_errors_total", "Frames, or items within a frame, that could not be parsed "
            "or were for a symbol not subscribed (skipped).").labels(exchange)
        self.duplicates = counter("duplicates_dropped_total", "Ticker updates dropped as "
                                  "duplicate or late (sequence/event time).").labels(exchange)
        self.frames_dropped = counter("frames_dropped_total", "Frames dropped because the "
                                      "parse queue was full.").labels(exchange)
        self.oversized_frames = counter("oversized_frames_total", "Frames larger than the "
                                        "frame size limit, discarded unread.").labels(exchange)
        self._records = counter("records_total", "Valid records produced, by symbol.",
                                ["symbol"])
        self._last_record_ts = gauge("last_record_timestamp_seconds",
                                     "Unix receive time of the last record, by symbol.",
                                     ["symbol"])
        self._symbol_stale = gauge("symbol_stale", "1 while a subscribed symbol has had no "
                                   "data for longer than its threshold.", ["symbol"])
        self._stale_events = counter("symbol_stale_events_total",
                                     "Times a symbol went stale.", ["symbol"])
        self._subscription_errors = counter("subscription_errors_total",
                                            "Symbols the venue refused or never sent.",
                                            ["symbol"])
        self._symbol_rejected = gauge("symbol_rejected", "1 once the venue refused a "
                                      "configured symbol (no longer subscribed until a "
                                      "restart), else 0.", ["symbol"])
        self.lag = ChunkHistogram(f"{PREFIX}_lag_seconds",
                                  "Exchange event time to local receive time.", exchange,
                                  LAG_BUCKETS_S, registry=r)
        self.queue_records = gauge(
            "queue_records", "Messages held in memory waiting to be parsed and spooled."
        ).labels(exchange)
        self.queue_dropped = counter("queue_dropped_records_total", "Records dropped because "
                                     "the spool refused writes while stopping."
                                     ).labels(exchange)
        self.flushes = counter("flushes_total", "Batch POST attempts to the ingest API.").labels(
            exchange)
        self._flush_failures = counter("flush_failures_total",
                                       "Batch POST attempts that failed, by reason.", ["reason"])
        self.flush_duration = Histogram(f"{PREFIX}_flush_duration_seconds",
                                        "Duration of one batch POST.", ex,
                                        buckets=FLUSH_BUCKETS_S, registry=r).labels(exchange)
        self.records_delivered = counter("records_delivered_total",
                                         "Records the ingest API accepted.").labels(exchange)
        self.last_flush_success_ts = gauge("last_flush_success_timestamp_seconds",
                                           "Unix time of the last accepted batch (0 before "
                                           "the first).").labels(exchange)
        self.dead_letter_records = counter("dead_letter_records_total", "Records moved to the "
                                           "dead-letter file (rejected by the API).").labels(
                                               exchange)
        self.spool_records = gauge("spool_records",
                                   "Records on disk waiting for delivery.").labels(exchange)
        self.spool_bytes = gauge("spool_bytes", "Payload bytes on disk waiting for delivery."
                                 ).labels(exchange)
        self.spool_oldest_ts = gauge("spool_oldest_record_timestamp_seconds",
                                     "Unix time the oldest waiting record was spooled "
                                     "(0 when empty).").labels(exchange)
        self.spool_max_bytes = gauge("spool_max_bytes", "Spool size bound.").labels(exchange)
        self.spool_dropped = counter("spool_dropped_records_total", "Records dropped because "
                                     "the spool was full (oldest first).").labels(exchange)
        self.spool_replayed = counter("spool_replayed_records_total", "Records re-sent from a "
                                      "batch claimed before a restart.").labels(exchange)
        self.spool_errors = counter("spool_errors_total", "Failed spool operations (e.g. "
                                    "disk full); retried.").labels(exchange)
        self.spool_corrupt_lost = counter("spool_corrupt_lost_records_total", "Records lost "
                                          "to a corrupt spool file (damage that hides how "
                                          "many counts 1: a lower bound).").labels(exchange)
        self.thread_errors = counter("thread_errors_total", "Unexpected exceptions caught at "
                                     "a thread's top loop.", ["thread"])
        self._per_symbol: dict[str, tuple[Counter, Gauge]] = {}
        for reason in RECONNECT_REASONS:
            self._reconnects.labels(exchange, reason)
        for failure in FLUSH_FAILURE_REASONS:
            self._flush_failures.labels(exchange, failure)
        for kind in MESSAGE_KINDS:
            self._messages.labels(exchange, kind)
        for symbol in symbols:
            # records_total and symbol_stale_events_total at 0 (the first record, the first
            # stale spell after a restart count in increase()/rate()); the last-record time
            # reads 0 until known, the staleness 0 until the symbol goes stale.
            self.symbol_children(symbol)
            self._stale_events.labels(exchange, symbol)
            self._symbol_stale.labels(exchange, symbol).set(0)
            self._subscription_errors.labels(exchange, symbol)
            self._symbol_rejected.labels(exchange, symbol).set(0)
        for thread in threads:
            self.thread_errors.labels(exchange, thread)

    # Small helpers keep label handling out of the hot path's callers.
    def message(self, kind: str) -> None:
        self._messages.labels(self.exchange, kind).inc()

    def messages_counter(self, kind: str) -> Counter:
        return self._messages.labels(self.exchange, kind)

    def reconnect(self, reason: ReconnectReason) -> None:
        self._reconnects.labels(self.exchange, reason).inc()

    def flush_failure(self, reason: FlushFailureReason) -> None:
        self._flush_failures.labels(self.exchange, reason).inc()

    def symbol_children(self, symbol: str) -> tuple[Counter, Gauge]:
        """(records counter, last-record gauge) for a symbol, cached for the hot path."""
        pair = self._per_symbol.get(symbol)
        if pair is None:
            pair = (self._records.labels(self.exchange, symbol),
                    self._last_record_ts.labels(self.exchange, symbol))
            self._per_symbol[symbol] = pair
        return pair

    def set_stale(self, symbol: str, stale: bool) -> None:
        self._symbol_stale.labels(self.exchange, symbol).set(1 if stale else 0)
        if stale:
            self._stale_events.labels(self.exchange, symbol).inc()

    def subscription_error(self, symbol: str) -> None:
        self._subscription_errors.labels(self.exchange, symbol).inc()

    def symbol_rejected(self, symbol: str) -> None:
        """The venue refused `symbol` (the caller counts it in subscription_errors_total)."""
        self._symbol_rejected.labels(self.exchange, symbol).set(1)

    def thread_error(self, thread: str) -> None:
        self.thread_errors.labels(self.exchange, thread).inc()


class ChunkHistogram(Collector):
    """A histogram with one `exchange` label that takes its observations a chunk at a time.

    prometheus_client's Histogram takes a lock and walks its buckets once per `observe`; the
    parser observes one lag per record (tens of thousands a second in a burst), so it bins a
    chunk with `bisect` and adds the counts here under one lock. Exposition is the same as a
    Histogram's: `_bucket{le=...}` (cumulative, `+Inf` included), `_count` and `_sum`.
    """

    def __init__(self, name: str, documentation: str, exchange: str,
                 buckets: Sequence[float], registry: CollectorRegistry) -> None:
        self._name = name
        self._doc = documentation
        self._exchange = exchange
        self._bounds = sorted(float(b) for b in buckets)
        go_float: Callable[[float], str] = floatToGoString  # as Histogram writes `le`
        self._le = [go_float(b) for b in self._bounds] + ["+Inf"]
        self._counts = [0] * (len(self._bounds) + 1)  # per bucket, not cumulative; last: +Inf
        self._sum = 0.0
        self._lock = threading.Lock()  # the parser adds while the /metrics thread collects
        registry.register(self)

    def observe_many(self, values: Iterable[float]) -> None:
        """Add observations (seconds, >= 0)."""
        counts = [0] * len(self._counts)
        total = 0.0
        bounds = self._bounds
        for value in values:
            counts[bisect.bisect_left(bounds, value)] += 1  # first bucket with le >= value
            total += value
        with self._lock:
            for i, n in enumerate(counts):
                if n:
                    self._counts[i] += n
            self._sum += total

    def observe(self, value: float) -> None:
        self.observe_many((value,))

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self._name, self._doc, labels=["exchange"])

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        family = HistogramMetricFamily(self._name, self._doc, labels=["exchange"])
        cumulative, buckets = 0, []
        for le, n in zip(self._le, counts, strict=True):
            cumulative += n
            buckets.append((le, float(cumulative)))
        family.add_metric([self._exchange], buckets, total)
        yield family


@dataclass(frozen=True, slots=True)
class Health:
    ok: bool
    body: dict[str, object]


#: How long a connection to the metrics port may stay silent (no request yet, or a client that
#: stopped reading) before it is closed. A scrape or a health check takes milliseconds; without
#: a timeout every idle connection held a server thread for ever (100 of them took the collector
#: from 8 to 108 threads, and under the unit's TasksMax=64 /metrics and /healthz stopped
#: answering).
METRICS_CONNECTION_TIMEOUT_S = 10.0
#: At most this many connections are served at once, each by its own thread (Prometheus and a
#: health check use one or two); a connection beyond it is closed at once, unanswered, so the
#: port can never take more than this many of the process's threads (systemd's TasksMax=64).
METRICS_MAX_CONNECTIONS = 8
#: How long a connection over the cap waits for a slot (once the oldest connection was cut to
#: free one) before it is closed unanswered: a slot comes back just after its client has the
#: answer, or its connection was cut; a flood costs the accepting thread this much each.
SLOT_WAIT_S = 0.2


class _QuietHandler(WSGIRequestHandler):
    server: _ThreadingWSGIServer

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.connection_timeout_s)  # each read and write

    def log_message(self, format: str, *args: object) -> None:
        """Scrapes every few seconds would flood the log; errors surface as metrics."""

    def get_stderr(self) -> _LogStream:
        """Where wsgiref prints a traceback (an app error, a write timing out): one JSON log
        line instead of bare lines on stderr."""
        return _LogStream()


class _LogStream(io.StringIO):
    def flush(self) -> None:
        text = self.getvalue().strip()
        if text:
            log.error("metrics_http_error", extra={"detail": text[-4000:]})
        self.seek(0)
        self.truncate()


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    """wsgiref's server: a thread per connection, at most `limit()`'s many at once, each
    connection closed after `connection_timeout_s` of silence."""

    daemon_threads = True  # a hung scraper must not keep the process alive at exit
    # socketserver's 5: a burst of connections beyond it waits a second for the SYN's retry;
    # accepting a connection over the cap and closing it costs nothing.
    request_queue_size = 64

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.connection_timeout_s = METRICS_CONNECTION_TIMEOUT_S
        self._slots = threading.BoundedSemaphore(METRICS_MAX_CONNECTIONS)
        # The connections being served, oldest first: when every slot is taken, the oldest is
        # cut to make room. A scrape takes milliseconds, so the oldest is a client that holds
        # its connection (idle, or trickling a byte now and then within the timeout): eight
        # such clients refused every scrape, until cutting them.
        self._serving: dict[socket.socket, None] = {}
        self._serving_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def limit(self, connection_timeout_s: float, max_connections: int) -> None:
        """Set this server's limits (before it serves)."""
        self.connection_timeout_s = connection_timeout_s
        self._slots = threading.BoundedSemaphore(max_connections)

    def process_request(self, request: socket.socket,  # type: ignore[override]
                        client_address: tuple[str, int]) -> None:
        # Every slot taken: the oldest connection is cut, and this one waits (briefly) for the
        # slot its thread gives back, as for one whose client has just had its answer.
        if not self._slots.acquire(blocking=False):
            self._cut_oldest()
            if not self._slots.acquire(timeout=SLOT_WAIT_S):
                self.shutdown_request(request)  # still over the cap: closed unanswered
                return
        with self._serving_lock:
            self._serving[request] = None
        try:
            super().process_request(request, client_address)
        except RuntimeError:  # "can't start new thread" (a task limit reached): no traceback
            self._forget(request)
            self._slots.release()
            self.shutdown_request(request)

    def _cut_oldest(self) -> None:
        with self._serving_lock:
            oldest = next(iter(self._serving), None)
        if oldest is not None:
            with contextlib.suppress(OSError):  # its thread's read fails: it ends, freeing a slot
                oldest.shutdown(socket.SHUT_RDWR)

    def _forget(self, request: socket.socket) -> None:
        with self._serving_lock:
            self._serving.pop(request, None)

    def process_request_thread(self, request: socket.socket,  # type: ignore[override]
                               client_address: tuple[str, int]) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._forget(request)
            self._slots.release()

    def handle_error(self, request: object, client_address: object) -> None:
        """A client that timed out or went away is no error of ours (socketserver would print
        a traceback to stderr, a non-JSON line in the log); anything else is logged."""
        if isinstance(sys.exc_info()[1], OSError):
            return
        log.exception("metrics_http_error")


class MetricsServer:
    """`/metrics` (Prometheus text format) and `/healthz` (JSON, 200 or 503) on one port."""

    def __init__(self, registry: CollectorRegistry, health: Callable[[], Health],
                 host: str, port: int, *,
                 connection_timeout_s: float = METRICS_CONNECTION_TIMEOUT_S,
                 max_connections: int = METRICS_MAX_CONNECTIONS) -> None:
        self._metrics_app = make_wsgi_app(registry)
        self._health = health
        self._server = make_server(host, port, self._app, server_class=_ThreadingWSGIServer,
                                   handler_class=_QuietHandler)
        self._server.limit(connection_timeout_s, max_connections)
        self.port = self._server.server_port
        # serve_forever wakes every poll_interval only to look for a shutdown request; an idle
        # collector should not wake up more often than it must, and stop() nudges it instead.
        self._thread = threading.Thread(target=self._serve, name="metrics-http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _serve(self) -> None:
        name_native_thread("metrics-http")
        self._server.serve_forever(poll_interval=1.0)

    def stop(self) -> None:
        stopper = threading.Thread(target=self._server.shutdown, name="metrics-stop",
                                   daemon=True)
        stopper.start()
        # Wake the serving loop's select() now rather than at its next poll, with a connection
        # that carries no request; again until the loop has seen the shutdown request (the
        # first nudge may come before shutdown() has made it).
        host = str(self._server.server_address[0])
        deadline = time.monotonic() + 2.0
        while self._thread.is_alive() and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                socket.create_connection((host, self.port), timeout=0.5).close()
            self._thread.join(timeout=0.05)
        stopper.join(timeout=2)
        self._server.server_close()
        self._thread.join(timeout=2)

    def _app(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/healthz":
            try:
                health = self._health()
            except Exception:  # a broken health callback must still answer
                log.exception("healthz_failed")
                health = Health(False, {"status": "error"})
            body = json.dumps(health.body, separators=(",", ":")).encode()
            status = "200 OK" if health.ok else "503 Service Unavailable"
            start_response(status, [("Content-Type", "application/json"),
                                    ("Content-Length", str(len(body))),
                                    ("Cache-Control", "no-store")])
            return [body]
        if path in ("/metrics", "/"):
            return self._metrics_app(environ, start_response)  # type: ignore[no-any-return]
        body = b"not found: try /metrics or /healthz\n"
        start_response("404 Not Found", [("Content-Type", "text/plain"),
                                         ("Content-Length", str(len(body)))])
        return [body]
