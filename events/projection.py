"""The projection: what the log says about every sandbox, folded event by event.

``step(record, event)`` is the status machine of protocol.md: a pure function
from one sandbox's record and one event to the next record (``None`` once the
sandbox is deleted). ``apply(state, event)`` writes that step into the map of
all sandboxes. The live daemon and replay call the same ``apply``; nothing
else changes a ``State``.

``apply`` updates ``state`` in place and returns it: copying a map of
thousands of sandboxes for each of a million replayed events would make the
fold quadratic. What ``apply`` computes depends on nothing but its arguments,
and every record in the map is immutable, so a reader holding a record never
sees it change under it.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Callable
from typing import Any, NamedTuple

import attrs
import msgspec

from sandboxd.events import types as ev


class Status(enum.StrEnum):
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    ERROR = "ERROR"
    MISSING = "MISSING"


class ProjectionError(ValueError):
    """An event that cannot follow the state before it: the log is inconsistent."""


class SandboxRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    """One sandbox as the log describes it. A msgspec Struct: the fold makes a new one
    for almost every event, and ``msgspec.structs.replace`` does that in C (0.2 us,
    against 1.5 us for an attrs class of 16 fields; bench/eventlog.py's replay)."""

    id: str
    spec_id: str
    created_by_user_id: str | None
    status: Status
    created_at: str
    updated_at: str
    created_seq: int  # the order of search, newest first, and its paging cursor
    version: int  # seq of the last event that changed this record
    port: int
    working_dir: str
    pid: int | None = None
    pgid: int | None = None
    create_time: float | None = None
    command: tuple[str, ...] = ()
    exposed_urls: tuple[ev.ExposedUrl, ...] = ()
    error: str | None = None
    uid: int | None = None  # the sandbox's own uid (sandbox.created); None: the daemon's
    #: Every port it holds, by name, ``port`` first; empty for a sandbox created before
    #: named ports (see ``named_ports``).
    ports: tuple[ev.NamedPort, ...] = ()
    #: How its last process ended, where known (sandbox.exited, sandbox.start_failed).
    exit_code: int | None = None
    exit_signal: int | None = None
    #: How many times its command was run again (sandbox.restarted, for any reason).
    restarts: int = 0
    #: When the restart policy last restarted it (the ``ts`` of its on-failure
    #: ``sandbox.restarted`` events, oldest first, the latest MAX_FAILURE_RESTARTS
    #: only): the window of ``restart_max`` in ``restart_window`` is counted from
    #: the log, so a daemon restart neither forgets nor resets it. A resume's
    #: restart (a person stepped in) empties it.
    failure_restarts: tuple[str, ...] = ()
    #: The node that owns it (sandbox.created); None: a record older than nodes.
    node: str | None = None
    #: While MISSING because its node was lost: the status it had, which adopting it
    #: again restores (its process is kept in the record meanwhile).
    before_lost: Status | None = None
    #: What its starter tagged it with (sandbox.created); never changed afterwards.
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    #: When the idle sweep's window in which it was first seen idle began (sandbox.idle);
    #: None while it is active, and again after any other change of the sandbox.
    idle_since: str | None = None

    @property
    def has_process(self) -> bool:
        return self.pid is not None

    @property
    def named_ports(self) -> tuple[ev.NamedPort, ...]:
        """Every port it holds, by name: one created before named ports held ``port`` alone,
        the agent server's."""
        return self.ports or (ev.NamedPort("AGENT_SERVER", self.port),)


#: The most on-failure restarts a record remembers: the bound of ``restart_max``.
MAX_FAILURE_RESTARTS = 100


class Incarnation(NamedTuple):
    """One life of a sandbox id: from its ``sandbox.created`` at ``created_seq``, owned by
    ``owner`` (None: the embedded admin), until the id's next creation or forever."""

    created_seq: int
    owner: str | None


@attrs.define
class State:
    """Every sandbox that is not deleted, in creation order, and the seq folded so far."""

    sandboxes: dict[str, SandboxRecord] = attrs.Factory(dict)
    head_seq: int = 0
    #: Every life of every sandbox id ever created, oldest first, deleted ones included:
    #: their events stay in the log, visible to whoever owned the id *then*, even once
    #: another user has created it again. One small entry per sandbox created; tuples,
    #: so that a shallow copy of the map (copy_state) is a full one.
    owners: dict[str, tuple[Incarnation, ...]] = attrs.Factory(dict)
    #: The labels of every labelled life (sandbox.created's), deleted ones included, by its
    #: ``created_seq``: what the events' ``labels`` filter matches against.
    labels: dict[int, dict[str, str]] = attrs.Factory(dict)


def incarnation_at(state: State, sandbox_id: str, seq: int) -> Incarnation | None:
    """The life of ``sandbox_id`` that an event at ``seq`` belongs to: the one created
    last at or before ``seq``; None if the id was not created by then."""
    # Newest first: an id is seldom created more than once, so this is one comparison.
    for incarnation in reversed(state.owners.get(sandbox_id, ())):
        if incarnation.created_seq <= seq:
            return incarnation
    return None


def labels_at(state: State, sandbox_id: str, seq: int) -> dict[str, str]:
    """The labels of the life of ``sandbox_id`` an event at ``seq`` belongs to ({}: none)."""
    life = incarnation_at(state, sandbox_id, seq)
    return {} if life is None else state.labels.get(life.created_seq, {})


_evolve = msgspec.structs.replace


def _exit_reason(data: ev.SandboxExited) -> str:
    if data.reason == "oom":
        limit = "" if data.memory_max is None else f" (limit {_size(data.memory_max)})"
        return f"killed: out of memory{limit}"
    if data.signal is not None:
        return f"the process was killed by signal {data.signal}"
    if data.exit_code is None:
        # An adopted process is not the daemon's child: its status is not the daemon's to read.
        return "the process exited (its exit status is unknown: it was adopted after a restart)"
    return f"the process exited with code {data.exit_code}"


# -- the status machine: one transition per event type -----------------------------------
#
# Every change of a sandbox ends its idle period (idle_since=None); only the idle
# sweep's sandbox.idle begins one, and adoption by a restarted daemon leaves it going.
#
# A table rather than a ``match``: the fold's hot path, and one dict lookup costs
# less than trying the class patterns in turn (0.46 against 0.8 us an event on
# replay, bench/eventlog.py). Each takes the record, the payload, ts and seq.


def _process_started(
    record: SandboxRecord, data: ev.ProcessStarted, ts: str, seq: int
) -> SandboxRecord:
    return _evolve(
        record,
        pid=data.pid,
        pgid=data.pgid,
        create_time=data.create_time,
        command=tuple(data.command),
        uid=record.uid if data.uid is None else data.uid,
        updated_at=ts,
        version=seq,
        idle_since=None,
    )


def _running(record: SandboxRecord, data: ev.SandboxRunning, ts: str, seq: int) -> SandboxRecord:
    urls = tuple(data.exposed_urls)
    return _evolve(
        record,
        status=Status.RUNNING,
        exposed_urls=urls,
        error=None,
        updated_at=ts,
        version=seq,
        idle_since=None,
    )


def _start_failed(record: SandboxRecord, data: ev.StartFailed, ts: str, seq: int) -> SandboxRecord:
    return _evolve(
        record,
        status=Status.ERROR,
        error=data.reason,
        pid=None,
        pgid=None,
        exit_code=data.exit_code,
        exit_signal=None,
        updated_at=ts,
        version=seq,
        idle_since=None,
    )


def _paused(record: SandboxRecord, data: ev.SandboxPaused, ts: str, seq: int) -> SandboxRecord:
    return _evolve(record, status=Status.PAUSED, updated_at=ts, version=seq, idle_since=None)


def _running_again(
    record: SandboxRecord, data: ev.SandboxResumed | ev.SandboxHealthy, ts: str, seq: int
) -> SandboxRecord:
    return _evolve(
        record, status=Status.RUNNING, error=None, updated_at=ts, version=seq, idle_since=None
    )


def _unhealthy(
    record: SandboxRecord, data: ev.SandboxUnhealthy, ts: str, seq: int
) -> SandboxRecord:
    return _evolve(
        record, status=Status.ERROR, error=data.reason, updated_at=ts, version=seq, idle_since=None
    )


def _exited(record: SandboxRecord, data: ev.SandboxExited, ts: str, seq: int) -> SandboxRecord:
    error = _exit_reason(data)
    if data.restart is not None:
        error += f"; {data.restart}"  # the restart policy gave up
    return _evolve(
        record,
        status=Status.ERROR,
        error=error,
        pid=None,
        pgid=None,
        exit_code=data.exit_code,
        exit_signal=data.signal,
        updated_at=ts,
        version=seq,
        idle_since=None,
    )


def _restarted(
    record: SandboxRecord, data: ev.SandboxRestarted, ts: str, seq: int
) -> SandboxRecord:
    if data.trigger == ev.RESTART_ON_FAILURE:
        recent = (*record.failure_restarts, ts)[-MAX_FAILURE_RESTARTS:]
    else:
        recent = ()  # a person stepped in: the policy's count starts again
    return _evolve(
        record,
        status=Status.STARTING,
        error=None,
        pid=None,
        pgid=None,
        create_time=None,
        restarts=record.restarts + 1,
        failure_restarts=recent,
        updated_at=ts,
        version=seq,
        idle_since=None,
    )


def _adopted(record: SandboxRecord, data: ev.SandboxAdopted, ts: str, seq: int) -> SandboxRecord:
    if record.before_lost is not None:
        # Its node came back and found it running: as it was before the loss.
        return _evolve(
            record,
            status=record.before_lost,
            error=None,
            before_lost=None,
            updated_at=ts,
            version=seq,
        )
    # Adoption changes nothing a client sees; it only says the daemon watches again.
    return record


def _missing(record: SandboxRecord, data: ev.SandboxMissing, ts: str, seq: int) -> SandboxRecord:
    if data.node_lost is not None:
        # Its node lost its lease: its process was not seen gone, so it is kept, for the
        # node to adopt again if it comes back (docs/cluster.md).
        if record.status is Status.MISSING:
            return _evolve(record, error=data.reason, updated_at=ts, version=seq)
        return _evolve(
            record,
            status=Status.MISSING,
            error=data.reason,
            before_lost=record.status,
            updated_at=ts,
            version=seq,
            idle_since=None,
        )
    return _evolve(
        record,
        status=Status.MISSING,
        error=data.reason,
        pid=None,
        pgid=None,
        before_lost=None,
        updated_at=ts,
        version=seq,
        idle_since=None,
    )


def _deleted(record: SandboxRecord, data: ev.SandboxDeleted, ts: str, seq: int) -> None:
    return None


def _idle(record: SandboxRecord, data: ev.SandboxIdle, ts: str, seq: int) -> SandboxRecord:
    return _evolve(record, idle_since=data.since, updated_at=ts, version=seq)


def _active(record: SandboxRecord, data: ev.SandboxActive, ts: str, seq: int) -> SandboxRecord:
    return _evolve(record, idle_since=None, updated_at=ts, version=seq)


_Transition = Callable[[SandboxRecord, Any, str, int], SandboxRecord | None]


#: What each event about an existing sandbox does to its record (sandbox.created, which
#: makes one, is apart; daemon.* events are about no sandbox).
_TRANSITIONS: dict[type[ev.Payload], _Transition] = {
    ev.ProcessStarted: _process_started,
    ev.SandboxRunning: _running,
    ev.StartFailed: _start_failed,
    ev.SandboxPaused: _paused,
    ev.SandboxResumed: _running_again,
    ev.SandboxHealthy: _running_again,
    ev.SandboxUnhealthy: _unhealthy,
    ev.SandboxExited: _exited,
    ev.SandboxAdopted: _adopted,
    ev.SandboxMissing: _missing,
    ev.SandboxDeleted: _deleted,
    ev.SandboxIdle: _idle,
    ev.SandboxActive: _active,
    ev.SandboxRestarted: _restarted,
}


def _created(event: ev.Event, data: ev.SandboxCreated) -> SandboxRecord:
    assert event.sandbox_id is not None
    return SandboxRecord(
        id=event.sandbox_id,
        spec_id=data.spec_id,
        created_by_user_id=data.created_by_user_id,
        status=Status.STARTING,
        created_at=event.ts,
        updated_at=event.ts,
        created_seq=event.seq,
        version=event.seq,
        port=data.port,
        working_dir=data.working_dir,
        uid=data.uid,
        ports=tuple(data.ports or ()),
        node=data.node,
        labels=dict(data.labels) if data.labels else {},
    )


def _size(size: int) -> str:
    # The words of actors/boundary/limits.format_bytes (events import nothing of actors).
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor:
            value = size / factor
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{size} bytes"


def step(record: SandboxRecord | None, event: ev.Event) -> SandboxRecord | None:
    """The status machine: one sandbox's record after ``event`` (None once deleted)."""
    data = event.data
    if type(data) is ev.SandboxCreated:
        if record is not None:
            raise ProjectionError(f"seq {event.seq}: sandbox {event.sandbox_id} already exists")
        return _created(event, data)
    transition = _TRANSITIONS.get(type(data))
    if transition is None:
        raise ProjectionError(f"seq {event.seq}: {event.type} is not an event about a sandbox")
    if record is None:
        raise ProjectionError(
            f"seq {event.seq}: {event.type} for sandbox {event.sandbox_id}, which does not exist"
        )
    return transition(record, data, event.ts, event.seq)


def apply(state: State, event: ev.Event) -> State:
    """Fold one event into ``state`` (in place, see the module's docstring) and return it."""
    seq = event.seq
    if seq <= state.head_seq:
        raise ProjectionError(f"seq {seq} does not follow {state.head_seq}")
    sandbox_id = event.sandbox_id
    if sandbox_id is not None:
        sandboxes = state.sandboxes
        data = event.data
        kind = type(data)
        record = sandboxes.get(sandbox_id)
        transition = _TRANSITIONS.get(kind)
        if transition is not None and record is not None:
            after = transition(record, data, event.ts, seq)  # step's common case, inline
        else:
            after = step(record, event)
        if after is None:
            del sandboxes[sandbox_id]
        else:
            if isinstance(data, ev.SandboxCreated):
                born = Incarnation(seq, data.created_by_user_id)
                state.owners[sandbox_id] = (*state.owners.get(sandbox_id, ()), born)
                if data.labels:
                    state.labels[seq] = dict(data.labels)
            sandboxes[sandbox_id] = after
    state.head_seq = seq
    return state


def copy_state(state: State) -> State:
    # Records are immutable: shallow copies of the maps are a full copy of the state.
    return State(dict(state.sandboxes), state.head_seq, dict(state.owners), dict(state.labels))


def state_to_dict(state: State) -> dict[str, Any]:
    return {
        "head_seq": state.head_seq,
        "sandboxes": [msgspec.to_builtins(r) for r in state.sandboxes.values()],
        # {id: [[created_seq, owner], ...]}, oldest first.
        "owners": {
            sandbox_id: [list(i) for i in lives] for sandbox_id, lives in state.owners.items()
        },
        # {created_seq: labels} of labelled lives; absent from snapshots older than labels.
        "labels": {str(seq): labels for seq, labels in state.labels.items()},
    }


def state_from_dict(raw: dict[str, Any]) -> State:
    records = [msgspec.convert(r, SandboxRecord) for r in raw["sandboxes"]]
    owners = raw["owners"]
    if not isinstance(owners, dict):
        raise ValueError("owners must be an object")
    return State(
        {r.id: r for r in records},
        int(raw["head_seq"]),
        {sandbox_id: _incarnations(sandbox_id, lives) for sandbox_id, lives in owners.items()},
        _labels(raw.get("labels", {})),
    )


def _labels(raw: Any) -> dict[int, dict[str, str]]:
    if type(raw) is not dict or not all(
        seq.isdecimal()
        and type(labels) is dict
        and all(type(k) is str and type(v) is str for k, v in labels.items())
        for seq, labels in raw.items()
    ):
        raise ValueError("labels must map creation seqs to objects of strings")
    return {int(seq): labels for seq, labels in raw.items()}


def _incarnations(sandbox_id: str, raw: Any) -> tuple[Incarnation, ...]:
    if type(raw) is not list or not all(
        type(life) is list
        and len(life) == 2
        and type(life[0]) is int
        and (life[1] is None or type(life[1]) is str)
        for life in raw
    ):
        raise ValueError(f"owners[{sandbox_id!r}] must be a list of [seq, owner] pairs")
    lives = tuple(Incarnation(seq, owner) for seq, owner in raw)
    if any(older.created_seq >= newer.created_seq for older, newer in itertools.pairwise(lives)):
        raise ValueError(f"owners[{sandbox_id!r}] must be in increasing seq order")
    return lives
