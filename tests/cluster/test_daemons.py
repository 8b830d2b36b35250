"""Three `sandboxd serve` processes on one real JetStream stream (3 nats-servers on loopback):
what issue 14 asks of the nodes, on real processes.

- a sandbox started through one node is read, paused and deleted through the others;
- a subscriber on node A moves to node C when A goes, and resumes exactly once;
- kill -9 of one node: its sandboxes are MISSING ("node X lost") on the others once its
  lease expires, and adopted again, with their processes alive, when it comes back;
- a second daemon with a node_id already running is refused, saying so.

Each test has a stream of its own on the suite's NATS cluster (tests/nats_cluster.py),
and a lease TTL of 2 s so that a loss is seen within seconds.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio

from sandboxd.events.nats.local_cluster import LocalCluster
from sandboxd.events.nats.settings import NatsSettings
from sandboxd.events.projection import Status
from sandboxd.gateway.client import Client, NotFoundError, UnavailableError, open_client
from tests.daemon_process import DaemonProcess, daemon_config
from tests.gateway.support import SPECS, make_config
from tests.nats_cluster import restarted, stream_name
from tests.support import TOKENS, end_sandboxes, proc_state

ROOT = TOKENS["root"]
NAMES = ("node-a", "node-b", "node-c")
TTL = 2.0
#: Bounds the whole file: every wait below is within it.
pytestmark = pytest.mark.timeout(240)


@asynccontextmanager
async def cluster_nodes(
    nats_cluster: LocalCluster, root: Path, names: Sequence[str] = NAMES
) -> AsyncIterator[list[DaemonProcess]]:
    """The nodes, started and listening, sharing one stream and one secret; killed after."""
    settings = NatsSettings(tuple(nats_cluster.urls), stream_name("D"), 3, None, 2.0)
    secret = secrets.token_bytes(32)
    nodes = []
    for i, name in enumerate(names):
        state = root / name / "state"
        state.mkdir(parents=True, mode=0o700)
        fd = os.open(state / "secret", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, secret)
        os.close(fd)
        low = 25000 + 200 * i
        config = daemon_config(
            state,
            SPECS,
            nats=settings,
            node_id=name,
            lease_ttl=TTL,
            port_range=(low, low + 199),
            on_shutdown="keep",
        )
        nodes.append(DaemonProcess(root / name, config))
    try:
        for node in nodes:
            await node.start()
        # Every node sees every other's lease (its watch looks every third of a TTL).
        for node in nodes:
            async with open_client(node.url, ROOT) as client:
                with trio.fail_after(2 * TTL):
                    while (await client.server_info()).nodes != sorted(names):  # noqa: ASYNC110
                        await trio.sleep(0.05)
        yield nodes
    finally:
        for node in nodes:
            node.kill()
            end_sandboxes(node.state_dir)
    for node in nodes:
        assert "Traceback" not in node.output(), node.output()


async def seen(client: Client, sandbox_id: str, status: Status | None) -> None:
    """Wait until this node's fold shows the sandbox with ``status`` (None: gone)."""

    async def check() -> bool:
        info = await client.get(sandbox_id)
        return (info is None) if status is None else (info is not None and info.status is status)

    with trio.fail_after(10):
        while not await check():  # noqa: ASYNC110  (asks the daemon: no event to wait on)
            await trio.sleep(0.02)


