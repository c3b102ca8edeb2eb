"""A small RFC 6455 WebSocket server on the standard library, for the exchange simulator.

Two layers, as in python-websockets: a *sans-I/O* core (handshake parsing and responses, the
frame codec, message reassembly and validation) that touches no socket, thread or clock, and a
thin threaded server around it (one reader thread per connection, one accept thread, one
housekeeping thread for server pings, pong deadlines and close deadlines).

Follows RFC 6455 (https://www.rfc-editor.org/rfc/rfc6455): section 4.2 (opening handshake,
``Sec-WebSocket-Accept``), 5.2-5.5 (framing, client masking, fragmentation, control frames),
5.5.1 and 7 (closing handshake, status codes). Only ``127.0.0.1``-style loopback use is intended:
no TLS, no extensions, no subprotocols.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import logging
import selectors
import socket
import struct
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from http import HTTPStatus
from typing import Protocol
from urllib.parse import parse_qs, urlsplit

from collectors.errors import ChronoError

log = logging.getLogger(__name__)

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_HANDSHAKE_BYTES = 16 * 1024
MAX_CONTROL_PAYLOAD = 125


class Opcode(IntEnum):
    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


class CloseCode(IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS = 1005
    ABNORMAL = 1006
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011


class WebSocketError(ChronoError):
    """Base of the errors this module raises."""


class ProtocolViolation(WebSocketError):
    """The peer broke RFC 6455; `close_code` is the status to fail the connection with."""

    def __init__(self, message: str, close_code: int = CloseCode.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.close_code = close_code


class HandshakeError(WebSocketError):
    """The opening handshake is not a valid WebSocket upgrade; answer with `status`."""

    def __init__(self, status: int, message: str,
                 headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers


# --------------------------------------------------------------------------- sans-I/O: handshake


@dataclass(frozen=True, slots=True)
class HandshakeRequest:
    """A parsed, valid WebSocket upgrade request."""

    method: str
    target: str
    path: str
    raw_query: str
    query: Mapping[str, tuple[str, ...]]
    headers: Mapping[str, str]
    key: str

    def query_value(self, name: str) -> str | None:
        """The first value of query parameter `name`, or None."""
        values = self.query.get(name)
        return values[0] if values else None


def accept_key(key: str) -> str:
    """The `Sec-WebSocket-Accept` value for a client's `Sec-WebSocket-Key` (RFC 6455 4.2.2)."""
    digest = hashlib.sha1((key + WS_GUID).encode("ascii")).digest()  # noqa: S324 - mandated
    return base64.b64encode(digest).decode("ascii")


def _tokens(value: str) -> set[str]:
    return {part.strip().lower() for part in value.split(",") if part.strip()}


