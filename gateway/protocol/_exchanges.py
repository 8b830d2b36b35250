"""Requests in flight on one connection, for clients: their ids, and who waits for each reply.

Requests on a connection run concurrently and their replies come in any order
(protocol.md), so a client numbers each request and routes each reply back by
its id. That bookkeeping is the same for any transport; only the waiter
differs (a ``trio.Event``, an ``asyncio.Future``), so it is the type parameter.
No I/O here: the client's reader task hands every frame it receives to
``route``, and its callers ``open`` and ``close`` their exchanges.
"""

from __future__ import annotations

import itertools
from typing import Generic, TypeVar

from sandboxd.gateway.protocol._frames import Reply, parse_frame

W = TypeVar("W")


class Exchanges(Generic[W]):
    """The requests of one connection that wait for a reply, each with its waiter."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self._waiting: dict[int, W] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    def open(self, waiter: W) -> int:
        """A fresh request id, whose reply goes to ``waiter``."""
        request_id = next(self._ids)
        self._waiting[request_id] = waiter
        return request_id

    def close(self, request_id: int) -> None:
        """The request is over (answered, or its caller gave up): a late reply is dropped."""
        self._waiting.pop(request_id, None)

    def route(self, frame: str | bytes) -> tuple[W, Reply] | None:
        """The waiter of the reply that ``frame`` is, and the reply; None for any other frame.

        Raises ``MalformedFrameError`` for a frame protocol.md does not describe.
        Other frames are a subscription's, or a late reply to a request whose
        caller gave up: neither is anyone's here.
        """
        reply = parse_frame(frame)
        if not isinstance(reply, Reply) or type(reply.id) is not int:
            return None
        waiter = self._waiting.pop(reply.id, None)
        return None if waiter is None else (waiter, reply)

    def drain(self) -> list[W]:
        """Every waiter still waiting, removed: the connection is gone, none will be answered."""
        waiters = list(self._waiting.values())
        self._waiting.clear()
        return waiters
