"""This daemon's cgroups: one parent per hierarchy, one child cgroup per sandbox.

The sandbox's v2 cgroup *is* its process tree: every process it starts stays in
it whatever it does to its environment, session or parent (only a process
allowed to write some other cgroup.procs can leave, and a sandbox's uid is not).
So:

- membership: ``cgroup.procs``;
- kill: ``cgroup.kill`` (Linux 5.14+), else freeze, SIGKILL every member, thaw:
  frozen, nothing can fork meanwhile, so one pass reaches every process;
- pause: ``cgroup.freeze``, confirmed by ``frozen 1`` in ``cgroup.events``
  (the whole tree at once: no race with a tree that keeps forking, unlike
  SIGSTOP);
- gone: ``populated 0`` in ``cgroup.events``, noticed by one inotify watcher
  for all sandboxes (boundary/events.py).

Limits and usage come from the controllers the layout names (v2, or the v1
hierarchies of the hybrid layout): see boundary/discovery.py. Every file here is
kernfs, held in memory: reads and writes take microseconds, so they run on the
event loop, not in threads.

Layout on this project's CI machines (hybrid)::

    /sys/fs/cgroup/unified/sandboxd-<hash>/sb-<id>          tree, kill, freeze, events, cpu.stat
    /sys/fs/cgroup/memory/<daemon's>/sandboxd-<hash>/sb-<id>  memory limit, usage, oom kills
    /sys/fs/cgroup/pids/sandboxd-<hash>/sb-<id>             pids limit and count
    /sys/fs/cgroup/cpu/sandboxd-<hash>/sb-<id>              cpu quota

(``<daemon's>`` is the memory cgroup /proc/self/cgroup names for the daemon.)
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from collections.abc import Collection, Mapping
from pathlib import Path

import trio

from sandboxd.actors.boundary.cgroupfs import (
    CPU_PERIOD_USEC,
    Usage,
    cpu_quota_usec,
    daemon_dir_name,
    parse_events,
    parse_flat_keyed,
    parse_procs,
    sandbox_dir_name,
    sandbox_id_of,
    v2_cpu_max,
)
from sandboxd.actors.boundary.discovery import BoundaryMode, Layout
from sandboxd.actors.boundary.events import CgroupEventsWatcher, Watch
from sandboxd.actors.boundary.limits import Limits


class CgroupError(Exception):
    """A cgroup could not be made, changed or removed; the message says which and why."""


class CgroupTimeout(CgroupError):
    """The cgroup did not reach the wanted state in time; ``pids`` are its members then."""

    def __init__(self, message: str, pids: list[int]) -> None:
        self.pids = pids
        super().__init__(f"{message}: pids {pids[:20]}{' ...' if len(pids) > 20 else ''}")


# -- small file helpers: one syscall each, errors with the path --------------------------


def _read(path: str, *, whole: bool = True) -> str | None:
    """The file's text (None if it or its cgroup is gone); ``whole=False``: its first 64 KiB
    in one read, for the small files that fit (a syscall fewer)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        if not whole:
            return os.read(fd, 65536).decode("ascii", "replace")
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks).decode("ascii", "replace")
    except OSError as exc:
        if exc.errno == errno.ENODEV:  # the cgroup was removed under us
            return None
        raise
    finally:
        os.close(fd)


