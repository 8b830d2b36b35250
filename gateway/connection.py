"""One websocket connection: its reader, its writer, its keepalive, its subscriptions' pumps.

The tasks of a connection share one nursery, in the manner of hypercorn's
trio worker:

- the reader reads frames (``ServerWebSocket.get_message``: the socket is
  read only when asked), parses them (protocol/, no I/O), answers there and
  then a request that ``answer_now`` can answer without a wait (a read of the
  projection, such as sandbox.get: no task, no trip through the scheduler,
  where under fan-out it would wait behind a slice of deliveries), and starts
  a task for any other, which the ``answer`` given to the connection turns
  into a reply frame;
- a frame with nothing queued nor unwritten before it goes to the socket from
  the task that made it (one ``write(2)``, no task switch: websocket.py);
  else it waits in one queue bounded in frames and in bytes (budget.py), so a
  client that stops reading holds at most that queue, and the writer, the
  only task that waits on the socket, writes it; a connection that stays
  unwritable for ``send_timeout`` is closed. The queue has two lanes, and the
  writer takes replies ahead of subscription frames: a request is answered
  first however many events wait (an unsubscribe's reply goes in the
  subscriptions' lane, after the frames of the subscription it ends);
- the keepalive pings a connection that has said nothing for
  ``ping_interval`` and closes it if no pong comes within ``ping_timeout``;
- each subscription's pump pulls from the log's subscription and pushes into
  that same queue; while it is full the pump simply stops pulling, and the
  log serves it from disk when it comes back, so a slow reader slows no one
  else. It takes every record at hand at once (``next_batch``); a
  subscription made with ``"batch": true`` gets them in one frame (the
  stored bytes joined). Such a pump, once live and not following named
  sandboxes, parks in the gateway's ``FanOut`` (fanout.py): that one task
  sends its frames from then on, at most one every ``BATCH_PACE`` while
  events keep coming (a live firehose costs a few frames a second per
  subscriber, not one per event, and no task switch each); a pump that found
  nothing waits there out of the rounds, and the next event published to it
  puts it first in line, so that the first event after a lull goes out at
  once; and it wakes the pump for history, the read gate, or the end;
- each output follow's pump (sandbox.logs with follow) pushes a sandbox's
  output file into the subscriptions' lane: the file is its buffer, it holds
  one chunk at most, and it ends (an ``ended`` frame with the reason) once
  the output's rotation drops bytes it had not sent yet.

What the ops use of a connection is its public API: ``user``, ``name``,
``subscription_count``, ``open_subscription``, ``open_output_follow``,
``close_subscription`` and ``read_slots``, the tokens a request or a subscription holds while it has
history or output in hand (so the subscriptions and reads of a client that
does not read hold READ_SLOTS pages between them, not one each).
Every failure is caught where it happens: an exception escaping one
connection would take the listener and every other connection down with it.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from typing import Final

import attrs
import trio

from sandboxd.actors.output_follow import OutputEnded, OutputFollow
from sandboxd.events.errors import CorruptLog, Gone, LogUnavailable
from sandboxd.events.segments import Record
from sandboxd.events.subscriptions import CaughtUp, Subscription
from sandboxd.gateway import errors
from sandboxd.gateway import protocol as p
from sandboxd.gateway.auth import User
from sandboxd.gateway.budget import ByteBudget
from sandboxd.gateway.fanout import PACE, FanOut, Stir, Turn
from sandboxd.gateway.metrics import INVALID_OP
from sandboxd.gateway.websocket import Closed, ServerWebSocket

log = logging.getLogger(__name__)

#: Frames the writer's queue holds, and the bytes they may take together (one frame
#: bigger than that goes alone); a full queue makes subscriptions stop pulling.
SEND_QUEUE_FRAMES: Final = 256
SEND_QUEUE_BYTES: Final = 1 << 20
#: A batch subscription that sent fewer than BATCH_RECORDS events (it is live, not
#: catching up) waits this long before it takes the next, so that events gather
#: into its next frame (fanout.py): measured in bench/gateway.py, docs/performance.md.
BATCH_PACE: Final = PACE
#: Records a pump takes at once, and the stored bytes of one batch frame at most.
BATCH_RECORDS: Final = 1024
BATCH_BYTES: Final = 256 << 10
#: The writer's lanes: replies go ahead of subscription frames.
REPLIES: Final = 0
SUBSCRIPTIONS: Final = 1
#: Requests and subscriptions of one connection that may have history or output in
#: hand at once: each holds at most a page of the log (events.log.READ_BYTES of
#: stored records, about three times that decoded) or one reply.
READ_SLOTS: Final = 2

#: Run once the reply a request's answer made is queued, or given up on (a subscription's
#: pump starts then, so that no frame of it comes before the reply that names it; a read
#: gives back its read slot, having held it until its reply counted against the budget).
Then = Callable[[], None] | None
#: Turns one request of a connection into the frame of its reply; never raises.
#: The reply frame to a request, its code ("ok" or the error's), and what to run once queued.
Answer = Callable[["Connection", p.Request], Awaitable[tuple[str, str, Then]]]
#: The reply frame and code to a request answered without a wait, by the reader itself;
#: None: the request goes to ``Answer`` in a task of its own. Never raises.
AnswerNow = Callable[["Connection", p.Request], tuple[str, str] | None]
#: Told of every reply, by op ("invalid" for a frame that is no request) and code: the metrics.
CountReply = Callable[[str, str], None]


def _count_nothing(op: str, code: str) -> None:
    pass


@attrs.define
class Timeouts:
    """Seconds a connection waits for its peer; read at each use, so a test may shorten them."""

    #: Silence from a client before it is pinged, and how long the ping waits for its pong.
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    #: How long one frame may wait to be written before the connection is closed.
    send_timeout: float = 30.0
    #: How long the peer has to answer the closing handshake.
    close: float = 5.0
    #: How long shut_down gives the `ended` frames to reach the client.
    farewell: float = 2.0


class Requests:
    """The requests in flight on every connection, counted so that a drain can wait for them."""

    def __init__(self) -> None:
        #: Set by the drain: new requests get `unavailable` from then on.
        self.refusing = False
        self.in_flight = 0
        self._idle = trio.Event()
        self._idle.set()

    def begin(self) -> None:
        self.in_flight += 1
        if self._idle.is_set():
            self._idle = trio.Event()

    def end(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()


class _GoingAway:
    """Queued after the last frame of a connection that shut_down closes."""


_Item = tuple["str | _GoingAway", int]


class _Lanes:
    """The writer's queue: two lanes of at most ``limit`` frames each, replies first.

    ``put_nowait`` and ``put`` say False once the writer is gone (``close``):
    nothing more can be said on the connection then.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._lanes: tuple[deque[_Item], deque[_Item]] = (deque(), deque())
        self._room = (trio.lowlevel.ParkingLot(), trio.lowlevel.ParkingLot())
        self._filled = trio.lowlevel.ParkingLot()
        self._poked = False
        self.closed = False

    @property
    def empty(self) -> bool:
        return not self._lanes[0] and not self._lanes[1]

    def poke(self) -> None:
        """Wake the writer with nothing queued: ``get`` returns None (bytes wait to be flushed)."""
        self._poked = True
        self._filled.unpark()

    def put_nowait(self, lane: int, item: _Item) -> bool:
        """Queue ``item`` if its lane has room; raises WouldBlock if it has not."""
        if self.closed:
            return False
        queue = self._lanes[lane]
        if len(queue) >= self._limit:
            raise trio.WouldBlock
        queue.append(item)
        self._filled.unpark()
        return True

    async def put(self, lane: int, item: _Item) -> bool:
        while True:
            try:
                return self.put_nowait(lane, item)
            except trio.WouldBlock:
                await self._room[lane].park()

    async def get(self) -> _Item | None:
        """The next frame: a reply if one waits, else a subscription's; None if poked."""
        while True:
            if self._poked:
                self._poked = False
                return None
            for lane, queue in enumerate(self._lanes):
                if queue:
                    self._room[lane].unpark()
                    return queue.popleft()
            await self._filled.park()

    def close(self) -> list[_Item]:
        """The writer is gone: what was queued is dropped (and returned, to give back)."""
        self.closed = True
        left = [*self._lanes[0], *self._lanes[1]]
        for queue, room in zip(self._lanes, self._room, strict=True):
            queue.clear()
            room.unpark_all()
        return left


