"""Runs IngestApp on waitress: `main()` for `chrono-collector ingest`, `start_server()` for tests.

Why waitress: it is a production-grade WSGI server written in pure Python with no C extension
and no dependency of its own, so it installs anywhere the collectors do. It is multi-threaded
(a fixed pool of worker threads behind one asyncore I/O loop), which suits a blocking sqlite3 or
psycopg backend; it buffers each request body itself, enforcing a maximum size before the app
runs, and de-chunks chunked uploads, so slow or hostile clients never tie up a worker thread.
It runs in-process and in the foreground, which is what supervisord and systemd expect, and it
can be created programmatically on port 0 and stopped from another thread, which gives the tests
a real HTTP server on 127.0.0.1. gunicorn and uWSGI need a pre-fork master, and the stdlib
wsgiref server is not meant for production.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import resource
import signal
import socket
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any

from waitress import wasyncore
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.server import BaseWSGIServer, create_server
from waitress.task import ErrorTask, ThreadedTaskDispatcher
from waitress.utilities import BadRequest, RequestEntityTooLarge

from collectors.backoff import Backoff
from collectors.errors import ConfigError, StorageError
from collectors.ingest.app import IngestApp, problem
from collectors.ingest.cli import configure_parser
from collectors.ingest.config import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_THREADS,
    IngestConfig,
    database_secrets,
    database_url_from_env,
    log_level_from_env,
    redact_url,
)
from collectors.ingest.storage import Storage, migrate, open_storage
from collectors.keys import Redactor, keys_in_env
from collectors.logsetup import setup_logging, warn_about_keys

if TYPE_CHECKING:
    from wsgiref.types import WSGIApplication

log = logging.getLogger(__name__)

PROG = "chrono-collector ingest"
STOP_TIMEOUT_S = 10.0  # in-flight requests get this long to finish (well inside stopwaitsecs)
#: A database that is down at start is tried again after a backoff from 1 s up to this.
STORAGE_RETRY_BASE_S = 1.0
STORAGE_RETRY_MAX_S = 30.0

@dataclass
class RunningServer:
    """A waitress server running in a daemon thread. `stop()` closes it (and owned storage)."""

    host: str
    port: int
    app: WSGIApplication
    _server: Any = field(repr=False)
    _thread: threading.Thread = field(repr=False)
    _owned_storage: Storage | None = field(default=None, repr=False)
    _stopped: bool = field(default=False, repr=False)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop accepting, let requests in progress finish, close every socket. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        server = self._server
        socket_map: dict[int, Any] = server._map if hasattr(server, "_map") else server.map
        trigger = _trigger_of(socket_map)
        try:
            if self._thread.is_alive() and trigger is not None:
                # 1. Close the listening sockets inside the I/O loop thread (wasyncore is not
                #    thread-safe); open connections keep being served.
                listeners_closed = threading.Event()

                def close_listeners() -> None:
                    for obj in list(socket_map.values()):
                        if isinstance(obj, BaseWSGIServer):
                            wasyncore.dispatcher.close(obj)
                    listeners_closed.set()

                woken = _in_loop(trigger, close_listeners)
                if woken:
                    listeners_closed.wait(timeout_s)
                # 2. Let worker threads finish the requests they are serving; queued ones are
                #    cancelled (their clients retry with the same Idempotency-Key).
                server.task_dispatcher.shutdown(cancel_pending=True, timeout=timeout_s)
                # 3. Close the remaining connections and the trigger; the loop ends on an empty map.
                if not (woken and _in_loop(trigger, lambda: _close_all(socket_map))):
                    # The trigger is gone: waitress closes it with a listener that failed
                    # (seen once in CI at teardown). The workers are done, so close what is
                    # left from here; the loop ends when its poll (1 s at most) finds no map.
                    _close_all(socket_map)
                self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("http_server_stop_timeout", extra={"timeout_s": timeout_s})
            else:
                _close_all(socket_map)  # no-op unless the loop died on its own
        finally:
            if self._owned_storage is not None:
                self._owned_storage.close()


_WAITRESS_ERROR_SLUGS = {400: "bad-request", 413: "body-too-large",
                         431: "header-fields-too-large", 500: "internal-error",
                         501: "not-implemented"}
# Fixed texts: waitress's own can quote the offending header line, which may be
# `Authorization: Bearer <key>`.
_WAITRESS_ERROR_DETAILS = {431: "the request headers are too large",
                           500: "unexpected server error",
                           501: "only the chunked Transfer-Encoding is supported"}
MALFORMED_REQUEST = "malformed HTTP request"


#: Chunk framing (`<size in hex>\r\n` before a chunk, `\r\n` after it) takes at most 5 bytes per
#: body byte (1-byte chunks): so a chunked body of the largest size accepted fits on the wire in
#: this many times the body limit, plus CHUNKED_SLACK_BYTES (the last chunk, extensions, a
#: trailer). Beyond that the upload is refused (413): a hard cap on the time a body takes.
CHUNKED_WIRE_FACTOR = 6
CHUNKED_SLACK_BYTES = 64 * 1024
#: The longest chunk-size line (extensions included) and trailer accepted. waitress bounds
#: neither and copies the pending text on every read; the wire cap alone would let each
#: connection hold 6x the body limit of it in memory.
MAX_CHUNK_LINE_BYTES = 4096
MAX_CHUNK_TRAILER_BYTES = 64 * 1024


class _ChunkFramingTooLarge(RequestEntityTooLarge):  # type: ignore[misc]
    """A chunked upload whose framing alone went past the wire cap."""


class _BodyLimitParser(HTTPRequestParser):  # type: ignore[misc]
    """waitress's request parser, with a chunked body's limit applied to the body it carries.

    waitress counts chunk framing against `max_request_body_size`, so a body under the limit
    sent in small chunks was refused (413). Here a chunked body is refused once its de-chunked
    bytes reach `max_request_body_size` (the app's maximum + 1: a body of exactly
    INGEST_MAX_BODY_BYTES passes, one byte more does not, whatever the chunking), so the
    buffered body (memory, then a temporary file) is bounded as before; the framing gets room
    up to CHUNKED_WIRE_FACTOR times that on the wire. Content-Length bodies are waitress's
    business as before: refused unread above the limit.
    """

    completed: bool  # (waitress's class attribute; annotated for mypy)

    def received(self, data: bytes) -> int:
        receiver = self.body_rcv
        if self.completed or receiver is None or not self.chunked:
            return int(super().received(data))
        # waitress's own body branch, with the body counted apart from its framing
        consumed = int(receiver.received(data))
        self.body_bytes_received += consumed
        limit = int(self.adj.max_request_body_size)
        if len(receiver) >= limit:
            self.error = RequestEntityTooLarge(f"exceeds max_body of {limit}")
        elif self.body_bytes_received >= limit * CHUNKED_WIRE_FACTOR + CHUNKED_SLACK_BYTES:
            self.error = _ChunkFramingTooLarge("chunk framing too large")
        elif len(receiver.control_line) > MAX_CHUNK_LINE_BYTES \
                or len(receiver.trailer) > MAX_CHUNK_TRAILER_BYTES:
            self.error = BadRequest("chunk line or trailer too long")
        elif receiver.error:
            self.error = receiver.error  # garbage in the chunked encoding
        elif receiver.completed:
            # The body is whole: the app sees a plain request with its length.
            self.headers["CONTENT_LENGTH"] = str(len(receiver))
        else:
            return consumed
        self.completed = True
        return consumed


class _ProblemErrorTask(ErrorTask):  # type: ignore[misc]
    """Answers waitress's own errors (413 by size, malformed HTTP) as problem+json too."""

    def execute(self) -> None:
        error = self.request.error
        status = int(error.code)
        if isinstance(error, _ChunkFramingTooLarge):
            detail = "the chunked body's framing is too large; send larger chunks"
        elif status == 413:
            limit = int(self.channel.adj.max_request_body_size) - 1
            detail = f"the body is larger than {limit} bytes; send smaller batches"
        else:
            detail = _WAITRESS_ERROR_DETAILS.get(status, MALFORMED_REQUEST)
        response = problem(status, _WAITRESS_ERROR_SLUGS.get(status, "http-error"), detail)
        self.status = response.status_line
        self.response_headers.extend(response.headers)
        self.set_close_on_finish()
        self.content_length = len(response.body)
        self.write(response.body)


