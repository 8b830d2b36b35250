"""The exit watcher: one epoll for every watched process, each exit told once, to its own."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
from collections.abc import AsyncIterator
from functools import partial

import pytest
import trio

from sandboxd.actors import proctree
from sandboxd.actors.exits import ExitWatcher
from sandboxd.actors.proctree import ProcessId
from tests.support import eventually


@pytest.fixture
async def watcher() -> AsyncIterator[ExitWatcher]:
    watcher = ExitWatcher()
    async with trio.open_nursery() as nursery:
        await nursery.start(watcher.run)
        yield watcher
        nursery.cancel_scope.cancel()


async def sleeper() -> tuple[trio.Process, ProcessId]:
    process = await trio.lowlevel.open_process(["sleep", "60"], stdin=subprocess.DEVNULL)
    named = proctree.process_id(process.pid)
    assert named is not None
    return process, named


async def test_each_exit_is_told_once_to_its_own_watch(watcher: ExitWatcher) -> None:
    processes = [await sleeper() for _ in range(5)]
    told: list[int] = []
    try:
        for _, named in processes:
            watch = watcher.watch(named, partial(told.append, named.pid))
            assert watch is not None
        assert len(watcher) == 5
        for process, _ in processes[:3]:
            process.send_signal(signal.SIGKILL)
            await process.wait()  # reaped: the exit was seen before, by the pidfd
        await eventually(lambda: len(told) == 3)
        assert sorted(told) == sorted(process.pid for process, _ in processes[:3])
        assert len(watcher) == 2  # forgotten once told, descriptors closed
    finally:
        for process, _ in processes:
            if process.returncode is None:
                process.kill()
                await process.wait()
    await eventually(lambda: len(told) == 5)
    assert len(told) == len(set(told)) == 5  # no exit told twice


async def test_a_cancelled_watch_is_never_told(watcher: ExitWatcher) -> None:
    (cancelled_process, cancelled), (other_process, other) = await sleeper(), await sleeper()
    told: list[str] = []
    watch = watcher.watch(cancelled, lambda: told.append("cancelled"))
    assert watch is not None
    watcher.watch(other, lambda: told.append("other"))
    watch.cancel()
    assert len(watcher) == 1
    cancelled_process.kill()
    await cancelled_process.wait()
    other_process.kill()
    await other_process.wait()
    # Its exit came first; its descriptor was closed before it: nothing can tell it.
    await eventually(lambda: told == ["other"])


async def test_a_process_that_is_gone_or_another_is_not_watched(watcher: ExitWatcher) -> None:
    process, named = await sleeper()
    another = ProcessId(named.pid, named.start_ticks + 1)  # its pid, another start
    assert watcher.watch(another, lambda: None) is None
    process.kill()
    await process.wait()
    assert watcher.watch(named, lambda: None) is None  # reaped: its pid is free
    assert len(watcher) == 0


async def test_a_zombie_is_an_exit_told_at_once(watcher: ExitWatcher) -> None:
    process, named = await sleeper()
    os.kill(process.pid, signal.SIGKILL)
    await eventually(lambda: proctree.state_of_pid(process.pid) is None)  # a zombie now
    told: list[int] = []
    assert watcher.watch(named, lambda: told.append(1)) is not None
    await eventually(lambda: told == [1])
    await process.wait()


async def test_a_failing_reaction_does_not_stop_the_others(watcher: ExitWatcher) -> None:
    (first_process, first), (second_process, second) = await sleeper(), await sleeper()
    told: list[str] = []

    def fail() -> None:
        raise RuntimeError("a bug in one caller")

    watcher.watch(first, fail)
    watcher.watch(second, lambda: told.append("second"))
    for process in (first_process, second_process):
        process.kill()
        await process.wait()
    await eventually(lambda: told == ["second"])


async def test_without_a_pidfd_the_exit_is_polled_even_if_watched_before_run() -> None:
    watcher = ExitWatcher()
    process, named = await sleeper()
    told: list[int] = []
    # No descriptor left (EMFILE): the lowest free number is made the limit, for one call.
    lowest_free = os.dup(0)
    os.close(lowest_free)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
    try:
        watch = watcher.watch(named, partial(told.append, 1))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert watch is not None and watch.fd is None  # polled, not in the epoll
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(watcher.run)  # the poll begins with the watcher
            process.kill()
            await process.wait()
            await eventually(lambda: told == [1], what="the polled exit")
            nursery.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
