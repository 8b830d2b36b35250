"""Two nodes in this process on one real JetStream stream (3 nats-servers on loopback):
each a registry on the shared log with its lease, its watch and its routing, as the
daemon wires them (daemon/cluster/node.py). Commands through one node act on the other's
sandboxes, and a node that left joins again once its old lease has expired. (Losing a
node with sandboxes, kill -9 and all, is tests/cluster/test_daemons.py's, on processes.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import trio

from sandboxd.actors.boundary.in_force import open_boundary
from sandboxd.actors.keys import SessionKeys
from sandboxd.actors.recovery import recover
from sandboxd.actors.registry import Registry
from sandboxd.cluster.node import Node, join_cluster
from sandboxd.events.nats.local_cluster import LocalCluster
from sandboxd.events.nats.settings import NatsSettings
from sandboxd.events.projection import Status
from sandboxd.events.store import Store, StoreConfig, open_store
from sandboxd.gateway import protocol as p
from sandboxd.gateway.auth import User
from tests.actors.test_registry import plain
from tests.daemon_process import daemon_config
from tests.nats_cluster import stream_name
from tests.support import eventually

ALICE = User("alice", admin=False)
TTL = 2.0
SLEEPER = plain("sleeper", "-c", "import time; time.sleep(120)")


@attrs.frozen
class Running:
    node: Node
    registry: Registry
    store: Store

    async def ask(self, frame: str) -> object:
        """A request as this node's gateway answers it: forwarded, or its own registry's."""
        request = p.parse_request(frame)
        forwarded = await self.node.forward(ALICE, request)
        assert forwarded is not None, f"{request.op} was not forwarded"
        reply = p.parse_frame(forwarded[0])
        assert isinstance(reply, p.Reply)
        return reply.result if reply.ok else reply.exception()


@asynccontextmanager
async def node(
    tmp_path: Path, name: str, settings: NatsSettings, port_low: int
) -> AsyncIterator[Running]:
    config = daemon_config(
        tmp_path / name,
        (SLEEPER,),
        node_id=name,
        lease_ttl=TTL,
        port_range=(port_low, port_low + 99),
        on_shutdown="keep",
    )
    boundary = open_boundary(
        config.boundary_settings, state_dir=config.state_dir, max_sandboxes=config.max_sandboxes
    )
    try:
        async with (
            open_store(config.state_dir, StoreConfig(nats=settings)) as store,
            trio.open_nursery() as nursery,
        ):
            await nursery.start(boundary.run)
            registry = Registry(
                config, store, SessionKeys.of_state_dir(config.state_dir), nursery, boundary
            )
            async with join_cluster(config, settings, store, url="") as joined:
                await recover(registry)
                await joined.serve(registry)
                yield Running(joined, registry, store)
            nursery.cancel_scope.cancel()
    finally:
        boundary.close()


async def test_commands_through_one_node_act_on_the_others_and_a_node_joins_again(
    nats_cluster: LocalCluster, tmp_path: Path
) -> None:
    settings = NatsSettings(tuple(nats_cluster.urls), stream_name("N"), 3, None, 2.0)
    async with node(tmp_path, "a", settings, 23000) as a:
        async with node(tmp_path, "b", settings, 23100) as b:
            await eventually(lambda: a.node.membership.live == {"a", "b"}, what="b seen by a")
            info = await b.ask(
                '{"id": 1, "op": "sandbox.start", "spec_id": "sleeper", "node": "a"}'
            )
            assert isinstance(info, dict) and info["node"] == "a" and info["status"] == "RUNNING"
            sandbox_id = info["id"]
            # b folds a's events: it answers reads, and forwards what a must do; at once,
            # its fold maybe a few ms behind a's: it catches up with the stream first.
            paused = await b.ask(
                f'{{"id": 2, "op": "sandbox.pause", "sandbox_id": "{sandbox_id}"}}'
            )
            assert isinstance(paused, dict) and paused["status"] == "PAUSED"
            assert a.registry.state.sandboxes[sandbox_id].status is Status.PAUSED
            resumed = await b.ask(
                f'{{"id": 3, "op": "sandbox.resume", "sandbox_id": "{sandbox_id}"}}'
            )
            assert isinstance(resumed, dict) and resumed["status"] == "RUNNING"
            pid = resumed["pid"]
        # b left without giving its lease up: the new b waits it out, then joins again.
        async with node(tmp_path, "b", settings, 23100) as b:
            assert b.store.state.sandboxes[sandbox_id].status is Status.RUNNING
            await eventually(lambda: a.node.membership.live == {"a", "b"}, what="b seen again")
            start_on_b = '{"id": 4, "op": "sandbox.start", "spec_id": "sleeper", "node": "b"}'
            started = await a.ask(start_on_b)
            assert isinstance(started, dict) and started["node"] == "b"
            for through, sandbox in ((b, sandbox_id), (a, started["id"])):
                delete = f'{{"id": 5, "op": "sandbox.delete", "sandbox_id": "{sandbox}"}}'
                assert await through.ask(delete) is True
            await eventually(
                lambda: not a.store.state.sandboxes and not b.store.state.sandboxes,
                what="both nodes to fold both deletes",
            )
    assert pid is not None
