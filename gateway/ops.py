"""The ops of protocol.md: each one a call of the registry or the log, for one connection.

Written against the connection's public API (connection.py) and the parts the
daemon gives the gateway (``Services``); who sees what is
actors/visibility.py's, and errors are translated by errors.py. ``answer``
turns one request into its reply frame and never raises; ``answer_now`` does the
same, without a wait, for the ops that only read the projection (the
connection's reader calls it, and starts a task with ``answer`` for the rest).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection
from functools import partial
from typing import TYPE_CHECKING, Any, Final, Protocol

import attrs
import orjson
import trio

from sandboxd import __version__
from sandboxd.actors.errors import NotFound
from sandboxd.actors.labels import matches as label_matches
from sandboxd.actors.visibility import knows_sandbox_id, sees_event
from sandboxd.events.log import Page
from sandboxd.events.projection import State, Status, labels_at
from sandboxd.events.subscriptions import EventFilter, Filter, Subscription
from sandboxd.events.types import Event
from sandboxd.gateway import errors
from sandboxd.gateway import protocol as p
from sandboxd.gateway.auth import User
from sandboxd.gateway.connection import Connection, Then
from sandboxd.gateway.metrics import OK

if TYPE_CHECKING:
    from sandboxd.actors.registry import Registry

log = logging.getLogger(__name__)

#: Open subscriptions per connection, event subscriptions (each holds a live buffer in
#: the log) and output follows (each an inotify watch and a file's place) together.
MAX_SUBSCRIPTIONS: Final = 64


class EventLog(Protocol):
    """What the ops use of events.log.EventLog."""

    @property
    def head_seq(self) -> int: ...

    def subscribe(
        self,
        after_seq: int | None,
        event_filter: Filter = None,
        *,
        gate: trio.CapacityLimiter | None = None,
    ) -> Subscription: ...

    async def read_page(
        self, after_seq: int, *, limit: int = 1000, event_filter: Filter = None
    ) -> Page: ...


#: A cluster's hook (daemon/cluster/routing.py): the reply frame and code of the node that
#: must answer a request (the owner of its sandbox, where a start is placed), or None to
#: answer it here.
Forward = Callable[[User, p.Request], Awaitable[tuple[str, str] | None]]


@attrs.frozen
class Services:
    """What the daemon gives the gateway to serve its ops with."""

    registry: Registry
    log: EventLog
    #: When the gateway was made (after recovery): server.info's started_at.
    started_at: str
    forward: Forward | None = None
    #: A cluster's live nodes (those holding a lease), for server.info; None: no cluster.
    nodes: Callable[[], Collection[str]] | None = None


async def answer(
    services: Services, connection: Connection, request: p.Request
) -> tuple[str, str, Then]:
    """The reply frame to ``request``, its code, and what to run once it is queued."""
    try:
        handler = _HANDLERS[type(request.params)]
        # An op that changes state, once taken, runs to its end even if the client
        # leaves: cut off halfway (by the connection's cancel) it could leave an
        # event durable that no one acted on.
        with trio.CancelScope(shield=type(request.params) in _CHANGES_STATE):
            if services.forward is not None:
                forwarded = await services.forward(connection.user, request)
                if forwarded is not None:
                    frame, code = forwarded
                    return frame, code, None
            result, then = await handler(services, connection, request.params)
        return p.encode_ok(request.id, result), OK, then
    except Exception as exc:
        frame, code = _error_reply(connection, request, exc)
        return frame, code, None


def answer_now(
    services: Services, connection: Connection, request: p.Request
) -> tuple[str, str] | None:
    """The reply frame to a request whose op reads the projection and never waits, and its
    code, made here and now (by the connection's reader: no task, no trip through the
    scheduler, where under fan-out a request waited behind a slice of deliveries);
    None for any other op, which ``answer`` answers in a task of its own.

    In a cluster (``forward``) every op goes through ``answer``: whether another node
    must answer it takes a wait to find out.
    """
    handler = _IMMEDIATE.get(type(request.params))
    if handler is None or services.forward is not None:
        return None
    try:
        return p.encode_ok(request.id, handler(services, connection, request.params)), OK
    except Exception as exc:
        return _error_reply(connection, request, exc)


def _error_reply(connection: Connection, request: p.Request, exc: Exception) -> tuple[str, str]:
    error = errors.translate(exc)
    if error is None:
        log.exception("%s: %s failed", connection.name, request.op)
        error = errors.internal()
    return p.encode_error(request.id, error), error.code


_Result = tuple[object, Then]
_Handler = Callable[[Services, Connection, Any], Awaitable[_Result]]
#: An op that reads the projection, answered without a wait: its result.
_Immediate = Callable[[Services, Connection, Any], object]


# -- sandboxes ------------------------------------------------------------------------------


async def _start(s: Services, c: Connection, q: p.SandboxStart) -> _Result:
    info = await s.registry.start_sandbox(
        c.user,
        spec_id=q.spec_id,
        sandbox_id=q.sandbox_id,
        env=q.env,
        wait=q.wait,
        owner=q.owner,
        node=q.node,
        labels=q.labels,
    )
    return info, None


def _get(s: Services, c: Connection, q: p.SandboxGet) -> object:
    # With its usage: four small reads of its cgroup (search and batch_get leave it out).
    return s.registry.get(c.user, q.sandbox_id, usage=True)


def _batch_get(s: Services, c: Connection, q: p.SandboxBatchGet) -> object:
    return s.registry.batch_get(c.user, q.sandbox_ids)


async def _stats(s: Services, c: Connection, q: p.SandboxStats) -> _Result:
    return await s.registry.stats(c.user, q.sandbox_ids), None


def _search(s: Services, c: Connection, q: p.SandboxSearch) -> object:
    status = None if q.status is None else Status(q.status)
    items, next_page_id = s.registry.search(
        c.user, page_id=q.page_id, limit=q.limit, status=status, owner=q.owner, labels=q.labels
    )
    return p.SearchPage(items, next_page_id)


def _find_by_session_key(s: Services, c: Connection, q: p.SandboxFindBySessionKey) -> object:
    return s.registry.get_by_session_key(c.user, q.session_api_key)


async def _pause(s: Services, c: Connection, q: p.SandboxPause) -> _Result:
    return await s.registry.pause(c.user, q.sandbox_id), None


async def _resume(s: Services, c: Connection, q: p.SandboxResume) -> _Result:
    return await s.registry.resume(c.user, q.sandbox_id), None


async def _delete(s: Services, c: Connection, q: p.SandboxDelete) -> _Result:
    return await s.registry.delete(c.user, q.sandbox_id), None


async def _logs(s: Services, c: Connection, q: p.SandboxLogs) -> _Result:
    if q.follow:
        return await _follow_logs(s, c, q)
    release = await _take_read_slot(c)
    try:
        # Reading a file: off the event loop.
        data, truncated = await trio.to_thread.run_sync(
            s.registry.logs, c.user, q.sandbox_id, q.tail_bytes
        )
    except BaseException:
        release()
        raise
    return p.Logs(data, truncated), release


async def _follow_logs(s: Services, c: Connection, q: p.SandboxLogs) -> _Result:
    _check_room_for_a_subscription(c)
    release = await _take_read_slot(c)
    try:
        follow = await s.registry.follow_logs(c.user, q.sandbox_id, q.tail_bytes)
    except NotFound:
        release()
        raise p.ProtocolError(
            p.ErrorCode.NOT_FOUND,
            f"'sandbox_id' {q.sandbox_id} names no sandbox visible to you.",
        ) from None
    except BaseException:
        release()
        raise
    try:
        _check_room_for_a_subscription(c)  # others may have opened while the tail was read
        sub_id, start = c.open_output_follow(follow)
    except BaseException:
        follow.close()
        release()
        raise

    def then() -> None:
        release()
        start()

    return p.FollowedLogs(follow.tail, follow.truncated, sub_id), then


# -- specs and the server -------------------------------------------------------------------


def _spec_list(s: Services, c: Connection, q: p.SpecList) -> object:
    return s.registry.specs_for(c.user)


def _spec_get(s: Services, c: Connection, q: p.SpecGet) -> object:
    return s.registry.spec_for(c.user, q.spec_id)


def _server_info(s: Services, c: Connection, q: p.ServerInfo) -> object:
    boundary = s.registry.boundary
    details = p.ServerDetails(
        version=__version__,
        protocol=1,
        user=c.user.id,
        admin=c.user.admin,
        head_seq=s.log.head_seq,
        started_at=s.started_at,
        boundary=boundary.mode,
        isolation=boundary.isolation,
        limits=boundary.limits_in_force(),
        node=s.registry.config.node_id,
        nodes=None if s.nodes is None else sorted(s.nodes()),
    )
    return details


# -- events ---------------------------------------------------------------------------------


def _event_filter(
    state: State,
    user: User,
    sandbox_id: str | None,
    types: list[str] | None,
    labels: dict[str, str] | None = None,
) -> EventFilter:
    """The filter of a subscription or a read: the request's own, and the user's view.

    ``labels`` are matched against the labels of the life of the event's sandbox id at
    its seq (projection.labels_at): a deleted sandbox's events keep the labels it had.
    The view and the labels are one predicate, both looked up in the projection.
    """
    if sandbox_id is not None and not knows_sandbox_id(user, state, sandbox_id):
        raise p.ProtocolError(
            p.ErrorCode.NOT_FOUND, f"'sandbox_id' {sandbox_id} names no sandbox visible to you."
        )
    visible = None if user.admin else partial(sees_event, user, state)
    if labels:
        visible = partial(_labelled, state, dict(labels), visible)
    return EventFilter(
        sandbox_ids=None if sandbox_id is None else frozenset({sandbox_id}),
        types=frozenset(types) if types else None,
        visible=visible,
    )


def _labelled(
    state: State,
    wanted: dict[str, str],
    visible: Callable[[Event], bool] | None,
    event: Event,
) -> bool:
    """An event of a sandbox that had every label wanted (a daemon event has none)."""
    if event.sandbox_id is None or (visible is not None and not visible(event)):
        return False
    return label_matches(labels_at(state, event.sandbox_id, event.seq), wanted)


async def _subscribe(s: Services, c: Connection, q: p.EventsSubscribe) -> _Result:
    matches = _event_filter(s.registry.state, c.user, q.sandbox_id, q.types, q.labels)
    _check_room_for_a_subscription(c)
    head_seq = s.log.head_seq
    # Absent after_seq: what comes after the head_seq of the reply. Records in
    # hand only with one of the connection's read slots: see connection.py.
    subscription = s.log.subscribe(
        head_seq if q.after_seq is None else q.after_seq, matches, gate=c.read_slots
    )
    sub_id, start = c.open_subscription(subscription, batch=bool(q.batch))
    return p.Subscribed(sub_id, head_seq), start


def _check_room_for_a_subscription(c: Connection) -> None:
    # Event subscriptions and output follows count together.
    if c.subscription_count >= MAX_SUBSCRIPTIONS:
        raise p.ProtocolError(
            p.ErrorCode.LIMIT_EXCEEDED,
            f"This connection has {MAX_SUBSCRIPTIONS} subscriptions, the most it may hold;"
            " unsubscribe from one first.",
        )


async def _unsubscribe(s: Services, c: Connection, q: p.EventsUnsubscribe) -> _Result:
    if not await c.close_subscription(q.subscription):
        raise p.ProtocolError(
            p.ErrorCode.NOT_FOUND,
            f"'subscription' {q.subscription!r} is no open subscription of this connection.",
        )
    return True, None


async def _read(s: Services, c: Connection, q: p.EventsRead) -> _Result:
    matches = _event_filter(s.registry.state, c.user, q.sandbox_id, q.types, q.labels)
    release = await _take_read_slot(c)
    try:
        page = await s.log.read_page(q.after_seq, limit=q.limit, event_filter=matches)
    except BaseException:
        release()
        raise
    # The stored records, spliced in as they are: they carry "v", the schema
    # version, beside the fields of protocol.md (docs/protocol.md says so).
    events = [orjson.Fragment(record.raw) for record in page.records]
    return p.EventPage(events, page.next_after_seq), release


async def _take_read_slot(c: Connection) -> Callable[[], None]:
    """One of the connection's read slots, held until the reply is queued: what gives it
    back. A connection's reads and subscriptions thus hold READ_SLOTS pages at most."""
    borrower = object()
    await c.read_slots.acquire_on_behalf_of(borrower)
    return partial(c.read_slots.release_on_behalf_of, borrower)


