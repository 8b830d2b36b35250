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
event exactly once, in order. Given several URLs (the nodes of a cluster), the
client uses the first that answers and fails over to the others
(protocol.Endpoints says when and in which order).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping, Sequence
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
    FollowedLogs,
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
    "FollowedLogs",
    "GoneError",
    "InternalError",
    "LimitExceededError",
    "LogFollow",
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


async def _close(ws: WebSocketConnection | None) -> None:
    """Close a subscription's or a follow's own connection, even while being cancelled
    (shielded), and in two seconds at most: a server gone quiet holds no one longer."""
    if ws is not None:
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            await ws.aclose()


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


async def _connect_any(
    nursery: trio.Nursery, urls: Sequence[str], token: str, *, queue: int = 16
) -> tuple[str, WebSocketConnection]:
    """The first of ``urls`` that answers, and its connection: one round, no delay."""
    failures: list[ConnectError] = []
    for url in urls:
        try:
            return url, await _connect(nursery, url, token, queue=queue)
        except ConnectError as exc:
            if not p.worth_retrying(exc):
                raise
            failures.append(exc)
    raise p.first_of(failures)


@asynccontextmanager
async def open_client(url: str | Sequence[str], token: str) -> AsyncIterator[Client]:
    """A connected client, closed on the way out.

    ``url`` may be several (the nodes of a cluster): the client connects to the
    first that answers and fails over to the others (protocol.Endpoints).
    What the body raises comes out as it is, not wrapped in the exception group
    of the nursery that holds the connection's tasks.
    """
    endpoints = p.Endpoints(url)
    user_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            answered, ws = await _connect_any(nursery, endpoints.order(), token)
            endpoints.connected(answered)
            client = Client(nursery, ws, endpoints, token)
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


class _Line:
    """One connection of the client's requests, and the requests in flight on it."""

    def __init__(self, url: str, ws: WebSocketConnection) -> None:
        self.url = url
        self.ws = ws
        self.exchanges: p.Exchanges[_Pending] = p.Exchanges()
        #: Why it is lost (None while it is not).
        self.lost: str | None = None


class Client(p.ClientOps):
    """Made by open_client; each method is one op of protocol.md (protocol.ClientOps)."""

    def __init__(
        self, nursery: trio.Nursery, ws: WebSocketConnection, endpoints: p.Endpoints, token: str
    ):
        self._nursery = nursery
        self._endpoints = endpoints
        self._token = token
        self._slots = trio.Semaphore(p.MAX_IN_FLIGHT)
        self._failing_over = trio.Lock()
        self._closed = False
        self._line = self._serve(_Line(endpoints.current, ws))

    @property
    def url(self) -> str:
        """The URL of the daemon this client's requests go to now."""
        return self._line.url

    @property
    def closed(self) -> bool:
        """Whether requests can no longer be sent: closed, or the connection was lost and
        no other URL is left to fail over to."""
        line = self._line
        if self._closed:
            return True
        lost = line.lost is not None or line.ws.closed is not None
        return lost and not self._endpoints.others(line.url)

    async def aclose(self) -> None:
        self._closed = True
        with trio.move_on_after(2):
            await self._line.ws.aclose()

    def _serve(self, line: _Line) -> _Line:
        self._nursery.start_soon(self._read_replies, line)
        return line

    async def _read_replies(self, line: _Line) -> None:
        try:
            while True:
                routed = line.exchanges.route(await line.ws.get_message())
                if routed is not None:
                    pending, reply = routed
                    pending.reply = reply
                    pending.done.set()
        except ConnectionClosed as exc:
            reason = exc.reason
            line.lost = (
                p.closed(line.url)
                if reason is None
                else p.closed(line.url, reason.code, reason.reason or "")
            )
        except MalformedFrameError as exc:
            line.lost = f"{line.url} sent a frame that is not a protocol reply: {exc}"
            with trio.move_on_after(2):
                await line.ws.aclose()
        for pending in line.exchanges.drain():
            pending.done.set()

    async def _usable_line(self) -> _Line:
        """The connection to send on: the current one, or one to another URL if it was lost."""
        line = self._line
        if line.lost is None and not self._closed:
            return line
        async with self._failing_over:
            if self._line is not line and self._line.lost is None:
                return self._line  # another caller failed over meanwhile
            others = self._endpoints.others(line.url)
            if self._closed or not others:
                raise ConnectionLostError(line.lost or p.closed(line.url))
            url, ws = await _connect_any(self._nursery, others, self._token)
            self._endpoints.connected(url)
            log.info("failed over from %s to %s", line.url, url)
            self._line = self._serve(_Line(url, ws))
            return self._line

    async def call(self, call: p.Call[T]) -> T:
        """Send one op and return its typed result, or raise the error of its reply."""
        async with self._slots:
            line = await self._usable_line()
            pending = _Pending()
            request_id = line.exchanges.open(pending)
            try:
                await line.ws.send_message(call.encode(request_id))
                await pending.done.wait()
            except ConnectionClosed:
                pass
            finally:
                line.exchanges.close(request_id)
            if pending.reply is None:
                raise ConnectionLostError(
                    line.lost or f"{p.closed(line.url)} before the reply to {call.op}"
                )
        return call.result(pending.reply)

    def subscribe(
        self,
        after_seq: int | None = None,
        *,
        sandbox_id: str | None = None,
        types: list[str] | None = None,
        labels: Mapping[str, str] | None = None,
        batch: bool = True,
    ) -> Subscription:
        """Events with seq > after_seq (None: from now on), on a connection of their own.

        Use as ``async with client.subscribe(...) as events: async for event in events``.
        The server sends them several to a frame (``batch``; False: one a frame, for a
        server older than batch frames).
        """
        resumption = p.Resumption.of(
            after_seq, sandbox_id=sandbox_id, types=types, labels=labels, batch=batch
        )
        endpoints = p.Endpoints(self._endpoints.urls, first=self.url)
        return Subscription(self._nursery, endpoints, self._token, resumption)

    def follow_logs(self, sandbox_id: str, *, tail_bytes: int = 65536) -> LogFollow:
        """The sandbox's output as it is written, on a connection of its own.

        Use as ``async with client.follow_logs(id) as output: async for text in output``:
        the tail, then each chunk written after it, until the sandbox is deleted
        (``output.ended`` says why it stopped). Not resumed across connections: a
        dropped one raises ``ConnectionLostError``.
        """
        stream = p.OutputStream(sandbox_id, tail_bytes=tail_bytes)
        return LogFollow(self._nursery, self.url, self._token, stream)


