"""The buffered, size-bounded frame reader, fed by a scripted socket: frames split at every
possible boundary, socket timeouts in the middle of a frame, oversized frames in the stream."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import websocket
from hypothesis import given, settings
from hypothesis import strategies as st
from websocket import ABNF

from collectors.connection import FrameTooLarge, _BoundedContinuation, _BoundedFrameBuffer


def server_frame(payload: bytes, opcode: int = ABNF.OPCODE_TEXT) -> bytes:
    frame = ABNF(1, 0, 0, 0, opcode, 0, payload)  # servers do not mask
    return bytes(frame.format())


class ScriptedSocket:
    """recv(n) returns the next scripted piece (at most n bytes); None means a timeout."""

    def __init__(self, pieces: list[bytes | None]) -> None:
        self._pieces: Iterator[bytes | None] = iter(pieces)
        self._pending = b""
        self.calls = 0

    def recv(self, n: int) -> bytes:
        self.calls += 1
        if not self._pending:
            piece = next(self._pieces, b"")
            if piece is None:
                raise websocket.WebSocketTimeoutException("timed out")
            if piece == b"":
                raise websocket.WebSocketConnectionClosedException("eof")
            self._pending = piece
        out, self._pending = self._pending[:n], self._pending[n:]
        return out


def read_until_eof(read: Callable[[], bytes]) -> tuple[list[bytes], int]:
    """Every payload `read` returns until EOF, retrying after timeouts; and how many were
    refused as too large."""
    out: list[bytes] = []
    too_large = 0
    while True:
        try:
            out.append(read())
        except websocket.WebSocketTimeoutException:
            continue
        except FrameTooLarge:
            too_large += 1
        except websocket.WebSocketConnectionClosedException:
            return out, too_large


def read_all(reader: _BoundedFrameBuffer) -> tuple[list[bytes], int]:
    """Every frame's payload, read by our reader alone."""
    return read_until_eof(lambda: bytes(reader.recv_frame().data))


@settings(max_examples=150, deadline=None)
@given(payloads=st.lists(st.binary(min_size=0, max_size=70_000), min_size=1, max_size=8),
       cuts=st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=40),
       timeouts=st.lists(st.booleans(), min_size=1, max_size=40))
def test_frames_survive_any_split_and_timeouts(payloads: list[bytes], cuts: list[int],
                                               timeouts: list[bool]) -> None:
    stream = b"".join(server_frame(p) for p in payloads)
    pieces: list[bytes | None] = []
    i = 0
    k = 0
    while i < len(stream):
        size = cuts[k % len(cuts)]
        pieces.append(stream[i:i + size])
        if timeouts[k % len(timeouts)]:
            pieces.append(None)
        i += size
        k += 1
    sock = ScriptedSocket(pieces)
    reader = _BoundedFrameBuffer(sock.recv, max_bytes=1 << 20)
    got, too_large = read_all(reader)
    assert got == payloads and too_large == 0


@settings(max_examples=100, deadline=None)
@given(sizes=st.lists(st.integers(min_value=0, max_value=3000), min_size=1, max_size=10),
       cut=st.integers(min_value=1, max_value=700))
def test_oversized_frames_are_skipped_and_the_stream_stays_in_sync(sizes: list[int],
                                                                   cut: int) -> None:
    limit = 1000
    payloads = [bytes([n % 251]) * n for n in sizes]
    stream = b"".join(server_frame(p) for p in payloads)
    pieces: list[bytes | None] = [stream[i:i + cut] for i in range(0, len(stream), cut)]
    pieces = [p for piece in pieces for p in (piece, None)]  # a timeout after every piece
    got, too_large = read_all(_BoundedFrameBuffer(ScriptedSocket(pieces).recv, limit))
    assert got == [p for p in payloads if len(p) <= limit]
    assert too_large == sum(1 for p in payloads if len(p) > limit)


def test_many_small_frames_need_few_socket_reads() -> None:
    stream = b"".join(server_frame(b'{"type":"heartbeat"}') for _ in range(1000))
    sock = ScriptedSocket([stream])
    got, _ = read_all(_BoundedFrameBuffer(sock.recv, 1 << 20))
    assert len(got) == 1000
    assert sock.calls < 10  # the library alone makes three reads per frame


def test_eof_in_the_middle_of_a_frame_is_a_closed_connection() -> None:
    frame = server_frame(b"x" * 100)
    reader = _BoundedFrameBuffer(ScriptedSocket([frame[:50]]).recv, 1 << 20)
    with pytest.raises(websocket.WebSocketConnectionClosedException):
        reader.recv_frame()


# ---- the fast path: complete data frames cut from the buffer without a socket read -------------

FRAME_KINDS = st.sampled_from(["text", "binary", "ping", "pong", "fragmented", "oversized"])


def _frames_of(kind: str, payload: bytes) -> tuple[bytes, list[bytes]]:
    """(wire bytes, payloads the reader must yield) for one item of the stream."""
    if kind == "text":
        return server_frame(payload), [payload]
    if kind == "binary":
        return server_frame(payload, ABNF.OPCODE_BINARY), [payload]
    if kind in ("ping", "pong"):
        opcode = ABNF.OPCODE_PING if kind == "ping" else ABNF.OPCODE_PONG
        return server_frame(payload[:125], opcode), [payload[:125]]
    if kind == "fragmented":  # TEXT without FIN, then CONT with FIN: two frames, never fast
        half = len(payload) // 2
        first = bytes(ABNF(0, 0, 0, 0, ABNF.OPCODE_TEXT, 0, payload[:half]).format())
        last = bytes(ABNF(1, 0, 0, 0, ABNF.OPCODE_CONT, 0, payload[half:]).format())
        return first + last, [payload[:half], payload[half:]]
    big = payload + b"x" * 2000  # above the 1000-byte limit below
    return server_frame(big), []


