"""The websocket server: protocol.md over trio-websocket, one thin layer around the registry.

Each connection is three kinds of task in one nursery, in the manner of
hypercorn's trio worker:

- the reader, which takes frames off trio-websocket's queue at once (while
  that queue is full trio-websocket answers neither pings nor close frames),
  parses them (protocol.py, no I/O) and starts a task per request;
- one writer, the only task that sends: every reply and subscription frame
  goes through one bounded queue, so a client that stops reading holds at
  most that queue and 64 pending replies, and a connection that stays
  unwritable for SEND_TIMEOUT is closed;
- the keepalive, which pings a connection that has said nothing for
  PING_INTERVAL and closes it if no pong comes within PING_TIMEOUT
  (trio-websocket has no keepalive of its own).

Subscription tasks pull from the log's subscriptions and push into that same
queue; while it is full they simply stop pulling, and the log serves them
from disk when they come back, so a slow reader slows no one else.

Every failure is caught where it happens: an exception escaping one
connection's handler would take the listener and every other connection down
with it. The registry's and the log's errors are translated here, once, into
the protocol's error codes of the same names.

The TCP listener is trio's own and each stream is wrapped by trio-websocket
here (``wrap_server_stream``) rather than by its ``serve_websocket``: that one
keeps a connection open after refusing a frame over the size limit, until the
peer sends again, where here the stream is closed at most CLOSE_TIMEOUT later.
Every stream first passes the front door (front_door.py), which reads its
request head: plain HTTP is answered there, and an upgrade comes here with the
bytes read replayed.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any, Final, Protocol

import attrs
import orjson
import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    wrap_server_stream,
)

from sandboxd import __version__
from sandboxd.actors import errors
from sandboxd.config import Config
from sandboxd.events import types as ev
from sandboxd.events.codec import now_ts
from sandboxd.events.errors import Gone, LogUnavailable
from sandboxd.events.log import Page
from sandboxd.events.projection import Status
from sandboxd.events.segments import Record
from sandboxd.events.subscriptions import CaughtUp, Filter, Subscription
from sandboxd.gateway import protocol as p
from sandboxd.gateway.auth import Authenticator, User, can_see, check_path, token_from_handshake
from sandboxd.gateway.front_door import FrontDoor
from sandboxd.gateway.metrics import INVALID_OP, OK, Metrics
from sandboxd.gateway.routes import Routes
from sandboxd.gateway.static import load_dashboard

if TYPE_CHECKING:
    from sandboxd.actors.registry import Registry

log = logging.getLogger(__name__)

#: Seconds of silence from a client before it is pinged.
PING_INTERVAL: Final = 20.0
#: Seconds a ping waits for its pong before the connection is closed.
PING_TIMEOUT: Final = 20.0
#: Seconds one frame may wait to be written before the connection is closed.
SEND_TIMEOUT: Final = 30.0
#: Frames the writer's queue holds; a full queue makes subscriptions stop pulling.
SEND_QUEUE_FRAMES: Final = 256
#: Frames trio-websocket buffers between its reader and ours.
RECEIVE_QUEUE_FRAMES: Final = 4
#: Open subscriptions per connection: each holds a live buffer in the log.
MAX_SUBSCRIPTIONS: Final = 64
#: Seconds to finish the handshake; seconds to wait for the peer's close frame.
HANDSHAKE_TIMEOUT: Final = 10.0
CLOSE_TIMEOUT: Final = 5.0
#: Seconds close_all gives the `ended` frames to reach a connection.
FAREWELL_TIMEOUT: Final = 2.0
#: Close codes beyond protocol.md's: a client that stopped reading, one that did not pong.
CLOSE_NOT_READING: Final = 1008
CLOSE_NO_PONG: Final = 1011


class EventLog(Protocol):
    """What the gateway uses of events.log.EventLog."""

    @property
    def head_seq(self) -> int: ...

    def subscribe(self, after_seq: int | None, event_filter: Filter = None) -> Subscription: ...

    async def read_page(
        self, after_seq: int, *, limit: int = 1000, event_filter: Filter = None
    ) -> Page: ...


# --- Translating errors, once -----------------------------------------------------------

_CODES: Final[dict[type[Exception], p.ErrorCode]] = {
    errors.BadRequest: p.ErrorCode.BAD_REQUEST,
    errors.NotFound: p.ErrorCode.NOT_FOUND,
    errors.Conflict: p.ErrorCode.CONFLICT,
    errors.LimitExceeded: p.ErrorCode.LIMIT_EXCEEDED,
    errors.Unavailable: p.ErrorCode.UNAVAILABLE,
    LogUnavailable: p.ErrorCode.UNAVAILABLE,
}


def translate(error: Exception) -> p.ProtocolError | None:
    """The protocol error for an error of the registry or the log; None for a bug."""
    if isinstance(error, p.ProtocolError):
        return error
    if isinstance(error, errors.StartFailed):
        return p.ProtocolError(p.ErrorCode.START_FAILED, str(error), sandbox=error.sandbox)
    if isinstance(error, Gone):
        return p.ProtocolError(
            p.ErrorCode.GONE,
            f"The events asked for are older than the retained log, which starts at seq"
            f" {error.oldest_seq}; ask again with after_seq {error.oldest_seq - 1} or later.",
            oldest_seq=error.oldest_seq,
        )
    for cls in type(error).__mro__:
        code = _CODES.get(cls)
        if code is not None:
            return p.ProtocolError(code, str(error))
    return None


def _internal() -> p.ProtocolError:
    return p.ProtocolError(
        p.ErrorCode.INTERNAL, "The daemon hit a bug handling this request; its log has the details."
    )


# --- Who may see what -------------------------------------------------------------------


class Owners:
    """Who created a sandbox, live or deleted: the projection keeps every owner.

    Unknown means invisible to anyone but an admin: the safe side.
    """

    def __init__(self, registry: Registry) -> None:
        self._owners = registry.state.owners

    def visible_to(self, user: User, sandbox_id: str) -> bool:
        return sandbox_id in self._owners and can_see(user, self._owners[sandbox_id])


def event_filter(
    owners: Owners, user: User, sandbox_id: str | None, types: list[str] | None
) -> Callable[[ev.Event], bool]:
    """The predicate of a subscription or a read: the request's filter and the user's view."""
    wanted = frozenset(types) if types else None

    def matches(event: ev.Event) -> bool:
        if wanted is not None and event.type not in wanted:
            return False
        if sandbox_id is not None and event.sandbox_id != sandbox_id:
            return False
        if user.admin:
            return True
        # A user sees the events of its own sandboxes; daemon.* events are nobody's.
        return event.sandbox_id is not None and owners.visible_to(user, event.sandbox_id)

    return matches


# --- The server -------------------------------------------------------------------------


class Gateway:
    """The daemon's websocket front: serve, drain, close_all, as daemon.py uses them."""

    def __init__(
        self,
        config: Config,
        registry: Registry,
        event_log: EventLog,
        authenticator: Authenticator,
        *,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.registry = registry
        self.log = event_log
        self.authenticator = authenticator
        self.owners = Owners(registry)
        self.started_at = now_ts()
        #: The bound port, once serve() has started (the config's may be 0).
        self.port = config.port
        # Read at construction, not import, so a test may set short ones.
        self.ping_interval = PING_INTERVAL
        self.ping_timeout = PING_TIMEOUT
        self.send_timeout = SEND_TIMEOUT
        self._connections: set[_Connection] = set()
        self._connection_ids = itertools.count(1)
        self._draining = False
        self._in_flight = 0
        self._idle = trio.Event()
        self._idle.set()
        self._listening: trio.CancelScope | None = None
        # HTTP hook (issue 13): the front door answers HTTP on the same port and hands
        # websocket upgrades to _handle_stream; the metrics count every reply.
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics.watch_gateway(self)
        routes = Routes(
            load_dashboard(), authenticator, self.metrics, metrics_public=config.metrics_public
        )
        self._front_door = FrontDoor(routes, self._handle_stream)

    @property
    def connection_count(self) -> int:
        """Open websocket connections (a metric)."""
        return len(self._connections)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on config.host:config.port until cancelled; started() once listening."""
        # Bound first and outside any nursery: a port in use is a plain OSError.
        listeners = await trio.open_tcp_listeners(self.config.port, host=self.config.host)
        # With a host name of several addresses and port 0, each listener may get
        # a port of its own; the first is reported.
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as connections:
            # Connections live in their own nursery: drain() stops the listeners
            # alone, and in-flight requests on open connections run on.
            with trio.CancelScope() as self._listening:
                async with trio.open_nursery() as listening:
                    await listening.start(
                        partial(
                            trio.serve_listeners,
                            self._front_door.handle,  # HTTP hook (issue 13): routes each stream
                            listeners,
                            handler_nursery=connections,
                        )
                    )
                    task_status.started()

    async def drain(self) -> None:
        """Stop taking connections and requests (they get `unavailable`); wait for in-flight ops."""
        self._draining = True
        if self._listening is not None:
            self._listening.cancel()
        await self._idle.wait()

    async def close_all(self) -> None:
        """`ended` (reason "shutdown") to every subscription, then close every connection: 1001."""
        self._draining = True
        if self._listening is not None:
            self._listening.cancel()
        async with trio.open_nursery() as nursery:
            for connection in list(self._connections):
                nursery.start_soon(connection.shut_down)

    # -- the handshake --------------------------------------------------------------------

    async def _handle_stream(self, stream: trio.abc.HalfCloseableStream) -> None:
        # One TCP connection: the handshake, the websocket, and the stream closed
        # in the end whatever happened (see the module's docstring).
        try:
            async with trio.open_nursery() as websocket:
                try:
                    request: WebSocketRequest | None = None
                    with trio.move_on_after(HANDSHAKE_TIMEOUT):
                        request = await wrap_server_stream(
                            websocket,
                            stream,
                            message_queue_size=RECEIVE_QUEUE_FRAMES,
                            max_message_size=p.MAX_FRAME_BYTES,
                        )
                    if request is not None:
                        await self._handle(request)
                except ConnectionClosed:
                    pass  # the peer left
                # The peer has this long to finish the closing handshake.
                websocket.cancel_scope.deadline = trio.current_time() + CLOSE_TIMEOUT
        except Exception:
            # Never let it escape: it would take every connection down with it.
            log.exception("websocket connection failed")
        finally:
            await trio.aclose_forcefully(stream)

    async def _handle(self, request: WebSocketRequest) -> None:
        user: User | None = None
        ws: WebSocketConnection | None = None
        with trio.move_on_after(HANDSHAKE_TIMEOUT):
            user = await self._admit(request)
            if user is not None:
                ws = await request.accept()
        if user is None or ws is None:
            return
        connection = _Connection(self, ws, user, next(self._connection_ids))
        self._connections.add(connection)
        log.debug("%s: opened from %s", connection.name, ws.remote)
        try:
            await connection.run()
        finally:
            self._connections.discard(connection)
            log.debug("%s: closed (%s)", connection.name, ws.closed)

    async def _admit(self, request: WebSocketRequest) -> User | None:
        if not check_path(request.path):
            await request.reject(404, body=b"sandboxd speaks its protocol at /v1\n")
            return None
        user = self.authenticator.authenticate(token_from_handshake(request.path, request.headers))
        if user is None:
            await request.reject(
                401,
                extra_headers=[(b"WWW-Authenticate", b'Bearer realm="sandboxd"')],
                body=b"a valid bearer token is required\n",
            )
            return None
        if self._draining:
            await request.reject(503, body=b"sandboxd is shutting down\n")
            return None
        return user

    # -- requests -------------------------------------------------------------------------

    def _begin(self) -> None:
        self._in_flight += 1
        if self._idle.is_set():
            self._idle = trio.Event()

    def _end(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()


class _GoingAway:
    """Queued after the last frame of a connection that close_all closes."""


@attrs.define
class _Subscription:
    id: str
    log: Subscription
    last_seq: int
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    done: trio.Event = attrs.Factory(trio.Event)


class _Connection:
    def __init__(self, gateway: Gateway, ws: WebSocketConnection, user: User, number: int) -> None:
        self.gateway = gateway
        self.ws = ws
        self.user = user
        self.name = f"connection {number} ({user.id or 'admin'})"
        self._send, self._outbox = trio.open_memory_channel[str | _GoingAway](SEND_QUEUE_FRAMES)
        self._in_flight = 0
        self._subscriptions: dict[str, _Subscription] = {}
        self._subscription_ids = itertools.count(1)
        self._last_heard = trio.current_time()
        self._nursery: trio.Nursery | None = None
        self._closed = trio.Event()

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._writer)
                nursery.start_soon(self._keepalive)
                await self._reader()
                nursery.cancel_scope.cancel()
        finally:
            self._closed.set()
            # A subscription whose pump never started (the connection went first)
            # must not stay registered with the log.
            with trio.CancelScope(shield=True):
                for sub in list(self._subscriptions.values()):
                    await sub.log.aclose()

    async def _close(self, code: int, reason: str) -> None:
        """Close the websocket and end every task of this connection."""
        # Bounded: the peer of a slow connection may never send its close frame
        # back; aclose then closes the stream on its way out of the cancel.
        with trio.move_on_after(CLOSE_TIMEOUT):
            await self.ws.aclose(code, reason)
        self._closed.set()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    # -- reading ----------------------------------------------------------------------------

    async def _reader(self) -> None:
        while True:
            try:
                message = await self.ws.get_message()
            except ConnectionClosed:
                return
            self._last_heard = trio.current_time()
            if isinstance(message, bytes):
                await self._close(p.CLOSE_UNSUPPORTED, "binary frames are not accepted")
                return
            # trio-websocket counts characters; the contract counts bytes.
            if len(message) > p.MAX_FRAME_BYTES // 4 and _utf8_len(message) > p.MAX_FRAME_BYTES:
                await self._close(p.CLOSE_TOO_BIG, "frames must be at most 1 MiB")
                return
            await self._receive(message)

    async def _receive(self, message: str) -> None:
        try:
            request = p.parse_request(message)
        except p.RequestError as bad:
            self.gateway.metrics.count_request(INVALID_OP, bad.code)  # metrics hook (issue 13)
            await self._reply(p.encode_error(bad.request_id, bad))
            return
        if self.gateway._draining:
            refusal = p.ProtocolError(
                p.ErrorCode.UNAVAILABLE, "The daemon is shutting down and takes no new requests."
            )
            self.gateway.metrics.count_request(request.op, refusal.code)  # metrics hook (issue 13)
            await self._reply(p.encode_error(request.id, refusal))
            return
        if self._in_flight >= p.MAX_IN_FLIGHT:
            refusal = p.ProtocolError(
                p.ErrorCode.BUSY,
                f"{p.MAX_IN_FLIGHT} requests are already in flight on this connection;"
                " wait for their replies before sending more.",
            )
            self.gateway.metrics.count_request(request.op, refusal.code)  # metrics hook (issue 13)
            await self._reply(p.encode_error(request.id, refusal))
            return
        self._in_flight += 1
        self.gateway._begin()
        assert self._nursery is not None
        self._nursery.start_soon(self._serve_request, request)

    async def _serve_request(self, request: p.Request) -> None:
        try:
            after: Callable[[], None] | None = None
            try:
                handler = _HANDLERS[type(request.params)]
                # An op that changes state, once taken, runs to its end even if the
                # client leaves: cut off halfway (by the connection's cancel) it
                # could leave an event durable that no one acted on.
                with trio.CancelScope(shield=type(request.params) in _CHANGES_STATE):
                    result, after = await handler(self, request.params)
                frame = p.encode_ok(request.id, result)
                code: str = OK
            except Exception as exc:
                error = translate(exc)
                if error is None:
                    log.exception("%s: %s failed", self.name, request.op)
                    error = _internal()
                frame = p.encode_error(request.id, error)
                code = error.code
                after = None
            self.gateway.metrics.count_request(request.op, code)  # metrics hook (issue 13)
            await self._reply(frame)
            if after is not None:
                after()
        except Exception:
            log.exception("%s: the reply to %s failed", self.name, request.op)
        finally:
            self._in_flight -= 1
            self.gateway._end()

    # -- writing ----------------------------------------------------------------------------

    async def _reply(self, frame: str | _GoingAway) -> None:
        # Blocks while the queue is full: the client is not reading, so we stop
        # reading it too, which pushes back on it through TCP.
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            await self._send.send(frame)

    async def _writer(self) -> None:
        async with self._outbox:
            async for frame in self._outbox:
                if isinstance(frame, _GoingAway):
                    # Every frame queued before it is out: now the close frame.
                    await self._close(p.CLOSE_GOING_AWAY, "sandboxd is shutting down")
                    return
                with trio.move_on_after(self.gateway.send_timeout) as waited:
                    try:
                        await self.ws.send_message(frame)
                    except ConnectionClosed:
                        break
                if waited.cancelled_caught:
                    log.warning(
                        "%s: closed, it took no data for %.0f s",
                        self.name,
                        self.gateway.send_timeout,
                    )
                    await self._close(CLOSE_NOT_READING, "the client stopped reading")
                    return
        # The connection is gone: nothing can be said on it any more.
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _keepalive(self) -> None:
        interval, timeout = self.gateway.ping_interval, self.gateway.ping_timeout
        while True:
            due = self._last_heard + interval
            if trio.current_time() < due:
                await trio.sleep_until(due)
                continue
            with trio.move_on_after(timeout) as waited:
                try:
                    await self.ws.ping()
                except ConnectionClosed:
                    return
            if waited.cancelled_caught:
                log.info("%s: closed, no pong within %.0f s", self.name, timeout)
                await self._close(CLOSE_NO_PONG, "no pong")
                return
            self._last_heard = trio.current_time()

    # -- subscriptions ----------------------------------------------------------------------

    def _start_subscription(
        self, subscription: Subscription
    ) -> tuple[_Subscription, Callable[[], None]]:
        sub_id = f"s{next(self._subscription_ids)}"
        sub = _Subscription(sub_id, subscription, subscription.position)
        self._subscriptions[sub.id] = sub

        def start() -> None:
            assert self._nursery is not None
            self._nursery.start_soon(self._pump, sub, subscription)

        return sub, start

    async def _pump(self, sub: _Subscription, subscription: Subscription) -> None:
        reason: str | None = None
        try:
            with sub.scope:
                async with subscription:
                    try:
                        async for item in subscription.items():
                            if isinstance(item, CaughtUp):
                                await self._reply(p.encode_caught_up(sub.id, item.seq))
                            else:
                                await self._reply(p.encode_event_frame(sub.id, item.raw))
                            # Only what is queued counts: an item taken but cut off
                            # on its way to the queue must be sent again on resume.
                            sub.last_seq = subscription.position
                    except Gone as gone:
                        reason = (
                            "the log's retention overtook this subscription; events from seq"
                            f" {gone.oldest_seq} on are still there"
                        )
                    except LogUnavailable as exc:
                        reason = f"the event log is unavailable: {exc}"
                    else:
                        reason = "the event log has closed"
                    # Not cut off while sending: everything up to position is passed.
                    sub.last_seq = subscription.position
                if reason is not None:
                    await self._reply(p.encode_ended(sub.id, reason, sub.last_seq))
        except Exception:
            log.exception("%s: subscription %s failed", self.name, sub.id)
            with trio.move_on_after(FAREWELL_TIMEOUT):
                await self._reply(p.encode_ended(sub.id, "internal error", sub.last_seq))
        finally:
            self._subscriptions.pop(sub.id, None)
            sub.done.set()

    async def shut_down(self) -> None:
        """close_all's part for this connection: `ended` for each subscription, then 1001."""
        try:
            subs = list(self._subscriptions.values())
            for sub in subs:
                sub.scope.cancel()
            with trio.move_on_after(FAREWELL_TIMEOUT):
                for sub in subs:
                    await sub.done.wait()
                    await self._reply(p.encode_ended(sub.id, "shutdown", sub.last_seq))
                await self._reply(_GoingAway())
                await self._closed.wait()
            # A client too slow to take its farewell in time is closed all the same.
            await self._close(p.CLOSE_GOING_AWAY, "sandboxd is shutting down")
        except Exception:
            log.exception("%s: closing failed", self.name)


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


# --- The ops ----------------------------------------------------------------------------

_Result = tuple[object, Callable[[], None] | None]
_Handler = Callable[["_Connection", Any], Awaitable[_Result]]


async def _start(c: _Connection, q: p.SandboxStart) -> _Result:
    info = await c.gateway.registry.start_sandbox(
        c.user, spec_id=q.spec_id, sandbox_id=q.sandbox_id, env=q.env, wait=q.wait
    )
    return info, None


async def _get(c: _Connection, q: p.SandboxGet) -> _Result:
    return c.gateway.registry.get(c.user, q.sandbox_id), None


async def _batch_get(c: _Connection, q: p.SandboxBatchGet) -> _Result:
    return c.gateway.registry.batch_get(c.user, q.sandbox_ids), None


async def _search(c: _Connection, q: p.SandboxSearch) -> _Result:
    status = None if q.status is None else Status(q.status)
    items, next_page_id = c.gateway.registry.search(
        c.user, page_id=q.page_id, limit=q.limit, status=status
    )
    return {"items": items, "next_page_id": next_page_id}, None


async def _pause(c: _Connection, q: p.SandboxPause) -> _Result:
    return await c.gateway.registry.pause(c.user, q.sandbox_id), None


async def _resume(c: _Connection, q: p.SandboxResume) -> _Result:
    return await c.gateway.registry.resume(c.user, q.sandbox_id), None


async def _delete(c: _Connection, q: p.SandboxDelete) -> _Result:
    return await c.gateway.registry.delete(c.user, q.sandbox_id), None


async def _logs(c: _Connection, q: p.SandboxLogs) -> _Result:
    # Reading a file: off the event loop.
    data, truncated = await trio.to_thread.run_sync(
        c.gateway.registry.logs, c.user, q.sandbox_id, q.tail_bytes
    )
    return {"data": data, "truncated": truncated}, None


async def _spec_list(c: _Connection, q: p.SpecList) -> _Result:
    return c.gateway.registry.specs_for(c.user), None


async def _spec_get(c: _Connection, q: p.SpecGet) -> _Result:
    return c.gateway.registry.spec_for(c.user, q.spec_id), None


async def _server_info(c: _Connection, q: p.ServerInfo) -> _Result:
    return {
        "version": __version__,
        "protocol": 1,
        "user": c.user.id,
        "admin": c.user.admin,
        "head_seq": c.gateway.log.head_seq,
        "started_at": c.gateway.started_at,
    }, None


def _check_sandbox_filter(c: _Connection, sandbox_id: str | None) -> None:
    if sandbox_id is not None and not c.gateway.owners.visible_to(c.user, sandbox_id):
        raise p.ProtocolError(
            p.ErrorCode.NOT_FOUND, f"'sandbox_id' {sandbox_id} names no sandbox visible to you."
        )


async def _subscribe(c: _Connection, q: p.EventsSubscribe) -> _Result:
    _check_sandbox_filter(c, q.sandbox_id)
    if len(c._subscriptions) >= MAX_SUBSCRIPTIONS:
        raise p.ProtocolError(
            p.ErrorCode.LIMIT_EXCEEDED,
            f"This connection has {MAX_SUBSCRIPTIONS} subscriptions, the most it may hold;"
            " unsubscribe from one first.",
        )
    head_seq = c.gateway.log.head_seq
    matches = event_filter(c.gateway.owners, c.user, q.sandbox_id, q.types)
    # Absent after_seq: what comes after the head_seq of the reply.
    subscription = c.gateway.log.subscribe(
        head_seq if q.after_seq is None else q.after_seq, matches
    )
    sub, start = c._start_subscription(subscription)
    return {"subscription": sub.id, "head_seq": head_seq}, start


async def _unsubscribe(c: _Connection, q: p.EventsUnsubscribe) -> _Result:
    sub = c._subscriptions.get(q.subscription)
    if sub is None:
        raise p.ProtocolError(
            p.ErrorCode.NOT_FOUND,
            f"'subscription' {q.subscription!r} is no open subscription of this connection.",
        )
    sub.scope.cancel()
    # Once the pump is gone no frame of it can follow the reply.
    await sub.done.wait()
    return True, None


async def _read(c: _Connection, q: p.EventsRead) -> _Result:
    _check_sandbox_filter(c, q.sandbox_id)
    matches = event_filter(c.gateway.owners, c.user, q.sandbox_id, q.types)
    page = await c.gateway.log.read_page(q.after_seq, limit=q.limit, event_filter=matches)
    return {
        "events": [_raw_event(record) for record in page.records],
        "next_after_seq": page.next_after_seq,
    }, None


_CHANGES_STATE: Final = frozenset(
    {p.SandboxStart, p.SandboxPause, p.SandboxResume, p.SandboxDelete}
)

_HANDLERS: Final[dict[type[p.Params], _Handler]] = {
    p.SandboxStart: _start,
    p.SandboxGet: _get,
    p.SandboxBatchGet: _batch_get,
    p.SandboxSearch: _search,
    p.SandboxPause: _pause,
    p.SandboxResume: _resume,
    p.SandboxDelete: _delete,
    p.SandboxLogs: _logs,
    p.SpecList: _spec_list,
    p.SpecGet: _spec_get,
    p.ServerInfo: _server_info,
    p.EventsSubscribe: _subscribe,
    p.EventsUnsubscribe: _unsubscribe,
    p.EventsRead: _read,
}


# --- What the log's reads yield ---------------------------------------------------------


def _raw_event(record: Record) -> orjson.Fragment:
    # The stored record, spliced in as it is: it carries "v", the schema
    # version, beside the fields of protocol.md (docs/protocol.md says so).
    return orjson.Fragment(record.raw)
