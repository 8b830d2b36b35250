"""The server side of a websocket: wsproto's state machine, with thin trio I/O around it.

The clients keep trio-websocket (and websockets); the daemon's side is this, for what a
frame costs. Through trio-websocket a frame is a lock, wsproto's encoding and a
``send_all`` of its own, three trips through trio's scheduler: about 80 us of CPU
(bench/gateway.py, py-spy; docs/performance.md). Here a frame is wsproto's encoding
(about 1.5 us) and, when the socket has room, which is nearly always, one ``write(2)``
done there and then, with no task switch (``write``): a subscription's frames go to the
kernel from the task that made them. What the socket did not take waits in one ordered
buffer, and whoever awaits ``flush`` (the connection's writer) writes it once the socket
is writable; a frame is never cut by a cancelled send, since the buffer knows what went.

Reading is pull: ``get_message`` reads the socket only when asked, so a connection that
stops taking requests stops reading (TCP pushes back on the client), and answers pings
and close frames as it reads, as RFC 6455 lets it. A message over ``max_message_bytes``
(UTF-8 bytes) closes the websocket with 1009 without being held whole.

On a stream that is no socket (in-memory streams, in tests) the buffer goes out through
``send_all``; a send cut short there leaves the stream unusable (``Closed``, abnormal).
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Callable, Sequence
from typing import Final

import attrs
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

#: Bytes asked of the socket per read.
RECEIVE_BYTES: Final = 64 << 10
#: Close codes of RFC 6455 this module sets itself.
ABNORMAL: Final = 1006
_HEAD_16: Final = struct.Struct("!BBH")
_HEAD_64: Final = struct.Struct("!BBQ")
TOO_BIG: Final = 1009


@attrs.frozen
class CloseReason:
    code: int
    reason: str | None


class Closed(Exception):
    """The websocket is closed (or closing): nothing more can be sent or received."""

    def __init__(self, reason: CloseReason) -> None:
        super().__init__(f"closed: {reason.code} {reason.reason or ''}".rstrip())
        self.reason = reason


@attrs.frozen
class Handshake:
    """What the admission looks at of an opening handshake."""

    path: str
    headers: list[tuple[bytes, bytes]]


class ServerWebSocket:
    """One accepted stream, as a websocket: ``handshake`` then ``accept`` or ``reject``."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        socket: trio.socket.SocketType | None = None,
        max_message_bytes: int,
        close_timeout: float = 5.0,
    ) -> None:
        self._stream = stream
        #: When given, the socket under ``stream``: written to directly (see the docstring).
        self._fd = socket.fileno() if socket is not None else None
        self._max_message_bytes = max_message_bytes
        self._close_timeout = close_timeout
        self._ws = WSConnection(ConnectionType.SERVER)
        self._pending = bytearray()
        self._flushing = False
        self._drained = trio.Event()
        self._drained.set()
        self._reading = False
        self._broken = False
        self._parts: list[str | bytes] = []
        self._part_bytes = 0
        self._pong: trio.Event | None = None
        self._pings = 0
        self._closed_handshake = trio.Event()
        #: Why the websocket closed; None while it is open.
        self.closed: CloseReason | None = None
        #: Called when ``write`` left bytes that the socket did not take: someone must
        #: ``flush`` them (the connection pokes its writer).
        self.on_backlog: Callable[[], None] = _nothing

    # -- the opening handshake ----------------------------------------------------------

    async def handshake(self) -> Handshake | None:
        """The client's opening request, once read; None if it left or sent no valid one
        (answered 400 then, as wsproto words it)."""
        while True:
            for event in self._ws.events():
                if isinstance(event, Request):
                    return Handshake(event.target, list(event.extra_headers))
            data = await self._receive()
            if data is None:
                return None
            try:
                self._ws.receive_data(data)
            except RemoteProtocolError as bad:
                if bad.event_hint is not None:
                    await self._send_event(bad.event_hint)
                return None

    async def accept(self) -> None:
        await self._send_event(AcceptConnection())

    async def reject(
        self, status: int, *, headers: list[tuple[bytes, bytes]] | None = None, body: bytes = b""
    ) -> None:
        headers = [*(headers or []), (b"Content-Length", str(len(body)).encode())]
        await self._send_event(RejectConnection(status_code=status, headers=headers, has_body=True))
        await self._send_event(RejectData(data=body))

    # -- sending ------------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        """Nothing waits to be written: a ``write`` now goes straight to the socket."""
        return not self._pending and not self._flushing

    def write_message(self, text: str) -> None:
        """Send a text message: to the socket now as far as it takes it (see ``write``)."""
        self.write_text((text.encode("utf-8"),))

    def write_text(self, parts: Sequence[bytes]) -> None:
        """Send one text message whose UTF-8 is ``parts`` joined, in one ``writev`` when
        the socket has room: the parts are not copied into a frame (a batch of events
        goes out as the log stored it). Raises ``Closed`` once the websocket closes."""
        if self._ws.state is not ConnectionState.OPEN:
            raise Closed(self.closed or CloseReason(ABNORMAL, "the websocket is closing"))
        # The frame's head, as RFC 6455 5.2 lays it out for a server (no mask); wsproto
        # would make the same but wants a str, and copies the payload behind it.
        length = sum(len(part) for part in parts)
        if length < 126:
            head = bytes((0x81, length))
        elif length < 1 << 16:
            head = _HEAD_16.pack(0x81, 126, length)
        else:
            head = _HEAD_64.pack(0x81, 127, length)
        if self._broken:
            raise Closed(self.closed or CloseReason(ABNORMAL, None))
        if self._pending or self._flushing or self._fd is None:
            self._pending += head
            for part in parts:
                self._pending += part
        else:
            sent = self._writev((head, *parts))
            if sent == len(head) + length:
                return
            for part in (head, *parts):
                if sent < len(part):
                    self._pending += memoryview(part)[sent:]
                sent = max(0, sent - len(part))
        self.on_backlog()

    def write(self, data: bytes) -> None:
        """Send ``data`` after everything before it, without waiting: what the socket does
        not take at once stays in the buffer, and ``on_backlog`` is called."""
        if self._broken:
            raise Closed(self.closed or CloseReason(ABNORMAL, None))
        if self._pending or self._flushing or self._fd is None:
            self._pending += data
        else:
            sent = self._writev((data,))
            if sent == len(data):
                return
            self._pending += memoryview(data)[sent:]
        self.on_backlog()

    async def flush(self) -> None:
        """Wait until the buffer is written. One task writes; others wait for it."""
        if self._flushing:
            await self._drained.wait()
            return
        if not self._pending:
            await trio.lowlevel.checkpoint()
            return
        self._flushing = True
        self._drained = trio.Event()
        try:
            while self._pending:
                if self._fd is None:
                    data = bytes(self._pending)
                    self._pending.clear()
                    try:
                        await self._stream.send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError) as error:
                        self._abort()
                        failed = CloseReason(ABNORMAL, f"the connection failed: {error}")
                        raise Closed(failed) from None
                    except BaseException:
                        # Cut short, perhaps in the middle of a frame: nothing more may
                        # follow it on this stream.
                        self._abort()
                        raise
                else:
                    await trio.lowlevel.wait_writable(self._fd)
                    del self._pending[: self._writev((self._pending,))]
        finally:
            self._flushing = False
            self._drained.set()

    def _writev(self, parts: Sequence[bytes | bytearray | memoryview]) -> int:
        assert self._fd is not None
        try:
            return os.writev(self._fd, parts)
        except BlockingIOError:
            return 0
        except OSError as error:
            self._abort()
            raise Closed(CloseReason(ABNORMAL, f"the connection failed: {error}")) from None

    async def _send_event(self, event: Event) -> None:
        self.write(self._ws.send(event))
        await self.flush()

    def _abort(self) -> None:
        self._broken = True
        self._pending.clear()
        if self.closed is None:
            self.closed = CloseReason(ABNORMAL, None)
        self._closed_handshake.set()
        if self._pong is not None:
            self._pong.set()

    # -- receiving ----------------------------------------------------------------------

    async def get_message(self) -> str | bytes:
        """The next whole message; raises ``Closed`` once the websocket is closed. One task
        at a time reads."""
        self._reading = True
        try:
            while True:
                for event in self._ws.events():
                    message = await self._handle(event)
                    if message is not None:
                        return message
                if self._closed_handshake.is_set():
                    raise Closed(self.closed or CloseReason(ABNORMAL, None))
                data = await self._receive()
                if data is None:
                    self._abort()
                    raise Closed(self.closed or CloseReason(ABNORMAL, None))
                try:
                    self._ws.receive_data(data)
                except RemoteProtocolError as bad:
                    # Invalid frames or text: wsproto says how to close (1002, 1007).
                    hint = bad.event_hint
                    if not isinstance(hint, CloseConnection):
                        self._abort()
                        continue
                    await self._start_close(hint.code, hint.reason or str(bad))
                    raise Closed(CloseReason(hint.code, hint.reason)) from None
        finally:
            self._reading = False

    async def _handle(self, event: Event) -> str | bytes | None:
        if isinstance(event, Message):
            size = len(event.data)
            room = self._max_message_bytes - self._part_bytes
            if isinstance(event, TextMessage) and size * 4 > room:
                size = len(event.data.encode("utf-8", "surrogatepass"))
            self._part_bytes += size
            self._parts.append(event.data)
            if self._part_bytes > self._max_message_bytes:
                self._parts, self._part_bytes = [], 0
                limit = f"frames must be at most {self._max_message_bytes} bytes"
                await self._start_close(TOO_BIG, limit)
                raise Closed(CloseReason(TOO_BIG, limit))
            if not event.message_finished:
                return None
            parts, self._parts, self._part_bytes = self._parts, [], 0
            if isinstance(event, BytesMessage):
                return b"".join(part for part in parts if isinstance(part, bytes))
            return "".join(part for part in parts if isinstance(part, str))
        if isinstance(event, Ping):
            self._send_quietly(event.response())
        elif isinstance(event, Pong):
            if self._pong is not None:
                self._pong.set()
        elif isinstance(event, CloseConnection):
            if self._ws.state is ConnectionState.OPEN:
                # Not the peer's close: wsproto could not parse what came (1002, 1007).
                await self._start_close(event.code, event.reason or "invalid data")
                raise Closed(CloseReason(event.code, event.reason))
            if self._ws.state is ConnectionState.REMOTE_CLOSING:
                # The peer began it: answer, and the websocket is closed.
                self._send_quietly(event.response())
                with trio.move_on_after(self._close_timeout):
                    await self.flush()
            if self.closed is None:
                self.closed = CloseReason(event.code, event.reason)
            self._closed_handshake.set()
        return None

    def _send_quietly(self, event: Event) -> None:
        # Closing or closed already: nothing more to say.
        with contextlib.suppress(Closed, LocalProtocolError):
            self.write(self._ws.send(event))

    async def _receive(self) -> bytes | None:
        try:
            data = await self._stream.receive_some(RECEIVE_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return None
        return bytes(data) if data else None

    # -- pings and closing --------------------------------------------------------------

    async def ping(self) -> None:
        """Ping and wait for the pong (the reader, reading, sees it)."""
        self._pings += 1
        payload = self._pings.to_bytes(4, "big")
        pong = self._pong = trio.Event()
        if self._ws.state is not ConnectionState.OPEN:
            raise Closed(self.closed or CloseReason(ABNORMAL, "the websocket is closing"))
        self.write(self._ws.send(Ping(payload=payload)))
        await pong.wait()
        if self.closed is not None:
            raise Closed(self.closed)

    async def aclose(self, code: int, reason: str) -> None:
        """Close with ``code``: the close frame after everything written before it, then
        wait for the peer's (read here unless another task is reading). Bound it with a
        timeout: a peer may never answer."""
        if self._ws.state is ConnectionState.OPEN:
            await self._start_close(code, reason)
        if self._reading:
            await self._closed_handshake.wait()
            return
        while self.closed is None or not self._closed_handshake.is_set():
            try:
                await self.get_message()
            except Closed:
                return

    async def _start_close(self, code: int, reason: str) -> None:
        self.closed = CloseReason(code, reason)
        self._send_quietly(CloseConnection(code=code, reason=reason))
        with trio.move_on_after(self._close_timeout):
            await self.flush()


def _nothing() -> None:
    pass
