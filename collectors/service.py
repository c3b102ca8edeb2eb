"""One exchange's collector: wires the threads together and runs them until SIGTERM/SIGINT/SIGHUP.

Threads (each named, each stopped through an Event, each with a top-level guard):

    ws-<exchange>     Connection: socket -> frames            (no parsing, no disk, no HTTP)
    parse-<exchange>  Parser: frames -> records, metrics, and SpoolWriter: records -> spool on
                      disk, a transaction per chunk of frames (the only adapter caller)
    delivery          Sender: spool -> POST batches -> ack / retry / dead letter
    (delivery-2 ...)  more Sender workers when DELIVERY_CONCURRENCY > 1 (POSTs in flight at once)
    delivery-spool    the workers' spool writes (claim the next batch, count the attempt,
                      acknowledge the last) while their POSTs are on the wire
    spool-fsync       the spool's: fsyncs its WAL every SPOOL_FSYNC_INTERVAL_MS after a
                      commit and checkpoints the WAL into the database (not when that is 0)

Stop order: stop reading, parse what arrived, spool it, then try to deliver the spool within the
drain timeout; whatever is left waits on disk for the next start. Exit 0.
"""

from __future__ import annotations

import errno
import functools
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from types import FrameType

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector

from collectors import __version__, exchanges
from collectors.batching import Handoff
from collectors.config import CollectorConfig
from collectors.connection import Connection, Frame
from collectors.decoding import decode_frame
from collectors.delivery import STATS_WAIT_S, Poster, Sender, SpoolWriter
from collectors.errors import ConfigError, SpoolError
from collectors.metrics import Health, Metrics, MetricsServer
from collectors.pipeline import Parser
from collectors.sdnotify import Notifier
from collectors.spool import Spool, is_disk_full
from collectors.threadnames import name_native_thread

log = logging.getLogger(__name__)

# Memory bound. A burst beyond what the parser and the spool can take waits as raw frames
# (compact), never as parsed records (~1 KB of Python objects each): the parser commits a chunk's
# records before it takes the next chunk. When the frame queue is full, the ws thread stops
# reading for up to a second (connection.FRAME_QUEUE_WAIT_S), so TCP holds the rest of a burst
# at the venue's side.
FRAME_QUEUE_MAX = 100_000    # frames waiting for the parser (~1 s of a heavy burst)...
FRAME_QUEUE_MAX_BYTES = 16 * 1024 * 1024  # ...and their bytes (frames may be up to 4 MiB)
#: The watchdog is fed only while every thread's loop has turned within this long, or within a
#: POST's total deadline and 5 s, if longer (the slowest honest turn is a POST: at most twice
#: connect + read timeout, 26 s by default; HTTP_READ_TIMEOUT_S may be up to 300 s).
PROGRESS_WINDOW_S = 25.0
DRAIN_TIMEOUT_S = 5.0        # supervisord's stopwaitsecs / systemd's TimeoutStopSec exceed this
#: After the drain window, how long the stop waits on for the threads besides a POST still
#: connecting (its HTTP_CONNECT_TIMEOUT_S): one deadline for all of them, so that a stop ends
#: within DRAIN_TIMEOUT_S + 1 + HTTP_CONNECT_TIMEOUT_S + this (14 s by default, under
#: supervisord's stopwaitsecs=30 and the units' TimeoutStopSec=30) whatever holds a thread
#: (each thread waited its own 23 s before, one after another: a spool locked by another
#: process made a stop last 64 s, killed by supervisord's SIGKILL at 30).
STOP_JOIN_MARGIN_S = 5.0
SPOOL_OPEN_RETRY_S = 5.0     # opening the spool again while its disk is full


def _frame_bytes(frame: Frame) -> int:
    return len(frame[0])


def thread_names(exchange: str, delivery_workers: int) -> list[str]:
    """The service's threads run under `_thread` (and so their `thread_errors_total` labels):
    the WebSocket thread, the parser, then each delivery worker."""
    return [f"ws-{exchange}", f"parse-{exchange}",
            *("delivery" if i == 0 else f"delivery-{i + 1}" for i in range(delivery_workers))]


