"""The front door's HTTP, sans-IO: request heads fed in pieces, refusals, responses."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandboxd.gateway.http import MAX_HEAD_BYTES, HeadReader, MalformedRequest, Response, text

HANDSHAKE = (
    b"GET /v1?token=abc HTTP/1.1\r\nHost: 127.0.0.1:8765\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


def feed_all(data: bytes, size: int) -> tuple[HeadReader, object]:
    reader = HeadReader()
    result: object = None
    for i in range(0, len(data), size):
        result = reader.feed(data[i : i + size])
        if result is not None:
            break
    return reader, result


@pytest.mark.parametrize("size", [1, 7, 64, len(HANDSHAKE)])
def test_a_head_in_pieces(size: int) -> None:
    first_frame = b"\x81\x85" + b"1234" + b"abcde"  # a client may send a frame right after
    data = HANDSHAKE + first_frame
    reader, head = feed_all(data, size)
    assert head is not None
    assert head.method == "GET" and head.target == "/v1?token=abc" and head.path == "/v1"
    assert head.header(b"host") == b"127.0.0.1:8765"
    assert head.wants_websocket
    # Every byte read is kept for the websocket server, the frame after the head too
    # when it came in the same piece.
    assert reader.received == data[: len(reader.received)]
    assert len(reader.received) >= len(HANDSHAKE)


@pytest.mark.parametrize(
    ("upgrade", "wanted"),
    [(b"websocket", True), (b"WebSocket", True), (b"h2c, websocket", True), (b"h2c", False)],
)
def test_what_asks_for_a_websocket(upgrade: bytes, wanted: bool) -> None:
    reader = HeadReader()
    head = reader.feed(b"GET /v1 HTTP/1.1\r\nHost: x\r\nUpgrade: " + upgrade + b"\r\n\r\n")
    assert head is not None and head.wants_websocket is wanted
    plain = HeadReader().feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert plain is not None and not plain.wants_websocket


def test_a_request_line_of_1_mib_is_431_before_it_is_all_read() -> None:
    reader = HeadReader()
    reader.feed(b"GET /")
    with pytest.raises(MalformedRequest) as refused:
        for _ in range((1 << 20) // 4096):
            reader.feed(b"a" * 4096)
    assert refused.value.status == 431
    assert len(reader.received) <= MAX_HEAD_BYTES + 4096
    response = reader.encode(text(refused.value.status, refused.value.message))
    assert response.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert b"Connection: close" in response


@pytest.mark.parametrize(
    "data",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # a TLS hello
        b"GET / HTTP/1.1\r\n\r\n",  # no Host
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n",
        b"GET /\xff HTTP/1.1\r\nHost: a\r\n\r\n",
        b"hello\r\n\r\n",
    ],
)
def test_what_is_no_http_head_is_400(data: bytes) -> None:
    reader = HeadReader()
    with pytest.raises(MalformedRequest) as refused:
        reader.feed(data)
    assert refused.value.status == 400
    assert len(refused.value.message) < 160  # h11's words, cut short
    assert reader.encode(text(400, refused.value.message)).startswith(b"HTTP/1.1 400 ")


def test_the_end_of_the_stream() -> None:
    assert HeadReader().feed(b"") is None  # left before a byte: nothing to answer
    reader = HeadReader()
    assert reader.feed(b"GET / HT") is None
    with pytest.raises(MalformedRequest) as refused:
        reader.feed(b"")  # left halfway
    assert refused.value.status == 400


def test_a_response_to_get_and_to_head() -> None:
    for method, with_body in ((b"GET", True), (b"HEAD", False)):
        reader = HeadReader()
        assert reader.feed(method + b" /app.js HTTP/1.1\r\nHost: x\r\n\r\n") is not None
        data = reader.encode(Response(200, b"let x = 1;\n", "text/javascript", (("X-Extra", "1"),)))
        client = h11.Connection(h11.CLIENT)
        client.send(h11.Request(method=method, target="/app.js", headers=[("Host", "x")]))
        client.send(h11.EndOfMessage())
        client.receive_data(data)
        response = client.next_event()
        assert isinstance(response, h11.Response) and response.status_code == 200
        headers = dict(response.headers)
        assert headers[b"content-type"] == b"text/javascript"
        assert headers[b"content-length"] == b"11"
        assert headers[b"connection"] == b"close"
        assert headers[b"x-content-type-options"] == b"nosniff"
        assert headers[b"x-extra"] == b"1"
        body = client.next_event()
        if with_body:
            assert isinstance(body, h11.Data) and body.data == b"let x = 1;\n"
        else:
            assert isinstance(body, h11.EndOfMessage)


@given(st.binary(max_size=2048), st.integers(min_value=1, max_value=300))
def test_any_bytes_in_any_pieces(data: bytes, size: int) -> None:
    # Whatever a client sends: a head, a wait for more, or a refusal with a status to
    # answer; every byte kept for the replay until then; nothing else raised.
    reader = HeadReader()
    fed = b""
    try:
        for i in range(0, len(data), size):
            fed += data[i : i + size]
            if reader.feed(data[i : i + size]) is not None:
                break
        else:
            reader.feed(b"")
    except MalformedRequest as refused:
        assert refused.status in (400, 431)
        reader.encode(text(refused.status, refused.message))
    assert reader.received == fed