@attrs.define(eq=False)
class _Pump:
    """A subscription of this connection: the log's, and the task that forwards it."""

    id: str
    subscription: Subscription
    #: The last seq delivered or passed over: where `ended` tells the client to resume.
    last_seq: int
    #: Several events to a frame (the client asked with "batch": true).
    batch: bool = False
    #: Its group in the fan-out, if paced (see fanout.py).
    group: int = 0

    @property
    def paced(self) -> bool:
        """Whether the pump waits between small batches: a batch subscription that does
        not name its sandboxes (one that does gets their events alone, a few a second:
        waiting would only delay them)."""
        selection = self.subscription.selection
        return self.batch and (selection is None or selection.sandbox_ids is None)

    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    done: trio.Event = attrs.Factory(trio.Event)
    #: A batch frame's bytes before and after its events (made once, not per frame).
    frame_ends: tuple[bytes, bytes] = attrs.field(init=False)

    @frame_ends.default
    def _frame_ends(self) -> tuple[bytes, bytes]:
        head, _, tail = p.events_frame_parts(self.id, [])
        return head, tail


@attrs.define
class _OutputPump:
    """An output follow of this connection: the follower, and the task that forwards it."""

    id: str
    follow: OutputFollow
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    done: trio.Event = attrs.Factory(trio.Event)