class LogFollow(p.LogFollowOps):
    """A sandbox's output as it is written; made by Client.follow_logs (protocol.OutputStream
    knows what to send and what each frame means; this class does the I/O)."""

    def __init__(self, nursery: trio.Nursery, url: str, token: str, stream: p.OutputStream):
        self._nursery = nursery
        self._url = url
        self._token = token
        self._stream = stream
        self._ws: WebSocketConnection | None = None
        self._tail: str | None = None
        self._closed = False

    async def open(self) -> None:
        if self._ws is not None or self._closed:
            return
        ws = self._ws = await _connect(self._nursery, self._url, self._token)
        try:
            await ws.send_message(self._stream.request())
            while (logs := self._stream.reply(await ws.get_message())) is None:
                pass
        except ConnectionClosed:
            await self.aclose()
            raise ConnectionLostError(
                f"the connection to {self._url} closed before the reply to sandbox.logs"
            ) from None
        except BaseException:
            await self.aclose()
            raise
        self._truncated = logs.truncated
        self._tail = logs.data

    async def aclose(self) -> None:
        self._closed = True
        ws, self._ws = self._ws, None
        await _close(ws)

    async def __anext__(self) -> str:
        if self._ws is None and not self._closed:
            await self.open()
        if self._tail:
            tail, self._tail = self._tail, None
            return tail
        while self._ws is not None:
            try:
                received = self._stream.receive(await self._ws.get_message())
            except ConnectionClosed:
                await self.aclose()
                raise ConnectionLostError(f"{p.closed(self._url)} while following output") from None
            if isinstance(received, str):
                return received
            if isinstance(received, p.OutputEnd):
                await self.aclose()
        raise StopAsyncIteration


class Subscription(p.SubscriptionOps):
    """An event stream that survives dropped connections; made by Client.subscribe.

    Where it is in the log, and what to send on each connection, is
    ``protocol.Resumption``'s; this class opens the connections and reads them.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        endpoints: p.Endpoints,
        token: str,
        resumption: p.Resumption,
    ) -> None:
        self._nursery = nursery
        self._endpoints = endpoints
        self._token = token
        self._resumption = resumption
        self._ws: WebSocketConnection | None = None
        #: Set once the server said history is sent and the stream is live.
        self.caught_up = trio.Event()
        self._closed = False

    @property
    def url(self) -> str:
        """The URL of the daemon it reads from now (or will try first)."""
        return self._endpoints.current

    async def aclose(self) -> None:
        self._closed = True
        await self._drop()

    async def _drop(self) -> None:
        ws, self._ws = self._ws, None
        await _close(ws)

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
                self._endpoints.lost(self.url)
                await self._drop()
                continue
            if isinstance(received, p.Ended):
                self._endpoints.lost(self.url)
                await self._drop()
            elif self._resumption.caught_up:
                self.caught_up.set()

    async def _reconnect(self) -> None:
        failure: ClientError | None = None
        for delay, url in self._endpoints.attempts():
            await trio.sleep(delay)
            try:
                await self._open(url)
                self._endpoints.connected(url)
                return
            except ClientError as exc:
                if not p.worth_retrying(exc):
                    raise
                failure = exc
                await self._drop()
        assert failure is not None
        raise self._endpoints.gave_up(failure)

    async def _open(self, url: str) -> None:
        ws = self._ws = await _connect(self._nursery, url, self._token, queue=64)
        call = self._resumption.subscribe_call()
        try:
            await ws.send_message(call.encode(p.SUBSCRIBE_ID))
            while (reply := self._resumption.subscribe_reply(await ws.get_message())) is None:
                pass
        except ConnectionClosed:
            raise ConnectionLostError(f"the connection to {url} closed while subscribing") from None
        self._resumption.subscribed(call, reply)
