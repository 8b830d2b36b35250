"""The idle sweep: which RUNNING sandboxes are idle, for how long, and when their time is up.

A sandbox whose spec has an ``idle_timeout`` is *idle* in a sweep's window
(from the previous sweep to this one) when both hold:

- no ESTABLISHED TCP connection has one of its ports as its local port at
  the sweep (IPv4 or IPv6: the kernel's tables, ``/proc/net/tcp{,6}``), and
- its whole process tree used less than its spec's ``idle_cpu_seconds`` of
  CPU in the window: its cgroup's usage counter (the ended processes' CPU
  included), or, under the markers boundary, its main process and every
  descendant as /proc shows them at each end of the window.

Its idle period begins at the start of the first idle window (never before
the sandbox's last change: a resume, or the ``sandbox.active`` that ended the
previous period), and ends at the first window that is not idle. Each begin
and end is an event (``sandbox.idle`` with the time, ``sandbox.active``), so
a restarted daemon continues the period from the log; once the period has
lasted ``idle_timeout``, at a sweep that still finds it idle, the actor does
``on_idle`` (pause or delete) with a reason that says what was seen.

Cost: one sweep for all sandboxes per ``idle_check_interval``, in one worker
thread: two reads of the kernel's TCP tables, one read of ``cpu.stat`` per
watched sandbox (one pass over /proc for all of those under markers). Measured
here with 1,000 watched sandboxes: about 25 ms a sweep (bench/sandboxes.py).

The judgement (``IdleSweep.judge``) is plain code over samples, without I/O;
``measure`` is the I/O. The sweep does not block on an actor: its verdict
goes to a full mailbox not at all, and the next sweep decides again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import attrs
import psutil

from sandboxd.actors.boundary.trees import SandboxTree
from sandboxd.actors.specs import SpecConfig
from sandboxd.events.projection import SandboxRecord

log = logging.getLogger(__name__)

#: The kernel's tables of TCP sockets, one line each (the first is a header).
TCP_TABLES = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
#: ``st`` of an ESTABLISHED socket in those tables (include/net/tcp_states.h).
_ESTABLISHED = "01"
_TS_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


# -- what the kernel says --------------------------------------------------------------------


def established_ports(table: str) -> set[int]:
    """The local ports of the ESTABLISHED sockets in one ``/proc/net/tcp{,6}`` text.

    A line is ``sl local_address rem_address st ...``, the addresses
    ``HEXADDR:HEXPORT``. A connection *to* a sandbox's port has that port as
    its local one; a connection the sandbox makes has an ephemeral local port,
    which the kernel never takes from a port something listens on.
    """
    ports: set[int] = set()
    for line in table.splitlines()[1:]:
        fields = line.split(None, 4)
        if len(fields) >= 4 and fields[3] == _ESTABLISHED:
            ports.add(int(fields[1].rpartition(":")[2], 16))
    return ports


def read_established_ports() -> set[int]:
    ports: set[int] = set()
    for table in TCP_TABLES:
        try:
            ports |= established_ports(table.read_text())
        except FileNotFoundError:
            continue  # a kernel without IPv6
    return ports


def cpu_of_process_trees(roots: dict[str, int]) -> dict[str, float]:
    """CPU seconds used so far by each root process and its descendants now, by name.

    One pass over every process (psutil's process_iter), for every root at once;
    the markers boundary's stand-in for a cgroup's counter. An ended process's
    CPU leaves the sum (so the sweep never counts less than nothing).
    """
    children: dict[int, list[int]] = {}
    cpu: dict[int, float] = {}
    for process in psutil.process_iter(["ppid", "cpu_times"]):
        times = process.info["cpu_times"]
        if times is None:
            continue  # gone, or not ours to read
        cpu[process.pid] = times.user + times.system + times.children_user + times.children_system
        children.setdefault(process.info["ppid"], []).append(process.pid)
    totals: dict[str, float] = {}
    for name, root in roots.items():
        total, todo = 0.0, [root]
        while todo:
            pid = todo.pop()
            total += cpu.get(pid, 0.0)
            todo.extend(children.get(pid, ()))
        totals[name] = total
    return totals


# -- the sweep -----------------------------------------------------------------------------


@attrs.frozen
class Watched:
    """A sandbox the sweep looks at: RUNNING, its spec has an idle_timeout."""

    record: SandboxRecord
    spec: SpecConfig
    tree: SandboxTree | None


@attrs.frozen
class Sample:
    """What one sweep measured of one sandbox, and when (wall clock: it must mean the same
    to the next daemon)."""

    at: float  # seconds since the epoch
    cpu: float | None  # CPU seconds its tree used so far; None: could not be read
    connected: tuple[int, ...]  # its ports with an ESTABLISHED connection


@attrs.frozen
class IdleVerdict:
    """The sweep's finding about one sandbox, for its actor to record (mailbox.IdleCheck).

    ``version`` is the record's when it was judged: a verdict about a sandbox that
    changed since is stale, and the actor drops it.
    """

    version: int
    idle: bool
    reason: str  # what was seen in the window
    since: str | None = None  # with idle: when the idle period began
    expired: str | None = None  # the idle period lasted idle_timeout: why on_idle is done


def measure(watched: Sequence[Watched], now: float) -> dict[str, Sample]:
    """One sample of each watched sandbox: the sweep's I/O, for a worker thread."""
    established = read_established_ports()
    cpu: dict[str, float | None] = {}
    by_proc: dict[str, int] = {}
    for w in watched:
        used = w.tree.cpu_seconds() if w.tree is not None else None
        if used is None and w.record.pid is not None:
            by_proc[w.record.id] = w.record.pid
        cpu[w.record.id] = used
    if by_proc:
        cpu |= cpu_of_process_trees(by_proc)
    return {
        w.record.id: Sample(
            now,
            cpu[w.record.id],
            tuple(p.port for p in w.record.named_ports if p.port in established),
        )
        for w in watched
    }


class IdleSweep:
    """Judges each watched sandbox against its previous sample; keeps the latest ones."""

    def __init__(self) -> None:
        self._last: dict[str, Sample] = {}

    def sweep(
        self, watched: Iterable[Watched], samples: dict[str, Sample]
    ) -> list[tuple[str, IdleVerdict]]:
        """The verdicts of one sweep: only where something is to be recorded or done."""
        last, self._last = self._last, {}
        verdicts = []
        for w in watched:
            sample = samples.get(w.record.id)
            if sample is None:
                continue
            self._last[w.record.id] = sample  # a sandbox no longer watched is forgotten
            before = last.get(w.record.id)
            if before is not None and (verdict := judge(w, before, sample)) is not None:
                verdicts.append((w.record.id, verdict))
        return verdicts


def judge(watched: Watched, before: Sample, now: Sample) -> IdleVerdict | None:
    """What the window from ``before`` to ``now`` says of the sandbox, if anything new."""
    record, spec = watched.record, watched.spec
    assert spec.idle_timeout is not None
    if before.cpu is None or now.cpu is None:
        return None  # no evidence either way: judged again at the next sweep
    window = now.at - before.at
    used = max(0.0, now.cpu - before.cpu)
    cpu = f"CPU {used:.2f} s {'>=' if used >= spec.idle_cpu_seconds else '<'}"
    cpu += f" {spec.idle_cpu_seconds:g} s in {window:.1f} s"
    if now.connected:
        active = f"a connection to port {', '.join(map(str, now.connected))}"
        return IdleVerdict(record.version, False, active) if record.idle_since else None
    if used >= spec.idle_cpu_seconds:
        return IdleVerdict(record.version, False, cpu) if record.idle_since else None
    ports = ", ".join(str(p.port) for p in record.named_ports)
    reason = f"no connection to port {ports}, {cpu}"
    since = record.idle_since
    if since is None:
        # Not before its last change: a resume, or the sandbox.active that ended the last.
        since = format_ts(max(before.at, parse_ts(record.updated_at)))
    idle_for = now.at - parse_ts(since)
    expired = None
    if idle_for >= spec.idle_timeout:
        expired = f"idle since {since} for {idle_for:.0f} s: {reason}"
    elif record.idle_since is not None:
        return None  # still idle, nothing new to record
    return IdleVerdict(record.version, True, reason, since, expired)


def parse_ts(ts: str) -> float:
    """Seconds since the epoch of an RFC 3339 time the log wrote (codec.now_ts)."""
    return datetime.strptime(ts, _TS_FORMAT).replace(tzinfo=UTC).timestamp()


def format_ts(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime(_TS_FORMAT)
