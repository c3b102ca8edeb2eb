"""The WebSocket loop for one venue, on websocket-client: connect, subscribe, receive, hand off.

This thread does no parsing, no HTTP and no disk I/O (venues cut slow readers, e.g. Coinbase's
`ErrSlowConsume`): it receives frames and hands them to the parser thread with their receive
time. Liveness is its job: any frame (data, heartbeat, ping, pong) proves the connection alive;
none for `adapter.liveness_timeout_s` replaces the connection. Reconnects use capped
exponential backoff with full jitter, reset only after the first valid data message of the
current connection (the parser reports it through `data_seen`); only a planned handover of a
connection that delivered data skips it, and a handshake refused with `Retry-After` waits that
long too. Every connect re-sends every subscription.

The loop turns at least once per frame and once per `recv_timeout_s` however the bytes arrive
(a frame trickled byte by byte, a message fragmented without end: see `_BoundedFrameBuffer`
and `_recv_step`), and opening a connection is bounded as a whole (`_Handshake`), so liveness,
pings, requests, `stop` and the watchdog `beat` are never starved. A frame that breaks RFC 6455
closes the connection with 1002 and reconnects.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import websocket
from websocket import ABNF
from websocket._abnf import continuous_frame, frame_buffer
from websocket._http import _ssl_socket
from websocket._socket import DEFAULT_SOCKET_OPTION
from websocket._url import get_proxy_info, parse_url

from collectors.backoff import Backoff, parse_retry_after
from collectors.batching import Handoff
from collectors.exchanges.base import Adapter
from collectors.logsetup import LogSampler
from collectors.metrics import Metrics, ReconnectReason

log = logging.getLogger(__name__)

Frame = tuple[bytes, int]  # (payload, received epoch ns)


class RetiredFrame(tuple[bytes, int]):
    """A frame read from a connection being handed over (make-before-break): its successor's
    frames share the queue, and what the old one asks for (a repeated `serverShutdown`) must
    not replace the new one (see `request_reconnect`)."""

    __slots__ = ()

#: A ticker frame is well under 2 KiB; 4 MiB leaves room for venue snapshots while bounding
#: memory (websocket-client itself has no maximum frame size).
DEFAULT_MAX_FRAME_BYTES = 4 * 1024 * 1024

#: Planned replacements (the venue asked, or the connection nears the venue's age limit) of a
#: connection that delivered data are made before it is broken: the old one is read until the
#: new one has delivered for HANDOVER_OVERLAP_S, at most HANDOVER_MAX_S. Adapters drop the
#: overlap. One that delivered nothing is closed, and replaced after the backoff.
PLANNED_REASONS: frozenset[ReconnectReason] = frozenset({"server_shutdown", "max_age"})
HANDOVER_OVERLAP_S = 2.0
HANDOVER_MAX_S = 30.0
#: A connection is healthy once it has delivered data and lived this long: only then is the
#: backoff reset and a planned replacement made at once. A node that sends a ticker and then
#: asks every connection to go (or closes it) would otherwise be reconnected to about twice a
#: second, for good (Binance allows 300 connections per 5 minutes per IP, then bans it).
HEALTHY_AFTER_S = 10.0
#: Each address of a venue's name gets at least this much of the connect timeout (`_tcp_connect`).
CONNECT_SHARE_MIN_S = 2.0
#: A handshake refused with a `Retry-After` (Binance's 429 "too many requests" and 418 "IP
#: banned" carry one) is not tried again before it has passed, but never waits longer than
#: this: Binance's bans run from 2 minutes to 3 days, and one refused attempt an hour costs
#: little, while a bogus value (a year, a date far ahead) must not stop collection for good.
RETRY_AFTER_MAX_S = 3600.0
#: What a 429 means when the venue has no better explanation of its own.
RATE_LIMITED_HINT = ("the venue rate-limited this IP; backing off (at least as long as "
                     "Retry-After says, when it says)")
#: Socket reads ask for this much at once (frames are cut from the buffer).
READ_CHUNK_BYTES = 65536
#: At most this many buffered frames are handed off per loop turn (liveness, pings and
#: requests from other threads are looked at between turns).
FRAMES_PER_TURN = 1000
#: When the frame queue is full, wait this long for the parser to make room before dropping
#: frames: meanwhile the socket is not read, so TCP slows the venue down (a burst is absorbed),
#: while a parser stuck for longer (e.g. the disk is full) costs frames, not the connection:
#: the wait is made once per stall, and until the parser takes frames again the ones that do
#: not fit are dropped at once (`Handoff.put_many_within`), so pings are answered meanwhile.
FRAME_QUEUE_WAIT_S = 1.0
#: A fragmented message may have at most this many fragments (venues send a message in one
#: frame; each fragment costs a frame's overhead, so a flood of tiny ones is refused).
MAX_FRAGMENTS_PER_MESSAGE = 1024


class FrameTooLarge(websocket.WebSocketException):
    """A frame (or a fragmented message) above the size or fragment limit; it was read and
    discarded, the stream is in sync."""


class SubscribeSent(NamedTuple):
    """A subscribe request sent: `frame`, the frame queue's `put_total` then (the venue's
    answer is in a frame at or after it); `at`, monotonic time."""

    frame: int
    at: float


class _BoundedFrameBuffer(frame_buffer):
    """websocket-client's frame reader with a payload size limit, buffered socket reads, a time
    budget per call and the RFC 6455 header checks the library leaves out.

    The library reads each frame with three exact-size `recv` calls (header, length, payload);
    here the socket is read in large chunks into one buffer that the frames are cut from, so a
    burst of small frames costs one system call per chunk instead of three per frame.

    An oversized payload is drained from the socket and discarded, so memory stays bounded and
    the connection stays usable; when it is a fragment of a message, the message's other
    fragments are drained too (`skip_fragments`, which `_BoundedContinuation` also sets when a
    message outgrows the limit fragment by fragment), so the frames after it read as usual. Like
    the library's own reader, both survive a socket timeout in the middle of a frame: the state
    lives in the object and the next call resumes.

    The socket timeout fires only when nothing at all arrives, so a frame trickled a byte at a
    time would keep a call busy for good: with `budget_s` set, a call that has read for longer
    raises `WebSocketTimeoutException` as a quiet socket would (the state is kept and the next
    call resumes), so the receive loop turns; a frame that never completes is then silence to
    the loop's liveness check.

    A header that breaks RFC 6455 (section 5.2: a 64-bit length with its top bit set, a masked
    frame from a server, reserved bits or opcodes, a control frame above 125 bytes or without
    FIN) raises `WebSocketProtocolException` before any payload is read: the stream cannot be
    trusted after it, and the caller closes the connection (1002).
    """

    def __init__(self, recv_fn: Callable[[int], bytes], max_bytes: int,
                 budget_s: float | None = None) -> None:
        super().__init__(recv_fn, True)  # skip_utf8_validation: json decoding validates anyway
        self.max_bytes = max_bytes
        self.budget_s = budget_s
        self._deadline: float | None = None  # monotonic end of the current call's budget
        self._discard = 0
        self._discarding_length = 0  # > 0: the oversized frame being drained (0: a skipped one)
        self._buf = bytearray()
        self._pos = 0  # start of the unread bytes in _buf
        # Drain continuation frames up to the one with FIN: the rest of a message refused
        # (`skip_rest`), since `skipping_since` (monotonic; None when not skipping).
        self.skip_fragments = False
        self.skipping_since: float | None = None
        self._skip_to_fin = False  # the frame being drained is the last of that message

    def recv_frame(self) -> Any:
        with self.lock:
            budget = self.budget_s
            self._deadline = None if budget is None else time.monotonic() + budget
            while True:
                if self._discard or self._skip_to_fin:
                    self._drain()  # raises FrameTooLarge after an oversized frame
                if self.needs_header():
                    self.recv_header()
                if self.needs_length():
                    self.recv_length()
                    self._check_header()
                assert self.header is not None and self.length is not None
                fin, opcode = self.header[0], self.header[4]
                skipped = self.skip_fragments and opcode == ABNF.OPCODE_CONT
                if not skipped and self.length <= self.max_bytes:
                    break
                if self.needs_mask():
                    self.recv_mask()
                self._discard = self.length
                if skipped:  # the rest of a refused message: drained without a word
                    self._skip_to_fin = bool(fin)
                else:
                    self._discarding_length = self.length
                    # A fragment of a message (its first, or a middle one): the whole message
                    # goes, and the library's assembly of it is reset.
                    if opcode == ABNF.OPCODE_CONT or not fin:
                        self.skip_rest(not fin)
                        self._skip_to_fin = False
                        self.on_message_refused()
                self.clear()
                # Fragments of a refused message that never end (each small, so no read of
                # one takes long) would otherwise keep this call for good: the loop turns,
                # and its liveness check sees them as the silence they are (none reaches it).
                if skipped and self._out_of_time():
                    raise websocket.WebSocketTimeoutException(
                        "fragments of a refused message still arriving")
        return super().recv_frame()

    def _check_header(self) -> None:
        """RFC 6455 5.2 and 5.5 on a header just read (before its payload)."""
        assert self.header is not None and self.length is not None
        fin, rsv1, rsv2, rsv3, opcode, has_mask, _ = self.header
        problem = None
        if self.length >> 63:
            problem = "64-bit payload length with the most significant bit set"
        elif has_mask:
            problem = "masked frame from the server"
        elif rsv1 or rsv2 or rsv3:
            problem = "reserved bits set (no extension was negotiated)"
        elif opcode not in ABNF.OPCODES:
            problem = f"reserved opcode {opcode:#x}"
        elif opcode >= 0x8 and not fin:
            problem = f"fragmented control frame (opcode {opcode:#x})"
        elif opcode >= 0x8 and self.length > 125:
            problem = f"control frame (opcode {opcode:#x}) of {self.length} bytes"
        if problem is not None:
            self.clear()
            raise websocket.WebSocketProtocolException(problem)

    def _out_of_time(self) -> bool:
        deadline = self._deadline
        return deadline is not None and time.monotonic() >= deadline

    def on_message_refused(self) -> None:
        """Set by `_BoundedContinuation`: forget the message being assembled."""

    def skip_rest(self, skip: bool) -> None:
        """Drain (True) or stop draining (False) the continuation frames of a refused
        message."""
        self.skip_fragments = skip
        self.skipping_since = time.monotonic() if skip else None

    def pop_data_frames(self, limit: int) -> list[bytes]:
        """Payloads of the complete data frames already in the buffer, cut without a socket
        read: the fast path through a burst, where one read holds a hundred frames.

        Takes only the plain case (FIN set, RSV clear, text or binary, unmasked, within the size
        limit, wholly buffered) and stops at the first frame that is anything else, leaving it
        to `recv_frame` and websocket-client (control frames, fragments, a frame cut by the read
        boundary, oversized or malformed ones). The caller must not use it while a fragmented
        message is being assembled."""
        out: list[bytes] = []
        with self.lock:
            if self.header is not None or self._discard:
                return out  # a frame is half read: the general reader owns the state
            buf, pos, end = self._buf, self._pos, len(self._buf)
            max_bytes = self.max_bytes
            while len(out) < limit and end - pos >= 2:
                b0, length = buf[pos], buf[pos + 1]
                if b0 not in (0x81, 0x82) or length & 0x80:
                    break
                start = pos + 2
                if length == 126:
                    if end - pos < 4:
                        break
                    length, start = (buf[pos + 2] << 8) | buf[pos + 3], pos + 4
                elif length == 127:
                    if end - pos < 10:
                        break
                    length, start = int.from_bytes(buf[pos + 2:pos + 10], "big"), pos + 10
                if length > max_bytes or end - start < length:
                    break
                pos = start + length
                out.append(bytes(buf[start:pos]))
            if pos == end:
                buf.clear()
                pos = 0
            self._pos = pos
        return out

    def recv_strict(self, bufsize: int) -> bytes:
        buf, pos = self._buf, self._pos
        while len(buf) - pos < bufsize:
            chunk = self.recv(max(READ_CHUNK_BYTES, bufsize - (len(buf) - pos)))
            if not chunk:
                raise websocket.WebSocketConnectionClosedException("connection closed")
            if pos:  # compact only when more data is needed: once per chunk, not per frame
                del buf[:pos]
                pos = self._pos = 0
            buf += chunk
            # Bytes keep trickling in: let the loop turn (at least one read per call), resume
            # on the next call.
            if len(buf) - pos < bufsize and self._out_of_time():
                raise websocket.WebSocketTimeoutException("frame not complete within budget")
        end = pos + bufsize
        out = bytes(buf[pos:end])
        if end == len(buf):
            buf.clear()
            end = 0
        self._pos = end
        return out

    def _drain(self) -> None:
        while self._discard > 0:
            held = len(self._buf) - self._pos
            if held:
                used = min(held, self._discard)
                self._pos += used
                self._discard -= used
                if self._pos == len(self._buf):
                    self._buf.clear()
                    self._pos = 0
                continue
            chunk = self.recv(min(READ_CHUNK_BYTES, self._discard))
            if not chunk:
                raise websocket.WebSocketConnectionClosedException("closed while discarding")
            self._discard -= len(chunk)
            if self._discard > 0 and self._out_of_time():
                raise websocket.WebSocketTimeoutException("frame not drained within budget")
        if self._skip_to_fin:
            self._skip_to_fin = False
            self.skip_rest(False)
        size = self._discarding_length
        if size:
            self._discarding_length = 0
            raise FrameTooLarge(f"frame of {size} bytes exceeds the {self.max_bytes}-byte limit")


class _BoundedContinuation(continuous_frame):
    """Assembles fragmented messages with a cap on their total size and fragment count (either
    would otherwise grow without bound): a message over a cap is dropped (FrameTooLarge) and
    its remaining fragments drained by `buffer`, so the connection goes on with the next
    message. Fragments are appended to a bytearray (the library's `bytes +=` is quadratic);
    `started` tells the receive loop how long the message has been arriving."""

    def __init__(self, max_bytes: int, buffer: _BoundedFrameBuffer,
                 max_fragments: int = MAX_FRAGMENTS_PER_MESSAGE) -> None:
        super().__init__(False, True)
        self.max_bytes = max_bytes
        self.max_fragments = max_fragments
        self._buffer = buffer
        self._fragments = 0
        self.started: float | None = None  # monotonic time of the message's first fragment
        buffer.on_message_refused = self.forget  # type: ignore[method-assign]

    def forget(self) -> None:
        self.cont_data = None
        self.recving_frames = None
        self._fragments = 0
        self.started = None

    def add(self, frame: Any) -> None:
        if frame.opcode != ABNF.OPCODE_CONT and frame.fin:  # a whole message: nothing to copy
            self.cont_data = [frame.opcode, frame.data]
            return
        held = len(self.cont_data[1]) if self.cont_data else 0
        if held + len(frame.data) > self.max_bytes or self._fragments >= self.max_fragments:
            what = (f"{self.max_bytes}-byte" if held + len(frame.data) > self.max_bytes
                    else f"{self.max_fragments}-fragment")
            self.forget()
            self._buffer.skip_rest(not frame.fin)
            raise FrameTooLarge(f"fragmented message exceeds the {what} limit")
        self._fragments += 1
        if self.cont_data is None:  # validate() let only TEXT or BINARY start a message
            self.cont_data = [frame.opcode, bytearray(frame.data)]
            self.recving_frames = frame.opcode
            self.started = time.monotonic()
        else:
            self.cont_data[1] += frame.data
        if frame.fin:
            self.recving_frames = None

    def extract(self, frame: Any) -> tuple[int, Any]:
        data = self.cont_data
        if data is None:
            raise websocket.WebSocketProtocolException("no continuation data")
        self.forget()
        payload = data[1]
        frame.data = bytes(payload) if isinstance(payload, bytearray) else payload
        return int(data[0]), frame


def _recv_step(ws: websocket.WebSocket) -> tuple[int, Any] | None:
    """Read one frame: (opcode, frame) for a complete data message or a control frame (a ping
    is answered here), None for a fragment that does not end its message, so the receive loop
    turns once per frame, not once per message (`recv_data_frame` loops over the fragments).

    Raises what the frame reader raises (`WebSocketTimeoutException` included: a quiet
    socket), `WebSocketProtocolException` for a fragment out of order, and
    `WebSocketConnectionClosedException` when the answer to a ping or close cannot be sent in
    time."""
    frame = ws.frame_buffer.recv_frame()
    opcode = int(frame.opcode)
    if opcode in (ABNF.OPCODE_TEXT, ABNF.OPCODE_BINARY, ABNF.OPCODE_CONT):
        cont = ws.cont_frame
        cont.validate(frame)
        cont.add(frame)
        if not frame.fin:
            return None
        return cont.extract(frame)
    try:
        if opcode == ABNF.OPCODE_CLOSE:
            ws.send_close()
        elif opcode == ABNF.OPCODE_PING:  # at most 125 bytes: the frame reader checked
            ws.pong(frame.data)
    except websocket.WebSocketTimeoutException as exc:
        # Not a quiet socket: the peer stopped reading, and part of the frame may be written,
        # so anything sent after it would be garbage to the peer.
        raise websocket.WebSocketConnectionClosedException(
            f"answer to a {'close' if opcode == ABNF.OPCODE_CLOSE else 'ping'} not sent "
            "within the timeout (the peer is not reading)") from exc
    return opcode, frame


class _Handshake:
    """Bounds one connection's opening (TCP connect, TLS, HTTP upgrade) as a whole.

    websocket-client reads the upgrade response a byte per `recv`, with only a per-`recv`
    timeout, so a venue (or a middlebox) that trickles its answer, or streams a huge error body,
    would hold the connection thread for good. `kill` shuts the socket down, which wakes any
    read at once: a timer calls it when the connect timeout has passed, and `Connection.abort`
    (the stop path) calls it too. It acts on a duplicate of our TCP socket's descriptor
    (`shutdown` acts on the socket, so it reaches the TLS layer wrapped around it), and on the
    library's socket (`ws.sock`, set once its TCP and TLS set-up is done: the proxy path and
    redirects).
    """

    def __init__(self, ws: websocket.WebSocket) -> None:
        self._ws = ws
        self._lock = threading.Lock()  # orders kill against finish: never kill a kept socket
        self._killer: socket.socket | None = None
        self._done = False
        self.killed = False

    def watch(self, sock: socket.socket) -> None:
        """Make `sock` (our TCP socket, before TLS wraps it) reachable by `kill`."""
        dup: socket.socket | None = sock.dup()
        with self._lock:
            keep = not self._done and not self.killed
            if keep:  # (one address after another: only the last socket is ours to kill)
                dup, self._killer = self._killer, dup
        if dup is not None:
            dup.close()
        if not keep:  # killed meanwhile: this socket must not go on either
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def kill(self) -> None:
        with self._lock:
            if self._done:
                return
            self.killed = True
            targets = [self._killer, getattr(self._ws, "sock", None)]
        for sock in targets:
            if sock is not None:
                with contextlib.suppress(OSError):  # not connected yet, or already closed
                    sock.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        with self._lock:
            self._done = True
            killer, self._killer = self._killer, None
        if killer is not None:
            killer.close()


class Connection:
    """Runs the receive loop on its own thread (`ws-<exchange>`) until `stop` is set."""

    def __init__(self, adapter: Adapter, base_url: str, symbols: Sequence[str],
                 frames: Handoff[Frame], metrics: Metrics, stop: threading.Event, *,
                 backoff: Backoff | None = None, recv_timeout_s: float = 0.5,
                 connect_timeout_s: float = 5.0, liveness_timeout_s: float | None = None,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 frame_queue_wait_s: float = FRAME_QUEUE_WAIT_S,
                 healthy_after_s: float = HEALTHY_AFTER_S) -> None:
        self.adapter = adapter
        self.base_url = base_url
        self._symbols = list(symbols)
        self._frames = frames
        self._metrics = metrics
        self._stop = stop
        self._backoff = backoff or Backoff()
        # A finite socket timeout lets the loop check liveness, pings and `stop` even on a quiet
        # connection; a blocking recv() with none never returns on SIGTERM (PEP 475 retries it).
        self._recv_timeout_s = recv_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self.liveness_timeout_s = liveness_timeout_s or adapter.liveness_timeout_s
        self._max_frame_bytes = max_frame_bytes
        self._frame_queue_wait_s = frame_queue_wait_s
        self._healthy_after_s = healthy_after_s
        self._lock = threading.Lock()  # guards the request fields below (set by other threads)
        self._resubscribe: list[str] | None = None
        self._resubscribe_at = 0.0  # monotonic time to send `_resubscribe` at
        self._reconnect_reason: ReconnectReason | None = None
        self._subscribes: dict[str, SubscribeSent] = {}  # `subscribe_sent`, this connection's
        self._ws: websocket.WebSocket | None = None
        self._handshake: _Handshake | None = None  # the opening under way, for `abort`
        self._data_seen = False
        #: the current connection attempt; `data_seen(session)` counts only for this one
        self.session = 0
        # frames.put_total when the current session first handed frames on (None: not yet)
        self._session_mark: int | None = None
        self.last_frame_monotonic = 0.0  # (also set when a connection comes up: liveness)
        self._frame_seen_at = 0.0  # monotonic time of the last frame of any kind (0: none yet)
        self.connected_since: float | None = None
        self._frames_dropped_logged = 0.0
        self._max_age_s = adapter.max_connection_age_s
        self._first_frame_at: float | None = None   # first text frame of the current connection
        self._retiring: list[threading.Thread] = []
        # Ends the reading of the connection being retired (None: none is).
        self._retiring_done: threading.Event | None = None
        self._handover = False  # the last connection was retired (handed over), not closed
        self._lived_s = 0.0  # how long the last connection was up (0: it never came up)
        self._session_first = 0  # frames.put_total when the current connection began
        self._retry_after_s: float | None = None  # the last refused handshake's Retry-After
        # Monotonic time the last connection that was up ended (None before the first): the
        # reconnect duration runs from it, across failed attempts, to the next connection.
        self._lost_at: float | None = None
        # Lines a peer can make the loop repeat (frame_too_large, ws_reconnect_request_ignored):
        # each at most once per LOG_SAMPLE_INTERVAL_S, with `since_last_log` counting the ones
        # not logged since (oversized frames are each counted in their metric; a drained
        # connection's notices in messages_received_total).
        self._log_sample = LogSampler()
        #: monotonic time of the loop's last turn: the systemd watchdog is fed only while it moves
        self.beat = time.monotonic()

    # ---- requests from other threads -------------------------------------------------------
    def data_seen(self, session: int | None = None) -> None:
        """The parser got a valid data message: the backoff may reset if it came from the
        current connection. Pass the `session` the frame was received on to say exactly; without
        it, data counts once the parser has taken a frame the current session handed on (so an
        earlier connection's backlog, or a retiring one's frames before the current one has
        delivered, never reset the backoff)."""
        if session is not None:
            if session == self.session:
                self._data_seen = True
            return
        mark = self._session_mark
        if mark is not None and self._frames.taken_total > mark:
            self._data_seen = True

    def request_resubscribe(self, symbols: Sequence[str], *, after_s: float = 0.0,
                            session: int | None = None) -> None:
        """Send a subscribe request for `symbols` on this connection, `after_s` from now (a
        request already waiting is merged into: the symbols of both, the earlier time). With
        `session`, only while that connection is the current one (a new one subscribes to
        everything anyway)."""
        at = time.monotonic() + after_s
        with self._lock:
            if session is not None and session != self.session:
                return
            if self._resubscribe is not None:
                symbols = [*self._resubscribe, *(s for s in symbols
                                                 if s not in self._resubscribe)]
                at = min(at, self._resubscribe_at)
            self._resubscribe = list(symbols)
            self._resubscribe_at = at

    def subscribe_sent(self) -> tuple[int, dict[str, SubscribeSent]]:
        """(session, the latest subscribe request each symbol was in on that connection), for
        the parser's check that the venue answers them; empty before the first request of a
        connection, and on venues that take none (Binance: the streams are in the URL)."""
        with self._lock:
            return self.session, dict(self._subscribes)

    def _subscribe(self, ws: websocket.WebSocket, symbols: Sequence[str]) -> None:
        messages = self.adapter.subscribe_messages(symbols)
        # (taken before: an answer is in a frame queued after it)
        sent = SubscribeSent(self._frames.put_total, time.monotonic())
        for message in messages:
            ws.send(message)
        if messages:
            with self._lock:
                for symbol in symbols:
                    self._subscribes[symbol] = sent

    def replace_symbols(self, symbols: Sequence[str], *, resubscribe: bool) -> None:
        """Use `symbols` from now on (after the venue rejected some); send a new subscribe
        request on this connection when the venue voided the previous one."""
        with self._lock:
            self._symbols = list(symbols)
            if resubscribe:
                self._resubscribe = list(symbols)
                self._resubscribe_at = 0.0

    def request_reconnect(self, reason: ReconnectReason, *, retired: bool = False,
                          frame_index: int | None = None, session: int | None = None) -> None:
        """Replace the current connection (the loop acts at its next turn), unless the frame
        asking for it came from an earlier connection: a venue repeats `serverShutdown` on the
        connection it is draining, and each repeat replaced the healthy successor. The caller
        says so with `retired` (the frame is a `RetiredFrame`: read from a connection being
        handed over) or `frame_index` (its place in the frame queue, `taken_total` counting:
        one queued before the current connection began is an earlier one's, read before the
        switch), or `session` (the connection it was meant for)."""
        with self._lock:
            if retired or (frame_index is not None and frame_index < self._session_first) or (
                    session is not None and session != self.session):
                ignored = "from an earlier connection"
            else:
                self._reconnect_reason = reason
                return
        # A draining connection repeats its notice (every 50 ms, seen): one line per 10 s.
        not_logged = self._log_sample.admit("ws_reconnect_request_ignored", time.monotonic())
        if not_logged is not None:
            log.info("ws_reconnect_request_ignored", extra={"reason": reason, "why": ignored,
                                                            "since_last_log": not_logged})

    def abort(self) -> None:
        """Wake a blocked recv, or a connection being opened, at once (used by the stop path)."""
        handshake = self._handshake
        if handshake is not None:
            handshake.kill()
        ws = self._ws
        if ws is not None:
            ws.abort()

    def last_frame_unix(self) -> float:
        """Unix time of the last frame of any kind received (0.0 before the first), for the
        metric read at scrape time."""
        seen = self._frame_seen_at
        return 0.0 if not seen else time.time() - (time.monotonic() - seen)

    @property
    def symbols(self) -> list[str]:
        with self._lock:
            return list(self._symbols)

    # ---- the loop ----------------------------------------------------------------------------
    def run(self) -> None:
        delay = 0.0
        while not self._stop.is_set():
            if delay > 0:
                log.info("ws_reconnect_wait", extra={"delay_s": round(delay, 3),
                                                     "attempt": self._backoff.attempt})
                if self._wait(delay):
                    break
            with self._lock:
                # One step: the symbols the new connection subscribes to, and the end of the
                # requests meant for the one before (a verdict on its subscribe is dropped
                # here or refused as its; a refusal's new symbol list is either read here or
                # comes with its own request after).
                symbols = list(self._symbols)
                if symbols:
                    self.session += 1
                    self._resubscribe = None
                    self._reconnect_reason = None
                    # Every frame queued before this one is an earlier connection's.
                    self._session_first = self._frames.put_total
                    self._subscribes = {}
            if not symbols:
                log.error("no_symbols_left", extra={"hint": "every configured symbol was "
                                                    "rejected by the venue; fix SYMBOLS"})
                self._wait(60)
                continue
            url = self.adapter.connect_url(self.base_url, symbols)
            self._session_mark = None
            self._data_seen = False
            self._handover = False
            self._lived_s = 0.0
            reason = self._session(url, symbols)
            if reason == "stopped" or self._stop.is_set():
                break
            self._metrics.reconnect(reason)
            healthy = self._data_seen and self._lived_s >= self._healthy_after_s
            if healthy:
                self._backoff.reset()
            if self._handover and healthy:
                # A healthy connection handed over: its successor comes at once, the old one is
                # still being read.
                delay = 0.0
            else:
                # Planned or not, a connection that delivered no data, or only briefly, backs
                # off (one handed over is still read meanwhile): a venue that asks every new
                # connection to go (a node being drained that its load balancer keeps choosing)
                # would otherwise be reconnected to in a tight loop, and Binance allows 300
                # connections per 5 minutes per IP.
                delay = self._backoff.next_delay()
                retry_after, self._retry_after_s = self._retry_after_s, None
                if retry_after is not None:
                    # The jitter on top keeps the collectors behind one IP from all coming
                    # back in the same second.
                    delay += retry_after
        for t in self._retiring:
            t.join(timeout=2)

    def _wait(self, seconds: float) -> bool:
        """Wait (in slices, so `beat` keeps moving); True when stop was set."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.beat = time.monotonic()
            if self._stop.wait(min(left, 1.0)):
                return True
        return self._stop.is_set()

    def _open(self, url: str) -> websocket.WebSocket:
        """Connect and upgrade within `connect_timeout_s` in all (see `_Handshake`); raises
        OSError or WebSocketException (WebSocketTimeoutException when out of time)."""
        ws = websocket.WebSocket(skip_utf8_validation=True, enable_multithread=True)
        # Each read of a frame is bounded by the receive timeout as a whole, not per recv.
        ws.frame_buffer = _BoundedFrameBuffer(ws._recv, self._max_frame_bytes,
                                              self._recv_timeout_s)
        ws.cont_frame = _BoundedContinuation(self._max_frame_bytes, ws.frame_buffer)
        handshake = self._handshake = _Handshake(ws)
        timer = threading.Timer(self._connect_timeout_s, handshake.kill)
        timer.name = f"ws-{self.adapter.name}-handshake-timer"
        timer.daemon = True
        timer.start()
        if self._stop.is_set():  # abort() may have come before `_handshake` was set
            handshake.kill()
        try:
            sock = self._tcp_socket(url, handshake)
            try:
                ws.connect(url, timeout=self._connect_timeout_s, socket=sock,
                           header={"User-Agent": "chrono-collectors"})
            except BaseException:
                if sock is not None:
                    sock.close()
                raise
        except (OSError, websocket.WebSocketException) as exc:
            if handshake.killed and not self._stop.is_set():
                raise websocket.WebSocketTimeoutException(
                    f"handshake not complete within {self._connect_timeout_s} s") from exc
            raise
        finally:
            timer.cancel()
            handshake.finish()
            self._handshake = None
        if handshake.killed:  # killed just as the upgrade completed: the socket is shut
            ws.shutdown()
            raise websocket.WebSocketTimeoutException(
                f"handshake not complete within {self._connect_timeout_s} s")
        ws.settimeout(self._recv_timeout_s)
        return ws

    def _tcp_socket(self, url: str, handshake: _Handshake) -> socket.socket | None:
        """Our own TCP (and TLS) socket for `url`, watched by `handshake`; None when a proxy
        from the environment applies (websocket-client then connects through it as before,
        and only the upgrade itself is bounded as a whole)."""
        hostname, port, _, is_secure = parse_url(url)
        if _proxy_for(url) is not None:
            return None
        sock = _tcp_connect(hostname, port, handshake, self._connect_timeout_s)
        try:
            for option in DEFAULT_SOCKET_OPTION:  # what websocket-client sets on its own
                sock.setsockopt(*option)
            if is_secure:  # websocket-client's own TLS set-up (CA bundle, SNI, hostname check)
                sock = _ssl_socket(sock, {}, hostname)
        except BaseException:
            sock.close()
            raise
        return sock

    def _session(self, url: str, symbols: list[str]) -> ReconnectReason | Literal["stopped"]:
        """One connection's life; returns the reason it ended. A connection that was up sets
        `_lost_at` when it ends; a failed attempt leaves it as it was, so the reconnect
        duration covers the whole outage, every failed attempt included."""
        self._metrics.connect_attempts.inc()
        started = time.monotonic()
        try:
            ws = self._open(url)
        except websocket.WebSocketBadStatusException as exc:
            status = getattr(exc, "status_code", None)
            hint = self.adapter.http_error_hint(status) if isinstance(status, int) else None
            if hint is None and status == 429:
                hint = RATE_LIMITED_HINT
            extra: dict[str, object] = {"url": _safe_url(url), "status": status, "hint": hint}
            # Binance bans an IP (418, for 2 minutes to 3 days) that does not back off after a
            # 429; both say how long to wait. Any status may carry one (a 503 too): the loop
            # waits that long, and this one line per refused handshake says what was asked.
            retry_after = _retry_after(exc)
            if retry_after is not None:
                self._retry_after_s = retry_after
                extra["retry_after_s"] = round(retry_after, 3)
            log.error("ws_handshake_rejected", extra=extra)
            return "handshake_rejected"
        except (OSError, websocket.WebSocketException) as exc:
            if self._stop.is_set():
                return "stopped"  # (the stop path shut the opening connection down)
            extra = {"url": _safe_url(url), "error": _describe(exc)}
            proxy = _proxy_for(url)
            if proxy is not None:  # (from http_proxy/https_proxy: it may be what failed)
                extra["proxy"] = proxy
            log.warning("ws_connect_failed", extra=extra)
            return "connect_failed"

        self._ws = ws
        now = time.monotonic()
        self.last_frame_monotonic = now
        self.connected_since = now
        self._metrics.connected.set(1)
        extra = {"url": _safe_url(url), "symbols": len(symbols),
                 "connect_s": round(now - started, 3)}
        lost_at = self._lost_at
        if lost_at is not None:
            extra["reconnect_after_s"] = round(now - lost_at, 3)
            self._metrics.last_reconnect_duration.set(now - lost_at)
        log.info("ws_connected", extra=extra)
        self._first_frame_at = None
        reason: ReconnectReason | Literal["stopped"] = "error"
        try:
            self._subscribe(ws, symbols)
            reason = self._receive(ws)
            return reason
        except (OSError, websocket.WebSocketException) as exc:
            if self._stop.is_set():
                reason = "stopped"
                return reason
            log.warning("ws_disconnected", extra={"error": _describe(exc),
                                                  "connected_s": round(time.monotonic() - now, 3)})
            return reason
        finally:
            # Lost now (before the socket is closed): the outage runs from here, unless this
            # connection delivered nothing (a node that takes the upgrade and closes, again and
            # again, is the same outage).
            if self._data_seen or self._lost_at is None:
                self._lost_at = time.monotonic()
            self._lived_s = time.monotonic() - now
            self._metrics.connected.set(0)
            self.connected_since = None
            self._ws = None
            # Only a connection that delivered data is worth reading on while its successor
            # starts; one that did not is closed at once (and the next one backs off).
            self._handover = (reason in PLANNED_REASONS and self._data_seen
                              and not self._stop.is_set())
            if self._handover:
                self._retire(ws)
            else:
                _close_quietly(ws, graceful=self._stop.is_set())

    def _retire(self, ws: websocket.WebSocket) -> None:
        """Keep reading a connection being replaced, on its own thread, until its successor
        has delivered for a while: make-before-break, so the switch loses no update. One at a
        time: one still being read when the next is retired (its successor was replaced in turn
        before it delivered for long) is ended now, so a venue that keeps asking connections to
        go cannot pile them up."""
        done = threading.Event()
        with self._lock:
            if self._retiring_done is not None:
                # (it leaves at its next turn, within the receive timeout, with a Close: a
                # shutdown of its socket's read side from here would drop TLS under it)
                self._retiring_done.set()
            self._retiring_done = done
        self._retiring = [t for t in self._retiring if t.is_alive()]
        thread = threading.Thread(target=self._drain_old, args=(ws, done), daemon=True,
                                  name=f"ws-{self.adapter.name}-retiring")
        self._retiring.append(thread)
        thread.start()

    def _drain_old(self, ws: websocket.WebSocket, done: threading.Event) -> None:
        started = time.monotonic()
        forwarded = 0
        try:
            while not self._stop.is_set() and not done.is_set():
                now = time.monotonic()
                successor = self._first_frame_at
                if now - started > HANDOVER_MAX_S or (
                        successor is not None and successor > started
                        and now - successor > HANDOVER_OVERLAP_S):
                    break
                try:
                    step = _recv_step(ws)
                except websocket.WebSocketTimeoutException:
                    continue
                except FrameTooLarge:  # counted as the live connection's are
                    self._metrics.oversized_frames.inc()
                    continue
                if step is None:
                    continue
                opcode, frame = step
                if opcode in (ABNF.OPCODE_TEXT, ABNF.OPCODE_BINARY):
                    if self._frames.put(RetiredFrame((frame.data, time.time_ns()))):
                        forwarded += 1
                    else:  # the queue is full: counted as the live connection's drops are
                        self._metrics.frames_dropped.inc()
                elif opcode == ABNF.OPCODE_CLOSE:
                    break
        except (OSError, websocket.WebSocketException):
            pass  # the venue closed it: exactly what we were waiting for
        finally:
            with self._lock:
                if self._retiring_done is done:
                    self._retiring_done = None
            if done.is_set() and ws.connected:  # ended by the next handover: its Close
                # (none when the venue's own was answered already), no wait for the reply
                with contextlib.suppress(OSError, websocket.WebSocketException):
                    ws.send_close()
            _close_quietly(ws, graceful=not done.is_set())
            log.info("ws_handover_done", extra={"old_frames_after_switch": forwarded,
                                                "overlap_s": round(time.monotonic() - started,
                                                                   3)})

    def _receive(self, ws: websocket.WebSocket) -> ReconnectReason | Literal["stopped"]:
        frames = self._frames
        buffer = ws.frame_buffer if isinstance(ws.frame_buffer, _BoundedFrameBuffer) else None
        cont = ws.cont_frame
        bounded = cont if isinstance(cont, _BoundedContinuation) else None
        ping_every = self.adapter.app_ping_interval_s
        ws_ping_every = self.adapter.ws_ping_interval_s
        liveness = self.liveness_timeout_s
        last_ping_sent = last_ws_ping_sent = time.monotonic()
        while True:
            if self._stop.is_set():
                return "stopped"
            now = self.beat = time.monotonic()
            if ((self._resubscribe is not None and now >= self._resubscribe_at)
                    or self._reconnect_reason is not None):
                with self._lock:
                    resub = None
                    if now >= self._resubscribe_at:
                        resub, self._resubscribe = self._resubscribe, None
                    reason, self._reconnect_reason = self._reconnect_reason, None
                if reason is not None:
                    log.info("ws_reconnect_requested", extra={"reason": reason})
                    return reason
                if resub is not None:
                    self._subscribe(ws, resub)
            if self._max_age_s is not None and self.connected_since is not None and (
                    now - self.connected_since > self._max_age_s):
                log.info("ws_max_age", extra={"age_s": round(now - self.connected_since)})
                return "max_age"
            silent_for = now - self.last_frame_monotonic
            if silent_for > liveness:
                log.warning("ws_liveness_timeout", extra={"silent_s": round(silent_for, 3),
                                                          "limit_s": liveness})
                return "liveness_timeout"
            # Fragments are frames, but a message that never ends delivers nothing: one
            # being assembled, or the rest of one refused (the peer may answer our pings
            # between its fragments, so frames alone do not prove the stream alive).
            begun = bounded.started if bounded is not None else None
            if begun is None and buffer is not None:
                begun = buffer.skipping_since
            if begun is not None and now - begun > liveness:
                log.warning("ws_liveness_timeout", extra={
                    "message_unfinished_s": round(now - begun, 3), "limit_s": liveness})
                return "liveness_timeout"
            if ping_every is not None and now - max(last_ping_sent,
                                                    self.last_frame_monotonic) >= ping_every:
                ping = self.adapter.ping_message()
                if ping is not None:
                    ws.send(ping)
                last_ping_sent = now
            if ws_ping_every is not None and now - max(last_ws_ping_sent,
                                                       self.last_frame_monotonic) >= ws_ping_every:
                ws.ping()
                last_ws_ping_sent = now
            try:
                step = _recv_step(ws)
            except websocket.WebSocketTimeoutException:
                continue
            except FrameTooLarge as exc:
                self.last_frame_monotonic = self._frame_seen_at = now = time.monotonic()
                self._metrics.oversized_frames.inc()
                # A venue (or a hostile peer) may send nothing else: one line per 10 s.
                not_logged = self._log_sample.admit("frame_too_large", now)
                if not_logged is not None:
                    log.warning("frame_too_large", extra={"error": str(exc),
                                                          "since_last_log": not_logged})
                continue
            except websocket.WebSocketProtocolException as exc:
                log.warning("ws_protocol_error", extra={"error": _describe(exc)})
                # The stream cannot be trusted any more: say why (RFC 6455 7.4.1).
                with contextlib.suppress(OSError, websocket.WebSocketException):
                    ws.send_close(websocket.STATUS_PROTOCOL_ERROR, b"protocol error")
                return "protocol_error"
            self.last_frame_monotonic = self._frame_seen_at = time.monotonic()
            if step is None:  # a fragment: the message goes on
                continue
            opcode, frame = step
            if opcode in (ABNF.OPCODE_TEXT, ABNF.OPCODE_BINARY):
                if self._first_frame_at is None:
                    self._first_frame_at = self.last_frame_monotonic
                received_ns = time.time_ns()
                batch = [(frame.data, received_ns)]
                if buffer is not None and cont.recving_frames is None:
                    # Frames that were read from the socket with this one: same receive time.
                    batch.extend((payload, received_ns)
                                 for payload in buffer.pop_data_frames(FRAMES_PER_TURN))
                if self._session_mark is None:
                    self._session_mark = frames.put_total
                dropped = frames.put_many_within(batch, self._frame_queue_wait_s)
                if dropped:
                    self._metrics.frames_dropped.inc(dropped)
                    if self.last_frame_monotonic - self._frames_dropped_logged > 10:
                        self._frames_dropped_logged = self.last_frame_monotonic
                        log.error("frames_dropped", extra={"queue_max": frames.max_items})
            elif opcode == ABNF.OPCODE_CLOSE:
                code = int.from_bytes(frame.data[:2], "big") if len(frame.data) >= 2 else None
                log.warning("ws_closed_by_server", extra={"code": code,
                                                          "reason": frame.data[2:200].decode(
                                                              "utf-8", "replace") or None})
                return "closed_by_server"
            else:  # ping (already answered by websocket-client) or pong
                self._metrics.message("ping" if opcode == ABNF.OPCODE_PING else "pong")


