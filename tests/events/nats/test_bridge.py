"""The bridge against a real cluster: crossing over, conditional publishes, history, KV."""

from __future__ import annotations

import nats.js.api as api
import pytest
import trio

from sandboxd.events.nats.bridge import (
    Bridge,
    NatsUnavailable,
    StreamMessage,
    WrongLastSequence,
    connect,
    patiently,
)
from sandboxd.events.nats.local_cluster import LocalCluster, free_ports
from tests.nats_cluster import restarted, stream_name

EXPECT = "Nats-Expected-Last-Subject-Sequence"


def _stream(name: str) -> api.StreamConfig:
    return api.StreamConfig(
        name=name,
        subjects=[f"{name}.>"],
        num_replicas=3,
        allow_direct=True,
        allow_atomic=True,
        storage=api.StorageType.FILE,
    )


async def test_run_returns_values_and_raises_errors_of_the_asyncio_side() -> None:
    bridge = Bridge()
    try:

        async def double(x: int) -> int:
            return 2 * x

        async def fail() -> None:
            raise KeyError("on the asyncio side")

        assert await bridge.run(double, 21) == 42
        with pytest.raises(KeyError, match="on the asyncio side"):
            await bridge.run(fail)
    finally:
        bridge.close()


async def test_a_trio_cancellation_cancels_the_coroutine_on_the_loop() -> None:
    import asyncio

    bridge = Bridge()
    stopped = trio.Event()
    token = trio.lowlevel.current_trio_token()
    try:

        async def forever() -> None:
            try:
                await asyncio.Event().wait()
            finally:
                token.run_sync_soon(stopped.set)

        with trio.move_on_after(0.05):
            await bridge.run(forever)
        with trio.fail_after(5):
            await stopped.wait()
    finally:
        bridge.close()


async def test_unreachable_servers_are_named() -> None:
    urls = [f"nats://127.0.0.1:{port}" for port in free_ports(2)]
    with pytest.raises(NatsUnavailable, match=urls[0]) as caught:
        async with connect(urls, connect_timeout=0.5):
            pass
    assert urls[1] in str(caught.value)


async def test_conditional_publishes_atomic_batches_and_direct_reads(
    nats_cluster: LocalCluster,
) -> None:
    name = stream_name()
    async with connect(nats_cluster.urls) as nats:
        await nats.ensure_stream(_stream(name))
        a, b = f"{name}.sandbox.a", f"{name}.sandbox.b"
        first = await nats.publish_many(
            [(a, b"1", {EXPECT: "0"}), (b, b"2", {EXPECT: "0"})], answer_within=5
        )
        assert first == [1, 2]
        # a's last seq is 1: a second "first" event of a is refused, the right one stored.
        again = await nats.publish_many(
            [(a, b"x", {EXPECT: "0"}), (a, b"3", {EXPECT: "1"})], answer_within=5
        )
        assert isinstance(again[0], WrongLastSequence) and again[1] == 3
        # An atomic batch with one stale condition stores nothing of it.
        with pytest.raises(WrongLastSequence):
            await nats.publish_atomic(
                [(b, b"y", {EXPECT: "2"}), (a, b"z", {EXPECT: "1"})], answer_within=5
            )
        assert (
            await nats.publish_atomic(
                [(b, b"4", {EXPECT: "2"}), (a, b"5", {EXPECT: "3"})], answer_within=5
            )
            == 5
        )
        history = await nats.direct_batch(name, 2, 10, 1 << 20)
        assert history == [
            StreamMessage(2, b, b"2"),
            StreamMessage(3, a, b"3"),
            StreamMessage(4, b, b"4"),
            StreamMessage(5, a, b"5"),
        ]
        assert await nats.direct_batch(name, 6, 10, 1 << 20) == []


async def test_ordered_consumer_delivers_from_a_seq_in_order(nats_cluster: LocalCluster) -> None:
    name = stream_name()
    async with connect(nats_cluster.urls) as nats:
        await nats.ensure_stream(_stream(name))
        subject = f"{name}.daemon"
        await nats.publish_many([(subject, b"%d" % i, {}) for i in range(1, 11)], answer_within=5)
        got: list[StreamMessage] = []
        enough = trio.Event()

        def on_messages(batch: list[StreamMessage]) -> None:
            got.extend(batch)
            if len(got) >= 7:
                enough.set()

        async with nats.ordered_consumer(name, f"{name}.>", 4, on_messages):
            with trio.fail_after(10):
                await enough.wait()
        assert [m.seq for m in got] == list(range(4, 11))
        assert [m.data for m in got] == [b"%d" % i for i in range(4, 11)]


