"""Both client libraries against a real daemon, one contract: typed results, one exception
per code, and a subscription that survives cut connections without losing or repeating an
event. Each test runs with the trio client and with the asyncio one (sandboxd.aio, run in an
asyncio loop of its own: tests/gateway/aio_bridge.py).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from sandboxd.actors.info import SandboxInfo, SpecInfo
from sandboxd.events import types as ev
from sandboxd.events.projection import Status
from sandboxd.gateway import client as c
from sandboxd.gateway.client import open_client as open_trio_client
from sandboxd.gateway.protocol import _resume as resume
from tests.gateway.aio_bridge import open_aio_client
from tests.gateway.support import Daemon, make_config, start_daemon, stop_daemon
from tests.support import TOKENS, eventually

ALICE, BOB, ROOT = TOKENS["alice"], TOKENS["bob"], TOKENS["root"]


OpenClient = Callable[[str, str], AbstractAsyncContextManager[Any]]


@pytest.fixture(params=["trio", "asyncio"])
def open_client(request: pytest.FixtureRequest) -> OpenClient:
    """The client under test: ``open_client`` of gateway/client.py or of sandboxd.aio."""
    return open_trio_client if request.param == "trio" else open_aio_client


def new_id() -> str:
    return "c-" + uuid.uuid4().hex[:12]


async def test_typed_ops(daemon: Daemon, open_client: OpenClient) -> None:
    async with open_client(daemon.url, ALICE) as client:
        info = await client.server_info()
        assert info.user == "alice" and info.admin is False and info.protocol == 1

        specs = await client.specs()
        assert all(isinstance(s, SpecInfo) for s in specs)
        assert (await client.spec("fails")) == next(s for s in specs if s.id == "fails")
        assert (await client.spec("nope")) is None

        sandbox_id = new_id()
        started = await client.start(spec_id="sleep", sandbox_id=sandbox_id, env={"K": "V"})
        assert isinstance(started, SandboxInfo)
        assert started.status is Status.RUNNING and started.created_by_user_id == "alice"
        assert started.exposed_urls and started.exposed_urls[0].url.startswith("http://")
        got = await client.get(sandbox_id)
        # get alone adds what its cgroup has used (null under markers); the rest is the same.
        assert got is not None and attrs.evolve(got, usage=None) == started
        boundary = (await client.server_info()).boundary
        if boundary == "markers":
            assert got.usage is None
        else:
            assert got.usage is not None and got.usage.pids == 1
        assert await client.batch_get([sandbox_id, "none"]) == [started, None]
        stats = await client.stats([sandbox_id, "none"])
        assert [s.id if s else None for s in stats] == [sandbox_id, None]
        assert stats[0] is not None and (stats[0].usage is None) == (boundary == "markers")
        page = await client.search(limit=1)
        assert page.items == [started] and page.next_page_id is None
        assert [s.id async for s in client.search_all(status="RUNNING")] == [sandbox_id]
        assert (await client.pause(sandbox_id)).status is Status.PAUSED
        assert (await client.resume(sandbox_id)).status is Status.RUNNING
        logs = await client.logs(sandbox_id, tail_bytes=100)
        assert logs.data == "" and logs.truncated is False

        events = await client.read_events(0, sandbox_id=sandbox_id)
        assert [e.type for e in events.events] == [
            "sandbox.created",
            "sandbox.process_started",
            "sandbox.running",
            "sandbox.paused",
            "sandbox.resumed",
        ]
        assert isinstance(events.events[0].data, ev.SandboxCreated)
        assert events.next_after_seq == events.events[-1].seq

        assert await client.delete(sandbox_id) is True
        assert await client.get(sandbox_id) is None


async def test_one_exception_per_code(daemon: Daemon, open_client: OpenClient) -> None:
    async with open_client(daemon.url, ALICE) as client:
        with pytest.raises(c.NotFoundError, match="does not exist"):
            await client.pause("nobody")
        with pytest.raises(c.NotFoundError):
            await client.start(spec_id="no-such-spec")
        sandbox_id = new_id()
        await client.start(spec_id="sleep", sandbox_id=sandbox_id)
        with pytest.raises(c.ConflictError):
            await client.start(spec_id="sleep", sandbox_id=sandbox_id)
        with pytest.raises(c.StartFailedError) as failed:
            await client.start(spec_id="fails")
        assert failed.value.sandbox is not None
        assert failed.value.sandbox.status is Status.ERROR
        assert failed.value.code == "start_failed"
        # Checked before sending, with the protocol's own rules.
        with pytest.raises(c.BadRequestError, match="sandbox_id"):
            await client.get("not an id")
        with pytest.raises(c.BadRequestError, match="limit"):
            await client.search(limit=500)
        # Or by the server, for what only it can judge.
        with pytest.raises(c.BadRequestError, match="page_id"):
            await client.search(page_id="nonsense")
        with pytest.raises(c.UnknownOpError):
            await client.request("sandbox.teleport")
        with pytest.raises(c.BadRequestError):
            await client.request("sandbox.get", {"sandbox_id": 5})
        # Every one is a ClientError, with the server's message.
        with pytest.raises(c.ClientError) as error:
            await client.resume("nobody")
        assert isinstance(error.value, c.NotFoundError) and error.value.message


async def test_an_admin_acts_for_a_user_and_finds_sandboxes_by_session_key(
    daemon: Daemon, open_client: OpenClient
) -> None:
    async with open_client(daemon.url, ROOT) as root, open_client(daemon.url, ALICE) as alice:
        info = await root.start(spec_id="sleep", owner="oh-user-7")
        assert info.created_by_user_id == "oh-user-7" and info.session_api_key
        assert (await root.search(owner="oh-user-7")).items == [info]
        assert [s.id async for s in root.search_all(owner="oh-user-7")] == [info.id]
        assert await alice.get(info.id) is None
        assert await root.find_by_session_key(info.session_api_key) == info
        assert await alice.find_by_session_key(info.session_api_key) is None
        own = await alice.start(spec_id="sleep")
        assert own.session_api_key
        assert await alice.find_by_session_key(own.session_api_key) == own
        await alice.pause(own.id)
        assert await alice.find_by_session_key(own.session_api_key) is None  # RUNNING only
        with pytest.raises(c.BadRequestError, match="'owner' may be given by an admin only"):
            await alice.start(spec_id="sleep", owner="oh-user-7")
        with pytest.raises(c.BadRequestError, match="'owner' may be given by an admin only"):
            await alice.search(owner="alice")
        with pytest.raises(c.BadRequestError, match="'session_api_key'"):
            await alice.find_by_session_key("")


async def test_connecting_errors(daemon: Daemon, open_client: OpenClient) -> None:
    with pytest.raises(c.AuthenticationError):
        async with open_client(daemon.url, "wrong-token-0123456789"):
            pass
    with pytest.raises(c.ConnectError, match="refused the connection"):
        async with open_client(daemon.url.replace("/v1", "/v9"), ALICE):
            pass
    with trio.socket.socket() as unused:
        await unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with pytest.raises(c.ConnectError, match="cannot reach"):
        async with open_client(f"ws://127.0.0.1:{port}/v1", ALICE):
            pass


async def test_a_connection_beyond_the_user_s_limit_is_refused_saying_why(
    tmp_path: Path,
    nursery: trio.Nursery,
    open_client: OpenClient,
) -> None:
    config = make_config(tmp_path / "state", max_connections_per_user=2)
    daemon = await start_daemon(nursery, config)
    async with open_client(daemon.url, ALICE) as client:
        async with client.subscribe() as events:
            await events.open()  # the subscription's own connection: the second
            with pytest.raises(c.ConnectError) as refused:
                async with open_client(daemon.url, ALICE):
                    pass
            assert not isinstance(refused.value, c.AuthenticationError)
            assert "HTTP 429" in refused.value.message
            assert "the limit max_connections_per_user is 2" in refused.value.message
        async with open_client(daemon.url, BOB) as bob:  # a limit per user
            assert (await bob.server_info()).user == "bob"
    await stop_daemon(daemon)


async def test_errors_inside_the_block_come_out_unwrapped(
    daemon: Daemon, open_client: OpenClient
) -> None:
    with pytest.raises(c.NotFoundError):
        async with open_client(daemon.url, ALICE) as client:
            await client.pause("nobody")
    with pytest.raises(KeyError):
        async with open_client(daemon.url, ALICE):
            raise KeyError("mine")


async def test_many_concurrent_requests_never_busy(daemon: Daemon, open_client: OpenClient) -> None:
    async with open_client(daemon.url, ROOT) as client:
        results: list[int] = []

        async def ask() -> None:
            results.append((await client.server_info()).head_seq)

        async with trio.open_nursery() as nursery:
            for _ in range(300):
                nursery.start_soon(ask)
        assert len(results) == 300


# --- Subscriptions across cut connections -------------------------------------------------


class Proxy:
    """A TCP proxy to the daemon whose connections the test can cut at any moment."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.connections = 0
        self._open: set[trio.CancelScope] = set()
        self._listening = trio.CancelScope()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as connections:
            with self._listening:
                async with trio.open_nursery() as listening:
                    await listening.start(
                        partial(
                            trio.serve_listeners,
                            self._relay,
                            listeners,
                            handler_nursery=connections,
                        )
                    )
                    task_status.started()
            await trio.sleep_forever()

    async def _relay(self, downstream: trio.SocketStream) -> None:
        self.connections += 1
        with trio.CancelScope() as scope:
            self._open.add(scope)
            try:
                upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
                async with upstream, trio.open_nursery() as pipes:
                    pipes.start_soon(self._pipe, downstream, upstream, pipes)
                    pipes.start_soon(self._pipe, upstream, downstream, pipes)
            finally:
                self._open.discard(scope)
        await trio.aclose_forcefully(downstream)

    @staticmethod
    async def _pipe(
        source: trio.SocketStream, sink: trio.SocketStream, pipes: trio.Nursery
    ) -> None:
        try:
            while data := await source.receive_some(65536):
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        pipes.cancel_scope.cancel()

    def cut(self) -> None:
        """Drop every open connection, mid-frame if it comes to that."""
        for scope in list(self._open):
            scope.cancel()

    def stop_listening(self) -> None:
        self._listening.cancel()