_CHANGES_STATE: Final = frozenset(
    {p.SandboxStart, p.SandboxPause, p.SandboxResume, p.SandboxDelete}
)

_IMMEDIATE: Final[dict[type[p.Params], _Immediate]] = {
    p.SandboxGet: _get,
    p.SandboxBatchGet: _batch_get,
    p.SandboxSearch: _search,
    p.SandboxFindBySessionKey: _find_by_session_key,
    p.SpecList: _spec_list,
    p.SpecGet: _spec_get,
    p.ServerInfo: _server_info,
}


def _waiting(handler: _Immediate) -> _Handler:
    """An immediate op as ``answer`` calls it (in a cluster, or wherever it comes first)."""

    async def call(s: Services, c: Connection, q: Any) -> _Result:
        return handler(s, c, q), None

    return call


_HANDLERS: Final[dict[type[p.Params], _Handler]] = {
    **{params: _waiting(handler) for params, handler in _IMMEDIATE.items()},
    p.SandboxStart: _start,
    p.SandboxStats: _stats,
    p.SandboxPause: _pause,
    p.SandboxResume: _resume,
    p.SandboxDelete: _delete,
    p.SandboxLogs: _logs,
    p.EventsSubscribe: _subscribe,
    p.EventsUnsubscribe: _unsubscribe,
    p.EventsRead: _read,
}
