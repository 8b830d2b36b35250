"""Catch-up subscriptions: history from disk, then live, exactly once, in order.

The pattern is EventStoreDB's catch-up subscription. A subscription is
registered with the log at once; from then on the log's writer appends every
durable batch to the subscription's live buffer. The subscription delivers
from wherever its ``position`` (the last seq it delivered or filtered out)
is:

- if the oldest buffered batch starts at or before ``position + 1``, from the
  buffer, skipping what it already passed;
- otherwise from disk, up to just before the buffer (or up to the head).

The hand-over is decided on ``seq`` alone, so switching from history to live
(or back) can neither repeat nor skip an event. The live buffer is bounded:
when it is full, the writer drops its *oldest* batches, never blocks and never
drops anything the disk does not hold, and the subscription reads the gap
back from disk. A slow subscriber thus costs the writer one list append per
batch, and other subscribers nothing.

What a subscription holds in memory:

- its live buffer: at most ``limit`` events, and the same record objects as
  every other subscription's (the writer hands each the same batch), so all
  subscriptions together hold the newest ``limit`` events once, plus pointers;
- the records in hand: one history read of at most ``page_bytes`` of stored
  records (decoded, they take about three times that), or one live batch.

A subscription given a ``gate`` (a ``trio.CapacityLimiter``) takes records in
hand only while it holds one of the gate's tokens, and gives it back once it
has delivered them: a connection of many subscriptions that its client does
not read holds as many pages as its gate has tokens, not one per
subscription. Tokens go round in turn (the limiter is fair), so no
subscription of the gate starves.

A subscription whose filter names sandboxes or types (an ``EventFilter``)
reads its history through the segment index (``index.py``): the records of
other sandboxes and types are neither read nor decoded, so catching up on one
sandbox in a long log costs what that sandbox has.

The log routes its durable batches by sandbox: a subscription filtered by
sandbox is handed only the records of its sandboxes, and only batches that
have some (a dict lookup per record: O(matching), not O(subscriptions)). Each
live batch carries the seqs it spans, and everything matching from
``_covered_from`` on is in the buffer, so a gap between what the subscription
passed and its next live batch needs no disk read.

``next_batch`` hands out every matching record that is at hand at once (up
to a limit) instead of one per call: a reader that forwards records (the
gateway) pays the task switch once per batch. ``take_at_hand`` takes the same
without waiting, for a reader that polls (the gateway's fan-out), and
``take_whole`` the live batches themselves, for a subscription without a
filter: the same objects in every such subscription, each keeping its
records' bytes joined once, so that forwarding costs O(batches), not
O(records).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import attrs
import trio

from sandboxd.events.index import Selection
from sandboxd.events.segments import Record
from sandboxd.events.types import Event

if TYPE_CHECKING:
    from sandboxd.events.log import Page


@attrs.frozen
class EventFilter:
    """Which events a reader wants; ``None`` means any. The one filter of reads and
    subscriptions: the gateway builds one per request.

    ``visible`` is the reader's view (the gateway's is actors/visibility.py's
    ``sees_event`` for the user); it must be cheap and must not block.
    """

    sandbox_ids: frozenset[str] | None = None
    types: frozenset[str] | None = None
    visible: Callable[[Event], bool] | None = None

    def matches(self, event: Event) -> bool:
        if self.sandbox_ids is not None and event.sandbox_id not in self.sandbox_ids:
            return False
        if self.types is not None and event.data.TYPE not in self.types:
            return False
        return self.visible is None or self.visible(event)


ALL = EventFilter()

#: What readers take as a filter: an ``EventFilter``, any predicate, or None for all.
Filter = EventFilter | Callable[[Event], bool] | None


def selection_of(event_filter: Filter) -> Selection | None:
    """What the index can select for ``event_filter``; None when it cannot narrow it."""
    if not isinstance(event_filter, EventFilter):
        return None
    if event_filter.sandbox_ids is None and event_filter.types is None:
        return None
    return Selection(event_filter.sandbox_ids, event_filter.types)


def matcher(event_filter: Filter) -> Callable[[Event], bool]:
    if event_filter is None:
        return _everything
    if isinstance(event_filter, EventFilter):
        if event_filter == ALL:
            return _everything
        return event_filter.matches
    return event_filter


def _everything(event: Event) -> bool:
    return True


@attrs.frozen
class CaughtUp:
    """Marks the switch to live: every event up to ``seq`` has been delivered."""

    seq: int


#: A batch of at most this many records gives the gate's token back when it is handed
#: out; a bigger one keeps it until the next call (see ``next_batch``).
SMALL_BATCH = 64


class LiveBatch:
    """A durable batch as the log publishes it: its seqs run from ``first_seq`` to
    ``last_seq``; ``records`` are those of them that may match (all of them, handed to
    every subscription alike, unless the log routed the batch by sandbox: then those of
    the subscription's sandboxes).

    ``joined`` is the records' stored bytes joined by commas, made by the first reader
    that wants them and kept: a firehose batch is the same object in every subscription,
    so a fan-out to 1,000 subscribers joins it once, not 1,000 times (``take_whole``).
    It lives as long as the batch is in some subscription's live buffer, so the buffers
    hold at most the newest events' bytes twice.
    """

    __slots__ = ("_joined", "first_seq", "last_seq", "records")

    def __init__(self, first_seq: int, last_seq: int, records: list[Record]) -> None:
        self.first_seq = first_seq
        self.last_seq = last_seq
        self.records = records
        self._joined: bytes | None = None

    @property
    def joined(self) -> bytes:
        """The records' stored bytes, comma-separated (a JSON array's inside)."""
        joined = self._joined
        if joined is None:
            joined = self._joined = b",".join([record.raw for record in self.records])
        return joined

    def __repr__(self) -> str:
        return f"LiveBatch({self.first_seq}..{self.last_seq}, {len(self.records)} records)"


class JoinedRuns:
    """The stored bytes of runs of consecutive live batches, comma-separated, made once
    for the readers that take the same run one after the other.

    The fan-out serves a group of subscribers in one go, and those that stand at the
    same place take the same run of batches: the last run joined is kept (one, so
    this holds O(1) memory), and the next reader of that very run reuses its bytes.
    The join is then made about once per group and round, not once per subscriber.
    """

    def __init__(self) -> None:
        self._last: tuple[LiveBatch, LiveBatch, bytes] | None = None
        #: Runs joined, and runs reused (tests and benchmarks look at them).
        self.made = 0
        self.reused = 0

    def joined(self, batches: list[LiveBatch]) -> bytes:
        first, last = batches[0], batches[-1]
        if first is last:
            return first.joined
        kept = self._last
        if kept is not None and kept[0] is first and kept[1] is last:
            self.reused += 1
            return kept[2]
        joined = b",".join([batch.joined for batch in batches if batch.records])
        self._last = (first, last, joined)
        self.made += 1
        return joined


class _Source(Protocol):
    """What a subscription needs of the log."""

    @property
    def head_seq(self) -> int: ...

    async def read_history(
        self, after_seq: int, until_seq: int, max_bytes: int
    ) -> list[Record]: ...

    async def read_selected(
        self, after_seq: int, until_seq: int, selection: Selection, max_bytes: int
    ) -> Page: ...

    def unsubscribe(self, subscription: Subscription) -> None: ...


class Subscription:
    """An async iterator of the ``Record``s with seq above ``after_seq`` that match a filter.

    Made by ``EventLog.subscribe``. ``items()`` also yields one ``CaughtUp``
    when history has been delivered. Iteration ends when the log closes or
    ``aclose()`` is called; ``position`` tells where to resume. Reading on
    past the retained log raises ``Gone``. One task at a time may iterate.
    """

    def __init__(
        self,
        source: _Source,
        after_seq: int,
        event_filter: Filter,
        limit: int,
        *,
        page_bytes: int,
        gate: trio.CapacityLimiter | None = None,
    ):
        self._source = source
        self._matches = matcher(event_filter)
        self._selection = selection_of(event_filter)
        self._limit = limit
        self._page_bytes = page_bytes
        self._gate = gate
        self._holding = False  # one of the gate's tokens, while records are in hand
        self._batching = False  # in next_batch: the token stays with the batch
        #: Every event up to here was delivered or filtered out.
        self.position = after_seq
        self._live: deque[LiveBatch] = deque()
        self._live_count = 0
        #: Every matching record from this seq on is in the live buffer (or was taken
        #: from it): the log publishes every batch after the subscription's start, and
        #: only a full buffer drops some. Gaps past it need no disk read.
        self._covered_from = source.head_seq + 1
        self._ready: deque[Record] = deque()
        #: Once ``_ready`` is delivered, every event up to here was (a read through
        #: the index looks at more seqs than it returns records for).
        self._passed = after_seq
        self._waiter: trio.lowlevel.Task | None = None
        #: Called once on the next publish or end, for a reader that polls (the fan-out).
        self._on_publish: Callable[[], None] | None = None
        self._closed = False
        self._caught_up = False
        self._blocked = False
        #: How often history was read from disk, and how many live batches were dropped.
        self.disk_reads = 0
        self.dropped_batches = 0

    @property
    def buffered(self) -> int:
        """Events held in the live buffer (bounded by the limit)."""
        return self._live_count

    @property
    def in_hand(self) -> int:
        """Records taken from the live buffer or the disk and not yet delivered."""
        return len(self._ready)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def selection(self) -> Selection | None:
        """What of its filter the segment index (and the log's routing) can answer."""
        return self._selection

    # -- called by the log's writer, synchronously: must never block -------------------

    def publish(self, batch: LiveBatch) -> None:
        """A durable batch, or the records of it that may match (the log leaves out
        batches with none, when it routes by sandbox). The same object goes to every
        subscription that gets the whole batch: one append here per batch."""
        if self._closed:
            return
        self._live.append(batch)
        self._live_count += len(batch.records)
        while self._live_count > self._limit:
            dropped = self._live.popleft()
            self._live_count -= len(dropped.records)
            self._covered_from = dropped.last_seq + 1  # the disk has what went
            self.dropped_batches += 1
        self._wake()

    def end(self) -> None:
        """The log closes: iteration stops; ``position`` says where to resume."""
        self._closed = True
        self._ready.clear()
        self._passed = self.position  # what was in hand is not passed
        self._live.clear()
        self._live_count = 0
        self._let_go()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None:
            task, self._waiter = self._waiter, None
            trio.lowlevel.reschedule(task)
        if self._on_publish is not None:
            callback, self._on_publish = self._on_publish, None
            callback()

    # -- the consumer's side ----------------------------------------------------------

    async def aclose(self) -> None:
        if not self._closed:
            self._source.unsubscribe(self)
            self.end()
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Record:
        while True:
            item = await self._next_item()
            if isinstance(item, Record):
                return item

    def items(self) -> _Items:
        """Iterate over the records and, once, the ``CaughtUp`` marker between history and live."""
        return _Items(self)

    async def _next_item(self) -> Record | CaughtUp:
        # Like a memory channel: a checkpoint on every call, but only one schedule
        # point whether the item was at hand or had to be waited for.
        await trio.lowlevel.checkpoint_if_cancelled()
        self._blocked = False
        item = await self._take()
        if not self._blocked:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return item

    async def next_batch(self, max_records: int = 1024) -> list[Record] | CaughtUp:
        """The next matching records, as many as are at hand (at least one, at most
        ``max_records``), or the ``CaughtUp`` marker, as ``items()`` would yield them."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._ready:
            self._let_go()  # the caller is done with the last batch: its token goes
        self._blocked = False
        # A big batch is in the caller's hands until it asks again: the gate's token
        # (if any) is kept till then. A small one (a live batch, most often) gives it
        # back at once, so that the subscriptions sharing a gate all take theirs in
        # one go: a connection's subscriptions hold READ_SLOTS big batches, and up to
        # SMALL_BATCH records each besides.
        self._batching = True
        try:
            first = await self._take()
            if isinstance(first, CaughtUp):
                batch: list[Record] | CaughtUp = first
            else:
                batch = [first]
                while len(batch) < max_records and (record := self._take_at_hand()) is not None:
                    batch.append(record)
                if len(batch) <= SMALL_BATCH and not self._ready:
                    self._let_go()
        finally:
            self._batching = False
        if not self._blocked:
            await trio.lowlevel.cancel_shielded_checkpoint()
        return batch

    def take_at_hand(self, max_records: int = 1024) -> list[Record] | None:
        """The next matching records at hand, without waiting nor reading the disk (for
        a reader that polls, the gateway's fan-out): [] when nothing new has come; None
        when what comes next needs ``next_batch`` (history from disk, the gate's token
        to wait for, the marker, or the end). Takes what ``next_batch`` would, in order."""
        if self._closed or not self._caught_up or self._waiter is not None:
            return None
        batch: list[Record] = []
        self._batching = True
        try:
            while len(batch) < max_records and (record := self._take_at_hand()) is not None:
                batch.append(record)
        finally:
            self._batching = False
        if not self._ready:
            self._let_go()
        if batch:
            return batch
        if self._closed or self._ready or self._live:
            return None  # a gap to read from disk, or a token to wait for
        if self.position < self._source.head_seq and self.position + 1 < self._covered_from:
            return None  # history the buffer does not hold
        return []

    def when_published(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, on the next batch published here or the end: how a
        reader that polls with ``take_at_hand`` and found nothing learns, with no task
        waiting, that it should look again. It is called by the log's writer, in the
        middle of its publishing: it must be quick and must not block."""
        self._on_publish = callback

    def take_whole(self, max_records: int = 1024, max_bytes: int = 256 << 10) -> list[LiveBatch]:
        """The live batches at hand, whole, for a subscription with no filter that is live
        and stands right before them: what ``take_at_hand`` would take, as the log's own
        batch objects, so that a reader costs O(batches), not O(records) (it writes each
        batch's ``joined`` bytes, made once for all the subscriptions that hold it). At
        most ``max_records`` records and ``max_bytes`` stored bytes in all; [] when this
        way does not apply (a filter, records in hand, a gap, a batch over the limits):
        ``take_at_hand`` then takes what comes next, record by record.

        No gate token is taken: the batches leave the subscription as they are returned,
        so it holds nothing in hand; the caller writes them at once (the fan-out)."""
        live = self._live
        if (
            not live
            or self._matches is not _everything
            or self._ready
            or self._closed
            or not self._caught_up
            or self._waiter is not None
            or live[0].first_seq != self.position + 1
            or self._passed > self.position
        ):
            return []
        taken: list[LiveBatch] = []
        records = size = 0
        while live:
            batch = live[0]
            count = len(batch.records)
            records += count
            size += len(batch.joined)
            if records > max_records or size > max_bytes:
                break
            live.popleft()
            self._live_count -= count
            taken.append(batch)
        if taken:
            self.position = self._passed = taken[-1].last_seq
        return taken

    def batches(self, max_records: int = 1024) -> _Batches:
        """Iterate over ``next_batch(max_records)`` until the subscription ends."""
        return _Batches(self, max_records)

    def _take_at_hand(self) -> Record | None:
        """The next matching record from what is in hand or in the live buffer, if it
        continues where the subscription stands (and the gate lets it take a batch in
        hand at once); None when it would need the disk or to wait."""
        while True:
            while self._ready:
                record = self._ready.popleft()
                if not self._ready and not self._batching:
                    self._let_go()  # the last record in hand: the next page is another's turn
                seq = record.event.seq
                if seq <= self.position:
                    continue
                matched = self._matches(record.event)  # if it raises, the record is not passed
                self.position = seq
                if matched:
                    return record
            if self._passed > self.position:
                self.position = self._passed
            if self._closed:
                return None
            if not self._live:
                if self.position + 1 >= self._covered_from:
                    # Nothing since is ours: the buffer would hold it.
                    self.position = max(self.position, self._source.head_seq)
                return None
            if self._continues() and (self._holding or self._hold_now()):
                entry = self._live.popleft()
                self._live_count -= len(entry.records)
                self._ready.extend(entry.records)
                self._passed = max(self._passed, entry.last_seq)
                continue
            return None

    def _continues(self) -> bool:
        """Whether the oldest live batch goes on from ``position``: it starts right after
        it, or nothing in between can match (it is past ``_covered_from``)."""
        position = self.position + 1
        return self._live[0].first_seq <= position or position >= self._covered_from

    async def _take(self) -> Record | CaughtUp:
        while True:
            record = self._take_at_hand()
            if record is not None:
                return record
            if self._closed:
                self._let_go()
                raise StopAsyncIteration
            live = bool(self._live) and self._continues()
            until = self._live[0].first_seq - 1 if self._live else self._source.head_seq
            if live or self.position < until:
                if not self._holding and not await self._hold():
                    continue  # it waited for its turn: look again at what there is now
                if live:
                    continue  # in hand now: _take_at_hand takes it
                self.disk_reads += 1
                self._blocked = True
                await self._read_history(until)
                continue
            self._let_go()
            if not self._caught_up:
                self._caught_up = True
                return CaughtUp(self.position)
            self._blocked = True
            await self._wait()

    async def _read_history(self, until: int) -> None:
        """Put the next records after ``position`` (up to ``until``) from disk in hand."""
        if self._selection is None:
            history = await self._source.read_history(self.position, until, self._page_bytes)
            passed = history[-1].event.seq if history else self.position
        else:
            page = await self._source.read_selected(
                self.position, until, self._selection, self._page_bytes
            )
            history, passed = page.records, page.next_after_seq
        if self._closed:
            self._let_go()
            raise StopAsyncIteration
        if passed <= self.position or (
            self._selection is None and history[0].event.seq != self.position + 1
        ):
            raise RuntimeError(f"the log returned no history after seq {self.position}")
        self._ready.extend(history)
        self._passed = passed

    def _hold_now(self) -> bool:
        """Take a token of the gate if one is free at once (and none is waited for)."""
        if self._gate is not None:
            try:
                self._gate.acquire_on_behalf_of_nowait(self)
            except trio.WouldBlock:
                return False
        self._holding = True
        return True

    async def _hold(self) -> bool:
        """Take a token of the gate: True if it was free at once, False after waiting."""
        if self._hold_now():
            return True
        assert self._gate is not None
        self._blocked = True
        await self._gate.acquire_on_behalf_of(self)
        self._holding = True
        return False

    def _let_go(self) -> None:
        if self._holding:
            self._holding = False
            if self._gate is not None:
                self._gate.release_on_behalf_of(self)

    async def _wait(self) -> None:
        if self._waiter is not None:
            raise trio.BusyResourceError("another task is already iterating this subscription")
        self._waiter = trio.lowlevel.current_task()

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            self._waiter = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)


class _Batches:
    def __init__(self, subscription: Subscription, max_records: int):
        self._subscription = subscription
        self._max_records = max_records

    def __aiter__(self) -> _Batches:
        return self

    async def __anext__(self) -> list[Record] | CaughtUp:
        return await self._subscription.next_batch(self._max_records)


class _Items:
    def __init__(self, subscription: Subscription):
        self._subscription = subscription

    def __aiter__(self) -> _Items:
        return self

    async def __anext__(self) -> Record | CaughtUp:
        return await self._subscription._next_item()
