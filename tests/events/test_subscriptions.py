"""Catch-up subscriptions: every matching event once, in order, history then live,
with bounded memory, whatever the load and however slow the reader."""

from __future__ import annotations

import random
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.lowlevel
import trio.testing

from sandboxd.events import types as ev
from sandboxd.events.errors import Gone
from sandboxd.events.log import CaughtUp, EventFilter, EventLog, Subscription, open_event_log
from sandboxd.events.segments import Record
from sandboxd.events.subscriptions import JoinedRuns, LiveBatch
from tests.events.strategies import sample_pending
from tests.support import eventually

TOTAL = 100_000
BATCH = 1000
BUFFER = 2048


async def _fill(log: EventLog, count: int, start: int = 0) -> None:
    for i in range(start, start + count, BATCH):
        await log.append_many([sample_pending(j) for j in range(i, min(i + BATCH, start + count))])


async def _take(subscription: Subscription, until_seq: int) -> list[int]:
    seqs = []
    async for record in subscription:
        seqs.append(record.event.seq)
        if record.event.seq >= until_seq:
            break
    return seqs


async def test_a_stalled_subscriber_gets_everything_and_slows_no_one(tmp_path: Path) -> None:
    async with open_event_log(tmp_path, subscriber_buffer=BUFFER) as log:
        stalled = log.subscribe(0)
        fast = log.subscribe(0)
        target = 0
        reached = trio.Event()
        fast_seqs: list[int] = []

        async def follow() -> None:
            nonlocal reached
            async for record in fast:
                fast_seqs.append(record.event.seq)
                if record.event.seq == target:
                    reached.set()
                    reached = trio.Event()

        latencies = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow)
            for start in range(0, TOTAL, BATCH):
                batch = [sample_pending(i) for i in range(start, start + BATCH)]
                target = start + BATCH
                waiting = reached
                await log.append_many(batch)
                appended_at = trio.current_time()
                with trio.fail_after(5):
                    await waiting.wait()
                latencies.append(trio.current_time() - appended_at)
                # The stalled one's memory stays bounded whatever it misses.
                assert stalled.buffered <= BUFFER
            nursery.cancel_scope.cancel()
        assert fast_seqs == list(range(1, TOTAL + 1))
        assert fast.disk_reads == 0  # always served live: the stalled one cost it nothing
        assert max(latencies) < 1.0
        assert stalled.dropped_batches > 0 and stalled.disk_reads == 0

        with trio.fail_after(30):
            seqs = await _take(stalled, TOTAL)
        assert seqs == list(range(1, TOTAL + 1))  # all, once, in order
        assert stalled.disk_reads > 0


async def test_exactly_once_across_the_switch_under_concurrent_load(tmp_path: Path) -> None:
    rng = random.Random(7)
    appenders, per_appender = 16, 150
    end = appenders * per_appender + 100
    async with open_event_log(tmp_path, subscriber_buffer=16, max_batch=64) as log:
        await _fill(log, 100)
        results: dict[int, tuple[int, list[int]]] = {}

        async def subscriber(n: int, after: int, pace: float) -> None:
            subscription = log.subscribe(after, buffer=rng.choice([1, 4, 16, 64]))
            seqs = []
            async for record in subscription:
                seqs.append(record.event.seq)
                if rng.random() < pace:
                    await trio.lowlevel.checkpoint()  # a slow reader: its buffer overflows
                if record.event.seq == end:
                    break
            results[n] = (after, seqs)

        async def appender(k: int) -> None:
            for i in range(per_appender):
                await log.append(sample_pending(1000 + k * per_appender + i))
                if rng.random() < 0.01:
                    # Subscribe mid-stream, from anywhere in history.
                    nursery.start_soon(
                        subscriber, len(results) + 100 * k + i, rng.randint(0, log.head_seq), 0.5
                    )

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for n, after in enumerate((0, 50, 100)):
                    nursery.start_soon(subscriber, 10_000 + n, after, n / 3)
                for k in range(appenders):
                    nursery.start_soon(appender, k)
        assert log.head_seq == end
        assert len(results) > 5
        for after, seqs in results.values():
            assert seqs == list(range(after + 1, end + 1))