class Connection:
    """One client's websocket, from the accepted handshake until it closes."""

    def __init__(
        self,
        ws: ServerWebSocket,
        user: User,
        name: str,
        *,
        answer: Answer,
        requests: Requests,
        timeouts: Timeouts,
        count_reply: CountReply = _count_nothing,
        fanout: FanOut | None = None,
        answer_now: AnswerNow | None = None,
    ) -> None:
        self.ws = ws
        self.user = user
        self.name = name
        self._answer = answer
        self._answer_now = answer_now
        self._count_reply = count_reply
        self._requests = requests
        self._timeouts = timeouts
        self._fanout = fanout
        self._lanes = _Lanes(SEND_QUEUE_FRAMES)
        # What the socket did not take at once: the writer writes it.
        ws.on_backlog = self._lanes.poke
        #: The bytes of the frames queued and not yet written.
        self.budget = ByteBudget(SEND_QUEUE_BYTES)
        self.read_slots = trio.CapacityLimiter(READ_SLOTS)
        self._in_flight = 0
        #: Subscriptions of either kind, by id: one namespace, one limit, one unsubscribe.
        self._pumps: dict[str, _Pump | _OutputPump] = {}
        self._pump_ids = itertools.count(1)
        self._last_heard = trio.current_time()
        self._nursery: trio.Nursery | None = None
        self._closed = trio.Event()

    # -- what the ops use ---------------------------------------------------------------

    @property
    def subscription_count(self) -> int:
        return len(self._pumps)

    def open_subscription(
        self, subscription: Subscription, *, batch: bool = False
    ) -> tuple[str, Callable[[], None]]:
        """Take the log's ``subscription`` on: its id here, and what starts its pump.

        Start the pump once the reply naming the id is queued; until then the
        subscription only holds its place (the connection closes it if it ends first).
        With ``batch``, its events go several to a frame.
        """
        group = 0 if self._fanout is None else self._fanout.group()
        pump = _Pump(f"s{next(self._pump_ids)}", subscription, subscription.position, batch, group)
        self._pumps[pump.id] = pump

        def start() -> None:
            assert self._nursery is not None
            self._nursery.start_soon(self._forward, pump)

        return pump.id, start

    def open_output_follow(self, follow: OutputFollow) -> tuple[str, Callable[[], None]]:
        """Take an output ``follow`` on, as ``open_subscription`` takes a log's subscription."""
        pump = _OutputPump(f"s{next(self._pump_ids)}", follow)
        self._pumps[pump.id] = pump

        def start() -> None:
            assert self._nursery is not None
            self._nursery.start_soon(self._forward_output, pump)

        return pump.id, start

    async def close_subscription(self, sub_id: str) -> bool:
        """End a subscription; once this returns no frame of it follows. False: no such id."""
        pump = self._pumps.get(sub_id)
        if pump is None:
            return False
        pump.scope.cancel()
        await pump.done.wait()
        return True

    # -- running ------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until it closes."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._writer)
                nursery.start_soon(self._keepalive)
                await self._reader()
                nursery.cancel_scope.cancel()
        finally:
            self._closed.set()
            # A subscription whose pump never started (the connection went first)
            # must not stay registered with the log.
            with trio.CancelScope(shield=True):
                for pump in list(self._pumps.values()):
                    if isinstance(pump, _OutputPump):
                        pump.follow.close()
                    else:
                        await pump.subscription.aclose()

    async def shut_down(self) -> None:
        """The daemon stops: `ended` (reason "shutdown") for each subscription, then 1001."""
        try:
            pumps = list(self._pumps.values())
            for pump in pumps:
                pump.scope.cancel()
            with trio.move_on_after(self._timeouts.farewell):
                for pump in pumps:
                    await pump.done.wait()
                    if isinstance(pump, _OutputPump):
                        ended = p.encode_output_ended(pump.id, "shutdown")
                    else:
                        ended = p.encode_ended(pump.id, "shutdown", pump.last_seq)
                    await self._queue(ended, SUBSCRIPTIONS)
                await self._queue(_GoingAway(), SUBSCRIPTIONS)
                await self._closed.wait()
            # A client too slow to take its farewell in time is closed all the same.
            await self._close(p.CLOSE_GOING_AWAY, "sandboxd is shutting down")
        except Exception:
            log.exception("%s: closing failed", self.name)

    async def _close(self, code: int, reason: str) -> None:
        """Close the websocket and end every task of this connection."""
        # Bounded: the peer of a slow connection may never send its close frame
        # back; aclose then closes the stream on its way out of the cancel.
        with trio.move_on_after(self._timeouts.close):
            await self.ws.aclose(code, reason)
        self._closed.set()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    # -- reading ------------------------------------------------------------------------

    async def _reader(self) -> None:
        while True:
            try:
                message = await self.ws.get_message()
            except Closed:
                return
            self._last_heard = trio.current_time()
            if isinstance(message, bytes):
                await self._close(p.CLOSE_UNSUPPORTED, "binary frames are not accepted")
                return
            # The contract counts bytes; the websocket closes with 1009 already on a
            # message over its limit (websocket.py), this holds if that limit is raised.
            if len(message) > p.MAX_FRAME_BYTES // 4 and _utf8_len(message) > p.MAX_FRAME_BYTES:
                await self._close(p.CLOSE_TOO_BIG, "frames must be at most 1 MiB")
                return
            await self._receive(message)

    async def _receive(self, message: str) -> None:
        try:
            request = p.parse_request(message)
        except p.RequestError as bad:
            # Not the op the frame names: a client must not choose the metrics' labels.
            self._count_reply(INVALID_OP, bad.code)
            await self._queue(p.encode_error(bad.request_id, bad), REPLIES)
            return
        refusal = None
        if self._requests.refusing:
            refusal = errors.shutting_down()
        elif self._in_flight >= p.MAX_IN_FLIGHT:
            refusal = errors.busy()
        if refusal is not None:
            self._count_reply(request.op, refusal.code)
            await self._queue(p.encode_error(request.id, refusal), REPLIES)
            return
        answered = None if self._answer_now is None else self._answer_now(self, request)
        if answered is not None:
            # An op that never waits (a read of the projection): answered here, its reply
            # written in this step if nothing is queued before it, without a task of its
            # own and the trip through the scheduler that starting one takes. Then one
            # yield, so that a read full of such requests does not hold the loop.
            frame, code = answered
            self._count_reply(request.op, code)
            if self._nothing_before:
                self._write_now(frame)
                await trio.lowlevel.checkpoint()
            else:
                await self._queue(frame, REPLIES)
            return
        self._in_flight += 1
        self._requests.begin()
        assert self._nursery is not None
        self._nursery.start_soon(self._serve, request)

    async def _serve(self, request: p.Request) -> None:
        served = False
        try:
            frame, code, then = await self._answer(self, request)
            self._count_reply(request.op, code)
            # An unsubscribe's reply must come after the frames of what it ended.
            lane = SUBSCRIPTIONS if isinstance(request.params, p.EventsUnsubscribe) else REPLIES
            if lane == REPLIES and self._nothing_before:
                # Requests first: nothing queued nor unwritten, so the reply goes to the
                # socket in this very step, not after a trip through the scheduler (each
                # trip waits behind every task ready before it: under fan-out, a slice of
                # deliveries, the actors, the log's writer; bench/gateway.py measured the
                # gets' time there). The request stops counting as in flight in the same
                # step, before its client can have the reply (else its next would be
                # told `busy`).
                served = True
                self._end_request()
                self._write_now(frame)
                if then is not None:
                    then()
                return
            try:
                await self._queue(frame, lane)
            finally:
                if then is not None:
                    then()
        except Exception:
            log.exception("%s: the reply to %s failed", self.name, request.op)
        finally:
            if not served:
                self._end_request()

    def _end_request(self) -> None:
        self._in_flight -= 1
        self._requests.end()

    # -- writing ------------------------------------------------------------------------

    @property
    def _nothing_before(self) -> bool:
        """Nothing queued nor unwritten: a frame may go to the socket from this task, now."""
        return self._lanes.empty and self.ws.idle

    def _write_now(self, frame: str) -> None:
        """Write ``frame`` from this task, where ``_nothing_before`` holds (none once closed)."""
        if not self._lanes.closed:
            # A closed websocket: the reader and the writer find out.
            with contextlib.suppress(Closed):
                self.ws.write_message(frame)

    async def _queue(self, frame: str | _GoingAway, lane: int) -> None:
        # What a frame holds is its size in memory, which for a str of wide characters
        # is more than its length.
        size = 0 if isinstance(frame, _GoingAway) else sys.getsizeof(frame)
        # As a memory channel's send: the frame is committed at the first check for
        # cancellation, and the task yields once. A pump woken with an event sends it
        # even if a shutdown beside it cuts the pump off right after.
        await trio.lowlevel.checkpoint_if_cancelled()
        if not isinstance(frame, _GoingAway) and self._nothing_before:
            # The frame goes to the socket from this task (ServerWebSocket.write), with no
            # task switch; what the socket does not take the writer writes. It is written
            # after this task's schedule point, not before: a request counts as in flight
            # until its task has returned, so its client must not have the reply before
            # (it would be told `busy`).
            await trio.lowlevel.cancel_shielded_checkpoint()
            if self._nothing_before:
                self._write_now(frame)
                return
            if self._put_nowait(frame, size, lane):
                return
        elif self._put_nowait(frame, size, lane):
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        # Full: the client is not reading, so we stop reading it too, which pushes
        # back on it through TCP.
        await self.budget.take(size)
        try:
            queued = await self._lanes.put(lane, (frame, size))
        except BaseException:
            self.budget.give_back(size)
            raise
        if not queued:
            self.budget.give_back(size)

    def _put_nowait(self, frame: str | _GoingAway, size: int, lane: int) -> bool:
        """Queue the frame if the queue has room (True: queued, or dropped as the writer
        is gone); False if it must wait for room."""
        if not self.budget.try_take(size):
            return False
        try:
            queued = self._lanes.put_nowait(lane, (frame, size))
        except trio.WouldBlock:
            self.budget.give_back(size)  # full in frames: wait, in turn
            return False
        if not queued:
            self.budget.give_back(size)
        return True

    async def _writer(self) -> None:
        try:
            while True:
                item = await self._lanes.get()
                frame, size = item if item is not None else (None, 0)
                if isinstance(frame, _GoingAway):
                    # Every frame queued before it is out: now the close frame.
                    await self._close(p.CLOSE_GOING_AWAY, "sandboxd is shutting down")
                    return
                timeout = self._timeouts.send_timeout
                with trio.move_on_after(timeout) as waited:
                    try:
                        if frame is not None:
                            self.ws.write_message(frame)
                        # Written out (or nothing but a backlog to write: poked).
                        await self.ws.flush()
                    except Closed:
                        break
                    finally:
                        self.budget.give_back(size)
                if waited.cancelled_caught:
                    log.warning("%s: closed, it took no data for %.0f s", self.name, timeout)
                    await self._close(p.CLOSE_NOT_READING, "the client stopped reading")
                    return
        finally:
            for _frame, size in self._lanes.close():
                self.budget.give_back(size)
        # The connection is gone: nothing can be said on it any more.
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _keepalive(self) -> None:
        while True:
            interval, timeout = self._timeouts.ping_interval, self._timeouts.ping_timeout
            due = self._last_heard + interval
            if trio.current_time() < due:
                await trio.sleep_until(due)
                continue
            with trio.move_on_after(timeout) as waited:
                try:
                    await self.ws.ping()
                except Closed:
                    return
            if waited.cancelled_caught:
                log.info("%s: closed, no pong within %.0f s", self.name, timeout)
                await self._close(p.CLOSE_NO_PONG, "no pong")
                return
            self._last_heard = trio.current_time()

    # -- subscriptions ------------------------------------------------------------------

    def _deliver_live(self, pump: _Pump, stir: Stir) -> Turn:
        """The fan-out's turn at a parked pump: its new events, written to the socket from
        there; IDLE once nothing new has come (``stir`` is called on the next event);
        WAKE for what the pump's own task must do (history, the gate, the end)."""
        if not self._nothing_before or self._lanes.closed:
            # The socket has not taken the last frames yet: leave the events where they
            # are (the subscription's live buffer, shared by all, or the disk once it
            # overflows) and take them all into one frame on a later round, rather than
            # queue frames here: a slow client costs no memory of its own, and gets
            # bigger frames, not more of them.
            return Turn.KEEP
        subscription = pump.subscription
        assert self._fanout is not None
        # A firehose takes the log's batches whole, and the frame's events are their
        # bytes as joined once for every subscriber (JoinedRuns): no work per record.
        whole = subscription.take_whole(BATCH_RECORDS, BATCH_BYTES)
        if whole:
            body = self._fanout.runs.joined(whole)
            if body:
                head, tail = pump.frame_ends
                with contextlib.suppress(Closed):
                    self.ws.write_text((head, body, tail))
            pump.last_seq = subscription.position
            return Turn.KEEP
        try:
            batch = subscription.take_at_hand(BATCH_RECORDS)
        except Exception:
            return Turn.WAKE  # the pump meets it again, in its own task, and ends it
        if batch is None:
            return Turn.WAKE
        if not batch:
            # Nothing came since the last turn: out of the rounds until the next event,
            # which then goes out at once. Under a steady flow every turn has something.
            subscription.when_published(stir)
            return Turn.IDLE
        # A closed websocket: the reader and the writer find out.
        with contextlib.suppress(Closed):
            for chunk in _chunks(batch):
                self.ws.write_text(p.events_frame_parts(pump.id, chunk))
        pump.last_seq = subscription.position
        return Turn.KEEP

    async def _forward(self, pump: _Pump) -> None:
        """A subscription's pump: the log's records, as frames, into the writer's queue."""
        subscription = pump.subscription
        reason: str | None = None
        try:
            with pump.scope:
                async with subscription:
                    try:
                        async for batch in subscription.batches(BATCH_RECORDS):
                            if isinstance(batch, CaughtUp):
                                frame = p.encode_caught_up(pump.id, batch.seq)
                                await self._queue(frame, SUBSCRIPTIONS)
                            elif pump.batch:
                                for chunk in _chunks(batch):
                                    frame = p.encode_events_frame(pump.id, chunk)
                                    await self._queue(frame, SUBSCRIPTIONS)
                            else:
                                for record in batch:
                                    frame = p.encode_event_frame(pump.id, record.raw)
                                    await self._queue(frame, SUBSCRIPTIONS)
                                    pump.last_seq = record.event.seq
                            # Only what is queued counts: a batch taken but cut off
                            # on its way to the queue must be sent again on resume.
                            pump.last_seq = subscription.position
                            live = isinstance(batch, list) and len(batch) < BATCH_RECORDS
                            if pump.paced and live:
                                # Not catching up: let the next events gather. The
                                # fan-out sends them, and wakes this task only for
                                # what it cannot do (fanout.py).
                                if self._fanout is None:
                                    await trio.sleep(BATCH_PACE)
                                    continue
                                deliver = partial(self._deliver_live, pump)
                                await self._fanout.park(pump, pump.group, deliver)
                    except Gone as gone:
                        reason = (
                            "the log's retention overtook this subscription; events from seq"
                            f" {gone.oldest_seq} on are still there"
                        )
                    except LogUnavailable as exc:
                        reason = f"the event log is unavailable: {exc}"
                    except CorruptLog as damage:
                        reason = errors.damaged(damage)
                    else:
                        reason = "the event log has closed"
                    # Not cut off while sending: everything up to position is passed.
                    pump.last_seq = subscription.position
                if reason is not None:
                    ended = p.encode_ended(pump.id, reason, pump.last_seq)
                    await self._queue(ended, SUBSCRIPTIONS)
        except Exception:
            log.exception("%s: subscription %s failed", self.name, pump.id)
            with trio.move_on_after(self._timeouts.farewell):
                ended = p.encode_ended(pump.id, "internal error", pump.last_seq)
                await self._queue(ended, SUBSCRIPTIONS)
        finally:
            self._pumps.pop(pump.id, None)
            pump.done.set()

    async def _forward_output(self, pump: _OutputPump) -> None:
        """An output follow's pump: what the sandbox writes, as frames, into the writer's queue."""
        follow = pump.follow
        reason: str | None = None
        try:
            with pump.scope:
                try:
                    while True:
                        await follow.wait()
                        # Output in hand only with a read slot, as history is (READ_SLOTS);
                        # waiting for output holds none.
                        async with self.read_slots:
                            text = await follow.read()
                            if text:
                                await self._queue(
                                    p.encode_output_frame(pump.id, text), SUBSCRIPTIONS
                                )
                except OutputEnded as end:
                    reason = str(end)
                except OSError as exc:
                    reason = f"the sandbox's output cannot be read: {exc}"
            if reason is not None:
                await self._queue(p.encode_output_ended(pump.id, reason), SUBSCRIPTIONS)
        except Exception:
            log.exception("%s: output follow %s failed", self.name, pump.id)
            with trio.move_on_after(self._timeouts.farewell):
                await self._queue(p.encode_output_ended(pump.id, "internal error"), SUBSCRIPTIONS)
        finally:
            self._pumps.pop(pump.id, None)
            follow.close()
            pump.done.set()


def _chunks(records: list[Record]) -> Iterator[list[bytes]]:
    """The records' stored bytes, in runs of at most BATCH_BYTES (a bigger record alone)."""
    chunk: list[bytes] = []
    size = 0
    for record in records:
        if chunk and size + len(record.raw) > BATCH_BYTES:
            yield chunk
            chunk, size = [], 0
        chunk.append(record.raw)
        size += len(record.raw)
    if chunk:
        yield chunk


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))