class CollectorService:
    def __init__(self, config: CollectorConfig, *, registry: CollectorRegistry | None = None,
                 notifier: Notifier | None = None) -> None:
        self.config = config
        self._progress_window_s = max(
            PROGRESS_WINDOW_S,
            2 * (config.http_connect_timeout_s + config.http_read_timeout_s) + 5.0)
        self.registry = registry or CollectorRegistry()
        if registry is None:
            # process_start_time_seconds (restart alerts), RSS and CPU, python_info.
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
        self.metrics = Metrics(self.registry, config.exchange, config.worker_id, __version__,
                               symbols=config.symbols,
                               threads=thread_names(config.exchange,
                                                    config.delivery_concurrency))
        self.adapter = exchanges.create(config.exchange, config.worker_id, decode_frame)
        # (checked in the config already: this notes the markets the adapter cannot vouch for)
        self._unverified = self.adapter.check_symbols(config.symbols)
        self.stop_event = threading.Event()
        self._notifier = notifier or Notifier()
        self._status_said = False  # a STATUS= line was sent to systemd (cleared at READY)
        self._failed: list[str] = []
        self.frames: Handoff[Frame] = Handoff(FRAME_QUEUE_MAX, max_cost=FRAME_QUEUE_MAX_BYTES,
                                              cost_of=_frame_bytes)
        self.connection = Connection(self.adapter, config.ws_url, config.symbols, self.frames,
                                     self.metrics, self.stop_event,
                                     liveness_timeout_s=config.liveness_timeout_s)
        self._ws_finished = threading.Event()
        self._parser_finished = threading.Event()
        self._wake_delivery = threading.Event()  # set by each spool write
        # The spool is opened in run(), which attaches it before any thread starts.
        self._writer = SpoolWriter(None, self.metrics, self._wake_delivery,
                                   mark_of=self.adapter.dedup_mark,
                                   due_size=lambda: self.sender.due_size if self.sender else 1)
        self.parser = Parser(self.adapter, self.frames, self._writer, self.connection,
                             self.metrics, self._ws_finished, self.stop_event)
        # Read when scraped: the parser, which set them per chunk, is the thread a stalled spool
        # holds, and they froze just then (an empty queue and a silent venue on the dashboard
        # while frames piled up behind the parser).
        self.metrics.queue_records.set_function(lambda: len(self.frames))
        self.metrics.last_message_ts.set_function(self.connection.last_frame_unix)
        self.spool: Spool | None = None
        self.sender: Sender | None = None
        self.metrics_server: MetricsServer | None = None
        #: the threads still running when run() returned (the caller must not wait for them)
        self.threads_left: list[str] = []

    # ---- health ------------------------------------------------------------------------------
    def health(self) -> Health:
        now_m = time.monotonic()
        connected = self.connection.connected_since is not None
        silent_s = now_m - self.connection.last_frame_monotonic if connected else None
        fresh = silent_s is not None and silent_s < self.connection.liveness_timeout_s
        stale = sorted(self.parser.freshness.stale)
        last_msg = self.parser.last_message_unix
        last_flush = self.sender.last_success_unix if self.sender else None
        now = time.time()
        # (Not waiting long for a spool stuck on a stalled disk: the answer matters more.)
        spool_stats = self.spool.stats_within(STATS_WAIT_S) if self.spool else None
        # Every symbol stale on a venue that pushes tickers on a clock: connected, but nothing
        # comes (a stuck stream): not healthy. Where tickers follow trades, quiet markets.
        all_stale = (self.adapter.reconnect_when_all_stale and bool(stale)
                     and set(stale) >= set(self.parser.freshness.last))
        # The venue rejected every configured symbol: connected (its heartbeats keep coming)
        # and collecting nothing until SYMBOLS is fixed and the collector restarted.
        symbols = self.connection.symbols
        up = connected and fresh and not all_stale and bool(symbols)
        body: dict[str, object] = {
            "status": "ok" if (up and not stale) else "degraded" if up else
                      "no_symbols" if not symbols else
                      "stale" if connected and fresh else "down",
            "exchange": self.config.exchange,
            "worker_id": self.config.worker_id,
            "connected": connected,
            "last_message_age_s": round(now - last_msg, 3) if last_msg else None,
            "records_per_s": round(self.parser.records_per_s(), 2),
            "queue_records": len(self.frames),
            "spool_records": spool_stats.records if spool_stats else None,
            "last_flush_age_s": round(now - last_flush, 3) if last_flush else None,
            "symbols": symbols,
            "stale_symbols": stale,
        }
        return Health(up, body)

    # ---- lifecycle ---------------------------------------------------------------------------
    def request_stop(self, reason: str) -> None:
        if not self.stop_event.is_set():
            log.info("stop_requested", extra={"reason": reason})
        self.stop_event.set()
        self.connection.abort()

    def run(self, install_signals: bool = True) -> int:
        """Run until stopped. Returns the exit code. Raises ConfigError for start-up problems
        the operator must fix (unusable spool directory, metrics port taken)."""
        cfg = self.config
        if install_signals:  # first: a stop may come while the spool waits for disk space
            self._install_signals()
        spool = self._open_spool()
        if spool is None:  # stopped while waiting for disk space
            return 0
        self.spool = spool
        self.metrics.spool_max_bytes.set(cfg.spool_max_bytes)
        try:
            # Before the first frame: the venue's replay of what we already have is dropped.
            self.adapter.restore_marks(self.spool.marks())
        except SpoolError as exc:
            log.error("dedup_marks_unreadable", extra={"error": str(exc)})
        try:
            if cfg.metrics_port:
                self.metrics_server = MetricsServer(self.registry, self.health,
                                                    cfg.metrics_host, cfg.metrics_port)
        except OSError as exc:
            self.spool.close()
            where = (f"cannot listen on {cfg.metrics_host}:{cfg.metrics_port} "
                     f"({exc.strerror or exc})")
            if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
                # (the host is no address of this machine, or not one the server can use)
                raise ConfigError("METRICS_HOST", where,
                                  "an IPv4 address of this machine, e.g. 127.0.0.1") from None
            raise ConfigError("METRICS_PORT", where,
                              "a free port, or 0 to turn metrics off") from None

        # One Poster (keep-alive session, deadline watchdog) per delivery worker.
        posters = [Poster(cfg.ingest_url, cfg.api_key,
                          connect_timeout_s=cfg.http_connect_timeout_s,
                          read_timeout_s=cfg.http_read_timeout_s)
                   for _ in range(cfg.delivery_concurrency)]
        self.sender = Sender(self.spool, posters, self.metrics, batch_size=cfg.batch_size,
                             batch_interval_s=cfg.batch_interval_s, stop=self.stop_event,
                             writer_finished=self._parser_finished,
                             wake=self._wake_delivery,
                             drain_timeout_s=DRAIN_TIMEOUT_S, retry_max_s=cfg.retry_max_s,
                             thread_init=lambda: name_native_thread("delivery-spool"))
        # The parser's commits go through the Sender, which may claim the batch one fills.
        self._writer.attach(self.spool, self.sender.append)
        ws_name, parse_name, *delivery_names = thread_names(cfg.exchange, self.sender.workers)
        threads = [
            # A finished stage closes the queue it fed, which wakes its consumer at once.
            self._thread(ws_name, self.connection.run, self._ws_finished,
                         then=self.frames.close),
            self._thread(parse_name, self.parser.run, self._parser_finished,
                         then=self._wake_delivery.set),
            *(self._thread(name, functools.partial(self.sender.run, i), None)
              for i, name in enumerate(delivery_names)),
        ]
        if self.metrics_server:
            self.metrics_server.start()
        for t in threads:
            t.start()
        log.info("collector_started", extra={
            "symbols": list(cfg.symbols), "ws_url": cfg.ws_url, "ingest_url": cfg.ingest_url,
            "metrics": f"{cfg.metrics_host}:{self.metrics_server.port}"
            if self.metrics_server else None, "spool_dir": str(cfg.spool_dir),
            "batch_size": cfg.batch_size, "batch_interval_s": cfg.batch_interval_s,
            "delivery_concurrency": cfg.delivery_concurrency})
        if self._unverified:
            log.warning("symbols_unverified", extra={
                "symbols": self._unverified[:20],
                "hint": f"not in the collector's table of {cfg.exchange} markets: if the venue "
                        "does not list one, no data arrives for it and symbol_no_data names it "
                        "after 30 s"})
        # (A status line said while waiting for disk space is cleared.)
        self._notifier.notify("READY=1\nSTATUS=" if self._status_said else "READY=1")
        self._wait(threads)

        # Ordered shutdown: each stage finishes once the one before it has.
        self.stop_event.set()
        self.connection.abort()
        # A POST in flight (or a final one) may not outlast the drain window, even when the API
        # drips its answer: the threads then end within the joins below.
        stop_by = time.monotonic() + DRAIN_TIMEOUT_S + 1
        for poster in posters:
            poster.stop_by(stop_by)
        # (A POST may still be connecting: the deadline cuts a read, not a connect.)
        join_by = stop_by + cfg.http_connect_timeout_s + STOP_JOIN_MARGIN_S
        for t in threads:
            t.join(timeout=max(0.0, join_by - time.monotonic()))
        alive = [t.name for t in threads if t.is_alive()]
        self.threads_left = alive
        if self._parser_finished.is_set():
            self._writer.flush_log()
        if self.metrics_server:
            self.metrics_server.stop()
        for poster in posters:
            poster.close()
        if not alive:
            self.sender.close()
            self.spool.close()
        left = len(self.frames)
        log.info("collector_stopped", extra={"threads_still_running": alive or None,
                                             "unspooled_messages": left or None})
        return 1 if self._failed or alive else 0

    def _open_spool(self) -> Spool | None:
        """The spool; None when stopped first. Raises ConfigError for a directory that cannot
        be used. A full disk is not a setting to fix: it waits, retrying every
        SPOOL_OPEN_RETRY_S (exiting 2 made supervisord and systemd give up on the collector
        for good, and it stayed down once space came back)."""
        cfg = self.config
        last_log = -60.0
        while True:
            try:
                # A waiting row holds at most a batch's worth of records, so a claim rewrites
                # at most one row's remainder.
                return Spool(cfg.spool_dir, max_bytes=cfg.spool_max_bytes,
                             fsync_interval_s=cfg.spool_fsync_interval_s,
                             chunk_records=cfg.batch_size,
                             thread_init=lambda: name_native_thread("spool-fsync"))
            except SpoolError as exc:
                if not is_disk_full(exc):
                    raise ConfigError("SPOOL_DIR", str(exc), "a writable directory") from None
                now = time.monotonic()
                if now - last_log >= 60.0:
                    last_log = now
                    log.error("spool_disk_full", extra={
                        "error": str(exc), "retry_every_s": SPOOL_OPEN_RETRY_S,
                        "hint": "free space on the spool's disk: the collector starts as soon "
                                "as it can write"})
                # Under systemd (Type=notify) a start that never says READY fails after
                # TimeoutStartSec, and after StartLimitBurst restarts systemd gives up: the
                # process is up and waiting by design, so it says so, and feeds the watchdog.
                self._notifier.notify("READY=1\nSTATUS=waiting for disk space for the spool")
                self._status_said = True
                self._notifier.notify("WATCHDOG=1")
            interval = self._notifier.watchdog_interval_s
            if self.stop_event.wait(min(SPOOL_OPEN_RETRY_S, interval or SPOOL_OPEN_RETRY_S)):
                return None

    def _wait(self, threads: list[threading.Thread]) -> None:
        interval = self._notifier.watchdog_interval_s
        last_ping = 0.0
        # A stop request or a crashed thread (which requests a stop) ends the wait at once;
        # the timeout only paces the watchdog pings.
        while not self.stop_event.wait(min(1.0, interval or 1.0)):
            if self._failed:
                return
            if interval and time.monotonic() - last_ping >= interval and self.progressing(
                    threads):
                self._notifier.notify("WATCHDOG=1")
                last_ping = time.monotonic()
        self._notifier.notify("STOPPING=1")

    def progressing(self, threads: list[threading.Thread]) -> bool:
        """Every thread alive and its loop turned recently (what the watchdog vouches for)."""
        now = time.monotonic()
        # A parser waiting for the spool to take a write again (disk full) retries every half
        # second: that is progress too, so the later of the two beats counts.
        beats = [self.connection.beat, max(self.parser.beat, self._writer.beat),
                 self.sender.beat if self.sender else now]
        return all(t.is_alive() for t in threads) and all(
            now - beat < self._progress_window_s for beat in beats)

    def _thread(self, name: str, target: Callable[[], None],
                finished: threading.Event | None,
                then: Callable[[], None] | None = None) -> threading.Thread:
        def guarded() -> None:
            name_native_thread(name)
            try:
                target()
            except Exception:  # the top of a thread: a bug must not pass silently
                log.exception("thread_crashed", extra={"thread_name": name})
                self.metrics.thread_error(name)
                self._failed.append(name)
                self.request_stop(f"thread {name} crashed")
            finally:
                if finished is not None:
                    finished.set()
                if then is not None:
                    then()

        return threading.Thread(target=guarded, name=name, daemon=True)

    def _install_signals(self) -> None:
        def handler(signum: int, _frame: FrameType | None) -> None:
            self.request_stop(signal.Signals(signum).name)

        # SIGHUP too (a closed terminal, `kill -HUP`): its default action killed the process
        # at once, losing the queued records; there is no config to reload, so it drains.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, handler)
