"""The exchange simulator: venue protocols on a loopback WebSocket server, with scriptable faults
and thread-safe observability for tests and benchmarks.

Threads (all named `sim-<exchange>-...`): the WebSocket server's accept, housekeeping and
per-connection reader threads (which run the venue's request handling); one scheduler thread that
ticks markets at `rate_hz` per subscribed symbol and runs the venues' timers (heartbeats,
subscribe deadlines, shutdown closes); and one sender thread per connection during a burst or in
flat-out mode (`rate_hz=0`). Every state change notifies one Condition, so tests wait with
`wait_for` instead of sleeping.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import IO

from collectors.errors import ChronoError, ConfigError
from collectors.simulator import binance, coinbase, kraken
from collectors.simulator.base import (
    NEVER,
    Hub,
    JsonObject,
    Rendered,
    Session,
    SimOptions,
    Venue,
    dumps,
)
from collectors.simulator.market import MarketState, Tick, market_rng
from collectors.simulator.wsserver import (
    CloseCode,
    Connection,
    HandshakeRequest,
    Message,
    Opcode,
    Rejection,
    ServerOptions,
    WebSocketServer,
    encode_frame,
)

log = logging.getLogger(__name__)

VenueFactory = Callable[[Hub, SimOptions], Venue]

#: The explicit registry of simulated venues.
EXCHANGES: Mapping[str, VenueFactory] = MappingProxyType({
    "coinbase": lambda hub, options: coinbase.Coinbase(hub, coinbase.MARKETS, options),
    "binance": lambda hub, options: binance.Binance(hub, binance.BINANCE_MARKETS, options,
                                                    name="binance"),
    "binanceus": lambda hub, options: binance.Binance(hub, binance.BINANCE_US_MARKETS, options,
                                                      name="binanceus"),
    "kraken": lambda hub, options: kraken.Kraken(hub, kraken.MARKETS, options),
})

_BATCH_BYTES = 256 * 1024  # one sendall per ~256 KiB of pre-encoded frames
_STREAM_CHUNK = 512  # tickers generated per round in flat-out mode
_RECEIVED_LIMIT = 100_000


class SimulatorError(ChronoError):
    """A simulator API used in a way the venue or the simulator's state does not allow."""


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    """One data message a client sent."""

    connection_id: int
    received_at: float  # time.time()
    payload: str | bytes

    def json(self) -> object:
        """The payload parsed as JSON. Raises ValueError when it is not JSON."""
        return json.loads(self.payload)


@dataclass(frozen=True, slots=True)
class ClosedConnection:
    connection_id: int
    reason: str  # e.g. client_close, eof, drop_all, pong_timeout, rate_limited, server_stop
    close_code_received: int | None


def check_loopback(host: str) -> str:
    """The host to bind when `host` is an IPv4 loopback address (or "localhost").

    Raises ConfigError otherwise: the simulator never listens beyond this machine.
    """
    if host == "localhost":
        return "127.0.0.1"
    try:
        loopback = ipaddress.IPv4Address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigError("host", f"{host!r} is not a loopback address",
                          "127.0.0.1, another 127.x.y.z, or localhost")
    return host


class _ServerHandler:
    """Adapts the WebSocket server's callbacks to the simulator (keeps them off its API)."""

    def __init__(self, sim: Simulator) -> None:
        self._sim = sim

    def accept(self, request: HandshakeRequest) -> Rejection | None:
        return self._sim._accept(request)

    def on_open(self, conn: Connection) -> None:
        self._sim._on_open(conn)

    def on_message(self, conn: Connection, message: Message) -> None:
        self._sim._on_message(conn, message)

    def on_close(self, conn: Connection) -> None:
        self._sim._on_close(conn)


