"""The event log: one writer task, group commit, reads and subscriptions.

Appenders put their events on a bounded queue and park (no task, channel or
Event per append: a ticket the writer answers). The writer task, which alone
touches the segment file, loops:

1. take everything queued (up to ``max_batch`` events; an ``append_many`` is
   never split), give the events their seq and one ts, encode and frame them;
2. write the batch and fdatasync it once, in a worker thread;
3. then, synchronously and in seq order: advance ``head_seq``, call
   ``on_durable`` (where the store folds the projection), answer the
   appenders, and publish the batch to the subscribers.

So nobody is told of an event, and no reader can see it, before the batch
holding it is on disk. Appends that arrive during a sync queue up and form the
next batch: that is the group commit. (Preparing the next batch while the
current one syncs was tried and measured slower here: under the GIL a busy
event loop delays the sync thread's hand-back more than the overlap saves.)

When a write or sync fails, the segment is cut back to its last durable
size, that batch's appenders get ``LogUnavailable``, the seq counter goes
back, and the writer carries on: the next batch tries the disk again.
"""

from __future__ import annotations

import bisect
import functools
import logging
import os
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import attrs
import outcome
import trio

from sandboxd.events import framing, segments
from sandboxd.events.codec import encode, now_ts
from sandboxd.events.errors import CorruptLog, Gone, LogUnavailable, only_exception
from sandboxd.events.index import Postings, Selection
from sandboxd.events.projection import ProjectionError, State, apply
from sandboxd.events.segments import Record, Segment, fold_segment
from sandboxd.events.subscriptions import (
    ALL,
    CaughtUp,
    EventFilter,
    Filter,
    LiveBatch,
    Subscription,
    matcher,
    selection_of,
)
from sandboxd.events.types import Event, PendingEvent

__all__ = [
    "ALL",
    "CaughtUp",
    "CorruptLog",
    "EventFilter",
    "EventLog",
    "Filter",
    "Gone",
    "LogUnavailable",
    "Page",
    "Record",
    "Subscription",
    "open_event_log",
]

logger = logging.getLogger(__name__)

DEFAULT_SEGMENT_BYTES = 64 << 20
DEFAULT_MAX_BATCH = 4096
DEFAULT_QUEUE_LIMIT = 65536
DEFAULT_SUBSCRIBER_BUFFER = 8192
#: How much one history read takes from disk: large enough to amortize the
#: thread hop, small enough that decoding it does not hold up the event loop.
READ_BYTES = 256 << 10
#: Closed segments whose postings stay in memory (about 16 bytes a record: 4 MiB for a
#: 64 MiB segment of 200-byte records); others' are read from their index file again.
POSTINGS_KEPT = 4

OnDurable = Callable[[list[Event]], None]
T = TypeVar("T")


@attrs.frozen
class Page:
    """One page of history: the matching records, and where the next page starts."""

    records: list[Record]
    next_after_seq: int


@attrs.frozen
class Recovery:
    """What opening the log found: a torn tail it cut, if any."""

    dropped_bytes: int = 0
    path: Path | None = None
    offset: int = 0
    reason: str = ""


