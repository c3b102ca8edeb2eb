"""The WebSocket loop against a raw-socket server on 127.0.0.1 that misbehaves in ways the
simulator cannot: bytes trickled inside a frame or a handshake, endless fragments, frames that
break RFC 6455, a parser that never takes frames, connections that fail after data was seen."""

from __future__ import annotations

import base64
import hashlib
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import pytest
from websocket import ABNF

from collectors.backoff import Backoff
from collectors.batching import Handoff
from collectors.connection import Frame
from collectors.exchanges.binance import BinanceAdapter
from tests.unit.test_connection import running
from tests.unit.test_frame_buffer import server_frame

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
HEARTBEAT = b'{"type":"heartbeat","product_id":"BTC-USD","sequence":1}'


class Peer:
    """One accepted connection, handed to the scenario; `received` is what the client sent."""

    def __init__(self, sock: socket.socket, number: int, stop: threading.Event) -> None:
        self.sock, self.number, self.stop = sock, number, stop
        self.received = bytearray()
        self._reader: threading.Thread | None = None

    def read_request(self) -> bytes | None:
        """The upgrade request's Sec-WebSocket-Accept answer (None: the client went away)."""
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(4096)
            if not chunk:
                return None
            data += chunk
        key = next(line.split(b":", 1)[1].strip() for line in data.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key"))
        return base64.b64encode(hashlib.sha1(key + GUID).digest())

    def accept(self) -> None:
        answer = self.read_request()
        if answer is None:  # the client went away first (a test ending while it reconnects):
            raise ConnectionAbortedError("the client closed before its upgrade request")
        self.sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                          b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + answer + b"\r\n\r\n")
        self._reader = threading.Thread(target=self._read, daemon=True, name="peer-reader")
        self._reader.start()

    @property
    def reading(self) -> bool:
        """Whether the client still holds its end (the reader has not seen the end yet)."""
        return self._reader is not None and self._reader.is_alive()

    def _read(self) -> None:
        with suppress(OSError):
            while chunk := self.sock.recv(65536):
                self.received += chunk

    def client_frames(self) -> list[tuple[int, bytes]]:
        """(opcode, unmasked payload) of each whole frame the client sent."""
        data, out, i = bytes(self.received), [], 0
        while i + 2 <= len(data):
            opcode, n, j = data[i] & 0xF, data[i + 1] & 0x7F, i + 2
            if n == 126:
                n, j = struct.unpack("!H", data[j:j + 2])[0], j + 2
            elif n == 127:
                n, j = struct.unpack("!Q", data[j:j + 8])[0], j + 8
            key, j = data[j:j + 4], j + 4
            if j + n > len(data):
                break
            out.append((opcode, bytes(b ^ key[x % 4] for x, b in enumerate(data[j:j + n]))))
            i = j + n
        return out

    def trickle(self, data: bytes, every_s: float) -> None:
        """Write `data` a byte at a time until stopped (the server's pace, not a test sync)."""
        for byte in data:
            if self.stop.wait(every_s):
                return
            self.sock.sendall(bytes([byte]))


class RawServer:
    def __init__(self, scenario: Callable[[Peer], None]) -> None:
        self._scenario = scenario
        self.stop = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"ws://127.0.0.1:{self.listener.getsockname()[1]}"
        self.peers: list[Peer] = []
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True, name="raw-server")
        self._accepter.start()

    @property
    def connections(self) -> int:
        return len(self.peers)

    def _accept(self) -> None:
        with suppress(OSError):
            while not self.stop.is_set():
                sock, _ = self.listener.accept()
                peer = Peer(sock, len(self.peers) + 1, self.stop)
                self.peers.append(peer)
                thread = threading.Thread(target=self._run, args=(peer,), daemon=True,
                                          name=f"raw-peer-{peer.number}")
                self._threads.append(thread)
                thread.start()

    def _run(self, peer: Peer) -> None:
        with suppress(OSError):
            self._scenario(peer)
            self.stop.wait()

    def close(self) -> None:
        self.stop.set()
        with suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for peer in self.peers:
            with suppress(OSError):
                peer.sock.shutdown(socket.SHUT_RDWR)
            peer.sock.close()
        self._accepter.join(2)
        for thread in self._threads:
            thread.join(2)


