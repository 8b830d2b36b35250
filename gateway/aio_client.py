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
client), so the application sees every event exactly once, in order. Given
several URLs (the nodes of a cluster), it uses the first that answers and fails
over to the others, by the trio client's rules (``protocol.Endpoints``). Closing
the client closes its subscriptions and ends its task: it leaves none behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
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
from sandboxd.gateway.protocol import (
    ClientError,
    ConnectError,
    ConnectionLostError,
    MalformedFrameError,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds to wait for the closing handshake before the connection is dropped.
CLOSE_TIMEOUT = 2.0


async def _close(ws: ClientConnection | None) -> None:
    """Close a subscription's or a follow's own connection; cancelled while closing, drop
    it at once rather than leave it half closed."""
    if ws is not None:
        try:
            await ws.close()
        except BaseException:
            ws.transport.abort()
            raise


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


async def _connect_any(
    urls: Sequence[str], token: str, *, queue: int = 16
) -> tuple[str, ClientConnection]:
    """The first of ``urls`` that answers, and its connection: one round, no delay."""
    failures: list[ConnectError] = []
    for url in urls:
        try:
            return url, await _connect(url, token, queue=queue)
        except ConnectError as exc:
            if not p.worth_retrying(exc):
                raise
            failures.append(exc)
    raise p.first_of(failures)


async def connect(url: str | Sequence[str], token: str) -> Client:
    """A connected client that the caller closes (``await client.aclose()``).

    For a connection that lives as long as a process (one per app server);
    ``open_client`` is the same as a context manager. ``url`` may be several
    (the nodes of a cluster): the client connects to the first that answers and
    fails over to the others (protocol.Endpoints).
    """
    endpoints = p.Endpoints(url)
    answered, ws = await _connect_any(endpoints.order(), token)
    endpoints.connected(answered)
    return Client(ws, endpoints, token)


@contextlib.asynccontextmanager
async def open_client(url: str | Sequence[str], token: str) -> AsyncIterator[Client]:
    """A connected client, closed on the way out; what the body raises comes out as it is."""
    client = await connect(url, token)
    try:
        yield client
    finally:
        await client.aclose()


class _Line:
    """One connection of the client's requests, the requests in flight on it, its reader."""

    def __init__(self, url: str, ws: ClientConnection) -> None:
        self.url = url
        self.ws = ws
        #: Each request in flight, and the future its caller awaits (None: connection lost).
        self.exchanges: p.Exchanges[asyncio.Future[p.Reply | None]] = p.Exchanges()
        #: Why it is lost (None while it is not).
        self.lost: str | None = None
        self.reader: asyncio.Task[None] | None = None

    def lose(self, why: str) -> None:
        if self.lost is None:
            self.lost = why


class Client(p.ClientOps):
    """Made by ``connect`` or ``open_client``; each method is one op of protocol.md."""

    def __init__(self, ws: ClientConnection, endpoints: p.Endpoints, token: str) -> None:
        self._endpoints = endpoints
        self._token = token
        self._slots = asyncio.Semaphore(p.MAX_IN_FLIGHT)
        self._failing_over = asyncio.Lock()
        self._closed = False
        #: Event subscriptions and output follows made here: closing the client closes them.
        self._subscriptions: set[Subscription | LogFollow] = set()
        self._line = self._serve(_Line(endpoints.current, ws))

    @property
    def url(self) -> str:
        """The URL of the daemon this client's requests go to now."""
        return self._line.url

    @property
    def closed(self) -> bool:
        """Whether requests can no longer be sent: closed, or the connection was lost and
        no other URL is left to fail over to."""
        if self._closed:
            return True
        return self._line.lost is not None and not self._endpoints.others(self._line.url)

    def _serve(self, line: _Line) -> _Line:
        line.reader = asyncio.get_running_loop().create_task(
            self._read_replies(line), name=f"sandboxd.aio reader of {line.url}"
        )
        return line

    async def aclose(self) -> None:
        """Close the subscriptions made here, then the connection; wait for the reader to end."""
        for subscription in list(self._subscriptions):
            await subscription.aclose()
        self._closed = True
        line = self._line
        line.lose(f"the client of {line.url} is closed")
        await line.ws.close()
        if line.reader is not None:
            await line.reader

    async def _read_replies(self, line: _Line) -> None:
        try:
            async for frame in line.ws:
                routed = line.exchanges.route(frame)
                if routed is not None:
                    future, reply = routed
                    if not future.done():
                        future.set_result(reply)
            line.lose(_closed(line.url, line.ws))
        except ConnectionClosed:
            line.lose(_closed(line.url, line.ws))
        except MalformedFrameError as exc:
            line.lose(f"{line.url} sent a frame that is not a protocol reply: {exc}")
            await line.ws.close()
        except Exception as exc:
            log.exception("reading %s failed", line.url)
            line.lose(f"reading {line.url} failed: {exc}")
            await line.ws.close()
        finally:
            for future in line.exchanges.drain():
                if not future.done():
                    future.set_result(None)

    async def _usable_line(self) -> _Line:
        """The connection to send on: the current one, or one to another URL if it was lost."""
        line = self._line
        if line.lost is None:
            return line
        async with self._failing_over:
            if self._line is not line and self._line.lost is None:
                return self._line  # another caller failed over meanwhile
            others = self._endpoints.others(line.url)
            if self._closed or not others:
                raise ConnectionLostError(line.lost)
            url, ws = await _connect_any(others, self._token)
            self._endpoints.connected(url)
            log.info("failed over from %s to %s", line.url, url)
            if line.reader is not None:
                await line.reader  # ended with the connection: leave no task behind
            self._line = self._serve(_Line(url, ws))
            return self._line

    async def call(self, call: p.Call[T]) -> T:
        """Send one op and return its typed result, or raise the error of its reply."""
        async with self._slots:
            line = await self._usable_line()
            future: asyncio.Future[p.Reply | None] = asyncio.get_running_loop().create_future()
            request_id = line.exchanges.open(future)
            try:
                await line.ws.send(call.encode(request_id))
                reply = await future
            except ConnectionClosed:
                reply = None
            finally:
                line.exchanges.close(request_id)
        if reply is None:
            raise ConnectionLostError(
                line.lost or f"{p.closed(line.url)} before the reply to {call.op}"
            )
        return call.result(reply)

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
        Closing the client closes it too.
        The server sends them several to a frame (``batch``; False: one a frame, for a
        server older than batch frames).
        """
        resumption = p.Resumption.of(
            after_seq, sandbox_id=sandbox_id, types=types, labels=labels, batch=batch
        )
        return Subscription(self, p.Endpoints(self._endpoints.urls, first=self.url), resumption)

    def follow_logs(self, sandbox_id: str, *, tail_bytes: int = 65536) -> LogFollow:
        """The sandbox's output as it is written, on a connection of its own.

        Use as ``async with client.follow_logs(id) as output: async for text in output``:
        the tail, then each chunk written after it, until the sandbox is deleted
        (``output.ended`` says why it stopped). Not resumed across connections: a
        dropped one raises ``ConnectionLostError``. Closing the client closes it too.
        """
        return LogFollow(self, p.OutputStream(sandbox_id, tail_bytes=tail_bytes))


class LogFollow(p.LogFollowOps):
    """A sandbox's output as it is written; made by Client.follow_logs (protocol.OutputStream
    knows what to send and what each frame means; this class does the I/O, with no task)."""

    def __init__(self, client: Client, stream: p.OutputStream) -> None:
        self._client = client
        self._stream = stream
        self._ws: ClientConnection | None = None
        self._tail: str | None = None
        self._closed = False
        client._subscriptions.add(self)

    async def open(self) -> None:
        if self._ws is not None or self._closed:
            return
        client = self._client
        ws = self._ws = await _connect(client.url, client._token)
        try:
            await ws.send(self._stream.request())
            while (logs := self._stream.reply(await ws.recv())) is None:
                pass
        except ConnectionClosed:
            await self.aclose()
            raise ConnectionLostError(
                f"the connection to {client.url} closed before the reply to sandbox.logs"
            ) from None
        except BaseException:
            await self.aclose()
            raise
        self._truncated = logs.truncated
        self._tail = logs.data

    async def aclose(self) -> None:
        self._closed = True
        self._client._subscriptions.discard(self)
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
                received = self._stream.receive(await self._ws.recv())
            except ConnectionClosed:
                url = self._client.url
                await self.aclose()
                raise ConnectionLostError(f"{p.closed(url)} while following output") from None
            if isinstance(received, str):
                return received
            if isinstance(received, p.OutputEnd):
                await self.aclose()
        raise StopAsyncIteration


class Subscription(p.SubscriptionOps):
    """An event stream that survives dropped connections; made by Client.subscribe.

    Where it is in the log, and what to send on each connection, is
    ``protocol.Resumption``'s; this class opens the connections and reads them.
    It runs no task: each ``__anext__`` reads its connection itself.
    """

    def __init__(self, client: Client, endpoints: p.Endpoints, resumption: p.Resumption) -> None:
        self._client = client
        self._endpoints = endpoints
        self._resumption = resumption
        self._ws: ClientConnection | None = None
        #: Set once the server said history is sent and the stream is live.
        self.caught_up = asyncio.Event()
        self._closed = False
        client._subscriptions.add(self)

    @property
    def url(self) -> str:
        """The URL of the daemon it reads from now (or will try first)."""
        return self._endpoints.current

    async def aclose(self) -> None:
        self._closed = True
        self._client._subscriptions.discard(self)
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
                received = self._resumption.receive(await self._ws.recv())
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
            await asyncio.sleep(delay)
            try:
                await self._open(url)
                self._endpoints.connected(url)
                return
            except ClientError as exc:
                if not p.worth_retrying(exc):
                    await self._drop()
                    raise
                failure = exc
                await self._drop()
        assert failure is not None
        raise self._endpoints.gave_up(failure)

    async def _open(self, url: str) -> None:
        client = self._client
        ws = self._ws = await _connect(url, client._token, queue=64)
        call = self._resumption.subscribe_call()
        try:
            await ws.send(call.encode(p.SUBSCRIBE_ID))
            while (reply := self._resumption.subscribe_reply(await ws.recv())) is None:
                pass
        except ConnectionClosed:
            raise ConnectionLostError(f"the connection to {url} closed while subscribing") from None
        self._resumption.subscribed(call, reply)