def _write(path: str, value: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise CgroupError(f"cannot open {path}: {exc.strerror}") from exc
    try:
        os.write(fd, value.encode())
    except OSError as exc:
        raise CgroupError(f"cannot write {value!r} to {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)


def _mkdir(path: str) -> bool:
    """Make a cgroup directory; False if it was already there."""
    try:
        os.mkdir(path)
    except FileExistsError:
        return False
    except OSError as exc:
        raise CgroupError(f"cannot make cgroup {path}: {exc.strerror}") from exc
    return True


def _rmdir(path: str) -> None:
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise CgroupError(f"cannot remove cgroup {path}: {exc.strerror}") from exc


def _procs(directory: str) -> list[int]:
    return parse_procs(_read(os.path.join(directory, "cgroup.procs")) or "")


# -- one sandbox's cgroup -------------------------------------------------------------------


class SandboxCgroup:
    """The cgroups of one sandbox: its v2 directory (the tree) and its controllers' dirs."""

    # One per sandbox: slots keep a thousand of them small (the daemon's RSS budget).
    __slots__ = ("_has_kill", "_watch", "controller_dirs", "limits", "sandbox_id", "tree_dir")

    def __init__(
        self,
        sandbox_id: str,
        tree_dir: str,
        controller_dirs: Mapping[str, str],
        watch: Watch,
        *,
        has_kill: bool,
    ) -> None:
        self.sandbox_id = sandbox_id
        self.tree_dir = tree_dir
        #: controller -> the directory whose files limit and count it (tree_dir when v2)
        self.controller_dirs = dict(controller_dirs)
        self._watch = watch
        self._has_kill = has_kill
        #: The limits last written (set_limits).
        self.limits = Limits()

    def __repr__(self) -> str:
        return f"<SandboxCgroup {self.sandbox_id!r} at {self.tree_dir}>"

    @property
    def dirs(self) -> list[str]:
        """Every directory of this sandbox, the tree's first, each once."""
        out = [self.tree_dir]
        for directory in self.controller_dirs.values():
            if directory not in out:
                out.append(directory)
        return out

    def procs_files(self) -> tuple[str, ...]:
        """The cgroup.procs files a child writes itself into, the tree's first.

        A v1 cpu cgroup is joined only when it holds a quota (``cpu_max``): a v1 cpu
        group weighs as much as one task against every task of the daemon's own cpu
        cgroup, so all sandboxes in it would share one task's CPU on a busy host
        (measured: 100 concurrent starts took 2.3 times as long as raw ones). Its CPU
        time is read from v2's cpu.stat whatever it joins.
        """
        skip = None
        cpu_dir = self.controller_dirs.get("cpu")
        if cpu_dir is not None and cpu_dir != self.tree_dir and self.limits.cpu_max is None:
            skip = cpu_dir
        return tuple(os.path.join(d, "cgroup.procs") for d in self.dirs if d != skip)

    # -- reading ---------------------------------------------------------------------------

    def pids(self) -> list[int]:
        """The processes in the tree now (not their threads)."""
        return _procs(self.tree_dir)

    def populated(self) -> bool:
        return self._watch.state().populated

    def frozen(self) -> bool:
        return self._watch.state().frozen

    @property
    def cpu_stat_path(self) -> str:
        """Its v2 ``cpu.stat`` (v2 keeps it with no controller): ``usage_usec``, its CPU."""
        return os.path.join(self.tree_dir, "cpu.stat")

    def cpu_seconds(self) -> float | None:
        """CPU its processes used so far, the ended ones' included: one small read."""
        # v2 keeps it with no controller. One read: the file is a few lines (the idle sweep
        # reads it for every watched sandbox).
        stat = _read(os.path.join(self.tree_dir, "cpu.stat"), whole=False)
        if stat is not None and "usage_usec" in (values := parse_flat_keyed(stat)):
            return values["usage_usec"] / 1e6
        if (cpu_dir := self.controller_dirs.get("cpu")) is not None:
            usage_ns = _read(os.path.join(cpu_dir, "cpuacct.usage"))  # v1 cpu,cpuacct
            return int(usage_ns) / 1e9 if usage_ns else None
        return None

    def usage(self) -> Usage:
        """CPU seconds so far, memory in use now, processes (and threads) now."""
        cpu = self.cpu_seconds()
        memory: int | None = None
        if (memory_dir := self.controller_dirs.get("memory")) is not None:
            name = "memory.current" if memory_dir == self.tree_dir else "memory.usage_in_bytes"
            text = _read(os.path.join(memory_dir, name))
            memory = int(text) if text else None
        pids: int | None = None
        if (pids_dir := self.controller_dirs.get("pids")) is not None:
            text = _read(os.path.join(pids_dir, "pids.current"))
            pids = int(text) if text else None
        return Usage(cpu, memory, pids if pids is not None else len(self.pids()))

    def oom_kills(self) -> int | None:
        """How many processes the OOM killer has killed in this cgroup; None: no controller."""
        memory_dir = self.controller_dirs.get("memory")
        if memory_dir is None:
            return None
        name = "memory.events" if memory_dir == self.tree_dir else "memory.oom_control"
        text = _read(os.path.join(memory_dir, name))
        return parse_flat_keyed(text).get("oom_kill", 0) if text else 0

    def memory_limit(self) -> int | None:
        """The memory limit in force, in bytes; None if unlimited or no controller."""
        memory_dir = self.controller_dirs.get("memory")
        if memory_dir is None:
            return None
        v2 = memory_dir == self.tree_dir
        text = _read(os.path.join(memory_dir, "memory.max" if v2 else "memory.limit_in_bytes"))
        if not text or text.strip() == "max":
            return None
        value = int(text)
        return None if value >= 1 << 62 else value  # v1 says "unlimited" with a huge number

    # -- writing -----------------------------------------------------------------------------

    def set_limits(self, limits: Limits) -> None:
        """Write ``limits`` into the controllers present (None: no limit, written as such)."""
        self.limits = limits
        if (directory := self.controller_dirs.get("memory")) is not None:
            if directory == self.tree_dir:
                value = "max" if limits.memory_max is None else str(limits.memory_max)
                _write(os.path.join(directory, "memory.max"), value)
                swap = os.path.join(directory, "memory.swap.max")
                if os.path.exists(swap):  # memory_max means memory, not memory plus swap
                    _write(swap, "max" if limits.memory_max is None else "0")
            else:
                value = "-1" if limits.memory_max is None else str(limits.memory_max)
                memsw = os.path.join(directory, "memory.memsw.limit_in_bytes")
                has_memsw = os.path.exists(memsw)
                # memsw may never be below the memory limit: raise it first, lower it last.
                if has_memsw and limits.memory_max is None:
                    _write(memsw, "-1")
                _write(os.path.join(directory, "memory.limit_in_bytes"), value)
                if has_memsw and limits.memory_max is not None:
                    _write(memsw, value)
        if (directory := self.controller_dirs.get("pids")) is not None:
            value = "max" if limits.pids_max is None else str(limits.pids_max)
            _write(os.path.join(directory, "pids.max"), value)
        if (directory := self.controller_dirs.get("cpu")) is not None:
            if directory == self.tree_dir:
                _write(os.path.join(directory, "cpu.max"), v2_cpu_max(limits.cpu_max))
            else:
                _write(os.path.join(directory, "cpu.cfs_period_us"), str(CPU_PERIOD_USEC))
                quota = "-1" if limits.cpu_max is None else str(cpu_quota_usec(limits.cpu_max))
                _write(os.path.join(directory, "cpu.cfs_quota_us"), quota)

    def signal(self, sig: int) -> int:
        """Send ``sig`` to every process in the tree now; return how many got it.

        A pid read from cgroup.procs may be gone and reused by the time it is
        signalled: each is pinned with a pidfd first, and signalled only if the
        pid is still listed afterwards (then the pidfd's process is that member).
        """
        pidfds: dict[int, int] = {}
        try:
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    pidfds[pid] = os.pidfd_open(pid)
            members = set(self.pids())
            sent = 0
            for pid, fd in pidfds.items():
                if pid in members:
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(fd, sig)
                        sent += 1
            return sent
        finally:
            for fd in pidfds.values():
                os.close(fd)

    # -- waiting for the kernel --------------------------------------------------------------
    # Each bound below is part of the answer (CgroupTimeout names the members left).

    async def wait_empty(self) -> None:
        """Return once no process is left in the tree (zombies do not count)."""
        await self._watch.wait_until(lambda s: not s.populated)

    async def freeze(self, *, timeout: float = 1.0) -> None:  # noqa: ASYNC109
        """Freeze the whole tree; return once the kernel says every member is frozen."""
        _write(os.path.join(self.tree_dir, "cgroup.freeze"), "1")
        with trio.move_on_after(timeout):
            await self._watch.wait_until(lambda s: s.frozen)
            return
        raise CgroupTimeout(f"sandbox {self.sandbox_id!r} not frozen in {timeout} s", self.pids())

    async def thaw(self, *, timeout: float = 1.0) -> None:  # noqa: ASYNC109
        """Thaw the tree; return once the kernel says it is no longer frozen."""
        _write(os.path.join(self.tree_dir, "cgroup.freeze"), "0")
        with trio.move_on_after(timeout):
            await self._watch.wait_until(lambda s: not s.frozen)
            return
        raise CgroupTimeout(f"sandbox {self.sandbox_id!r} still frozen after {timeout} s", [])

    async def kill(self, *, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """SIGKILL every process in the tree; return once it is empty.

        ``cgroup.kill`` where the kernel has it (one write, atomic against forks).
        Otherwise: freeze, SIGKILL each member (a frozen task still dies of
        SIGKILL, and cannot fork), and again every 50 ms until cgroup.procs is
        empty (should the freeze not have taken: a task in uninterruptible
        sleep), then thaw.
        """
        with trio.move_on_after(timeout):
            if self._has_kill:
                _write(os.path.join(self.tree_dir, "cgroup.kill"), "1")
                await self.wait_empty()
                return
            with contextlib.suppress(CgroupTimeout):
                await self.freeze(timeout=min(1.0, timeout / 2))
            try:
                while True:
                    self.signal(signal.SIGKILL)
                    with trio.move_on_after(0.05):
                        await self.wait_empty()
                        break
            finally:
                _write(os.path.join(self.tree_dir, "cgroup.freeze"), "0")
            return
        raise CgroupTimeout(
            f"sandbox {self.sandbox_id!r} not empty {timeout} s after SIGKILL", self.pids()
        )

    async def terminate(self, *, stop_timeout: float, kill_timeout: float = 5.0) -> bool:
        """End the tree as delete does; return True if SIGKILL was needed.

        SIGTERM and SIGCONT to every member at once (the tree is frozen while
        they are sent, so no fork slips between the listing and the signals; a
        paused sandbox is thawed by it, and wakes with SIGTERM already pending),
        then ``cgroup.kill`` after ``stop_timeout`` seconds.
        """
        if not self.populated():
            return False
        with contextlib.suppress(CgroupTimeout):
            await self.freeze(timeout=min(1.0, stop_timeout or 1.0))
        self.signal(signal.SIGTERM)
        self.signal(signal.SIGCONT)
        _write(os.path.join(self.tree_dir, "cgroup.freeze"), "0")
        with trio.move_on_after(stop_timeout):
            await self.wait_empty()
            return False
        await self.kill(timeout=kill_timeout)
        return True

    def remove(self) -> None:
        """Remove every directory of this sandbox. Raises CgroupError if processes remain."""
        if self.populated():
            raise CgroupError(
                f"sandbox {self.sandbox_id!r}'s cgroup still holds processes {self.pids()[:20]}"
            )
        for directory in self.dirs:
            _rmdir(directory)


# -- this daemon's cgroups -----------------------------------------------------------------


class CgroupBoundary:
    """One per daemon: its parent cgroup in each hierarchy, and the events watcher.

    Run :meth:`run` in a nursery (``await nursery.start(boundary.run)``) before
    anything waits on a sandbox's cgroup.
    """

    def __init__(
        self,
        layout: Layout,
        name: str,
        controllers: Mapping[str, str],
        *,
        has_kill: bool,
        notes: tuple[str, ...],
    ) -> None:
        self.layout = layout
        #: the per-daemon parent's name (sandboxd-<hash of the state dir>)
        self.name = name
        #: controller -> the per-daemon parent dir where its limits are set
        self.controllers = dict(controllers)
        self.has_kill = has_kill
        self.notes = notes
        self.parent = os.path.join(layout.tree, name)
        self.watcher = CgroupEventsWatcher()
        self._open: dict[str, SandboxCgroup] = {}

    @property
    def mode(self) -> BoundaryMode:
        return "cgroup1" if any(d != self.parent for d in self.controllers.values()) else "cgroup2"

    @property
    def parents(self) -> list[str]:
        out = [self.parent]
        for directory in self.controllers.values():
            if directory not in out:
                out.append(directory)
        return out

    @classmethod
    def open(cls, layout: Layout, *, state_dir: Path | str) -> CgroupBoundary:
        """Make (or find again) this daemon's parent cgroups; raise CgroupError if it cannot.

        On a v2 host whose controllers must be enabled for the subtree, the daemon
        first moves itself into a leaf of its own cgroup if it has to: v2 lets a
        cgroup hand controllers to its children only while no process sits in it
        (systemd's delegation rules say the same).
        """
        name = daemon_dir_name(os.path.realpath(state_dir))
        notes: list[str] = []
        controllers: dict[str, str] = {}
        v2_wanted = sorted(layout.v2_controllers)
        enabled = _enable_controllers(layout.tree, v2_wanted, leaf=f"{name}-daemon", notes=notes)
        parent = os.path.join(layout.tree, name)
        made = _mkdir(parent)
        if not os.path.exists(os.path.join(parent, "cgroup.freeze")):
            if made:
                _rmdir(parent)
            raise CgroupError(
                f"{parent} has no cgroup.freeze: the cgroup boundary needs Linux 5.2 or later"
            )
        enabled = _enable_controllers(parent, enabled, leaf=None, notes=notes)
        for controller in enabled:
            controllers[controller] = parent
        for directory, names in layout.v1_dirs.items():
            v1_parent = os.path.join(directory, name)
            _mkdir(v1_parent)
            for controller in names:
                controllers[controller] = v1_parent
        has_kill = os.path.exists(os.path.join(parent, "cgroup.kill"))
        if not has_kill:
            notes.append("no cgroup.kill (Linux < 5.14): kill freezes, then signals each member")
        return cls(layout, name, controllers, has_kill=has_kill, notes=tuple(notes))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The events watcher's task: wakes every wait on a sandbox's cgroup."""
        await self.watcher.run(task_status=task_status)

    def _dirs_for(self, sandbox_id: str) -> tuple[str, dict[str, str]]:
        name = sandbox_dir_name(sandbox_id)
        return os.path.join(self.parent, name), {
            c: os.path.join(d, name) for c, d in self.controllers.items()
        }

    def create(self, sandbox_id: str, limits: Limits | None = None) -> SandboxCgroup:
        """The sandbox's cgroups, made (or found empty) and set to ``limits``.

        Raises CgroupError if they cannot be made, or already hold processes (a
        sandbox whose tree still runs is adopted, not created).
        """
        limits = limits or Limits()
        cgroup = self._open.get(sandbox_id)
        if cgroup is not None and not all(map(os.path.isdir, cgroup.dirs)):
            # Removed while empty between two processes of the sandbox (a restart): by
            # an operator's clean-up of empty cgroups, say. Made again, as the parents are.
            self.watcher.unwatch(cgroup._watch)
            del self._open[sandbox_id]
            cgroup = None
        made: list[str] = []
        try:
            if cgroup is None:
                self._ensure_parents()
                tree_dir, controller_dirs = self._dirs_for(sandbox_id)
                for directory in dict.fromkeys([tree_dir, *controller_dirs.values()]):
                    if _mkdir(directory):
                        made.append(directory)
                    elif _procs(directory):
                        raise CgroupError(
                            f"sandbox {sandbox_id!r}'s cgroup {directory} already holds processes"
                        )
                watch = self.watcher.watch(tree_dir)
                cgroup = SandboxCgroup(
                    sandbox_id, tree_dir, controller_dirs, watch, has_kill=self.has_kill
                )
            elif cgroup.populated():
                raise CgroupError(f"sandbox {sandbox_id!r}'s cgroup already holds processes")
            cgroup.set_limits(limits)
        except BaseException:
            if cgroup is not None and sandbox_id not in self._open:
                self.watcher.unwatch(cgroup._watch)
            for directory in reversed(made):
                with contextlib.suppress(CgroupError):
                    _rmdir(directory)
            raise
        self._open[sandbox_id] = cgroup
        return cgroup

    def _ensure_parents(self) -> None:
        """Make again a parent that someone removed while it was empty (an operator's
        clean-up of empty cgroups, say): nothing stops root from doing that, and the
        next sandbox's mkdir would fail. A stat each when they are there."""
        if not os.path.isdir(self.parent):
            _mkdir(self.parent)
            own = sorted(c for c, d in self.controllers.items() if d == self.parent)
            _enable_controllers(self.parent, own, leaf=None, notes=[])
        for directory in self.parents[1:]:
            if not os.path.isdir(directory):
                _mkdir(directory)

    def adopt(self, sandbox_id: str) -> SandboxCgroup | None:
        """The cgroup a sandbox already has (after a restart), or None if it has none."""
        if (cgroup := self._open.get(sandbox_id)) is not None:
            return cgroup
        tree_dir, controller_dirs = self._dirs_for(sandbox_id)
        try:
            watch = self.watcher.watch(tree_dir)
        except OSError:
            return None
        present = {c: d for c, d in controller_dirs.items() if os.path.isdir(d)}
        cgroup = SandboxCgroup(sandbox_id, tree_dir, present, watch, has_kill=self.has_kill)
        self._open[sandbox_id] = cgroup
        return cgroup

    def members(self, sandbox_id: str) -> list[int]:
        """The processes in a sandbox's tree now (none if it has no cgroup); no watch needed."""
        return _procs(self._dirs_for(sandbox_id)[0])

    def sandbox_ids(self) -> list[str]:
        """Every sandbox that has a cgroup (or a piece of one) under this daemon's parents."""
        found: set[str] = set()
        for parent in self.parents:
            try:
                names = os.listdir(parent)
            except FileNotFoundError:
                continue
            found.update(i for n in names if (i := sandbox_id_of(n)) is not None)
        return sorted(found)

    async def remove(self, cgroup: SandboxCgroup, *, kill_timeout: float = 5.0) -> None:
        """Kill what is left in a sandbox's cgroup and remove it."""
        if cgroup.populated():
            await cgroup.kill(timeout=kill_timeout)
        self.watcher.unwatch(cgroup._watch)
        self._open.pop(cgroup.sandbox_id, None)
        cgroup.remove()

    async def remove_strays(self, keep: Collection[str], *, kill_timeout: float = 5.0) -> list[str]:
        """Kill and remove every sandbox cgroup whose id is not in ``keep``; return those ids.

        For recovery: what no live sandbox owns goes. A piece left in a v1
        hierarchy only (a crash between two mkdirs) is empty and just removed.
        """
        removed = []
        for sandbox_id in self.sandbox_ids():
            if sandbox_id in keep:
                continue
            cgroup = self.adopt(sandbox_id)
            if cgroup is not None:
                await self.remove(cgroup, kill_timeout=kill_timeout)
            else:
                _, controller_dirs = self._dirs_for(sandbox_id)
                for directory in set(controller_dirs.values()):
                    _rmdir(directory)
            removed.append(sandbox_id)
        return removed

    def close(self, *, remove_parents: bool = False) -> None:
        """Stop watching; with ``remove_parents``, remove the per-daemon parents too (if empty).

        The daemon leaves its parents in place (its sandboxes may outlive it);
        tests remove them.
        """
        self.watcher.close()
        self._open.clear()
        if remove_parents:
            for directory in self.parents:
                _rmdir(directory)


def _enable_controllers(
    directory: str, controllers: list[str], *, leaf: str | None, notes: list[str]
) -> list[str]:
    """Enable ``controllers`` for ``directory``'s children; return those that are enabled.

    On EBUSY (processes in ``directory``, the v2 "no internal processes" rule) and
    with a ``leaf`` name, this process moves itself into ``directory/leaf`` once
    and tries again. A controller that still cannot be enabled is left out, and
    ``notes`` says why: its limits then fall back to rlimits.
    """
    control = os.path.join(directory, "cgroup.subtree_control")
    enabled = set((_read(control) or "").split())
    moved = False
    out = []
    for controller in controllers:
        if controller in enabled:
            out.append(controller)
            continue
        while True:
            try:
                _write(control, f"+{controller}")
                out.append(controller)
                break
            except CgroupError as exc:
                cause = exc.__cause__
                busy = isinstance(cause, OSError) and cause.errno == errno.EBUSY
                if busy and leaf is not None and not moved and os.getpid() in _procs(directory):
                    target = os.path.join(directory, leaf)
                    _mkdir(target)
                    _write(os.path.join(target, "cgroup.procs"), str(os.getpid()))
                    notes.append(f"moved the daemon into {target} to delegate controllers")
                    moved = True
                    continue
                notes.append(f"{controller} controller not enabled in {directory}: {exc}")
                break
    return out


def remove_daemon_cgroups(layout: Layout, *, state_dir: Path | str, timeout: float = 10.0) -> int:
    """Kill every process in a daemon's sandbox cgroups and remove them, its parents too.

    Blocking, and it polls: for tests and benchmarks, which end what a daemon
    (even one killed with SIGKILL) left, and for an operator removing a daemon
    for good. Returns how many sandbox cgroups there were. Raises CgroupError
    if processes remain after ``timeout`` seconds.
    """
    name = daemon_dir_name(os.path.realpath(state_dir))
    parents = [os.path.join(layout.tree, name)]
    parents += [os.path.join(d, name) for d in layout.v1_dirs]
    tree_parent = parents[0]
    deadline = time.monotonic() + timeout
    try:
        children = sorted(n for n in os.listdir(tree_parent) if sandbox_id_of(n) is not None)
    except FileNotFoundError:
        children = []
    directories = [os.path.join(tree_parent, child) for child in children]
    found = len(directories)
    # Every cgroup's processes are killed first, then each is waited for: the kernel ends
    # them all meanwhile, rather than one poll after another (1,000 sandboxes took more
    # than the timeout in polls alone).
    for directory in directories:
        _kill_members(directory, _procs(directory))
    for directory in directories:
        # Until the kernel says it is empty: a process may have left cgroup.procs while
        # it still holds the cgroup, exiting (rmdir would fail with EBUSY).
        while _populated(directory):
            pids = _procs(directory)
            if time.monotonic() > deadline:
                raise CgroupError(f"{directory} still holds processes {pids[:20]}")
            time.sleep(0.01)
            _kill_members(directory, pids)
    for parent in parents:
        try:
            names = [n for n in os.listdir(parent) if sandbox_id_of(n) is not None]
        except FileNotFoundError:
            continue
        for child in names:
            _rmdir(os.path.join(parent, child))
        _rmdir(parent)
    return found


def _populated(directory: str) -> bool:
    """Whether a v2 cgroup still holds a process (its cgroup.events; gone: no)."""
    text = _read(os.path.join(directory, "cgroup.events"))
    return text is not None and parse_events(text).populated


def _kill_members(directory: str, pids: list[int]) -> None:
    """SIGKILL the processes of one cgroup (``pids``, its members): ``cgroup.kill`` where the
    kernel has it, else each of them, then a thaw so that frozen ones go on to die."""
    if not pids:
        return
    kill = os.path.join(directory, "cgroup.kill")
    if os.path.exists(kill):
        _write(kill, "1")
        return
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _write(os.path.join(directory, "cgroup.freeze"), "0")
