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

import itertools
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, Final, TypeVar

import orjson
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
    SearchPage,
    ServerDetails,
    SpecInfo,
    StartFailedError,
    UnavailableError,
    UnknownOpError,
    calls,
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

CONNECT_TIMEOUT: Final = 10.0
#: A subscription's reconnects: the first waits this long, each next one twice as long...
RECONNECT_FIRST_DELAY: Final = 0.1
#: ... up to this long ...
RECONNECT_MAX_DELAY: Final = 5.0
#: ... and after this many failed attempts in a row the subscription gives up.
RECONNECT_ATTEMPTS: Final = 10


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
        with trio.fail_after(CONNECT_TIMEOUT):
            ws: WebSocketConnection = await nursery.start(_run_connection, url, token, queue)
            return ws
    except trio.TooSlowError:
        raise ConnectError(
            f"cannot reach sandboxd at {url}: no answer within {CONNECT_TIMEOUT:.0f} s", url
        ) from None


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
                max_message_size=64 << 20,  # replies may be bigger than a request may be
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
        if exc.status_code == 401:
            return AuthenticationError(f"sandboxd at {url} refused the token (HTTP 401)", url)
        # The body says why (404: the path; 429: too many connections of this user).
        why = (exc.body or b"").decode("utf-8", "replace").strip()
        return ConnectError(
            f"sandboxd at {url} refused the connection (HTTP {exc.status_code}"
            + (f": {why})" if why else ")"),
            url,
        )
    if isinstance(exc, OSError | HandshakeError | ConnectionClosed):
        return ConnectError(f"cannot reach sandboxd at {url}: {exc or type(exc).__name__}", url)
    if isinstance(exc, ValueError):  # a malformed URL
        return ConnectError(f"{url!r} is not a websocket URL: {exc}", url)
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