async def test_started_through_one_node_read_paused_deleted_through_the_others(
    nats_cluster: LocalCluster, tmp_path: Path
) -> None:
    async with (
        cluster_nodes(nats_cluster, tmp_path) as (a, b, c),
        open_client(a.url, ROOT) as on_a,
        open_client(b.url, ROOT) as on_b,
        open_client(c.url, ROOT) as on_c,
    ):
        started = [await on_a.start(spec_id="sleep") for _ in range(3)]
        # Placed on the least busy node: one each.
        assert sorted(info.node or "" for info in started) == sorted(NAMES)
        for info in started:
            assert info.status is Status.RUNNING
            await seen(on_b, info.id, Status.RUNNING)
            await seen(on_c, info.id, Status.RUNNING)
            # The same sandbox from every node, the same session key too (one secret);
            # (usage is read from cgroups: only by the owner, batch_get leaves it out).
            everywhere = [await client.batch_get([info.id]) for client in (on_a, on_b, on_c)]
            assert everywhere == [[attrs.evolve(info, usage=None)]] * 3
            paused = await on_b.pause(info.id)
            assert paused.status is Status.PAUSED and paused.node == info.node
            await seen(on_c, info.id, Status.PAUSED)
            assert (await on_c.resume(info.id)).status is Status.RUNNING
            assert (await on_b.logs(info.id)).data == ""
            assert await on_c.delete(info.id) is True
            await seen(on_a, info.id, None)
            assert info.pid is not None and proc_state(info.pid) in (None, "Z")
        # A start may name its node; a node that is not in the cluster is not found.
        named = await on_c.start(spec_id="sleep", node="node-a")
        assert named.node == "node-a"
        # At once through another node, its fold maybe behind: it catches up, then acts.
        assert (await on_b.pause(named.id)).status is Status.PAUSED
        with pytest.raises(NotFoundError, match="node 'node-z' is not a live node"):
            await on_b.start(spec_id="sleep", node="node-z")
        await on_b.delete(named.id)


async def test_a_session_key_finds_its_sandbox_through_every_node(
    nats_cluster: LocalCluster, tmp_path: Path
) -> None:
    """The OpenHands adapter's lookup (``sandbox.find_by_session_key``) answers for a
    sandbox of any node, through any node, while it runs, and for none once it does not."""
    async with (
        cluster_nodes(nats_cluster, tmp_path) as (a, b, c),
        open_client(a.url, ROOT) as on_a,
        open_client(b.url, ROOT) as on_b,
        open_client(c.url, ROOT) as on_c,
    ):
        clients = (on_a, on_b, on_c)
        started = [await on_a.start(spec_id="sleep") for _ in range(3)]
        assert sorted(info.node or "" for info in started) == sorted(NAMES)
        for info in started:
            key = info.session_api_key
            assert key is not None
            for client in clients:
                await seen(client, info.id, Status.RUNNING)
            found = [await client.find_by_session_key(key) for client in clients]
            assert found == [attrs.evolve(info, usage=None)] * 3
            for client in clients:
                assert await client.find_by_session_key(key[:-1] + "x") is None
        paused = started[0]
        await on_b.pause(paused.id)
        for client in clients:
            await seen(client, paused.id, Status.PAUSED)
            assert await client.find_by_session_key(paused.session_api_key or "") is None
        deleted = started[1]
        await on_c.delete(deleted.id)
        for client in clients:
            await seen(client, deleted.id, None)
            assert await client.find_by_session_key(deleted.session_api_key or "") is None
        for info in (started[0], started[2]):
            assert await on_a.delete(info.id) is True


async def test_a_subscriber_moves_from_a_to_c_and_resumes_exactly_once(
    nats_cluster: LocalCluster, tmp_path: Path
) -> None:
    async with (
        cluster_nodes(nats_cluster, tmp_path) as (a, b, c),
        open_client(b.url, ROOT) as on_b,
        open_client([a.url, c.url], ROOT) as follower,
        follower.subscribe(after_seq=0) as events,
    ):
        assert events.url == a.url
        received: list[int] = []

        async def started(count: int) -> None:
            for _ in range(count):
                await on_b.start(spec_id="sleep", node="node-b")

        await started(5)
        head = (await on_b.server_info()).head_seq
        with trio.fail_after(20):
            async for event in events:
                received.append(event.seq)
                if event.seq >= head:
                    break
            a.kill()  # mid-stream: the subscription's connection drops
            await started(5)
            head = (await on_b.server_info()).head_seq
            async for event in events:
                received.append(event.seq)
                if event.seq >= head:
                    break
        assert events.url == c.url
        # Every seq of the stream, once, in order: the stream's seqs are every node's.
        assert received == list(range(1, head + 1))
        history = (await on_b.read_events(0, limit=1000)).events
        assert [e.seq for e in history] == received


