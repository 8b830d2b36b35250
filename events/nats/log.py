"""The event log on a NATS JetStream stream: what ``events.log.EventLog`` is, replicated.

Several daemons (nodes) share one stream. Every event is a message on the
subject of its sandbox (``STREAM.sandbox.ID``; ``STREAM.daemon`` for the
daemon's own), its body the record of codec.py without its seq: the seq is
the stream's, global, given by the stream's leader when a quorum has stored
it. Each node folds the whole stream, in stream order, into its projection.

Appending (the writer task, like the file log's group commit):

1. take what is queued (at most one append per sandbox subject in flight:
   the next one's condition depends on this one's seq), give each its ts,
   and publish them all at once, in one crossing of the bridge, each with
   ``Nats-Expected-Last-Subject-Sequence`` set to the seq of the last event
   of its subject this node knows of. The stream refuses it if another node
   recorded a transition of that sandbox since: so two nodes can never record
   conflicting transitions of one sandbox, and the loser gets ``Conflict``;
2. an ``append_many`` of several events goes as one atomic batch (stored all
   together or not at all, each event still conditional);
3. each acknowledgement comes back on its own (not when its batch's slowest
   does) and says the event is stored on a quorum (fsynced there, with
   ``sync_interval: always``, docs/cluster.md); the appender is answered once
   the node's own fold has reached that seq, so ``state`` already holds it,
   as with the file log;
4. what NATS did not answer is sent again, with the same ``Nats-Msg-Id``,
   until ``ack_within``: the stream stores a message once whatever the tries.

Folding: records are put aside by seq as the node learns of them, and folded
(``on_durable``), handed to the subscriptions, and their appenders answered
as soon as they come next in seq order. A node learns of its own events from
their acks (the record is built from what it sent: no decoding), and of the
others' by reading them: each node announces, on core NATS (``stored.STREAM.RUN``,
once per turn of its NATS loop), the highest seq it has had acknowledged, and a
node that hears of a seq past its head reads the gaps up to it with batched
direct gets (any replica answers; one a little behind is asked again). So no
node reads back its own events, which an ordered consumer of the whole stream
would deliver to it, headers and all, to be parsed and dropped. An announcement
is at most once (lost while a connection is made again, or never sent by a
writer that is not a node): a node whose head has not moved for ``LOOK_EVERY``
seconds reads whatever the stream holds past it, so every acknowledged append
is folded by every node, in order, once, at worst that much later.

Measured (bench/cluster.py, four full runs, docs/performance.md): 10,700 to
16,900 appends/s at 256 in flight on a loaded 2-core machine, 0.83 to 0.92 of
nats-py publishing the same records alone in the same runs; this process spends
40 to 56 µs of CPU per event (both threads), nats-py 38 to 47 µs per publish.
Before, the acks were nats-py requests (a task, a timer and a random token
each: 98 µs per event) and an ordered consumer brought every event back (about
10 µs more).

Reading: ``read_history`` is one batched direct get (up to 256 KiB) per call,
served by any replica; the catch-up subscriptions of subscriptions.py work on
it unchanged, so a subscription resumes exactly after any seq, on any node.

Not connected, or no quorum: appends fail with ``LogUnavailable`` within
``ack_within`` seconds (never acknowledged, so nothing acknowledged is lost);
nats-py reconnects on its own and appends work again once the stream does.
"""

from __future__ import annotations

import functools
import heapq
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import nats.js.api as api
import orjson
import trio

from sandboxd.events.codec import DecodeError, encode, event_from_dict, now_ts
from sandboxd.events.errors import CorruptLog, Gone, LogUnavailable, only_exception
from sandboxd.events.index import Selection
from sandboxd.events.log import DEFAULT_QUEUE_LIMIT, READ_BYTES, Page
from sandboxd.events.nats.bridge import (
    Nats,
    NatsUnavailable,
    StreamMessage,
    WrongLastSequence,
    connect,
    patiently,
)
from sandboxd.events.nats.settings import NatsSettings
from sandboxd.events.projection import ProjectionError, State, apply
from sandboxd.events.segments import Record
from sandboxd.events.subscriptions import Filter, LiveBatch, Subscription, matcher
from sandboxd.events.types import Event, PendingEvent

logger = logging.getLogger(__name__)

EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
MSG_ID = "Nats-Msg-Id"
#: Seconds a daemon starting beside its NATS cluster waits for the stream to be placeable.
STREAM_WITHIN = 15.0
#: The most events one atomic batch may hold (nats-server's default batch limit).
MAX_ATOMIC = 1000
#: Messages one direct get asks for at most (and READ_BYTES bounds their bytes).
PAGE_MESSAGES = 1024
#: Seconds the head may stand still before the node reads past it without being told.
LOOK_EVERY = 0.5
#: Reads of an announced seq that the answering replica does not hold yet, 10 ms apart.
READ_TRIES = 20


