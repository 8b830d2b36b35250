"""The event catalogue of protocol.md: one frozen class per event type.

Each payload class carries its wire name in ``TYPE``; the log stores that name,
never the Python class name, so renaming a class cannot orphan old records.
``Event`` is the envelope the log assigns (seq, ts) around a payload.
Nothing here imports trio: the pure core is importable anywhere.

The classes are msgspec Structs: the codec decodes a record straight into
them, in C, strictly (no coercion, no unknown or missing field), and a Struct
is built in a tenth of the time of a frozen attrs class. Replay decodes and
folds a million of them at start-up without a snapshot (bench/eventlog.py).
(They carry no reference cycles, so the cyclic GC is told to leave them be:
``gc=False``, which replay's million allocations would otherwise pay for.)
"""

from __future__ import annotations

from typing import ClassVar

import msgspec

#: The version of the payload schemas written by this code. A record of an
#: older version is decoded through an upcaster (see ``codec.upcaster``).
#: 2: ``sandbox.created`` and ``sandbox.process_started`` gained ``uid``,
#: ``sandbox.exited`` gained ``reason`` and ``memory_max`` (all optional).
SCHEMA_VERSION = 2


class _Payload(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    """What every payload class is: frozen, and strict about its fields when decoded."""

    TYPE: ClassVar[str]


class ExposedUrl(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    name: str
    url: str
    #: Absent from records older than named ports (then it is the port of that name).
    port: int | None = None


class NamedPort(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    """One of a sandbox's ports, by the name its spec gave it (``AGENT_SERVER``, ``VSCODE``)."""

    name: str
    port: int


class SandboxCreated(_Payload, frozen=True, gc=False):
    TYPE: ClassVar[str] = "sandbox.created"
    spec_id: str
    created_by_user_id: str | None
    working_dir: str
    port: int  # the first of ``ports``: the one health-checked
    #: Every port the sandbox holds, in the spec's order; absent from records older than
    #: named ports, which held ``port`` alone (as AGENT_SERVER).
    ports: list[NamedPort] | None = None
    #: The uid the sandbox runs under, its own for its whole life; None: the daemon's.
    uid: int | None = None
    #: The node that runs its processes and records its transitions, for its whole life
    #: (docs/cluster.md); None: a record older than nodes, the only daemon's.
    node: str | None = None
    #: What its starter tagged it with (``sandbox.start``'s ``labels``), for its whole life;
    #: None: none (records older than labels too).
    labels: dict[str, str] | None = None


class ProcessStarted(_Payload, frozen=True, gc=False):
    TYPE: ClassVar[str] = "sandbox.process_started"
    pid: int
    pgid: int
    create_time: float
    command: list[str]
    uid: int | None = None  # the uid the process runs as; None: the daemon's


class SandboxRunning(_Payload, frozen=True, gc=False):
    TYPE: ClassVar[str] = "sandbox.running"
    exposed_urls: list[ExposedUrl]


class StartFailed(_Payload, frozen=True, gc=False):
    TYPE: ClassVar[str] = "sandbox.start_failed"
    reason: str
    exit_code: int | None


class SandboxPaused(_Payload, frozen=True, gc=False):
    TYPE: ClassVar[str] = "sandbox.paused"
    #: Why the daemon paused it on its own (a policy: "make room for ID" with on_full =
    #: "pause_oldest", "idle since ..." with on_idle = "pause"); None: a client's pause, and
    #: records older than policies.
    reason: str | None = None


class SandboxResumed(_Payload, frozen=True, gc=False):
    TYPE: ClassVar[str] = "sandbox.resumed"


class SandboxUnhealthy(_Payload, frozen=True, gc=False):
    TYPE: ClassVar[str] = "sandbox.unhealthy"
    reason: str


class SandboxHealthy(_Payload, frozen=True, gc=False):
    TYPE: ClassVar[str] = "sandbox.healthy"


class SandboxExited(_Payload, frozen=True, gc=False):
    TYPE: ClassVar[str] = "sandbox.exited"
    exit_code: int | None
    signal: int | None
    #: "oom": the OOM killer ended it (its cgroup's memory limit was reached).
    reason: str | None = None
    memory_max: int | None = None  # with reason "oom": the limit in force, in bytes
    #: The restart policy's verdict when it gave up on the sandbox ("restart = on-failure
    #: gave up: ..."); None when it has none, or did not give up.
    restart: str | None = None


#: ``SandboxRestarted.trigger``: a client's resume of a sandbox whose process is gone.
RESTART_ON_RESUME = "resume"
#: ``SandboxRestarted.trigger``: the spec's ``restart = "on-failure"``, after a failure.
RESTART_ON_FAILURE = "on-failure"


class SandboxRestarted(_Payload, frozen=True, gc=False):
    """Its spec's command runs again, in the same working dir with the same id, ports and
    session key: STARTING, then ``sandbox.process_started`` and RUNNING, as a start."""

    TYPE: ClassVar[str] = "sandbox.restarted"
    reason: str  # "resumed by USER", "restart = on-failure: the process exited with code 3"
    trigger: str  # RESTART_ON_RESUME or RESTART_ON_FAILURE
    #: How the process before ended, where known (None: killed for being unhealthy,
    #: ended while the daemon was down, or never started).
    exit_code: int | None = None
    signal: int | None = None


class SandboxAdopted(_Payload, frozen=True, gc=False):
    TYPE: ClassVar[str] = "sandbox.adopted"
    pid: int


class SandboxMissing(_Payload, frozen=True, gc=False):
    TYPE: ClassVar[str] = "sandbox.missing"
    reason: str
    #: Set when another node recorded it because this sandbox's node lost its lease
    #: (docs/cluster.md): its processes were not seen gone, only their node, so the
    #: record keeps them, and the node adopts them again if it comes back to find them.
    node_lost: str | None = None


class SandboxDeleted(_Payload, frozen=True, gc=False):
    TYPE: ClassVar[str] = "sandbox.deleted"
    forced: bool
    #: Why the daemon deleted it on its own (a policy: "idle since ..."); None: a user asked.
    reason: str | None = None


class SandboxIdle(_Payload, frozen=True, gc=False):
    """The idle sweep found the RUNNING sandbox idle (actors/idle.py): nothing connected to
    its ports and under its spec's ``idle_cpu_seconds`` of CPU in a sweep's window."""

    TYPE: ClassVar[str] = "sandbox.idle"
    since: str  # RFC 3339, UTC: when the window in which it was first seen idle began
    reason: str  # what was seen


class SandboxActive(_Payload, frozen=True, gc=False):
    """The idle sweep found the sandbox it had recorded idle active again."""

    TYPE: ClassVar[str] = "sandbox.active"
    reason: str  # what was seen: a connection to which port, or how much CPU


class DaemonStarted(_Payload, frozen=True, gc=False):
    TYPE: ClassVar[str] = "daemon.started"
    version: str
    pid: int
    recovered: int


class DaemonStopping(_Payload, frozen=True, gc=False):
    TYPE: ClassVar[str] = "daemon.stopping"
    reason: str


Payload = (
    SandboxCreated
    | ProcessStarted
    | SandboxRunning
    | StartFailed
    | SandboxPaused
    | SandboxResumed
    | SandboxUnhealthy
    | SandboxHealthy
    | SandboxExited
    | SandboxAdopted
    | SandboxMissing
    | SandboxDeleted
    | SandboxIdle
    | SandboxActive
    | SandboxRestarted
    | DaemonStarted
    | DaemonStopping
)

PAYLOAD_TYPES: tuple[type[Payload], ...] = (
    SandboxCreated,
    ProcessStarted,
    SandboxRunning,
    StartFailed,
    SandboxPaused,
    SandboxResumed,
    SandboxUnhealthy,
    SandboxHealthy,
    SandboxExited,
    SandboxAdopted,
    SandboxMissing,
    SandboxDeleted,
    SandboxIdle,
    SandboxActive,
    SandboxRestarted,
    DaemonStarted,
    DaemonStopping,
)

#: Wire name -> payload class.
BY_TYPE: dict[str, type[Payload]] = {cls.TYPE: cls for cls in PAYLOAD_TYPES}

EVENT_TYPES: frozenset[str] = frozenset(BY_TYPE)


class Event(msgspec.Struct, frozen=True, gc=False):
    """One record of the log: a payload with the place and time the log gave it."""

    seq: int
    ts: str  # RFC 3339, UTC, microseconds: "2026-11-26T11:32:19.123456Z"
    sandbox_id: str | None
    by: str | None  # the user whose op caused it; None for the daemon itself
    data: Payload

    @property
    def type(self) -> str:
        return self.data.TYPE


class PendingEvent(msgspec.Struct, frozen=True, gc=False):
    """An event handed to the log, before the log has given it a seq and a time."""

    sandbox_id: str | None
    by: str | None
    data: Payload