async def test_filters_and_the_caught_up_marker(tmp_path: Path) -> None:
    async with open_event_log(tmp_path) as log:
        await _fill(log, 40)
        mine = EventFilter(
            sandbox_ids=frozenset({"sbx-000001", "sbx-000006"}),
            types=frozenset({"sandbox.created", "sandbox.deleted"}),
        )
        subscription = log.subscribe(0, mine)
        items = subscription.items()
        # sbx-000001 is made and deleted at seqs 9 and 16; sbx-000006 is made at 49.
        history = [await items.__anext__() for _ in range(3)]
        seqs = [r.event.seq for r in history if not isinstance(r, CaughtUp)]
        assert seqs == [9, 16]
        assert history[2] == CaughtUp(40)
        await log.append_many([sample_pending(i) for i in range(40, 56)])  # sbx-000005, 6
        live = await items.__anext__()
        assert not isinstance(live, CaughtUp)
        assert live.event.seq == 49
        assert (live.event.sandbox_id, live.event.type) == ("sbx-000006", "sandbox.created")
        await subscription.aclose()


async def test_a_visibility_predicate_and_only_what_comes_next(tmp_path: Path) -> None:
    async with open_event_log(tmp_path) as log:
        await _fill(log, 10)
        subscription = log.subscribe(None, lambda e: e.data.TYPE == "sandbox.paused")
        items = subscription.items()
        assert await items.__anext__() == CaughtUp(10)
        await _fill(log, 24, 10)
        got = [await items.__anext__() for _ in range(2)]
        assert [r.event.seq for r in got if not isinstance(r, CaughtUp)] == [12, 20]


async def test_subscribing_below_the_retained_log_is_gone(tmp_path: Path) -> None:
    async with open_event_log(tmp_path, segment_bytes=2048) as log:
        lagging = log.subscribe(0, buffer=1)
        for i in range(0, 100, 10):
            await log.append_many([sample_pending(j) for j in range(i, i + 10)])
        await log.remove_segments_through(50)
        with pytest.raises(Gone) as caught:
            log.subscribe(3)
        assert caught.value.oldest_seq == log.oldest_seq
        # Retention overtook a subscriber that had fallen behind: it learns it on reading.
        with pytest.raises(Gone):
            await _take(lagging, 100)
        assert lagging.position == 0  # where a client would resume from


async def test_closing_the_log_ends_subscriptions(tmp_path: Path) -> None:
    async with open_event_log(tmp_path) as log:
        await _fill(log, 5)
        subscription = log.subscribe(0)
        assert (await subscription.__anext__()).event.seq == 1
    with pytest.raises(StopAsyncIteration):
        await subscription.__anext__()
    assert subscription.position == 1


async def test_aclose_ends_iteration(tmp_path: Path) -> None:
    async with open_event_log(tmp_path) as log:
        subscription = log.subscribe(None)
        assert log.subscriber_count == 1
        async with subscription:
            pass
        assert log.subscriber_count == 0
        with pytest.raises(StopAsyncIteration):
            await subscription.__anext__()


async def test_a_waiting_subscriber_is_woken_by_the_next_batch(tmp_path: Path) -> None:
    async with open_event_log(tmp_path) as log:
        subscription = log.subscribe(None)
        got: list[ev.Event] = []

        async def wait_one() -> None:
            got.append((await subscription.__anext__()).event)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_one)
            await trio.testing.wait_all_tasks_blocked()
            event = await log.append(sample_pending(0))
        assert got == [event]