class _VenueHub:
    """The Hub a venue talks to: the simulator's sending, recording and scheduling."""

    def __init__(self, sim: Simulator) -> None:
        self._sim = sim

    def send(self, session: Session, message: JsonObject | str) -> bool:
        return self._sim._send(session, message)

    def send_ticker(self, session: Session, tick: Tick, rendered: Rendered) -> bool:
        return self._sim._send_ticker(session, tick, rendered)

    def close(self, session: Session, code: int, reason: str, why: str) -> None:
        session.conn.close(code, reason, why=why)

    def market(self, symbol: str) -> MarketState:
        return self._sim._markets[symbol]

    def subscriptions_changed(self, session: Session) -> None:
        self._sim._subscriptions_changed(session)

    def now_ns(self) -> int:
        return time.time_ns()


class Simulator:
    """An exchange simulator on 127.0.0.1 speaking one venue's real WebSocket protocol.

    `rate_hz` is tickers per second per subscribed symbol ("realistic" mode; 0 = flat out: every
    subscribed connection gets tickers as fast as its socket takes them). `seed` fixes the price
    paths. `record_path` appends every ticker written to a socket as one JSON line.
    `keep_sent` bounds the in-memory list behind `sent_tickers()` (None = keep all).
    `ping_interval_s`: None = the venue's default (Binance 20 s, others none), 0 = no pings.
    `burst_on_subscribe`: each connection's first ticker subscription triggers `burst(n)` for it.

    Raises ConfigError for an unknown exchange, a non-loopback host or a negative rate.
    """

    def __init__(self, exchange: str, *, host: str = "127.0.0.1", port: int = 0,
                 rate_hz: float = 1.0, seed: int = 0, record_path: str | Path | None = None,
                 keep_sent: int | None = None, heartbeat_interval_s: float = 1.0,
                 subscribe_timeout_s: float = 5.0, ping_interval_s: float | None = None,
                 pong_timeout_s: float = 60.0, shutdown_grace_s: float = 1.0,
                 max_messages_per_s: int = 5, max_streams: int = 1024,
                 kraken_timestamp: bool = True, burst_on_subscribe: int = 0,
                 max_connection_age_s: float | None = None, quiet: Iterable[str] = (),
                 max_frame_bytes: int = 1 << 20, send_timeout_s: float = 5.0,
                 close_timeout_s: float = 2.0) -> None:
        if exchange not in EXCHANGES:
            raise ConfigError("exchange", f"unknown exchange {exchange!r}",
                              ", ".join(sorted(EXCHANGES)))
        if rate_hz < 0:
            raise ConfigError("rate_hz", f"{rate_hz} is negative", "0 (flat out) or more")
        if burst_on_subscribe < 0:
            raise ConfigError("burst_on_subscribe", f"{burst_on_subscribe} is negative")
        self.exchange = exchange
        self.host = check_loopback(host)
        self._port = port
        self.options = SimOptions(
            rate_hz=rate_hz, seed=seed, heartbeat_interval_s=heartbeat_interval_s,
            subscribe_timeout_s=subscribe_timeout_s, ping_interval_s=ping_interval_s,
            pong_timeout_s=pong_timeout_s, shutdown_grace_s=shutdown_grace_s,
            max_messages_per_s=max_messages_per_s, max_streams=max_streams,
            kraken_timestamp=kraken_timestamp, burst_on_subscribe=burst_on_subscribe,
            max_connection_age_s=max_connection_age_s)
        self.venue: Venue = EXCHANGES[exchange](_VenueHub(self), self.options)
        interval = ping_interval_s if ping_interval_s is not None else (
            self.venue.default_ping_interval_s)
        self._server_options = ServerOptions(
            max_frame_bytes=max_frame_bytes, max_message_bytes=max_frame_bytes,
            send_timeout_s=send_timeout_s, close_timeout_s=close_timeout_s,
            ping_interval_s=interval or None, pong_timeout_s=pong_timeout_s)
        self._record_path = Path(record_path) if record_path is not None else None
        now_ns = time.time_ns()
        self._markets = {symbol: MarketState(spec, market_rng(seed, exchange, symbol), now_ns)
                         for symbol, spec in self.venue.markets.items()}
        self._quiet = {str(symbol) for symbol in quiet}
        # One re-entrant lock behind one Condition: every observable change notifies it, and
        # wait_for predicates may call the snapshot methods, which take the same lock.
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._sessions: dict[int, Session] = {}
        self._sent: deque[tuple[int, JsonObject]] = deque(maxlen=keep_sent)
        self._sent_count = 0
        self._received: deque[ReceivedMessage] = deque(maxlen=_RECEIVED_LIMIT)
        self._closed: list[ClosedConnection] = []
        self._reject: tuple[int, int | None, bytes, str] | None = None
        self._record_file: IO[str] | None = None
        self._senders: set[threading.Thread] = set()
        self._next_tick: dict[str, float] = {}
        self._silent = False
        self._unsilenced = threading.Event()
        self._unsilenced.set()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._server: WebSocketServer | None = None
        self._scheduler: threading.Thread | None = None
        self._started = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Simulator:
        """Bind and serve. Raises OSError when the port cannot be bound."""
        if self._started:
            raise SimulatorError("simulator already started")
        self._started = True
        if self._record_path is not None:
            self._record_file = self._record_path.open("a", encoding="utf-8")
        server = WebSocketServer(_ServerHandler(self), host=self.host, port=self._port,
                                 options=self._server_options, name=f"sim-{self.exchange}")
        try:
            server.start()
        except OSError:
            if self._record_file is not None:
                self._record_file.close()
            raise
        self._server = server
        self._scheduler = threading.Thread(target=self._run_scheduler, daemon=True,
                                           name=f"sim-{self.exchange}-scheduler")
        self._scheduler.start()
        log.info("sim_started", extra={"exchange": self.exchange, "url": self.url})
        return self

    def stop(self) -> None:
        """Close every connection (1001), join every thread, close the record file."""
        if not self._started or self._stop.is_set():
            return
        self._stop.set()
        self._wake.set()
        self._unsilenced.set()
        with self._cond:
            self._cond.notify_all()
        if self._scheduler is not None:
            self._scheduler.join(timeout=5.0)
        if self._server is not None:
            self._server.stop()
        with self._lock:
            senders = list(self._senders)
        for thread in senders:
            thread.join(timeout=5.0)
        with self._lock:
            if self._record_file is not None:
                self._record_file.close()
                self._record_file = None
        log.info("sim_stopped", extra={"exchange": self.exchange})

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def ping_interval_s(self) -> float | None:
        """Server ping period actually used (None: no pings)."""
        return self._server_options.ping_interval_s

    @property
    def pong_timeout_s(self) -> float:
        return self._server_options.pong_timeout_s

    @property
    def port(self) -> int:
        if self._server is None:
            raise SimulatorError("simulator not started")
        return self._server.port

    @property
    def url(self) -> str:
        """`ws://127.0.0.1:PORT` plus the venue's fixed path (`/v2` for Kraken). For Binance
        this is the base to which a client appends `/stream?streams=...` or `/ws/<stream>`."""
        return f"ws://{self.host}:{self.port}{self.venue.path}"

    # ------------------------------------------------------------------ observability

    def sent_tickers(self, connection_id: int | None = None) -> list[JsonObject]:
        """Every ticker message written to a socket, in order, as parsed dicts (Binance:
        `{"stream": ..., "data": {...}}` whether the connection is raw or combined). The dicts
        are shared: treat them as read-only."""
        with self._lock:
            return [record for conn_id, record in self._sent
                    if connection_id is None or conn_id == connection_id]

    @property
    def sent_count(self) -> int:
        """Tickers written so far (counts even when `keep_sent` drops old records)."""
        with self._lock:
            return self._sent_count

    def received_messages(self) -> list[ReceivedMessage]:
        """Data messages clients sent, in arrival order (the last 100 000)."""
        with self._lock:
            return list(self._received)

    def subscriptions(self) -> dict[int, list[str]]:
        """Live connection id -> its subscriptions: Coinbase `ticker:BTC-USD` and
        `heartbeat:BTC-USD`, Binance stream names, Kraken `ticker:BTC/USD`."""
        with self._lock:
            # The published snapshot, not the live containers: no send lock is taken here, so
            # this is safe inside a wait_for predicate.
            return {s.id: list(s.topic_snapshot) for s in self._sessions.values()}

    def connection_ids(self) -> list[int]:
        with self._lock:
            return list(self._sessions)

    @property
    def active_connections(self) -> int:
        with self._lock:
            return len(self._sessions)

    @property
    def connections_total(self) -> int:
        """WebSocket connections accepted (upgraded) since start."""
        return self._server.connections_total if self._server is not None else 0

    @property
    def handshakes_rejected(self) -> int:
        return self._server.handshakes_rejected if self._server is not None else 0

    def closed_connections(self) -> list[ClosedConnection]:
        with self._lock:
            return list(self._closed)

    @property
    def bursts_active(self) -> int:
        """Connections with a burst (or flat-out stream) in progress."""
        with self._lock:
            return sum(1 for s in self._sessions.values() if s.bursting or s.streaming)

    def wait_for(self, condition: Callable[[], bool] | int, timeout_s: float = 5.0) -> bool:
        """Block until `condition()` is true (or, for an int, until that many tickers were
        sent). Re-checked on every simulator state change. Returns False on timeout."""
        if isinstance(condition, int):
            target = condition

            def predicate() -> bool:
                return self._sent_count >= target
        else:
            predicate = condition
        with self._cond:
            return self._cond.wait_for(predicate, timeout_s)

    # ------------------------------------------------------------------ faults and modes

    def drop_all(self) -> int:
        """Drop every TCP connection at once, without a close frame. Returns how many."""
        sessions = self._live_sessions()
        for session in sessions:
            session.conn.abort("drop_all")
        return len(sessions)

    def close_all(self, code: int = CloseCode.NORMAL, reason: str = "") -> int:
        """Start a clean close handshake on every connection. Returns how many."""
        sessions = self._live_sessions()
        for session in sessions:
            session.conn.close(code, reason, why="close_all")
        return len(sessions)

    def go_silent(self, silent: bool = True) -> None:
        """Silent: sockets stay open but nothing is sent at all (no data, acks, heartbeats,
        pings or pongs; a client close is answered by dropping TCP). False resumes.

        When this returns, no send that started before it is still in progress."""
        with self._cond:
            self._silent = silent
            now = time.monotonic()
            if not silent:
                for session in self._sessions.values():
                    session.last_sent_at = now
            sessions = list(self._sessions.values())
            self._cond.notify_all()
        if self._server is not None:
            self._server.set_muted(silent)
        if silent:
            self._unsilenced.clear()
            # Barrier: senders check the flag under the send lock, so once each lock has been
            # free for a moment nothing more goes out. Bounded: a send blocked on a client that
            # does not read is not waited for.
            for session in sessions:
                if session.conn.send_lock.acquire(timeout=1.0):
                    session.conn.send_lock.release()
        else:
            self._unsilenced.set()
        self._wake.set()

    @property
    def silent(self) -> bool:
        return self._silent

    def send_raw(self, data: str | bytes, *, frame: bool = True) -> int:
        """Send `data` to every connection, even when silent: a str as one TEXT frame, bytes as
        one BINARY frame, or with `frame=False` bytes written to the socket as they are (for
        malformed frames). Returns how many connections it was written to."""
        sent = 0
        for session in self._live_sessions():
            conn = session.conn
            if isinstance(data, str):
                ok = conn.send_text(data)
            elif frame:
                ok = conn.send_binary(data)
            else:
                ok = conn.send_encoded(data, 0)
            sent += ok
        return sent

    def server_shutdown(self, grace_s: float | None = None) -> int:
        """Binance: send the `serverShutdown` event to every connection, then close each with
        1001 after `grace_s` (default `shutdown_grace_s`). Raises SimulatorError elsewhere."""
        if not isinstance(self.venue, binance.Binance):
            raise SimulatorError(f"{self.exchange} has no serverShutdown event")
        grace = self.options.shutdown_grace_s if grace_s is None else grace_s
        sessions = self._live_sessions()
        now = time.monotonic()
        for session in sessions:
            self.venue.server_shutdown(session, now, grace)
        self._wake.set()
        return len(sessions)

    def reject_handshake(self, status: int | None, *, count: int | None = None,
                         body: bytes | str | None = None,
                         content_type: str | None = None) -> None:
        """Answer the next `count` handshakes (None: all, until cleared) with HTTP `status`
        instead of upgrading; None clears. Binance's 451 body is the real one by default."""
        if status is None:
            with self._lock:
                self._reject = None
            return
        if body is None:
            raw, default_type = self.venue.default_rejection_body(status)
        else:
            raw = body.encode("utf-8") if isinstance(body, str) else body
            default_type = "text/plain; charset=utf-8"
        with self._lock:
            self._reject = (status, count, raw, content_type or default_type)

    def set_quiet(self, symbol: str, quiet: bool = True) -> None:
        """A quiet market stops ticking (heartbeats go on), like a market without trades."""
        with self._lock:
            if quiet:
                self._quiet.add(symbol)
            else:
                self._quiet.discard(symbol)
        self._wake.set()

    def burst(self, count: int) -> int:
        """Send `count` pre-encoded tickers (round-robin over its symbols) to every subscribed
        connection as fast as its socket takes them, on one thread per connection. Returns how
        many bursts started; `wait_for(lambda: sim.bursts_active == 0)` waits for the end."""
        if count <= 0:
            return 0
        started = 0
        for session in self._live_sessions():
            with session.conn.send_lock:
                # Set under the send lock so no scheduler ticker can slip in after the burst's
                # tickers were generated (it would make them look old).
                if session.bursting or session.streaming or not self.venue.ticker_symbols(
                        session):
                    continue
                session.bursting = True
            self._start_sender(session, count)
            started += 1
        return started

    # ------------------------------------------------------------------ Hub (for venues)

    def _send(self, session: Session, message: JsonObject | str) -> bool:
        text = message if isinstance(message, str) else dumps(message)
        with session.conn.send_lock:
            if self._silent:  # checked under the lock: see go_silent's barrier
                return False
            ok = session.conn.send_text(text)
            if ok:
                session.last_sent_at = time.monotonic()
        return ok

    def _send_ticker(self, session: Session, tick: Tick, rendered: Rendered) -> bool:
        with session.conn.send_lock:
            if self._silent:
                return False
            if tick.serial <= session.last_serial.get(tick.symbol, 0):
                return False  # never older than what this connection already got
            if not session.conn.send_text(rendered.text):
                return False
            session.last_serial[tick.symbol] = tick.serial
            session.last_sent_at = time.monotonic()
            self._record(session.id, (rendered,))
        return True

    def _subscriptions_changed(self, session: Session) -> None:
        opts = self.options
        session.topic_snapshot = tuple(session.topics())
        if opts.rate_hz == 0 and not session.streaming and not session.bursting:
            if self.venue.ticker_symbols(session):
                session.streaming = True
                self._start_sender(session, None)
        elif (opts.burst_on_subscribe and not session.burst_on_subscribe_done
              and not session.bursting and self.venue.ticker_symbols(session)):
            session.burst_on_subscribe_done = True
            session.bursting = True
            self._start_sender(session, opts.burst_on_subscribe)
        with self._cond:
            self._cond.notify_all()
        self._wake.set()

    # ------------------------------------------------------------------ server callbacks

    def _accept(self, request: HandshakeRequest) -> Rejection | None:
        with self._lock:
            if self._reject is not None:
                status, count, body, content_type = self._reject
                if count is not None:
                    self._reject = (status, count - 1, body, content_type) if count > 1 else None
                return Rejection(status, body, content_type)
        return self.venue.accept(request)

    def _on_open(self, conn: Connection) -> None:
        now = time.monotonic()
        session = self.venue.new_session(conn, now)
        with self._cond:
            self._sessions[conn.id] = session
            self._cond.notify_all()
        log.info("sim_connection_opened", extra={"exchange": self.exchange, "conn_id": conn.id,
                                                 "target": conn.request.target})
        with conn.send_lock:
            session.topic_snapshot = tuple(session.topics())  # URL subscriptions (Binance)
        self.venue.on_open(session, now)  # its greetings are dropped while silent
        self._wake.set()

    def _on_message(self, conn: Connection, message: Message) -> None:
        with self._lock:
            session = self._sessions.get(conn.id)
        if session is None:
            return
        now = time.monotonic()
        if message.opcode in (Opcode.TEXT, Opcode.BINARY):
            payload: str | bytes = (message.text if message.text is not None
                                    else message.payload)
            with self._cond:
                self._received.append(ReceivedMessage(conn.id, time.time(), payload))
                self._cond.notify_all()
        if not self.venue.on_frame(session, now):
            return
        if self._silent:
            return  # a frozen server reads but answers nothing
        if message.text is not None:
            self.venue.on_text(session, message.text, now)
        elif message.opcode == Opcode.BINARY:
            self.venue.on_binary(session, message.payload, now)

    def _on_close(self, conn: Connection) -> None:
        reason = conn.close_reason or "closed"
        with self._cond:
            self._sessions.pop(conn.id, None)
            self._closed.append(ClosedConnection(conn.id, reason, conn.close_code_received))
            self._cond.notify_all()
        log.info("sim_connection_closed", extra={"exchange": self.exchange, "conn_id": conn.id,
                                                 "reason": reason})
        self._wake.set()

    # ------------------------------------------------------------------ internals

    def _live_sessions(self) -> list[Session]:
        with self._lock:
            return [s for s in self._sessions.values() if s.conn.open]

    def _record(self, conn_id: int, rendered: Iterable[Rendered]) -> None:
        with self._cond:
            lines = []
            for item in rendered:
                self._sent.append((conn_id, item.record))
                self._sent_count += 1
                lines.append(item.record_text)
            if self._record_file is not None and lines:
                self._record_file.write("\n".join(lines) + "\n")
                self._record_file.flush()
            self._cond.notify_all()

    def _run_scheduler(self) -> None:
        try:
            while not self._stop.is_set():
                self._wake.clear()
                next_due = self._schedule_once(time.monotonic())
                # A timer wait, woken early by any state change: not synchronisation by sleep.
                self._wake.wait(max(0.0005, next_due - time.monotonic()))
        except Exception:
            log.exception("sim_scheduler_crashed", extra={"exchange": self.exchange})

    def _schedule_once(self, now: float) -> float:
        next_due = now + 1.0
        if self._silent:
            return next_due
        with self._lock:
            sessions = list(self._sessions.values())
            quiet = set(self._quiet)
        rate = self.options.rate_hz
        if rate > 0:
            interval = 1.0 / rate
            active: set[str] = set()
            for session in sessions:
                if not (session.bursting or session.streaming):
                    with session.conn.send_lock:
                        active.update(self.venue.ticker_symbols(session))
            active -= quiet
            for symbol in list(self._next_tick):
                if symbol not in active:
                    del self._next_tick[symbol]
            for symbol in active:
                self._next_tick.setdefault(symbol, now + interval)
            for symbol, due in list(self._next_tick.items()):
                if due <= now:
                    self._broadcast(self._markets[symbol].tick(time.time_ns()), sessions)
                    # Keep the cadence; after a stall (silence) restart it instead of catching up.
                    following = due + interval
                    self._next_tick[symbol] = following if following > now else now + interval
            next_due = min(next_due, *self._next_tick.values()) if self._next_tick else next_due
        max_age = self.options.max_connection_age_s
        for session in sessions:
            if not session.conn.open:
                continue
            if max_age is not None:
                if now - session.opened_at >= max_age:
                    session.conn.close(CloseCode.NORMAL, "connection age limit",
                                       why="max_connection_age")
                    continue
                next_due = min(next_due, session.opened_at + max_age)
            due = self.venue.next_due(session)
            if due <= now:
                self.venue.on_timer(session, now)
                due = self.venue.next_due(session)
            if due != NEVER:
                next_due = min(next_due, due)
        return next_due

    def _broadcast(self, tick: Tick, sessions: list[Session]) -> None:
        cache: dict[str, Rendered] = {}
        for session in sessions:
            with session.conn.send_lock:
                if (session.bursting or session.streaming
                        or not self.venue.wants(session, tick.symbol)):
                    continue
                self._send_ticker(session, tick, self.venue.render_tick(session, tick, cache))

    # -- bursts and flat-out streaming

    def _start_sender(self, session: Session, count: int | None) -> None:
        thread = threading.Thread(target=self._run_sender, args=(session, count), daemon=True,
                                  name=f"sim-{self.exchange}-burst-{session.id}")
        with self._lock:
            self._senders.add(thread)
        thread.start()

    def _run_sender(self, session: Session, count: int | None) -> None:
        try:
            if count is not None:
                batches = self._prepare(session, count)  # all encoded before the first byte
                for batch in batches:
                    if not self._send_batch(session, batch):
                        break
            else:
                while not self._stop.is_set() and session.conn.open:
                    batches = self._prepare(session, _STREAM_CHUNK)
                    if not batches:
                        with self._cond:  # nothing subscribed: wait for a change
                            self._cond.wait(0.5)
                        continue
                    for batch in batches:
                        if not self._send_batch(session, batch):
                            break
        except Exception:
            log.exception("sim_sender_crashed", extra={"exchange": self.exchange,
                                                       "conn_id": session.id})
        finally:
            with self._cond:
                session.bursting = False
                session.streaming = False
                self._senders.discard(threading.current_thread())
                self._cond.notify_all()
            self._wake.set()

    def _prepare(self, session: Session,
                 count: int) -> list[tuple[bytes, list[tuple[Tick, Rendered]]]]:
        """`count` tickers for the session, round-robin over its symbols, pre-encoded and cut
        into ~256 KiB batches."""
        with session.conn.send_lock:
            symbols = self.venue.ticker_symbols(session)
        with self._lock:
            symbols = [s for s in symbols if s not in self._quiet]
        if not symbols:
            return []
        now_ns = time.time_ns()
        per_symbol = {s: iter(self._markets[s].ticks(count // len(symbols)
                                                     + (i < count % len(symbols)), now_ns))
                      for i, s in enumerate(symbols)}
        batches: list[tuple[bytes, list[tuple[Tick, Rendered]]]] = []
        frames: list[bytes] = []
        items: list[tuple[Tick, Rendered]] = []
        size = 0
        for i in range(count):
            tick = next(per_symbol[symbols[i % len(symbols)]])
            rendered = self.venue.render_tick(session, tick, {})
            frame = encode_frame(Opcode.TEXT, rendered.text.encode("utf-8"))
            frames.append(frame)
            items.append((tick, rendered))
            size += len(frame)
            if size >= _BATCH_BYTES:
                batches.append((b"".join(frames), items))
                frames, items, size = [], [], 0
        if frames:
            batches.append((b"".join(frames), items))
        return batches

    def _send_batch(self, session: Session,
                    batch: tuple[bytes, list[tuple[Tick, Rendered]]]) -> bool:
        """Write one pre-encoded batch (waiting out a silence). False: stop sending."""
        data, items = batch
        conn = session.conn
        while True:
            while self._silent and not self._stop.is_set():
                self._unsilenced.wait(1.0)
            if self._stop.is_set():
                return False
            with conn.send_lock:
                if self._silent:
                    continue  # went silent while waiting for the lock: wait it out unlocked
                fresh = [(tick, rendered) for tick, rendered in items
                         if tick.serial > session.last_serial.get(tick.symbol, 0)]
                if not fresh:
                    return True
                if len(fresh) != len(items):  # something newer went out meanwhile
                    data = b"".join(encode_frame(Opcode.TEXT, r.text.encode("utf-8"))
                                    for _, r in fresh)
                if not conn.send_encoded(data, len(fresh)):
                    return False
                for tick, _ in fresh:
                    session.last_serial[tick.symbol] = tick.serial
                session.last_sent_at = time.monotonic()
                self._record(session.id, (rendered for _, rendered in fresh))
                return True