def _tcp_connect(host: str, port: int, handshake: _Handshake, timeout_s: float) -> socket.socket:
    """`socket.create_connection`, but each socket is watched by `handshake` before it connects,
    so that `kill` (the stop path, or the connect timeout) wakes a connect that the peer never
    answers (a firewall dropping SYNs, a listener with a full backlog) instead of leaving the
    stop to wait for the connect timeout.

    The connect is started non-blocking and `killed` is read after it has started: a kill from
    then on shuts a connecting socket down, which wakes the wait for it at once, and one from
    before is seen here. (Name resolution cannot be interrupted: it keeps its own timeouts.)

    `timeout_s` is shared by the addresses: each gets an equal part of what is left (but at
    least CONNECT_SHARE_MIN_S of it, so that a slow but reachable venue behind many addresses
    can still answer: Linux resends a lost SYN after 1 s), so one that never answers (a broken
    IPv6 route, listed first) leaves time for the next before the handshake's own timer, which
    has the same `timeout_s` in all, ends the attempt.
    """
    error: OSError | None = None
    addresses = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    deadline = time.monotonic() + timeout_s
    for index, (family, kind, proto, _, address) in enumerate(addresses):
        left = max(0.0, deadline - time.monotonic())
        share = max(left / (len(addresses) - index), min(left, CONNECT_SHARE_MIN_S))
        sock = socket.socket(family, kind, proto)
        try:
            handshake.watch(sock)
            sock.setblocking(False)
            code = sock.connect_ex(address)
            if handshake.killed:
                raise OSError(errno.ECANCELED, "connect interrupted")
            if code in (errno.EINPROGRESS, errno.EAGAIN):
                poller = select.poll()
                poller.register(sock, select.POLLOUT)
                if not poller.poll(share * 1000):
                    raise TimeoutError(errno.ETIMEDOUT, f"connect to {address[0]} timed out")
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if handshake.killed:
                raise OSError(errno.ECANCELED, "connect interrupted")
            if code:
                raise OSError(code, os.strerror(code))
            sock.settimeout(timeout_s)
            return sock
        except OSError as exc:
            sock.close()
            if handshake.killed:
                raise
            error = exc
        except BaseException:
            sock.close()
            raise
    raise error if error is not None else OSError(f"no address for {host}:{port}")


