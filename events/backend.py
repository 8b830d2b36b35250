"""The seam between the event log and what stands on it: the ``Store`` protocol.

The registry and its actors record every change through ``append`` (or
``append_many``, one write and one fdatasync for a batch) and read the
projection as ``state``; readers page through history with ``read`` and follow
it with ``subscribe``. The file log of this package (``store.Store``, made by
``store.open_store``) is one backend; another (NATS JetStream, for a cluster)
stands behind the same five names. What every backend promises, whatever it
is built on:

- ``append`` returns only once the event is durable and folded into
  ``state``; a refused event raises ``LogUnavailable`` and is not written.
- ``state`` is the projection of every durable event, in seq order, and
  changes only through them.
- ``read`` and ``subscribe`` deliver each matching event once, in seq order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from sandboxd.events.projection import State
from sandboxd.events.subscriptions import Subscription
from sandboxd.events.types import Event, PendingEvent

#: Which events a reader wants: a predicate, or None for all of them.
Predicate = Callable[[Event], bool] | None


class Store(Protocol):
    """An event log and the projection it keeps current."""

    @property
    def state(self) -> State: ...

    async def append(self, pending: PendingEvent) -> Event: ...

    async def append_many(self, pendings: Sequence[PendingEvent]) -> list[Event]: ...

    async def read(
        self, after_seq: int, limit: int = 1000, event_filter: Predicate = None
    ) -> list[Event]: ...

    def subscribe(
        self, after_seq: int | None, event_filter: Predicate = None, *, buffer: int | None = None
    ) -> Subscription: ...
