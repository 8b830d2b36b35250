"""The front door: where every TCP connection the daemon accepts starts.

It reads the request head (http.py parses it, with h11) and then either hands the
connection to the websocket server, the bytes it has read replayed in front of the stream
(``ReplayStream``), or answers the one HTTP request (routes.py) and closes the connection.
A websocket connection thus costs one more parse of its handshake's head, and nothing per
frame after it but one method call per read (bench/gateway.py: the round trips of
``sandbox.get`` are the same with and without the front door, docs/performance.md).

Whatever a client sends, the daemon stays up and holds little: the head is bounded
(``http.MAX_HEAD_BYTES``, then 431) and so is the time to send it (``HEAD_TIMEOUT``);
a response is sent within ``SEND_TIMEOUT`` or the connection is dropped; no exception
leaves ``handle``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from sandboxd.gateway.http import HeadReader, MalformedRequest, RequestHead, Response, text
from sandboxd.gateway.routes import Routes

log = logging.getLogger(__name__)

#: Seconds a client has to send a whole request head (a slow one holds a task no longer).
HEAD_TIMEOUT: Final = 10.0
#: Seconds to send a response; then, seconds and bytes of what the client still sends
#: that are read and dropped before closing (see ``FrontDoor._answer``).
SEND_TIMEOUT: Final = 10.0
LINGER_TIMEOUT: Final = 2.0
LINGER_BYTES: Final = 4 << 20
RECEIVE_BYTES: Final = 16 << 10

WebsocketHandler = Callable[[trio.abc.HalfCloseableStream], Awaitable[None]]


class FrontDoor:
    """Routes each accepted stream: to the websocket server, or to an HTTP answer."""

    def __init__(self, routes: Routes, websocket: WebsocketHandler) -> None:
        self._routes = routes
        self._websocket = websocket

    async def handle(self, stream: trio.abc.HalfCloseableStream) -> None:
        """Serve one accepted connection and close it; never raises."""
        try:
            reader = HeadReader()
            head: RequestHead | None = None
            try:
                with trio.move_on_after(HEAD_TIMEOUT):
                    head = await _read_head(stream, reader)
            except MalformedRequest as bad:
                await _answer(stream, reader, text(bad.status, bad.message))
                return
            if head is None:
                return  # the peer left, or was too slow, before a whole head
            if head.wants_websocket:
                # The websocket server closes the stream, whatever happens.
                await self._websocket(ReplayStream(stream, reader.received))
                return
            await _answer(stream, reader, self._routes.respond(head))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the peer went away while we answered
        except Exception:
            # Never let it escape: it would take the listener and every connection down.
            log.exception("an HTTP connection failed")
        finally:
            await trio.aclose_forcefully(stream)


async def _read_head(
    stream: trio.abc.HalfCloseableStream, reader: HeadReader
) -> RequestHead | None:
    while True:
        data = await stream.receive_some(RECEIVE_BYTES)
        head = reader.feed(bytes(data))
        if head is not None or not data:
            return head


async def _answer(
    stream: trio.abc.HalfCloseableStream, reader: HeadReader, response: Response
) -> None:
    with trio.move_on_after(SEND_TIMEOUT):
        await stream.send_all(reader.encode(response))
        # A lingering close (RFC 9112 9.6): closing a socket that holds unread bytes (the
        # rest of a 1 MiB request line, a body we did not want) sends a reset, and a reset
        # can destroy the response before the client reads it. So: half-close, then read
        # and drop what still comes until the client closes, within bounds.
        await stream.send_eof()
        with trio.move_on_after(LINGER_TIMEOUT):
            drained = 0
            while drained < LINGER_BYTES:
                chunk = await stream.receive_some(RECEIVE_BYTES * 4)
                if not chunk:
                    break
                drained += len(chunk)


class ReplayStream(trio.abc.HalfCloseableStream):
    """A stream whose first bytes were read already: they are received again first."""

    def __init__(self, stream: trio.abc.HalfCloseableStream, replay: bytes) -> None:
        self.stream = stream
        self._replay = replay

    @property
    def socket(self) -> trio.socket.SocketType | None:
        """The socket under the stream, if it is one (the websocket writes to it directly)."""
        return self.stream.socket if isinstance(self.stream, trio.SocketStream) else None

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if not self._replay:
            return await self.stream.receive_some(max_bytes)
        await trio.lowlevel.checkpoint()
        size = len(self._replay) if max_bytes is None else max_bytes
        data, self._replay = self._replay[:size], self._replay[size:]
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()

    def __repr__(self) -> str:
        # The gateway names a connection's peer by the stream's repr when it is no
        # SocketStream (server.py's _peer): give it the address.
        if not isinstance(self.stream, trio.SocketStream):
            return repr(self.stream)  # in-memory, in tests
        try:
            host, port, *_ = self.stream.socket.getpeername()
        except OSError:
            return "<a closed connection>"
        return f"{host}:{port}"
