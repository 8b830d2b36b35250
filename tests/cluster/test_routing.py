"""Routing: which node answers a request (pure), the forwarded request's wire format, and
forwarding over real NATS to a node whose registry answers it."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from sandboxd.actors.errors import NotFound, Unavailable
from sandboxd.cluster.routing import (
    Forwarder,
    decode_forwarded,
    encode_forwarded,
    route,
    serve_forwarded,
)
from sandboxd.events import types as ev
from sandboxd.events.nats.bridge import connect
from sandboxd.events.nats.local_cluster import LocalCluster
from sandboxd.events.projection import State, Status, apply
from sandboxd.events.store import open_store
from sandboxd.gateway import protocol as p
from sandboxd.gateway.auth import User
from tests.actors.test_registry import plain, running
from tests.events.strategies import stamp
from tests.nats_cluster import stream_name

ALICE = User("alice", admin=False)


def request(frame: str) -> p.Request:
    return p.parse_request(frame)


def cluster_state() -> State:
    state = State()
    history = [
        ev.PendingEvent("on-a", "alice", ev.SandboxCreated("d", "alice", "/w", 1, node="a")),
        ev.PendingEvent("on-b", "alice", ev.SandboxCreated("d", "alice", "/w", 2, node="b")),
        ev.PendingEvent("on-b", "alice", ev.SandboxRunning([])),
        ev.PendingEvent("old", None, ev.SandboxCreated("d", None, "/w", 3)),
    ]
    for event in stamp(history):
        apply(state, event)
    return state


@pytest.mark.parametrize(
    ("frame", "me", "node"),
    [
        ('{"id": 1, "op": "sandbox.pause", "sandbox_id": "on-b"}', "a", "b"),
        ('{"id": 1, "op": "sandbox.resume", "sandbox_id": "on-b"}', "b", None),
        ('{"id": 1, "op": "sandbox.delete", "sandbox_id": "on-a"}', "b", "a"),
        ('{"id": 1, "op": "sandbox.logs", "sandbox_id": "on-a"}', "c", "a"),
        ('{"id": 1, "op": "sandbox.delete", "sandbox_id": "old"}', "c", None),  # before nodes
        ('{"id": 1, "op": "sandbox.delete", "sandbox_id": "nope"}', "c", None),  # not_found here
        ('{"id": 1, "op": "sandbox.get", "sandbox_id": "on-b"}', "a", None),  # reads: any node
        ('{"id": 1, "op": "sandbox.search"}', "a", None),
        # a and b each run one (old counts for whoever reads it: here c, or a); c is idle.
        ('{"id": 1, "op": "sandbox.start"}', "a", "c"),
        ('{"id": 1, "op": "sandbox.start", "node": "b"}', "a", "b"),
        ('{"id": 1, "op": "sandbox.start", "node": "a"}', "a", None),
    ],
)
def test_who_answers(frame: str, me: str, node: str | None) -> None:
    assert route(cluster_state(), me, {"a", "b", "c"}, request(frame)) == node


def test_a_start_on_a_node_without_a_lease_is_not_found() -> None:
    with pytest.raises(NotFound, match="node 'z' is not a live node"):
        route(
            cluster_state(),
            "a",
            {"a", "b"},
            request('{"id": 1, "op": "sandbox.start", "node": "z"}'),
        )


def test_the_forwarded_request_round_trips_and_garbage_is_a_bad_request() -> None:
    asked = request('{"id": "x7", "op": "sandbox.start", "env": {"K": "V"}, "wait": false}')
    for user in (ALICE, User(None, admin=True)):
        assert decode_forwarded(encode_forwarded(user, asked)) == (user, asked)
    for data in (b"", b"[]", b'{"user": "a"}', b'{"user": 5, "admin": false, "request": {}}'):
        with pytest.raises(p.RequestError):
            decode_forwarded(data)
    with pytest.raises(p.RequestError, match="sandbox_id"):
        decode_forwarded(
            b'{"user": null, "admin": true, "request": {"id": 1, "op": "sandbox.get"}}'
        )


async def test_forwarded_commands_are_answered_by_the_owners_registry(
    nats_cluster: LocalCluster, tmp_path: Path
) -> None:
    sleeper = plain("sleeper", "-c", "import time; time.sleep(60)")
    stream = stream_name("R")
    async with (
        running(tmp_path, sleeper, node_id="a") as owner,
        connect(nats_cluster.urls) as nats,
        trio.open_nursery() as nursery,
    ):
        await nursery.start(serve_forwarded, nats, stream, "a", owner.registry)
        # Node b folds the same stream: here, the owner's own projection stands for it.
        forward = Forwarder(nats, stream, "b", owner.store, lambda: {"a"}, answer_within=20)

        async def ask(frame: str) -> tuple[object, str]:
            answered = await forward(ALICE, request(frame))
            assert answered is not None
            reply = p.parse_frame(answered[0])
            assert isinstance(reply, p.Reply)
            return reply.result if reply.ok else reply.error, answered[1]

        # Placed on a (b holds no lease here); answered there, with the request's id.
        result, code = await ask('{"id": 7, "op": "sandbox.start", "wait": true}')
        assert code == "ok" and isinstance(result, dict)
        assert (result["status"], result["node"], result["created_by_user_id"]) == (
            "RUNNING",
            "a",
            "alice",
        )
        sandbox_id = result["id"]
        result, _ = await ask(f'{{"id": 8, "op": "sandbox.pause", "sandbox_id": "{sandbox_id}"}}')
        assert isinstance(result, dict) and result["status"] == "PAUSED"
        assert owner.registry.state.sandboxes[sandbox_id].status is Status.PAUSED
        # Errors come back as the owner's error replies; reads stay where they are asked.
        # (Named: b, idle, would take an unnamed start, and b is the asking node itself.)
        taken = f'{{"id": 9, "op": "sandbox.start", "sandbox_id": "{sandbox_id}", "node": "a"}}'
        result, code = await ask(taken)
        assert code == "conflict" and isinstance(result, dict) and "taken" in result["message"]
        assert (
            await forward(
                ALICE, request(f'{{"id": 1, "op": "sandbox.get", "sandbox_id": "{sandbox_id}"}}')
            )
            is None
        )
        result, _ = await ask(f'{{"id": 10, "op": "sandbox.delete", "sandbox_id": "{sandbox_id}"}}')
        assert result is True and sandbox_id not in owner.registry.state.sandboxes
        # A node that does not answer: unavailable, at once (no responders) or in time.
        lost = Forwarder(nats, stream, "b", owner.store, lambda: {"gone"}, answer_within=2)
        with pytest.raises(Unavailable, match="node gone, which must answer this, did not"):
            await lost(ALICE, request('{"id": 11, "op": "sandbox.start", "node": "gone"}'))
        nursery.cancel_scope.cancel()


async def test_a_lost_nodes_sandbox_is_unavailable_until_missing_then_deleted_anywhere(
    nats_cluster: LocalCluster, tmp_path: Path
) -> None:
    async with connect(nats_cluster.urls) as nats, open_store(tmp_path / "log") as store:
        await store.append_many(
            [
                ev.PendingEvent("s", "alice", ev.SandboxCreated("d", "alice", "/w", 1, node="a")),
                ev.PendingEvent("s", "alice", ev.SandboxRunning([])),
            ]
        )
        forward = Forwarder(nats, stream_name("R"), "b", store, lambda: {"b"}, answer_within=2)
        delete = request('{"id": 3, "op": "sandbox.delete", "sandbox_id": "s"}')
        with pytest.raises(Unavailable, match="node a, which holds no lease"):
            await forward(ALICE, delete)
        await store.append(ev.PendingEvent("s", None, ev.SandboxMissing("node a lost", "a")))
        with pytest.raises(Unavailable, match="holds no lease"):
            await forward(ALICE, request('{"id": 4, "op": "sandbox.pause", "sandbox_id": "s"}'))
        with pytest.raises(NotFound):  # not bob's to see
            await forward(User("bob", admin=False), delete)
        assert await forward(ALICE, delete) == ('{"id":3,"ok":true,"result":true}', "ok")
        assert "s" not in store.state.sandboxes
        forgotten = (await store.read(0))[-1]
        assert forgotten.data == ev.SandboxDeleted(forced=True) and forgotten.by == "alice"
