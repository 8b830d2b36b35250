"""The gateway without sockets: the real daemon, served on trio.testing's memory streams.

``open_harness`` runs the daemon's own wiring (``run_daemon``) with a
``MemoryListener`` in place of its TCP listeners, as ``trio.serve_listeners``
allows; a test connects through it with trio-websocket's client, with the
project's hand-written peer, or with a raw stream it misbehaves on. Nothing
here touches a socket, so a test of the protocol or of the keepalive can run
on the autojump clock (take the ``autojump_clock`` fixture) as long as it
starts no sandbox: a real child process would let virtual time race past it.
"""

from __future__ import annotations

import base64
import contextlib
import math
import os
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import trio
import trio.testing
from trio_websocket import WebSocketConnection, wrap_client_stream

from sandboxd.daemon import run_daemon
from sandboxd.gateway.server import Gateway
from tests.gateway.support import TrioPeer, make_config


class MemoryListener(trio.abc.Listener[trio.abc.Stream]):
    """A listener whose connections are trio.testing stream pairs made by ``connect``."""

    def __init__(self) -> None:
        self._send, self._accept = trio.open_memory_channel[trio.abc.Stream](math.inf)
        self.closed = False

    async def accept(self) -> trio.abc.Stream:
        return await self._accept.receive()

    async def aclose(self) -> None:
        self.closed = True
        self._accept.close()
        await trio.lowlevel.checkpoint()

    def connect(self, *, lockstep: bool = False) -> trio.abc.Stream:
        """The client's end of a new connection, or ConnectionRefusedError once closed.

        ``lockstep``: no buffer at all between the ends (a send waits until the
        other side receives), so a client that does not read blocks the server's
        writes at once, as a full socket buffer would.
        """
        if self.closed:
            raise ConnectionRefusedError("the listener is closed")
        pair = trio.testing.lockstep_stream_pair if lockstep else trio.testing.memory_stream_pair
        client, server = pair()
        self._send.send_nowait(server)
        return client


@attrs.define
class Harness:
    gateway: Gateway
    listener: MemoryListener

    @contextlib.asynccontextmanager
    async def websocket(self, token: str, **options: Any) -> AsyncIterator[WebSocketConnection]:
        """trio-websocket's client, connected with ``token``; closed on the way out.

        Its queue holds many frames (trio-websocket's default is one): while it
        is full the client answers no ping, and on virtual time a test busy
        elsewhere (appending, which waits on a thread) lets the pings run out.
        """
        options.setdefault("message_queue_size", 1024)
        async with trio.open_nursery() as nursery:
            ws = await wrap_client_stream(
                nursery,
                self.listener.connect(),  # type: ignore[arg-type]  # any stream will do
                "sandboxd",
                "/v1",
                extra_headers=[(b"Authorization", f"Bearer {token}".encode())],
                **options,
            )
            try:
                yield ws
            finally:
                with trio.move_on_after(5):
                    await ws.aclose()
                nursery.cancel_scope.cancel()

    @contextlib.asynccontextmanager
    async def peer(self, token: str) -> AsyncIterator[TrioPeer]:
        async with self.websocket(token) as ws:
            yield TrioPeer(ws)

    async def raw(self, token: str, *, lockstep: bool = False) -> trio.abc.Stream:
        """A websocket handshake by hand; then the stream is the test's, to misbehave on."""
        stream, response = await self.handshake(token, lockstep=lockstep)
        assert response.startswith(b"HTTP/1.1 101"), response
        return stream

    async def handshake(
        self, token: str, *, lockstep: bool = False
    ) -> tuple[trio.abc.Stream, bytes]:
        """A websocket handshake by hand: the stream, and the response (with a refusal's body)."""
        stream = self.listener.connect(lockstep=lockstep)
        key = base64.b64encode(os.urandom(16)).decode()
        await stream.send_all(
            (
                "GET /v1 HTTP/1.1\r\nHost: sandboxd\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
            ).encode()
        )
        response = b""
        while b"\r\n\r\n" not in response:
            response += await stream.receive_some(1)  # not a byte past the response
        if not response.startswith(b"HTTP/1.1 101"):
            while chunk := await stream.receive_some():  # a refusal: its body, to the end
                response += chunk
        return stream, response


@contextlib.asynccontextmanager
async def open_harness(state_dir: Path, **changes: Any) -> AsyncIterator[Harness]:
    """The daemon of make_config(state_dir, **changes), served on a MemoryListener."""
    listener = MemoryListener()
    async with trio.open_nursery() as nursery:
        gateway: Gateway = await nursery.start(
            partial(run_daemon, make_config(state_dir, **changes), listeners=[listener])
        )
        yield Harness(gateway, listener)
        # What the test left running goes; then the daemon is cancelled.
        with trio.move_on_after(10):
            await gateway.registry.delete_all()
        nursery.cancel_scope.cancel()
