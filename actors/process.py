"""Process control for sandboxes: spawn, watch, find, pause, resume and end process trees.

This module knows processes, not sandboxes' history: it never touches the event
log. The actor records what these functions did.

Two rules run through it:

- A process is identified by its pid *and* its OS start time, never by the pid
  alone. A pid whose start time differs is somebody else's process and is never
  signalled.
- A sandbox is more than its process group. Every process of a sandbox inherits
  ``SANDBOX_ID=<id>`` in its environment (the same trick as Jenkins' process
  tree killer), so a descendant that double-forked and called ``setsid`` is
  still found by scanning ``/proc/<pid>/environ``.

A second marker, ``SANDBOXD_STATE_DIR=<the daemon's state dir>``, tells whose
sandbox it is: sandbox ids are chosen by clients, so two daemons on one machine
may both have a sandbox "build-1". Pass it as ``daemon_marker`` and only
processes carrying both markers are taken for the sandbox's.

Linux only: it reads ``/proc`` and uses pidfds.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
from collections.abc import Callable, Iterable

import attrs
import psutil
import trio

#: The environment variable that marks every process of a sandbox: which sandbox.
MARKER_VAR = "SANDBOX_ID"
#: The environment variable that says which daemon (its state dir) a sandbox belongs to.
DAEMON_MARKER = "SANDBOXD_STATE_DIR"

#: psutil's create_time has a resolution of one clock tick (0.01 s on Linux).
CREATE_TIME_TOLERANCE = 0.01

_MARKER_PREFIX = MARKER_VAR.encode() + b"="
_DAEMON_PREFIX = DAEMON_MARKER.encode() + b"="
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_STOPPED = frozenset("Tt")  # 'T' stopped by a signal, 't' stopped by a tracer
_DEAD = frozenset("ZX")  # a zombie holds a pid but nothing else: it counts as gone


@attrs.frozen
class ProcessHandle:
    """What the log records about a sandbox's main process."""

    pid: int
    pgid: int
    create_time: float  # psutil's create_time(): seconds since the epoch


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


@attrs.frozen(eq=False)
class SpawnedProcess:
    """A sandbox's main process, started by this daemon (so it is our child)."""

    process: trio.Process
    handle: ProcessHandle
    output_path: str
    output_cap_bytes: int

    async def wait(self) -> ExitStatus:
        """Wait for the process to exit and reap it. Cancelling leaves it running."""
        return _exit_status(await self.process.wait())


def _exit_status(returncode: int) -> ExitStatus:
    # subprocess encodes "killed by signal N" as -N.
    if returncode < 0:
        return ExitStatus(exit_code=None, signal=-returncode)
    return ExitStatus(exit_code=returncode, signal=None)


