"""The store on the JetStream log, against a real 3-server cluster: the same promises as on
files (fold, snapshots, reads, exact resume), conditional appends between nodes, faults."""

from __future__ import annotations

import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings

from sandboxd.events import types as ev
from sandboxd.events.codec import now_ts
from sandboxd.events.errors import LogUnavailable
from sandboxd.events.nats.bridge import NatsUnavailable
from sandboxd.events.nats.local_cluster import LocalCluster, free_ports
from sandboxd.events.nats.log import Conflict, encode_body
from sandboxd.events.nats.settings import NatsSettings
from sandboxd.events.projection import State, apply, state_to_dict
from sandboxd.events.store import Store, StoreConfig, open_store
from sandboxd.events.subscriptions import CaughtUp
from tests.events.strategies import histories, sample_pending
from tests.nats_cluster import restarted, stream_name
from tests.support import eventually


def _config(
    cluster: LocalCluster, stream: str, ack_within: float = 2.0, **changes: object
) -> StoreConfig:
    settings_ = NatsSettings(tuple(cluster.urls), stream, 3, None, ack_within)
    return StoreConfig(nats=settings_, **changes)  # type: ignore[arg-type]


async def _fill(store: Store, count: int) -> list[ev.Event]:
    return [await store.append(sample_pending(i)) for i in range(count)]


async def test_two_nodes_fold_one_stream_with_global_seqs(
    nats_cluster: LocalCluster, tmp_path: Path
) -> None:
    config = _config(nats_cluster, stream_name())
    async with (
        open_store(tmp_path / "a", config) as a,
        open_store(tmp_path / "b", config) as b,
    ):
        written = await _fill(a, 16)
        written += await b.append_many([sample_pending(i) for i in range(16, 24)])
        assert [e.seq for e in written] == list(range(1, 25))
        # Each node folds every event, whichever node wrote it.
        await eventually(
            lambda: a.state.head_seq == b.state.head_seq == 24, what="both nodes to fold all"
        )
        assert state_to_dict(a.state) == state_to_dict(b.state)
        assert await a.read(0) == await b.read(0) == written
        assert await a.read(10, limit=3) == written[10:13]


async def test_a_node_reads_from_the_stream_only_what_the_others_stored(
    nats_cluster: LocalCluster, tmp_path: Path
) -> None:
    """A node folds its own events from their acks and reads the others' (announced):
    none of its own comes back to it through the stream."""
    config = _config(nats_cluster, stream_name())
    async with open_store(tmp_path / "a", config) as a, open_store(tmp_path / "b", config) as b:
        await _fill(a, 40)
        await eventually(lambda: b.state.head_seq == 40, what="b to fold a's events")
        await _fill_from(b, 40, 64)
        await eventually(lambda: a.state.head_seq == 64, what="a to fold b's events")
        assert state_to_dict(a.state) == state_to_dict(b.state)
        assert (a.log.messages_read, b.log.messages_read) == (24, 40)  # type: ignore[union-attr]


async def test_an_event_no_node_announced_is_folded_by_every_node(
    nats_cluster: LocalCluster, tmp_path: Path
) -> None:
    """An append whose announcement never came (its writer is no node, or the announcement
    was lost) is read all the same once the head has stood still a moment, in order."""
    stream = stream_name()
    config = _config(nats_cluster, stream)
    async with open_store(tmp_path / "a", config) as a, open_store(tmp_path / "b", config) as b:
        await _fill(a, 3)
        await eventually(lambda: b.state.head_seq == 3, what="b to fold a's events")
        pending = sample_pending(3)
        body = encode_body(ev.Event(0, now_ts(), pending.sandbox_id, pending.by, pending.data))
        nats = a.log.nats  # type: ignore[union-attr]
        subject = a.log.settings.subject_of(pending.sandbox_id)  # type: ignore[union-attr]
        assert await nats.publish_many([(subject, body, {})], answer_within=5) == [4]
        await eventually(
            lambda: a.state.head_seq == b.state.head_seq == 4, what="each node to fold it"
        )
        for store in (a, b):
            [event] = await store.read(3)
            assert (event.seq, event.data) == (4, pending.data)


