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
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, ClassVar, Final, TypeVar

import attrs
import orjson
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    connect_websocket_url,
)

from sandboxd.actors.info import SandboxInfo, SpecInfo
from sandboxd.events import codec
from sandboxd.events.types import BY_TYPE, SCHEMA_VERSION, Event
from sandboxd.gateway import protocol as p

log = logging.getLogger(__name__)

T = TypeVar("T")

CONNECT_TIMEOUT: Final = 10.0
#: A subscription's reconnects: the first waits this long, each next one twice as long...
RECONNECT_FIRST_DELAY: Final = 0.1
#: ... up to this long ...
RECONNECT_MAX_DELAY: Final = 5.0
#: ... and after this many failed attempts in a row the subscription gives up.
RECONNECT_ATTEMPTS: Final = 10

_ENVELOPE = ("v", "seq", "ts", "type", "sandbox_id", "by", "data")


# --- Errors: one type per code ----------------------------------------------------------


class ClientError(Exception):
    """Base of everything this client raises; ``str()`` is the one-sentence reason."""

    code: ClassVar[str | None] = None

    def __init__(self, message: str, error: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: The whole error object of the reply, for fields a newer server adds.
        self.error: Mapping[str, Any] = error or {}


class ConnectError(ClientError):
    """The daemon cannot be reached, or refused the handshake."""

    def __init__(self, message: str, url: str) -> None:
        super().__init__(message)
        self.url = url


class AuthenticationError(ConnectError):
    """The daemon refused the token (HTTP 401)."""


class ConnectionLostError(ClientError):
    """The connection dropped before the reply came; the op may or may not have happened."""


class BadRequestError(ClientError):
    code = "bad_request"


class UnknownOpError(ClientError):
    code = "unknown_op"


class NotFoundError(ClientError):
    code = "not_found"


class ConflictError(ClientError):
    code = "conflict"


class StartFailedError(ClientError):
    code = "start_failed"

    def __init__(self, message: str, error: Mapping[str, Any] | None = None) -> None:
        super().__init__(message, error)
        raw = self.error.get("sandbox")
        #: The sandbox that failed to start, status ERROR (None if the server sent none).
        self.sandbox: SandboxInfo | None = (
            None if raw is None else p.converter.structure(raw, SandboxInfo)
        )


class LimitExceededError(ClientError):
    code = "limit_exceeded"


class GoneError(ClientError):
    code = "gone"

    def __init__(self, message: str, error: Mapping[str, Any] | None = None) -> None:
        super().__init__(message, error)
        oldest = self.error.get("oldest_seq")
        #: The oldest seq the log still holds.
        self.oldest_seq: int | None = oldest if isinstance(oldest, int) else None


class BusyError(ClientError):
    code = "busy"


class UnavailableError(ClientError):
    code = "unavailable"


class InternalError(ClientError):
    code = "internal"


_ERRORS: Final[dict[str, type[ClientError]]] = {
    cls.code: cls
    for cls in (
        BadRequestError,
        UnknownOpError,
        NotFoundError,
        ConflictError,
        StartFailedError,
        LimitExceededError,
        GoneError,
        BusyError,
        UnavailableError,
        InternalError,
    )
    if cls.code is not None
}


def error_from_reply(error: Mapping[str, Any]) -> ClientError:
    """The exception for a reply's error object; an unknown code gives a plain ClientError."""
    code = error.get("code")
    message = str(error.get("message") or code or "the server gave no reason")
    cls = _ERRORS.get(code) if isinstance(code, str) else None
    return ClientError(message, error) if cls is None else cls(message, error)


# --- Results that are not SandboxInfo or SpecInfo ---------------------------------------


@attrs.frozen
class SearchPage:
    items: list[SandboxInfo]
    next_page_id: str | None


@attrs.frozen
class Logs:
    data: str
    truncated: bool


@attrs.frozen
class ServerInfo:
    version: str
    protocol: int
    user: str | None
    admin: bool
    head_seq: int
    started_at: str


@attrs.frozen
class EventPage:
    events: list[Event]
    next_after_seq: int


def decode_event(raw: Mapping[str, Any]) -> Event | None:
    """An event of the wire; None for a type this client does not know (a newer server's)."""
    record = {key: raw[key] for key in _ENVELOPE if key in raw}
    # The server forwards its log's records, which carry "v"; one that does
    # not is of the current version. Fields beyond the envelope are extensions.
    record.setdefault("v", SCHEMA_VERSION)
    try:
        return codec.event_from_dict(record)
    except codec.DecodeError as exc:
        if raw.get("type") not in BY_TYPE:
            log.debug("skipping event %s of unknown type %r", raw.get("seq"), raw.get("type"))
            return None
        raise ClientError(f"event {raw.get('seq')} is not what protocol.md says: {exc}") from exc


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
        self.reply: dict[str, Any] | None = None


class Client:
    """Made by open_client; each method is one op of protocol.md."""

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
                frame = orjson.loads(await self._ws.get_message())
                request_id = frame.get("id") if isinstance(frame, dict) else None
                pending = self._pending.pop(request_id, None) if type(request_id) is int else None
                if pending is not None:
                    pending.reply = frame
                    pending.done.set()
                # Anything else is a frame of a subscription made with request():
                # subscribe() has a connection of its own.
        except ConnectionClosed as exc:
            reason = exc.reason
            self._lost = f"the connection to {self.url} closed" + (
                f" (code {reason.code}{': ' + reason.reason if reason.reason else ''})"
                if reason is not None
                else ""
            )
        except orjson.JSONDecodeError:
            self._lost = f"{self.url} sent a frame that is not a protocol reply"
            await self.aclose()
        for pending in self._pending.values():
            pending.done.set()
        self._pending.clear()

    async def request(self, op: str, params: Mapping[str, Any] | None = None) -> Any:
        """Send one request and return its result, or raise the error of its reply."""
        async with self._slots:
            if self._lost is not None:
                raise ConnectionLostError(self._lost)
            request_id = next(self._ids)
            pending = self._pending[request_id] = _Pending()
            frame = orjson.dumps({"id": request_id, "op": op, **(params or {})}).decode()
            try:
                await self._ws.send_message(frame)
                await pending.done.wait()
            except ConnectionClosed:
                pass
            finally:
                self._pending.pop(request_id, None)
            reply = pending.reply
            if reply is None:
                raise ConnectionLostError(
                    self._lost or f"the connection to {self.url} closed before the reply to {op}"
                )
        if reply.get("ok") is True:
            return reply.get("result")
        error = reply.get("error")
        raise error_from_reply(error if isinstance(error, dict) else {})

    async def _call(self, params: p.Params) -> Any:
        body = p.converter.unstructure(params)
        return await self.request(params.OP, {k: v for k, v in body.items() if v is not None})

    async def _typed(self, params: p.Params, cls: type[T]) -> T:
        return _structure(await self._call(params), cls, params.OP)

    # -- sandboxes ----------------------------------------------------------------------

    async def start(
        self,
        *,
        spec_id: str | None = None,
        sandbox_id: str | None = None,
        env: Mapping[str, str] | None = None,
        wait: bool = True,
    ) -> SandboxInfo:
        params = _build(
            p.SandboxStart,
            spec_id=spec_id,
            sandbox_id=sandbox_id,
            env=None if env is None else dict(env),
            wait=wait,
        )
        return await self._typed(params, SandboxInfo)

    async def get(self, sandbox_id: str) -> SandboxInfo | None:
        result = await self._call(_build(p.SandboxGet, sandbox_id=sandbox_id))
        return None if result is None else _structure(result, SandboxInfo, p.SandboxGet.OP)

    async def batch_get(self, sandbox_ids: list[str]) -> list[SandboxInfo | None]:
        params = _build(p.SandboxBatchGet, sandbox_ids=list(sandbox_ids))
        return await self._typed(params, list[SandboxInfo | None])

    async def search(
        self, *, page_id: str | None = None, limit: int = 100, status: str | None = None
    ) -> SearchPage:
        params = _build(p.SandboxSearch, page_id=page_id, limit=limit, status=status)
        return await self._typed(params, SearchPage)

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
        return await self._typed(_build(p.SandboxPause, sandbox_id=sandbox_id), SandboxInfo)

    async def resume(self, sandbox_id: str) -> SandboxInfo:
        return await self._typed(_build(p.SandboxResume, sandbox_id=sandbox_id), SandboxInfo)

    async def delete(self, sandbox_id: str) -> bool:
        return await self._typed(_build(p.SandboxDelete, sandbox_id=sandbox_id), bool)

    async def logs(self, sandbox_id: str, *, tail_bytes: int = 65536) -> Logs:
        params = _build(p.SandboxLogs, sandbox_id=sandbox_id, tail_bytes=tail_bytes)
        return await self._typed(params, Logs)

    # -- specs and the server -----------------------------------------------------------

    async def specs(self) -> list[SpecInfo]:
        return await self._typed(p.SpecList(), list[SpecInfo])

    async def spec(self, spec_id: str) -> SpecInfo | None:
        result = await self._call(_build(p.SpecGet, spec_id=spec_id))
        return None if result is None else _structure(result, SpecInfo, p.SpecGet.OP)

    async def server_info(self) -> ServerInfo:
        return await self._typed(p.ServerInfo(), ServerInfo)

    # -- events -------------------------------------------------------------------------

    async def read_events(
        self,
        after_seq: int,
        *,
        limit: int = 1000,
        sandbox_id: str | None = None,
        types: list[str] | None = None,
    ) -> EventPage:
        params = _build(
            p.EventsRead, after_seq=after_seq, limit=limit, sandbox_id=sandbox_id, types=types
        )
        result = await self._call(params)
        events = [decode_event(raw) for raw in result["events"]]
        return EventPage([e for e in events if e is not None], result["next_after_seq"])

    def subscribe(
        self,
        after_seq: int | None = None,
        *,
        sandbox_id: str | None = None,
        types: list[str] | None = None,
    ) -> Subscription:
        """Events with seq > after_seq (None: from now on), on a connection of their own.

        Use as ``async with client.subscribe(...) as events: async for event in events``.
        """
        params = _build(p.EventsSubscribe, after_seq=after_seq, sandbox_id=sandbox_id, types=types)
        return Subscription(self._nursery, self.url, self._token, params)


def _structure(result: Any, cls: type[T], op: str) -> T:
    try:
        return p.converter.structure(result, cls)
    except Exception as exc:
        raise ClientError(f"the result of {op} is not what protocol.md says: {exc}") from exc


def _build(cls: type[T], **values: Any) -> T:
    # The protocol's own validators check the params before they leave.
    try:
        return cls(**{k: v for k, v in values.items() if v is not None})
    except p.ProtocolError as exc:
        raise BadRequestError(exc.message) from None


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
        ws, self._ws = self._ws, None
        if ws is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await ws.aclose()

    async def __anext__(self) -> Event:
        while True:
            if self._closed:
                raise StopAsyncIteration
            if self._ws is None:
                await self._reconnect()
            assert self._ws is not None
            try:
                frame = orjson.loads(await self._ws.get_message())
            except ConnectionClosed:
                await self._drop()
                continue
            if not isinstance(frame, dict) or frame.get("subscription") != self._sub_id:
                continue
            if "event" in frame:
                raw = frame["event"]
                seq = raw.get("seq") if isinstance(raw, dict) else None
                if not isinstance(seq, int) or (self.last_seq is not None and seq <= self.last_seq):
                    continue  # seen before the reconnect
                self.last_seq = seq
                event = decode_event(raw)
                if event is not None:
                    return event
            elif frame.get("caught_up"):
                self.caught_up.set()
            elif frame.get("ended"):
                # Shutdown or a lagging stream overtaken: resubscribing tells which
                # (a restarted daemon continues, a `gone` is raised).
                log.info("subscription ended by the server: %s", frame.get("reason"))
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
        body = {k: v for k, v in p.converter.unstructure(params).items() if v is not None}
        if self.last_seq is not None:
            body["after_seq"] = self.last_seq
        try:
            await ws.send_message(orjson.dumps({"id": 1, "op": params.OP, **body}).decode())
            while True:
                reply = orjson.loads(await ws.get_message())
                if isinstance(reply, dict) and reply.get("id") == 1:
                    break
        except ConnectionClosed:
            raise ConnectionLostError(
                f"the connection to {self._url} closed while subscribing"
            ) from None
        if reply.get("ok") is not True:
            error = reply.get("error")
            raise error_from_reply(error if isinstance(error, dict) else {})
        result = reply["result"]
        self._sub_id = result["subscription"]
        if self.head_seq is None:
            self.head_seq = result["head_seq"]
            if self.last_seq is None:
                # A stream "from now on" that is cut before its first event goes
                # on from where it began, not from the new now.
                self.last_seq = self.head_seq