class _ProblemChannel(HTTPChannel):  # type: ignore[misc]
    error_task_class = _ProblemErrorTask
    parser_class = _BodyLimitParser


def _in_loop(trigger: Any, thunk: Callable[[], None]) -> bool:
    """Have the I/O loop thread run `thunk`; False when the trigger is closed already."""
    if getattr(trigger, "_closed", False):
        return False
    try:
        trigger.pull_trigger(thunk)
    except OSError:  # closed between the check and the write
        return False
    return True


def _trigger_of(socket_map: Mapping[int, Any]) -> Any:
    for obj in socket_map.values():
        if isinstance(obj, BaseWSGIServer):
            return obj.trigger
    return None


def _close_all(socket_map: dict[int, Any]) -> None:
    for obj in list(socket_map.values()):
        if isinstance(obj, HTTPChannel):
            if obj.connected and obj.total_outbufs_len:
                # Answers already produced go out before the socket closes (workers are done,
                # so nothing else touches the buffers now).
                obj._flush_exception(obj._flush_some)
            # Request bodies may be spooled to temporary files: close them too.
            pending = [obj.request, *obj.requests]
            obj.requests = []
            for request in pending:
                if request is not None:
                    request.close()
            obj.handle_close()
        else:
            obj.close()
    socket_map.clear()