async def test_key_value_create_is_exclusive(nats_cluster: LocalCluster) -> None:
    async with connect(nats_cluster.urls) as nats:
        kv = await nats.key_value(stream_name("kv"), ttl=30, replicas=3)
        revision = await kv.create("node-a", b"1")
        with pytest.raises(Exception, match="wrong last sequence"):
            await kv.create("node-a", b"2")
        assert await kv.update("node-a", b"3", revision) > revision
        entry = await kv.get("node-a")
        assert entry is not None and entry.value == b"3"
        assert await kv.keys() == ["node-a"]


async def test_an_ordered_consumer_holds_at_most_in_hand_messages_for_a_slow_reader(
    nats_cluster: LocalCluster,
) -> None:
    """trio falls behind (each batch blocks its thread): the asyncio side stops taking at
    ``in_hand``, and the server's flow control holds back the rest. Every message still
    arrives, once, in order."""
    import time

    name = stream_name()
    async with connect(nats_cluster.urls) as nats:
        await nats.ensure_stream(_stream(name))
        subject = f"{name}.daemon"
        for start in range(0, 300, 100):
            items = [(subject, b"%d" % i, {}) for i in range(start, start + 100)]
            await nats.publish_many(items, answer_within=5)
        got: list[int] = []
        sizes: list[int] = []
        done = trio.Event()

        def slow_reader(batch: list[StreamMessage]) -> None:
            sizes.append(len(batch))
            got.extend(m.seq for m in batch)
            time.sleep(0.002)  # the trio thread is busy: this is what is tested
            if len(got) >= 300:
                done.set()

        async with nats.ordered_consumer(name, f"{name}.>", 1, slow_reader, in_hand=8):
            with trio.fail_after(60):
                await done.wait()
        assert got == list(range(1, 301))
        assert max(sizes) <= 8


async def test_request_reply_between_two_connections_through_trio(
    nats_cluster: LocalCluster,
) -> None:
    subject = f"{stream_name('rpc')}.node-a"
    async with connect(nats_cluster.urls) as server, connect(nats_cluster.urls[1:]) as client:
        async with server.subscribe(subject) as requests, trio.open_nursery() as nursery:

            async def answer() -> None:
                async for request in requests:
                    await server.respond(request, request.data.upper())

            nursery.start_soon(answer)
            await server.flush()  # the subscription is in place
            replies = [await client.request(subject, b"ping %d" % i, 5) for i in range(3)]
            assert [r.data for r in replies] == [b"PING 0", b"PING 1", b"PING 2"]
            nursery.cancel_scope.cancel()
        with pytest.raises(NatsUnavailable):
            await client.request(subject, b"nobody there", 0.5)


async def test_a_stream_that_cannot_be_placed_now_is_unavailable_and_waited_for(
    nats_cluster: LocalCluster,
) -> None:
    """With two servers of three shut down, a new three-replica stream cannot be placed:
    "not now" (``NatsUnavailable``), which ``patiently`` asks again for a while, then says
    what could not be done and why; once the servers are back, it is made."""
    name = stream_name("P")
    async with connect([nats_cluster.urls[0]]) as nats:
        with restarted(nats_cluster):
            nats_cluster.terminate(1)
            nats_cluster.terminate(2)
            with pytest.raises(NatsUnavailable, match="NATS"):
                await nats.ensure_stream(_stream(name))
            with pytest.raises(
                NatsUnavailable, match=rf"^the stream {name} could not be made within 3 s: NATS"
            ):
                await patiently(
                    lambda: nats.ensure_stream(_stream(name)),
                    within=3,
                    what=f"the stream {name} could not be made",
                )
        info = await patiently(
            lambda: nats.ensure_stream(_stream(name)), within=30, what="not reached"
        )
        assert info.config.name == name
