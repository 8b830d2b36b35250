"""Clients given several daemons' URLs: which one they try, and failing over to the next.

The rules are ``protocol.Endpoints``'s, tested first without I/O; then both clients
against two real daemons, one behind a proxy the test cuts and closes. (A subscription
that moves between the nodes of one cluster and resumes exactly once is in
tests/cluster/: two unrelated daemons have two unrelated logs.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from sandboxd.events import types as ev
from sandboxd.gateway import protocol as p
from sandboxd.gateway.client import open_client as open_trio_client
from sandboxd.gateway.protocol import _resume as resume
from tests.gateway.aio_bridge import open_aio_client
from tests.gateway.support import Daemon, make_config, start_daemon, stop_daemon
from tests.gateway.test_client import OpenClient, Proxy
from tests.support import TOKENS

ROOT = TOKENS["root"]
A, B, C = "ws://a/v1", "ws://b/v1", "ws://c/v1"


# --- The rules, without I/O -----------------------------------------------------------------


def test_one_url_or_several_in_order_without_repeats() -> None:
    assert p.Endpoints(A).urls == (A,)
    endpoints = p.Endpoints([A, B, A, C])
    assert endpoints.urls == (A, B, C) and endpoints.current == A
    assert endpoints.order() == [A, B, C]
    with pytest.raises(ValueError, match="url: give at least one"):
        p.Endpoints([])
    with pytest.raises(ValueError, match="url: '' is not"):
        p.Endpoints([A, ""])


def test_a_drop_moves_the_next_url_to_the_front() -> None:
    endpoints = p.Endpoints([A, B, C])
    endpoints.lost(A)
    assert endpoints.current == B and endpoints.order() == [B, C, A]
    endpoints.lost(A)  # a drop of a URL no longer current moves nothing
    assert endpoints.current == B
    endpoints.connected(A)
    assert endpoints.order() == [A, B, C]
    endpoints.connected(C)
    endpoints.lost(C)
    assert endpoints.current == A  # round the end


def test_a_lost_requests_connection_fails_over_to_the_others_only() -> None:
    endpoints = p.Endpoints([A, B, C], first=B)
    assert endpoints.others(B) == [C, A]
    assert p.Endpoints(A).others(A) == []  # one URL: lost stays lost, as ever


def test_a_subscription_tries_every_url_each_round_the_rounds_backing_off() -> None:
    endpoints = p.Endpoints([A, B], first=B)
    attempts = list(endpoints.attempts())
    delays = list(p.reconnect_delays())
    assert len(attempts) == 2 * resume.RECONNECT_ATTEMPTS
    assert attempts[:4] == [(0.0, B), (0.0, A), (delays[1], B), (0.0, A)]
    assert [delay for delay, _ in attempts[::2]] == delays
    # One URL: the single daemon's policy, unchanged.
    assert list(p.Endpoints(A).attempts()) == [(delay, A) for delay in delays]
    assert "after 10 attempts at each of 2 URLs: cut" in str(
        endpoints.gave_up(p.ConnectionLostError("cut"))
    )
    assert "after 10 attempts: cut" in str(p.Endpoints(A).gave_up(p.ConnectionLostError("cut")))


def test_a_round_that_failed_says_every_reason_or_the_refused_token() -> None:
    a, b = p.unreachable(A, "refused"), p.unreachable(B, "timed out")
    assert p.first_of([a]) is a
    both = p.first_of([a, b])
    assert both.message.startswith("cannot reach sandboxd at any of 2 URLs")
    assert A in both.message and B in both.message and "timed out" in both.message
    token = p.refused(B, 401)
    assert p.first_of([a, token]) is token


# --- Both clients, two real daemons ---------------------------------------------------------


@pytest.fixture(params=["trio", "asyncio"])
def open_client(request: pytest.FixtureRequest) -> OpenClient:
    return open_trio_client if request.param == "trio" else open_aio_client


@pytest.fixture
async def second(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Daemon]:
    running = await start_daemon(nursery, make_config(tmp_path / "second"))
    yield running
    await stop_daemon(running)


@pytest.fixture
async def proxy(daemon: Daemon, nursery: trio.Nursery) -> AsyncIterator[Proxy]:
    running = Proxy(daemon.gateway.port)
    await nursery.start(running.serve)
    yield running


async def test_connects_to_the_first_that_answers(
    daemon: Daemon, second: Daemon, proxy: Proxy, open_client: OpenClient
) -> None:
    proxy.stop_listening()
    async with open_client([proxy.url, second.url], ROOT) as client:
        assert client.url == second.url
        assert (await client.server_info()).started_at == _started_at(second)
    with pytest.raises(p.ConnectError, match="cannot reach sandboxd at any of 2 URLs"):
        async with open_client([proxy.url, proxy.url.replace("/v1", "/v2")], ROOT):
            pass


async def test_requests_fail_over_to_the_next_daemon(
    daemon: Daemon, second: Daemon, proxy: Proxy, open_client: OpenClient
) -> None:
    async with open_client([proxy.url, second.url], ROOT) as client:
        assert (await client.server_info()).started_at == _started_at(daemon)
        proxy.stop_listening()
        proxy.cut()
        # The cut is seen by the next call at the latest, which then goes to the other.
        with trio.fail_after(10):
            while True:
                try:
                    info = await client.server_info()
                except p.ConnectionLostError:
                    continue  # sent before the client saw the cut: outcome unknown
                if info.started_at == _started_at(second):
                    break
        assert client.url == second.url and client.closed is False


async def test_a_subscription_resumes_on_the_next_daemon_after_its_last_seq(
    daemon: Daemon, second: Daemon, proxy: Proxy, open_client: OpenClient
) -> None:
    await _produce(second, 50)
    async with (
        open_client([proxy.url, second.url], ROOT) as client,
        client.subscribe(after_seq=0) as events,
    ):
        first = await events.__anext__()
        assert first.seq == 1 and events.url == proxy.url
        proxy.stop_listening()
        proxy.cut()
        seen = []
        with trio.fail_after(10):
            async for event in events:
                seen.append(event.seq)
                if event.seq == second.gateway.log.head_seq:
                    break
        assert events.url == second.url
        # Where it left off: after seq 1, none again, none skipped (of the second's log).
        assert seen == list(range(2, second.gateway.log.head_seq + 1))


def _started_at(daemon: Daemon) -> str:
    return daemon.gateway.started_at


async def _produce(daemon: Daemon, count: int) -> None:
    await daemon.gateway.log.append_many(
        [ev.PendingEvent(None, None, ev.DaemonStopping("burst"))] * count
    )
