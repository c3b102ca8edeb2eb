"""RFC 6455 server: the sans-I/O codec and handshake (with property tests), then the threaded
server against websocket-client and raw sockets on 127.0.0.1."""

from __future__ import annotations

import base64
import os
import socket
import struct
import threading
from collections.abc import Iterator

import pytest
import websocket
from hypothesis import given, settings
from hypothesis import strategies as st

from collectors.simulator.wsserver import (
    CloseCode,
    Connection,
    FrameParser,
    HandshakeError,
    HandshakeRequest,
    Message,
    Opcode,
    ProtocolViolation,
    Rejection,
    ServerOptions,
    WebSocketServer,
    accept_key,
    encode_close_payload,
    encode_frame,
    error_response,
    parse_close_payload,
    parse_handshake,
)
from tests.unit.test_simulator_support import client

MASK = b"\x01\x02\x03\x04"


def parser(max_bytes: int = 1 << 20) -> FrameParser:
    return FrameParser(max_frame_bytes=max_bytes, max_message_bytes=max_bytes)


def drain(p: FrameParser) -> list[Message]:
    out = []
    while (m := p.next_message()) is not None:
        out.append(m)
    return out


def client_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    return encode_frame(opcode, payload, fin=fin, mask=MASK)


# ----------------------------------------------------------------------------- handshake


