"""Noticing that sandboxes' main processes have exited: one epoll descriptor for all of them.

A process's pidfd becomes readable once the process exits. A task per sandbox
waiting on its own (trio's ``Process.wait``) cost about 4 KB a sandbox at rest,
measured at 1,000: the task, its context and cancel scope, the six frames it
waited in, its lock (docs/performance.md). Here the pidfd of every watched
process is in one epoll descriptor, which one task waits on; once a process
has exited, the watcher calls what it was given for it, once, from that task,
and forgets it. What follows an exit (reaping, recording) is the caller's, in
a task that lives only as long as that takes.

Where a pidfd cannot be had (a kernel before 5.3; no descriptor left), that
watch is a task polling /proc instead (``proctree.poll_for_exit``).
"""

from __future__ import annotations

import errno
import logging
import os
import select
from collections.abc import Callable

import trio

from sandboxd.actors import proctree
from sandboxd.actors.proctree import ProcessId

log = logging.getLogger(__name__)


class ExitWatch:
    """One process watched: ``cancel`` it, and what it was given is never called."""

    __slots__ = ("_cancelled", "_watcher", "exited", "fd")

    def __init__(self, watcher: ExitWatcher, fd: int | None, exited: Callable[[], None]) -> None:
        self._watcher = watcher
        self.fd = fd  # its pidfd in the watcher's epoll; None: polled (no pidfds)
        self.exited = exited
        self._cancelled = False

    def cancel(self) -> None:
        self._cancelled = True
        self._watcher._forget(self)


class ExitWatcher:
    """The processes watched, by pidfd, and the one task that waits for their exits (``run``).

    Each process is named by pid and start time, so a pid taken by another process
    since is never watched by mistake. Its descriptors are closed when ``run`` ends.
    """

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._watches: dict[int, ExitWatch] = {}  # pidfd -> its watch
        self._pollers: trio.Nursery | None = None  # where the no-pidfd polls run
        self._polls_waiting: list[tuple[ProcessId, ExitWatch]] = []  # until ``run`` starts
        self._closed = False

    def __len__(self) -> int:
        return len(self._watches)

    def watch(self, process: ProcessId, exited: Callable[[], None]) -> ExitWatch | None:
        """Call ``exited`` once ``process`` has exited (a zombie has); None if it has already
        gone (its pid is free, or another process's): then nothing will be called. Once
        the watcher is closed (the daemon stops), nothing is watched any more."""
        if self._closed:
            return ExitWatch(self, None, exited)  # never called
        try:
            fd = proctree.open_pidfd(process)
        except OSError as exc:
            if exc.errno != errno.ENOSYS:
                log.warning("process %d: no pidfd (%s): its exit is polled", process.pid, exc)
            watch = ExitWatch(self, None, exited)
            if self._pollers is None:
                self._polls_waiting.append((process, watch))
            else:
                self._pollers.start_soon(self._poll, process, watch)
            return watch
        if fd is None:
            return None
        watch = ExitWatch(self, fd, exited)
        self._watches[fd] = watch
        self._epoll.register(fd, select.EPOLLIN)
        return watch

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Call each watch's ``exited`` once its process has exited, until cancelled."""
        try:
            async with trio.open_nursery() as self._pollers:
                for process, polled in self._polls_waiting:
                    self._pollers.start_soon(self._poll, process, polled)
                self._polls_waiting.clear()
                task_status.started()
                while True:
                    await trio.lowlevel.wait_readable(self._epoll.fileno())
                    for fd, _ in self._epoll.poll(0):
                        exited = self._watches.get(fd)
                        if exited is not None:
                            self._forget(exited)
                            self._call(exited)
        finally:
            self._close()

    def _close(self) -> None:
        """Forget every watch and close the descriptors: ``run`` has ended."""
        self._closed = True
        for watch in list(self._watches.values()):
            self._forget(watch)
        self._epoll.close()

    async def _poll(self, process: ProcessId, watch: ExitWatch) -> None:
        await proctree.poll_for_exit(process)
        if not watch._cancelled:
            self._call(watch)

    def _call(self, watch: ExitWatch) -> None:
        # One caller's failure is logged: it never stops the others' watches.
        try:
            watch.exited()
        except Exception:
            log.exception("reacting to an exit failed")

    def _forget(self, watch: ExitWatch) -> None:
        fd = watch.fd
        if fd is not None and self._watches.get(fd) is watch:
            del self._watches[fd]
            self._epoll.unregister(fd)  # before the close: its number may be reused at once
            os.close(fd)
