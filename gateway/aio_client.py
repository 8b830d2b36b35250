"""The asyncio client of protocol.md, on the `websockets` package; public as ``sandboxd.aio``.

    import sandboxd.aio

    async with sandboxd.aio.open_client("ws://127.0.0.1:8765/v1", token) as client:
        info = await client.start(spec_id="default")
        async with client.subscribe(after_seq=0) as events:
            async for event in events:
                ...

The same client as the trio one (gateway/client.py), for asyncio programs such
as an OpenHands app server: the same methods (``protocol.ClientOps``), result
types and exception classes, because both are the protocol package's model
(``sandboxd.gateway.protocol``) with a transport around it; this module only
opens connections, sends what a ``Call`` encodes and hands what arrives to the
protocol's parsers. Nothing here imports trio.

Requests share one connection and run concurrently, at most 64 at a time (the
server's limit: a busy client waits here instead of getting `busy`); one task
reads that connection and routes each reply to its caller by id. A
subscription has a connection of its own, which it opens again after a drop
(``protocol.Resumption``: the same backoff and resume rules as the trio
client), so the application sees every event exactly once, in order. Closing
the client closes its subscriptions and ends its task: it leaves none behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TypeVar

try:
    from websockets.asyncio.client import ClientConnection
    from websockets.asyncio.client import connect as ws_connect
    from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
except ImportError as missing:  # pragma: no cover - the extra is not installed
    raise ImportError(
        "sandboxd.aio needs the websockets package (15 or newer): pip install 'sandboxd[aio]'"
    ) from missing

from sandboxd.events.types import Event
from sandboxd.gateway import protocol as p
from sandboxd.gateway.protocol import ClientError, ConnectionLostError, MalformedFrameError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds to wait for the closing handshake before the connection is dropped.
CLOSE_TIMEOUT = 2.0


async def _connect(url: str, token: str, *, queue: int = 16) -> ClientConnection:
    """One websocket to the daemon, or the ``ConnectError`` that says why not.

    Like the trio client's: no compression offered, no proxy (the daemon is
    reached directly), no keepalive task of our own (the server pings idle
    connections and websockets answers without one).
    """
    error: ClientError
    try:
        return await ws_connect(
            url,
            additional_headers={"Authorization": f"Bearer {token}"},
            compression=None,
            proxy=None,
            open_timeout=p.CONNECT_TIMEOUT,
            ping_interval=None,
            close_timeout=CLOSE_TIMEOUT,
            max_size=p.MAX_REPLY_BYTES,
            max_queue=queue,
        )
    except InvalidStatus as exc:
        error = p.refused(url, exc.response.status_code, bytes(exc.response.body))
    except InvalidURI as exc:
        error = p.not_a_url(url, exc)
    except TimeoutError:
        error = p.unreachable(url, f"no answer within {p.CONNECT_TIMEOUT:.0f} s")
    except (OSError, InvalidHandshake, EOFError) as exc:
        error = p.unreachable(url, exc or type(exc).__name__)
    raise error


def _closed(url: str, ws: ClientConnection) -> str:
    return p.closed(url, ws.close_code, ws.close_reason or "")


async def connect(url: str, token: str) -> Client:
    """A connected client that the caller closes (``await client.aclose()``).

    For a connection that lives as long as a process (one per app server);
    ``open_client`` is the same as a context manager.
    """
    client = Client(await _connect(url, token), url, token)
    client._start_reading()
    return client


@contextlib.asynccontextmanager
async def open_client(url: str, token: str) -> AsyncIterator[Client]:
    """A connected client, closed on the way out; what the body raises comes out as it is."""
    client = await connect(url, token)
    try:
        yield client
    finally:
        await client.aclose()


class Client(p.ClientOps):
    """Made by ``connect`` or ``open_client``; each method is one op of protocol.md."""

    def __init__(self, ws: ClientConnection, url: str, token: str) -> None:
        self._ws = ws
        self.url = url
        self._token = token
        #: Each request in flight, and the future its caller awaits (None: connection lost).
        self._exchanges: p.Exchanges[asyncio.Future[p.Reply | None]] = p.Exchanges()
        self._slots = asyncio.Semaphore(p.MAX_IN_FLIGHT)
        self._lost: str | None = None
        self._reader: asyncio.Task[None] | None = None
        self._subscriptions: set[Subscription] = set()

    @property
    def closed(self) -> bool:
        """Whether requests can no longer be sent: closed, or the connection was lost."""
        return self._lost is not None

    def _start_reading(self) -> None:
        self._reader = asyncio.get_running_loop().create_task(
            self._read_replies(), name=f"sandboxd.aio reader of {self.url}"
        )

    async def aclose(self) -> None:
        """Close the subscriptions made here, then the connection; wait for the reader to end."""
        for subscription in list(self._subscriptions):
            await subscription.aclose()
        if self._lost is None:
            self._lost = f"the client of {self.url} is closed"
        await self._ws.close()
        if self._reader is not None:
            await self._reader

    async def _read_replies(self) -> None:
        try:
            async for frame in self._ws:
                routed = self._exchanges.route(frame)
                if routed is not None:
                    future, reply = routed
                    if not future.done():
                        future.set_result(reply)
            self._lose(_closed(self.url, self._ws))
        except ConnectionClosed:
            self._lose(_closed(self.url, self._ws))
        except MalformedFrameError as exc:
            self._lose(f"{self.url} sent a frame that is not a protocol reply: {exc}")
            await self._ws.close()
        except Exception as exc:
            log.exception("reading %s failed", self.url)
            self._lose(f"reading {self.url} failed: {exc}")
            await self._ws.close()
        finally:
            for future in self._exchanges.drain():
                if not future.done():
                    future.set_result(None)

    def _lose(self, why: str) -> None:
        if self._lost is None:
            self._lost = why

    async def call(self, call: p.Call[T]) -> T:
        """Send one op and return its typed result, or raise the error of its reply."""
        async with self._slots:
            if self._lost is not None:
                raise ConnectionLostError(self._lost)
            future: asyncio.Future[p.Reply | None] = asyncio.get_running_loop().create_future()
            request_id = self._exchanges.open(future)
            try:
                await self._ws.send(call.encode(request_id))
                reply = await future
            except ConnectionClosed:
                reply = None
            finally:
                self._exchanges.close(request_id)
        if reply is None:
            raise ConnectionLostError(
                self._lost or f"{p.closed(self.url)} before the reply to {call.op}"
            )
        return call.result(reply)

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
        Closing the client closes it too.
        The server sends them several to a frame (``batch``; False: one a frame, for a
        server older than batch frames).
        """
        resumption = p.Resumption.of(after_seq, sandbox_id=sandbox_id, types=types, batch=batch)
        return Subscription(self, resumption)