async def test_a_gate_bounds_the_pages_in_hand_and_shares_them_in_turn(tmp_path: Path) -> None:
    # issue 8, defect 4: many subscriptions whose reader is stuck hold a page each,
    # unless a gate says how many may hold one at once.
    async with open_event_log(tmp_path) as log:
        await _fill(log, 5000)
        gate = trio.CapacityLimiter(1)
        subscriptions = [log.subscribe(0, page_bytes=16 << 10, gate=gate) for _ in range(8)]
        taken: list[list[int]] = [[] for _ in subscriptions]
        most_in_hand = 0

        async def take_slowly(i: int) -> None:
            nonlocal most_in_hand
            async for record in subscriptions[i]:
                taken[i].append(record.event.seq)
                most_in_hand = max(most_in_hand, sum(1 for s in subscriptions if s.in_hand))
                # Let the others try to take their pages meanwhile.
                await trio.lowlevel.checkpoint()
                if record.event.seq == 5000:
                    return

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for i in range(len(subscriptions)):
                    nursery.start_soon(take_slowly, i)
        assert all(seqs == list(range(1, 5001)) for seqs in taken)
        assert most_in_hand == 1
        # In turn: each had to read many small pages, and none waited for all the others.
        assert all(s.disk_reads > 10 for s in subscriptions)
        for subscription in subscriptions:
            await subscription.aclose()
        assert gate.borrowed_tokens == 0


async def test_a_closed_subscription_gives_its_token_back(tmp_path: Path) -> None:
    async with open_event_log(tmp_path) as log:
        await _fill(log, 1000)
        gate = trio.CapacityLimiter(1)
        holder = log.subscribe(0, gate=gate)
        waiter = log.subscribe(0, gate=gate)
        await holder.__anext__()
        assert holder.in_hand and gate.borrowed_tokens == 1
        await holder.aclose()
        assert gate.borrowed_tokens == 0
        with trio.fail_after(5):
            assert (await waiter.__anext__()).event.seq == 1
        await waiter.aclose()


async def test_polling_what_is_at_hand_with_next_batch_between_is_exactly_once(
    tmp_path: Path,
) -> None:
    # The gateway's fan-out polls take_at_hand and hands over to next_batch when it says
    # None (history from disk, the marker): a small buffer makes the writer drop batches,
    # so both ways are taken, and every event must come once, in order. When it says []
    # (nothing new), the fan-out waits for when_published's call: it must always come.
    total = 20_000
    async with open_event_log(tmp_path, subscriber_buffer=256) as log:
        await _fill(log, 1000)
        subscription = log.subscribe(0)
        seqs: list[int] = []
        took = {"polled": 0, "awaited": 0, "stirred": 0}

        async def follow() -> None:
            pauses = [15_000, 10_000, 5_000]
            while not seqs or seqs[-1] < total:
                if pauses and len(seqs) >= pauses[-1]:
                    pauses.pop()
                    # A slow reader: the buffer (256) overflows meanwhile.
                    await eventually(
                        partial(lambda behind: log.head_seq >= behind, seqs[-1] + 1000),
                        what="1000 more appended",
                    )
                polled = subscription.take_at_hand(100)
                if polled is None:
                    batch = await subscription.next_batch(100)
                    if isinstance(batch, list):
                        seqs.extend(record.event.seq for record in batch)
                        took["awaited"] += len(batch)
                elif polled:
                    seqs.extend(record.event.seq for record in polled)
                    took["polled"] += len(polled)
                else:
                    published = trio.Event()
                    subscription.when_published(published.set)
                    took["stirred"] += 1
                    with trio.fail_after(10):
                        await published.wait()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow)
            for start in range(1000, total, 100):
                await log.append_many([sample_pending(i) for i in range(start, start + 100)])
        assert seqs == list(range(1, total + 1))
        assert took["polled"] > 0 and took["awaited"] > 1000 and took["stirred"] > 0
        assert subscription.disk_reads > 1
        ended: list[str] = []
        subscription.when_published(lambda: ended.append("stirred"))
        await subscription.aclose()
        assert ended == ["stirred"]  # the end stirs too, once
        assert subscription.take_at_hand() is None  # closed: next_batch says how it ended


