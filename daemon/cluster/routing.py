"""Commands for a sandbox go to the node that owns it, over NATS request/reply.

Every node folds the whole stream, so every node answers reads (get, search,
events) from its own projection. What acts on processes can only run where
they are: ``route`` says which node must answer a request (a pure function of
the projection and the live nodes), the gateway's ``forward`` hook
(``Forwarder``) sends such a request there, and the owner answers it
(``serve_forwarded``) through its own registry, as if its own client had asked.

- ``sandbox.start``: on the node it names, else the one placement.py picks; the
  request goes there with ``node`` filled in, so that the owner starts it itself.
- ``sandbox.pause``, ``resume``, ``delete``, ``logs``: on the sandbox's node.
- Everything else, and a sandbox of no node or of this one: here.
- A sandbox whose node holds no lease (lost, or gone for good): ``unavailable``
  while the others have not recorded it MISSING yet; once MISSING, a delete
  through any node forgets it (``sandbox.deleted``, forced): its processes, if
  its node ever comes back, belong to no sandbox of the log then, and that
  node's recovery ends them.

On the wire (core NATS, subject ``rpc.STREAM.NODE``): the request frame of
protocol.md as the client sent it, with who asked (user id, admin), which the
forwarding node has authenticated (nodes trust each other: NATS's credentials
are what keep others off the bus); the answer is the reply frame itself, which
the forwarding node passes on as it is. A node that does not answer within
``answer_within`` seconds (it is down, its lease not yet expired) makes the
request ``unavailable``: the client may try again, and once the node's lease
has expired its sandboxes are MISSING.

Measured (bench/cluster.py, loopback, 2 shared cores): a start through a node
that is not the owner costs one NATS round trip and four bridge crossings more
than through the owner, 1.2 to 2.5 ms at p50 (``remote_start_ms_p50`` 8.4 and
8.6 beside ``local_start_ms_p50`` 5.9 and 7.4; docs/performance.md).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection
from typing import Final

import orjson
import trio
from nats.aio.msg import Msg

from sandboxd.actors.errors import NotFound, Unavailable
from sandboxd.actors.registry import Registry
from sandboxd.actors.visibility import sees_sandbox
from sandboxd.cluster.placement import NoSuchNode, place, running_by_node
from sandboxd.events import types as ev
from sandboxd.events.backend import Store
from sandboxd.events.nats.bridge import Nats, NatsUnavailable
from sandboxd.events.projection import State, Status
from sandboxd.gateway import errors
from sandboxd.gateway import protocol as p
from sandboxd.gateway.auth import User
from sandboxd.gateway.metrics import OK

log = logging.getLogger(__name__)

#: Forwarded requests one node answers at once; past it they wait in NATS's buffer.
MAX_FORWARDED: Final = 256
#: A bound on waiting for this node's fold to reach the stream's head (``_catch_up``).
CATCH_UP_WITHIN: Final = 2.0
#: The ops that act on one sandbox's processes: answered by its node.
_ON_ITS_NODE: Final = (p.SandboxPause, p.SandboxResume, p.SandboxDelete, p.SandboxLogs)


def subject(stream: str, node: str) -> str:
    """Where ``node`` takes forwarded requests (outside the stream's own subjects)."""
    return f"rpc.{stream}.{node}"


def route(state: State, me: str, live: Collection[str], request: p.Request) -> str | None:
    """The node that must answer ``request``: None for this one.

    Raises ``NotFound`` for a start that names a node holding no lease.
    """
    params = request.params
    if isinstance(params, p.SandboxStart):
        try:
            node = place(running_by_node(state, unnamed=me), {*live, me}, params.node)
        except NoSuchNode as exc:
            raise NotFound(str(exc)) from None
        return None if node == me else node
    if isinstance(params, _ON_ITS_NODE):
        record = state.sandboxes.get(params.sandbox_id)
        if record is None or record.node is None or record.node == me:
            return None
        return record.node
    return None


def encode_forwarded(user: User, request: p.Request) -> bytes:
    return orjson.dumps(
        {
            "user": user.id,
            "admin": user.admin,
            "request": orjson.Fragment(p.encode_request(request)),
        }
    )


def decode_forwarded(data: bytes) -> tuple[User, p.Request]:
    """Who asked and what; ``RequestError`` (bad_request) for anything else."""
    try:
        body = orjson.loads(data)
        user = User(body["user"], admin=body["admin"] is True)
        frame = orjson.dumps(body["request"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        raise p.RequestError(
            p.ErrorCode.BAD_REQUEST, "A forwarded request must be {user, admin, request}.", None
        ) from None
    if user.id is not None and type(user.id) is not str:
        raise p.RequestError(p.ErrorCode.BAD_REQUEST, "'user' must be a string or null.", None)
    return user, p.parse_request(frame)


class Forwarder:
    """The gateway's ``forward`` hook: the reply of the node that must answer, or None."""

    def __init__(
        self,
        nats: Nats,
        stream: str,
        me: str,
        store: Store,
        live: Callable[[], Collection[str]],
        *,
        answer_within: float,
        look_again: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._nats = nats
        self._stream = stream
        self._me = me
        self._store = store
        self._live = live
        self._answer_within = answer_within
        #: Read the leases now (the watch reads them every third of a TTL).
        self._look_again = look_again

    async def __call__(self, user: User, request: p.Request) -> tuple[str, str] | None:
        sandbox_id = getattr(request.params, "sandbox_id", None)
        if isinstance(sandbox_id, str) and sandbox_id not in self._store.state.sandboxes:
            await self._catch_up()
        live = self._live()
        try:
            node = route(self._store.state, self._me, live, request)
        except NotFound:
            if self._look_again is None:
                raise
            await self._look_again()  # a start named a node that joined since the last look?
            live = self._live()
            node = route(self._store.state, self._me, live, request)
        if node is None:
            return None
        if node not in live and self._look_again is not None:
            await self._look_again()  # back since the watch's last look?
            live = self._live()
        if node not in live:
            return await self._of_a_lost_node(user, request, node)
        if isinstance(request.params, p.SandboxStart) and request.params.node != node:
            request = p.Request(
                request.id, request.op, _with_node(request.params, node)
            )  # placed here: the owner must not place it again
        try:
            reply = await self._nats.request(
                subject(self._stream, node), encode_forwarded(user, request), self._answer_within
            )
        except NatsUnavailable as exc:
            raise Unavailable(f"node {node}, which must answer this, did not: {exc}") from None
        frame = reply.data.decode()
        return frame, _code_of(frame)

    async def _catch_up(self) -> None:
        """Fold up to the stream's last seq now, at most ``CATCH_UP_WITHIN`` seconds.

        A sandbox this node does not know of may have been created through another
        node a moment ago (the client's start answered there, this node's fold a few
        ms behind): an op on it through this node then waits for it, instead of a
        `not_found` the client could not make sense of. One round trip to NATS, on
        the path of unknown ids only.
        """
        with trio.move_on_after(CATCH_UP_WITHIN):
            try:
                info = await self._nats.bridge.run(self._nats.js.stream_info, self._stream)
            except Exception as exc:  # NATS away: answer from what is folded
                log.debug("stream info for a catch-up failed: %s", exc)
                return
            last = info.state.last_seq
            if self._store.state.head_seq >= last:
                return
            # Folded events come to subscribers after the fold: wait for the last one.
            async with self._store.subscribe(self._store.state.head_seq) as folded:
                async for record in folded:
                    if record.event.seq >= last:
                        return

    async def _of_a_lost_node(self, user: User, request: p.Request, node: str) -> tuple[str, str]:
        params = request.params
        assert isinstance(params, _ON_ITS_NODE)
        record = self._store.state.sandboxes.get(params.sandbox_id)
        if record is None or not sees_sandbox(user, record):
            raise NotFound(f"sandbox {params.sandbox_id} does not exist")
        if not isinstance(params, p.SandboxDelete) or record.status is not Status.MISSING:
            raise Unavailable(
                f"sandbox {record.id} runs on node {node}, which holds no lease: it is recorded"
                " MISSING within the lease's TTL, and can then be deleted through any node"
            )
        await self._store.append(
            ev.PendingEvent(record.id, user.id, ev.SandboxDeleted(forced=True))
        )
        return p.encode_ok(request.id, True), OK


def _with_node(params: p.SandboxStart, node: str) -> p.SandboxStart:
    return p.SandboxStart(
        spec_id=params.spec_id,
        sandbox_id=params.sandbox_id,
        env=params.env,
        wait=params.wait,
        owner=params.owner,
        node=node,
    )


def _code_of(frame: str) -> str:
    reply = orjson.loads(frame)
    error = reply.get("error") if isinstance(reply, dict) else None
    return str(error.get("code", "internal")) if isinstance(error, dict) else OK


async def serve_forwarded(
    nats: Nats,
    stream: str,
    me: str,
    registry: Registry,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer the requests other nodes forward to this one, until cancelled."""
    slots = trio.Semaphore(MAX_FORWARDED)
    async with (
        nats.subscribe(subject(stream, me)) as messages,
        trio.open_nursery() as nursery,
    ):
        # In place at the server before the node says it serves (and opens its gateway).
        await nats.flush()
        task_status.started()
        async for message in messages:
            await slots.acquire()
            nursery.start_soon(_answer_one, nats, registry, message, slots)


async def _answer_one(nats: Nats, registry: Registry, message: Msg, slots: trio.Semaphore) -> None:
    try:
        try:
            user, request = decode_forwarded(message.data)
        except p.RequestError as exc:
            frame = p.encode_error(exc.request_id, exc)
        else:
            frame = await answer_forwarded(registry, user, request)
        try:
            await nats.respond(message, frame.encode())
        except NatsUnavailable as exc:
            log.warning("could not answer a forwarded request: %s", exc)
    finally:
        slots.release()


async def answer_forwarded(registry: Registry, user: User, request: p.Request) -> str:
    """The reply frame to a forwarded request, answered by this node's registry."""
    params = request.params
    try:
        # Run to their end whatever happens to the forwarding node (as ops.answer does).
        with trio.CancelScope(shield=True):
            result: object
            match params:
                case p.SandboxStart():
                    result = await registry.start_sandbox(
                        user,
                        spec_id=params.spec_id,
                        sandbox_id=params.sandbox_id,
                        env=params.env,
                        wait=params.wait,
                        owner=params.owner,
                        node=params.node,
                    )
                case p.SandboxPause(sandbox_id=sandbox_id):
                    result = await registry.pause(user, sandbox_id)
                case p.SandboxResume(sandbox_id=sandbox_id):
                    result = await registry.resume(user, sandbox_id)
                case p.SandboxDelete(sandbox_id=sandbox_id):
                    result = await registry.delete(user, sandbox_id)
                case p.SandboxLogs(sandbox_id=sandbox_id, tail_bytes=tail):
                    data, truncated = await trio.to_thread.run_sync(
                        registry.logs, user, sandbox_id, tail
                    )
                    result = p.Logs(data, truncated)
                case _:
                    raise p.ProtocolError(
                        p.ErrorCode.BAD_REQUEST, f"{request.op} is not forwarded between nodes."
                    )
        return p.encode_ok(request.id, result)
    except Exception as exc:
        error = errors.translate(exc)
        if error is None:
            log.exception("a forwarded %s failed", request.op)
            error = errors.internal()
        return p.encode_error(request.id, error)
