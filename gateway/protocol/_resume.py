"""A subscription that survives its connection, for clients: what to remember, with no I/O.

A client's subscription has a connection of its own. When that connection
drops, or the server ends the stream (a shutdown, a lagging stream overtaken),
the client connects again and resubscribes after the last seq it delivered, so
the application sees every event once, in order (protocol.md: "resubscribes
with after_seq = the last seq it saw"). ``Resumption`` is that memory and
those rules; the client's transport only opens connections, sends what
``subscribe_call`` gives, and feeds what it receives to ``subscribed`` and
``receive``. ``reconnect_delays``, ``worth_retrying`` and ``gave_up`` are the reconnect policy both
clients follow.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator

from sandboxd.events.types import Event
from sandboxd.gateway.protocol._errors import (
    AuthenticationError,
    BusyError,
    ClientError,
    ConnectError,
    ConnectionLostError,
    UnavailableError,
)
from sandboxd.gateway.protocol._frames import (
    CaughtUpFrame,
    EndedFrame,
    EventFrame,
    EventsFrame,
    Reply,
    parse_frame,
)
from sandboxd.gateway.protocol._requests import EventsSubscribe
from sandboxd.gateway.protocol._results import Subscribed
from sandboxd.gateway.protocol.calls import Call, subscribe

log = logging.getLogger(__name__)

#: A subscription's reconnects: the first waits this long, each next one twice as long...
RECONNECT_FIRST_DELAY = 0.1
#: ... up to this long ...
RECONNECT_MAX_DELAY = 5.0
#: ... and after this many failed attempts in a row the subscription gives up.
RECONNECT_ATTEMPTS = 10

#: The id of the subscribe request: the only request on a subscription's own connection.
SUBSCRIBE_ID = 1


def reconnect_delays() -> Iterator[float]:
    """The delay before each attempt to (re)connect: 0 for the first, then the backoff.

    Read at each call, so a test may shorten the policy for both clients at once.
    """
    delay = RECONNECT_FIRST_DELAY
    for attempt in range(RECONNECT_ATTEMPTS):
        if attempt == 0:
            yield 0.0
        else:
            yield delay
            delay = min(delay * 2, RECONNECT_MAX_DELAY)


def worth_retrying(error: ClientError) -> bool:
    """Whether another attempt may do better: the daemon away or busy, not a refused token."""
    if isinstance(error, AuthenticationError):
        return False
    return isinstance(error, ConnectError | ConnectionLostError | UnavailableError | BusyError)


def gave_up(failure: ClientError) -> ConnectionLostError:
    return ConnectionLostError(
        f"the subscription gave up after {RECONNECT_ATTEMPTS} attempts: {failure}"
    )


class Ended:
    """``receive``'s answer when the server ended the stream: drop the connection, resume."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


class Resumption:
    """One subscription's place in the log, across as many connections as it takes."""

    def __init__(self, params: EventsSubscribe) -> None:
        self.params = params
        #: The seq to resume after: the last delivered, else where the stream began.
        self.last_seq: int | None = params.after_seq
        #: The head_seq of the first subscribe reply (None until subscribed once).
        self.head_seq: int | None = None
        #: Whether the server said history is sent and the stream is live.
        self.caught_up = False
        #: Attempts to subscribe again after the first success.
        self.reconnects = 0
        self._subscription: str | None = None
        #: Events received and not handed out yet (the rest of a batch frame).
        self._pending: deque[EventFrame] = deque()

    @classmethod
    def of(
        cls,
        after_seq: int | None = None,
        *,
        sandbox_id: str | None = None,
        types: list[str] | None = None,
        batch: bool = False,
    ) -> Resumption:
        """A subscription's memory, its params checked now (they are sent on each connect).

        ``batch``: the server may send several events to a frame (both clients ask for it;
        False for a server older than batch frames, which refuses the param)."""
        params = subscribe(after_seq, sandbox_id=sandbox_id, types=types, batch=batch).params
        assert isinstance(params, EventsSubscribe)
        return cls(params)

    def subscribe_call(self) -> Call[Subscribed]:
        """The request to send on a fresh connection (as SUBSCRIBE_ID): after the last seq."""
        if self.head_seq is not None:
            self.reconnects += 1
        self._subscription = None
        self._pending.clear()  # sent again on the new connection, after last_seq
        params = self.params
        return subscribe(
            params.after_seq if self.last_seq is None else self.last_seq,
            sandbox_id=params.sandbox_id,
            types=params.types,
            batch=bool(params.batch),
        )

    def subscribe_reply(self, frame: str | bytes) -> Reply | None:
        """The reply to the subscribe request if ``frame`` is it; None for anything before it."""
        reply = parse_frame(frame)
        if isinstance(reply, Reply) and reply.id == SUBSCRIBE_ID:
            return reply
        return None

    def subscribed(self, call: Call[Subscribed], reply: Reply) -> None:
        """The subscribe reply came: the stream is on (or its error is raised)."""
        result = call.result(reply)
        self._subscription = result.subscription
        if self.head_seq is None:
            self.head_seq = result.head_seq
            if self.last_seq is None:
                # A stream "from now on" that is cut before its first event goes
                # on from where it began, not from the new now.
                self.last_seq = result.head_seq

    def receive(self, frame: str | bytes) -> Ended | None:
        """Take one frame of the connection: its events wait for ``next_event``; an
        ``Ended`` says the server ended the stream (resume on a new connection).
        Anything else (a frame from before the reconnect, the caught-up mark) is noted."""
        parsed = parse_frame(frame)
        if isinstance(parsed, Reply) or parsed.subscription != self._subscription:
            return None
        if isinstance(parsed, EventFrame):
            self._pending.append(parsed)
        elif isinstance(parsed, EventsFrame):
            self._pending.extend(parsed.events)
        elif isinstance(parsed, CaughtUpFrame):
            self.caught_up = True
        else:
            assert isinstance(parsed, EndedFrame)
            # Shutdown or a lagging stream overtaken: resubscribing tells which
            # (a restarted daemon continues, a `gone` is raised).
            log.info("subscription ended by the server: %s", parsed.reason)
            return Ended(parsed.reason)
        return None

    def next_event(self) -> Event | None:
        """The next event to deliver, each once and in order; None once the frames
        received so far hold no more. ``last_seq`` moves as events are handed out, so
        what a batch still held when its connection dropped is asked for again."""
        while self._pending:
            frame = self._pending.popleft()
            if self.last_seq is not None and frame.seq <= self.last_seq:
                continue  # delivered before the reconnect
            self.last_seq = frame.seq
            event = frame.event()
            if event is not None:  # None: a type this client does not know
                return event
        return None
