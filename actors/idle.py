"""The idle sweep: which RUNNING sandboxes are idle, for how long, and when their time is up.

A sandbox whose spec has an ``idle_timeout`` is *idle* in a sweep's window
(from the previous sweep to this one) when both hold:

- no ESTABLISHED TCP connection has one of its ports as its local port at
  the sweep (IPv4 or IPv6: one sock_diag dump, ``connections.py``), and
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
thread: one sock_diag dump of the established connections in the sandboxes'
port range, one read of ``cpu.stat`` per watched sandbox (one pass over /proc
for all of those under markers). What one sweep costs at scale is
bench/sandboxes.py's ``idle_sweep_ms_1000`` (docs/performance.md).

The judgement (``judge``) is plain code over samples, without I/O;
``IdleSweep.measure`` is the I/O. The registry tells the verdicts to the
actors (``Registry.sweep_idle_forever``); one that cannot be told is judged
again at the next sweep.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

import attrs
import psutil

from sandboxd.actors import connections
from sandboxd.actors.boundary.trees import SandboxTree
from sandboxd.actors.specs import SpecConfig
from sandboxd.events.projection import SandboxRecord

log = logging.getLogger(__name__)

_TS_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


# -- what the kernel says --------------------------------------------------------------------


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


class CpuCounters:
    """Each watched sandbox's cgroup ``cpu.stat``, kept open from sweep to sweep.

    Read with one pread of a descriptor opened once: 2 us a sandbox, against 10
    for open, read and close (measured here), the most of a sweep at 1,000
    sandboxes. Used by the sweep's worker thread alone, which alone closes them
    (a sandbox no longer watched, a cgroup removed), so no descriptor is ever
    read after another thread closed and reused its number. Where descriptors
    run out (EMFILE), the file is read without keeping it.
    """

    def __init__(self) -> None:
        self._open: dict[str, tuple[str, int]] = {}  # sandbox id -> (path, descriptor)

    def read(self, sandbox_id: str, path: str) -> float | None:
        """CPU seconds from ``cpu.stat`` at ``path``; None if it is gone or says none."""
        entry = self._open.get(sandbox_id)
        if entry is not None and entry[0] != path:
            self._forget(sandbox_id)  # a new life of the id, with a new cgroup
            entry = None
        try:
            if entry is None:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                entry = self._open[sandbox_id] = (path, fd)
            text = os.pread(entry[1], 4096, 0)
        except OSError as exc:
            self._forget(sandbox_id)
            if exc.errno == errno.EMFILE:
                return None if (tree := _read_once(path)) is None else _usage_usec(tree)
            return None  # removed (ENODEV), or never there (ENOENT): no evidence
        return _usage_usec(text)

    def keep_only(self, sandbox_ids: Iterable[str]) -> None:
        """Close the descriptors of every sandbox but these."""
        for sandbox_id in self._open.keys() - set(sandbox_ids):
            self._forget(sandbox_id)

    def close(self) -> None:
        self.keep_only(())

    def _forget(self, sandbox_id: str) -> None:
        entry = self._open.pop(sandbox_id, None)
        if entry is not None:
            os.close(entry[1])


def _read_once(path: str) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)


def _usage_usec(text: bytes) -> float | None:
    # cpu.stat: "usage_usec N\nuser_usec N\n...", usage first.
    head, _, rest = text.partition(b"\n")
    key, _, value = head.partition(b" ")
    if key == b"usage_usec" and value.isdigit():
        return int(value) / 1e6
    for line in rest.split(b"\n"):
        key, _, value = line.partition(b" ")
        if key == b"usage_usec" and value.isdigit():
            return int(value) / 1e6
    return None


class IdleSweep:
    """Measures the watched sandboxes (``measure``, in a worker thread), then judges each
    against its previous sample (``sweep``); keeps the latest samples. ``close`` at the end."""

    def __init__(self) -> None:
        self._last: dict[str, Sample] = {}
        self._counters = CpuCounters()

    def measure(
        self, watched: Sequence[Watched], now: float, port_range: tuple[int, int]
    ) -> dict[str, Sample]:
        """One sample of each watched sandbox: the sweep's I/O, for a worker thread.
        ``port_range``: where every sandbox's ports are (the connections asked for)."""
        established = connections.established_ports(*port_range)
        cpu: dict[str, float | None] = {}
        by_proc: dict[str, int] = {}
        for w in watched:
            sandbox_id = w.record.id
            cgroup = w.tree.cgroup if w.tree is not None else None
            used = None
            if cgroup is not None:
                used = self._counters.read(sandbox_id, cgroup.cpu_stat_path)
                if used is None:
                    used = cgroup.cpu_seconds()  # v1's cpuacct, where v2 counts none
            elif w.record.pid is not None:
                by_proc[sandbox_id] = w.record.pid
            cpu[sandbox_id] = used
        self._counters.keep_only(cpu)
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

    def close(self) -> None:
        self._counters.close()

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
    """What the window from ``before`` to ``now`` says of the sandbox, if anything new.

    Its words are made only when there is something to say: most sandboxes at
    most sweeps are as they were (a thousand judged per sweep)."""
    record, spec = watched.record, watched.spec
    assert spec.idle_timeout is not None
    if before.cpu is None or now.cpu is None:
        return None  # no evidence either way: judged again at the next sweep
    used = max(0.0, now.cpu - before.cpu)
    busy = used >= spec.idle_cpu_seconds
    if now.connected or busy:
        if record.idle_since is None:
            return None  # active, as it was
        if now.connected:
            reason = f"a connection to port {', '.join(map(str, now.connected))}"
        else:
            reason = _cpu_words(used, spec.idle_cpu_seconds, now.at - before.at)
        return IdleVerdict(record.version, False, reason)
    since = record.idle_since
    if since is None:
        # Not before its last change: a resume, or the sandbox.active that ended the last.
        since = format_ts(max(before.at, parse_ts(record.updated_at)))
    idle_for = now.at - parse_ts(since)
    if record.idle_since is not None and idle_for < spec.idle_timeout:
        return None  # still idle, nothing new to record
    ports = ", ".join(str(p.port) for p in record.named_ports)
    reason = (
        f"no connection to port {ports},"
        f" {_cpu_words(used, spec.idle_cpu_seconds, now.at - before.at)}"
    )
    expired = None
    if idle_for >= spec.idle_timeout:
        expired = f"idle since {since} for {idle_for:.0f} s: {reason}"
    return IdleVerdict(record.version, True, reason, since, expired)


def _cpu_words(used: float, limit: float, window: float) -> str:
    return f"CPU {used:.2f} s {'>=' if used >= limit else '<'} {limit:g} s in {window:.1f} s"


def parse_ts(ts: str) -> float:
    """Seconds since the epoch of an RFC 3339 time the log wrote (codec.now_ts). The C
    parser: a tenth of strptime's time, which was most of a sweep of idle sandboxes."""
    return datetime.fromisoformat(ts).timestamp()


def format_ts(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime(_TS_FORMAT)
