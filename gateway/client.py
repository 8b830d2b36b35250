"""The trio client of protocol.md: typed methods, one exception per error code.

    async with open_client("ws://127.0.0.1:8765/v1", token) as client:
        info = await client.start(spec_id="default")
        async with client.subscribe(after_seq=0) as events:
            async for event in events:
                ...

Requests share one connection and run concurrently, at most 64 at a time (the
server's limit, so a busy client waits here instead of getting `busy`).
A subscription has a connection of its own, which it opens again after a
drop and resumes from the last seq it delivered: the application sees every
event exactly once, in order.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypeVar

import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    connect_websocket_url,
)

from sandboxd.events.types import Event
from sandboxd.gateway import protocol as p
from sandboxd.gateway.protocol import (
    AuthenticationError,
    BadRequestError,
    BusyError,
    ClientError,
    ConflictError,
    ConnectError,
    ConnectionLostError,
    EventPage,
    GoneError,
    InternalError,
    LimitExceededError,
    Logs,
    MalformedFrameError,
    NotFoundError,
    SandboxInfo,
    SandboxUsage,
    SearchPage,
    ServerDetails,
    SpecInfo,
    StartFailedError,
    UnavailableError,
    UnknownOpError,
    decode_event,
    error_from_reply,
)

# The protocol's model, which this client speaks: importable from here as well.
__all__ = [
    "AuthenticationError",
    "BadRequestError",
    "BusyError",
    "Client",
    "ClientError",
    "ConflictError",
    "ConnectError",
    "ConnectionLostError",
    "EventPage",
    "GoneError",
    "InternalError",
    "LimitExceededError",
    "Logs",
    "MalformedFrameError",
    "NotFoundError",
    "SandboxInfo",
    "SandboxUsage",
    "SearchPage",
    "ServerDetails",
    "SpecInfo",
    "StartFailedError",
    "Subscription",
    "UnavailableError",
    "UnknownOpError",
    "decode_event",
    "error_from_reply",
    "open_client",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

# --- Connecting -------------------------------------------------------------------------


async def _connect(
    nursery: trio.Nursery, url: str, token: str, *, queue: int = 16
) -> WebSocketConnection:
    """Open a connection whose tasks run in a nursery of their own, inside ``nursery``.

    trio-websocket raises a refused handshake from its reader task, that is
    out of the nursery the task runs in: each connection gets its own, so that
    no failure of one connection can reach the client's other tasks.
    """
    try:
        with trio.fail_after(p.CONNECT_TIMEOUT):
            ws: WebSocketConnection = await nursery.start(_run_connection, url, token, queue)
            return ws
    except trio.TooSlowError:
        raise p.unreachable(url, f"no answer within {p.CONNECT_TIMEOUT:.0f} s") from None


async def _run_connection(
    url: str, token: str, queue: int, *, task_status: trio.TaskStatus[WebSocketConnection]
) -> None:
    headers = [(b"Authorization", f"Bearer {token}".encode())]
    started = False
    try:
        async with trio.open_nursery() as nursery:
            ws = await connect_websocket_url(
                nursery,
                url,
                extra_headers=headers,
                message_queue_size=queue,
                max_message_size=p.MAX_REPLY_BYTES,
            )
            task_status.started(ws)
            started = True
    except Exception as exc:
        error = _connect_error(exc, url)
        if started or error is None:
            # The connection is over; who used it has seen it close.
            log.debug("connection to %s ended", url, exc_info=True)
            return
        raise error from None


def _connect_error(exc: BaseException, url: str) -> ConnectError | None:
    if isinstance(exc, BaseExceptionGroup):
        for leaf in _leaves(exc):
            error = _connect_error(leaf, url)
            if error is not None:
                return error
        return None
    if isinstance(exc, ConnectionRejected):
        return p.refused(url, exc.status_code, exc.body)
    if isinstance(exc, OSError | HandshakeError | ConnectionClosed):
        return p.unreachable(url, exc or type(exc).__name__)
    if isinstance(exc, ValueError):  # a malformed URL
        return p.not_a_url(url, exc)
    return None


@asynccontextmanager
async def open_client(url: str, token: str) -> AsyncIterator[Client]:
    """A connected client, closed on the way out.

    What the body raises comes out as it is, not wrapped in the exception group
    of the nursery that holds the connection's tasks.
    """
    user_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            ws = await _connect(nursery, url, token)
            client = Client(nursery, ws, url, token)
            nursery.start_soon(client._read_replies)
            try:
                yield client
            except BaseException as exc:
                user_error = exc
                raise
            finally:
                await client.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        if user_error is not None and any(leaf is user_error for leaf in leaves):
            raise user_error from None
        if len(leaves) == 1:
            raise leaves[0] from None
        raise


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        leaves.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return leaves


class _Pending:
    def __init__(self) -> None:
        self.done = trio.Event()
        self.reply: p.Reply | None = None


class Client(p.ClientOps):
    """Made by open_client; each method is one op of protocol.md (protocol.ClientOps)."""

    def __init__(self, nursery: trio.Nursery, ws: WebSocketConnection, url: str, token: str):
        self._nursery = nursery
        self._ws = ws
        self.url = url
        self._token = token
        self._exchanges: p.Exchanges[_Pending] = p.Exchanges()
        self._slots = trio.Semaphore(p.MAX_IN_FLIGHT)
        self._lost: str | None = None

    @property
    def closed(self) -> bool:
        """Whether requests can no longer be sent: closed, or the connection was lost."""
        return self._lost is not None or self._ws.closed is not None

    async def aclose(self) -> None:
        with trio.move_on_after(2):
            await self._ws.aclose()

    async def _read_replies(self) -> None:
        try:
            while True:
                routed = self._exchanges.route(await self._ws.get_message())
                if routed is not None:
                    pending, reply = routed
                    pending.reply = reply
                    pending.done.set()
        except ConnectionClosed as exc:
            reason = exc.reason
            self._lost = (
                p.closed(self.url)
                if reason is None
                else p.closed(self.url, reason.code, reason.reason or "")
            )
        except MalformedFrameError as exc:
            self._lost = f"{self.url} sent a frame that is not a protocol reply: {exc}"
            await self.aclose()
        for pending in self._exchanges.drain():
            pending.done.set()

    async def call(self, call: p.Call[T]) -> T:
        """Send one op and return its typed result, or raise the error of its reply."""
        async with self._slots:
            if self._lost is not None:
                raise ConnectionLostError(self._lost)
            pending = _Pending()
            request_id = self._exchanges.open(pending)
            try:
                await self._ws.send_message(call.encode(request_id))
                await pending.done.wait()
            except ConnectionClosed:
                pass
            finally:
                self._exchanges.close(request_id)
            if pending.reply is None:
                raise ConnectionLostError(
                    self._lost or f"{p.closed(self.url)} before the reply to {call.op}"
                )
        return call.result(pending.reply)

    def subscribe(
        self,
        after_seq: int | None = None,
        *,
        sandbox_id: str | None = None,
        types: list[str] | None = None,
        batch: bool = True,
    ) -> Subscription:
        """Events with seq > after_seq (None: from now on), on a connection of their own.

        Use as ``async with client.subscribe(...) as events: async for event in events``.
        The server sends them several to a frame (``batch``; False: one a frame, for a
        server older than batch frames).
        """
        resumption = p.Resumption.of(after_seq, sandbox_id=sandbox_id, types=types, batch=batch)
        return Subscription(self._nursery, self.url, self._token, resumption)


class Subscription(p.SubscriptionOps):
    """An event stream that survives dropped connections; made by Client.subscribe.

    Where it is in the log, and what to send on each connection, is
    ``protocol.Resumption``'s; this class opens the connections and reads them.
    """

    def __init__(
        self, nursery: trio.Nursery, url: str, token: str, resumption: p.Resumption
    ) -> None:
        self._nursery = nursery
        self._url = url
        self._token = token
        self._resumption = resumption
        self._ws: WebSocketConnection | None = None
        #: Set once the server said history is sent and the stream is live.
        self.caught_up = trio.Event()
        self._closed = False

    async def aclose(self) -> None:
        self._closed = True
        await self._drop()

    async def _drop(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await ws.aclose()

    async def __anext__(self) -> Event:
        while True:
            if self._closed:
                raise StopAsyncIteration
            event = self._resumption.next_event()
            if event is not None:
                return event
            if self._ws is None:
                await self._reconnect()
            assert self._ws is not None
            try:
                received = self._resumption.receive(await self._ws.get_message())
            except ConnectionClosed:
                await self._drop()
                continue
            if isinstance(received, p.Ended):
                await self._drop()
            elif self._resumption.caught_up:
                self.caught_up.set()

    async def _reconnect(self) -> None:
        failure: ClientError | None = None
        for delay in p.reconnect_delays():
            await trio.sleep(delay)
            try:
                await self._open()
                return
            except ClientError as exc:
                if not p.worth_retrying(exc):
                    raise
                failure = exc
                await self._drop()
        assert failure is not None
        raise p.gave_up(failure)

    async def _open(self) -> None:
        ws = self._ws = await _connect(self._nursery, self._url, self._token, queue=64)
        call = self._resumption.subscribe_call()
        try:
            await ws.send_message(call.encode(p.SUBSCRIBE_ID))
            while (reply := self._resumption.subscribe_reply(await ws.get_message())) is None:
                pass
        except ConnectionClosed:
            raise ConnectionLostError(
                f"the connection to {self._url} closed while subscribing"
            ) from None
        self._resumption.subscribed(call, reply)
