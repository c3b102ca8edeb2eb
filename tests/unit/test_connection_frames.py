"""The frame reader's time budget, RFC 6455 header checks and per-frame message assembly, fed by
a scripted socket (no network, no clock: a budget of 0 s allows one socket read per call)."""

from __future__ import annotations

import struct
import time
from typing import Any

import pytest
import websocket
from websocket import ABNF

from collectors.connection import (
    FrameTooLarge,
    _BoundedContinuation,
    _BoundedFrameBuffer,
    _recv_step,
)
from collectors.logsetup import LogSampler
from tests.unit.test_frame_buffer import ScriptedSocket, fragment, server_frame


def frame_bytes(payload: bytes, opcode: int = ABNF.OPCODE_TEXT, *, fin: bool = True,
                mask: bool = False) -> bytes:
    return bytes(ABNF(1 if fin else 0, 0, 0, 0, opcode, 1 if mask else 0, payload).format())


def test_a_trickled_frame_gives_the_caller_a_turn_per_budget_and_then_completes() -> None:
    payload = b"x" * 300
    wire = server_frame(payload)
    # One byte per read and never a socket timeout: the way a venue (or an attacker) trickles.
    reader = _BoundedFrameBuffer(ScriptedSocket([wire[i:i + 1] for i in range(len(wire))]).recv,
                                 1 << 20, budget_s=0.0)
    turns = 0
    while True:
        try:
            frame = reader.recv_frame()
            break
        except websocket.WebSocketTimeoutException:
            turns += 1
    assert bytes(frame.data) == payload
    assert turns >= len(payload) - 10  # the caller got a turn about once per read


def test_a_trickled_oversized_frame_is_drained_in_turns_and_the_next_frame_read() -> None:
    wire = server_frame(b"z" * 5000) + server_frame(b"next")
    reader = _BoundedFrameBuffer(
        ScriptedSocket([wire[i:i + 100] for i in range(0, len(wire), 100)]).recv, 1000,
        budget_s=0.0)
    turns = too_large = 0
    while True:
        try:
            frame = reader.recv_frame()
            break
        except websocket.WebSocketTimeoutException:
            turns += 1
        except FrameTooLarge:
            too_large += 1
    assert bytes(frame.data) == b"next" and too_large == 1
    assert turns >= 40


@pytest.mark.parametrize("wire", [
    pytest.param(bytes([0x81, 127]) + struct.pack("!Q", 1 << 63 | 5) + b"hello", id="len_msb"),
    pytest.param(frame_bytes(b'{"type":"heartbeat"}', mask=True), id="masked_text"),
    pytest.param(frame_bytes(b"p" * 126, ABNF.OPCODE_PING), id="ping_126_bytes"),
    pytest.param(frame_bytes(b"p" * 200, ABNF.OPCODE_PONG), id="pong_200_bytes"),
    pytest.param(frame_bytes(b"\x03\xe8", ABNF.OPCODE_CLOSE, fin=False), id="close_not_fin"),
    pytest.param(frame_bytes(b"\x03\xe8" + b"r" * 5000, ABNF.OPCODE_CLOSE), id="close_5000"),
    pytest.param(bytes([0x83, 2]) + b"hi", id="reserved_opcode"),
])
def test_frames_that_break_rfc_6455_are_protocol_errors(wire: bytes) -> None:
    # The size cap (1000) must not turn an oversized control frame into a skipped frame.
    reader = _BoundedFrameBuffer(ScriptedSocket([server_frame(b"ok") + wire
                                                 + server_frame(b"after")]).recv, 1000)
    assert bytes(reader.recv_frame().data) == b"ok"
    with pytest.raises(websocket.WebSocketProtocolException):
        reader.recv_frame()


def test_a_ping_of_125_bytes_is_fine() -> None:
    reader = _BoundedFrameBuffer(
        ScriptedSocket([frame_bytes(b"p" * 125, ABNF.OPCODE_PING)]).recv, 1000)
    assert bytes(reader.recv_frame().data) == b"p" * 125


def scripted_ws(pieces: list[bytes | None], limit: int = 1 << 20,
                **cont_kw: Any) -> websocket.WebSocket:
    ws = websocket.WebSocket(skip_utf8_validation=True)
    ws.frame_buffer = _BoundedFrameBuffer(ScriptedSocket(pieces).recv, limit)
    ws.cont_frame = _BoundedContinuation(limit, ws.frame_buffer, **cont_kw)
    return ws


def test_each_fragment_is_a_turn_of_the_loop() -> None:
    # A message that never ends: the reader returns after every fragment, never loops inside.
    wire = fragment(b'{"type":', first=True, fin=False) + b"".join(
        fragment(b"", first=False, fin=False) for _ in range(50))
    ws = scripted_ws([wire, None])
    cont = ws.cont_frame
    assert isinstance(cont, _BoundedContinuation)
    steps = []
    while True:
        try:
            steps.append(_recv_step(ws))
        except websocket.WebSocketTimeoutException:
            break
    assert steps == [None] * 51
    assert cont.started is not None  # what the loop's deadline for the message looks at


def test_messages_and_control_frames_between_fragments_come_out_per_frame() -> None:
    wire = (fragment(b'{"a":', first=True, fin=False) + server_frame(b"hb", ABNF.OPCODE_PONG)
            + fragment(b"1}", first=False, fin=True) + server_frame(b"whole"))
    ws = scripted_ws([wire])
    out = []
    while True:
        try:
            step = _recv_step(ws)
        except websocket.WebSocketConnectionClosedException:
            break
        out.append(None if step is None else (step[0], bytes(step[1].data)))
    assert out == [None, (ABNF.OPCODE_PONG, b"hb"), (ABNF.OPCODE_TEXT, b'{"a":1}'),
                   (ABNF.OPCODE_TEXT, b"whole")]
    assert isinstance(ws.cont_frame, _BoundedContinuation) and ws.cont_frame.started is None