def request_head(**overrides: str | None) -> bytes:
    headers = {"Host": "127.0.0.1:1", "Upgrade": "websocket", "Connection": "keep-alive, Upgrade",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13"}
    line = overrides.pop("request_line", None) or "GET /stream?streams=a@ticker/b@ticker HTTP/1.1"
    for name, value in overrides.items():
        if value is None:
            headers.pop(name, None)
        else:
            headers[name] = value
    return "\r\n".join([line, *(f"{k}: {v}" for k, v in headers.items())]).encode()


def test_accept_key_matches_rfc6455_example() -> None:
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_parse_handshake_exposes_path_and_query() -> None:
    request = parse_handshake(request_head())
    assert request.path == "/stream"
    assert request.query_value("streams") == "a@ticker/b@ticker"
    assert request.headers["upgrade"] == "websocket"
    assert request.key == "dGhlIHNhbXBsZSBub25jZQ=="


@pytest.mark.parametrize(("overrides", "status"), [
    ({"request_line": "POST / HTTP/1.1"}, 405),
    ({"request_line": "GET / HTTP/1.0"}, 505),
    ({"request_line": "GET /"}, 400),
    ({"Upgrade": None}, 426),
    ({"Connection": "keep-alive"}, 400),
    ({"Sec-WebSocket-Version": "8"}, 426),
    ({"Sec-WebSocket-Key": "not base64!"}, 400),
    ({"Sec-WebSocket-Key": base64.b64encode(b"short").decode()}, 400),
    ({"Host": None}, 400),
])
def test_parse_handshake_rejects_with_the_right_status(overrides: dict[str, str | None],
                                                       status: int) -> None:
    with pytest.raises(HandshakeError) as info:
        parse_handshake(request_head(**overrides))
    assert info.value.status == status


def test_error_response_has_length_and_body() -> None:
    raw = error_response(451, b'{"code":0}', "application/json")
    assert raw.startswith(b"HTTP/1.1 451 Unavailable For Legal Reasons\r\n")
    assert b"Content-Length: 10\r\n" in raw
    assert raw.endswith(b'\r\n\r\n{"code":0}')


# ----------------------------------------------------------------------------- frames


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
def test_masked_frames_of_every_length_encoding_round_trip(size: int) -> None:
    payload = os.urandom(size)
    p = parser()
    p.feed(client_frame(Opcode.BINARY, payload))
    assert drain(p) == [Message(Opcode.BINARY, payload)]


def test_text_is_decoded_and_byte_by_byte_feeding_works() -> None:
    p = parser()
    data = client_frame(Opcode.TEXT, "héllo".encode())
    messages: list[Message] = []
    for i in range(len(data)):
        p.feed(data[i:i + 1])
        messages.extend(drain(p))
    assert [m.text for m in messages] == ["héllo"]


def test_fragments_reassemble_around_an_interleaved_ping() -> None:
    p = parser()
    p.feed(client_frame(Opcode.TEXT, b"ab", fin=False) + client_frame(Opcode.PING, b"p")
           + client_frame(Opcode.CONTINUATION, b"cd", fin=False)
           + client_frame(Opcode.CONTINUATION, b"ef"))
    messages = drain(p)
    assert [(m.opcode, m.payload) for m in messages] == [(Opcode.PING, b"p"),
                                                          (Opcode.TEXT, b"abcdef")]
    assert messages[1].text == "abcdef"


@pytest.mark.parametrize(("data", "code"), [
    (encode_frame(Opcode.TEXT, b"x"), CloseCode.PROTOCOL_ERROR),  # unmasked client frame
    (client_frame(Opcode.CONTINUATION, b"x"), CloseCode.PROTOCOL_ERROR),
    (client_frame(Opcode.TEXT, b"a", fin=False) + client_frame(Opcode.TEXT, b"b"),
     CloseCode.PROTOCOL_ERROR),
    (client_frame(Opcode.PING, b"x" * 126), CloseCode.PROTOCOL_ERROR),
    (client_frame(Opcode.PING, b"x", fin=False), CloseCode.PROTOCOL_ERROR),
    (bytes([0xC1, 0x80]) + MASK, CloseCode.PROTOCOL_ERROR),  # RSV1 without an extension
    (bytes([0x83, 0x80]) + MASK, CloseCode.PROTOCOL_ERROR),  # reserved opcode 3
    (client_frame(Opcode.TEXT, b"\xff\xfe"), CloseCode.INVALID_DATA),
    (client_frame(Opcode.CLOSE, b"\x03"), CloseCode.PROTOCOL_ERROR),
    (client_frame(Opcode.CLOSE, struct.pack("!H", 1005)), CloseCode.PROTOCOL_ERROR),
    (client_frame(Opcode.CLOSE, struct.pack("!H", 999)), CloseCode.PROTOCOL_ERROR),
    (client_frame(Opcode.CLOSE, struct.pack("!H", 1000) + b"\xff"), CloseCode.INVALID_DATA),
])
def test_protocol_violations_carry_their_close_code(data: bytes, code: int) -> None:
    p = parser()
    p.feed(data)
    with pytest.raises(ProtocolViolation) as info:
        drain(p)
    assert info.value.close_code == code


def test_oversized_frame_is_refused_from_its_header_alone() -> None:
    p = parser(max_bytes=1000)
    p.feed(client_frame(Opcode.TEXT, b"x" * 2000)[:14])  # header + mask + a few bytes
    with pytest.raises(ProtocolViolation) as info:
        drain(p)
    assert info.value.close_code == CloseCode.MESSAGE_TOO_BIG


def test_oversized_fragmented_message_is_refused() -> None:
    p = parser(max_bytes=1000)
    p.feed(client_frame(Opcode.TEXT, b"x" * 600, fin=False)
           + client_frame(Opcode.CONTINUATION, b"x" * 600))
    with pytest.raises(ProtocolViolation) as info:
        drain(p)
    assert info.value.close_code == CloseCode.MESSAGE_TOO_BIG


def test_close_payload_round_trip_and_reason_truncation() -> None:
    assert parse_close_payload(encode_close_payload(1008, "pong timeout")) == (1008,
                                                                                "pong timeout")
    assert parse_close_payload(b"") == (None, "")
    long = encode_close_payload(1000, "é" * 100)
    assert len(long) <= 125
    assert parse_close_payload(long)[1] == "é" * 61


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([Opcode.TEXT, Opcode.BINARY]),
                          st.text(max_size=300), st.integers(1, 4)), max_size=8),
       st.integers(1, 50))