def announce_subject(stream: str, run: str) -> str:
    """The core NATS subject on which one run of a node announces the seqs it stored."""
    return f"stored.{stream}.{run}"


class Conflict(LogUnavailable):
    """Another node recorded a change of this sandbox first: this event was not written."""


def stream_config(settings: NatsSettings) -> api.StreamConfig:
    return api.StreamConfig(
        name=settings.stream,
        subjects=[f"{settings.stream}.>"],
        num_replicas=settings.replicas,
        storage=api.StorageType.FILE,
        retention=api.RetentionPolicy.LIMITS,  # nothing expires: the stream is the audit trail
        allow_direct=True,  # any replica answers history reads
        allow_atomic=True,  # append_many: all or nothing
        deny_delete=True,
        deny_purge=True,
    )


def encode_body(event: Event) -> bytes:
    """The message body: the record of codec.py, seq 0 (the stream gives the real one)."""
    return encode(event)


_BODY_START = b'{"seq":0,'


def stored_record(body: bytes, seq: int) -> bytes:
    """The record readers get of a message body stored at ``seq``: the body with its seq.

    A body this code wrote starts ``{"seq":0,``: the seq is spliced in, with no decoding
    and encoding again (the same bytes ``encode`` makes of the event with that seq).
    """
    if body.startswith(_BODY_START):
        return b'{"seq":%d,' % seq + body[len(_BODY_START) :]
    record = orjson.loads(body)
    record["seq"] = seq
    return orjson.dumps(record)


def decode_message(message: StreamMessage) -> Record:
    """A stored message as the record it is at its seq (raw: the bytes readers get)."""
    try:
        record = orjson.loads(message.data)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"message is not JSON: {exc}") from None
    if type(record) is not dict:
        raise DecodeError("message is not a JSON object")
    record["seq"] = message.seq
    event = event_from_dict(record)
    return Record(event, stored_record(message.data, message.seq))


class _Ticket:
    """One append call: its events, then its result, once folded."""

    __slots__ = ("done", "error", "events", "last_seq", "many", "pendings", "released")

    def __init__(self, pendings: Sequence[PendingEvent], many: bool) -> None:
        self.pendings = pendings
        self.many = many
        self.done = trio.Event()
        self.events: list[Event] = []
        self.error: BaseException | None = None
        self.last_seq = 0
        self.released = False  # its send is over: its subjects and its room are free

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.done.set()

    def __lt__(self, other: _Ticket) -> bool:  # heap order, by seq
        return self.last_seq < other.last_seq


@attrs.define
class _Round:
    """One send of one-event appends, and its retries: what each ack is matched with."""

    tickets: list[_Ticket]
    items: list[tuple[str, bytes, dict[str, str]]]
    ts: str
    todo: list[int]  # indices (into tickets and items) sent in this try
    retry: list[int] = attrs.Factory(list)
    suspect: list[int] = attrs.Factory(list)  # refused conditions, to check (_tell_conflicts)
    last_try: bool = False
    sent_at: float = 0.0


