"""One inotify descriptor for the cgroup.events file of every sandbox cgroup.

The kernel signals a change of ``populated`` or ``frozen`` in a v2
cgroup.events file as a modification (cgroup-v2.rst: "a value change in this
file generates a file modified event"), so one inotify descriptor, read by
one trio task, notices every sandbox's tree emptying at once, with no
per-sandbox polling loop and no thread. A waiter takes the current "changed"
event *before* it reads the file, so a change between its read and its wait
still wakes it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

import trio
from inotify_simple import INotify, flags

from sandboxd.actors.boundary.cgroupfs import EventsState, parse_events

_IN_Q_OVERFLOW = 0x4000  # events were lost: every watch is woken to re-read its file


class Watch:
    """The cgroup.events file of one cgroup, and a way to wait for a state of it."""

    __slots__ = ("_changed", "path", "wd")  # one per sandbox

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, "cgroup.events")
        self.wd: int | None = None
        self._changed = trio.Event()

    def state(self) -> EventsState:
        """Read the file now. A removed cgroup reads as empty and not frozen."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return EventsState(populated=False, frozen=False)
        try:
            return parse_events(os.read(fd, 4096).decode("ascii", "replace"))
        finally:
            os.close(fd)

    def notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, wanted: Callable[[EventsState], bool]) -> EventsState:
        """Return the state once ``wanted(state)`` holds; the caller bounds the wait.

        Needs the watcher's :meth:`CgroupEventsWatcher.run` task running.
        """
        while True:
            changed = self._changed  # before the read: a change after it wakes us
            state = self.state()
            if wanted(state):
                return state
            await changed.wait()


class CgroupEventsWatcher:
    """Every watched cgroup.events file, behind one inotify descriptor."""

    def __init__(self) -> None:
        self._inotify = INotify(nonblocking=True)
        self._by_wd: dict[int, Watch] = {}
        self._closed = False

    def watch(self, directory: str) -> Watch:
        """Start watching ``directory``'s cgroup.events. Raises OSError if it is missing."""
        watch = Watch(directory)
        watch.wd = self._inotify.add_watch(watch.path, flags.MODIFY)
        self._by_wd[watch.wd] = watch
        return watch

    def unwatch(self, watch: Watch) -> None:
        """Stop watching; harmless if the cgroup was removed (the kernel dropped the watch)."""
        if watch.wd is None:
            return
        if self._by_wd.pop(watch.wd, None) is watch and not self._closed:
            with contextlib.suppress(OSError):  # EINVAL: gone with its file
                self._inotify.rm_watch(watch.wd)
        watch.wd = None
        watch.notify()

    def __len__(self) -> int:
        return len(self._by_wd)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read notifications until cancelled or closed, waking each changed file's waiters."""
        fd = self._inotify.fileno()
        task_status.started()
        while True:
            try:
                await trio.lowlevel.wait_readable(fd)
            except trio.ClosedResourceError:
                return  # close(): nothing is watched any more
            if self._closed:
                return  # closed between the wake-up and this task running
            try:
                events = list(self._inotify.read(timeout=0))
            except BlockingIOError:
                continue
            for event in events:
                if event.mask & _IN_Q_OVERFLOW:
                    for watch in list(self._by_wd.values()):
                        watch.notify()
                    continue
                changed = self._by_wd.get(event.wd)
                if changed is None:
                    continue
                if event.mask & flags.IGNORED:  # the file went away with its cgroup
                    del self._by_wd[event.wd]
                    changed.wd = None
                changed.notify()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for watch in self._by_wd.values():
            watch.wd = None
            watch.notify()
        self._by_wd.clear()
        with contextlib.suppress(RuntimeError):  # outside trio: no task can be waiting
            trio.lowlevel.notify_closing(self._inotify.fileno())
        self._inotify.close()
