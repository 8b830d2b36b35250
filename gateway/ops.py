"""The ops of protocol.md: each one a call of the registry or the log, for one connection.

Written against the connection's public API (connection.py) and the parts the
daemon gives the gateway (``Services``); who sees what is
actors/visibility.py's, and errors are translated by errors.py. ``answer``
turns one request into its reply frame and never raises.
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
from sandboxd.actors.visibility import knows_sandbox_id, sees_event
from sandboxd.events.log import Page
from sandboxd.events.projection import State, Status
from sandboxd.events.subscriptions import EventFilter, Filter, Subscription
from sandboxd.gateway import errors
from sandboxd.gateway import protocol as p
from sandboxd.gateway.auth import User
from sandboxd.gateway.connection import Connection, Then
from sandboxd.gateway.metrics import OK

if TYPE_CHECKING:
    from sandboxd.actors.registry import Registry

log = logging.getLogger(__name__)

#: Open subscriptions per connection: each holds a live buffer in the log.
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
        error = errors.translate(exc)
        if error is None:
            log.exception("%s: %s failed", connection.name, request.op)
            error = errors.internal()
        return p.encode_error(request.id, error), error.code, None


_Result = tuple[object, Then]
_Handler = Callable[[Services, Connection, Any], Awaitable[_Result]]


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
    )
    return info, None


async def _get(s: Services, c: Connection, q: p.SandboxGet) -> _Result:
    # With its usage: four small reads of its cgroup (search and batch_get leave it out).
    return s.registry.get(c.user, q.sandbox_id, usage=True), None


async def _batch_get(s: Services, c: Connection, q: p.SandboxBatchGet) -> _Result:
    return s.registry.batch_get(c.user, q.sandbox_ids), None


async def _stats(s: Services, c: Connection, q: p.SandboxStats) -> _Result:
    return await s.registry.stats(c.user, q.sandbox_ids), None


async def _search(s: Services, c: Connection, q: p.SandboxSearch) -> _Result:
    status = None if q.status is None else Status(q.status)
    items, next_page_id = s.registry.search(
        c.user, page_id=q.page_id, limit=q.limit, status=status, owner=q.owner
    )
    return p.SearchPage(items, next_page_id), None


async def _find_by_session_key(s: Services, c: Connection, q: p.SandboxFindBySessionKey) -> _Result:
    return s.registry.get_by_session_key(c.user, q.session_api_key), None


async def _pause(s: Services, c: Connection, q: p.SandboxPause) -> _Result:
    return await s.registry.pause(c.user, q.sandbox_id), None


async def _resume(s: Services, c: Connection, q: p.SandboxResume) -> _Result:
    return await s.registry.resume(c.user, q.sandbox_id), None


async def _delete(s: Services, c: Connection, q: p.SandboxDelete) -> _Result:
    return await s.registry.delete(c.user, q.sandbox_id), None


async def _logs(s: Services, c: Connection, q: p.SandboxLogs) -> _Result:
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


# -- specs and the server -------------------------------------------------------------------


async def _spec_list(s: Services, c: Connection, q: p.SpecList) -> _Result:
    return s.registry.specs_for(c.user), None


async def _spec_get(s: Services, c: Connection, q: p.SpecGet) -> _Result:
    return s.registry.spec_for(c.user, q.spec_id), None


async def _server_info(s: Services, c: Connection, q: p.ServerInfo) -> _Result:
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
    return details, None


# -- events ---------------------------------------------------------------------------------


def _event_filter(
    state: State, user: User, sandbox_id: str | None, types: list[str] | None
) -> EventFilter:
    """The filter of a subscription or a read: the request's own, and the user's view."""
    if sandbox_id is not None and not knows_sandbox_id(user, state, sandbox_id):
        raise p.ProtocolError(
            p.ErrorCode.NOT_FOUND, f"'sandbox_id' {sandbox_id} names no sandbox visible to you."
        )
    return EventFilter(
        sandbox_ids=None if sandbox_id is None else frozenset({sandbox_id}),
        types=frozenset(types) if types else None,
        visible=None if user.admin else partial(sees_event, user, state),
    )


async def _subscribe(s: Services, c: Connection, q: p.EventsSubscribe) -> _Result:
    matches = _event_filter(s.registry.state, c.user, q.sandbox_id, q.types)
    if c.subscription_count >= MAX_SUBSCRIPTIONS:
        raise p.ProtocolError(
            p.ErrorCode.LIMIT_EXCEEDED,
            f"This connection has {MAX_SUBSCRIPTIONS} subscriptions, the most it may hold;"
            " unsubscribe from one first.",
        )
    head_seq = s.log.head_seq
    # Absent after_seq: what comes after the head_seq of the reply. Records in
    # hand only with one of the connection's read slots: see connection.py.
    subscription = s.log.subscribe(
        head_seq if q.after_seq is None else q.after_seq, matches, gate=c.read_slots
    )
    sub_id, start = c.open_subscription(subscription, batch=bool(q.batch))
    return p.Subscribed(sub_id, head_seq), start


async def _unsubscribe(s: Services, c: Connection, q: p.EventsUnsubscribe) -> _Result:
    if not await c.close_subscription(q.subscription):
        raise p.ProtocolError(
            p.ErrorCode.NOT_FOUND,
            f"'subscription' {q.subscription!r} is no open subscription of this connection.",
        )
    return True, None


async def _read(s: Services, c: Connection, q: p.EventsRead) -> _Result:
    matches = _event_filter(s.registry.state, c.user, q.sandbox_id, q.types)
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

_HANDLERS: Final[dict[type[p.Params], _Handler]] = {
    p.SandboxStart: _start,
    p.SandboxGet: _get,
    p.SandboxBatchGet: _batch_get,
    p.SandboxStats: _stats,
    p.SandboxSearch: _search,
    p.SandboxFindBySessionKey: _find_by_session_key,
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
