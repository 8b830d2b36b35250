"""A sandbox's process tree through /proc, against real processes: identity, finding,
pause, resume, terminate."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
import pytest
import trio

from sandboxd.actors import proctree
from sandboxd.actors.exits import ExitWatcher
from sandboxd.actors.proctree import ExitStatus, ProcessId
from sandboxd.actors.spawn import Child
from tests.actors.children.support import (
    Sandboxes,
    child,
    is_gone,
    read_pids,
)
from tests.support import eventually, proc_state


async def start_tree(sandboxes: Sandboxes, tmp_path: Path) -> tuple[str, Child, list[int]]:
    """A root, 2 children, 4 grandchildren; returns once all 7 run."""
    sandbox_id = sandboxes.new_id()
    pidfile = tmp_path / "tree.pids"
    spawned = await sandboxes.spawn(child("tree.py"), str(pidfile), "2", "2", sandbox_id=sandbox_id)
    await eventually(lambda: len(read_pids(pidfile)) == 7)
    return sandbox_id, spawned, read_pids(pidfile)


# --- identity ---------------------------------------------------------------------------


async def test_is_alive_checks_pid_and_start_time(sandboxes: Sandboxes) -> None:
    spawned = await sandboxes.spawn("-c", "import time; time.sleep(60)")
    main = spawned.id
    assert proctree.is_alive(main)
    stale = ProcessId.from_create_time(main.pid, main.create_time - 5)
    assert not proctree.is_alive(stale)
    os.killpg(main.pid, signal.SIGKILL)
    # Dead but not reaped yet: a zombie is not alive.
    await eventually(lambda: proc_state(main.pid) == "Z")
    assert not proctree.is_alive(main)
    with trio.fail_after(5):
        await spawned.wait()
    assert not proctree.is_alive(main)


async def test_the_recorded_create_time_names_the_process_exactly(sandboxes: Sandboxes) -> None:
    # The log records psutil's float create_time: it converts back to the exact ticks.
    spawned = await sandboxes.spawn("-c", "import time; time.sleep(60)")
    main = spawned.id
    recorded = psutil.Process(main.pid).create_time()
    assert main.create_time == recorded
    assert ProcessId.from_create_time(main.pid, recorded) == main
    assert proctree.process_id(main.pid) == main
    assert ProcessId.from_create_time(main.pid, recorded + 0.01) != main  # one tick later


async def test_the_exit_watcher_watches_a_process_that_is_not_our_child(
    sandboxes: Sandboxes, tmp_path: Path
) -> None:
    # The escaped grandchild of a double fork is not our child: only a pidfd can watch it.
    pidfile = tmp_path / "escaped.pids"
    sandbox_id = sandboxes.new_id()
    await sandboxes.spawn(child("double_fork.py"), str(pidfile), sandbox_id=sandbox_id)
    await eventually(lambda: len(read_pids(pidfile)) == 1)
    [escaped] = read_pids(pidfile)
    create_time = psutil.Process(escaped).create_time()
    adopted = ProcessId.from_create_time(escaped, create_time)

    watcher = ExitWatcher()
    told = trio.Event()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(watcher.run)
            wrong = ProcessId.from_create_time(escaped, create_time + 5)
            assert watcher.watch(wrong, told.set) is None
            assert watcher.watch(adopted, told.set) is not None
            os.kill(escaped, signal.SIGKILL)
            await told.wait()
            nursery.cancel_scope.cancel()


# --- finding a sandbox's processes -------------------------------------------------


async def test_sandbox_processes_and_marked_processes_find_the_whole_tree(
    sandboxes: Sandboxes, tmp_path: Path
) -> None:
    sandbox_id, spawned, pids = await start_tree(sandboxes, tmp_path)
    found = proctree.tree_members(spawned.id, sandbox_id)
    assert sorted(p.pid for p in found) == sorted(pids)

    marked = proctree.find_marked(sandboxes.daemon_marker)
    assert sorted(p.pid for p in marked[sandbox_id]) == sorted(pids)
    only = proctree.find_marked(sandbox_id=sandbox_id)
    assert list(only) == [sandbox_id]
    assert proctree.find_marked("/some/other/daemon").get(sandbox_id) is None


async def test_a_setsid_descendant_is_found_by_its_marker(
    sandboxes: Sandboxes, tmp_path: Path
) -> None:
    pidfile = tmp_path / "escaped.pids"
    sandbox_id = sandboxes.new_id()
    spawned = await sandboxes.spawn(child("double_fork.py"), str(pidfile), sandbox_id=sandbox_id)
    await eventually(lambda: len(read_pids(pidfile)) == 1)
    [escaped] = read_pids(pidfile)
    assert os.getpgid(escaped) != spawned.id.pid
    assert os.getsid(escaped) != os.getsid(spawned.id.pid)
    found = {p.pid for p in proctree.tree_members(spawned.id, sandbox_id)}
    assert found == {spawned.id.pid, escaped}


# --- pause and resume -------------------------------------------------------------------


async def test_pause_stops_every_process_and_resume_continues_them(
    sandboxes: Sandboxes, tmp_path: Path
) -> None:
    sandbox_id, spawned, pids = await start_tree(sandboxes, tmp_path)

    await proctree.pause_tree(spawned.id, sandbox_id)
    assert {pid: proc_state(pid) for pid in pids} == {pid: "T" for pid in pids}

    await proctree.resume_tree(spawned.id, sandbox_id)
    states = {pid: proc_state(pid) for pid in pids}
    assert all(state in ("S", "R") for state in states.values()), states


async def test_pause_reaches_a_setsid_descendant(sandboxes: Sandboxes, tmp_path: Path) -> None:
    pidfile = tmp_path / "escaped.pids"
    sandbox_id = sandboxes.new_id()
    spawned = await sandboxes.spawn(child("double_fork.py"), str(pidfile), sandbox_id=sandbox_id)
    await eventually(lambda: len(read_pids(pidfile)) == 1)
    [escaped] = read_pids(pidfile)

    await proctree.pause_tree(spawned.id, sandbox_id)
    assert proc_state(escaped) == "T"
    assert proc_state(spawned.id.pid) == "T"
    await proctree.resume_tree(spawned.id, sandbox_id)
    assert proc_state(escaped) != "T"
    assert proc_state(spawned.id.pid) != "T"


# --- terminate ---------------------------------------------------------------------------


async def test_terminate_ends_a_tree_with_sigterm(sandboxes: Sandboxes, tmp_path: Path) -> None:
    sandbox_id, spawned, pids = await start_tree(sandboxes, tmp_path)
    with trio.fail_after(5):
        forced = await proctree.terminate_tree(spawned.id, sandbox_id, stop_timeout=5)
        assert await spawned.wait() == ExitStatus(None, signal.SIGTERM)
    assert forced is False
    assert all(is_gone(pid) for pid in pids)
    assert proctree.find_marked(sandbox_id=sandbox_id) == {}


async def test_terminate_of_a_paused_tree_needs_no_sigkill(
    sandboxes: Sandboxes, tmp_path: Path
) -> None:
    # SIGCONT goes out with SIGTERM: stopped processes would only die by SIGKILL.
    sandbox_id, spawned, pids = await start_tree(sandboxes, tmp_path)
    await proctree.pause_tree(spawned.id, sandbox_id)
    with trio.fail_after(5):
        forced = await proctree.terminate_tree(spawned.id, sandbox_id, stop_timeout=5)
    assert forced is False
    assert all(is_gone(pid) for pid in pids)


async def test_terminate_kills_a_process_that_ignores_sigterm(
    sandboxes: Sandboxes, tmp_path: Path
) -> None:
    ready = tmp_path / "ready"
    sandbox_id = sandboxes.new_id()
    spawned = await sandboxes.spawn(child("ignore_term.py"), str(ready), sandbox_id=sandbox_id)
    await eventually(ready.exists)
    with trio.fail_after(5):
        forced = await proctree.terminate_tree(spawned.id, sandbox_id, stop_timeout=0.2)
        assert await spawned.wait() == ExitStatus(None, signal.SIGKILL)
    assert forced is True


@pytest.mark.parametrize("root_exits", [False, True])
async def test_terminate_ends_a_double_forked_setsid_descendant(
    sandboxes: Sandboxes, tmp_path: Path, root_exits: bool
) -> None:
    pidfile = tmp_path / "escaped.pids"
    sandbox_id = sandboxes.new_id()
    args = [child("double_fork.py"), str(pidfile)] + (["--root-exits"] if root_exits else [])
    spawned = await sandboxes.spawn(*args, sandbox_id=sandbox_id)
    await eventually(lambda: len(read_pids(pidfile)) == 1)
    [escaped] = read_pids(pidfile)
    if root_exits:
        # Root reaped, group gone: only the marker still leads to the descendant.
        with trio.fail_after(5):
            assert (await spawned.wait()).exit_code == 0
    with trio.fail_after(5):
        forced = await proctree.terminate_tree(spawned.id, sandbox_id, stop_timeout=5)
    assert forced is False
    assert is_gone(escaped)
    assert proctree.find_marked(sandbox_id=sandbox_id) == {}


async def test_a_reused_pid_is_never_signalled(sandboxes: Sandboxes) -> None:
    # An unrelated process (no marker) holds the pid of an identity whose start
    # time differs: the process it names is long gone and the pid reused.
    unrelated = await trio.lowlevel.open_process(["sleep", "60"], start_new_session=True)
    try:
        real = proctree.process_id(unrelated.pid)
        assert real is not None
        stale = ProcessId(real.pid, real.start_ticks - 100_000)
        sandbox_id = sandboxes.new_id()
        # Asleep first (just exec'ed, it may still be running): then "S" below means untouched.
        await eventually(lambda: proc_state(real.pid) == "S", what="sleep to be asleep")

        assert proctree.tree_members(stale, sandbox_id) == []
        await proctree.pause_tree(stale, sandbox_id)
        assert proc_state(real.pid) == "S"
        with trio.fail_after(5):
            assert await proctree.terminate_tree(stale, sandbox_id, stop_timeout=0.1) is False
        assert proctree.is_alive(real)
        assert proc_state(real.pid) == "S"
    finally:
        unrelated.kill()
        with trio.fail_after(5):
            await unrelated.wait()


async def test_another_daemons_sandbox_of_the_same_id_is_not_touched(
    sandboxes: Sandboxes, tmp_path: Path
) -> None:
    sandbox_id = sandboxes.new_id()
    ours = await sandboxes.spawn("-c", "import time; time.sleep(60)", sandbox_id=sandbox_id)
    other_env = sandboxes.env(sandbox_id, **{proctree.DAEMON_MARKER: "/other/daemon"})
    theirs = await sandboxes.spawn(
        "-c", "import time; time.sleep(60)", sandbox_id=sandbox_id, env=other_env
    )
    marked = proctree.find_marked(sandboxes.daemon_marker)
    assert [p.pid for p in marked[sandbox_id]] == [ours.id.pid]
    with trio.fail_after(5):
        await proctree.terminate_tree(
            ours.id, sandbox_id, stop_timeout=5, daemon_marker=sandboxes.daemon_marker
        )
        await ours.wait()
    assert proctree.is_alive(theirs.id)


async def test_kill_processes_ends_strays(sandboxes: Sandboxes, tmp_path: Path) -> None:
    sandbox_id, spawned, pids = await start_tree(sandboxes, tmp_path)
    strays = proctree.find_marked(sandboxes.daemon_marker)[sandbox_id]
    with trio.fail_after(5):
        await proctree.kill_processes(strays)
        assert await spawned.wait() == ExitStatus(None, signal.SIGKILL)
    assert all(is_gone(pid) for pid in pids)
