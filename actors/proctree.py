"""A sandbox's processes as /proc shows them: naming them, finding them, signalling them.

This module knows processes, not sandboxes' history: it never touches the event
log. The actor records what these functions did.

Two rules run through it:

- A process is identified by its pid *and* its OS start time, never by the pid
  alone (:class:`ProcessId`). A pid whose start time differs is somebody
  else's process and is never signalled.
- A sandbox is more than its process group. Every process of a sandbox inherits
  ``SANDBOX_ID=<id>`` in its environment (the same trick as Jenkins' process
  tree killer), so a descendant that double-forked and called ``setsid`` is
  still found by scanning ``/proc/<pid>/environ``.

This is the fallback boundary (``markers``), for hosts with no writable cgroup
hierarchy: where a cgroup holds the tree (actors/boundary/), the environment
is not trusted to find anything.

A second marker, ``SANDBOXD_DAEMON=sandboxd-<hash of the state dir>``, tells
whose sandbox it is: sandbox ids are chosen by clients, so two daemons on one
machine may both have a sandbox "build-1". It is the name the daemon's cgroups
would have, never the state dir's path: a sandbox is not told where the
daemon keeps its secrets. Pass it as ``daemon_marker`` and only processes
carrying both markers are taken for the sandbox's.

A sandbox's main process (the tree's root) is a session leader (see
``spawn``), so its process group number is its pid, and it cannot move to
another group.

Linux only: it reads ``/proc`` and uses pidfds.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
from collections.abc import Callable, Iterable

import attrs
import psutil
import trio

#: The environment variable that marks every process of a sandbox: which sandbox.
MARKER_VAR = "SANDBOX_ID"
#: The environment variable that says which daemon a sandbox belongs to (markers only).
DAEMON_MARKER = "SANDBOXD_DAEMON"

_MARKER_PREFIX = MARKER_VAR.encode() + b"="
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_STOPPED = frozenset("Tt")  # 'T' stopped by a signal, 't' stopped by a tracer
_DEAD = frozenset("ZX")  # a zombie holds a pid but nothing else: it counts as gone


@attrs.frozen
class ProcessId:
    """One process, for its whole life: its pid and when it started.

    ``start_ticks`` is field 22 of ``/proc/PID/stat``, clock ticks after boot:
    exact, and fixed for the life of the process. The log records the start as
    ``create_time``, seconds since the epoch (psutil's arithmetic: ticks divided
    by the clock rate, plus the boot time), which converts back exactly.
    """

    pid: int
    start_ticks: int

    @classmethod
    def from_create_time(cls, pid: int, create_time: float) -> ProcessId:
        """The process the log recorded with this pid and ``create_time``."""
        return cls(pid, round((create_time - float(psutil.boot_time())) * _CLOCK_TICKS))

    @property
    def create_time(self) -> float:
        """The start as the log records it; equal to psutil's ``create_time()``."""
        return self.start_ticks / _CLOCK_TICKS + float(psutil.boot_time())


@attrs.frozen
class ExitStatus:
    """How a process ended: an exit code, or the signal that killed it.

    Both are None when the process was not the daemon's child (adopted after a
    restart): only a parent can read the status of its child.
    """

    exit_code: int | None
    signal: int | None


class TreeStateTimeout(Exception):
    """Some processes of a tree did not reach the wanted state within the bound."""

    def __init__(self, what: str, pids: Iterable[int]) -> None:
        self.pids = sorted(pids)
        super().__init__(f"{what}: pids {self.pids}")


# --- reading /proc -----------------------------------------------------------


@attrs.frozen
class _Stat:
    """What /proc/PID/stat says of a process right now."""

    state: str
    pgrp: int
    start_ticks: int


def _read_stat(pid: int) -> _Stat | None:
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    # comm (the 2nd field) may hold spaces and parentheses: split after the last ')'.
    fields = data[data.rfind(b")") + 2 :].split()
    if len(fields) < 20:
        return None
    # fields[0] is field 3 of proc(5): state; 5: pgrp; 22: starttime.
    return _Stat(state=chr(fields[0][0]), pgrp=int(fields[2]), start_ticks=int(fields[19]))


