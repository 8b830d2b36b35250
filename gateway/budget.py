"""A byte budget: how much a connection's queued frames may hold at once.

A bounded channel bounds how many frames wait, not how big they are: 256
frames of a 1 MiB reply each are 256 MiB. A connection takes from its budget
the size of each frame it queues and gives it back once the frame is written;
a task whose frame does not fit waits, in turn, until enough is given back.
One item bigger than the whole budget is let through when nothing else is
held, or it could never go.
"""

from __future__ import annotations

from collections import deque

import trio


class ByteBudget:
    """At most ``limit`` bytes held at once (or one item alone); first come, first served."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("a byte budget must be at least 1 byte")
        self.limit = limit
        #: Bytes taken and not given back.
        self.held = 0
        #: The most ever held at once: what a test checks the bound with.
        self.peak = 0
        self._waiting: deque[tuple[int, trio.Event]] = deque()

    def _fits(self, size: int) -> bool:
        return self.held == 0 or self.held + size <= self.limit

    def try_take(self, size: int) -> bool:
        """Hold ``size`` bytes if they fit now and no one waits before; else False."""
        if self._waiting or not self._fits(size):
            return False
        self._add(size)
        return True

    async def take(self, size: int) -> None:
        """Wait until ``size`` bytes fit, then hold them (give them back with ``give_back``)."""
        if not self._waiting and self._fits(size):
            await trio.lowlevel.checkpoint()  # cancelled here, nothing is taken
            self._add(size)
            return
        turn = (size, trio.Event())
        self._waiting.append(turn)
        try:
            await turn[1].wait()
        except BaseException:
            if turn[1].is_set():  # granted, but its taker is gone
                self.give_back(size)
            else:
                self._waiting.remove(turn)
                self._grant()  # it may have been in the way of the ones behind it
            raise

    def give_back(self, size: int) -> None:
        self.held -= size
        self._grant()

    def _grant(self) -> None:
        while self._waiting and self._fits(self._waiting[0][0]):
            size, granted = self._waiting.popleft()
            self._add(size)
            granted.set()

    def _add(self, size: int) -> None:
        self.held += size
        self.peak = max(self.peak, self.held)