def test_a_continuation_without_a_start_is_a_protocol_error() -> None:
    ws = scripted_ws([fragment(b"x", first=False, fin=True)])
    with pytest.raises(websocket.WebSocketProtocolException):
        _recv_step(ws)


def read_steps(ws: websocket.WebSocket) -> tuple[list[bytes], int]:
    messages: list[bytes] = []
    too_large = 0
    while True:
        try:
            step = _recv_step(ws)
        except FrameTooLarge:
            too_large += 1
            continue
        except websocket.WebSocketConnectionClosedException:
            return messages, too_large
        if step is not None:
            messages.append(bytes(step[1].data))


def test_a_message_of_too_many_fragments_is_refused_and_the_next_one_read() -> None:
    many = [fragment(b"a", first=True, fin=False)]
    many += [fragment(b"a", first=False, fin=False) for _ in range(30)]
    many += [fragment(b"a", first=False, fin=True)]
    wire = b"".join(many) + fragment(b"b1", first=True, fin=False) + fragment(
        b"b2", first=False, fin=True) + server_frame(b"c")
    messages, too_large = read_steps(scripted_ws([wire], max_fragments=10))
    assert messages == [b"b1b2", b"c"] and too_large == 1


def test_assembling_many_fragments_is_linear() -> None:
    # 40,000 fragments of 100 bytes: the library's `bytes +=` copies ~80 GB for this.
    n = 40_000
    wire = b"".join([fragment(b"a" * 100, first=True, fin=False),
                     *(fragment(b"a" * 100, first=False, fin=False) for _ in range(n - 2)),
                     fragment(b"a" * 100, first=False, fin=True)])
    started = time.monotonic()
    messages, too_large = read_steps(scripted_ws([wire], limit=8 << 20, max_fragments=n))
    assert time.monotonic() - started < 5
    assert too_large == 0 and messages == [b"a" * 100 * n]


def test_a_sampled_line_is_logged_once_per_interval_with_the_count_not_logged() -> None:
    sample = LogSampler(interval_s=10.0)
    line = "frame_too_large"
    assert sample.admit(line, 100.0) == 0  # the first is logged
    assert [sample.admit(line, 100.0 + t) for t in (0.1, 1.0, 9.9)] == [None, None, None]
    assert sample.admit(line, 110.0) == 3  # the next one says how many were not logged
    assert sample.admit(line, 115.0) is None
    assert sample.admit(line, 200.0) == 1
    assert sample.admit(line, 300.0) == 0


def test_a_refused_message_whose_fragments_never_end_gives_the_loop_its_turns() -> None:
    # The first fragment is over the limit, then small continuation frames keep coming, all in
    # one read's worth of bytes (never a socket timeout, each frame quick to read): draining
    # them kept one call for good, with the loop's stop, pings and liveness check waiting.
    tail = b"".join(fragment(b"abc", first=False, fin=False) for _ in range(5000))
    ws = scripted_ws([fragment(b"x" * 2000, first=True, fin=False) + tail], limit=1000)
    buffer = ws.frame_buffer
    assert isinstance(buffer, _BoundedFrameBuffer)
    buffer.budget_s = 0.0
    with pytest.raises(FrameTooLarge):
        _recv_step(ws)
    assert buffer.skipping_since is not None  # what the loop's liveness check looks at
    turns = 0
    with pytest.raises(websocket.WebSocketConnectionClosedException):  # the script's end
        while True:
            try:
                _recv_step(ws)
            except websocket.WebSocketTimeoutException:
                turns += 1
    assert turns >= 4000  # about a turn per fragment with a budget of 0 s


def test_the_skip_ends_with_the_refused_message() -> None:
    wire = (fragment(b"x" * 2000, first=True, fin=False) + fragment(b"a", first=False, fin=False)
            + fragment(b"b", first=False, fin=True) + server_frame(b"next"))
    ws = scripted_ws([wire], limit=1000)
    buffer = ws.frame_buffer
    assert isinstance(buffer, _BoundedFrameBuffer)
    with pytest.raises(FrameTooLarge):
        _recv_step(ws)
    step = _recv_step(ws)
    assert step is not None and bytes(step[1].data) == b"next"
    assert buffer.skipping_since is None and not buffer.skip_fragments


@pytest.mark.parametrize("opcode", [ABNF.OPCODE_PING, ABNF.OPCODE_CLOSE])
def test_an_answer_that_cannot_be_sent_in_time_ends_the_connection(opcode: int) -> None:
    # A send that timed out may have written part of the pong (the peer stopped reading): it
    # read as a quiet socket, and the loop went on writing after the partial frame.
    ws = scripted_ws([server_frame(b"\x03\xe8" if opcode == ABNF.OPCODE_CLOSE else b"hi",
                                   opcode)])
    ws.connected = True

    def send_timed_out(*args: object, **kw: object) -> None:
        raise websocket.WebSocketTimeoutException("timed out")

    ws.send = send_timed_out  # type: ignore[method-assign]
    with pytest.raises(websocket.WebSocketConnectionClosedException, match="not sent"):
        _recv_step(ws)