@pytest.fixture
async def proxy(daemon: Daemon, nursery: trio.Nursery) -> AsyncIterator[Proxy]:
    running = Proxy(daemon.gateway.port)
    await nursery.start(running.serve)
    yield running


async def produce(daemon: Daemon, count: int, *, batch: int = 10) -> None:
    for _ in range(count // batch):
        await daemon.gateway.log.append_many(
            [ev.PendingEvent(None, None, ev.DaemonStopping("burst " * 20))] * batch
        )


@pytest.mark.parametrize("batch", [False, True], ids=["event frames", "batch frames"])
async def test_subscribe_across_cut_connections_loses_and_repeats_nothing(
    daemon: Daemon,
    proxy: Proxy,
    open_client: OpenClient,
    batch: bool,
) -> None:
    head = daemon.gateway.log.head_seq
    count = 3000
    cut_after = {200, 900, 1500, 2600}
    received: list[int] = []
    # Each cut comes with events in flight, and the burst goes on only after it: a client
    # that read ahead before the cut (websockets buffers what the socket held) still needs
    # a new connection for the rest, so every cut is one that the stream must survive.
    in_flight = 50
    cut = {n: trio.Event() for n in cut_after}

    async def burst() -> None:
        produced = 0
        for n in sorted(cut_after):
            await produce(daemon, n + in_flight - produced)
            produced = n + in_flight
            await cut[n].wait()
        await produce(daemon, count - produced)

    async with (
        open_client(proxy.url, ROOT) as client,
        trio.open_nursery() as nursery,
        client.subscribe(after_seq=head, batch=batch) as events,
    ):
        nursery.start_soon(burst)
        with trio.fail_after(30):
            async for event in events:
                received.append(event.seq)
                if len(received) in cut_after:
                    proxy.cut()
                    cut[len(received)].set()
                if event.seq == head + count:
                    break
        if batch:
            # Cuts while the client hands out the rest of a frame it holds are noticed
            # together, at its next read: at least one reconnect, at most one a cut.
            assert 1 <= events.reconnects <= len(cut_after)
        else:
            assert events.reconnects >= len(cut_after)
    assert received == list(range(head + 1, head + count + 1))
    if not batch:
        assert proxy.connections >= 1 + 1 + len(cut_after)  # the client's, the first, reconnects


async def test_requests_in_flight_when_the_connection_drops_are_lost_not_hung(
    daemon: Daemon, proxy: Proxy, open_client: OpenClient
) -> None:
    async with open_client(proxy.url, ALICE) as client:
        assert client.closed is False
        lost: list[BaseException] = []

        async def start_stuck() -> None:
            # "stuck" waits out its ready_timeout (3 s): in flight when the cut comes.
            try:
                await client.start(spec_id="stuck")
            except c.ConnectionLostError as exc:
                lost.append(exc)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(start_stuck)
                await eventually(lambda: len(daemon.gateway.registry.state.sandboxes) == 3)
                proxy.cut()
        assert len(lost) == 3
        assert all("closed" in str(exc) for exc in lost)
        assert client.closed is True
        with pytest.raises(c.ConnectionLostError):
            await client.server_info()


@pytest.mark.parametrize("batch", [False, True], ids=["event frames", "batch frames"])
async def test_subscribe_from_now_resumes_from_where_it_began(
    daemon: Daemon, proxy: Proxy, open_client: OpenClient, batch: bool
) -> None:
    async with (
        open_client(proxy.url, ROOT) as client,
        client.subscribe(types=["daemon.stopping"], batch=batch) as events,
    ):
        # Cut before the first event: it resumes from the head it began at,
        # not from the head at the time of the reconnect.
        await events.open()
        began = events.head_seq
        assert began == daemon.gateway.log.head_seq
        proxy.cut()
        await produce(daemon, 10)
        seen = []
        with trio.fail_after(10):
            async for event in events:
                seen.append(event.seq)
                if len(seen) == 10:
                    break
    assert seen == list(range(began + 1, began + 11))


async def test_subscription_gives_up_after_its_retries(
    daemon: Daemon,
    proxy: Proxy,
    monkeypatch: pytest.MonkeyPatch,
    open_client: OpenClient,
) -> None:
    monkeypatch.setattr(resume, "RECONNECT_ATTEMPTS", 3)
    monkeypatch.setattr(resume, "RECONNECT_FIRST_DELAY", 0.01)
    async with open_client(proxy.url, ROOT) as client, client.subscribe(after_seq=0) as events:
        await events.__anext__()
        proxy.stop_listening()
        proxy.cut()
        with pytest.raises(c.ConnectionLostError, match="gave up after 3 attempts"):
            with trio.fail_after(10):
                async for _ in events:
                    pass


async def test_gone(tmp_path: Path, nursery: trio.Nursery, open_client: OpenClient) -> None:
    daemon = await start_daemon(nursery, make_config(tmp_path / "state", segment_bytes=4096))
    log = daemon.gateway.log
    await produce(daemon, 100)
    removed = await log.remove_segments_through(log.head_seq // 2)
    assert removed and log.oldest_seq > 1
    async with open_client(daemon.url, ROOT) as client:
        with pytest.raises(c.GoneError) as gone:
            await client.read_events(0)
        assert gone.value.oldest_seq == log.oldest_seq
        with pytest.raises(c.GoneError) as gone:
            async with client.subscribe(after_seq=0) as events:
                await events.__anext__()
        assert gone.value.oldest_seq == log.oldest_seq
        page = await client.read_events(log.oldest_seq - 1, limit=1)
        assert page.events[0].seq == log.oldest_seq
    await stop_daemon(daemon)