async def test_whole_batches_polled_with_the_other_ways_between_are_exactly_once(
    tmp_path: Path,
) -> None:
    # The fan-out takes a firehose's live batches whole (take_whole) and falls back to
    # take_at_hand, then next_batch, when that way does not apply (a gap read from disk
    # after the small buffer overflowed, the marker): every event once, in order.
    total = 20_000
    async with open_event_log(tmp_path, subscriber_buffer=256) as log:
        await _fill(log, 1000)
        subscription = log.subscribe(0)
        # Another firehose, whose buffer holds every batch: the same batch objects.
        other = log.subscribe(log.head_seq, buffer=total)
        filtered = log.subscribe(log.head_seq, EventFilter(types=frozenset({"daemon.stopping"})))
        assert isinstance(await other.next_batch(), CaughtUp)
        seqs: list[int] = []
        took = {"whole": 0, "polled": 0, "awaited": 0}
        taken_whole: list[LiveBatch] = []

        async def follow() -> None:
            pauses = [15_000, 10_000, 5_000]
            while not seqs or seqs[-1] < total:
                if pauses and len(seqs) >= pauses[-1]:
                    pauses.pop()
                    await eventually(
                        partial(lambda behind: log.head_seq >= behind, seqs[-1] + 1000),
                        what="1000 more appended",
                    )
                whole = subscription.take_whole(100, 1 << 20)
                if whole:
                    assert subscription.position == whole[-1].last_seq
                    for batch in whole:
                        assert batch.joined == b",".join(r.raw for r in batch.records)
                        seqs.extend(record.event.seq for record in batch.records)
                        took["whole"] += len(batch.records)
                    taken_whole.extend(whole)
                    continue
                polled = subscription.take_at_hand(100)
                if polled is None:
                    batch = await subscription.next_batch(100)
                    if isinstance(batch, list):
                        seqs.extend(record.event.seq for record in batch)
                        took["awaited"] += len(batch)
                elif polled:
                    seqs.extend(record.event.seq for record in polled)
                    took["polled"] += len(polled)
                else:
                    await trio.sleep(0.001)
                assert filtered.take_whole() == []  # a filter: record by record

        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow)
            for start in range(1000, total, 100):
                await log.append_many([sample_pending(i) for i in range(start, start + 100)])
        assert seqs == list(range(1, total + 1))
        assert took["whole"] > 5_000 and took["awaited"] > 1000
        held = {id(batch) for batch in other.take_whole(total, 1 << 30)}
        assert len(held) == (total - 1000) // 100
        assert all(id(batch) in held for batch in taken_whole)  # the very same objects
        await subscription.aclose()
        assert subscription.take_whole() == [] and subscription.take_at_hand() is None


def test_joined_runs_join_a_run_once_for_the_readers_that_take_it() -> None:
    records = [
        Record(ev.Event(seq, "2026-11-29T21:00:00Z", None, None, ev.DaemonStopping("x")), raw)
        for seq, raw in enumerate([b'{"a":1}', b'{"b":2}', b'{"c":3}'], start=1)
    ]
    one, empty, two = (
        LiveBatch(1, 2, records[:2]),
        LiveBatch(3, 3, []),  # a seq that is no event of this log (NATS): nothing to join
        LiveBatch(4, 4, records[2:]),
    )
    runs = JoinedRuns()
    assert runs.joined([one]) == b'{"a":1},{"b":2}' and runs.made == 0  # the batch's own
    run = runs.joined([one, empty, two])
    assert run == b'{"a":1},{"b":2},{"c":3}' and runs.made == 1
    assert runs.joined([one, empty, two]) is run and runs.reused == 1
    assert runs.joined([empty, two]) == b'{"c":3}' and runs.made == 2
