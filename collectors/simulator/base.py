"""What the venue protocols share: per-connection sessions, the Venue base class, and the Hub
interface through which a venue sends, records and closes (implemented by `core.Simulator`).

A venue decides *what* to send (message shapes, acks, errors, timers); the hub decides *whether*
and *how* (silence, recording, ordering, bursts). Venues never touch sockets directly.
"""

from __future__ import annotations

import abc
import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from collectors.simulator.market import MarketSpec, MarketState, Tick
from collectors.simulator.wsserver import Connection, HandshakeRequest, Rejection

JsonObject = dict[str, object]
NEVER = math.inf


def dumps(obj: object) -> str:
    """Compact JSON, as the venues send it."""
    return json.dumps(obj, separators=(",", ":"))


@functools.lru_cache(maxsize=8)
def _second_stamp(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")


def iso_us(ns: int) -> str:
    """RFC 3339 UTC with microseconds and a Z: `2022-12-01T00:00:00.122581Z`."""
    seconds, rest = divmod(ns, 1_000_000_000)
    # strftime dominates; a burst formats thousands of times within the same second.
    return f"{_second_stamp(seconds)}.{rest // 1000:06d}Z"


def fixed(value: float, decimals: int) -> str:
    """A decimal string with exactly `decimals` places."""
    return f"{value:.{decimals}f}"


def trimmed(value: float, decimals: int) -> str:
    """A decimal string without trailing zeros (`"22150"`, `"0.5"`), as Coinbase prints prices."""
    text = f"{value:.{decimals}f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


@dataclass(frozen=True, slots=True)
class SimOptions:
    """Behaviour knobs shared by the simulator core and the venues (see `Simulator`)."""

    rate_hz: float = 1.0
    seed: int = 0
    heartbeat_interval_s: float = 1.0
    subscribe_timeout_s: float = 5.0
    ping_interval_s: float | None = None
    pong_timeout_s: float = 60.0
    shutdown_grace_s: float = 1.0
    max_messages_per_s: int = 5
    max_streams: int = 1024
    kraken_timestamp: bool = True
    burst_on_subscribe: int = 0
    max_connection_age_s: float | None = None


@dataclass(frozen=True, slots=True)
class Rendered:
    """One ticker message: the wire text, and its record for `sent_tickers()`/`record_path`."""

    text: str
    record: JsonObject
    record_text: str


class Session:
    """Protocol state of one live connection. Venues subclass it for their own fields.

    Fields a venue changes while holding `conn.send_lock` (subscriptions) are read by the hub
    under the same lock, which is what keeps acks, snapshots and tickers in order.
    """

    def __init__(self, conn: Connection, now: float) -> None:
        self.conn = conn
        self.id = conn.id
        self.opened_at = now
        self.last_sent_at = now
        self.last_serial: dict[str, int] = {}  # market symbol -> last Tick.serial sent
        self.topic_snapshot: tuple[str, ...] = ()  # topics(), published on every change
        self.bursting = False
        self.burst_on_subscribe_done = False
        self.streaming = False  # a flat-out sender (rate_hz=0) is running

    def topics(self) -> list[str]:
        """What the connection is subscribed to, as `subscriptions()` reports it."""
        return []


class Hub(Protocol):
    """What a venue may ask of the simulator."""

    def send(self, session: Session, message: JsonObject | str) -> bool:
        """Send a non-ticker message (ack, error, heartbeat, status). False if not sent."""
        ...

    def send_ticker(self, session: Session, tick: Tick, rendered: Rendered) -> bool:
        """Send and record one ticker message, skipping it if not newer than the last one."""
        ...

    def close(self, session: Session, code: int, reason: str, why: str) -> None:
        """Start a close handshake with the client."""
        ...

    def market(self, symbol: str) -> MarketState:
        ...

    def subscriptions_changed(self, session: Session) -> None:
        """Call after changing a session's ticker subscriptions, still holding its send lock."""
        ...

    def now_ns(self) -> int:
        ...


class Venue(abc.ABC):
    """One venue's protocol. Methods run on the connection's reader thread unless noted."""

    name: str = ""
    path: str = ""  # the fixed part of the URL a client connects to ("" = none)

    #: ping interval when the caller does not choose one (None: the venue sends no pings)
    default_ping_interval_s: float | None = None

    def __init__(self, hub: Hub, markets: Mapping[str, MarketSpec], options: SimOptions) -> None:
        self.hub = hub
        self.markets = markets
        self.options = options

    def accept(self, request: HandshakeRequest) -> Rejection | None:
        """Refuse requests for paths this venue does not serve."""
        if request.path != (self.path or "/"):
            return Rejection(404, b"Not Found")
        return None

    @abc.abstractmethod
    def new_session(self, conn: Connection, now: float) -> Session:
        ...

    def on_open(self, session: Session, now: float) -> None:  # noqa: B027 - optional hook
        """The connection is upgraded: send greetings, arm timers."""

    @abc.abstractmethod
    def on_text(self, session: Session, text: str, now: float) -> None:
        ...

    def on_binary(self, session: Session, data: bytes, now: float) -> None:  # noqa: B027
        """Venues speak JSON text; binary messages are ignored."""

    def on_frame(self, session: Session, now: float) -> bool:
        """Every incoming data/ping/pong frame, for rate limits. False: the session was closed."""
        return True

    def next_due(self, session: Session) -> float:
        """Scheduler thread: when the session's next timer is due (monotonic s), from its state.
        Computed, not stored, so a subscription on the reader thread can never be lost."""
        return NEVER

    def on_timer(self, session: Session, now: float) -> None:  # noqa: B027 - optional hook
        """Scheduler thread: `next_due(session)` has passed."""

    @abc.abstractmethod
    def wants(self, session: Session, symbol: str) -> bool:
        """Whether the session gets ticker updates for market `symbol`. Read under send_lock."""

    @abc.abstractmethod
    def ticker_symbols(self, session: Session) -> list[str]:
        """The known markets the session gets tickers for, in subscription order."""

    @abc.abstractmethod
    def render_tick(self, session: Session, tick: Tick, cache: dict[str, Rendered]) -> Rendered:
        """The update message for `tick` on this session. `cache` is shared by all sessions for
        one tick, so identical renderings are encoded once."""

    def server_shutdown(self, session: Session, now: float, grace_s: float) -> None:
        """Announce a server shutdown, then close after `grace_s` (Binance only)."""
        raise NotImplementedError(f"{self.name} has no server shutdown event")

    def default_rejection_body(self, status: int) -> tuple[bytes, str]:
        """Body and content type for `reject_handshake(status)` without an explicit body."""
        return f"{status}".encode(), "text/plain; charset=utf-8"