@contextmanager
def raw_server(scenario: Callable[[Peer], None]) -> Iterator[RawServer]:
    server = RawServer(scenario)
    try:
        yield server
    finally:
        server.close()


def wait_for(predicate: Callable[[], bool], timeout_s: float) -> bool:
    """Poll state owned by other threads (a server's counters, metrics) with a deadline."""
    deadline = time.monotonic() + timeout_s
    stop = threading.Event()
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        stop.wait(0.02)
    return True


FAST = {"backoff": Backoff(base_s=0.01, cap_s=0.05), "recv_timeout_s": 0.2}


# ---- 1: the loop turns whatever the bytes do -------------------------------------------------

def test_a_frame_trickled_byte_by_byte_does_not_stop_the_loop() -> None:
    def scenario(peer: Peer) -> None:
        peer.accept()
        peer.sock.sendall(server_frame(HEARTBEAT))
        header = bytes([0x81, 127]) + struct.pack("!Q", 100_000)
        peer.sock.sendall(header)
        peer.trickle(b"x" * 100_000, 0.02)  # never a quiet socket, never a whole frame

    with raw_server(scenario) as server, running(server.url, liveness_timeout_s=1.0,
                                                 **FAST) as h:  # type: ignore[arg-type]
        # Liveness still works: no frame completes, so the connection is replaced ...
        assert wait_for(lambda: h.value("chrono_collector_reconnects_total",
                                        reason="liveness_timeout") >= 1, 6)
        # ... and a request from another thread is seen during the trickle.
        assert wait_for(lambda: server.connections >= 2, 5)
        h.conn.request_reconnect("operator_request")
        assert wait_for(lambda: h.value("chrono_collector_reconnects_total",
                                        reason="operator_request") >= 1, 3)
        assert time.monotonic() - h.conn.beat < 1.0


def test_a_message_fragmented_without_end_is_a_dead_connection() -> None:
    def scenario(peer: Peer) -> None:
        peer.accept()
        peer.sock.sendall(server_frame(HEARTBEAT))
        peer.sock.sendall(bytes(ABNF(0, 0, 0, 0, ABNF.OPCODE_TEXT, 0, b'{"type":').format()))
        empty_cont = bytes(ABNF(0, 0, 0, 0, ABNF.OPCODE_CONT, 0, b"").format())
        while not peer.stop.wait(0.02):
            peer.sock.sendall(empty_cont)

    with raw_server(scenario) as server, running(server.url, liveness_timeout_s=1.0,
                                                 **FAST) as h:  # type: ignore[arg-type]
        assert wait_for(lambda: h.value("chrono_collector_reconnects_total",
                                        reason="liveness_timeout") >= 1, 6)
        assert server.connections >= 1


def test_a_refused_message_whose_fragments_never_end_is_a_dead_connection() -> None:
    # Its first fragment is over the size limit, then small continuation frames keep coming
    # with pongs between them: the drain of the refused message's rest kept one read call for
    # good (no stop, no liveness), and the pongs alone looked like a live stream.
    def scenario(peer: Peer) -> None:
        peer.accept()
        peer.sock.sendall(server_frame(HEARTBEAT))
        peer.sock.sendall(bytes(ABNF(0, 0, 0, 0, ABNF.OPCODE_TEXT, 0, b"x" * 5000).format()))
        cont = bytes(ABNF(0, 0, 0, 0, ABNF.OPCODE_CONT, 0, b"abc").format())
        pong = server_frame(b"", ABNF.OPCODE_PONG)
        while not peer.stop.wait(0.02):
            peer.sock.sendall(cont + pong)

    with raw_server(scenario) as server, running(server.url, liveness_timeout_s=1.0,
                                                 max_frame_bytes=1000,
                                                 **FAST) as h:  # type: ignore[arg-type]
        assert wait_for(lambda: h.value("chrono_collector_reconnects_total",
                                        reason="liveness_timeout") >= 1, 6)
        assert wait_for(lambda: server.connections >= 2, 5)
        assert h.value("chrono_collector_oversized_frames_total") >= 1
        assert time.monotonic() - h.conn.beat < 1.0


