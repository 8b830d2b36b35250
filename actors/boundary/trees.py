"""A sandbox's process tree on the boundary in force: its cgroup, or (the fallback) its markers.

The actor does a few things to its sandbox's processes: pause them, resume
them, end them (delete), and learn when none is left. With a cgroup the
kernel holds the tree: freeze and thaw act on every member at once and are
confirmed by ``cgroup.events``, delete is SIGTERM to every member then
``cgroup.kill``, and the tree is gone when ``populated`` turns 0 (noticed
through the one inotify watcher). Under the markers boundary the tree is the
main process's group and the processes carrying the sandbox's markers,
found through /proc (actors/proctree.py), and its life is the main process's.

``SandboxTree`` puts both behind the same few calls, so the actor does not
branch on the boundary; a timeout of either kind is a ``TreeStateTimeout``
naming the processes that did not comply.
"""

from __future__ import annotations

import signal

from sandboxd.actors import proctree
from sandboxd.actors.boundary.cgroupfs import Usage
from sandboxd.actors.boundary.cgroups import CgroupTimeout, SandboxCgroup
from sandboxd.actors.proctree import ProcessId, TreeStateTimeout


class SandboxTree:
    """The processes of one sandbox: its cgroup's members, or its marked processes."""

    __slots__ = ("_marker", "cgroup", "sandbox_id")  # one per sandbox

    def __init__(self, sandbox_id: str, *, cgroup: SandboxCgroup | None, marker: str) -> None:
        self.sandbox_id = sandbox_id
        #: None under the markers boundary.
        self.cgroup = cgroup
        #: The daemon's marker (proctree.DAEMON_MARKER), for the markers boundary.
        self._marker = marker

    def __repr__(self) -> str:
        return f"<SandboxTree {self.sandbox_id!r} {self.cgroup or 'by markers'}>"

    @property
    def cgroup_procs(self) -> tuple[str, ...]:
        """The cgroup.procs files a new process of the sandbox joins before it runs."""
        return self.cgroup.procs_files() if self.cgroup is not None else ()

    # -- what the actor does --------------------------------------------------------------

    async def pause(self, root: ProcessId) -> None:
        """Stop every process; return once the kernel (or /proc) says each is stopped."""
        if self.cgroup is None:
            await proctree.pause_tree(root, self.sandbox_id, daemon_marker=self._marker)
            return
        try:
            await self.cgroup.freeze()
        except CgroupTimeout as exc:
            raise TreeStateTimeout("not frozen", exc.pids) from None

    async def resume(self, root: ProcessId) -> None:
        """Let every process run again; return once none is stopped."""
        if self.cgroup is None:
            await proctree.resume_tree(root, self.sandbox_id, daemon_marker=self._marker)
            return
        try:
            await self.cgroup.thaw()
        except CgroupTimeout as exc:
            raise TreeStateTimeout("still frozen", exc.pids) from None

    async def terminate(self, root: ProcessId | None, *, stop_timeout: float) -> bool:
        """SIGTERM every process, SIGKILL after ``stop_timeout``; True if SIGKILL was needed.

        Returns once no process is left (zombies aside: the main process's is
        the actor's to reap).
        """
        if self.cgroup is None:
            return await proctree.terminate_tree(
                root, self.sandbox_id, stop_timeout=stop_timeout, daemon_marker=self._marker
            )
        try:
            return await self.cgroup.terminate(stop_timeout=stop_timeout)
        except CgroupTimeout as exc:
            raise TreeStateTimeout("not ended after SIGKILL", exc.pids) from None

    async def kill(self) -> None:
        """SIGKILL every member of its cgroup now (recovery: what the log never recorded)."""
        if self.cgroup is None:
            return  # under markers, recovery ends marked processes itself
        try:
            await self.cgroup.kill()
        except CgroupTimeout as exc:
            raise TreeStateTimeout("not ended after SIGKILL", exc.pids) from None

    async def wait_gone(self) -> None:
        """Once the main process has ended: return when the rest of the tree has too.

        With a cgroup, when it is empty (at once if it is already). Under markers
        the main process's end is the sandbox's: descendants that left its group
        are ended by delete, as they always were.
        """
        if self.cgroup is not None:
            await self.cgroup.wait_empty()

    # -- what the kernel says -------------------------------------------------------------

    def usage(self) -> Usage | None:
        """CPU seconds, memory and processes now; None under markers (no cgroup to ask)."""
        return self.cgroup.usage() if self.cgroup is not None else None

    def cpu_seconds(self) -> float | None:
        """CPU its cgroup's processes used so far; None under markers (actors/idle.py asks
        /proc there, for every sandbox at once)."""
        return self.cgroup.cpu_seconds() if self.cgroup is not None else None

    def oom_kills(self) -> int | None:
        """How many of its processes the OOM killer ended so far; None: nobody counts."""
        return self.cgroup.oom_kills() if self.cgroup is not None else None

    def memory_limit(self) -> int | None:
        return self.cgroup.memory_limit() if self.cgroup is not None else None

    # -- for recovery: the log wins over what the tree is found doing ----------------------

    def members(self) -> list[int]:
        """The pids in its cgroup now; empty under markers (ask /proc there)."""
        return self.cgroup.pids() if self.cgroup is not None else []

    def populated(self) -> bool:
        return self.cgroup is not None and self.cgroup.populated()

    def frozen(self) -> bool:
        return self.cgroup is not None and self.cgroup.frozen()

    def stopped(self) -> bool:
        """Whether some member is stopped by a signal (``kill -STOP`` by hand)."""
        if self.cgroup is None:
            return False
        states = (proctree.state_of_pid(pid) for pid in self.cgroup.pids())
        return any(state is not None and proctree.is_stopped(state) for state in states)

    def continue_all(self) -> int:
        """SIGCONT to every member (a cgroup tree's answer to ``kill -STOP`` by hand)."""
        return self.cgroup.signal(signal.SIGCONT) if self.cgroup is not None else 0