class _Ticket:
    """One append call waiting for durability: a plain object, no task or Event per append."""

    __slots__ = ("abandoned", "many", "pendings", "start", "task")

    def __init__(self, pendings: Sequence[PendingEvent], many: bool) -> None:
        self.pendings = pendings
        self.many = many
        self.task: trio.lowlevel.Task | None = None
        self.abandoned = False
        self.start = 0  # index of its first record in its batch

    def abort(self, _: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        # A cancelled appender is not told the outcome: if its events were not
        # taken into a batch yet they never will be, else they may be durable.
        self.task = None
        self.abandoned = True
        return trio.lowlevel.Abort.SUCCEEDED

    def resolve(self, result: outcome.Outcome[Any]) -> None:
        if self.task is not None:
            task, self.task = self.task, None
            trio.lowlevel.reschedule(task, result)


@attrs.define
class _Batch:
    first_seq: int
    data: bytes
    records: list[Record]
    tickets: list[_Ticket]
    index: list[tuple[int, int]]  # (seq, offset within data)
    offsets: list[int]  # of each record's frame within data


class EventLog:
    """Append-only, fdatasynced event log in segment files. Made by ``open_event_log``."""

    def __init__(
        self,
        directory: Path,
        segment_list: list[Segment],
        fd: int,
        recovery: Recovery,
        head_position: tuple[int, int] | None,
        *,
        segment_bytes: int,
        on_durable: OnDurable | None,
        max_batch: int,
        queue_limit: int,
        subscriber_buffer: int,
    ) -> None:
        self.directory = directory
        self.recovery = recovery
        self._segments = segment_list
        self._first_seqs = [s.first_seq for s in segment_list]
        self._active = segment_list[-1]
        self._fd = fd
        assert self._active.next_seq is not None
        self._head_seq = self._active.next_seq - 1
        self._head_position = head_position
        self._next_seq = self._head_seq + 1
        self._segment_bytes = segment_bytes
        self._on_durable = on_durable
        self._max_batch = max_batch
        self._queue_limit = queue_limit
        self._subscriber_buffer = subscriber_buffer
        self._queue: deque[_Ticket] = deque()
        self._queued = 0  # events in the queue
        self._room = trio.lowlevel.ParkingLot()
        self._writer: trio.lowlevel.Task | None = None  # set while it waits for work
        self._needs_cut = False  # the active file may hold bytes past its durable end
        #: Subscriptions get each durable batch: those filtered by sandbox only the records
        #: of their sandboxes, found by sandbox id (O(matching), not O(subscriptions)).
        self._firehose: set[Subscription] = set()
        self._by_sandbox: dict[str, set[Subscription]] = {}
        #: One postings build at a time (a filtered read of an unindexed segment).
        self._indexing = trio.Lock()
        self._postings_kept: OrderedDict[int, Segment] = OrderedDict()
        #: Where index files are written in the background (set by open_event_log).
        self._nursery: trio.Nursery | None = None
        self._closing = False
        self._closed = False
        self._damage_reported: set[tuple[Path, int]] = set()
        self.failed_batches = 0
        # Metrics hook (issue 13): called with the seconds each batch's write and
        # fdatasync took, timed in the thread that does them.
        self.on_synced: Callable[[float], None] | None = None

    # -- state -----------------------------------------------------------------------

    @property
    def head_seq(self) -> int:
        """The seq of the last durable event (0 for an empty log)."""
        return self._head_seq

    @property
    def oldest_seq(self) -> int:
        """The oldest seq the log still holds (above 1 only once retention removed segments)."""
        return self._segments[0].first_seq

    @property
    def head_position(self) -> tuple[int, int] | None:
        """(first seq of its segment, offset) of the record at ``head_seq``, if known."""
        return self._head_position

    @property
    def segment_count(self) -> int:
        """Segment files on disk (a metric)."""
        return len(self._segments)

    @property
    def subscriber_count(self) -> int:
        return len(self._firehose) + len(self._routed())

    def _routed(self) -> set[Subscription]:
        return set().union(*self._by_sandbox.values())

    def _subscriptions(self) -> list[Subscription]:
        return [*self._firehose, *self._routed()]

    # Metrics hook (issue 13): read at scrape time.

    @property
    def size_bytes(self) -> int:
        """Bytes of the segment files the log holds, up to their durable ends."""
        return sum(segment.end for segment in self._segments)

    @property
    def subscriber_lag(self) -> int:
        """Events the slowest subscriber has yet to pass: head_seq minus its position."""
        # 0 when none lags (a subscription may start past the head).
        return max([0, *(self._head_seq - s.position for s in self._subscriptions())])

    # -- appending ---------------------------------------------------------------------

    async def append(self, pending: PendingEvent) -> Event:
        """Append one event; return it with its seq and ts once it is durable."""
        event: Event = await self._submit(_Ticket((pending,), many=False))
        return event

    async def append_many(self, pendings: Sequence[PendingEvent]) -> list[Event]:
        """Append events atomically: all in one batch, durable together or not at all."""
        if not pendings:
            await trio.lowlevel.checkpoint()
            return []
        events: list[Event] = await self._submit(_Ticket(tuple(pendings), many=True))
        return events

    async def _submit(self, ticket: _Ticket) -> Any:
        """Queue the ticket and park until the committer answers it."""
        size = len(ticket.pendings)
        if self._closing or (self._queued and self._queued + size > self._queue_limit):
            await self._wait_for_room(size)
        self._queue.append(ticket)
        self._queued += size
        if self._writer is not None:
            task, self._writer = self._writer, None
            trio.lowlevel.reschedule(task)
        ticket.task = trio.lowlevel.current_task()
        return await trio.lowlevel.wait_task_rescheduled(ticket.abort)

    async def _wait_for_room(self, size: int) -> None:
        while self._queued and self._queued + size > self._queue_limit and not self._closing:
            await self._room.park()
        if self._closing:
            await trio.lowlevel.checkpoint()
            raise LogUnavailable("the log is closed")

    # -- the writer --------------------------------------------------------------------

    async def _run_writer(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Take, prepare, write and publish batches until closed, then drain and stop."""
        batch: _Batch | None = None
        try:
            task_status.started()
            while True:
                if not self._queue:
                    if self._closing:
                        return
                    await self._wait_for_work()
                    continue
                tickets = self._take_batch()
                self._room.unpark_all()
                batch = self._prepare(tickets)
                if batch is None:
                    continue
                try:
                    await self._write(batch)
                except OSError as exc:
                    self.failed_batches += 1
                    self._next_seq = self._head_seq + 1
                    logger.error("the event log could not write a batch: %s", exc)
                    self._fail(batch, LogUnavailable(f"the log could not write: {exc}"))
                    batch = None
                    continue
                self._durable(batch)
                batch = None
        finally:
            self._shut(batch)

    async def _wait_for_work(self) -> None:
        self._writer = trio.lowlevel.current_task()

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            self._writer = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def _take_batch(self) -> list[_Ticket]:
        tickets = []
        count = 0
        queue = self._queue
        # A ticket is never split (append_many is atomic), so a batch may exceed max_batch by one.
        while queue and count < self._max_batch:
            ticket = queue.popleft()
            count += len(ticket.pendings)
            tickets.append(ticket)
        self._queued -= count
        return tickets

    def _prepare(self, tickets: list[_Ticket]) -> _Batch | None:
        """Give seqs and one ts to a batch's events and frame them. Pure CPU, no await.

        This loop and the appenders' own task switches are the writer's CPU
        cost per event, so it stays flat: one Event, one encode, one frame.
        """
        ts = now_ts()  # one clock reading per batch: its events became durable together
        seq = first_seq = self._next_seq
        size = 0
        frames: list[bytes] = []
        records: list[Record] = []  # one per frame, in the same order
        offsets: list[int] = []  # where each frame starts in the batch
        taken: list[_Ticket] = []
        index: list[tuple[int, int]] = []
        every = segments.INDEX_EVERY
        encode_frame = framing.encode_frame
        new_tuple = tuple.__new__  # Record(event, raw) without NamedTuple's Python-level __new__
        for ticket in tickets:
            if ticket.abandoned:
                continue
            start, start_seq, start_size = len(records), seq, size
            try:
                for pending in ticket.pendings:
                    event = Event(seq, ts, pending.sandbox_id, pending.by, pending.data)
                    raw = encode(event)
                    frame = encode_frame(seq, raw)
                    records.append(new_tuple(Record, (event, raw)))
                    frames.append(frame)
                    offsets.append(size)
                    if seq % every == 0:
                        index.append((seq, size))
                    size += len(frame)
                    seq += 1
            except Exception as exc:
                # An event the codec cannot write fails its own append (all of an
                # append_many), not the batch.
                del records[start:], frames[start:], offsets[start:]
                while index and index[-1][0] >= start_seq:
                    index.pop()
                seq, size = start_seq, start_size
                ticket.resolve(outcome.Error(exc))
                continue
            ticket.start = start
            taken.append(ticket)
        if not taken:
            return None
        self._next_seq = seq
        return _Batch(first_seq, b"".join(frames), records, taken, index, offsets)

    async def _write(self, batch: _Batch) -> None:
        active = self._active
        if self._needs_cut:
            await _in_thread(segments.cut_back, self._fd, active.end)
            self._needs_cut = False
        if active.end >= self._segment_bytes and active.next_seq != active.first_seq:
            await self._roll(batch.first_seq)
            active = self._active
        offset = active.end
        try:
            seconds = await _in_thread(
                _timed, segments.append_durably, self._fd, offset, batch.data
            )
        except OSError:
            try:
                await _in_thread(segments.cut_back, self._fd, offset)
            except OSError as exc:
                logger.error("could not cut the segment back after a failed write: %s", exc)
                self._needs_cut = True
            raise
        if self.on_synced is not None:
            self.on_synced(seconds)

    async def _roll(self, first_seq: int) -> None:
        """Start a new segment; the old one is complete and durable, and its index is
        written beside it in the background."""
        fd = await _in_thread(segments.create_segment, self.directory, first_seq)
        # No await from here on: the swap must not be cut in half by a cancellation.
        os.close(self._fd)  # its data is synced: nothing for close to wait for
        self._fd = fd
        closed = self._active
        path = self.directory / segments.segment_name(first_seq)
        self._active = Segment(first_seq, path, framing.HEADER_SIZE, first_seq)
        self._active.postings = Postings(first_seq)  # whole from the start: the writer keeps it
        self._segments.append(self._active)
        self._first_seqs.append(first_seq)
        if self._nursery is None:
            return
        if closed.postings is not None and _is_whole(closed):
            self._keep_postings(closed)
            self._nursery.start_soon(self._write_index, closed, closed.postings)
        else:
            # Indexed since a crash only in part: read it once, in the background.
            self._nursery.start_soon(self._index_closed, closed)

    async def _index_closed(self, segment: Segment) -> None:
        try:
            await self._whole_postings(segment)
        except CorruptLog as damage:
            self._report_damage(damage)
        except OSError as exc:
            logger.warning("could not index %s: %s", segment.path, exc)

    async def _write_index(self, segment: Segment, postings: Postings) -> None:
        """Write a segment's index file (a cache: a failure costs a rebuild, later)."""
        try:
            await trio.to_thread.run_sync(
                segments.write_index, segment.path, postings, segment.seq_index()
            )
        except OSError as exc:
            logger.warning("could not write the index of %s: %s", segment.path, exc)

    def _durable(self, batch: _Batch) -> None:
        """The batch is on disk: now, and in this order, fold, answer, publish."""
        active = self._active
        offset = active.end
        active.end += len(batch.data)
        last_seq = batch.first_seq + len(batch.records) - 1
        active.next_seq = last_seq + 1
        if batch.index:
            active.add_index([(seq, offset + at) for seq, at in batch.index])
        self._head_seq = last_seq
        records = batch.records
        last_frame = active.end - framing.FRAME_OVERHEAD - len(records[-1].raw)
        self._head_position = (active.first_seq, last_frame)
        postings = active.postings
        if postings is not None and postings.end == offset:  # else a build fills it in
            add = postings.add
            for record, at in zip(records, batch.offsets, strict=True):
                event = record.event
                add(offset + at, event.sandbox_id, event.data.TYPE)
            crc = int.from_bytes(batch.data[batch.offsets[-1] : batch.offsets[-1] + 4], "little")
            postings.advance(active.end, last_seq + 1, (last_frame, crc))
        if self._on_durable is not None:
            try:
                self._on_durable([r.event for r in records])
            except Exception:
                # The events are durable whatever this callback thinks of them.
                logger.exception("on_durable failed for seqs %d..%d", batch.first_seq, last_seq)
        reschedule, value = trio.lowlevel.reschedule, outcome.Value
        for ticket in batch.tickets:
            task = ticket.task
            if task is None:
                continue  # its appender was cancelled
            ticket.task = None
            if ticket.many:
                chunk = records[ticket.start : ticket.start + len(ticket.pendings)]
                reschedule(task, value([r.event for r in chunk]))
            else:
                reschedule(task, value(records[ticket.start].event))
        first_seq = batch.first_seq
        if self._firehose:
            whole = LiveBatch(first_seq, last_seq, records)  # one for all of them
            for subscriber in self._firehose:
                subscriber.publish(whole)
        if self._by_sandbox:
            self._publish_by_sandbox(records, first_seq, last_seq)

    def _publish_by_sandbox(self, records: list[Record], first_seq: int, last_seq: int) -> None:
        """Each subscription filtered by sandbox gets the batch's records of its sandboxes,
        found by sandbox id: a record costs a dict lookup, and a subscription costs
        something only when it has a record in the batch."""
        chosen: dict[Subscription, list[Record]] = {}
        by_sandbox = self._by_sandbox
        for record in records:
            followers = by_sandbox.get(record.event.sandbox_id)  # type: ignore[arg-type]
            if followers:
                for subscriber in followers:
                    chosen.setdefault(subscriber, []).append(record)
        for subscriber, matching in chosen.items():
            subscriber.publish(LiveBatch(first_seq, last_seq, matching))

    def _fail(self, batch: _Batch, exc: Exception) -> None:
        for ticket in batch.tickets:
            ticket.resolve(outcome.Error(exc))

    def _shut(self, batch: _Batch | None) -> None:
        """The writer stops: nobody may be left waiting on it."""
        self._closing = True
        self._closed = True
        closed = LogUnavailable("the log is closed")
        if batch is not None:
            self._fail(batch, closed)
        while self._queue:
            self._queue.popleft().resolve(outcome.Error(closed))
        self._queued = 0
        self._room.unpark_all()
        for subscriber in self._subscriptions():
            subscriber.end()
        self._firehose.clear()
        self._by_sandbox.clear()
        os.close(self._fd)

    def _close(self) -> None:
        """Stop taking appends; the writer drains what is queued, then stops."""
        self._closing = True
        self._room.unpark_all()
        if self._writer is not None:
            task, self._writer = self._writer, None
            trio.lowlevel.reschedule(task)

    # -- reading -----------------------------------------------------------------------

    def _segment_for(self, seq: int) -> Segment:
        return self._segments[max(bisect.bisect_right(self._first_seqs, seq) - 1, 0)]

    async def _ensure_indexed(self, segment: Segment) -> None:
        """Know a closed segment's last seq and its sparse seq index: from its index file
        if it has a good one, else by walking its frames (lengths and seqs only)."""
        if segment.indexed:
            return
        loaded = await self._load_index(segment)
        if loaded is not None and loaded.end == segment.end:
            segment.next_seq = loaded.next_seq
            return
        found = await trio.to_thread.run_sync(
            functools.partial(
                segments.inspect_segment,
                segment.path,
                segment.first_seq,
                is_last=False,
                check_crc=False,
            )
        )
        segment.next_seq = found.segment.next_seq
        segment.index_seqs = found.segment.index_seqs
        segment.index_offsets = found.segment.index_offsets

    async def _load_index(self, segment: Segment) -> Postings | None:
        """The postings of a segment's index file, if it has one that matches it (they
        may cover only its first frames); its seq index is taken into the segment's."""
        loaded = await trio.to_thread.run_sync(
            segments.load_index, segment.path, segment.first_seq, segment.end
        )
        if loaded is None:
            return None
        segment.merge_index(loaded.seq_index)
        return loaded.postings

    async def _whole_postings(self, segment: Segment) -> Postings:
        """The segment's postings, whole up to its end: from its index file, and what that
        lacks built by reading it (once; a closed segment's index is then written out).

        The active segment's are kept up to date by the writer, which adds a batch
        only to postings whole up to where the batch starts; a closed segment's are
        kept for the ``POSTINGS_KEPT`` segments read most recently.
        """
        async with self._indexing:
            if segment.postings is None:
                segment.postings = await self._load_index(segment) or Postings(segment.first_seq)
            while not _is_whole(segment):
                have = segment.postings
                # The active segment may grow during the build: then build the rest.
                piece = await trio.to_thread.run_sync(
                    segments.build_postings, segment.path, have.end, have.next_seq, segment.end
                )
                have.extend(piece.postings)
                segment.merge_index(piece.seq_index)
                if segment is not self._active and have.end == segment.end:
                    segment.next_seq = have.next_seq
                    await self._write_index(segment, have)
        postings = segment.postings
        if segment is not self._active:
            self._keep_postings(segment)
        return postings

    def _keep_postings(self, segment: Segment) -> None:
        """Keep the postings of the closed segments read most recently, drop the others'."""
        self._postings_kept.pop(segment.first_seq, None)
        self._postings_kept[segment.first_seq] = segment
        while len(self._postings_kept) > POSTINGS_KEPT:
            _, dropped = self._postings_kept.popitem(last=False)
            if dropped is not self._active:
                dropped.postings = None

    async def read_selected(
        self,
        after_seq: int,
        until_seq: int,
        selection: Selection,
        max_bytes: int = READ_BYTES,
    ) -> Page:
        """The records from ``after_seq + 1`` on, none past ``until_seq``, that the
        selection can match, found through the segment index: records of other
        sandboxes or types are neither read nor decoded.

        One segment per call, at most about ``max_bytes`` of records;
        ``next_after_seq`` says how far the selection has been looked at (past
        ``after_seq`` when ``after_seq < until_seq <= head_seq``).
        """
        if after_seq + 1 < self.oldest_seq:
            await trio.lowlevel.checkpoint()
            raise Gone(self.oldest_seq)
        until_seq = min(until_seq, self._head_seq)
        if after_seq >= until_seq:
            await trio.lowlevel.checkpoint()
            return Page([], after_seq)
        segment = self._segment_for(after_seq + 1)
        try:
            await self._ensure_indexed(segment)
            postings = await self._whole_postings(segment)
            low, _ = segment.locate(after_seq + 1)
            high = segment.bound(until_seq)
            candidates = postings.select(selection.sandbox_ids, selection.types, low, high)
            records, taken = await trio.to_thread.run_sync(
                segments.read_frames_at,
                segment.path,
                candidates,
                segment.end,
                after_seq,
                until_seq,
                max_bytes,
            )
        except FileNotFoundError:
            raise Gone(self.oldest_seq) from None
        except CorruptLog as damage:
            self._report_damage(damage)
            raise
        if taken < len(candidates):
            return Page(records, records[-1].event.seq)
        assert segment.next_seq is not None
        return Page(records, min(until_seq, segment.next_seq - 1))

    async def read_history(
        self, after_seq: int, until_seq: int, max_bytes: int = READ_BYTES
    ) -> list[Record]:
        """Some durable records from ``after_seq + 1`` on, none past ``until_seq``.

        At least one when ``after_seq < until_seq <= head_seq``; at most about
        ``max_bytes`` of them. The subscriptions' and ``read_page``'s step.
        """
        if after_seq + 1 < self.oldest_seq:
            await trio.lowlevel.checkpoint()
            raise Gone(self.oldest_seq)
        until_seq = min(until_seq, self._head_seq)
        if after_seq >= until_seq:
            await trio.lowlevel.checkpoint()
            return []
        segment = self._segment_for(after_seq + 1)
        try:
            if not segment.indexed and not (
                segment.index_seqs and segment.index_seqs[0] <= after_seq + 1
            ):
                await self._ensure_indexed(segment)
            offset, at = segment.locate(after_seq + 1)
            span = await trio.to_thread.run_sync(
                segments.read_span,
                segment.path,
                offset,
                at,
                segment.end,
                max_bytes,
                after_seq,
                until_seq,
            )
        except FileNotFoundError:
            # Retention removed the segment while we were on our way to it.
            raise Gone(self.oldest_seq) from None
        except CorruptLog as damage:
            self._report_damage(damage)
            raise
        return span.records

    def _report_damage(self, damage: CorruptLog) -> None:
        """Log a damaged record once: every read that reaches it fails the same way.

        (A range a snapshot covers is not read at start-up, so the daemon can run
        on a log damaged there; only readers of that range learn of it.) The set
        of records reported is bounded by the damage on disk.
        """
        if (damage.path, damage.offset) in self._damage_reported:
            return
        self._damage_reported.add((damage.path, damage.offset))
        logger.error(
            "%s; every read that reaches it fails until the log is repaired "
            "(`sandboxd log verify` shows more; docs/operations.md says what to do)",
            damage,
        )

    async def read_page(
        self,
        after_seq: int,
        *,
        limit: int = 1000,
        event_filter: Filter = None,
        max_scan: int = 100_000,
    ) -> Page:
        """Up to ``limit`` records with seq above ``after_seq`` that match the filter.

        Scans at most about ``max_scan`` seqs, so a filter that matches
        little does not hold the caller for long; ``next_after_seq`` says
        where the scan stopped, to read on from there. A filter that names
        sandboxes or types is answered through the segment index, reading only
        the records that can match. A damaged record ends the page before it;
        reading on from there raises ``CorruptLog``.
        """
        if limit < 1:
            raise ValueError("limit must be at least 1")
        matches = matcher(event_filter)
        selection = selection_of(event_filter)
        found: list[Record] = []
        position = after_seq
        head = self._head_seq
        if after_seq + 1 < self.oldest_seq:
            await trio.lowlevel.checkpoint()
            raise Gone(self.oldest_seq)
        while position < head and position - after_seq < max_scan:
            try:
                if selection is None:
                    history, reached = await self.read_history(position, head), position
                else:
                    until = min(head, after_seq + max_scan)
                    page = await self.read_selected(position, until, selection)
                    history, reached = page.records, page.next_after_seq
            except CorruptLog:
                if position == after_seq:
                    raise
                break  # what came before the damage is this page; the next one raises
            for record in history:
                position = record.event.seq
                if matches(record.event):
                    found.append(record)
                    if len(found) == limit:
                        return Page(found, position)
                if position - after_seq >= max_scan:
                    break
            else:
                position = max(position, reached)
        await trio.lowlevel.checkpoint()
        return Page(found, position)

    async def read_records(
        self, after_seq: int, limit: int = 1000, event_filter: Filter = None
    ) -> list[Record]:
        """Up to ``limit`` matching records (event and stored bytes) after ``after_seq``."""
        found: list[Record] = []
        position = after_seq
        while len(found) < limit and position < self._head_seq:
            page = await self.read_page(
                position, limit=limit - len(found), event_filter=event_filter
            )
            found.extend(page.records)
            position = page.next_after_seq
        return found

    async def read(
        self, after_seq: int, limit: int = 1000, event_filter: Filter = None
    ) -> list[Event]:
        """Up to ``limit`` matching events after ``after_seq``."""
        return [r.event for r in await self.read_records(after_seq, limit, event_filter)]

    async def event_at(self, seq: int) -> Event | None:
        """The event with this seq, or None if the log does not hold it."""
        if not self.oldest_seq <= seq <= self._head_seq:
            await trio.lowlevel.checkpoint()
            return None
        history = await self.read_history(seq - 1, seq)
        return history[0].event if history else None

    async def check_position(self, seq: int, first_seq: int, offset: int) -> Event | None:
        """The event at ``seq`` if its record is at ``offset`` in the segment starting at
        ``first_seq``, else None; a position that checks out is added to the index."""
        segment = next((s for s in self._segments if s.first_seq == first_seq), None)
        if segment is None or not framing.HEADER_SIZE <= offset < segment.end:
            await trio.lowlevel.checkpoint()
            return None
        try:
            span = await trio.to_thread.run_sync(
                segments.read_span, segment.path, offset, seq, segment.end, 1 << 16, seq - 1, seq
            )
        except (CorruptLog, OSError):
            return None  # not a record there, or not that one: the position is wrong
        if not span.records or span.records[0].event.seq != seq:
            return None
        segment.add_known(seq, offset)
        return span.records[0].event

    async def replay(self, state: State, after_seq: int) -> tuple[int, str | None]:
        """Fold every record after ``after_seq`` into ``state`` (in a worker thread); return
        how many, and the ts of the last one. (At start-up, before any append.)"""
        return await trio.to_thread.run_sync(replay, state, self.snapshot_segments(), after_seq)

    def snapshot_segments(self) -> list[Segment]:
        """A copy of the segment table, for blocking reads in a worker thread (replay)."""
        return [
            attrs.evolve(s, index_seqs=list(s.index_seqs), index_offsets=list(s.index_offsets))
            for s in self._segments
        ]

    # -- subscriptions -----------------------------------------------------------------

    def subscribe(
        self,
        after_seq: int | None,
        event_filter: Filter = None,
        *,
        buffer: int | None = None,
        page_bytes: int = READ_BYTES,
        gate: trio.CapacityLimiter | None = None,
    ) -> Subscription:
        """Every matching event with seq above ``after_seq``, once, in order, history then live.

        ``after_seq=None`` means only what comes next. Raises ``Gone`` if
        ``after_seq`` is older than the retained log. ``buffer`` bounds the
        live buffer (events), ``page_bytes`` each history read, and ``gate``
        when records may be in hand (see subscriptions.py).
        """
        if self._closing:
            raise LogUnavailable("the log is closed")
        start = self._head_seq if after_seq is None else after_seq
        if start < 0:
            raise ValueError("after_seq must not be negative")
        if start + 1 < self.oldest_seq:
            raise Gone(self.oldest_seq)
        limit = self._subscriber_buffer if buffer is None else buffer
        subscription = Subscription(
            self, start, event_filter, limit, page_bytes=page_bytes, gate=gate
        )
        selection = selection_of(event_filter)
        if selection is None or selection.sandbox_ids is None:
            self._firehose.add(subscription)
        else:
            for sandbox_id in selection.sandbox_ids:
                self._by_sandbox.setdefault(sandbox_id, set()).add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._firehose.discard(subscription)
        selection = subscription.selection
        for sandbox_id in () if selection is None else selection.sandbox_ids or ():
            followers = self._by_sandbox.get(sandbox_id)
            if followers is not None:
                followers.discard(subscription)
                if not followers:
                    del self._by_sandbox[sandbox_id]

    # -- retention ---------------------------------------------------------------------

    async def remove_segments_through(self, seq: int) -> int:
        """Delete the whole segments whose records all have seqs up to ``seq``.

        Never the active segment. Returns how many went; ``oldest_seq`` moves up.
        """
        doomed: list[Segment] = []
        while len(self._segments) > 1 and self._segments[1].first_seq - 1 <= seq:
            doomed.append(self._segments.pop(0))
            self._first_seqs.pop(0)
        for segment in doomed:
            self._postings_kept.pop(segment.first_seq, None)
            await trio.to_thread.run_sync(segment.path.unlink)
            unlink_index = functools.partial(segment.index_path.unlink, missing_ok=True)
            await trio.to_thread.run_sync(unlink_index)
        if doomed:
            await trio.to_thread.run_sync(segments.fsync_dir, self.directory)
            logger.info(
                "retention removed %d segments; the log now starts at seq %d",
                len(doomed),
                self.oldest_seq,
            )
        return len(doomed)


async def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking call on trio's thread cache and wait for it, uncancellably.

    ``trio.to_thread.run_sync`` does the same plus a capacity limiter and a
    context copy, which measured ~100 us more per call here; the committer makes
    one call per batch, so with one appender that hop is most of what it adds
    to the fdatasync. The call cannot be abandoned: the segment file must not
    be touched again while a thread may still be writing it.
    """
    await trio.lowlevel.checkpoint_if_cancelled()
    task = trio.lowlevel.current_task()
    token = trio.lowlevel.current_trio_token()

    def deliver(result: outcome.Outcome[T]) -> None:
        token.run_sync_soon(trio.lowlevel.reschedule, task, result)

    trio.lowlevel.start_thread_soon(functools.partial(fn, *args), deliver)
    result: T = await trio.lowlevel.wait_task_rescheduled(_uncancellable)
    return result


def _uncancellable(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.FAILED


def _is_whole(segment: Segment) -> bool:
    """Whether the segment's postings cover all of it."""
    return segment.postings is not None and segment.postings.end == segment.end


def _timed(fn: Callable[..., object], *args: Any) -> float:
    """Call ``fn(*args)``; return the seconds it took."""
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


def _open_files(
    directory: Path,
) -> tuple[list[Segment], int, Recovery, tuple[int, int] | None]:
    """Find the segments, recover the last one, and open it for appending (blocking)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    found = segments.list_segments(directory)
    while found and segments.is_torn_creation(found[-1][1]):
        path = found.pop()[1]
        logger.warning("%s: removing a segment whose creation was cut short", path)
        segments.remove_segment(path)
    if not found:
        fd = segments.create_segment(directory, 1)
        path = directory / segments.segment_name(1)
        segment = Segment(1, path, framing.HEADER_SIZE, 1, postings=Postings(1))
        return [segment], fd, Recovery(), None
    closed = [Segment(first, path, path.stat().st_size, None) for first, path in found[:-1]]
    first_seq, path = found[-1]
    recovered = segments.recover_segment(path, first_seq)
    recovery = Recovery()
    if recovered.dropped:
        recovery = Recovery(recovered.dropped, path, recovered.segment.end, recovered.reason)
        logger.warning(
            "%s: cut a torn tail of %d bytes at offset %d (%s); the log ends at seq %s",
            path,
            recovered.dropped,
            recovered.segment.end,
            recovered.reason,
            (recovered.segment.next_seq or 1) - 1,
        )
    active = recovered.segment
    # After a clean shutdown its index file covers it whole, and the writer goes on
    # from there; else the part it lacks is built when a filtered read needs it.
    loaded = segments.load_index(path, first_seq, active.end)
    if loaded is not None:
        active.postings = loaded.postings
    elif active.end == framing.HEADER_SIZE:
        active.postings = Postings(first_seq)
    fd = segments.open_for_append(path)
    position = (first_seq, recovered.last) if recovered.last >= 0 else None
    return [*closed, active], fd, recovery, position


def replay(state: State, segment_list: list[Segment], after_seq: int) -> tuple[int, str | None]:
    """Fold every record after ``after_seq`` into ``state`` (blocking; in a thread).

    Returns how many it folded and the ts of the last. An event the projection
    refuses stops the replay as a ``CorruptLog`` naming its record: the log does
    not describe a history this code accepts.
    """
    last = None
    first_seqs = [s.first_seq for s in segment_list]
    start = max(bisect.bisect_right(first_seqs, after_seq + 1) - 1, 0)
    fold = functools.partial(apply, state)
    for i in range(start, len(segment_list)):
        following = segment_list[i + 1] if i + 1 < len(segment_list) else None
        event = fold_segment(segment_list[i], fold, after_seq, following, refused=ProjectionError)
        last = event or last
    if last is None:
        return 0, None
    return last.seq - after_seq, last.ts  # seqs are contiguous: fold_segment checks


@asynccontextmanager
async def open_event_log(
    directory: Path,
    *,
    segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    on_durable: OnDurable | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    queue_limit: int = DEFAULT_QUEUE_LIMIT,
    subscriber_buffer: int = DEFAULT_SUBSCRIBER_BUFFER,
) -> AsyncIterator[EventLog]:
    """Open (recovering if need be) the log in ``directory`` and run its writer.

    Raises ``CorruptLog`` if a segment is damaged other than by a torn tail.
    On exit the writer drains what was queued, then stops; subscriptions end.
    An exception from the body comes out as itself, not in an exception group.
    """
    if segment_bytes < 1 or max_batch < 1 or queue_limit < 1 or subscriber_buffer < 1:
        raise ValueError("segment_bytes, max_batch, queue_limit and subscriber_buffer must be >= 1")
    segment_list, fd, recovery, position = await trio.to_thread.run_sync(_open_files, directory)
    log = EventLog(
        directory,
        segment_list,
        fd,
        recovery,
        position,
        segment_bytes=segment_bytes,
        on_durable=on_durable,
        max_batch=max_batch,
        queue_limit=max(queue_limit, max_batch),
        subscriber_buffer=subscriber_buffer,
    )
    try:
        async with trio.open_nursery() as nursery:
            log._nursery = nursery
            await nursery.start(log._run_writer)
            try:
                yield log
            finally:
                log._close()
        # The next start-up then finds the active segment indexed too.
        active = log._active
        if active.postings is not None and _is_whole(active):
            with trio.CancelScope(shield=True):
                await log._write_index(active, active.postings)
    except BaseExceptionGroup as group:
        raise only_exception(group) from None