async def test_a_stale_transition_of_one_sandbox_is_refused(
    nats_cluster: LocalCluster, tmp_path: Path
) -> None:
    config = _config(nats_cluster, stream_name())
    async with open_store(tmp_path / "a", config) as a, open_store(tmp_path / "b", config) as b:
        await a.append(sample_pending(0))  # sbx-000000 created
        await a.append(sample_pending(1))  # its process started
        await eventually(lambda: b.state.head_seq == 2, what="b to fold a's events")
        # b records a transition; a, which has not folded it yet, records another one
        # conditional on what it knew: the stream refuses a's.
        paused = ev.PendingEvent("sbx-000000", "alice", ev.SandboxPaused())
        deleted = ev.PendingEvent("sbx-000000", "alice", ev.SandboxDeleted(True))
        log_a = a.log
        known = log_a._last_seq_of.copy()  # what a knew before b's append
        await b.append(paused)
        # a folds b's event in the background: wait for it, then take a back to what it
        # knew before, so that no fold can bring it up to date under the append below.
        await eventually(lambda: a.state.head_seq == 3, what="a to fold b's event")
        log_a._last_seq_of.update(known)
        with pytest.raises(Conflict, match="sbx-000000"):
            await log_a.append(deleted)
        # Once it knows the stream's last seq of that sandbox again, it appends.
        event = await a.append(deleted)
        assert event.seq == 4
        assert [e.type for e in await a.read(0)] == [
            "sandbox.created",
            "sandbox.process_started",
            "sandbox.paused",
            "sandbox.deleted",
        ]


async def test_a_new_sandbox_id_is_created_once_across_nodes(
    nats_cluster: LocalCluster, tmp_path: Path
) -> None:
    config = _config(nats_cluster, stream_name())
    async with open_store(tmp_path / "a", config) as a, open_store(tmp_path / "b", config) as b:
        created = sample_pending(0)
        results = [None, None]

        async def create(i: int, store: Store) -> None:
            try:
                results[i] = await store.log.append(created)  # type: ignore[assignment]
            except Conflict as exc:
                results[i] = exc  # type: ignore[assignment]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(create, 0, a)
            nursery.start_soon(create, 1, b)
        assert sorted(type(r).__name__ for r in results) == ["Conflict", "Event"]


async def test_subscriptions_resume_exactly_on_another_node_and_follow_live(
    nats_cluster: LocalCluster, tmp_path: Path
) -> None:
    config = _config(nats_cluster, stream_name())
    async with open_store(tmp_path / "a", config) as a, open_store(tmp_path / "b", config) as b:
        await _fill(a, 40)
        seen: list[int] = []
        async with a.subscribe(0) as on_a:
            async for record in on_a:
                seen.append(record.event.seq)
                if len(seen) == 17:
                    break
        # The client moves to b, resuming after the last seq it got.
        await eventually(lambda: b.state.head_seq == 40, what="b to fold a's events")
        async with b.subscribe(seen[-1]) as on_b:
            items = on_b.items()
            while True:
                item = await items.__anext__()
                if isinstance(item, CaughtUp):
                    break
                seen.append(item.event.seq)
            assert item.seq == 40
            await a.append(sample_pending(40))
            with trio.fail_after(10):
                seen.append((await on_b.__anext__()).event.seq)
        assert seen == list(range(1, 42))


async def test_restart_loads_its_snapshot_and_replays_the_rest_of_the_stream(
    nats_cluster: LocalCluster, tmp_path: Path
) -> None:
    config = _config(nats_cluster, stream_name(), snapshot_every=0)
    async with open_store(tmp_path / "a", config) as a:
        await _fill(a, 30)
    async with open_store(tmp_path / "b", config) as b:
        await _fill_from(b, 30, 50)  # while a is down
    async with open_store(tmp_path / "a", config) as a:
        assert a.startup.snapshot_seq == 30
        assert a.startup.replayed == 20
        assert a.state.head_seq == 50
        live = state_to_dict(a.state)
    async with open_store(tmp_path / "fresh", config) as fresh:
        assert fresh.startup.snapshot_seq == 0 and fresh.startup.replayed == 50
        assert state_to_dict(fresh.state) == live


async def _fill_from(store: Store, start: int, end: int) -> None:
    for i in range(start, end):
        await store.append(sample_pending(i))


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(history=histories(max_size=30))
def test_every_node_folds_the_stream_as_the_events_it_reads_back(
    nats_cluster: LocalCluster,
    tmp_path_factory: pytest.TempPathFactory,
    history: list[ev.PendingEvent],
) -> None:
    """Any accepted history: the writer's state, a fresh node's (a full replay) and the
    fold of the events read back are one state; the events are the history, in order."""

    async def main() -> None:
        base = tmp_path_factory.mktemp("fold")
        config = _config(nats_cluster, stream_name())
        async with open_store(base / "a", config) as writer:
            for pending in history:
                await writer.append(pending)
            read_back = await writer.read(0, limit=len(history) + 1)
            folded = State()
            for event in read_back:
                apply(folded, event)
            async with open_store(base / "b", config) as fresh:
                assert fresh.startup.replayed == len(history)
                assert state_to_dict(fresh.state) == state_to_dict(writer.state)
            assert state_to_dict(folded) == state_to_dict(writer.state)
        assert [e.seq for e in read_back] == list(range(1, len(history) + 1))
        assert [ev.PendingEvent(e.sandbox_id, e.by, e.data) for e in read_back] == history

    trio.run(main)


