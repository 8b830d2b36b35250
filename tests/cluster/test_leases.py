"""Leases on a real JetStream KV bucket (3 nats-servers on loopback): taking one, a second
daemon with the same node id refused, a crashed run's lease waited out, renewal, and a
lost node's sandboxes recorded MISSING by the first live node (into a real file store).
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import trio

from sandboxd.cluster.lease import DuplicateNode, Lease, LeaseLost, LeaseValue, Phase
from sandboxd.cluster.leases import Membership, keep_lease, take_lease, watch_losses
from sandboxd.events import types as ev
from sandboxd.events.nats.bridge import Kv, connect
from sandboxd.events.nats.local_cluster import LocalCluster
from sandboxd.events.projection import Status
from sandboxd.events.store import open_store
from tests.nats_cluster import stream_name
from tests.support import eventually

TTL = 2.0


def lease(node: str) -> Lease:
    return Lease(LeaseValue(node, uuid.uuid4().hex), TTL)


async def bucket(cluster: LocalCluster, nursery: trio.Nursery) -> Kv:
    async def open_kv(*, task_status: trio.TaskStatus[Kv]) -> None:
        async with connect(cluster.urls) as nats:
            task_status.started(await nats.key_value(stream_name("L"), ttl=TTL, replicas=3))
            await trio.sleep_forever()

    kv: Kv = await nursery.start(open_kv)
    return kv


async def test_a_lease_is_taken_renewed_and_refused_to_a_second_daemon(
    nats_cluster: LocalCluster, nursery: trio.Nursery
) -> None:
    kv = await bucket(nats_cluster, nursery)
    first = lease("a")
    with trio.fail_after(10):
        await take_lease(kv, first)
    assert first.phase is Phase.HELD
    nursery.start_soon(keep_lease, kv, first)
    # Renewed: it outlives several TTLs.
    revision = first.revision
    await trio.sleep(2.5 * TTL)
    entry = await kv.get("a")
    assert entry is not None and entry.revision > (revision or 0)
    assert LeaseValue.decode(entry.value) == first.value
    # Another daemon with the same node id: refused, once it saw the lease renewed.
    with pytest.raises(DuplicateNode, match="node_id 'a' is held by another running daemon"):
        with trio.fail_after(3 * TTL):
            await take_lease(kv, lease("a"))
    nursery.cancel_scope.cancel()


async def test_a_crashed_runs_lease_is_waited_out_and_a_lease_written_over_is_lost(
    nats_cluster: LocalCluster, nursery: trio.Nursery
) -> None:
    kv = await bucket(nats_cluster, nursery)
    crashed = lease("b")
    await take_lease(kv, crashed)  # and never renewed: the run was killed
    again = lease("b")
    started = trio.current_time()
    with trio.fail_after(4 * TTL):
        await take_lease(kv, again)
    waited = trio.current_time() - started
    assert 0.5 * TTL <= waited <= 3 * TTL, waited
    # The crashed run, still alive somehow, cannot renew over it.
    with pytest.raises(LeaseLost, match="another daemon wrote it"), trio.fail_after(2 * TTL):
        await keep_lease(kv, crashed)
    nursery.cancel_scope.cancel()


async def test_the_first_live_node_records_a_lost_nodes_sandboxes_missing(
    nats_cluster: LocalCluster, nursery: trio.Nursery, tmp_path: Path
) -> None:
    kv = await bucket(nats_cluster, nursery)
    async with open_store(tmp_path / "log") as store:
        created = [
            ev.PendingEvent(f"s{i}", None, ev.SandboxCreated("d", None, "/w", i, node=node))
            for i, node in enumerate(["a", "b", "b"])
        ]
        await store.append_many(created)
        await store.append(ev.PendingEvent("s1", None, ev.ProcessStarted(77, 77, 1.5, ["x"])))
        for node in ("a", "b"):
            await take_lease(kv, held := lease(node))
            if node == "a":
                nursery.start_soon(keep_lease, kv, held)
        # b is never renewed: lost within a TTL; a (the first live by name) records it.
        membership = Membership("a")
        nursery.start_soon(watch_losses, kv, store, membership, TTL / 4)
        with trio.fail_after(4 * TTL):
            await eventually(
                lambda: all(
                    store.state.sandboxes[s].status is Status.MISSING for s in ("s1", "s2")
                ),
                what="b's sandboxes MISSING",
            )
        s1 = store.state.sandboxes["s1"]
        assert (s1.error, s1.pid, s1.before_lost) == ("node b lost", 77, Status.STARTING)
        assert store.state.sandboxes["s0"].status is Status.STARTING  # a's: a is alive
        assert membership.live == {"a"}
        # Recorded once: the next rounds find nothing left to record.
        head = store.state.head_seq
        await trio.sleep(TTL)
        assert store.state.head_seq == head
        nursery.cancel_scope.cancel()
