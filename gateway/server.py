"""The websocket server: listeners, the handshake, and the graceful stop.

``Gateway.serve`` accepts connections on listeners, as ``trio.serve_listeners``
does (by default the TCP listeners of config.host and config.port; tests pass
in-memory ones), admits each peer (path, bearer token, draining), and runs
an accepted one as a ``Connection`` (connection.py), whose requests ``ops``
answers. ``drain`` and ``close_all`` are the two steps of the daemon's stop.

Each stream is a ``ServerWebSocket`` (websocket.py: wsproto with thin trio I/O,
whose frames go to the socket without a task switch; the clients keep
trio-websocket), and is closed at most ``Timeouts.close`` after its connection
ends, whatever the peer does.

Every stream first passes the front door (front_door.py), which reads its
request head: plain HTTP (``/metrics``, the dashboard) is answered there, and
an upgrade comes here with the bytes read replayed.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from functools import partial
from typing import TYPE_CHECKING, Final

import trio

from sandboxd.config import Config
from sandboxd.events.codec import now_ts
from sandboxd.gateway import ops
from sandboxd.gateway import protocol as p
from sandboxd.gateway.auth import Authenticator, User, check_path, token_from_handshake
from sandboxd.gateway.connection import Connection, Requests, Timeouts
from sandboxd.gateway.fanout import FanOut
from sandboxd.gateway.front_door import FrontDoor, ReplayStream
from sandboxd.gateway.metrics import Metrics
from sandboxd.gateway.routes import Routes
from sandboxd.gateway.static import load_dashboard
from sandboxd.gateway.websocket import Closed, Handshake, ServerWebSocket

if TYPE_CHECKING:
    from sandboxd.actors.registry import Registry

log = logging.getLogger(__name__)

#: Seconds a peer has to finish the opening handshake.
HANDSHAKE_TIMEOUT: Final = 10.0

Listeners = Sequence[trio.abc.Listener[trio.abc.Stream]]


class Gateway:
    """The daemon's websocket front: serve, drain, close_all, as daemon.py uses them."""

    def __init__(
        self,
        config: Config,
        registry: Registry,
        event_log: ops.EventLog,
        authenticator: Authenticator,
        *,
        metrics: Metrics | None = None,
        forward: ops.Forward | None = None,
        nodes: Callable[[], Collection[str]] | None = None,
    ) -> None:
        self.config = config
        self.registry = registry
        self.log = event_log
        self.authenticator = authenticator
        self.started_at = now_ts()
        #: The bound port, once serve() has started on TCP (the config's may be 0).
        self.port = config.port
        self.timeouts = Timeouts()
        self.requests = Requests()
        self._services = ops.Services(registry, event_log, self.started_at, forward, nodes)
        self._connections: set[Connection] = set()
        #: The one task that delivers the live batch subscriptions' frames (fanout.py).
        self.fanout = FanOut(requests=self.requests)
        #: Connections open or being opened, per user id: max_connections_per_user.
        self._per_user: Counter[str | None] = Counter()
        self._connection_numbers = itertools.count(1)
        self._listening: trio.CancelScope | None = None
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics.watch_gateway(self)
        routes = Routes(
            load_dashboard(), authenticator, self.metrics, metrics_public=config.metrics_public
        )
        # HTTP on the same port: the front door answers it and hands upgrades on.
        self._front_door = FrontDoor(routes, self._handle_stream)

    @property
    def draining(self) -> bool:
        return self.requests.refusing

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    async def serve(
        self,
        listeners: Listeners | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections on ``listeners`` until cancelled; started() once listening.

        Without listeners: TCP on config.host and config.port.
        """
        if listeners is None:
            # Bound first and outside any nursery: a port in use is a plain OSError.
            tcp = await trio.open_tcp_listeners(self.config.port, host=self.config.host)
            # With a host name of several addresses and port 0, each listener may get
            # a port of its own; the first is reported.
            self.port = tcp[0].socket.getsockname()[1]
            listeners = tcp
        async with trio.open_nursery() as connections:
            # Connections live in their own nursery: drain() stops the listeners
            # alone, and in-flight requests on open connections run on.
            connections.start_soon(self.fanout.run)
            with trio.CancelScope() as self._listening:
                async with trio.open_nursery() as listening:
                    await listening.start(
                        partial(
                            trio.serve_listeners,
                            self._front_door.handle,
                            list(listeners),
                            handler_nursery=connections,
                        )
                    )
                    task_status.started()

    async def drain(self) -> None:
        """Stop taking connections and requests (they get `unavailable`); wait for in-flight ops."""
        self._stop_listening()
        await self.requests.wait_idle()

    async def close_all(self) -> None:
        """`ended` (reason "shutdown") to every subscription, then close every connection: 1001."""
        self._stop_listening()
        async with trio.open_nursery() as nursery:
            for connection in list(self._connections):
                nursery.start_soon(connection.shut_down)

    def _stop_listening(self) -> None:
        self.requests.refusing = True
        if self._listening is not None:
            self._listening.cancel()

    # -- one peer -------------------------------------------------------------------------

    async def _handle_stream(self, stream: trio.abc.Stream) -> None:
        # One accepted stream: the handshake, the websocket, and the stream closed
        # in the end whatever happened (see the module's docstring).
        try:
            socket = stream.socket if isinstance(stream, ReplayStream) else None
            ws = ServerWebSocket(
                stream,
                socket=socket,
                max_message_bytes=p.MAX_FRAME_BYTES,
                close_timeout=self.timeouts.close,
            )
            user: User | None = None
            try:
                with trio.move_on_after(HANDSHAKE_TIMEOUT) as handshaking:
                    handshake = await ws.handshake()
                    if handshake is not None:
                        user = await self._admit(ws, handshake)
                        if user is not None:
                            await ws.accept()
                if user is not None and not handshaking.cancelled_caught:
                    await self._run(ws, user, stream)
                    # The peer has this long to finish the closing handshake.
                    with trio.move_on_after(self.timeouts.close):
                        await ws.aclose(p.CLOSE_GOING_AWAY, "the connection ends")
            finally:
                if user is not None:
                    self._per_user[user.id] -= 1
                    if not self._per_user[user.id]:
                        del self._per_user[user.id]
        except Closed:
            pass  # the peer left
        except Exception:
            # Never let it escape: it would take every connection down with it.
            log.exception("websocket connection failed")
        finally:
            await trio.aclose_forcefully(stream)

    async def _run(self, ws: ServerWebSocket, user: User, stream: trio.abc.Stream) -> None:
        number = next(self._connection_numbers)
        connection = Connection(
            ws,
            user,
            f"connection {number} ({user.id or 'admin'})",
            answer=partial(ops.answer, self._services),
            answer_now=partial(ops.answer_now, self._services),
            count_reply=self.metrics.count_request,
            requests=self.requests,
            timeouts=self.timeouts,
            fanout=self.fanout,
        )
        self._connections.add(connection)
        log.debug("%s: opened from %s", connection.name, _peer(stream))
        try:
            await connection.run()
        finally:
            self._connections.discard(connection)
            log.debug("%s: closed (%s)", connection.name, ws.closed)

    async def _admit(self, ws: ServerWebSocket, request: Handshake) -> User | None:
        """The user of an acceptable handshake, counted against its connections; else None."""
        if not check_path(request.path):
            await ws.reject(404, body=b"sandboxd speaks its protocol at /v1\n")
            return None
        user = self.authenticator.authenticate(token_from_handshake(request.path, request.headers))
        if user is None:
            await ws.reject(
                401,
                headers=[(b"WWW-Authenticate", b'Bearer realm="sandboxd"')],
                body=b"a valid bearer token is required\n",
            )
            return None
        if self.draining:
            await ws.reject(503, body=b"sandboxd is shutting down\n")
            return None
        # Counted before any await: of two handshakes at once, one may be the last.
        limit = self.config.max_connections_per_user
        if self._per_user[user.id] >= limit:
            who = "the admin" if user.id is None else f"user {user.id}"
            await ws.reject(
                429,
                body=f"{who} has {limit} connections open, the limit max_connections_per_user"
                f" is {limit}; close one first\n".encode(),
            )
            return None
        self._per_user[user.id] += 1
        return user


def _peer(stream: trio.abc.Stream) -> str:
    if isinstance(stream, trio.SocketStream):
        host, port, *_ = stream.socket.getpeername()
        return f"{host}:{port}"
    return repr(stream)