class Subscription(p.SubscriptionOps):
    """An event stream that survives dropped connections; made by Client.subscribe.

    Where it is in the log, and what to send on each connection, is
    ``protocol.Resumption``'s; this class opens the connections and reads them.
    It runs no task: each ``__anext__`` reads its connection itself.
    """

    def __init__(self, client: Client, resumption: p.Resumption) -> None:
        self._client = client
        self._resumption = resumption
        self._ws: ClientConnection | None = None
        #: Set once the server said history is sent and the stream is live.
        self.caught_up = asyncio.Event()
        self._closed = False
        client._subscriptions.add(self)

    async def aclose(self) -> None:
        self._closed = True
        self._client._subscriptions.discard(self)
        await self._drop()

    async def _drop(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            try:
                await ws.close()
            except BaseException:
                ws.transport.abort()  # cancelled while closing: drop it now
                raise

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
                received = self._resumption.receive(await self._ws.recv())
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
            await asyncio.sleep(delay)
            try:
                await self._open()
                return
            except ClientError as exc:
                if not p.worth_retrying(exc):
                    await self._drop()
                    raise
                failure = exc
                await self._drop()
        assert failure is not None
        raise p.gave_up(failure)

    async def _open(self) -> None:
        client = self._client
        ws = self._ws = await _connect(client.url, client._token, queue=64)
        call = self._resumption.subscribe_call()
        try:
            await ws.send(call.encode(p.SUBSCRIBE_ID))
            while (reply := self._resumption.subscribe_reply(await ws.recv())) is None:
                pass
        except ConnectionClosed:
            raise ConnectionLostError(
                f"the connection to {client.url} closed while subscribing"
            ) from None
        self._resumption.subscribed(call, reply)