@settings(max_examples=200, deadline=None)
@given(items=st.lists(st.tuples(FRAME_KINDS, st.binary(max_size=300)), min_size=1,
                      max_size=25),
       cuts=st.lists(st.integers(min_value=1, max_value=900), min_size=1, max_size=20),
       limits=st.lists(st.integers(min_value=0, max_value=5), min_size=1, max_size=10))
def test_fast_path_yields_exactly_what_the_general_reader_does(
        items: list[tuple[str, bytes]], cuts: list[int], limits: list[int]) -> None:
    stream = b""
    expected: list[bytes] = []
    for kind, payload in items:
        wire, payloads = _frames_of(kind, payload)
        stream += wire
        expected += payloads
    pieces: list[bytes | None] = []
    i = k = 0
    while i < len(stream):
        pieces += [stream[i:i + cuts[k % len(cuts)]], None]
        i += cuts[k % len(cuts)]
        k += 1
    reader = _BoundedFrameBuffer(ScriptedSocket(pieces).recv, max_bytes=1000)
    got: list[bytes] = []
    turn = 0
    while True:
        try:
            got.append(bytes(reader.recv_frame().data))
        except websocket.WebSocketTimeoutException:
            pass
        except FrameTooLarge:
            pass
        except websocket.WebSocketConnectionClosedException:
            break
        fast = reader.pop_data_frames(limits[turn % len(limits)])
        assert len(fast) <= limits[turn % len(limits)]
        got += fast
        turn += 1
    assert got == expected


def test_fast_path_takes_a_burst_in_one_call_and_leaves_the_rest() -> None:
    frames = [server_frame(b'{"n":%d}' % n) for n in range(50)]
    partial = server_frame(b"y" * 300)[:100]
    reader = _BoundedFrameBuffer(ScriptedSocket([b"".join(frames) + partial]).recv, 1 << 20)
    assert bytes(reader.recv_frame().data) == b'{"n":0}'
    assert reader.pop_data_frames(1000) == [b'{"n":%d}' % n for n in range(1, 50)]
    assert reader.pop_data_frames(1000) == []  # the cut frame is the general reader's


def test_fast_path_leaves_frames_with_rsv_bits_to_the_validating_reader() -> None:
    bad = bytes(ABNF(1, 1, 0, 0, ABNF.OPCODE_TEXT, 0, b"compressed?").format())
    reader = _BoundedFrameBuffer(ScriptedSocket([server_frame(b"ok") + bad]).recv, 1 << 20)
    assert bytes(reader.recv_frame().data) == b"ok"
    assert reader.pop_data_frames(10) == []
    with pytest.raises(websocket.WebSocketProtocolException):
        reader.recv_frame()


def fragment(payload: bytes, *, first: bool, fin: bool) -> bytes:
    opcode = ABNF.OPCODE_TEXT if first else ABNF.OPCODE_CONT
    return bytes(ABNF(1 if fin else 0, 0, 0, 0, opcode, 0, payload).format())


def read_messages(pieces: list[bytes | None], limit: int) -> tuple[list[bytes], int]:
    """Every message websocket-client assembles from these pieces, with our bounded reader
    and continuation, until EOF (timeouts retried); and how many were refused as too large."""
    sock = ScriptedSocket(pieces)
    ws = websocket.WebSocket(skip_utf8_validation=True)
    ws.frame_buffer = _BoundedFrameBuffer(sock.recv, limit)
    ws.cont_frame = _BoundedContinuation(limit, ws.frame_buffer)
    return read_until_eof(lambda: bytes(ws.recv_data_frame(True)[1].data))


@pytest.mark.parametrize("cut", [1, 7, 100, 1 << 20])
@pytest.mark.parametrize("with_timeouts", [False, True])
def test_an_oversized_fragmented_message_is_dropped_and_the_next_ones_read(
        cut: int, with_timeouts: bool) -> None:
    big = b"x" * 2000
    stream = b"".join([
        server_frame(b"a"),
        # outgrows the limit fragment by fragment (600 + 600 + 600 > 1000)
        fragment(b"y" * 600, first=True, fin=False), fragment(b"y" * 600, first=False, fin=False),
        fragment(b"y" * 600, first=False, fin=True),
        server_frame(b"b"),
        # its first fragment alone is too large
        fragment(big, first=True, fin=False), fragment(b"z" * 10, first=False, fin=False),
        fragment(b"z" * 10, first=False, fin=True),
        server_frame(b"c"),
        fragment(b"d1", first=True, fin=False), fragment(b"d2", first=False, fin=True),
        # a middle fragment is too large
        fragment(b"e1", first=True, fin=False), fragment(big, first=False, fin=False),
        fragment(b"e3", first=False, fin=True),
        server_frame(b"f"),
        # the refused message's last fragment is empty
        fragment(big, first=True, fin=False), fragment(b"", first=False, fin=True),
        fragment(b"g1", first=True, fin=False), fragment(b"g2", first=False, fin=True),
    ])
    pieces: list[bytes | None] = []
    for i in range(0, len(stream), cut):
        pieces.append(stream[i:i + cut])
        if with_timeouts:
            pieces.append(None)
    messages, too_large = read_messages(pieces, limit=1000)
    assert messages == [b"a", b"b", b"c", b"d1d2", b"f", b"g1g2"]
    assert too_large == 4