async def test_unreachable_nats_at_start_names_the_servers(tmp_path: Path) -> None:
    urls = tuple(f"nats://127.0.0.1:{port}" for port in free_ports(3))
    config = StoreConfig(nats=NatsSettings(urls, "S", 3))
    with pytest.raises(NatsUnavailable, match="cannot connect to NATS at") as caught:
        async with open_store(tmp_path, config):
            pass
    assert all(url in str(caught.value) for url in urls)


async def _burst_with_a_kill(
    cluster: LocalCluster, store: Store, choose_victim: Callable[[], Awaitable[int]]
) -> tuple[list[ev.Event], float]:
    """16 writers append while server ``choose_victim()`` is SIGKILLed after 200 acks;
    returns what was acknowledged and how long after the kill a new append took to be."""
    acknowledged: list[ev.Event] = []
    enough = trio.Event()

    async def writer(w: int) -> None:
        for i in range(w * 10_000, w * 10_000 + 80):
            try:
                acknowledged.append(await store.append(sample_pending(i)))
            except LogUnavailable:
                return  # its sandbox's next transition would not be valid now
            if len(acknowledged) >= 200:
                enough.set()

    with restarted(cluster):
        async with trio.open_nursery() as nursery:
            for w in range(16):
                nursery.start_soon(writer, w)
            with trio.fail_after(30):
                await enough.wait()
            victim = await choose_victim()
            process = cluster.servers[victim].process
            assert process is not None
            os.kill(process.pid, signal.SIGKILL)
            killed_at = trio.current_time()
            # A new append, begun just after the kill, is acknowledged once the stream has
            # a leader and the client a server again.
            acknowledged.append(await store.append(sample_pending(999_000)))
            resumed_after = trio.current_time() - killed_at
        process.wait()
    return acknowledged, resumed_after


async def _check_every_acknowledged_is_stored(store: Store, acknowledged: list[ev.Event]) -> None:
    stored = {e.seq: e for e in await store.read(0, limit=100_000)}
    for event in acknowledged:
        assert stored[event.seq] == event
    assert len(acknowledged) > 200


async def test_kill_9_of_a_server_during_a_burst_loses_nothing_and_appends_go_on_within_5_s(
    nats_cluster: LocalCluster, tmp_path: Path
) -> None:
    """The server the node is connected to (a replica of the stream, not its leader) dies:
    every acknowledged append is in the stream afterwards, and appends go on within 5 s."""
    config = _config(nats_cluster, stream_name(), ack_within=5.0)
    async with open_store(tmp_path / "a", config) as store:

        async def connected_follower() -> int:
            leader = await _stream_leader(nats_cluster, store)
            connected = _connected_server(nats_cluster, store)
            return connected if connected != leader else (leader + 1) % 3

        acknowledged, resumed_after = await _burst_with_a_kill(
            nats_cluster, store, connected_follower
        )
        assert resumed_after < 5.0
        await _check_every_acknowledged_is_stored(store, acknowledged)


async def test_appends_in_flight_on_a_server_killed_go_again_at_once_on_another(
    nats_cluster: LocalCluster, tmp_path: Path
) -> None:
    """The server the node is connected to (not the stream's leader) dies under 16 writers:
    what each had in flight on it is sent again as soon as the node has another server,
    not once a try's timeout (1 s) has passed: every writer has an append acknowledged
    within 0.9 s of the kill (measured 30 to 40 ms here; 1.02 to 1.03 s before)."""
    config = _config(nats_cluster, stream_name(), ack_within=5.0)
    async with open_store(tmp_path / "a", config) as store:
        log = store.log
        nats = log.nats  # type: ignore[union-attr]
        await store.append(sample_pending(0))
        with trio.fail_after(30):
            while (leader := await _stream_leader(nats_cluster, store)) == (
                victim := _connected_server(nats_cluster, store)
            ):
                leader_name = nats_cluster.servers[leader].name
                # Its leader elsewhere: a step down is a quick, orderly election.
                stream = log.settings.stream  # type: ignore[union-attr]
                await nats.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", b"", 5)
                while (await _stream_info(store)).cluster.leader in (None, leader_name):  # noqa: ASYNC110
                    await trio.sleep(0.05)  # NATS's state: nothing to wait on
        acknowledged: list[list[float]] = [[] for _ in range(16)]
        going = trio.Event()

        async def writer(w: int) -> None:
            for i in range(w * 10_000 + 8, w * 10_000 + 10_000):
                await store.append(sample_pending(i))
                acknowledged[w].append(trio.current_time())
                if sum(map(len, acknowledged)) >= 200:
                    going.set()

        with restarted(nats_cluster):
            async with trio.open_nursery() as nursery:
                for w in range(16):
                    nursery.start_soon(writer, w)
                with trio.fail_after(30):
                    await going.wait()
                process = nats_cluster.servers[victim].process
                assert process is not None
                os.kill(process.pid, signal.SIGKILL)
                killed_at = trio.current_time()
                with trio.fail_after(10):
                    while not all(  # noqa: ASYNC110  (the writers' own progress)
                        times and times[-1] > killed_at for times in acknowledged
                    ):
                        await trio.sleep(0.005)
                nursery.cancel_scope.cancel()
            process.wait()
        slowest = max(min(t for t in times if t > killed_at) for times in acknowledged)
        assert slowest - killed_at < 0.9