def _close_quietly(ws: websocket.WebSocket, graceful: bool) -> None:
    """Close `ws` (with the closing handshake when `graceful`), and always its socket:
    websocket-client's `close` returns at once, socket open, once a Close was sent (our answer
    to the venue's Close, or ours after a protocol error)."""
    try:
        if graceful:
            with contextlib.suppress(OSError, websocket.WebSocketException):
                ws.close(timeout=0.5)
    finally:
        ws.shutdown()


def _retry_after(exc: websocket.WebSocketBadStatusException) -> float | None:
    """Seconds a refused handshake's `Retry-After` (delta-seconds or an HTTP-date) asks for,
    at most RETRY_AFTER_MAX_S; None without a readable one."""
    headers = getattr(exc, "resp_headers", None)  # websocket-client lowercases the names
    value = headers.get("retry-after") if isinstance(headers, dict) else None
    return parse_retry_after(value if isinstance(value, str) else None, max_s=RETRY_AFTER_MAX_S)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:200]}"


def _proxy_for(url: str) -> str | None:
    """`host:port` of the proxy the environment (`https_proxy`, `http_proxy`, `no_proxy`) sets
    for `url`, or None. Never for a loopback host: websocket-client would send the simulator's
    127.0.0.1 through a proxy too (it has no loopback exemption), where every HTTP client
    people know skips one."""
    hostname, _, _, is_secure = parse_url(url)
    if hostname == "localhost" or hostname.endswith(".localhost"):
        return None
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(hostname.strip("[]")).is_loopback:
            return None
    host, port, _ = get_proxy_info(hostname, is_secure)
    return None if not host else f"{host}:{port}"


def _safe_url(url: str) -> str:
    """URLs carry no secrets here, but never log a query string longer than needed."""
    return url if len(url) <= 200 else url[:200] + "..."
