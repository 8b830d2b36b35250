"""The live fan-out: one task delivers every paced subscription's events, in slices.

A live batch subscription (``"batch": true``, not naming its sandboxes) sends a
frame at most every ``pace`` seconds, so that events gather into it. Rather than
each subscription's pump waking for that (a task switch, its records taken, a
frame queued, the connection's writer woken: 1,000 subscribers ten times a
second took most of the event loop in bench/gateway.py), a pump with nothing
more in hand *parks* here, and this one task goes round the parked pumps, a
group of them each ``pace / GROUPS`` seconds, calling each one's ``deliver``:
it takes what the subscription has at hand (no wait, no disk) and writes the
frame to the socket there and then (connection.py), or leaves the events in
the subscription while the socket has not taken the last frames yet.

A pump whose turn finds nothing new goes *idle*: out of the rounds until the
next event published to its subscription stirs it, which puts it on this
task's list to serve at once. So the first event after a lull goes out at
once, not at the next round, and from here too: when the pumps waited on
their subscriptions themselves, that event woke 1,000 tasks in one pass of
the scheduler, 45-73 ms in which no request was read (docs/performance.md).
A pump is woken only for what its own task must do (read the disk, wait for
the gate's token, end). With nothing in the rounds nor stirred the task
sleeps: an idle daemon is not woken a hundred times a second.

Requests first: the task delivers in slices of at most ``SLICE`` seconds
(``BUSY_SLICE`` while any request is in flight), between which it yields, so
a request's next step waits at most one slice, not a whole round. Nothing
here ever blocks the log's writer: it only appends to the subscriptions' live
buffers (events/subscriptions.py), and a stir is a dict pop and a list append.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Final, Protocol

import attrs
import outcome
import trio

from sandboxd.events.subscriptions import JoinedRuns

log = logging.getLogger(__name__)

#: Seconds between two frames of one live batch subscription.
PACE: Final = 0.1


class Turn(enum.Enum):
    """What a parked pump's turn came to."""

    #: It sent, or left its events for a later round (the socket is still busy).
    KEEP = enum.auto()
    #: Nothing new: it has arranged for its ``Stir`` and leaves the rounds until then.
    IDLE = enum.auto()
    #: What comes next needs the pump's own task: it is woken.
    WAKE = enum.auto()


#: Called, synchronously and by whoever publishes, once something comes for an idle pump.
Stir = Callable[[], None]
#: A parked pump's turn: sends what it can from here; before answering IDLE it arranges
#: for the ``Stir`` it is given to be called on the next event.
Deliver = Callable[[Stir], Turn]


class InFlight(Protocol):
    @property
    def in_flight(self) -> int: ...


@attrs.define(eq=False)
class _Parked:
    key: object
    task: trio.lowlevel.Task
    deliver: Deliver
    group: int
    stir: Stir
    #: Left (cancelled) while a slice of a serve that holds it yielded.
    gone: bool = False


class FanOut:
    """The pacer of live batch subscriptions and the one task that delivers their frames."""

    #: Groups of pumps, each served in turn, one every ``pace / GROUPS`` seconds.
    GROUPS: Final = 10
    #: Seconds of delivering between two yields to the rest of the event loop, while
    #: requests are in flight and while none is.
    BUSY_SLICE: Final = 0.0003
    SLICE: Final = 0.002

    def __init__(self, pace: float = PACE, requests: InFlight | None = None) -> None:
        self.pace = pace
        self._requests = requests
        #: The pumps in the rounds, by group.
        self._groups: list[dict[object, _Parked]] = [{} for _ in range(self.GROUPS)]
        #: Pumps out of the rounds until stirred, and the stirred, to serve at once.
        self._idle: dict[object, _Parked] = {}
        self._stirred: list[_Parked] = []
        self._members = itertools.count()
        #: Where the task waits for its next round, a stir, or a pump to park.
        self._nudged = trio.lowlevel.ParkingLot()
        #: Pumps woken to do what only their own task can (tests look at it).
        self.woken = 0
        #: The bytes of the runs of live batches that the deliveries write, joined once
        #: for the subscribers of a group that take the same run (events/subscriptions.py).
        self.runs = JoinedRuns()

    def group(self) -> int:
        """A group for a new pump: in turn, so the groups stay the same size."""
        return next(self._members) % self.GROUPS

    @property
    def parked(self) -> int:
        """Pumps parked here: in the rounds, idle, or stirred."""
        return sum(map(len, self._groups)) + len(self._idle) + len(self._stirred)

    @property
    def idle(self) -> int:
        """Parked pumps out of the rounds until their next event."""
        return len(self._idle)

    async def park(self, key: object, group: int, deliver: Deliver) -> None:
        """Wait while the rounds (or a stir) come to the pump and ``deliver`` sends from
        here; return once it says the pump's own task must take over."""
        await trio.lowlevel.checkpoint_if_cancelled()
        task = trio.lowlevel.current_task()
        parked = _Parked(key, task, deliver, group, partial(self._stir, key))
        self._groups[group][key] = parked
        self._nudge()

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            parked.gone = True
            self._groups[group].pop(key, None)
            self._idle.pop(key, None)
            with contextlib.suppress(ValueError):
                self._stirred.remove(parked)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def _stir(self, key: object) -> None:
        parked = self._idle.pop(key, None)
        if parked is not None:  # else it left (cancelled) since it went idle
            self._stirred.append(parked)
            self._nudge()

    def _nudge(self) -> None:
        if self._nudged:
            self._nudged.unpark_all()

    async def run(self) -> None:
        """Serve the stirred pumps at once and each group in turn, forever (a task of the
        gateway's)."""
        step = self.pace / self.GROUPS
        due = trio.current_time() + step
        group = 0
        while True:
            if self._stirred:
                stirred, self._stirred = self._stirred, []
                await self._serve(stirred)
            elif not any(self._groups):
                await self._nudged.park()  # until a stir, or a pump parks
                due = max(due, trio.current_time() + step)
            elif trio.current_time() < due:
                with trio.move_on_at(due):
                    await self._nudged.park()
            else:
                await self._serve(list(self._groups[group].values()))
                group = (group + 1) % self.GROUPS
                # Fallen far behind (a busy loop): go on from now, not in a rush.
                due = max(due + step, trio.current_time() - self.pace)

    async def _serve(self, pumps: list[_Parked]) -> None:
        """Each pump's turn, in slices; each goes where its turn says."""
        began = time.perf_counter()
        for parked in pumps:
            if parked.gone:
                continue
            try:
                turn = parked.deliver(parked.stir)
            except Exception:
                # Never let it escape: it would end the fan-out of every connection.
                log.exception("the fan-out's delivery failed; its pump takes over")
                turn = Turn.WAKE
            members = self._groups[parked.group]
            if turn is Turn.KEEP:
                members[parked.key] = parked
            else:
                members.pop(parked.key, None)
                if turn is Turn.IDLE:
                    self._idle[parked.key] = parked
                else:
                    self.woken += 1
                    trio.lowlevel.reschedule(parked.task, outcome.Value(None))
            busy = self._requests is not None and self._requests.in_flight > 0
            if time.perf_counter() - began > (self.BUSY_SLICE if busy else self.SLICE):
                await trio.lowlevel.checkpoint()
                began = time.perf_counter()