class NatsEventLog:
    """The log on a JetStream stream. Made by ``open_nats_log``."""

    def __init__(
        self,
        nats: Nats,
        settings: NatsSettings,
        *,
        head_seq: int,
        oldest_seq: int,
        on_durable: Callable[[list[Event]], None] | None,
        max_batch: int,
        subscriber_buffer: int,
    ) -> None:
        self.nats = nats
        self.settings = settings
        self.directory = Path(f"nats:{settings.stream}")  # where errors say the log is
        self._stream_last = head_seq  # the stream's last seq when opened: replay's end
        self._head_seq = head_seq  # (as the file log's: what is durable; replay sets it back)
        self._oldest_seq = oldest_seq
        self._on_durable = on_durable
        self._max_batch = max_batch
        self._subscriber_buffer = subscriber_buffer
        self._subscribers: set[Subscription] = set()
        self._queue: list[_Ticket] = []
        self._queued = 0  # events queued or being sent: bounded by _queue_limit
        self._queue_limit = max(DEFAULT_QUEUE_LIMIT, max_batch)
        self._room = trio.lowlevel.ParkingLot()
        self._work = trio.Event()
        self._folded = trio.Event()  # set, and replaced, at each fold
        self._waiting: list[_Ticket] = []  # acknowledged, not folded yet: a heap by seq
        #: Records known stored but not folded yet (a gap before them): by seq; None for a
        #: message that is no event. Bounded by the appends in flight and one page read
        #: past a gap (PAGE_MESSAGES) at a time.
        self._ahead: dict[int, Record | None] = {}
        self._known_last = 0  # the highest seq known stored (acknowledged or delivered)
        self._last_seq_of: dict[str, int] = {}  # subject -> its last seq, as far as known
        self._state = State()  # the store's, from replay on: which ids were ever created
        self._in_flight: set[str] = set()
        #: What this node has sent and not yet heard back about, by message id: a message
        #: of its own read from the stream before its ack came is built from it, not decoded.
        self._sent: dict[str, tuple[Event, bytes]] = {}
        self._folded_bytes = 0
        self._msg_prefix = secrets.token_hex(8)  # this run of this node: message ids unique
        self._announce_on = announce_subject(settings.stream, self._msg_prefix)
        self._look = trio.Event()  # set: read past the head now (another node stored more)
        self._look.set()  # at first: what was stored between the replay's read and now
        self._msg_count = 0
        self._closing = False
        self._writer_done = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.failed_batches = 0
        self.conflicts = 0
        #: Messages read from the stream to fold since start (the others' events: a node's
        #: own come from their acks, unless an ack came later than a read of the stream).
        self.messages_read = 0
        self.on_synced: Callable[[float], None] | None = None

    # -- state, as EventLog's ----------------------------------------------------------

    @property
    def head_seq(self) -> int:
        """The seq of the last event this node has folded."""
        return self._head_seq

    @property
    def oldest_seq(self) -> int:
        return self._oldest_seq

    @property
    def head_position(self) -> tuple[int, int] | None:
        return None  # no segment files: snapshots find their event by seq

    @property
    def segment_count(self) -> int:
        return 0

    @property
    def size_bytes(self) -> int:
        """Bytes of the messages this node has folded since it started (a metric)."""
        return self._folded_bytes

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    @property
    def subscriber_lag(self) -> int:
        return max([0, *(self._head_seq - s.position for s in self._subscribers)])

    # -- appending ---------------------------------------------------------------------

    async def append(self, pending: PendingEvent) -> Event:
        """Append one event; return it once a quorum stored it and this node folded it."""
        return (await self._submit(_Ticket((pending,), many=False)))[0]

    async def append_many(self, pendings: Sequence[PendingEvent]) -> list[Event]:
        """Append events atomically (one atomic batch per ``MAX_ATOMIC`` of them)."""
        if not pendings:
            await trio.lowlevel.checkpoint()
            return []
        events: list[Event] = []
        for i in range(0, len(pendings), MAX_ATOMIC):
            chunk = tuple(pendings[i : i + MAX_ATOMIC])
            events += await self._submit(_Ticket(chunk, many=len(chunk) > 1))
        return events

    async def _submit(self, ticket: _Ticket) -> list[Event]:
        size = len(ticket.pendings)
        # Bounded as the file log's queue (queued and in flight): past the limit, appenders
        # wait for room.
        while self._queued and self._queued + size > self._queue_limit and not self._closing:
            await self._room.park()
        if self._closing:
            await trio.lowlevel.checkpoint()
            raise LogUnavailable("the log is closed")
        self._queued += size
        self._queue.append(ticket)
        self._work.set()
        await ticket.done.wait()  # cancelled: not told; the events may yet be stored
        if ticket.error is not None:
            raise ticket.error
        return ticket.events

    async def _run_writer(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Send what is queued as it comes, several sends in flight at once; once closing,
        send what is still queued, wait for every send, and return."""
        async with trio.open_nursery() as sends:
            task_status.started()
            while True:
                if not self._queue:
                    if self._closing:
                        return
                    self._work = trio.Event()
                    await self._work.wait()
                    continue
                taken: list[_Ticket] = []
                count = 0
                rest: list[_Ticket] = []
                for ticket in self._queue:
                    subjects = {self.settings.subject_of(p.sandbox_id) for p in ticket.pendings}
                    subjects.discard(self.settings.subject_of(None))
                    if count >= self._max_batch or subjects & self._in_flight:
                        rest.append(ticket)  # the next one waits for this one's seq
                        continue
                    self._in_flight |= subjects
                    taken.append(ticket)
                    count += len(ticket.pendings)
                self._queue = rest
                if not taken:
                    # Every queued one waits for a subject in flight: for its send to end.
                    self._work = trio.Event()
                    await self._work.wait()
                    continue
                sends.start_soon(self._send, taken)
                await trio.lowlevel.checkpoint()

    async def _run_writer_until_closed(self) -> None:
        try:
            await self._run_writer()
        finally:
            self._writer_done.set()

    async def _send(self, tickets: list[_Ticket]) -> None:
        singles = [t for t in tickets if not t.many]
        try:
            if singles:
                await self._send_singles(singles)
            for ticket in tickets:
                if ticket.many:
                    await self._send_atomic(ticket)
        finally:
            for ticket in tickets:
                self._release(ticket)

    def _release(self, ticket: _Ticket) -> None:
        """Its subjects are free for the next append to them (its seq is known, or none),
        and its room in the queue for another append."""
        if ticket.released:
            return
        ticket.released = True
        for pending in ticket.pendings:
            self._in_flight.discard(self.settings.subject_of(pending.sandbox_id))
        self._queued -= len(ticket.pendings)
        self._room.unpark_all()
        self._work.set()

    async def _send_singles(self, tickets: list[_Ticket]) -> None:
        """Publish one-event appends together; each is answered as its own ack comes.

        What NATS did not answer (no stream leader for a moment, a connection being
        made again) is sent again, the same message with the same id, until
        ``ack_within`` has passed since the first try. That is safe: each message
        carries a ``Nats-Msg-Id``, and the stream answers a message it already stored
        (within its duplicate window) with the seq it stored it at, instead of storing
        it twice or checking its condition again.
        """
        ts = now_ts()
        deadline = trio.current_time() + self.settings.ack_within
        items: list[tuple[str, bytes, dict[str, str]]] = []
        try:
            for ticket in tickets:
                pending = ticket.pendings[0]
                subject = self.settings.subject_of(pending.sandbox_id)
                event = Event(0, ts, pending.sandbox_id, pending.by, pending.data)
                condition = await self._condition(pending.sandbox_id)
                msg_id = condition[MSG_ID] = self._next_msg_id()
                body = encode_body(event)
                self._sent[msg_id] = (event, body)
                items.append((subject, body, condition))
        except LogUnavailable as exc:
            self._forget(items)
            self._fail_all(tickets, exc)
            return
        try:
            await self._publish_singles(tickets, items, ts, deadline)
        finally:
            self._forget(items)

    def _forget(self, items: list[tuple[str, bytes, dict[str, str]]]) -> None:
        for _, _, headers in items:
            self._sent.pop(headers[MSG_ID], None)

    async def _publish_singles(
        self,
        tickets: list[_Ticket],
        items: list[tuple[str, bytes, dict[str, str]]],
        ts: str,
        deadline: float,
    ) -> None:
        round_ = _Round(tickets, items, ts, list(range(len(tickets))))
        while True:
            round_.retry = []
            round_.last_try = trio.current_time() >= deadline - 0.05
            round_.sent_at = trio.current_time()
            left = deadline - round_.sent_at
            try:
                await self.nats.publish_each(
                    [items[i] for i in round_.todo],
                    max(0.05, min(1.0, left)),
                    functools.partial(self._on_results, round_),
                    announce=self._announce_on,
                )
            except NatsUnavailable as exc:
                unanswered = [
                    i for i in round_.todo if not (tickets[i].last_seq or tickets[i].done.is_set())
                ]
                if round_.last_try:
                    self._fail_all([tickets[i] for i in unanswered], exc)
                    return
                round_.retry = unanswered
            await self._tell_conflicts(round_)
            if not round_.retry:
                return
            round_.todo = sorted(round_.retry)
            await trio.sleep(0.02)  # a leader is being elected, or a connection made

    async def _tell_conflicts(self, round_: _Round) -> None:
        """A refused condition is a conflict only if the subject's last seq is not the one
        expected: the leader also refuses, for a moment, a message of a subject that has
        one not yet applied (nats-server's "wrong last sequence" with no seq), which this
        node's previous append of that sandbox, acknowledged, may be. Those go again."""
        for i in round_.suspect:
            ticket, (subject, _, headers) = round_.tickets[i], round_.items[i]
            try:
                last = await self.nats.last_on_subject(self.settings.stream, subject)
            except NatsUnavailable:
                last = None
            expected = headers[EXPECTED_LAST_SUBJECT_SEQ]
            if not round_.last_try and last is not None and str(last) == expected:
                round_.retry.append(i)
                continue
            self._refused(ticket, subject, WrongLastSequence("wrong last sequence"))
            self._release(ticket)
        round_.suspect = []

    def _on_results(self, round_: _Round, results: list[tuple[int, int | BaseException]]) -> None:
        """The acks (or errors) of messages of this try, as soon as they come; what they
        make foldable is folded once for the lot."""
        for j, result in results:
            self._on_result(round_, j, result)
        self._advance()

    def _on_result(self, round_: _Round, j: int, result: int | BaseException) -> None:
        i = round_.todo[j]
        ticket, (subject, _, _) = round_.tickets[i], round_.items[i]
        if isinstance(result, int):
            pending = ticket.pendings[0]
            ticket.events = [Event(result, round_.ts, pending.sandbox_id, pending.by, pending.data)]
            self._acknowledged(ticket, {subject: result}, result, [round_.items[i][1]])
            if self.on_synced is not None:
                self.on_synced(trio.current_time() - round_.sent_at)
        elif isinstance(result, NatsUnavailable) and not round_.last_try:
            round_.retry.append(i)
            return
        elif (
            isinstance(result, WrongLastSequence)
            and EXPECTED_LAST_SUBJECT_SEQ in (round_.items[i][2])
        ):
            round_.suspect.append(i)  # told once the stream's last seq is known
            return
        else:
            self._refused(ticket, subject, result)
        self._release(ticket)

    def _next_msg_id(self) -> str:
        self._msg_count += 1
        return f"{self._msg_prefix}-{self._msg_count}"

    async def _send_atomic(self, ticket: _Ticket) -> None:
        ts = now_ts()
        items = []
        seen: set[str] = set()
        try:
            for pending in ticket.pendings:
                subject = self.settings.subject_of(pending.sandbox_id)
                event = Event(0, ts, pending.sandbox_id, pending.by, pending.data)
                # The first event of a subject carries its condition; the batch is atomic,
                # so the later ones of that subject need none.
                condition = {} if subject in seen else await self._condition(pending.sandbox_id)
                seen.add(subject)
                items.append((subject, encode_body(event), condition))
            last = await self.nats.publish_atomic(
                items, answer_within=self.settings.ack_within, announce=self._announce_on
            )
        except Exception as exc:
            self._refused(ticket, None, exc)
            return
        first = last - len(items) + 1
        ticket.events = [
            Event(first + i, ts, p.sandbox_id, p.by, p.data) for i, p in enumerate(ticket.pendings)
        ]
        lasts = {subject: first + i for i, (subject, _, _) in enumerate(items)}
        self._acknowledged(ticket, lasts, last, [body for _, body, _ in items])
        self._advance()

    async def _condition(self, sandbox_id: str | None) -> dict[str, str]:
        """The header that makes an append conditional on its subject's last seq."""
        if sandbox_id is None:
            return {}  # the daemon's own events: nodes do not contend for them
        subject = self.settings.subject_of(sandbox_id)
        last = self._last_seq_of.get(subject)
        if last is None and sandbox_id not in self._state.owners:
            last = 0  # never created as far as this node has folded: none before it
        if last is None:
            # Its last event is older than this node's snapshot: ask the stream.
            deadline = trio.current_time() + self.settings.ack_within
            while True:
                try:
                    found = await self.nats.last_on_subject(self.settings.stream, subject)
                    break
                except NatsUnavailable:
                    if trio.current_time() >= deadline:
                        raise
                    await trio.sleep(0.02)  # a leader is being elected, or a connection made
            last = self._last_seq_of.setdefault(subject, found)
        return {EXPECTED_LAST_SUBJECT_SEQ: str(last)}

    def _acknowledged(
        self, ticket: _Ticket, lasts: dict[str, int], last_seq: int, bodies: list[bytes]
    ) -> None:
        for subject, seq in lasts.items():
            if seq > self._last_seq_of.get(subject, 0):
                self._last_seq_of[subject] = seq
        self._known_last = max(self._known_last, last_seq)
        ticket.last_seq = last_seq
        if last_seq <= self._head_seq:
            ticket.done.set()
            return
        heapq.heappush(self._waiting, ticket)
        # This node knows these events now, without reading them from the stream (the
        # bytes are those decode_message makes of the stored body).
        for event, body in zip(ticket.events, bodies, strict=True):
            if event.seq > self._head_seq and event.seq not in self._ahead:
                self._ahead[event.seq] = Record(event, stored_record(body, event.seq))

    def _refused(self, ticket: _Ticket, subject: str | None, error: BaseException) -> None:
        if isinstance(error, WrongLastSequence):
            self.conflicts += 1
            if subject is not None:
                self._last_seq_of.pop(subject, None)  # ask the stream again next time
            else:
                for pending in ticket.pendings:
                    self._last_seq_of.pop(self.settings.subject_of(pending.sandbox_id), None)
            ids = sorted({p.sandbox_id for p in ticket.pendings if p.sandbox_id})
            ticket.fail(
                Conflict(
                    f"another node recorded a change of sandbox {', '.join(ids)} first;"
                    " this one was not recorded"
                )
            )
            return
        self._fail_all([ticket], error)

    def _fail_all(self, tickets: list[_Ticket], error: BaseException) -> None:
        self.failed_batches += 1
        if not isinstance(error, LogUnavailable | NatsUnavailable):
            logger.error("the JetStream log could not append: %r", error)
        message = f"the log could not append: {error}"
        for ticket in tickets:
            ticket.fail(LogUnavailable(message))

    # -- folding ---------------------------------------------------------------------------

    async def replay(self, state: State, after_seq: int) -> tuple[int, str | None]:
        """Fold into ``state`` every event after ``after_seq`` up to the stream's end as it
        was opened, then follow the stream from there: ``on_durable`` gets the rest."""
        self._state = state
        self._head_seq = after_seq
        self._known_last = max(self._stream_last, after_seq)
        count = 0
        last_ts = None
        while self._head_seq < self._stream_last:
            records = await self.read_history(self._head_seq, self._stream_last)
            for record in records:
                event = record.event
                try:
                    apply(state, event)
                except ProjectionError as exc:
                    raise CorruptLog(self.directory, event.seq, event.seq, str(exc)) from None
                self._note(event, record)
                count += 1
                last_ts = event.ts
            self._head_seq = records[-1].event.seq
        assert self._nursery is not None
        await self._nursery.start(self._follow)
        return count, last_ts

    def _note(self, event: Event, record: Record) -> None:
        subject = self.settings.subject_of(event.sandbox_id)
        if event.seq > self._last_seq_of.get(subject, 0):
            self._last_seq_of[subject] = event.seq
        self._folded_bytes += len(record.raw)

    async def _follow(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Hear what the other nodes announce they stored, and read what this node lacks."""
        stream = self.settings.stream
        async with self.nats.announcements(
            announce_subject(stream, "*"), self._announce_on, self._heard
        ):
            task_status.started()
            await self._read_what_is_missing()

    def _heard(self, seq: int) -> None:
        """Another node announced that the stream holds ``seq`` (and what comes before)."""
        self._known_last = max(self._known_last, seq)
        self._look.set()

    async def _read_what_is_missing(self) -> None:
        """Read from the stream, with batched direct gets, what this node has folded no
        ack of: at once once another node announced it; otherwise when the head has not
        moved for ``LOOK_EVERY`` s (an ack that never came, an announcement lost, a
        writer that announces nothing). A busy node whose head moves reads nothing."""
        while True:
            head = self._head_seq
            with trio.move_on_after(LOOK_EVERY):
                await self._look.wait()
            heard, self._look = self._look.is_set(), trio.Event()
            if heard or self._head_seq == head:
                try:
                    await self._read_past_head()
                except NatsUnavailable as exc:
                    # Said when something is known missing; a look on the off chance (a
                    # stream being elected a leader, say) is tried again quietly.
                    missing = self._known_last > self._head_seq
                    logger.log(
                        logging.WARNING if missing else logging.DEBUG,
                        "cannot read the stream to catch up: %s",
                        exc,
                    )

    async def _read_past_head(self) -> None:
        """Read the gaps after the head, up to the highest seq known stored, a page at a
        time (the seqs put aside are not read again); past it, whatever the stream holds."""
        tries = 0
        while True:
            first = self._head_seq + 1
            last = first
            while (
                last < self._known_last
                and last + 1 not in self._ahead
                and last - first + 1 < PAGE_MESSAGES
            ):
                last += 1
            count = last - first + 1 if self._known_last >= first else PAGE_MESSAGES
            messages = await self.nats.direct_batch(self.settings.stream, first, count, READ_BYTES)
            if messages:
                tries = 0
                self.messages_read += len(messages)
                self._delivered(messages)
                if self._head_seq < self._known_last or len(messages) == count:
                    continue  # more gaps, or a full page: there may be more
                return
            if self._known_last < first or tries == READ_TRIES:
                return  # nothing past the head; or the next look tries again
            tries += 1
            await trio.sleep(0.01)  # the replica that answered is behind the quorum

    def _delivered(self, messages: list[StreamMessage]) -> None:
        """Messages read from the stream (``_read_past_head``'s), on the trio thread: put
        aside by seq, then fold what comes next."""
        self._known_last = max(self._known_last, messages[-1].seq)
        head, ahead = self._head_seq, self._ahead
        for message in messages:
            seq = message.seq
            if seq <= head or seq in ahead:
                continue
            sent = self._sent.get(message.msg_id) if message.msg_id is not None else None
            if sent is not None:  # this node's own, its ack not come yet: no decoding
                event, body = sent
                ahead[seq] = Record(
                    Event(seq, event.ts, event.sandbox_id, event.by, event.data),
                    stored_record(body, seq),
                )
                continue
            try:
                ahead[seq] = decode_message(message)
            except DecodeError as exc:
                # Not an event of this code on the stream's subjects: skipped, said once.
                logger.error("seq %d of stream %s: %s", message.seq, self.settings.stream, exc)
                ahead[message.seq] = None
        self._advance()

    def _advance(self) -> None:
        """Fold every record put aside that comes next, in seq order: from this node's own
        acknowledgements, or read from the stream, whichever came first. A gap waits (for
        an ack, else ``_read_what_is_missing``)."""
        ahead = self._ahead
        seq = first_seq = self._head_seq + 1
        if seq not in ahead:
            return
        records: list[Record] = []
        while seq in ahead:
            record = ahead.pop(seq)
            if record is not None:
                self._note(record.event, record)
                records.append(record)
            seq += 1
        self._head_seq = seq - 1
        if records and self._on_durable is not None:
            try:
                self._on_durable([r.event for r in records])
            except Exception:
                logger.exception("on_durable failed for seqs up to %d", self._head_seq)
        if self._subscribers:
            batch = LiveBatch(first_seq, self._head_seq, records)  # one for all of them
            for subscriber in self._subscribers:
                subscriber.publish(batch)
        while self._waiting and self._waiting[0].last_seq <= self._head_seq:
            heapq.heappop(self._waiting).done.set()
        self._folded.set()
        self._folded = trio.Event()

    # -- reading ---------------------------------------------------------------------------

    async def read_history(
        self, after_seq: int, until_seq: int, max_bytes: int = READ_BYTES
    ) -> list[Record]:
        """Some stored records from ``after_seq + 1`` on, none past ``until_seq``; at least
        one when ``after_seq < until_seq`` and the stream holds it."""
        if after_seq + 1 < self._oldest_seq:
            await trio.lowlevel.checkpoint()
            raise Gone(self._oldest_seq)
        until_seq = min(until_seq, max(self._head_seq, self._stream_last))
        if after_seq >= until_seq:
            await trio.lowlevel.checkpoint()
            return []
        count = min(until_seq - after_seq, PAGE_MESSAGES)
        with trio.move_on_after(self.settings.ack_within):
            while True:
                try:
                    messages = await self.nats.direct_batch(
                        self.settings.stream, after_seq + 1, count, max_bytes
                    )
                except NatsUnavailable as exc:
                    raise LogUnavailable(f"the log cannot be read now: {exc}") from None
                if messages:
                    break
                # The replica that answered is behind the quorum: ask again (another may).
                await trio.sleep(0.01)
            records = []
            for message in messages:
                if message.seq > until_seq:
                    break
                try:
                    records.append(decode_message(message))
                except DecodeError as exc:
                    raise CorruptLog(self.directory, message.seq, message.seq, str(exc)) from None
            return records
        raise LogUnavailable(f"seq {after_seq + 1} of the stream could not be read in time")

    async def read_selected(
        self,
        after_seq: int,
        until_seq: int,
        selection: Selection,
        max_bytes: int = READ_BYTES,
    ) -> Page:
        """As ``EventLog.read_selected``: the records after ``after_seq`` (none past
        ``until_seq``) of the selection's sandboxes and types. The stream has no index of
        this log's: one history read, filtered here; ``next_after_seq`` is the last seq
        looked at."""
        records = await self.read_history(after_seq, until_seq, max_bytes)
        if not records:
            return Page([], after_seq)
        ids, types = selection.sandbox_ids, selection.types
        chosen = [
            r
            for r in records
            if (ids is None or r.event.sandbox_id in ids)
            and (types is None or r.event.data.TYPE in types)
        ]
        return Page(chosen, records[-1].event.seq)

    async def read_page(
        self,
        after_seq: int,
        *,
        limit: int = 1000,
        event_filter: Filter = None,
        max_scan: int = 100_000,
    ) -> Page:
        """As ``EventLog.read_page``: up to ``limit`` matching records, scanning at most
        about ``max_scan``; ``next_after_seq`` says where to read on."""
        if limit < 1:
            raise ValueError("limit must be at least 1")
        matches = matcher(event_filter)
        found: list[Record] = []
        position = after_seq
        scanned = 0
        head = self._head_seq
        while position < head and scanned < max_scan:
            for record in await self.read_history(position, head):
                position = record.event.seq
                scanned += 1
                if matches(record.event):
                    found.append(record)
                    if len(found) == limit:
                        return Page(found, position)
        await trio.lowlevel.checkpoint()
        return Page(found, position)

    async def read(
        self, after_seq: int, limit: int = 1000, event_filter: Filter = None
    ) -> list[Event]:
        found: list[Event] = []
        position = after_seq
        while len(found) < limit and position < self._head_seq:
            page = await self.read_page(
                position, limit=limit - len(found), event_filter=event_filter
            )
            found += [r.event for r in page.records]
            position = page.next_after_seq
        return found

    async def event_at(self, seq: int) -> Event | None:
        if not self._oldest_seq <= seq <= max(self._head_seq, self._stream_last):
            await trio.lowlevel.checkpoint()
            return None
        history = await self.read_history(seq - 1, seq)
        return history[0].event if history and history[0].event.seq == seq else None

    async def check_position(self, seq: int, first_seq: int, offset: int) -> Event | None:
        await trio.lowlevel.checkpoint()
        return None  # positions are the file log's; snapshots here are found by seq

    def subscribe(
        self,
        after_seq: int | None,
        event_filter: Filter = None,
        *,
        buffer: int | None = None,
        page_bytes: int = READ_BYTES,
        gate: trio.CapacityLimiter | None = None,
    ) -> Subscription:
        """As ``EventLog.subscribe``: every matching event after ``after_seq``, once, in order."""
        if self._closing:
            raise LogUnavailable("the log is closed")
        start = self._head_seq if after_seq is None else after_seq
        if start < 0:
            raise ValueError("after_seq must not be negative")
        if start + 1 < self._oldest_seq:
            raise Gone(self._oldest_seq)
        limit = self._subscriber_buffer if buffer is None else buffer
        subscription = Subscription(
            self, start, event_filter, limit, page_bytes=page_bytes, gate=gate
        )
        self._subscribers.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)

    async def remove_segments_through(self, seq: int) -> int:
        raise NotImplementedError("the stream is shared: retention is the stream's own limits")

    async def _close(self) -> None:
        """Take no more appends; let the writer send what is queued; answer every append
        a quorum acknowledged (folded by now, or at least durable); end subscriptions."""
        self._closing = True
        self._work.set()
        self._room.unpark_all()
        with trio.move_on_after(self.settings.ack_within + 1):
            await self._writer_done.wait()
        with trio.move_on_after(1.0):
            while self._waiting:
                await self._folded.wait()
        for ticket in self._waiting:
            ticket.done.set()
        self._waiting.clear()
        for ticket in self._queue:
            ticket.fail(LogUnavailable("the log is closed"))
        self._queue.clear()
        for subscriber in list(self._subscribers):
            subscriber.end()
        self._subscribers.clear()


def _check_stream(settings: NatsSettings, info: Any) -> None:
    """A stream made before (by another tool, or another version) must fit this log."""
    config = info.config
    wanted = f"{settings.stream}.>"
    problems = []
    if wanted not in (config.subjects or []):
        problems.append(f"its subjects are {config.subjects}, not [{wanted!r}]")
    if not config.allow_direct:
        problems.append("it does not allow direct gets (allow_direct)")
    if not config.allow_atomic:
        problems.append("it does not allow atomic batches (allow_atomic)")
    if problems:
        raise LogUnavailable(
            f"the NATS stream {settings.stream} cannot hold this log: {'; '.join(problems)};"
            " name another log.nats.stream, or let sandboxd make it"
        )


@asynccontextmanager
async def open_nats_log(
    settings: NatsSettings,
    *,
    on_durable: Callable[[list[Event]], None] | None = None,
    max_batch: int = 4096,
    subscriber_buffer: int = 8192,
    name: str = "sandboxd",
) -> AsyncIterator[NatsEventLog]:
    """Connect, make the stream if it is not there, and run the writer until exit.

    Raises ``NatsUnavailable`` naming the servers if none answers. The caller
    calls ``replay`` once (the store does, from its snapshot's seq): that is
    when the log starts to follow the stream.
    """
    try:
        async with connect(settings.servers, credentials=settings.credentials, name=name) as nats:
            info = await patiently(
                functools.partial(nats.ensure_stream, stream_config(settings)),
                within=STREAM_WITHIN,
                what=f"the stream {settings.stream} could not be found or made",
            )
            _check_stream(settings, info)
            state: Any = info.state
            log = NatsEventLog(
                nats,
                settings,
                head_seq=int(state.last_seq),
                oldest_seq=max(1, int(state.first_seq)) if state.messages else 1,
                on_durable=on_durable,
                max_batch=max_batch,
                subscriber_buffer=subscriber_buffer,
            )
            async with trio.open_nursery() as nursery:
                log._nursery = nursery
                nursery.start_soon(log._run_writer_until_closed)
                try:
                    yield log
                finally:
                    with trio.CancelScope(shield=True):
                        await log._close()
                    nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise only_exception(group) from None