def parse_handshake(head: bytes) -> HandshakeRequest:
    """Parse the request head (everything up to the blank line).

    Raises HandshakeError with the HTTP status to answer when it is not a valid upgrade.
    """
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError as exc:
        raise HandshakeError(400, "request head is not ASCII") from exc
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise HandshakeError(400, f"malformed request line {lines[0][:80]!r}")
    method, target, version = parts
    if version != "HTTP/1.1":
        raise HandshakeError(505, f"unsupported HTTP version {version[:20]!r}")
    if method != "GET":
        raise HandshakeError(405, f"method {method[:20]!r} is not GET")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HandshakeError(400, f"malformed header line {line[:80]!r}")
        name = name.lower()
        value = value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    if "host" not in headers:
        raise HandshakeError(400, "missing Host header")
    if "websocket" not in _tokens(headers.get("upgrade", "")):
        raise HandshakeError(426, "not a WebSocket upgrade (Upgrade: websocket missing)",
                             (("Upgrade", "websocket"),))
    if "upgrade" not in _tokens(headers.get("connection", "")):
        raise HandshakeError(400, "Connection header does not contain Upgrade")
    if headers.get("sec-websocket-version", "").strip() != "13":
        raise HandshakeError(426, "unsupported Sec-WebSocket-Version (13 required)",
                             (("Sec-WebSocket-Version", "13"),))
    key = headers.get("sec-websocket-key", "").strip()
    try:
        raw_key = base64.b64decode(key.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise HandshakeError(400, "Sec-WebSocket-Key is not base64") from exc
    if len(raw_key) != 16:
        raise HandshakeError(400, "Sec-WebSocket-Key does not decode to 16 bytes")
    split = urlsplit(target)
    if not split.path.startswith("/"):
        raise HandshakeError(400, f"request target {target[:80]!r} is not an absolute path")
    query = {name: tuple(values) for name, values in
             parse_qs(split.query, keep_blank_values=True).items()}
    return HandshakeRequest(method=method, target=target, path=split.path,
                            raw_query=split.query, query=query, headers=headers, key=key)


def accept_response(key: str) -> bytes:
    """The `101 Switching Protocols` answer for a parsed request's key."""
    return (
        "HTTP/1.1 101 Switching Protocols\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept_key(key)}\r\n"
        "\r\n"
    ).encode("ascii")


def error_response(status: int, body: bytes = b"",
                   content_type: str = "text/plain; charset=utf-8",
                   headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A complete HTTP/1.1 error response that refuses the upgrade and closes."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    lines = [f"HTTP/1.1 {status} {phrase}", f"Content-Type: {content_type}",
             f"Content-Length: {len(body)}", "Connection: close"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# --------------------------------------------------------------------------- sans-I/O: frames


def apply_mask(data: bytes, mask: bytes) -> bytes:
    """XOR `data` with the 4-byte masking key (RFC 6455 5.3); masking is its own inverse."""
    size = len(data)
    if size == 0:
        return b""
    key = (mask * (size // 4 + 1))[:size]
    # One big-integer XOR is far faster in CPython than a per-byte loop.
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(
        size, "little")


def encode_frame(opcode: int, payload: bytes, *, fin: bool = True,
                 mask: bytes | None = None) -> bytes:
    """One frame on the wire. Servers send unmasked frames; pass `mask` to build client frames."""
    first = (0x80 if fin else 0) | opcode
    size = len(payload)
    mask_bit = 0x80 if mask is not None else 0
    if size < 126:
        header = struct.pack("!BB", first, mask_bit | size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", first, mask_bit | 126, size)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, size)
    if mask is not None:
        return header + mask + apply_mask(payload, mask)
    return header + payload


def encode_close_payload(code: int | None, reason: str = "") -> bytes:
    """The payload of a close frame; the reason is cut to fit the 125-byte control limit."""
    if code is None:
        return b""
    raw = reason.encode("utf-8")[:MAX_CONTROL_PAYLOAD - 2]
    # Never cut inside a UTF-8 sequence: the peer must be able to decode the reason.
    raw = raw.decode("utf-8", "ignore").encode("utf-8")
    return struct.pack("!H", code) + raw


def _valid_close_code(code: int) -> bool:
    return code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014) or (
        3000 <= code <= 4999)


def parse_close_payload(payload: bytes) -> tuple[int | None, str]:
    """(code, reason) of a close frame; (None, "") when it carries no status.

    Raises ProtocolViolation for a 1-byte payload, a reserved code or a non-UTF-8 reason.
    """
    if not payload:
        return None, ""
    if len(payload) == 1:
        raise ProtocolViolation("close frame with a 1-byte payload")
    (code,) = struct.unpack_from("!H", payload)
    if not _valid_close_code(code):
        raise ProtocolViolation(f"invalid close code {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolViolation("close reason is not UTF-8", CloseCode.INVALID_DATA) from exc
    return code, reason


@dataclass(frozen=True, slots=True)
class Frame:
    opcode: Opcode
    payload: bytes
    fin: bool = True


@dataclass(frozen=True, slots=True)
class Message:
    """A complete message: reassembled TEXT/BINARY data, or one PING/PONG/CLOSE control frame."""

    opcode: Opcode
    payload: bytes
    text: str | None = None  # decoded (and validated) for TEXT messages


class FrameParser:
    """Turns received bytes into validated messages; never does I/O.

    Feed bytes with `feed`, then drain `next_message` until it returns None. Every violation
    raises ProtocolViolation with the close code to fail the connection with (1002, 1007 or
    1009). The frame size is checked from the header, before the payload is buffered.
    """

    def __init__(self, *, max_frame_bytes: int, max_message_bytes: int,
                 expect_masked: bool = True) -> None:
        self._max_frame = max_frame_bytes
        self._max_message = max_message_bytes
        self._expect_masked = expect_masked
        self._buf = bytearray()
        self._pos = 0
        self._frag_opcode: Opcode | None = None
        self._fragments: list[bytes] = []
        self._frag_size = 0

    def feed(self, data: bytes) -> None:
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos > 1 << 16:
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += data

    def next_message(self) -> Message | None:
        while True:
            frame = self._next_frame()
            if frame is None:
                return None
            message = self._assemble(frame)
            if message is not None:
                return message

    def _next_frame(self) -> Frame | None:
        buf, pos = self._buf, self._pos
        available = len(buf) - pos
        if available < 2:
            return None
        first, second = buf[pos], buf[pos + 1]
        fin = bool(first & 0x80)
        if first & 0x70:
            raise ProtocolViolation("reserved bits set but no extension was negotiated")
        try:
            opcode = Opcode(first & 0x0F)
        except ValueError:
            raise ProtocolViolation(f"unknown opcode {first & 0x0F:#x}") from None
        masked = bool(second & 0x80)
        if masked != self._expect_masked:
            raise ProtocolViolation("client frames must be masked" if self._expect_masked
                                    else "server frames must not be masked")
        size = second & 0x7F
        header = 2
        if size == 126:
            if available < 4:
                return None
            (size,) = struct.unpack_from("!H", buf, pos + 2)
            header = 4
        elif size == 127:
            if available < 10:
                return None
            (size,) = struct.unpack_from("!Q", buf, pos + 2)
            if size >> 63:
                raise ProtocolViolation("payload length has the most significant bit set")
            header = 10
        if opcode >= Opcode.CLOSE:
            if not fin:
                raise ProtocolViolation("fragmented control frame")
            if size > MAX_CONTROL_PAYLOAD:
                raise ProtocolViolation("control frame payload longer than 125 bytes")
        if size > self._max_frame:
            raise ProtocolViolation(f"frame of {size} bytes exceeds the {self._max_frame} "
                                    "byte limit", CloseCode.MESSAGE_TOO_BIG)
        mask_size = 4 if masked else 0
        end = pos + header + mask_size + size
        if len(buf) < end:
            return None
        start = pos + header + mask_size
        payload = bytes(buf[start:end])
        if masked:
            payload = apply_mask(payload, bytes(buf[pos + header:start]))
        self._pos = end
        return Frame(opcode, payload, fin)

    def _assemble(self, frame: Frame) -> Message | None:
        if frame.opcode >= Opcode.CLOSE:
            if frame.opcode == Opcode.CLOSE:
                parse_close_payload(frame.payload)  # validates; raises on a bad close frame
            return Message(frame.opcode, frame.payload)
        if frame.opcode == Opcode.CONTINUATION:
            if self._frag_opcode is None:
                raise ProtocolViolation("continuation frame without a message to continue")
            opcode = self._frag_opcode
        else:
            if self._frag_opcode is not None:
                raise ProtocolViolation("new data frame inside a fragmented message")
            opcode = frame.opcode
            if frame.fin:
                return self._complete(opcode, frame.payload)
            self._frag_opcode = opcode
        self._frag_size += len(frame.payload)
        if self._frag_size > self._max_message:
            raise ProtocolViolation(f"message exceeds the {self._max_message} byte limit",
                                    CloseCode.MESSAGE_TOO_BIG)
        self._fragments.append(frame.payload)
        if not frame.fin:
            return None
        payload = b"".join(self._fragments)
        self._frag_opcode = None
        self._fragments = []
        self._frag_size = 0
        return self._complete(opcode, payload)

    def _complete(self, opcode: Opcode, payload: bytes) -> Message:
        if len(payload) > self._max_message:
            raise ProtocolViolation(f"message exceeds the {self._max_message} byte limit",
                                    CloseCode.MESSAGE_TOO_BIG)
        if opcode == Opcode.TEXT:
            try:
                text = payload.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ProtocolViolation("text message is not valid UTF-8",
                                        CloseCode.INVALID_DATA) from exc
            return Message(opcode, payload, text)
        return Message(opcode, payload)


# --------------------------------------------------------------------------- threaded server


@dataclass(frozen=True, slots=True)
class Rejection:
    """Answer the handshake with this HTTP status instead of upgrading."""

    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class ServerOptions:
    """Limits and timers of a WebSocketServer. Every blocking step has a bound."""

    max_frame_bytes: int = 1 << 20
    max_message_bytes: int = 1 << 20
    handshake_timeout_s: float = 5.0
    # Bounds one sendall: a client that stops reading is cut (like a slow-consumer disconnect)
    # instead of blocking the simulator's sending threads forever.
    send_timeout_s: float = 5.0
    # How long a close handshake or a lingering close may take before the socket is dropped.
    close_timeout_s: float = 2.0
    ping_interval_s: float | None = None
    pong_timeout_s: float = 60.0


class Handler(Protocol):
    """What a WebSocketServer calls. Calls come from the connection's reader thread."""

    def accept(self, request: HandshakeRequest) -> Rejection | None:
        """Return a Rejection to refuse the upgrade, None to accept it."""
        ...

    def on_open(self, conn: Connection) -> None:
        """The 101 answer has been written; the connection may send."""
        ...

    def on_message(self, conn: Connection, message: Message) -> None:
        """A TEXT/BINARY message or a PING/PONG frame (already answered/accounted)."""
        ...

    def on_close(self, conn: Connection) -> None:
        """The socket is closed; `conn.close_reason` says why."""
        ...


class Connection:
    """One accepted WebSocket connection. Sending methods are safe from any thread."""

    def __init__(self, server: WebSocketServer, sock: socket.socket, conn_id: int,
                 request: HandshakeRequest, peer: tuple[str, int]) -> None:
        self.id = conn_id
        self.request = request
        self.peer = peer
        self.opened_at = time.monotonic()
        # Serialises whole frames on the socket. Re-entrant so a protocol can hold it across a
        # group of sends (an ack, then its snapshot) that must not interleave with ticker sends.
        self.send_lock = threading.RLock()
        self.close_reason: str | None = None
        self.close_code_received: int | None = None
        self.frames_sent = 0
        self.bytes_sent = 0
        self._server = server
        self._sock = sock
        # Guards the flags below, which several threads read and set.
        self._state_lock = threading.Lock()
        self._close_sent = False
        self._close_received = False
        self._aborted = False
        self._closed = threading.Event()
        self._close_deadline: float | None = None
        self._outstanding_pings: dict[bytes, float] = {}
        self._last_ping_at = self.opened_at
        self._ping_counter = 0

    # -- state

    @property
    def open(self) -> bool:
        """True until a close frame was sent, the peer closed, or the socket was dropped."""
        return not (self._close_sent or self._aborted or self._closed.is_set())

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def wait_closed(self, timeout_s: float) -> bool:
        return self._closed.wait(timeout_s)

    def _set_reason(self, why: str) -> None:
        with self._state_lock:
            if self.close_reason is None:
                self.close_reason = why

    # -- sending

    def _write(self, data: bytes, frames: int) -> bool:
        with self.send_lock:
            if self._close_sent or self._aborted:
                return False
            try:
                self._sock.sendall(data)
            except TimeoutError:
                self.abort("slow_consumer")
                return False
            except OSError:
                self.abort("send_failed")
                return False
            self.frames_sent += frames
            self.bytes_sent += len(data)
            return True

    def send_text(self, text: str) -> bool:
        """Send one TEXT frame. False when the connection is closing or the send failed."""
        return self._write(encode_frame(Opcode.TEXT, text.encode("utf-8")), 1)

    def send_binary(self, data: bytes) -> bool:
        return self._write(encode_frame(Opcode.BINARY, data), 1)

    def send_encoded(self, data: bytes, frames: int = 1) -> bool:
        """Write pre-encoded frame bytes (bursts) or deliberately malformed bytes as they are."""
        return self._write(data, frames)

    def ping(self, payload: bytes | None = None) -> bool:
        """Send a PING; a PONG echoing `payload` must come back within the pong timeout."""
        if payload is None:
            self._ping_counter += 1
            payload = f"{int(time.time() * 1000)}-{self._ping_counter}".encode("ascii")
        payload = payload[:MAX_CONTROL_PAYLOAD]
        now = time.monotonic()
        with self._state_lock:
            # Registered before writing: the pong can be read before _write even returns.
            self._last_ping_at = now
            self._outstanding_pings[payload] = now
        sent = self._write(encode_frame(Opcode.PING, payload), 1)
        if not sent:
            with self._state_lock:
                self._outstanding_pings.pop(payload, None)
        return sent

    def _pong_received(self, payload: bytes) -> None:
        with self._state_lock:
            # Unsolicited pongs (no matching ping) do not count as an answer.
            self._outstanding_pings.pop(payload, None)

    def _reset_keepalive(self, now: float) -> None:
        with self._state_lock:
            self._outstanding_pings.clear()
            self._last_ping_at = now

    def _keepalive_state(self) -> tuple[float, float | None]:
        with self._state_lock:
            oldest = min(self._outstanding_pings.values(), default=None)
            return self._last_ping_at, oldest

    def close(self, code: int = CloseCode.NORMAL, reason: str = "", *,
              why: str = "server_close") -> None:
        """Start the closing handshake: send a close frame, then drop the socket when the peer
        answers or after the close timeout."""
        self._set_reason(why)
        # Do not wait long behind a send blocked on a client that does not read: a peer that
        # takes no data will take no close frame either, so drop it instead.
        if not self.send_lock.acquire(timeout=min(0.5, self._server.options.close_timeout_s)):
            self.abort(why)
            return
        try:
            if self._close_sent or self._aborted:
                return
            frame = encode_frame(Opcode.CLOSE, encode_close_payload(code, reason))
            try:
                self._sock.sendall(frame)
            except OSError:
                self.abort(why)
                return
            with self._state_lock:
                self._close_sent = True
                self._close_deadline = time.monotonic() + self._server.options.close_timeout_s
        finally:
            self.send_lock.release()
        self._server._wake_housekeeping()

    def abort(self, why: str = "abort", *, reset: bool = True) -> None:
        """Drop the TCP connection at once, without a close frame: an RST (SO_LINGER 0) by
        default; `reset=False` sends a FIN instead, so bytes already queued (a close frame)
        still reach the peer."""
        self._set_reason(why)
        with self._state_lock:
            if self._aborted or self._closed.is_set():
                return
            self._aborted = True
        try:
            if reset:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                      struct.pack("ii", 1, 0))
            # Wakes the reader thread (recv returns EOF) and any sender; the reader closes the
            # socket, so only one thread ever closes it.
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- reader thread

    def _run(self, parser: FrameParser, leftover: bytes, handler: Handler) -> None:
        try:
            if leftover:
                parser.feed(leftover)
                if not self._drain(parser, handler):
                    return
            while not self._aborted:
                try:
                    chunk = self._sock.recv(65536)
                except TimeoutError:
                    continue  # the socket timeout bounds sends; idle readers just wait again
                except OSError:
                    self._set_reason("reset")
                    return
                if not chunk:
                    self._set_reason("eof")
                    return
                parser.feed(chunk)
                if not self._drain(parser, handler):
                    return
        finally:
            self._finish()

    def _drain(self, parser: FrameParser, handler: Handler) -> bool:
        """Handle every complete message; False once the connection must end."""
        try:
            while (message := parser.next_message()) is not None:
                if not self._dispatch(message, handler):
                    return False
        except ProtocolViolation as exc:
            log.info("ws_protocol_violation", extra={"conn_id": self.id, "error": str(exc)})
            self.close(exc.close_code, str(exc), why=f"protocol_error_{exc.close_code}")
            return False
        return True

    def _dispatch(self, message: Message, handler: Handler) -> bool:
        opcode = message.opcode
        if opcode == Opcode.CLOSE:
            code, _ = parse_close_payload(message.payload)
            self.close_code_received = code
            self._close_received = True
            if self._close_sent:
                return False  # our close was answered: the handshake is complete
            self._set_reason("client_close")
            if not self._server.muted:
                # Echo the status code, as RFC 6455 5.5.1 asks.
                self.close(code if code is not None else CloseCode.NORMAL, "",
                           why="client_close")
            return False
        if opcode == Opcode.PING:
            if not self._server.muted:
                self._write(encode_frame(Opcode.PONG, message.payload), 1)
        elif opcode == Opcode.PONG:
            self._pong_received(message.payload)
        elif self._close_sent:
            return True  # data after our close frame is discarded (RFC 6455 1.4)
        try:
            handler.on_message(self, message)
        except Exception:
            # A handler bug fails this connection only (1011), never the server.
            log.exception("ws_handler_failed", extra={"conn_id": self.id})
            self.close(CloseCode.INTERNAL_ERROR, "internal error", why="handler_error")
            return False
        return True

    def _finish(self) -> None:
        sock = self._sock
        if not self._aborted and self._close_sent and not self._close_received:
            # Lingering close: we failed the connection while the peer may still be sending
            # (a too-big frame). Send FIN, then read and discard until the peer closes too, so
            # its data cannot turn our close into an RST that wipes the close frame we sent.
            try:
                sock.shutdown(socket.SHUT_WR)
                sock.settimeout(0.2)
                deadline = time.monotonic() + self._server.options.close_timeout_s
                while time.monotonic() < deadline:
                    try:
                        if not sock.recv(65536):
                            break
                    except TimeoutError:
                        continue
            except OSError:
                pass
        else:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # the server closes TCP first (RFC 6455 7.1.1)
        try:
            sock.close()
        finally:
            self._set_reason("closed")
            self._closed.set()


@dataclass(slots=True)
class _Stats:
    handshakes_rejected: int = 0
    connections_total: int = 0
    threads: set[threading.Thread] = field(default_factory=set)


class WebSocketServer:
    """Threaded WebSocket server on one listening socket.

    Threads: `<name>-accept` accepts; `<name>-conn-N` reads one connection (and runs the
    handler's callbacks); `<name>-housekeeping` sends server pings and enforces pong and close
    deadlines. `stop()` closes every connection (1001) and joins every thread.
    """

    def __init__(self, handler: Handler, *, host: str = "127.0.0.1", port: int = 0,
                 options: ServerOptions | None = None, name: str = "ws") -> None:
        self.handler = handler
        self.options = options or ServerOptions()
        self.name = name
        self._host = host
        self._port = port
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._lock = threading.Lock()  # guards _conns, _handshaking, _stats, _next_id
        self._conns: dict[int, Connection] = {}
        self._handshaking: set[socket.socket] = set()
        self._stats = _Stats()
        self._next_id = 0
        self._stopping = threading.Event()
        self._hk_wake = threading.Event()
        self._accept_thread: threading.Thread | None = None
        self._hk_thread: threading.Thread | None = None
        self._muted = False
        self.address: tuple[str, int] = (host, port)

    # -- lifecycle

    def start(self) -> None:
        """Bind, listen and start the accept and housekeeping threads.

        Raises OSError when the address cannot be bound.
        """
        listener = socket.create_server((self._host, self._port), backlog=128)
        listener.setblocking(False)
        self._listener = listener
        self._wake_r, self._wake_w = socket.socketpair()
        self.address = listener.getsockname()[:2]
        self._accept_thread = threading.Thread(target=self._accept_loop,
                                               name=f"{self.name}-accept", daemon=True)
        self._hk_thread = threading.Thread(target=self._housekeeping_loop,
                                           name=f"{self.name}-housekeeping", daemon=True)
        self._accept_thread.start()
        self._hk_thread.start()

    def stop(self) -> None:
        """Close every connection with 1001, join every thread, close every socket."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=5.0)
        for sock in (self._listener, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        with self._lock:
            conns = list(self._conns.values())
            for sock in self._handshaking:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        for conn in conns:
            conn.close(CloseCode.GOING_AWAY, "server stopping", why="server_stop")
        deadline = time.monotonic() + self.options.close_timeout_s
        for conn in conns:
            if not conn.wait_closed(max(0.0, deadline - time.monotonic())):
                conn.abort("server_stop", reset=False)
        self._hk_wake.set()
        if self._hk_thread is not None:
            self._hk_thread.join(timeout=5.0)
        with self._lock:
            threads = list(self._stats.threads)
        for thread in threads:
            thread.join(timeout=5.0)

    # -- state

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def muted(self) -> bool:
        return self._muted

    def set_muted(self, muted: bool) -> None:
        """Muted: no pongs, no server pings, and a client close is answered by dropping TCP."""
        self._muted = muted
        if not muted:
            now = time.monotonic()
            for conn in self.connections():
                conn._reset_keepalive(now)
        self._hk_wake.set()

    def connections(self) -> list[Connection]:
        with self._lock:
            return list(self._conns.values())

    @property
    def connections_total(self) -> int:
        with self._lock:
            return self._stats.connections_total

    @property
    def handshakes_rejected(self) -> int:
        with self._lock:
            return self._stats.handshakes_rejected

    def _wake_housekeeping(self) -> None:
        self._hk_wake.set()

    # -- threads

    def _accept_loop(self) -> None:
        assert self._listener is not None and self._wake_r is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping.is_set():
                selector.select()
                if self._stopping.is_set():
                    break
                try:
                    sock, peer = self._listener.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    log.exception("ws_accept_failed")
                    continue
                thread = threading.Thread(target=self._serve, args=(sock, peer), daemon=True,
                                          name=f"{self.name}-conn")
                with self._lock:
                    self._stats.threads.add(thread)
                    self._handshaking.add(sock)
                thread.start()

    def _serve(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        current = threading.current_thread()
        try:
            self._serve_socket(sock, peer)
        except Exception:
            log.exception("ws_connection_crashed")
        finally:
            with self._lock:
                self._stats.threads.discard(current)
                self._handshaking.discard(sock)

    def _serve_socket(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        opts = self.options
        sock.settimeout(opts.handshake_timeout_s)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            head, leftover = _read_head(sock)
        except (OSError, HandshakeError) as exc:
            status = exc.status if isinstance(exc, HandshakeError) else None
            if status is not None:
                _refuse(sock, error_response(status, str(exc).encode()), opts.close_timeout_s)
            else:
                sock.close()
            return
        try:
            request = parse_handshake(head)
        except HandshakeError as exc:
            _refuse(sock, error_response(exc.status, str(exc).encode(), headers=exc.headers),
                    opts.close_timeout_s)
            return
        try:
            rejection = self.handler.accept(request)
        except Exception:
            log.exception("ws_handshake_handler_failed")
            rejection = Rejection(500, b"internal error")
        if rejection is not None:
            with self._lock:
                self._stats.handshakes_rejected += 1
            _refuse(sock, error_response(rejection.status, rejection.body, rejection.content_type,
                                         rejection.headers), opts.close_timeout_s)
            return
        with self._lock:
            if self._stopping.is_set():
                sock.close()
                return
            self._next_id += 1
            conn = Connection(self, sock, self._next_id, request, peer)
            self._conns[conn.id] = conn
            self._stats.connections_total += 1
            self._handshaking.discard(sock)
        self._hk_wake.set()  # schedule this connection's pings now, not at the next timer
        threading.current_thread().name = f"{self.name}-conn-{conn.id}"
        sock.settimeout(opts.send_timeout_s)
        try:
            try:
                sock.sendall(accept_response(request.key))
            except OSError:
                conn.abort("handshake_send_failed")
                conn._finish()
                return
            try:
                self.handler.on_open(conn)
            except Exception:
                log.exception("ws_handler_failed", extra={"conn_id": conn.id})
                conn.close(CloseCode.INTERNAL_ERROR, "internal error", why="handler_error")
            parser = FrameParser(max_frame_bytes=opts.max_frame_bytes,
                                 max_message_bytes=opts.max_message_bytes)
            conn._run(parser, leftover, self.handler)
        finally:
            with self._lock:
                self._conns.pop(conn.id, None)
            self.handler.on_close(conn)

    def _housekeeping_loop(self) -> None:
        opts = self.options
        while not self._stopping.is_set():
            now = time.monotonic()
            next_due = now + 1.0
            for conn in self.connections():
                deadline = conn._close_deadline
                if deadline is not None and not conn.closed:
                    if now >= deadline:
                        conn.abort(conn.close_reason or "close_timeout", reset=False)
                    else:
                        next_due = min(next_due, deadline)
                    continue
                if opts.ping_interval_s is None or self._muted or not conn.open:
                    continue
                last_ping, oldest = conn._keepalive_state()
                if oldest is not None and now - oldest >= opts.pong_timeout_s:
                    log.info("ws_pong_timeout", extra={"conn_id": conn.id})
                    conn.close(CloseCode.POLICY_VIOLATION, "pong timeout", why="pong_timeout")
                    continue
                if now - last_ping >= opts.ping_interval_s:
                    conn.ping()
                    last_ping = now
                    if oldest is None:
                        oldest = now
                next_due = min(next_due, last_ping + opts.ping_interval_s)
                if oldest is not None:
                    next_due = min(next_due, oldest + opts.pong_timeout_s)
            # A timer wait, woken early by close() and set_muted(): not a synchronisation sleep.
            self._hk_wake.wait(max(0.001, next_due - time.monotonic()))
            self._hk_wake.clear()


def _read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """Read the request head up to the blank line. Returns (head, bytes after it)."""
    data = b""
    while True:
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            return data[:end], data[end + 4:]
        if len(data) > MAX_HANDSHAKE_BYTES:
            raise HandshakeError(431, "request head too large")
        chunk = sock.recv(4096)
        if not chunk:
            raise OSError("connection closed during the handshake")
        data += chunk


def _refuse(sock: socket.socket, response: bytes, linger_s: float) -> None:
    """Write an HTTP error response and close without an RST that could discard it."""
    try:
        sock.sendall(response)
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(0.2)
        deadline = time.monotonic() + linger_s
        while time.monotonic() < deadline:
            try:
                if not sock.recv(4096):
                    break
            except TimeoutError:
                continue
    except OSError:
        pass
    finally:
        sock.close()
