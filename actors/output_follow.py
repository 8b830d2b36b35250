"""Following a sandbox's output as it is written: one inotify descriptor, a reader each.

``sandbox.logs`` with ``follow`` gives the tail, then every chunk the sandbox
writes after it. How new output is noticed: the daemon holds each output file's
descriptor, so one inotify descriptor watches the file *that descriptor holds*
(``/proc/self/fd/N``, never the name, which a sandbox running as the daemon's
user could swap), for every followed file at once, read by one trio task. The
kernel sends ``IN_MODIFY`` on each write and on a rotation, and ``IN_ATTRIB``
when a delete unlinks the file. Only followed files are watched: a sandbox
nobody follows costs nothing.

Measured (bench/output_follow.py, against polling in the same run): 1,000
idle followers cost 0.00 % of a core; polling their sizes every 100 ms cost
28 % (a wake-up, a lock and an fstat each per tick), every second 3 %, with
that much latency. A child that writes on makes an event per write: the
watcher reads the descriptor at most every ``BATCH_SECONDS``, and the kernel
merges the identical events not read yet, so a child writing 10 MB/s in
40-byte lines costs its follower 6 % of a core (44 % when the watcher woke
per write).

A follower (``OutputFollow``) reads by position (actors/output.py): across a
rotation it goes on where it was, from ``ID.log.1`` if the rotation moved the
bytes it had not read yet. It holds at most one chunk (``CHUNK_BYTES``) at a
time: the file is its buffer, so a reader that does not keep up costs the
daemon nothing but its place in the file. When the rotation drops bytes it had
not read (it fell a whole ``output_cap_bytes`` behind), it ends, with the
reason, rather than skip them silently. Text is decoded incrementally: a
character whose bytes the child wrote in two writes comes out whole.

A sandbox restarted (its process exited and a new one runs) writes on through
the same descriptor of the same file (output.py's ``open_for_child``), so its
followers simply go on. A delete keeps the descriptor open until its followers
have read to the end, then each ends with the reason "the sandbox was deleted".
"""

from __future__ import annotations

import codecs
import contextlib
from typing import Final

import trio
from inotify_simple import INotify, flags

from sandboxd.actors.output import OutputFile

#: The most bytes a follower reads at once: one output frame. Escaped as JSON (a
#: control byte takes six) it stays far below the reply size a client accepts.
CHUNK_BYTES: Final = 64 << 10

#: The least time between two readings of the inotify descriptor: a child that writes on
#: makes an event per write, which the kernel merges into one while it is not read, so
#: followers are woken at most this often, and what was written meanwhile goes out in one
#: frame. The first write after a quiet spell is noticed at once.
BATCH_SECONDS: Final = 0.01

_MASK: Final = flags.MODIFY | flags.ATTRIB | flags.DELETE_SELF
_IN_Q_OVERFLOW: Final = 0x4000  # events were lost: every watch is woken to read again


class OutputEnded(Exception):
    """A follow cannot go on; the message is the reason its client is told."""


class _Watch:
    """One watched file (inotify gives one watch per inode, however often it is added)."""

    __slots__ = ("changed", "users", "wd")

    def __init__(self, wd: int) -> None:
        self.wd = wd
        self.users = 0
        self.changed = trio.Event()

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


