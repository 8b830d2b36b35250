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
the subscription while the socket has not taken the last frame yet. A pump is
woken when its subscription needs what only its own task can do (read the
disk, wait for the gate's token, end), and when nothing came for a whole
pace: it then waits on its subscription itself, so that the first event after
a lull goes out at once, not at the next round. Under a steady flow every
round finds something, and no pump wakes. With no pump parked (no live batch
subscription, or all of them in a lull) the task sleeps until one parks: an
idle daemon is not woken a hundred times a second.

Requests first: the round is cut into slices of at most ``SLICE`` seconds
(``BUSY_SLICE`` while any request is in flight), between which the task
yields, so a request's next step waits at most one slice, not a whole round.
Nothing here ever blocks the log's writer: it only appends to the
subscriptions' live buffers (events/subscriptions.py).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from typing import Final, Protocol

import attrs
import outcome
import trio

from sandboxd.events.subscriptions import JoinedRuns

log = logging.getLogger(__name__)

#: Seconds between two frames of one live batch subscription.
PACE: Final = 0.1

#: A parked pump's turn: sends what it can from here, and says whether the pump's own
#: task must take over (True: it is woken).
Deliver = Callable[[], bool]


class InFlight(Protocol):
    @property
    def in_flight(self) -> int: ...


@attrs.define(eq=False)
class _Parked:
    task: trio.lowlevel.Task
    deliver: Deliver


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
        self._groups: list[dict[object, _Parked]] = [{} for _ in range(self.GROUPS)]
        self._members = itertools.count()
        #: Where the task waits while no pump is parked.
        self._none_parked = trio.lowlevel.ParkingLot()
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
        return sum(len(group) for group in self._groups)

    async def park(self, key: object, group: int, deliver: Deliver) -> None:
        """Wait while the rounds come to ``group`` and ``deliver`` sends from here; return
        once it says the pump's own task must take over."""
        await trio.lowlevel.checkpoint_if_cancelled()
        members = self._groups[group]
        members[key] = _Parked(trio.lowlevel.current_task(), deliver)
        if self._none_parked:
            self._none_parked.unpark_all()

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            members.pop(key, None)
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    async def run(self) -> None:
        """Serve each group in turn, forever (a task of the gateway's)."""
        step = self.pace / self.GROUPS
        due = trio.current_time()
        while True:
            for group in range(self.GROUPS):
                if not self.parked:
                    await self._none_parked.park()
                    due = trio.current_time()
                due += step
                await trio.sleep_until(due)
                await self._serve(self._groups[group])
            # Fallen far behind (a busy loop): start again from now, not in a rush.
            due = max(due, trio.current_time() - self.pace)

    async def _serve(self, members: dict[object, _Parked]) -> None:
        began = time.perf_counter()
        for key, parked in list(members.items()):
            if members.get(key) is not parked:
                continue  # gone (cancelled) while an earlier slice yielded
            try:
                wake = parked.deliver()
            except Exception:
                # Never let it escape: it would end the fan-out of every connection.
                log.exception("the fan-out's delivery failed; its pump takes over")
                wake = True
            if wake:
                del members[key]
                self.woken += 1
                trio.lowlevel.reschedule(parked.task, outcome.Value(None))
            busy = self._requests is not None and self._requests.in_flight > 0
            if time.perf_counter() - began > (self.BUSY_SLICE if busy else self.SLICE):
                await trio.lowlevel.checkpoint()
                began = time.perf_counter()