class Client:
    """Made by open_client; each method is one op of protocol.md (protocol.calls)."""

    def __init__(self, nursery: trio.Nursery, ws: WebSocketConnection, url: str, token: str):
        self._nursery = nursery
        self._ws = ws
        self.url = url
        self._token = token
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._slots = trio.Semaphore(p.MAX_IN_FLIGHT)
        self._lost: str | None = None

    async def aclose(self) -> None:
        with trio.move_on_after(2):
            await self._ws.aclose()

    async def _read_replies(self) -> None:
        try:
            while True:
                frame = p.parse_frame(await self._ws.get_message())
                # Anything but a reply is a frame of a subscription made with request():
                # subscribe() has a connection of its own.
                if isinstance(frame, p.Reply) and type(frame.id) is int:
                    pending = self._pending.pop(frame.id, None)
                    if pending is not None:
                        pending.reply = frame
                        pending.done.set()
        except ConnectionClosed as exc:
            reason = exc.reason
            self._lost = f"the connection to {self.url} closed" + (
                f" (code {reason.code}{': ' + reason.reason if reason.reason else ''})"
                if reason is not None
                else ""
            )
        except MalformedFrameError as exc:
            self._lost = f"{self.url} sent a frame that is not a protocol reply: {exc}"
            await self.aclose()
        for pending in self._pending.values():
            pending.done.set()
        self._pending.clear()

    async def call(self, call: p.Call[T]) -> T:
        """Send one op and return its typed result, or raise the error of its reply."""
        return call.result(await self._exchange(call.op, call.encode))

    async def request(self, op: str, params: Mapping[str, Any] | None = None) -> Any:
        """Any op, unchecked: its result as JSON, or the error of its reply raised."""

        def encode(request_id: int) -> str:
            return orjson.dumps({"id": request_id, "op": op, **(params or {})}).decode()

        reply = await self._exchange(op, encode)
        if not reply.ok:
            raise reply.exception()
        return reply.result

    async def _exchange(self, op: str, encode: Callable[[int], str]) -> p.Reply:
        async with self._slots:
            if self._lost is not None:
                raise ConnectionLostError(self._lost)
            request_id = next(self._ids)
            pending = self._pending[request_id] = _Pending()
            try:
                await self._ws.send_message(encode(request_id))
                await pending.done.wait()
            except ConnectionClosed:
                pass
            finally:
                self._pending.pop(request_id, None)
            if pending.reply is None:
                raise ConnectionLostError(
                    self._lost or f"the connection to {self.url} closed before the reply to {op}"
                )
            return pending.reply

    # -- sandboxes ----------------------------------------------------------------------

    async def start(
        self,
        *,
        spec_id: str | None = None,
        sandbox_id: str | None = None,
        env: Mapping[str, str] | None = None,
        wait: bool = True,
    ) -> SandboxInfo:
        return await self.call(
            calls.start(spec_id=spec_id, sandbox_id=sandbox_id, env=env, wait=wait)
        )

    async def get(self, sandbox_id: str) -> SandboxInfo | None:
        return await self.call(calls.get(sandbox_id))

    async def batch_get(self, sandbox_ids: list[str]) -> list[SandboxInfo | None]:
        return await self.call(calls.batch_get(sandbox_ids))

    async def search(
        self, *, page_id: str | None = None, limit: int = 100, status: str | None = None
    ) -> SearchPage:
        return await self.call(calls.search(page_id=page_id, limit=limit, status=status))

    async def search_all(self, *, status: str | None = None) -> AsyncIterator[SandboxInfo]:
        """Every visible sandbox, newest first, page by page."""
        page_id: str | None = None
        while True:
            page = await self.search(page_id=page_id, status=status)
            for item in page.items:
                yield item
            if page.next_page_id is None:
                return
            page_id = page.next_page_id

    async def pause(self, sandbox_id: str) -> SandboxInfo:
        return await self.call(calls.pause(sandbox_id))

    async def resume(self, sandbox_id: str) -> SandboxInfo:
        return await self.call(calls.resume(sandbox_id))

    async def delete(self, sandbox_id: str) -> bool:
        return await self.call(calls.delete(sandbox_id))

    async def logs(self, sandbox_id: str, *, tail_bytes: int = 65536) -> Logs:
        return await self.call(calls.logs(sandbox_id, tail_bytes=tail_bytes))

    # -- specs and the server -----------------------------------------------------------

    async def specs(self) -> list[SpecInfo]:
        return await self.call(calls.spec_list())

    async def spec(self, spec_id: str) -> SpecInfo | None:
        return await self.call(calls.spec_get(spec_id))

    async def server_info(self) -> ServerDetails:
        return await self.call(calls.server_info())

    # -- events -------------------------------------------------------------------------

    async def read_events(
        self,
        after_seq: int,
        *,
        limit: int = 1000,
        sandbox_id: str | None = None,
        types: list[str] | None = None,
    ) -> EventPage[Event]:
        return await self.call(
            calls.read_events(after_seq, limit=limit, sandbox_id=sandbox_id, types=types)
        )

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
        The server sends them several to a frame (``batch``; False: one a frame, as
        a server before batch frames does).
        """
        call = calls.subscribe(after_seq, sandbox_id=sandbox_id, types=types, batch=batch)
        params = call.params
        assert isinstance(params, p.EventsSubscribe)  # checked now, sent on each (re)connect
        return Subscription(self._nursery, self.url, self._token, params)


class Subscription:
    """An event stream that survives dropped connections; made by Client.subscribe."""

    def __init__(
        self, nursery: trio.Nursery, url: str, token: str, params: p.EventsSubscribe
    ) -> None:
        self._nursery = nursery
        self._url = url
        self._token = token
        self._params = params
        self._ws: WebSocketConnection | None = None
        self._sub_id: str | None = None
        #: The seq to resume after: the last delivered, else where the stream began.
        self.last_seq: int | None = params.after_seq
        #: The head_seq of the first subscribe reply (None until connected).
        self.head_seq: int | None = None
        #: Set once the server said history is sent and the stream is live.
        self.caught_up = trio.Event()
        self.reconnects = 0
        self._closed = False
        #: Events of a batch frame not handed out yet.
        self._pending: deque[p.EventFrame] = deque()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> Subscription:
        return self

    async def open(self) -> None:
        """Connect and subscribe now (iterating does it on demand): ``head_seq`` is then set."""
        if self._ws is None and not self._closed:
            await self._reconnect()

    async def aclose(self) -> None:
        self._closed = True
        await self._drop()

    async def _drop(self) -> None:
        # What is left of a batch is sent again after the reconnect, from last_seq on.
        self._pending.clear()
        ws, self._ws = self._ws, None
        if ws is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await ws.aclose()

    async def __anext__(self) -> Event:
        while True:
            if self._closed:
                raise StopAsyncIteration
            while self._pending:  # the rest of a batch frame
                pending = self._pending.popleft()
                if self.last_seq is not None and pending.seq <= self.last_seq:
                    continue  # seen before the reconnect
                self.last_seq = pending.seq
                event = pending.event()
                if event is not None:
                    return event
            if self._ws is None:
                await self._reconnect()
            assert self._ws is not None
            try:
                frame = p.parse_frame(await self._ws.get_message())
            except ConnectionClosed:
                await self._drop()
                continue
            if isinstance(frame, p.Reply) or frame.subscription != self._sub_id:
                continue
            if isinstance(frame, p.EventFrame):
                self._pending.append(frame)
            elif isinstance(frame, p.EventsFrame):
                self._pending.extend(frame.events)
            elif isinstance(frame, p.CaughtUpFrame):
                self.caught_up.set()
            else:
                # Shutdown or a lagging stream overtaken: resubscribing tells which
                # (a restarted daemon continues, a `gone` is raised).
                log.info("subscription ended by the server: %s", frame.reason)
                await self._drop()

    async def _reconnect(self) -> None:
        delay = RECONNECT_FIRST_DELAY
        failure: ClientError | None = None
        for attempt in range(RECONNECT_ATTEMPTS):
            if attempt:
                await trio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_DELAY)
            try:
                await self._open()
                return
            except (ConnectError, ConnectionLostError, UnavailableError, BusyError) as exc:
                if isinstance(exc, AuthenticationError):
                    raise
                failure = exc
                await self._drop()
        assert failure is not None
        raise ConnectionLostError(
            f"the subscription gave up after {RECONNECT_ATTEMPTS} attempts: {failure}"
        )

    async def _open(self) -> None:
        ws = self._ws = await _connect(self._nursery, self._url, self._token, queue=64)
        if self.head_seq is not None:
            self.reconnects += 1
        params = self._params
        call = calls.subscribe(
            params.after_seq if self.last_seq is None else self.last_seq,
            sandbox_id=params.sandbox_id,
            types=params.types,
            batch=bool(params.batch),
        )
        try:
            await ws.send_message(call.encode(1))
            while True:
                reply = p.parse_frame(await ws.get_message())
                if isinstance(reply, p.Reply) and reply.id == 1:
                    break
        except ConnectionClosed:
            raise ConnectionLostError(
                f"the connection to {self._url} closed while subscribing"
            ) from None
        subscribed = call.result(reply)
        self._sub_id = subscribed.subscription
        if self.head_seq is None:
            self.head_seq = subscribed.head_seq
            if self.last_seq is None:
                # A stream "from now on" that is cut before its first event goes
                # on from where it began, not from the new now.
                self.last_seq = self.head_seq
