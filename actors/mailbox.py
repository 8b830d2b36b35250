"""What a sandbox actor is told: commands, which someone waits on, and notices, which no one does.

Each message is a frozen class, dispatched by the actor with ``match``. A
command carries the ``Reply`` its sender waits on; the actor answers every
command through it, the start too, even when the answer comes later than the
command's turn in the mailbox (a start waits for readiness while the actor goes
on serving a pause or a delete). Notices come from the actor's own watchers
(readiness, liveness, the exit watch) and from its retries; ``attempt`` counts
how many times the event a notice leads to could not be recorded.

``Mailbox`` is where they wait for the actor: bounded, one reader.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Generic, Protocol, TypeVar

import attrs
import outcome
import trio

from sandboxd.actors.idle import IdleVerdict
from sandboxd.actors.proctree import ExitStatus, ProcessId
from sandboxd.events.projection import SandboxRecord
from sandboxd.events.types import NamedPort

T = TypeVar("T")


class Mailbox(Generic[T]):
    """A bounded queue with one reader, the actor: what a trio memory channel does here,
    in one object.

    A memory channel is three objects (its two ends and their shared state: a deque and
    two ordered dicts of waiting tasks), and its reader waits through four frames; with
    this one a sandbox at rest takes 2.8 KB less (57.6 against 60.5 MB at 1,000 light
    sandboxes, docs/performance.md). Senders that find it full wait for room, in a
    parking lot made only then. Once the reader closes it, every post (and every
    sender waiting for room) raises ``trio.BrokenResourceError``, as a memory channel's
    send does once its receiving end is closed.
    """

    __slots__ = ("_capacity", "_closed", "_items", "_reader", "_room")

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._items: list[T] = []  # a few at most: a list, not a deque (0.6 KB when empty)
        self._reader: trio.lowlevel.Task | None = None  # the reader, while it waits
        self._room: trio.lowlevel.ParkingLot | None = None  # senders waiting for room
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    def post_nowait(self, message: T) -> None:
        """Queue ``message`` now; trio.WouldBlock if the mailbox is full."""
        if self._closed:
            raise trio.BrokenResourceError("the mailbox's reader has closed it")
        if len(self._items) >= self._capacity:
            raise trio.WouldBlock
        self._items.append(message)
        if self._reader is not None:
            trio.lowlevel.reschedule(self._reader)
            self._reader = None

    async def post(self, message: T) -> None:
        """Queue ``message``, waiting for room while the mailbox is full."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while len(self._items) >= self._capacity and not self._closed:
            if self._room is None:
                self._room = trio.lowlevel.ParkingLot()
            await self._room.park()
        self.post_nowait(message)
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def get(self) -> T:
        """The oldest message, waiting for one while there is none (the reader alone)."""
        if self._items:
            await trio.lowlevel.checkpoint()
        else:
            assert self._reader is None, "a mailbox has one reader"
            await trio.lowlevel.checkpoint_if_cancelled()
            self._reader = trio.lowlevel.current_task()
            await trio.lowlevel.wait_task_rescheduled(self._abort_get)
        return self._take()

    def get_nowait(self) -> T:
        """The oldest message; trio.WouldBlock if there is none."""
        if not self._items:
            raise trio.WouldBlock
        return self._take()

    def close(self) -> None:
        """No more messages (the reader is done): posts raise, waiting senders too."""
        self._closed = True
        if self._room is not None:
            self._room.unpark_all()

    def _take(self) -> T:
        message = self._items.pop(0)
        if self._room is not None:
            self._room.unpark()
        return message

    def _abort_get(self, _: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
        self._reader = None
        return trio.lowlevel.Abort.SUCCEEDED


class Reply(Generic[T]):
    """Where a command's outcome goes back to the task that sent it: answered once."""

    def __init__(self) -> None:
        self._done = trio.Event()
        self._outcome: outcome.Outcome[T] | None = None

    @property
    def answered(self) -> bool:
        return self._outcome is not None

    def send(self, value: T) -> None:
        self._answer(outcome.Value(value))

    def fail(self, error: BaseException) -> None:
        self._answer(outcome.Error(error))

    def _answer(self, result: outcome.Outcome[T]) -> None:
        if self._outcome is None:  # the first answer stands
            self._outcome = result
            self._done.set()

    async def receive(self) -> T:
        await self._done.wait()
        assert self._outcome is not None
        return self._outcome.unwrap()


class Asked(Protocol[T]):
    """A command: something with a reply to wait on."""

    @property
    def reply(self) -> Reply[T]: ...


# --- commands ------------------------------------------------------------------------------


@attrs.frozen(eq=False)
class Start:
    """Create the sandbox (``sandbox.created``) and start its process.

    Answered with the record once ``sandbox.created`` is durable if not
    ``wait``; else once the start has an outcome: RUNNING, or ERROR with
    ``sandbox.start_failed``. ``ports``, ``working_dir`` and ``uid`` (None: the
    daemon's own) are the registry's decisions, made before the actor exists so
    that no two sandboxes get the same.
    """

    by: str | None
    ports: tuple[NamedPort, ...]  # the spec's, in its order: the first is health-checked
    working_dir: str
    uid: int | None
    env: Mapping[str, str]
    wait: bool
    labels: Mapping[str, str] = attrs.field(factory=dict)
    reply: Reply[SandboxRecord] = attrs.field(factory=Reply, repr=False)

    @property
    def port(self) -> int:
        return self.ports[0].port


@attrs.frozen(eq=False)
class Pause:
    by: str | None
    #: Why, when the daemon pauses it by itself (``sandbox.paused``'s reason).
    reason: str | None = None
    reply: Reply[SandboxRecord] = attrs.field(factory=Reply, repr=False)


@attrs.frozen(eq=False)
class Resume:
    """Resume a PAUSED sandbox; one whose process is gone (ERROR after it ended or failed to
    start, MISSING) runs its command again, and is answered as a start is."""

    by: str | None
    reply: Reply[SandboxRecord] = attrs.field(factory=Reply, repr=False)


@attrs.frozen(eq=False)
class Delete:
    by: str | None
    reply: Reply[bool] = attrs.field(factory=Reply, repr=False)


Command = Start | Pause | Resume | Delete


# --- notices -------------------------------------------------------------------------------


@attrs.frozen
class Ready:
    """The health check answered 200 (or the spec has none)."""

    attempt: int = 0


@attrs.frozen
class ReadyTimeout:
    """No 200 within the spec's ready_timeout."""

    attempt: int = 0


@attrs.frozen
class Exited:
    """The main process ``process`` ended."""

    process: ProcessId
    status: ExitStatus
    attempt: int = 0


@attrs.frozen
class Unhealthy:
    reason: str
    attempt: int = 0


@attrs.frozen
class Healthy:
    attempt: int = 0


@attrs.frozen
class Lost:
    """Recovery found the sandbox's process gone (MISSING): a failure, to its restart policy."""

    attempt: int = 0


@attrs.frozen
class Relaunch:
    """Start the process again: the last one was undone because the log refused its event."""

    attempt: int = 0


@attrs.frozen
class IdleCheck:
    """The idle sweep's verdict (actors/idle.py): record the sandbox idle or active again,
    and do its spec's on_idle once ``verdict.expired``. ``handled`` is set once the actor
    has (or has dropped it), for the sweep, which paces its verdicts by it."""

    verdict: IdleVerdict
    attempt: int = 0
    handled: trio.Event = attrs.field(factory=trio.Event, eq=False, repr=False)


Notice = Ready | ReadyTimeout | Exited | Unhealthy | Healthy | Lost | Relaunch | IdleCheck

Message = Command | Notice