async def spawn(
    command: list[str],
    *,
    env: dict[str, str],
    cwd: str,
    output_path: str,
    output_cap_bytes: int,
) -> SpawnedProcess:
    """Start a sandbox's main process so that it never depends on the daemon.

    It gets its own session and process group (signalled as one, and no
    terminal hangup reaches it), reads /dev/null, and writes stdout and stderr
    straight into ``output_path``: no pipe that the daemon would have to drain,
    so a dead or slow daemon never blocks it. The file is opened with O_APPEND,
    which is what makes :func:`cap_output` safe while the child keeps writing.

    ``env`` is the whole environment (nothing is inherited) and must carry
    ``SANDBOX_ID``: without the marker the tree could not be found again.
    Raises OSError if the command cannot be executed.
    """
    if not command:
        raise ValueError("command must not be empty")
    if not env.get(MARKER_VAR):
        raise ValueError(f"env must carry {MARKER_VAR}: it is how the process tree is found")
    # Output left by an earlier process of this sandbox counts against the cap too.
    cap_output(output_path, output_cap_bytes)
    fd = os.open(output_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        # close_fds (Popen's default) keeps the daemon's log, sockets and
        # secrets out of the sandbox.
        process = await trio.lowlevel.open_process(
            command,
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    finally:
        os.close(fd)  # the child has its own copy
    # The child cannot be gone yet: until it is reaped it is at least a zombie,
    # whose start time /proc still shows.
    try:
        create_time = float(psutil.Process(process.pid).create_time())
    except psutil.Error:
        # Unreachable in practice; but nothing may run that the caller cannot name.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        raise
    # start_new_session makes the child a session and group leader: pgid == pid.
    handle = ProcessHandle(pid=process.pid, pgid=process.pid, create_time=create_time)
    return SpawnedProcess(process, handle, output_path, output_cap_bytes)


# --- output files ----------------------------------------------------------


def rotated_path(output_path: str) -> str:
    """Where :func:`cap_output` keeps the previous part of the output."""
    return output_path + ".1"


def cap_output(output_path: str, cap_bytes: int) -> bool:
    """Rotate ``output_path`` once it is over ``cap_bytes``; return True if it did.

    The newest ``cap_bytes`` bytes are copied to ``output_path + ".1"`` (the
    older rotation is replaced) and the file is truncated to zero. The child
    keeps its descriptor: because it was opened with O_APPEND, its next write
    lands at the new end, offset 0, instead of leaving a sparse hole the size of
    the old file. Bytes written between the last copy and the truncation (a few
    microseconds) are lost: the price of never making the child wait.

    On disk a sandbox's output then stays under about twice the cap, plus what
    the child writes between two calls. Nothing calls this on its own: the
    registry's sweep calls it (through :func:`cap_outputs`) once a second.
    Synchronous file I/O of at most ``cap_bytes``; run it in a thread for large
    caps.
    """
    try:
        if os.stat(output_path).st_size <= cap_bytes:
            return False
        src = os.open(output_path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    tmp = output_path + ".1.tmp"
    try:
        dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            end = os.fstat(src).st_size
            pos = max(0, end - cap_bytes)
            # Catch up a few times with what the child appended while we copied,
            # so that the loss window shrinks to the gap before ftruncate.
            for _ in range(3):
                pos = _copy_range(src, dst, pos, end)
                end = os.fstat(src).st_size
                if end <= pos:
                    break
            os.ftruncate(src, 0)
        finally:
            os.close(dst)
        os.replace(tmp, rotated_path(output_path))
    finally:
        os.close(src)
    return True


def _copy_range(src: int, dst: int, pos: int, end: int) -> int:
    while pos < end:
        chunk = os.pread(src, min(1 << 20, end - pos), pos)
        if not chunk:
            break
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst, view) :]
        pos += len(chunk)
    return pos


def cap_outputs(output_paths: Iterable[str], cap_bytes: int) -> int:
    """Rotate every one of ``output_paths`` that has grown past ``cap_bytes``.

    Blocking (a stat per file, a copy per rotation): the registry calls it
    from a worker thread once per sweep, for every sandbox at once. Returns
    how many files were rotated.
    """
    rotated = 0
    for path in output_paths:
        try:
            if os.stat(path).st_size > cap_bytes:
                rotated += cap_output(path, cap_bytes)
        except FileNotFoundError:
            continue
    return rotated


def read_output_tail(output_path: str, tail_bytes: int) -> tuple[str, bool]:
    """The last ``tail_bytes`` bytes of a sandbox's output, and whether there was more.

    Reads the rotated part first, then the current file. ``truncated`` is True
    when older output exists that is not returned (more on disk, or a rotation
    already dropped some). Invalid UTF-8 is replaced, and a character cut in half
    by the tail's start is dropped rather than shown as garbage.
    """
    if tail_bytes <= 0:
        return "", _output_size(output_path) > 0 or os.path.exists(rotated_path(output_path))
    current, current_more = _read_tail(output_path, tail_bytes)
    rotated_exists = os.path.exists(rotated_path(output_path))
    older = b""
    if rotated_exists and len(current) < tail_bytes:
        older, _ = _read_tail(rotated_path(output_path), tail_bytes - len(current))
    data = older + current
    # A rotation always drops the start of the output (it only keeps the newest
    # cap bytes), so if .1 exists something older is gone.
    truncated = current_more or rotated_exists
    if truncated:
        data = _drop_partial_utf8_start(data)
    return data.decode("utf-8", errors="replace"), truncated


def _output_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def _read_tail(path: str, n: int) -> tuple[bytes, bool]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return b"", False
    try:
        size = os.fstat(fd).st_size
        start = max(0, size - n)
        parts = []
        pos = start
        while pos < size:
            chunk = os.pread(fd, size - pos, pos)
            if not chunk:  # truncated under us by a rotation
                break
            parts.append(chunk)
            pos += len(chunk)
        return b"".join(parts), start > 0
    finally:
        os.close(fd)


def _drop_partial_utf8_start(data: bytes) -> bytes:
    # A UTF-8 character is at most 4 bytes: at most 3 continuation bytes
    # (0b10xxxxxx) can precede the first whole character.
    i = 0
    while i < 3 and i < len(data) and data[i] & 0xC0 == 0x80:
        i += 1
    return data[i:]


# --- reading /proc -----------------------------------------------------------


@attrs.frozen
class _Stat:
    state: str
    pgrp: int
    start_ticks: int  # clock ticks after boot: exact, unlike the float create_time


@attrs.frozen
class _Entry:
    """One process of a tree, as identified by a scan."""

    pid: int
    start_ticks: int
    pgrp: int
    state: str


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


def _sandbox_markers(sandbox_id: str, daemon_marker: str | None) -> _Markers:
    return _Markers(**{MARKER_VAR: sandbox_id, DAEMON_MARKER: daemon_marker})


def _proc_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _create_time(start_ticks: int) -> float:
    # The same arithmetic as psutil's create_time(), so values compare equal.
    return start_ticks / _CLOCK_TICKS + float(psutil.boot_time())


def _matches(handle: ProcessHandle, stat: _Stat | None) -> bool:
    return (
        stat is not None
        and abs(_create_time(stat.start_ticks) - handle.create_time) <= CREATE_TIME_TOLERANCE
    )


def is_alive(handle: ProcessHandle) -> bool:
    """True if this very process (pid and start time) exists and is not a zombie."""
    stat = _read_stat(handle.pid)
    return stat is not None and stat.state not in _DEAD and _matches(handle, stat)


async def wait_for_exit_pidfd(handle: ProcessHandle) -> ExitStatus | None:
    """Wait for a process that is not our child (adopted after a daemon restart).

    Returns None at once if the pid is gone or belongs to another process now;
    otherwise waits until it exits and returns ExitStatus(None, None), since
    only its parent can learn how it ended.
    """
    # Open the pidfd first, then check the identity: if the check passes, the
    # process the pidfd refers to is the one described by the handle (it was
    # born before we opened and is still there after).
    try:
        fd = os.pidfd_open(handle.pid)
    except ProcessLookupError:
        return None
    except OSError as exc:
        if exc.errno != errno.ENOSYS:
            raise
        return await _poll_for_exit(handle)  # no pidfds: kernel < 5.3
    try:
        if not _matches(handle, _read_stat(handle.pid)):
            return None
        # A pidfd becomes readable when the process exits (zombie included).
        await trio.lowlevel.wait_readable(fd)
        return ExitStatus(exit_code=None, signal=None)
    finally:
        os.close(fd)


async def _poll_for_exit(handle: ProcessHandle) -> ExitStatus | None:
    if not is_alive(handle):
        return None
    delay = 0.01
    while is_alive(handle):
        await trio.sleep(delay)
        delay = min(delay * 2, 1.0)
    return ExitStatus(exit_code=None, signal=None)


class _Tree:
    """The processes of one sandbox, tracked by (pid, start ticks) across scans.

    Once a process is verified as the sandbox's (by its markers, or by
    membership of the group while the group is provably the sandbox's), it stays
    tracked by its exact identity, even if it later loses both (its group leader
    is reaped, it cleared its environment).
    """

    def __init__(
        self, handle: ProcessHandle | None, sandbox_id: str, daemon_marker: str | None
    ) -> None:
        # No handle: the main process is gone or was never recorded; the markers
        # alone find what is left (pgid 0 is never taken for ours, see below).
        self.handle = handle or ProcessHandle(pid=0, pgid=0, create_time=0.0)
        self._marked = _sandbox_markers(sandbox_id, daemon_marker)
        self._tracked: dict[tuple[int, int], _Entry] = {}
        self._me = os.getpid()
        self._my_pgrp = os.getpgrp()

    def _group_is_ours(self) -> bool:
        """Whether the process group number still means this sandbox's group.

        True while the root (a session leader, which cannot change its group)
        exists with its start time, zombie included: the kernel does not reuse
        a number still held as a pid or pgid. Same once the root is gone, if a
        tracked process still holds the number.
        """
        pgid = self.handle.pgid
        if pgid <= 1 or pgid == self._my_pgrp:
            return False  # never signal the daemon's own group, or every process
        root = _read_stat(self.handle.pid)
        if root is not None and root.pgrp == pgid and _matches(self.handle, root):
            return True
        return any(e.pgrp == pgid for e in self._tracked.values())

    def refresh(self) -> list[_Entry]:
        """Re-read the tracked processes only (cheap): the live ones, with their state."""
        alive: dict[tuple[int, int], _Entry] = {}
        for key, entry in self._tracked.items():
            stat = _read_stat(entry.pid)
            if stat is None or stat.start_ticks != entry.start_ticks or stat.state in _DEAD:
                continue
            alive[key] = _Entry(entry.pid, stat.start_ticks, stat.pgrp, stat.state)
        self._tracked = alive
        return list(alive.values())

    def rescan(self) -> list[_Entry]:
        """Scan all of /proc once: the tracked processes plus any new ones.

        Costs one getpgid() per process on the machine, one read of environ
        per process outside the group, and a read of stat per match only
        (under 20 ms for 1500 processes).
        """
        self.refresh()
        group_ours = self._group_is_ours()
        pgid = self.handle.pgid
        known = {entry.pid: entry.start_ticks for entry in self._tracked.values()}
        found: dict[tuple[int, int], _Entry] = {}
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
                found[(pid, stat.start_ticks)] = _Entry(
                    pid, stat.start_ticks, stat.pgrp, stat.state
                )
        self._tracked = found
        return list(found.values())

    def send(self, sig: int, entries: list[_Entry], *, group: bool = True) -> None:
        """Signal the group (if ``group``), and each listed process outside it.

        With ``group`` False, every listed process is signalled on its own.
        """
        group_ours = group and self._group_is_ours()
        if group_ours:
            # One kill(-pgid): atomic for the whole group, a process that forks
            # meanwhile cannot hand out an unsignalled child.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.handle.pgid, sig)
        for entry in entries:
            if not (group_ours and entry.pgrp == self.handle.pgid):
                _signal_exact(entry, sig)


def _signal_exact(entry: _Entry, sig: int) -> None:
    """Signal this very process, or nothing if its pid now belongs to another."""
    try:
        fd = os.pidfd_open(entry.pid)
    except ProcessLookupError:
        return
    except OSError as exc:
        if exc.errno != errno.ENOSYS:
            raise
        # No pidfds (kernel < 5.3): check, then kill; the gap is microseconds.
        stat = _read_stat(entry.pid)
        if stat is not None and stat.start_ticks == entry.start_ticks:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(entry.pid, sig)
        return
    try:
        # Checked after opening: if the start time matches now, the pidfd holds
        # that very process (it was there before the open and after it).
        stat = _read_stat(entry.pid)
        if stat is not None and stat.start_ticks == entry.start_ticks:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                signal.pidfd_send_signal(fd, sig)
    finally:
        os.close(fd)


def _as_psutil(entries: Iterable[_Entry]) -> list[psutil.Process]:
    result = []
    for entry in entries:
        try:
            proc = psutil.Process(entry.pid)
        except psutil.Error:
            continue
        # psutil pinned the identity it saw; if the pid was reused since our
        # scan, the start time read now differs and the process is not ours.
        stat = _read_stat(entry.pid)
        if stat is not None and stat.start_ticks == entry.start_ticks:
            result.append(proc)
    return result


def _entry_of(proc: psutil.Process) -> _Entry | None:
    """The exact identity psutil pinned for ``proc``, in clock ticks."""
    try:
        ticks = round((proc.create_time() - psutil.boot_time()) * _CLOCK_TICKS)
    except psutil.Error:
        return None
    return _Entry(proc.pid, ticks, 0, "?")


def sandbox_processes(
    handle: ProcessHandle, sandbox_id: str, *, daemon_marker: str | None = None
) -> list[psutil.Process]:
    """Every live process of a sandbox, from one scan of /proc.

    That is its process group, while the group is provably the sandbox's (the
    root still exists with its start time), plus every process marked
    ``SANDBOX_ID=<sandbox_id>`` (and ``SANDBOXD_STATE_DIR=<daemon_marker>`` if
    given). Zombies are left out: they are gone but for a pid.
    """
    return _as_psutil(_Tree(handle, sandbox_id, daemon_marker).rescan())


def find_marked_processes(
    daemon_marker: str | None = None, *, sandbox_id: str | None = None
) -> dict[str, list[psutil.Process]]:
    """Live processes carrying a SANDBOX_ID marker, grouped by its value.

    For recovery sweeps. With ``daemon_marker``, only this daemon's (those that
    also carry ``SANDBOXD_STATE_DIR=<daemon_marker>``); with ``sandbox_id``,
    only that sandbox's. One pass over /proc, one read of each environ; a
    process of another user, unreadable, is skipped.
    """
    wanted = _Markers(**{MARKER_VAR: sandbox_id, DAEMON_MARKER: daemon_marker})
    me = os.getpid()
    found: dict[str, list[psutil.Process]] = {}
    for pid in _proc_pids():
        if pid == me:
            continue
        # b"" for zombies, kernel threads and other users' processes.
        environ = _read_environ(pid)
        value = _marker_of(environ)
        if value is None or not wanted(environ):
            continue
        try:
            proc = psutil.Process(pid)
        except psutil.Error:
            continue
        # psutil pinned the identity of the process it found at this pid; read
        # the markers again so that they are known to be that process's (and
        # not a zombie's: a zombie's environ reads empty).
        environ = _read_environ(pid)
        if _marker_of(environ) != value or not wanted(environ):
            continue
        key = sandbox_id if sandbox_id is not None else value.decode("utf-8", errors="replace")
        found.setdefault(key, []).append(proc)
    return found


async def kill_processes(procs: Iterable[psutil.Process], *, kill_timeout: float = 5.0) -> None:
    """SIGKILL each of these processes and wait until all are gone.

    For strays found by :func:`find_marked_processes`. Each is signalled only
    if its pid still holds the process psutil identified. Raises
    TreeStateTimeout if some remain after ``kill_timeout`` seconds.
    """
    entries = [entry for proc in procs if (entry := _entry_of(proc)) is not None]
    for entry in entries:
        _signal_exact(entry, signal.SIGKILL)
    with trio.move_on_after(kill_timeout):
        delay = 0.001
        while entries := [e for e in entries if _exists(e)]:
            await trio.sleep(delay)
            delay = min(delay * 2, 0.02)
        return
    raise TreeStateTimeout("not ended after SIGKILL", (e.pid for e in entries))


def _exists(entry: _Entry) -> bool:
    stat = _read_stat(entry.pid)
    return stat is not None and stat.start_ticks == entry.start_ticks and stat.state not in _DEAD


async def _rescan(tree: _Tree) -> list[_Entry]:
    # A full scan takes milliseconds per thousand processes on the machine:
    # in a thread, the event loop keeps serving everyone else meanwhile.
    return await trio.to_thread.run_sync(tree.rescan)


async def _drive(
    tree: _Tree,
    sig: int,
    done: Callable[[_Entry], bool],
    bound: float,
    what: str,
) -> None:
    """Signal the tree until every process is ``done``, or raise TreeStateTimeout."""
    entries = await _rescan(tree)
    # Everyone gets the signal once, done or not: a SIGSTOP may be pending on a
    # process that still shows running, and SIGCONT must cancel it.
    tree.send(sig, entries)
    pending = [e for e in entries if not done(e)]
    delay = 0.001
    with trio.move_on_after(bound):
        while True:
            if not pending:
                # Confirm with a full scan: a marked straggler outside the group
                # may have forked before it stopped.
                pending = [e for e in await _rescan(tree) if not done(e)]
                if not pending:
                    return
                tree.send(sig, pending)
            await trio.sleep(delay)
            delay = min(delay * 2, 0.02)
            pending = [e for e in tree.refresh() if not done(e)]
            if pending:
                tree.send(sig, pending)
    raise TreeStateTimeout(what, (e.pid for e in pending))


# The bounds below are part of the result (TreeStateTimeout names the pids that
# did not comply), not a cancellation the caller could apply from outside.


async def pause_tree(
    handle: ProcessHandle,
    sandbox_id: str,
    *,
    daemon_marker: str | None = None,
    timeout: float = 1.0,  # noqa: ASYNC109
) -> None:
    """SIGSTOP every process of the sandbox; return once /proc shows each stopped.

    Raises TreeStateTimeout if some did not stop within ``timeout`` (for
    instance stuck in uninterruptible I/O); those already stopped stay stopped.
    """
    tree = _Tree(handle, sandbox_id, daemon_marker)
    await _drive(tree, signal.SIGSTOP, lambda e: e.state in _STOPPED, timeout, "not stopped")


async def resume_tree(
    handle: ProcessHandle,
    sandbox_id: str,
    *,
    daemon_marker: str | None = None,
    timeout: float = 1.0,  # noqa: ASYNC109
) -> None:
    """SIGCONT every process of the sandbox; return once none shows stopped.

    Raises TreeStateTimeout if some stayed stopped (held by a tracer).
    """
    tree = _Tree(handle, sandbox_id, daemon_marker)
    await _drive(tree, signal.SIGCONT, lambda e: e.state not in _STOPPED, timeout, "still stopped")


async def terminate_tree(
    handle: ProcessHandle | None,
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
    reaped by whoever waits on it (the actor's :meth:`SpawnedProcess.wait`).

    Polls /proc between trio sleeps; each poll re-reads only the tracked pids, a
    full scan is made to confirm an empty tree.
    """
    tree = _Tree(handle, sandbox_id, daemon_marker)
    entries = await _rescan(tree)
    signalled: set[tuple[int, int]] = set()

    def term(entries: list[_Entry]) -> None:
        # Once per process: to some programs a second SIGTERM means "force now".
        # So the group signal goes out once; processes that show up later are
        # signalled one by one.
        fresh = [e for e in entries if (e.pid, e.start_ticks) not in signalled]
        if fresh:
            tree.send(signal.SIGTERM, fresh, group=not signalled)
            tree.send(signal.SIGCONT, fresh, group=not signalled)
            signalled.update((e.pid, e.start_ticks) for e in fresh)

    with trio.move_on_after(stop_timeout):
        polls = 0
        while entries:
            term(entries)
            await trio.sleep(0.02)
            polls += 1
            entries = tree.refresh()
            # A full scan when the tree looks empty, to confirm it, and every
            # quarter second: a process may fork while it shuts down, and its
            # child, outside the group or born after the group signal, needs its
            # own SIGTERM.
            if not entries or polls % 12 == 0:
                entries = await _rescan(tree)
        return False

    with trio.move_on_after(kill_timeout):
        while entries:
            tree.send(signal.SIGKILL, entries)
            delay = 0.001
            while tree.refresh():
                await trio.sleep(delay)
                delay = min(delay * 2, 0.02)
            # A marked straggler outside the group may have forked meanwhile.
            entries = await _rescan(tree)
        return True
    raise TreeStateTimeout("not ended after SIGKILL", (e.pid for e in tree.refresh()))