def _read_environ(pid: int) -> bytes:
    """The environment a process was started with; b"" if unreadable or a zombie."""
    try:
        fd = os.open(f"/proc/{pid}/environ", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return b""
    try:
        parts = []
        while chunk := os.read(fd, 65536):
            parts.append(chunk)
        return b"".join(parts)
    except OSError:
        return b""
    finally:
        os.close(fd)


def _marker_of(environ: bytes) -> bytes | None:
    """The value of the first SANDBOX_ID variable in a NUL-separated environ block."""
    if environ.startswith(_MARKER_PREFIX):
        start = len(_MARKER_PREFIX)
    else:
        i = environ.find(b"\0" + _MARKER_PREFIX)
        if i < 0:
            return None
        start = i + 1 + len(_MARKER_PREFIX)
    end = environ.find(b"\0", start)
    return environ[start:] if end < 0 else environ[start:end]


class _Markers:
    """Tells whether an environ block carries given variables with given values."""

    def __init__(self, **wanted: str | None) -> None:
        # A variable starts the block or follows a NUL, and ends with a NUL.
        self._needles = [
            (needle, b"\0" + needle)
            for name, value in wanted.items()
            if value is not None
            for needle in [name.encode() + b"=" + value.encode() + b"\0"]
        ]

    def __call__(self, environ: bytes) -> bool:
        return all(
            environ.startswith(needle) or inner in environ for needle, inner in self._needles
        )


def _sandbox_markers(sandbox_id: str | None, daemon_marker: str | None) -> _Markers:
    return _Markers(**{MARKER_VAR: sandbox_id, DAEMON_MARKER: daemon_marker})


def _proc_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _stat_of(process: ProcessId) -> _Stat | None:
    """/proc/PID/stat of this very process; None if its pid is free or another's now."""
    stat = _read_stat(process.pid)
    return stat if stat is not None and stat.start_ticks == process.start_ticks else None


def state_of(process: ProcessId) -> str | None:
    """The state letter of this very process (R, S, T...); None if it is gone or a zombie."""
    stat = _stat_of(process)
    return None if stat is None or stat.state in _DEAD else stat.state


def state_of_pid(pid: int) -> str | None:
    """The state letter of whatever process holds ``pid`` now; None if none or a zombie."""
    stat = _read_stat(pid)
    return None if stat is None or stat.state in _DEAD else stat.state


def is_stopped(state: str) -> bool:
    """Whether a state letter of :func:`state_of` is stopped (by a signal or a tracer)."""
    return state in _STOPPED


def is_alive(process: ProcessId) -> bool:
    """True if this very process (pid and start time) exists and is not a zombie."""
    return state_of(process) is not None


def process_id(pid: int) -> ProcessId | None:
    """The identity of whatever process holds ``pid`` now, zombie included; None if none."""
    stat = _read_stat(pid)
    return None if stat is None else ProcessId(pid, stat.start_ticks)


def open_pidfd(process: ProcessId) -> int | None:
    """A pidfd of this very process, which becomes readable once it exits; None if its pid
    is free or another's now. OSError ENOSYS where the kernel has none (before 5.3)."""
    # Open the pidfd first, then check the identity: if the check passes, the
    # process the pidfd refers to is the one named (it was born before we opened
    # and is still there after).
    try:
        fd = os.pidfd_open(process.pid)
    except ProcessLookupError:
        return None
    if _stat_of(process) is None:
        os.close(fd)
        return None
    return fd


async def poll_for_exit(process: ProcessId) -> None:
    """Return once ``process`` has exited (or is gone), where there are no pidfds: /proc,
    at growing intervals up to 1 s."""
    delay = 0.01
    while is_alive(process):
        await trio.sleep(delay)
        delay = min(delay * 2, 1.0)


def _signal(process: ProcessId, sig: int) -> None:
    """Signal this very process, or nothing if its pid now belongs to another."""
    try:
        fd = os.pidfd_open(process.pid)
    except ProcessLookupError:
        return
    except OSError as exc:
        if exc.errno != errno.ENOSYS:
            raise
        # No pidfds (kernel < 5.3): check, then kill; the gap is microseconds.
        if _stat_of(process) is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(process.pid, sig)
        return
    try:
        # Checked after opening: if the start time matches now, the pidfd holds
        # that very process (it was there before the open and after it).
        if _stat_of(process) is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                signal.pidfd_send_signal(fd, sig)
    finally:
        os.close(fd)


# --- a sandbox's tree --------------------------------------------------------


class _Tree:
    """The processes of one sandbox, tracked by identity across scans.

    Once a process is verified as the sandbox's (by its markers, or by
    membership of the group while the group is provably the sandbox's), it stays
    tracked by its exact identity, even if it later loses both (its group leader
    is reaped, it cleared its environment).
    """

    def __init__(self, root: ProcessId | None, sandbox_id: str, daemon_marker: str | None) -> None:
        # No root: the main process is gone or was never recorded; the markers
        # alone find what is left (group 0 is never taken for ours, see below).
        self.root = root or ProcessId(0, 0)
        self._marked = _sandbox_markers(sandbox_id, daemon_marker)
        #: Each tracked process, with the state and group the last read showed.
        self._tracked: dict[ProcessId, _Stat] = {}
        self._me = os.getpid()
        self._my_pgrp = os.getpgrp()

    @property
    def pgid(self) -> int:
        return self.root.pid  # the root is a session leader: its group is its pid

    def _group_is_ours(self) -> bool:
        """Whether the process group number still means this sandbox's group.

        True while the root (a session leader, which cannot change its group)
        exists with its start time, zombie included: the kernel does not reuse
        a number still held as a pid or pgid. Same once the root is gone, if a
        tracked process still holds the number.
        """
        pgid = self.pgid
        if pgid <= 1 or pgid == self._my_pgrp:
            return False  # never signal the daemon's own group, or every process
        root = _stat_of(self.root)
        if root is not None and root.pgrp == pgid:
            return True
        return any(stat.pgrp == pgid for stat in self._tracked.values())

    def refresh(self) -> dict[ProcessId, _Stat]:
        """Re-read the tracked processes only (cheap): the live ones, with their state."""
        alive: dict[ProcessId, _Stat] = {}
        for process in self._tracked:
            stat = _stat_of(process)
            if stat is not None and stat.state not in _DEAD:
                alive[process] = stat
        self._tracked = alive
        return dict(alive)

    def rescan(self) -> dict[ProcessId, _Stat]:
        """Scan all of /proc once: the tracked processes plus any new ones.

        Costs one getpgid() per process on the machine, one read of environ
        per process outside the group, and a read of stat per match only
        (under 20 ms for 1500 processes).
        """
        self.refresh()
        group_ours = self._group_is_ours()
        pgid = self.pgid
        known = {process.pid: process.start_ticks for process in self._tracked}
        found: dict[ProcessId, _Stat] = {}
        for pid in _proc_pids():
            if pid == self._me:
                continue
            try:
                maybe_in_group = group_ours and os.getpgid(pid) == pgid
            except OSError:
                continue  # gone since listdir
            if not maybe_in_group and pid not in known and not self._marked(_read_environ(pid)):
                continue
            stat = _read_stat(pid)
            if stat is None or stat.state in _DEAD:
                continue
            # stat is the authority on group and identity. A marker read before
            # it is read again after it: a pid is not reused twice in between.
            if (
                (group_ours and stat.pgrp == pgid)
                or known.get(pid) == stat.start_ticks
                or self._marked(_read_environ(pid))
            ):
                found[ProcessId(pid, stat.start_ticks)] = stat
        self._tracked = found
        return dict(found)

    def send(self, sig: int, processes: Iterable[ProcessId], *, group: bool = True) -> None:
        """Signal the group (if ``group``), and each listed process outside it.

        With ``group`` False, every listed process is signalled on its own.
        """
        group_ours = group and self._group_is_ours()
        if group_ours:
            # One kill(-pgid): atomic for the whole group, a process that forks
            # meanwhile cannot hand out an unsignalled child.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pgid, sig)
        for process in processes:
            stat = self._tracked.get(process)
            in_group = stat is not None and stat.pgrp == self.pgid
            if not (group_ours and in_group):
                _signal(process, sig)


def tree_members(
    root: ProcessId | None, sandbox_id: str, *, daemon_marker: str | None = None
) -> list[ProcessId]:
    """Every live process of a sandbox, from one scan of /proc: what pause and delete act on.

    That is its process group, while the group is provably the sandbox's (the
    root still exists with its start time), plus every process marked
    ``SANDBOX_ID=<sandbox_id>`` (and ``SANDBOXD_DAEMON=<daemon_marker>`` if
    given). Zombies are left out: they are gone but for a pid.
    """
    return list(_Tree(root, sandbox_id, daemon_marker).rescan())


def find_marked(
    daemon_marker: str | None = None, *, sandbox_id: str | None = None
) -> dict[str, list[ProcessId]]:
    """Live processes carrying a SANDBOX_ID marker, grouped by its value.

    For recovery sweeps. With ``daemon_marker``, only this daemon's (those that
    also carry ``SANDBOXD_DAEMON=<daemon_marker>``); with ``sandbox_id``,
    only that sandbox's. One pass over /proc, one read of each environ; a
    process of another user, unreadable, is skipped.
    """
    wanted = _sandbox_markers(sandbox_id, daemon_marker)
    me = os.getpid()
    found: dict[str, list[ProcessId]] = {}
    for pid in _proc_pids():
        if pid == me:
            continue
        # b"" for zombies, kernel threads and other users' processes.
        environ = _read_environ(pid)
        value = _marker_of(environ)
        if value is None or not wanted(environ):
            continue
        stat = _read_stat(pid)
        if stat is None or stat.state in _DEAD:
            continue
        # stat pinned the identity of the process at this pid; read the markers
        # again so that they are known to be that process's (and not a zombie's:
        # a zombie's environ reads empty).
        environ = _read_environ(pid)
        if _marker_of(environ) != value or not wanted(environ):
            continue
        key = sandbox_id if sandbox_id is not None else value.decode("utf-8", errors="replace")
        found.setdefault(key, []).append(ProcessId(pid, stat.start_ticks))
    return found


async def kill_processes(processes: Iterable[ProcessId], *, kill_timeout: float = 5.0) -> None:
    """SIGKILL each of these processes and wait until all are gone.

    For strays found by :func:`find_marked`. Each is signalled only if its pid
    still holds that very process. Raises TreeStateTimeout if some remain after
    ``kill_timeout`` seconds.
    """
    pending = list(processes)
    for process in pending:
        _signal(process, signal.SIGKILL)
    with trio.move_on_after(kill_timeout):
        delay = 0.001
        while pending := [p for p in pending if is_alive(p)]:
            await trio.sleep(delay)
            delay = min(delay * 2, 0.02)
        return
    raise TreeStateTimeout("not ended after SIGKILL", (p.pid for p in pending))


async def _rescan(tree: _Tree) -> dict[ProcessId, _Stat]:
    # A full scan takes milliseconds per thousand processes on the machine:
    # in a thread, the event loop keeps serving everyone else meanwhile.
    return await trio.to_thread.run_sync(tree.rescan)


async def _drive(
    tree: _Tree,
    sig: int,
    done: Callable[[_Stat], bool],
    bound: float,
    what: str,
) -> None:
    """Signal the tree until every process is ``done``, or raise TreeStateTimeout."""
    seen = await _rescan(tree)
    # Everyone gets the signal once, done or not: a SIGSTOP may be pending on a
    # process that still shows running, and SIGCONT must cancel it.
    tree.send(sig, seen)
    pending = [p for p, stat in seen.items() if not done(stat)]
    delay = 0.001
    with trio.move_on_after(bound):
        while True:
            if not pending:
                # Confirm with a full scan: a marked straggler outside the group
                # may have forked before it stopped.
                pending = [p for p, stat in (await _rescan(tree)).items() if not done(stat)]
                if not pending:
                    return
                tree.send(sig, pending)
            await trio.sleep(delay)
            delay = min(delay * 2, 0.02)
            pending = [p for p, stat in tree.refresh().items() if not done(stat)]
            if pending:
                tree.send(sig, pending)
    raise TreeStateTimeout(what, (p.pid for p in pending))


# The bounds below are part of the result (TreeStateTimeout names the pids that
# did not comply), not a cancellation the caller could apply from outside.


async def pause_tree(
    root: ProcessId,
    sandbox_id: str,
    *,
    daemon_marker: str | None = None,
    timeout: float = 1.0,  # noqa: ASYNC109
) -> None:
    """SIGSTOP every process of the sandbox; return once /proc shows each stopped.

    Raises TreeStateTimeout if some did not stop within ``timeout`` (for
    instance stuck in uninterruptible I/O); those already stopped stay stopped.
    """
    tree = _Tree(root, sandbox_id, daemon_marker)
    await _drive(tree, signal.SIGSTOP, lambda s: s.state in _STOPPED, timeout, "not stopped")


async def resume_tree(
    root: ProcessId,
    sandbox_id: str,
    *,
    daemon_marker: str | None = None,
    timeout: float = 1.0,  # noqa: ASYNC109
) -> None:
    """SIGCONT every process of the sandbox; return once none shows stopped.

    Raises TreeStateTimeout if some stayed stopped (held by a tracer).
    """
    tree = _Tree(root, sandbox_id, daemon_marker)
    await _drive(tree, signal.SIGCONT, lambda s: s.state not in _STOPPED, timeout, "still stopped")


async def terminate_tree(
    root: ProcessId | None,
    sandbox_id: str,
    *,
    stop_timeout: float,
    kill_timeout: float = 5.0,
    daemon_marker: str | None = None,
) -> bool:
    """End every process of the sandbox; return True if SIGKILL was needed.

    SIGTERM, then SIGCONT (systemd's order: a paused process cannot act on
    SIGTERM while stopped, and wakes up with it already pending) to the group
    and to each marked straggler. After ``stop_timeout`` seconds, SIGKILL to
    whatever is left, repeated until a full scan of /proc finds none. Raises
    TreeStateTimeout if processes remain ``kill_timeout`` seconds after that
    (uninterruptible sleep). Zombies count as gone: the main process's zombie is
    reaped by whoever waits on it (the actor's ``Child.wait``).

    Polls /proc between trio sleeps; each poll re-reads only the tracked pids, a
    full scan is made to confirm an empty tree.
    """
    tree = _Tree(root, sandbox_id, daemon_marker)
    members = list(await _rescan(tree))
    signalled: set[ProcessId] = set()

    def term(members: list[ProcessId]) -> None:
        # Once per process: to some programs a second SIGTERM means "force now".
        # So the group signal goes out once; processes that show up later are
        # signalled one by one.
        fresh = [p for p in members if p not in signalled]
        if fresh:
            tree.send(signal.SIGTERM, fresh, group=not signalled)
            tree.send(signal.SIGCONT, fresh, group=not signalled)
            signalled.update(fresh)

    with trio.move_on_after(stop_timeout):
        polls = 0
        while members:
            term(members)
            await trio.sleep(0.02)
            polls += 1
            members = list(tree.refresh())
            # A full scan when the tree looks empty, to confirm it, and every
            # quarter second: a process may fork while it shuts down, and its
            # child, outside the group or born after the group signal, needs its
            # own SIGTERM.
            if not members or polls % 12 == 0:
                members = list(await _rescan(tree))
        return False

    with trio.move_on_after(kill_timeout):
        while members:
            tree.send(signal.SIGKILL, members)
            delay = 0.001
            while tree.refresh():
                await trio.sleep(delay)
                delay = min(delay * 2, 0.02)
            # A marked straggler outside the group may have forked meanwhile.
            members = list(await _rescan(tree))
        return True
    raise TreeStateTimeout("not ended after SIGKILL", (p.pid for p in tree.refresh()))