async def test_a_killed_node_is_lost_then_adopts_its_sandboxes_again(
    nats_cluster: LocalCluster, tmp_path: Path
) -> None:
    async with (
        cluster_nodes(nats_cluster, tmp_path) as (a, b, c),
        open_client([a.url, c.url], ROOT) as client,
    ):
        on_b = [await client.start(spec_id="sleep", node="node-b") for _ in range(2)]
        await client.pause(on_b[1].id)
        b.kill()  # kill -9: its sandboxes' processes run on
        for info in on_b:
            assert info.pid is not None and proc_state(info.pid) not in (None, "Z")
        began = trio.current_time()
        for info in on_b:
            await eventually_status(client, info.id, Status.MISSING, within=5 * TTL)
        lost_after = trio.current_time() - began
        assert lost_after <= 3 * TTL, lost_after
        missing = await client.get(on_b[0].id)
        assert missing is not None and missing.error == "node node-b lost"
        # Ops on them: unavailable while b is away (only b can act on their processes).
        with pytest.raises(UnavailableError, match="node-b"):
            await client.resume(on_b[1].id)
        # b comes back: it adopts them, as after a crash of its own.
        await b.start()
        await eventually_status(client, on_b[0].id, Status.RUNNING, within=10)
        await eventually_status(client, on_b[1].id, Status.PAUSED, within=10)
        for info in on_b:
            again = await client.get(info.id)
            assert again is not None and again.pid == info.pid and again.node == "node-b"
        assert (await client.resume(on_b[1].id)).status is Status.RUNNING
        for info in on_b:
            assert await client.delete(info.id) is True


async def test_a_second_daemon_with_a_running_nodes_id_is_refused(
    nats_cluster: LocalCluster, tmp_path: Path
) -> None:
    async with cluster_nodes(nats_cluster, tmp_path, names=("node-a",)) as (a,):
        (tmp_path / "twin").mkdir()
        twin = DaemonProcess(
            tmp_path / "twin",
            make_config(tmp_path / "twin" / "state", nats=a.config.nats, node_id="node-a"),
        )
        twin.spawn()
        assert twin.process is not None
        try:
            with trio.fail_after(6 * TTL):
                while twin.process.poll() is None:  # noqa: ASYNC110  (a process: no event)
                    await trio.sleep(0.05)
        finally:
            twin.kill()
        assert twin.process.returncode != 0
        assert "node_id 'node-a' is held by another running daemon" in twin.output()
        assert "Traceback" not in twin.output()


async def eventually_status(client: Client, sandbox_id: str, status: Status, within: float) -> None:
    with trio.fail_after(within):
        while True:
            info = await client.get(sandbox_id)
            if info is not None and info.status is status:
                return
            await trio.sleep(0.05)


async def test_nats_lost_for_longer_than_a_lease_then_back_nodes_carry_on(
    nats_cluster: LocalCluster, tmp_path: Path
) -> None:
    async with cluster_nodes(nats_cluster, tmp_path, names=("node-a", "node-b")) as (a, b):
        async with open_client(a.url, ROOT) as on_a:
            kept = await on_a.start(spec_id="sleep", node="node-a")
        with restarted(nats_cluster):  # then every server back, its store as it was
            for i in range(len(nats_cluster.servers)):
                nats_cluster.kill(i)
            # Longer than a lease: every lease has lapsed by the time NATS is back.
            await trio.sleep(2 * TTL)
        # Each node takes its lease again; if node-b looked before node-a did, it recorded
        # node-a's sandbox lost, and node-a adopts it again: either way it runs on.
        async with open_client(b.url, ROOT) as on_b:
            with trio.fail_after(60):
                while True:
                    info = await on_b.get(kept.id)
                    nodes = (await on_b.server_info()).nodes
                    if (
                        info is not None
                        and info.status is Status.RUNNING
                        and nodes
                        == [
                            "node-a",
                            "node-b",
                        ]
                    ):
                        break
                    await trio.sleep(0.1)
            assert info.pid == kept.pid and a.alive() and b.alive()
            assert proc_state(kept.pid or 0) not in (None, "Z")
            assert "its lease expired; taking it again" in a.current_output()
            # And it is still node-a's to act on, once the sandboxes' stream has a leader
            # again: until then, ops answer `unavailable` (its election takes up to ~9 s).
            with trio.fail_after(30):
                while True:
                    try:
                        paused = await on_b.pause(kept.id)
                        break
                    except UnavailableError:
                        await trio.sleep(0.2)
            assert paused.status is Status.PAUSED
            assert await on_b.delete(kept.id) is True