def test_property_fragmented_messages_round_trip(messages: list[tuple[Opcode, str, int]],
                                                 chunk: int) -> None:
    wire = b""
    for opcode, text, parts in messages:
        data = text.encode()
        cuts = [len(data) * i // parts for i in range(parts + 1)]
        for i in range(parts):
            frame_opcode = opcode if i == 0 else Opcode.CONTINUATION
            wire += client_frame(frame_opcode, data[cuts[i]:cuts[i + 1]], fin=i == parts - 1)
    p = parser()
    got: list[Message] = []
    for i in range(0, len(wire), chunk):
        p.feed(wire[i:i + chunk])
        got.extend(drain(p))
    assert [(m.opcode, m.payload) for m in got] == [(o, t.encode()) for o, t, _ in messages]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_property_arbitrary_bytes_only_raise_protocol_violation(data: bytes) -> None:
    p = parser(max_bytes=256)
    p.feed(data)
    try:
        drain(p)
    except ProtocolViolation as exc:
        assert exc.close_code in (1002, 1007, 1009)


# ----------------------------------------------------------------------------- live server


class Echo:
    """Echoes data messages; records what happened, with a Condition to wait on."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.opened: list[Connection] = []
        self.closed: list[Connection] = []
        self.messages: list[Message] = []
        self.reject: Rejection | None = None

    def accept(self, request: HandshakeRequest) -> Rejection | None:
        return self.reject

    def on_open(self, conn: Connection) -> None:
        with self.cond:
            self.opened.append(conn)
            self.cond.notify_all()

    def on_message(self, conn: Connection, message: Message) -> None:
        with self.cond:
            self.messages.append(message)
            self.cond.notify_all()
        if message.text is not None:
            conn.send_text(message.text)
        elif message.opcode == Opcode.BINARY:
            conn.send_binary(message.payload)

    def on_close(self, conn: Connection) -> None:
        with self.cond:
            self.closed.append(conn)
            self.cond.notify_all()

    def wait(self, predicate: object, timeout_s: float = 5.0) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout_s)  # type: ignore[arg-type]


@pytest.fixture
def echo() -> Echo:
    return Echo()


def serve(handler: Echo, **options: object) -> WebSocketServer:
    server = WebSocketServer(handler, options=ServerOptions(**options),  # type: ignore[arg-type]
                             name="test-ws")
    server.start()
    return server


@pytest.fixture
def server(echo: Echo) -> Iterator[WebSocketServer]:
    srv = serve(echo, max_frame_bytes=4096, max_message_bytes=4096, close_timeout_s=1.0)
    yield srv
    srv.stop()


def url(srv: WebSocketServer, path: str = "/") -> str:
    return f"ws://127.0.0.1:{srv.port}{path}"


def test_text_and_binary_echo_and_client_close_handshake(server: WebSocketServer,
                                                         echo: Echo) -> None:
    with client(url(server)) as c:
        c.ws.send("hello")
        assert c.ws.recv() == "hello"
        c.ws.send_binary(b"\x00\x01")
        assert c.ws.recv() == b"\x00\x01"
        c.ws.close(status=4001, timeout=2)
    assert echo.wait(lambda: len(echo.closed) == 1)
    assert echo.closed[0].close_reason == "client_close"
    assert echo.closed[0].close_code_received == 4001


def test_fragmented_client_message_is_reassembled(server: WebSocketServer, echo: Echo) -> None:
    with client(url(server)) as c:
        c.ws.send_frame(websocket.ABNF.create_frame("frag", websocket.ABNF.OPCODE_TEXT, 0))
        c.ws.send_frame(websocket.ABNF.create_frame("ment", websocket.ABNF.OPCODE_CONT, 0))
        c.ws.send_frame(websocket.ABNF.create_frame("ed", websocket.ABNF.OPCODE_CONT, 1))
        assert c.ws.recv() == "fragmented"


def test_client_ping_gets_pong_with_same_payload(server: WebSocketServer) -> None:
    with client(url(server)) as c:
        c.ws.ping("are-you-there")
        opcode, frame = c.ws.recv_data_frame(control_frame=True)
        assert opcode == websocket.ABNF.OPCODE_PONG
        assert frame.data == b"are-you-there"


def test_oversized_frame_gets_close_1009(server: WebSocketServer, echo: Echo) -> None:
    with client(url(server)) as c:
        c.ws.send("x" * 10_000)
        assert c.wait_closed() == CloseCode.MESSAGE_TOO_BIG
    assert echo.wait(lambda: len(echo.closed) == 1)
    assert echo.closed[0].close_reason == "protocol_error_1009"


def test_unmasked_client_frame_gets_close_1002(server: WebSocketServer) -> None:
    with client(url(server)) as c:
        c.ws.sock.sendall(encode_frame(Opcode.TEXT, b"unmasked"))
        assert c.wait_closed() == CloseCode.PROTOCOL_ERROR


def test_path_and_query_reach_the_handler(server: WebSocketServer, echo: Echo) -> None:
    with client(url(server, "/stream?streams=btcusdt@ticker")):
        assert echo.wait(lambda: len(echo.opened) == 1)
    request = echo.opened[0].request
    assert request.path == "/stream"
    assert request.query_value("streams") == "btcusdt@ticker"


def test_handshake_rejection_with_status_and_body(server: WebSocketServer, echo: Echo) -> None:
    echo.reject = Rejection(451, b'{"code":0,"msg":"restricted"}', "application/json")
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        websocket.create_connection(url(server), timeout=5)
    assert info.value.status_code == 451
    assert info.value.resp_body == b'{"code":0,"msg":"restricted"}'
    assert server.handshakes_rejected == 1
    assert server.connections_total == 0


def test_non_websocket_request_gets_http_error(server: WebSocketServer) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        response = b""
        while chunk := sock.recv(4096):
            response += chunk
    assert response.startswith(b"HTTP/1.1 426 ")
    assert b"Upgrade: websocket" in response


def test_server_close_and_abort(server: WebSocketServer, echo: Echo) -> None:
    with client(url(server)) as c1, client(url(server)) as c2:
        assert echo.wait(lambda: len(echo.opened) == 2)
        first, second = echo.opened
        first.close(4000, "bye", why="test")
        assert c1.wait_closed() == 4000
        second.abort("test_abort")
        assert c2.wait_closed() is None  # TCP dropped, no close frame
    assert echo.wait(lambda: len(echo.closed) == 2)
    assert {c.close_reason for c in echo.closed} == {"test", "test_abort"}


def test_stop_closes_clients_with_1001(echo: Echo) -> None:
    srv = serve(echo, close_timeout_s=1.0)
    try:
        with client(url(srv)) as c:
            assert echo.wait(lambda: len(echo.opened) == 1)
            srv.stop()
            assert c.close_code is None
            assert c.wait_closed() == CloseCode.GOING_AWAY
    finally:
        srv.stop()


def test_server_pings_are_answered_and_keep_the_connection(echo: Echo) -> None:
    srv = serve(echo, ping_interval_s=0.05, pong_timeout_s=0.3)
    try:
        with client(url(srv)) as c:
            pings = 0
            while pings < 10:  # ~0.5 s: past the pong timeout, answered each time
                opcode, _ = c.ws.recv_data_frame(control_frame=True)
                pings += opcode == websocket.ABNF.OPCODE_PING
            c.ws.send("still here")
            assert c.ws.recv() == "still here"
            assert not echo.closed
    finally:
        srv.stop()


def test_missing_pong_closes_after_the_deadline(echo: Echo) -> None:
    srv = serve(echo, ping_interval_s=0.05, pong_timeout_s=0.2, close_timeout_s=0.5)
    try:
        with client(url(srv)):
            # The client never reads, so it never answers the pings.
            assert echo.wait(lambda: len(echo.closed) == 1)
            assert echo.closed[0].close_reason == "pong_timeout"
    finally:
        srv.stop()


def test_unsolicited_pong_does_not_count(echo: Echo) -> None:
    srv = serve(echo, ping_interval_s=0.05, pong_timeout_s=0.2, close_timeout_s=0.5)
    try:
        with client(url(srv)) as c:
            for _ in range(3):
                c.ws.pong("unsolicited")
            assert echo.wait(lambda: len(echo.closed) == 1)
            assert echo.closed[0].close_reason == "pong_timeout"
    finally:
        srv.stop()