def test_the_retiring_socket_is_closed_once_the_venue_closes_it() -> None:
    # A handover (Binance's serverShutdown) where the venue closes the old connection first:
    # our answer to its Close marked the connection closed, so websocket-client's close()
    # returned at once and left the socket open (the venue saw no end of stream) until the
    # garbage collector happened to free it.
    from tests.unit.test_connection_reconnects import SHUTDOWN, ticker
    eof = threading.Event()
    successor = threading.Event()
    answer_close: list[tuple[int, bytes]] = []

    def scenario(peer: Peer) -> None:
        if peer.number > 1:  # the successor
            peer.accept()
            successor.set()
            while not peer.stop.wait(0.05):
                peer.sock.sendall(server_frame(ticker()))
            return
        answer = peer.read_request()
        assert answer is not None
        peer.sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                          b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + answer
                          + b"\r\n\r\n")
        peer.sock.sendall(server_frame(ticker()) + server_frame(SHUTDOWN))
        if not successor.wait(5):
            return
        peer.sock.sendall(server_frame((1001).to_bytes(2, "big"), ABNF.OPCODE_CLOSE))
        peer.sock.settimeout(5)
        with suppress(OSError):
            while chunk := peer.sock.recv(4096):
                peer.received += chunk
            eof.set()
        answer_close.extend(peer.client_frames())

    with raw_server(scenario) as server, running(
            server.url, BinanceAdapter("w"), symbols=["BTC/USDT"],
            **FAST) as h, h.parsing():  # type: ignore[arg-type]
        assert successor.wait(5)
        assert eof.wait(3), "the retiring connection's socket stayed open"
        assert answer_close and answer_close[-1][0] == ABNF.OPCODE_CLOSE  # answered, closed
        assert h.value("chrono_collector_reconnects_total", reason="server_shutdown") == 1


def test_a_length_with_its_top_bit_set_closes_with_1002_and_reconnects() -> None:
    def scenario(peer: Peer) -> None:
        peer.accept()
        peer.sock.sendall(server_frame(HEARTBEAT))
        peer.sock.sendall(bytes([0x81, 127]) + struct.pack("!Q", 1 << 63 | 5))
        peer.sock.sendall(b"".join(server_frame(HEARTBEAT) for _ in range(60)))

    with raw_server(scenario) as server, running(server.url, **FAST) as h:  # type: ignore[arg-type]
        assert wait_for(lambda: h.value("chrono_collector_reconnects_total",
                                        reason="protocol_error") >= 1, 5)
        first = server.peers[0]
        assert wait_for(lambda: any(op == ABNF.OPCODE_CLOSE for op, _ in first.client_frames()),
                        3)
        [close] = [p for op, p in first.client_frames() if op == ABNF.OPCODE_CLOSE]
        assert close[:2] == struct.pack("!H", 1002)
        # The frames after the broken header were not taken for data.
        h.got.extend(h.frames.get_all(0))
        assert len(h.got) <= server.connections


def test_a_masked_server_frame_is_refused() -> None:
    def scenario(peer: Peer) -> None:
        peer.accept()
        peer.sock.sendall(bytes(ABNF(1, 0, 0, 0, ABNF.OPCODE_TEXT, 1, HEARTBEAT).format()))

    with raw_server(scenario) as server, running(server.url, **FAST) as h:  # type: ignore[arg-type]
        assert wait_for(lambda: h.value("chrono_collector_reconnects_total",
                                        reason="protocol_error") >= 1, 5)
        assert h.frames.get_all(0) == []
        assert server.connections >= 1


# ---- 2: opening a connection is bounded as a whole, and stop interrupts it -------------------

def trickled_handshake(peer: Peer) -> None:
    peer.read_request()
    peer.sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nX-Pad: ")
    peer.trickle(b"a" * 100_000, 0.05)


def streamed_error_body(peer: Peer) -> None:
    peer.read_request()
    peer.sock.sendall(b"HTTP/1.1 503 Busy\r\nContent-Length: 1000000000\r\n\r\n")
    chunk = b"x" * 65536
    while not peer.stop.is_set():
        peer.sock.sendall(chunk)


