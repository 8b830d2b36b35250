"""HTTP beside the websocket on the daemon's one port, over real sockets: pages, refusals,
bad input, and websockets that still work exactly as before.
"""

from __future__ import annotations

import base64
import json
import os

import pytest
import trio

from sandboxd.gateway import front_door
from tests.gateway.support import Daemon, masked_frame, trio_peer
from tests.http.support import bearer, http_get
from tests.support import TOKENS

ALICE, ROOT = TOKENS["alice"], TOKENS["root"]


async def still_serves(daemon: Daemon) -> None:
    """The daemon answers HTTP and websocket requests."""
    assert (await http_get(daemon.gateway.port, "/")).status == 200
    async with trio_peer(daemon.url, ALICE) as peer:
        assert (await peer.call("server.info"))["user"] == "alice"


async def read_until_closed(stream: trio.SocketStream, limit: int = 1 << 20) -> bytes:
    data = b""
    with trio.fail_after(10):
        while len(data) < limit:
            try:
                chunk = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                break
            if not chunk:
                break
            data += chunk
    return data


async def test_the_dashboard_on_the_websocket_s_port(daemon: Daemon) -> None:
    port = daemon.gateway.port
    index = await http_get(port, "/")
    assert index.status == 200 and index.headers["content-type"].startswith("text/html")
    assert "<title>sandboxd</title>" in index.text
    assert index.headers["connection"] == "close"
    script = await http_get(port, "/app.js")
    assert script.status == 200 and "events.subscribe" in script.text
    head = await http_get(port, "/style.css", method="HEAD")
    assert head.status == 200 and head.body == b""
    assert int(head.headers["content-length"]) > 0


@pytest.mark.parametrize(
    "target", ["/nope", "/../pyproject.toml", "/%2e%2e/gateway/static.py", "//etc/passwd"]
)
async def test_anything_else_is_404(daemon: Daemon, target: str) -> None:
    reply = await http_get(daemon.gateway.port, target)
    assert reply.status == 404 and reply.headers["content-type"].startswith("text/plain")


async def test_metrics_without_a_token_are_401(daemon: Daemon) -> None:
    port = daemon.gateway.port
    assert (await http_get(port, "/metrics")).status == 401
    assert (await http_get(port, "/metrics", [bearer(ALICE)])).status == 403
    reply = await http_get(port, "/metrics", [bearer(ROOT)])
    assert reply.status == 200 and "sandboxd_build_info" in reply.text


async def test_v1_without_an_upgrade(daemon: Daemon) -> None:
    port = daemon.gateway.port
    assert (await http_get(port, "/v1")).status == 401
    assert (await http_get(port, "/v1", [bearer(ALICE)])).status == 426


async def test_a_1_mib_request_line_is_refused_and_the_daemon_is_fine(daemon: Daemon) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", daemon.gateway.port)
    async with stream:
        sent = b"GET /" + b"a" * (1 << 20) + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        async with trio.open_nursery() as nursery:
            # The server answers before the line is all sent, and then reads and drops
            # the rest (a lingering close), so the answer is not lost to a reset.
            nursery.start_soon(stream.send_all, sent)
            response = await read_until_closed(stream)
    assert response.startswith(b"HTTP/1.1 431 "), response[:100]
    assert response.endswith(b"\r\n\r\nthe request head is over 65536 bytes\n")
    await still_serves(daemon)


@pytest.mark.parametrize(
    "data",
    [
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + os.urandom(64) + b"\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"NOT HTTP AT ALL\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nbad header line\r\n\r\n",
    ],
)
async def test_a_malformed_request_is_400(daemon: Daemon, data: bytes) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", daemon.gateway.port)
    async with stream:
        await stream.send_all(data)
        response = await read_until_closed(stream)
    assert response.startswith(b"HTTP/1.1 400 Bad Request\r\n"), response
    await still_serves(daemon)


async def test_a_peer_that_leaves_or_stalls(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = daemon.gateway.port
    # Connects and leaves; leaves halfway through a head.
    (await trio.open_tcp_stream("127.0.0.1", port)).socket.close()
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(b"GET / HT")
    await stream.aclose()
    # Sends half a head and nothing more: dropped after HEAD_TIMEOUT.
    monkeypatch.setattr(front_door, "HEAD_TIMEOUT", 0.2)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        assert await read_until_closed(stream) == b""
    await still_serves(daemon)


async def test_a_handshake_in_pieces_reaches_the_websocket_server_whole(daemon: Daemon) -> None:
    # The front door reads the head, however it is cut, and replays every byte of it.
    key = base64.b64encode(os.urandom(16)).decode()
    handshake = (
        "GET /v1 HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {ALICE}\r\n\r\n"
    ).encode()
    stream = await trio.open_tcp_stream("127.0.0.1", daemon.gateway.port)
    async with stream:
        for i in range(0, len(handshake), 17):
            await stream.send_all(handshake[i : i + 17])
        data = b""
        with trio.fail_after(10):
            while b"\r\n\r\n" not in data:
                data += await stream.receive_some(65536)
            assert data.startswith(b"HTTP/1.1 101 ")
            # RFC 6455 4.1: a client sends frames only once it has the 101.
            request = json.dumps({"id": 7, "op": "server.info"}).encode()
            await stream.send_all(masked_frame(0x1, request))
            while b'"id":7' not in data:
                data += await stream.receive_some(65536)
    assert b'"user":"alice"' in data


async def test_a_refused_handshake_is_still_refused(daemon: Daemon) -> None:
    port = daemon.gateway.port
    upgrade = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "13"),
    ]
    assert (await http_get(port, "/v1", upgrade)).status == 401
    assert (await http_get(port, "/", [*upgrade, bearer(ALICE)])).status == 404