async def test_kill_9_of_the_stream_leader_loses_nothing_and_appends_go_on_after_an_election(
    nats_cluster: LocalCluster, tmp_path: Path
) -> None:
    """The stream's leader dies: its followers wait out Raft's election timeout (4 to 9 s in
    nats-server, not configurable) before they elect another, so appends go on within
    that and an election's time: measured 4.5 to 9 s here (docs/cluster.md)."""
    config = _config(nats_cluster, stream_name(), ack_within=15.0)
    async with open_store(tmp_path / "a", config) as store:

        async def leader() -> int:
            return await _stream_leader(nats_cluster, store)

        acknowledged, resumed_after = await _burst_with_a_kill(nats_cluster, store, leader)
        assert resumed_after < 15.0
        await _check_every_acknowledged_is_stored(store, acknowledged)


async def _stream_info(store: Store) -> Any:
    nats = store.log.nats  # type: ignore[union-attr]
    return await nats.bridge.run(nats.js.stream_info, store.log.settings.stream)  # type: ignore[union-attr]


async def _stream_leader(cluster: LocalCluster, store: Store) -> int:
    nats = store.log.nats  # type: ignore[union-attr]
    info = await nats.bridge.run(nats.js.stream_info, store.log.settings.stream)  # type: ignore[union-attr]
    names = [server.name for server in cluster.servers]
    return names.index(info.cluster.leader)


def _connected_server(cluster: LocalCluster, store: Store) -> int:
    url = store.log.nats.client.connected_url  # type: ignore[union-attr]
    assert url is not None
    ports = [server.port for server in cluster.servers]
    return ports.index(url.port)


async def test_a_stream_that_cannot_hold_the_log_is_refused_naming_why(
    nats_cluster: LocalCluster, tmp_path: Path
) -> None:
    import nats.js.api as api

    from sandboxd.events.nats.bridge import connect

    name = stream_name()
    async with connect(nats_cluster.urls) as nats:
        await nats.ensure_stream(api.StreamConfig(name=name, subjects=["other.>"], num_replicas=1))
    with pytest.raises(LogUnavailable, match=rf"stream {name} cannot hold this log: its subjects"):
        async with open_store(tmp_path, _config(nats_cluster, name)):
            pass


async def test_a_filtered_subscription_gets_its_sandbox_s_events_history_then_live(
    nats_cluster: LocalCluster, tmp_path: Path
) -> None:
    from sandboxd.events.subscriptions import EventFilter

    config = _config(nats_cluster, stream_name())
    async with open_store(tmp_path / "a", config) as a, open_store(tmp_path / "b", config) as b:
        await _fill(a, 20)  # sbx-000000 (seqs 1-8), 000001 (9-16), 000002 (17-20)
        wanted = EventFilter(sandbox_ids=frozenset({"sbx-000002"}))
        got: list[int] = []
        async with b.subscribe(0, wanted) as subscription:
            items = subscription.items()
            # History (as far as b has folded a's events yet), then live: the split
            # falls wherever b's head was, the events delivered are the same.
            while not isinstance(item := await items.__anext__(), CaughtUp):
                got.append(item.event.seq)
            await a.append(sample_pending(24))  # sbx-000003 created: seq 21
            await a.append(sample_pending(20))  # sbx-000002 resumed: seq 22
            with trio.fail_after(10):
                while not got or got[-1] < 22:
                    got.append((await subscription.__anext__()).event.seq)
        assert got == [17, 18, 19, 20, 22]
