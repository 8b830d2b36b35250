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
  records (decoded, they take about five times that), or one live batch.

A subscription given a ``gate`` (a ``trio.CapacityLimiter``) takes records in
hand only while it holds one of the gate's tokens, and gives it back once it
has delivered them: a connection of many subscriptions that its client does
not read holds as many pages as its gate has tokens, not one per
subscription. Tokens go round in turn (the limiter is fair), so no
subscription of the gate starves.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Protocol

import attrs
import trio

from sandboxd.events.segments import Record
from sandboxd.events.types import Event


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


class _Source(Protocol):
    """What a subscription needs of the log."""

    @property
    def head_seq(self) -> int: ...

    async def read_history(
        self, after_seq: int, until_seq: int, max_bytes: int
    ) -> list[Record]: ...

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
        self._limit = limit
        self._page_bytes = page_bytes
        self._gate = gate
        self._holding = False  # one of the gate's tokens, while records are in hand
        #: Every event up to here was delivered or filtered out.
        self.position = after_seq
        self._live: deque[list[Record]] = deque()
        self._live_count = 0
        self._ready: deque[Record] = deque()
        self._waiter: trio.lowlevel.Task | None = None
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

    # -- called by the log's writer, synchronously: must never block -------------------

    def publish(self, records: list[Record]) -> None:
        if self._closed:
            return
        self._live.append(records)
        self._live_count += len(records)
        while self._live_count > self._limit:
            self._live_count -= len(self._live.popleft())
            self.dropped_batches += 1
        self._wake()

    def end(self) -> None:
        """The log closes: iteration stops; ``position`` says where to resume."""
        self._closed = True
        self._ready.clear()
        self._live.clear()
        self._live_count = 0
        self._let_go()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None:
            task, self._waiter = self._waiter, None
            trio.lowlevel.reschedule(task)

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

    async def _take(self) -> Record | CaughtUp:
        while True:
            while self._ready:
                record = self._ready.popleft()
                if not self._ready:
                    self._let_go()  # the last record in hand: the next page is another's turn
                seq = record.event.seq
                if seq <= self.position:
                    continue
                matched = self._matches(record.event)  # if it raises, the record is not passed
                self.position = seq
                if matched:
                    return record
            if self._closed:
                self._let_go()
                raise StopAsyncIteration
            live = bool(self._live) and self._live[0][0].event.seq <= self.position + 1
            until = self._live[0][0].event.seq - 1 if self._live else self._source.head_seq
            if live or self.position < until:
                if not self._holding and not await self._hold():
                    continue  # it waited for its turn: look again at what there is now
                if live:
                    batch = self._live.popleft()
                    self._live_count -= len(batch)
                    self._ready.extend(batch)
                    continue
                self.disk_reads += 1
                self._blocked = True
                history = await self._source.read_history(self.position, until, self._page_bytes)
                if self._closed:
                    self._let_go()
                    raise StopAsyncIteration
                if not history or history[0].event.seq != self.position + 1:
                    raise RuntimeError(f"the log returned no history after seq {self.position}")
                self._ready.extend(history)
                continue
            self._let_go()
            if not self._caught_up:
                self._caught_up = True
                return CaughtUp(self.position)
            self._blocked = True
            await self._wait()

    async def _hold(self) -> bool:
        """Take a token of the gate: True if it was free at once, False after waiting."""
        if self._gate is None:
            self._holding = True
            return True
        try:
            self._gate.acquire_on_behalf_of_nowait(self)
        except trio.WouldBlock:
            self._blocked = True
            await self._gate.acquire_on_behalf_of(self)
            self._holding = True
            return False
        self._holding = True
        return True

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


class _Items:
    def __init__(self, subscription: Subscription):
        self._subscription = subscription

    def __aiter__(self) -> _Items:
        return self

    async def __anext__(self) -> Record | CaughtUp:
        return await self._subscription._next_item()