class OutputWatcher:
    """Every followed output file, behind one inotify descriptor; ``run`` reads it."""

    def __init__(self) -> None:
        self._inotify = INotify(nonblocking=True)
        self._by_wd: dict[int, _Watch] = {}
        #: Watches being added in a thread: inotify gives a file's existing watch again,
        #: so none is removed from the kernel meanwhile (the new user would get no event).
        self._adding = 0
        self._closed = False

    def __len__(self) -> int:
        return len(self._by_wd)

    async def watch(self, output: OutputFile) -> _Watch | None:
        """Watch the file the daemon holds for ``output``; None if it has none (yet)."""
        if self._closed:
            return None
        # In a thread: the file's lock may be held by a rotation's copy for a few ms.
        self._adding += 1
        try:
            wd = await trio.to_thread.run_sync(output.watch, self._add_watch)
        finally:
            self._adding -= 1
        if wd is None or self._closed:
            return None
        watch = self._by_wd.get(wd)
        if watch is None:
            watch = self._by_wd[wd] = _Watch(wd)
        watch.users += 1
        return watch

    def _add_watch(self, path: str) -> int:
        wd: int = self._inotify.add_watch(path, _MASK)
        return wd

    def unwatch(self, watch: _Watch) -> None:
        watch.users -= 1
        if watch.users > 0 or self._adding or self._by_wd.get(watch.wd) is not watch:
            return  # (one left unused while adding is taken up again, or goes with its file)
        del self._by_wd[watch.wd]
        if not self._closed:
            with contextlib.suppress(OSError):  # EINVAL: the kernel dropped it with its file
                self._inotify.rm_watch(watch.wd)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Wake the followers of each changed file until cancelled; closes the descriptor."""
        fd = self._inotify.fileno()
        task_status.started()
        try:
            while True:
                await trio.lowlevel.wait_readable(fd)
                try:
                    events = self._inotify.read(timeout=0)
                except BlockingIOError:
                    continue
                for event in events:
                    if event.mask & _IN_Q_OVERFLOW:
                        for watch in self._by_wd.values():
                            watch.notify()
                        continue
                    changed = self._by_wd.get(event.wd)
                    if changed is None:
                        continue
                    if event.mask & flags.IGNORED:  # the file is gone: no more events
                        del self._by_wd[event.wd]
                    changed.notify()
                await trio.sleep(BATCH_SECONDS)
        finally:
            self._close()

    def _close(self) -> None:
        self._closed = True
        for watch in self._by_wd.values():
            watch.notify()
        self._by_wd.clear()
        with contextlib.suppress(RuntimeError):
            trio.lowlevel.notify_closing(self._inotify.fileno())
        self._inotify.close()


class OutputFollow:
    """One follower of one sandbox's output, from the end of the tail it was given.

    Made by ``open``. ``tail`` is what it starts with; then ``wait`` until there
    may be more, and ``read`` it (``OutputEnded`` once it cannot go on).
    ``close`` when done.
    """

    def __init__(
        self,
        output: OutputFile,
        watcher: OutputWatcher,
        watch: _Watch | None,
        tail: tuple[bytes, bool, int],
    ) -> None:
        self._output = output
        self._watcher = watcher
        self._watch = watch
        data, self.truncated, self.position = tail
        self.tail = data.decode("utf-8", errors="replace")
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._changed = None if self._watch is None else self._watch.changed
        #: Whether the last read stopped at CHUNK_BYTES: more is there already.
        self._more = True
        self._closed = False

    @classmethod
    async def open(
        cls, output: OutputFile, watcher: OutputWatcher, tail_bytes: int
    ) -> OutputFollow:
        """Follow ``output`` from the end of its last ``tail_bytes`` bytes."""
        # Watched before the tail is taken: a write after the tail wakes it.
        watch = await watcher.watch(output)
        try:
            tail = await trio.to_thread.run_sync(output.tail_to_follow, tail_bytes)
        except BaseException:
            if watch is not None:
                watcher.unwatch(watch)
            raise
        return cls(output, watcher, watch, tail)

    async def wait(self) -> None:
        """Return once the file may hold output not read yet."""
        if self._more:
            await trio.lowlevel.checkpoint()
            return
        if self._watch is None:
            # The file had no descriptor when the follow began (an output the daemon
            # refused to trust): watch it once the sandbox's next start makes one.
            await trio.sleep(1.0)
            self._watch = await self._watcher.watch(self._output)
            return
        assert self._changed is not None
        await self._changed.wait()

    async def read(self) -> str:
        """The text written since the last read (perhaps ""), at most CHUNK_BYTES of it."""
        if self._watch is not None:
            self._changed = self._watch.changed  # before the read: a write after it wakes us
        chunk = await trio.to_thread.run_sync(self._output.read_from, self.position, CHUNK_BYTES)
        if chunk.lost:
            raise OutputEnded(
                f"this follow fell {chunk.lost} bytes behind the sandbox's output, which the "
                "output's rotation (output_cap_bytes) dropped before they were sent: read it "
                "faster, or call sandbox.logs again"
            )
        self.position = chunk.position
        # Removed, the file says so by no event any more (its unlink's may have come
        # before this read began): read on until it is empty, without waiting.
        self._more = len(chunk.data) == CHUNK_BYTES or chunk.removed
        last = chunk.removed and not chunk.data
        text = self._decoder.decode(chunk.data, final=last)
        if last and not text:
            raise OutputEnded("the sandbox was deleted")
        return text

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._watch is not None:
            self._watcher.unwatch(self._watch)
        self._output.unfollow()