def build_app(config: IngestConfig) -> IngestApp:
    """Open (and migrate) the configured storage and wrap it in an IngestApp.

    Raises StorageError. The caller owns `app.storage` and must close it.
    """
    storage = open_storage(config.database_url, max_connections=config.threads)
    return IngestApp(storage, config.api_keys, config.max_body_bytes, config.max_feeds)


#: An idle connection is closed after this long (waitress checks every 30 s); a collector's
#: keep-alive connection then simply reconnects.
CHANNEL_TIMEOUT_S = 30
#: At most this many client connections at once, fewer when the open-files limit is lower.
MAX_CONNECTIONS = 1000


def _connection_limit() -> int:
    """MAX_CONNECTIONS, or what the open-files limit leaves after the database and log files."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_CONNECTIONS
    return max(100, min(MAX_CONNECTIONS, soft - 64))


def start_server(app_or_config: WSGIApplication | IngestConfig, host: str | None = None,
                 port: int | None = None, *, threads: int | None = None,
                 max_body_bytes: int | None = None) -> RunningServer:
    """Serve a WSGI app (or build one from a config) on waitress in a daemon thread.

    host/port default to the config's, or 127.0.0.1 and a free port for an app. Storage opened
    from a config is closed by `stop()`; storage behind a given app stays the caller's.
    Raises StorageError (config storage) and OSError (cannot bind).
    """
    owned: Storage | None = None
    if isinstance(app_or_config, IngestConfig):
        config = app_or_config
        ingest = build_app(config)
        owned = ingest.storage
        app: WSGIApplication = ingest
        host = config.host if host is None else host
        port = config.port if port is None else port
        threads = config.threads if threads is None else threads
        max_body_bytes = config.max_body_bytes if max_body_bytes is None else max_body_bytes
    else:
        app = app_or_config
    if max_body_bytes is None:
        max_body_bytes = int(getattr(app, "max_body_bytes", DEFAULT_MAX_BODY_BYTES))
    # Our own socket map and dispatcher, so a failed bind (the server object is never returned)
    # can still close the sockets and stop the worker threads it already made.
    socket_map: dict[int, Any] = {}
    dispatcher = ThreadedTaskDispatcher()
    dispatcher.set_thread_count(DEFAULT_THREADS if threads is None else threads)
    try:
        server = create_server(
            app,
            map=socket_map,
            _dispatcher=dispatcher,
            host="127.0.0.1" if host is None else host,
            port=0 if port is None else port,
            threads=DEFAULT_THREADS if threads is None else threads,
            # waitress refuses bodies of this size or more with 413 before reading them (by
            # Content-Length, or as chunks arrive: `_BodyLimitParser` counts a chunked body's
            # own bytes, not its framing); the app checks again for other servers.
            max_request_body_size=max_body_bytes + 1,
            ident="chrono-ingest",
            clear_untrusted_proxy_headers=True,
            asyncore_use_poll=True,  # select() fails beyond 1024 file descriptors
            # waitress's defaults (100 connections, idle ones closed after 120 s) let about a
            # hundred clients that send a byte now and then lock everyone else out; the
            # operating system's limit on open files is the real bound. Beyond loopback, put a
            # proxy that limits clients in front.
            connection_limit=_connection_limit(),
            channel_timeout=CHANNEL_TIMEOUT_S,
        )
    except BaseException:
        wasyncore.close_all(socket_map, ignore_all=True)
        dispatcher.shutdown(cancel_pending=True, timeout=STOP_TIMEOUT_S)
        if owned is not None:
            owned.close()
        raise
    for listener in list(socket_map.values()):
        if isinstance(listener, BaseWSGIServer):
            listener.channel_class = _ProblemChannel  # set before the I/O loop starts
    if hasattr(server, "effective_port"):
        bound_host, bound_port = str(server.effective_host), int(server.effective_port)
    else:  # a host name that resolved to several addresses: MultiSocketServer
        bound_host, bound_port = str(server.effective_listen[0][0]), int(
            server.effective_listen[0][1])
    # Daemon: a stuck request must never keep the process alive after main() returns.
    thread = threading.Thread(target=server.run, name="ingest-http", daemon=True)
    thread.start()
    return RunningServer(bound_host, bound_port, app, server, thread, owned)


# --- command line ---------------------------------------------------------------------------


def run_command(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> int:
    """Run a parsed `ingest` command. Exit codes: 0 clean stop, 2 configuration, 1 other."""
    env = os.environ if env is None else env
    if getattr(args, "action", "serve") == "migrate":
        return run_migrate(env)
    return serve(env)


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """`chrono-collector ingest [serve|migrate]` as a standalone entry point."""
    parser = argparse.ArgumentParser(prog=PROG, description="The reference ingest API.")
    configure_parser(parser)
    args = parser.parse_args(argv)
    return run_command(args, env)


def serve(env: Mapping[str, str], *, stop: threading.Event | None = None) -> int:
    """Load config, open storage, serve until SIGTERM/SIGINT (or `stop`), close cleanly."""
    try:
        config = IngestConfig.from_env(env)
    except ConfigError as exc:
        # (from_env redacts its keys; any key the environment holds, too, to be sure)
        print(f"{PROG}: {Redactor(keys_in_env(env))(str(exc))}", file=sys.stderr)
        return 2
    setup_logging(config.log_level, static={"service": "ingest"}, secrets=config.secrets())
    warn_about_keys(config.api_keys, "API_KEY / API_KEYS / API_KEY_FILE")
    stop = threading.Event() if stop is None else stop
    restore = _install_signal_handlers(stop)
    try:
        backoff = Backoff(base_s=STORAGE_RETRY_BASE_S, cap_s=STORAGE_RETRY_MAX_S)
        while True:
            try:
                running = start_server(config)
                break
            except StorageError as exc:
                if not exc.transient:
                    # A database this program cannot use as configured (a refused password,
                    # an unwritable path, a newer schema): one line, exit 2, as for any
                    # setting; supervisord and systemd then stop restarting it.
                    error = ConfigError("DATABASE_URL", f"{config.database_url_redacted}: {exc}",
                                        "a database this program can open and write")
                    print(f"{PROG}: {Redactor(config.secrets())(str(error))}", file=sys.stderr)
                    return 2
                # The database is down or starting (or the disk full): wait for it, as the
                # collectors wait for their disk, rather than exit into a restart loop that
                # supervisord gives up on (FATAL) within seconds. The collectors keep their
                # batches in their spools meanwhile.
                delay = max(STORAGE_RETRY_BASE_S, backoff.next_delay())
                log.warning("storage_unavailable", extra={
                    "error": str(exc), "database": config.database_url_redacted,
                    "retry_in_s": round(delay, 1)})
                if stop.wait(delay):
                    log.info("ingest_stopped", extra={"exit_code": 0})
                    return 0
            except (ValueError, OSError) as exc:
                # Where to listen is configuration: one line naming the variable, exit 2 (as
                # the collector does for METRICS_PORT), not a traceback.
                error = _listen_error(config, exc)
                print(f"{PROG}: {Redactor(config.secrets())(str(error))}", file=sys.stderr)
                return 2
        log.info("ingest_started", extra={
            "url": running.url, "database": config.database_url_redacted,
            "threads": config.threads, "max_body_bytes": config.max_body_bytes,
            "max_feeds": config.max_feeds, "api_keys": len(config.api_keys)})
        code = 0
        try:
            # A bounded wait, so the loop also notices an HTTP thread that died.
            while not stop.wait(1.0):
                if not running.alive:
                    log.error("http_server_died")
                    code = 1
                    break
        finally:
            running.stop()
        log.info("ingest_stopped", extra={"exit_code": code})
        return code
    finally:
        restore()


def _listen_error(config: IngestConfig, exc: ValueError | OSError) -> ConfigError:
    """The variable to blame for a failed listen: the port when it is taken or privileged,
    else the host (waitress raises ValueError for a host it cannot resolve or use)."""
    where = f"{config.host}:{config.port}"
    if isinstance(exc, OSError) and not isinstance(exc, socket.gaierror) and exc.errno in (
            errno.EADDRINUSE, errno.EACCES):
        return ConfigError("INGEST_PORT", f"cannot listen on {where} ({exc.strerror})",
                           "a free port (0 for any free port), >= 1024 unless privileged")
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return ConfigError("INGEST_HOST", f"cannot listen on {config.host!r} ({reason})",
                       "an address of this machine or a name resolving to one, e.g. 127.0.0.1 "
                       "or 0.0.0.0")


def run_migrate(env: Mapping[str, str]) -> int:
    """`chrono-collector ingest migrate`: apply pending migrations and exit."""
    try:
        database_url = database_url_from_env(env)
        level = log_level_from_env(env)
    except ConfigError as exc:
        print(f"{PROG} migrate: {exc}", file=sys.stderr)
        return 2
    setup_logging(level, static={"service": "ingest"}, secrets=database_secrets(database_url))
    try:
        applied = migrate(database_url)
    except StorageError as exc:
        log.error("migration_failed", extra={"error": str(exc),
                                             "database": redact_url(database_url)})
        return 1
    log.info("migrations_applied", extra={"versions": applied,
                                          "database": redact_url(database_url)})
    return 0


def _install_signal_handlers(stop: threading.Event) -> Callable[[], None]:
    """SIGTERM, SIGINT and SIGHUP set `stop` (HUP's default killed the process mid-request;
    there is nothing to reload); returns a function restoring the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # signals are delivered to the main thread only

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("stop_requested", extra={"signal": signal.Signals(signum).name})
        stop.set()

    previous = {sig: signal.signal(sig, on_signal)
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore
