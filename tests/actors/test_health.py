"""Health probes against real servers: the reference agent server, and small trio
servers that answer wrongly or not at all."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable, Iterator
from functools import partial

import pytest
import trio
import trio.testing

from sandboxd.actors import health
from tests.actors.children.support import Sandboxes

Handler = Callable[[trio.SocketStream], Awaitable[None]]


@pytest.fixture
def closed_port() -> Iterator[int]:
    # Bound but not listening: a connect is refused, and no one else can take it.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


async def serve(nursery: trio.Nursery, handler: Handler) -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def read_request(stream: trio.SocketStream) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some()
        if not chunk:
            return
        data += chunk


def answering(response: bytes) -> Handler:
    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            await read_request(stream)
            await stream.send_all(response)

    return handler


async def test_probe_of_the_agent_server_is_true(sandboxes: Sandboxes) -> None:
    _, port = await sandboxes.agent_server()
    assert await health.probe(port, "/health", timeout=5)
    assert await health.probe(port, "/alive", timeout=5)
    # A path that wants a key answers 401: not healthy.
    assert not await health.probe(port, "/anything", timeout=5)


async def test_probe_of_a_closed_port_is_false(closed_port: int) -> None:
    with trio.fail_after(1):
        assert not await health.probe(closed_port, "/", timeout=5)


@pytest.mark.parametrize(
    ("response", "healthy"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", True),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nbody until close", True),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n" + b"x" * 200000, True),
        (b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n", False),
        (b"HTTP/1.1 204 No Content\r\n\r\n", False),
        (b"not http at all\r\n\r\n", False),
        (b"", False),  # closed without a word
    ],
)
async def test_probe_is_true_only_for_200(response: bytes, healthy: bool) -> None:
    async with trio.open_nursery() as nursery:
        port = await serve(nursery, answering(response))
        with trio.fail_after(5):
            assert await health.probe(port, "/", timeout=5) is healthy
        nursery.cancel_scope.cancel()


async def test_probe_of_a_server_that_never_answers_is_false_after_the_timeout() -> None:
    async def silent(stream: trio.SocketStream) -> None:
        async with stream:
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        port = await serve(nursery, silent)
        with trio.fail_after(5):
            assert not await health.probe(port, "/", timeout=0.2)
        nursery.cancel_scope.cancel()


async def test_probe_sends_the_path() -> None:
    seen: list[bytes] = []

    async def record(stream: trio.SocketStream) -> None:
        async with stream:
            data = b""
            while b"\r\n\r\n" not in data:
                data += await stream.receive_some()
            seen.append(data.split(b"\r\n", 1)[0])
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    async with trio.open_nursery() as nursery:
        port = await serve(nursery, record)
        assert await health.probe(port, "/ready?x=1", timeout=5)
        nursery.cancel_scope.cancel()
    assert seen == [b"GET /ready?x=1 HTTP/1.1"]


async def test_wait_until_ready_follows_a_server_that_is_still_starting(
    sandboxes: Sandboxes,
) -> None:
    # agent_server() spawns and calls wait_until_ready at once: the first
    # probes are refused while Python starts, later ones succeed.
    spawned, _ = await sandboxes.agent_server()
    assert spawned.process.returncode is None


async def test_wait_until_ready_gives_up_after_the_timeout(closed_port: int) -> None:
    with trio.fail_after(5):
        assert not await health.wait_until_ready(closed_port, "/", timeout=0.2)


async def test_wait_until_ready_stops_when_the_process_exits(sandboxes: Sandboxes) -> None:
    spawned = await sandboxes.spawn("-c", "import sys; sys.exit(3)")
    exited = trio.Event()

    async def watch() -> None:
        await spawned.wait()
        exited.set()

    with socket.socket() as never_listening:
        never_listening.bind(("127.0.0.1", 0))
        port = never_listening.getsockname()[1]
        with trio.fail_after(5):  # far less than the 60 s it would wait otherwise
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                assert not await health.wait_until_ready(port, "/", timeout=60, exited=exited)


async def test_wait_until_ready_stops_even_in_the_middle_of_a_probe() -> None:
    async def silent(stream: trio.SocketStream) -> None:
        async with stream:
            await trio.sleep_forever()

    exited = trio.Event()
    async with trio.open_nursery() as nursery:
        port = await serve(nursery, silent)
        nursery.start_soon(lambda: _set_when_connected(exited))
        with trio.fail_after(5):
            assert not await health.wait_until_ready(
                port, "/", timeout=60, exited=exited, attempt_timeout=60
            )
        nursery.cancel_scope.cancel()


async def _set_when_connected(event: trio.Event) -> None:
    # Let the first probe connect and hang, then say the process exited.
    await trio.testing.wait_all_tasks_blocked()
    event.set()