def test_a_trickled_handshake_times_out_as_a_whole() -> None:
    for scenario in (trickled_handshake, streamed_error_body):
        with raw_server(scenario) as server, running(
                server.url, connect_timeout_s=0.5, **FAST) as h:  # type: ignore[arg-type]
            assert wait_for(lambda: h.value("chrono_collector_reconnects_total",
                                            reason="connect_failed") >= 2, 6), scenario
            assert server.connections >= 2


def test_stop_interrupts_a_handshake_in_progress() -> None:
    with raw_server(trickled_handshake) as server:
        with running(server.url, connect_timeout_s=60.0, **FAST):  # type: ignore[arg-type]
            assert wait_for(lambda: server.connections == 1, 5)
            started = time.monotonic()
        # `running` joined the thread: abort() shut the handshake's socket down.
        assert time.monotonic() - started < 3


@contextmanager
def unanswered_port() -> Iterator[int]:
    """A port on 127.0.0.1 whose listener never accepts and whose backlog is full: the kernel
    drops further SYNs, so a connect to it waits (as for a firewall that drops them)."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):  # more than the backlog holds (it admits backlog + 1)
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        probe = socket.socket()
        probe.settimeout(0.3)
        with probe, suppress(OSError):
            probe.connect(("127.0.0.1", port))
            raise AssertionError("the backlog did not fill: a connect was answered")
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def test_stop_interrupts_a_tcp_connect_the_peer_never_answers() -> None:
    with unanswered_port() as port:
        with running(f"ws://127.0.0.1:{port}", connect_timeout_s=60.0,
                     **FAST) as h:  # type: ignore[arg-type]
            assert wait_for(lambda: h.value("chrono_collector_connect_attempts_total") >= 1, 5)
            started = time.monotonic()
        # `running` joined the thread: abort() shut the connecting socket down.
        assert time.monotonic() - started < 3
        assert h.value("chrono_collector_reconnects_total", reason="connect_failed") == 0


def test_a_tcp_connect_the_peer_never_answers_times_out() -> None:
    with unanswered_port() as port, running(f"ws://127.0.0.1:{port}", connect_timeout_s=0.3,
                                            **FAST) as h:  # type: ignore[arg-type]
        assert wait_for(lambda: h.value("chrono_collector_reconnects_total",
                                        reason="connect_failed") >= 2, 5)


def test_an_address_that_never_answers_leaves_time_for_the_next(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A venue's name resolves to two addresses, the first unreachable (a broken IPv6 route is
    # listed first): each address was given the whole connect timeout, which is also the
    # handshake's as a whole, so the next address was never tried and no attempt connected.
    # (Name resolution is the one part faked: both addresses are 127.0.0.1, on two ports.)
    def scenario(peer: Peer) -> None:
        peer.accept()
        peer.sock.sendall(server_frame(HEARTBEAT))

    real_getaddrinfo = socket.getaddrinfo
    with unanswered_port() as hole, raw_server(scenario) as server:
        live = int(server.url.rsplit(":", 1)[1])

        def two_addresses(host: str, port: int, *args: Any, **kw: Any) -> Any:
            if host != "venue.test":
                return real_getaddrinfo(host, port, *args, **kw)
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", hole)),
                    (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", live))]

        monkeypatch.setattr(socket, "getaddrinfo", two_addresses)
        with running(f"ws://venue.test:{live}", connect_timeout_s=5.0,
                     **FAST) as h:  # type: ignore[arg-type]
            # (the first address has 2.5 s of the 5, the second what is left)
            assert wait_for(lambda: h.value("chrono_collector_connected") == 1, 8)
            assert h.value("chrono_collector_reconnects_total", reason="connect_failed") == 0
            assert server.connections == 1


# ---- 3: a stuck parser costs frames, not the connection --------------------------------------

def test_with_a_stuck_parser_pings_are_still_answered_promptly() -> None:
    pinged = threading.Event()

    def scenario(peer: Peer) -> None:
        peer.accept()
        burst = b"".join(server_frame(b'{"type":"ticker","i":%d}' % i) for i in range(30_000))
        peer.sock.sendall(burst)  # the parser takes none of it
        peer.sock.sendall(server_frame(b"are-you-there", ABNF.OPCODE_PING))
        pinged.set()

    frames: Handoff[Frame] = Handoff(10)
    with raw_server(scenario) as server, running(server.url, frames=frames,
                                                 frame_queue_wait_s=0.5, liveness_timeout_s=60,
                                                 **FAST) as h:  # type: ignore[arg-type]
        assert pinged.wait(10)
        peer = server.peers[0]
        # One 0.5 s wait for the whole stall, not one per loop turn (30 turns: 15 s).
        assert wait_for(lambda: (ABNF.OPCODE_PONG, b"are-you-there") in peer.client_frames(),
                        4)
        assert h.value("chrono_collector_frames_dropped_total") >= 29_000
        assert server.connections == 1


# ---- 5: only the current connection's data resets the backoff --------------------------------

def test_data_from_an_earlier_connection_does_not_reset_the_backoff() -> None:
    def scenario(peer: Peer) -> None:
        if peer.number == 1:
            peer.accept()
            peer.sock.sendall(b"".join(server_frame(HEARTBEAT) for _ in range(50)))
            peer.sock.shutdown(socket.SHUT_RDWR)
            return
        peer.read_request()  # later ones: the upgrade is never answered
        peer.stop.wait()

    frames: Handoff[Frame] = Handoff(1000)
    backoff = Backoff(base_s=0.01, cap_s=0.02)
    with raw_server(scenario) as server, running(server.url, frames=frames, backoff=backoff,
                                                 connect_timeout_s=0.2) as h:
        parser_stop = threading.Event()

        def parser() -> None:  # as Parser does: data_seen() after each batch with data
            while not parser_stop.is_set():
                if h.frames.get_all(0.01, max_items=1):
                    h.conn.data_seen()
                elif server.connections >= 2:
                    h.conn.data_seen()  # late news about the first connection's frames

        assert wait_for(lambda: h.value("chrono_collector_reconnects_total") >= 1, 5)
        thread = threading.Thread(target=parser, name="parser")
        thread.start()
        try:
            assert wait_for(lambda: backoff.attempt >= 4, 8), backoff.attempt
        finally:
            parser_stop.set()
            thread.join(2)


def test_data_seen_with_a_session_counts_only_for_the_current_one() -> None:
    def scenario(peer: Peer) -> None:
        peer.accept()
        while not peer.stop.wait(0.05):
            peer.sock.sendall(server_frame(HEARTBEAT))

    with raw_server(scenario) as server, running(server.url, **FAST) as h:  # type: ignore[arg-type]
        assert h.wait_frames(1)
        session = h.conn.session
        assert session >= 1 and server.connections == 1
        h.conn.data_seen(session - 1)
        assert not h.conn._data_seen
        h.conn.data_seen(session)
        assert h.conn._data_seen




# ---- a flood of oversized frames: every one counted, one log line -----------------------------

def test_a_flood_of_oversized_frames_logs_one_line_and_counts_every_frame(
        caplog: pytest.LogCaptureFixture) -> None:
    flood = 300  # a venue sending nothing but frames over the limit (seen: 2,078 lines in 3 s)

    def scenario(peer: Peer) -> None:
        peer.accept()
        peer.sock.sendall(server_frame(b"z" * 1001) * flood + server_frame(HEARTBEAT))

    with caplog.at_level(logging.INFO, logger="collectors.connection"), \
            raw_server(scenario) as server, \
            running(server.url, max_frame_bytes=1000, **FAST) as h:  # type: ignore[arg-type]
        assert h.wait_messages(lambda ms: any(m.get("type") == "heartbeat" for m in ms))
        assert h.value("chrono_collector_oversized_frames_total") == flood
        assert server.connections == 1
    [line] = [r for r in caplog.records if r.getMessage() == "frame_too_large"]
    assert line.since_last_log == 0  # type: ignore[attr-defined]
    assert "1001 bytes" in line.error  # type: ignore[attr-defined]
