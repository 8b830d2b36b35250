"""Process control against real processes: spawn, wait, find, pause, resume, terminate."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import psutil
import pytest
import trio

from sandboxd.actors import health, process
from tests.actors.children.support import (
    Sandboxes,
    child,
    free_port,
    is_gone,
    read_pids,
)
from tests.support import eventually, proc_state


async def start_tree(
    sandboxes: Sandboxes, tmp_path: Path
) -> tuple[str, process.SpawnedProcess, list[int]]:
    """A root, 2 children, 4 grandchildren; returns once all 7 run."""
    sandbox_id = sandboxes.new_id()
    pidfile = tmp_path / "tree.pids"
    spawned = await sandboxes.spawn(child("tree.py"), str(pidfile), "2", "2", sandbox_id=sandbox_id)
    await eventually(lambda: len(read_pids(pidfile)) == 7)
    return sandbox_id, spawned, read_pids(pidfile)


# --- spawn and wait -------------------------------------------------------------------


async def test_wait_gives_the_exit_code(sandboxes: Sandboxes) -> None:
    sandbox_id = sandboxes.new_id()
    spawned = await sandboxes.spawn(
        "-c", "import sys; print('bye'); sys.exit(7)", sandbox_id=sandbox_id
    )
    with trio.fail_after(5):
        assert await spawned.wait() == process.ExitStatus(exit_code=7, signal=None)
    path = str(sandboxes.output_path(sandbox_id))
    assert process.read_output_tail(path, 1000) == ("bye\n", False)


async def test_wait_gives_the_signal(sandboxes: Sandboxes) -> None:
    spawned = await sandboxes.spawn("-c", "import time; time.sleep(60)")
    os.killpg(spawned.handle.pgid, signal.SIGKILL)
    with trio.fail_after(5):
        assert await spawned.wait() == process.ExitStatus(exit_code=None, signal=signal.SIGKILL)


async def test_spawned_process_owns_its_session_and_nothing_else(
    sandboxes: Sandboxes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SANDBOXD_TEST_LEAK", "daemon-only")
    sandbox_id = sandboxes.new_id()
    program = (
        "import os, sys\n"
        "print('session', os.getsid(0) == os.getpid() == os.getpgrp())\n"
        "print('stdin', os.readlink('/proc/self/fd/0'))\n"
        "print('leak', 'SANDBOXD_TEST_LEAK' in os.environ)\n"
        "print('marker', os.environ['SANDBOX_ID'])\n"
        "sys.stderr.write('to stderr\\n')\n"
    )
    spawned = await sandboxes.spawn("-c", program, sandbox_id=sandbox_id)
    handle = spawned.handle
    assert handle.pgid == handle.pid
    assert handle.create_time == psutil.Process(handle.pid).create_time()
    with trio.fail_after(5):
        assert (await spawned.wait()).exit_code == 0
    output = sandboxes.output_path(sandbox_id).read_text()
    assert "session True" in output
    assert "stdin /dev/null" in output
    assert "leak False" in output
    assert f"marker {sandbox_id}" in output
    assert "to stderr" in output  # stdout and stderr share the file


async def test_spawn_refuses_an_environment_without_the_marker(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="SANDBOX_ID"):
        await process.spawn(
            [sys.executable, "-c", "pass"],
            env={"PATH": os.environ["PATH"]},
            cwd=str(tmp_path),
            output_path=str(tmp_path / "out.log"),
            output_cap_bytes=1000,
        )


async def test_spawn_of_a_missing_command_raises_oserror(sandboxes: Sandboxes) -> None:
    sandbox_id = sandboxes.new_id()
    with pytest.raises(FileNotFoundError):
        await process.spawn(
            ["/nonexistent/sandboxd-test-command"],
            env=sandboxes.env(sandbox_id),
            cwd=str(sandboxes.base),
            output_path=str(sandboxes.output_path(sandbox_id)),
            output_cap_bytes=1000,
        )


# --- identity ---------------------------------------------------------------------------


async def test_is_alive_checks_pid_and_start_time(sandboxes: Sandboxes) -> None:
    spawned = await sandboxes.spawn("-c", "import time; time.sleep(60)")
    handle = spawned.handle
    assert process.is_alive(handle)
    stale = process.ProcessHandle(handle.pid, handle.pgid, handle.create_time - 5)
    assert not process.is_alive(stale)
    os.killpg(handle.pgid, signal.SIGKILL)
    # Dead but not reaped yet: a zombie is not alive.
    await eventually(lambda: proc_state(handle.pid) == "Z")
    assert not process.is_alive(handle)
    with trio.fail_after(5):
        await spawned.wait()
    assert not process.is_alive(handle)


async def test_wait_for_exit_pidfd_watches_a_process_that_is_not_our_child(
    sandboxes: Sandboxes, tmp_path: Path
) -> None:
    # The escaped grandchild of a double fork is not our child: only a pidfd can watch it.
    pidfile = tmp_path / "escaped.pids"
    sandbox_id = sandboxes.new_id()
    await sandboxes.spawn(child("double_fork.py"), str(pidfile), sandbox_id=sandbox_id)
    await eventually(lambda: len(read_pids(pidfile)) == 1)
    [escaped] = read_pids(pidfile)
    create_time = psutil.Process(escaped).create_time()
    handle = process.ProcessHandle(escaped, os.getpgid(escaped), create_time)

    wrong = process.ProcessHandle(handle.pid, handle.pgid, handle.create_time + 5)
    with trio.fail_after(5):
        assert await process.wait_for_exit_pidfd(wrong) is None

    results: list[process.ExitStatus | None] = []
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                results.append(await process.wait_for_exit_pidfd(handle))

            nursery.start_soon(watch)
            os.kill(escaped, signal.SIGKILL)
    assert results == [process.ExitStatus(exit_code=None, signal=None)]


async def test_wait_for_exit_pidfd_of_a_gone_pid_is_none() -> None:
    proc = await trio.lowlevel.open_process(["true"])
    create_time = psutil.Process(proc.pid).create_time()
    with trio.fail_after(5):
        await proc.wait()
    handle = process.ProcessHandle(proc.pid, proc.pid, create_time)
    assert await process.wait_for_exit_pidfd(handle) is None


# --- finding a sandbox's processes -------------------------------------------------


async def test_sandbox_processes_and_marked_processes_find_the_whole_tree(
    sandboxes: Sandboxes, tmp_path: Path
) -> None:
    sandbox_id, spawned, pids = await start_tree(sandboxes, tmp_path)
    found = process.sandbox_processes(spawned.handle, sandbox_id)
    assert sorted(p.pid for p in found) == sorted(pids)

    marked = process.find_marked_processes(sandboxes.daemon_marker)
    assert sorted(p.pid for p in marked[sandbox_id]) == sorted(pids)
    only = process.find_marked_processes(sandbox_id=sandbox_id)
    assert list(only) == [sandbox_id]
    assert process.find_marked_processes("/some/other/daemon").get(sandbox_id) is None


async def test_a_setsid_descendant_is_found_by_its_marker(
    sandboxes: Sandboxes, tmp_path: Path
) -> None:
    pidfile = tmp_path / "escaped.pids"
    sandbox_id = sandboxes.new_id()
    spawned = await sandboxes.spawn(child("double_fork.py"), str(pidfile), sandbox_id=sandbox_id)
    await eventually(lambda: len(read_pids(pidfile)) == 1)
    [escaped] = read_pids(pidfile)
    assert os.getpgid(escaped) != spawned.handle.pgid
    assert os.getsid(escaped) != os.getsid(spawned.handle.pid)
    found = {p.pid for p in process.sandbox_processes(spawned.handle, sandbox_id)}
    assert found == {spawned.handle.pid, escaped}


# --- pause and resume -------------------------------------------------------------------


async def test_pause_stops_every_process_and_resume_continues_them(
    sandboxes: Sandboxes, tmp_path: Path
) -> None:
    sandbox_id, spawned, pids = await start_tree(sandboxes, tmp_path)

    await process.pause_tree(spawned.handle, sandbox_id)
    assert {pid: proc_state(pid) for pid in pids} == {pid: "T" for pid in pids}

    await process.resume_tree(spawned.handle, sandbox_id)
    states = {pid: proc_state(pid) for pid in pids}
    assert all(state in ("S", "R") for state in states.values()), states


async def test_pause_reaches_a_setsid_descendant(sandboxes: Sandboxes, tmp_path: Path) -> None:
    pidfile = tmp_path / "escaped.pids"
    sandbox_id = sandboxes.new_id()
    spawned = await sandboxes.spawn(child("double_fork.py"), str(pidfile), sandbox_id=sandbox_id)
    await eventually(lambda: len(read_pids(pidfile)) == 1)
    [escaped] = read_pids(pidfile)

    await process.pause_tree(spawned.handle, sandbox_id)
    assert proc_state(escaped) == "T"
    assert proc_state(spawned.handle.pid) == "T"
    await process.resume_tree(spawned.handle, sandbox_id)
    assert proc_state(escaped) != "T"
    assert proc_state(spawned.handle.pid) != "T"


# --- terminate ---------------------------------------------------------------------------


async def test_terminate_ends_a_tree_with_sigterm(sandboxes: Sandboxes, tmp_path: Path) -> None:
    sandbox_id, spawned, pids = await start_tree(sandboxes, tmp_path)
    with trio.fail_after(5):
        forced = await process.terminate_tree(spawned.handle, sandbox_id, stop_timeout=5)
        assert await spawned.wait() == process.ExitStatus(None, signal.SIGTERM)
    assert forced is False
    assert all(is_gone(pid) for pid in pids)
    assert process.find_marked_processes(sandbox_id=sandbox_id) == {}


async def test_terminate_of_a_paused_tree_needs_no_sigkill(
    sandboxes: Sandboxes, tmp_path: Path
) -> None:
    # SIGCONT goes out with SIGTERM: stopped processes would only die by SIGKILL.
    sandbox_id, spawned, pids = await start_tree(sandboxes, tmp_path)
    await process.pause_tree(spawned.handle, sandbox_id)
    with trio.fail_after(5):
        forced = await process.terminate_tree(spawned.handle, sandbox_id, stop_timeout=5)
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
        forced = await process.terminate_tree(spawned.handle, sandbox_id, stop_timeout=0.2)
        assert await spawned.wait() == process.ExitStatus(None, signal.SIGKILL)
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
        forced = await process.terminate_tree(spawned.handle, sandbox_id, stop_timeout=5)
    assert forced is False
    assert is_gone(escaped)
    assert process.find_marked_processes(sandbox_id=sandbox_id) == {}


async def test_a_reused_pid_is_never_signalled(sandboxes: Sandboxes) -> None:
    # An unrelated process (no marker) holds the pid of a handle whose start
    # time differs: the handle's process is long gone and the pid reused.
    unrelated = await trio.lowlevel.open_process(["sleep", "60"], start_new_session=True)
    try:
        real = process.ProcessHandle(
            unrelated.pid, unrelated.pid, psutil.Process(unrelated.pid).create_time()
        )
        stale = process.ProcessHandle(real.pid, real.pgid, real.create_time - 1000)
        sandbox_id = sandboxes.new_id()

        assert process.sandbox_processes(stale, sandbox_id) == []
        await process.pause_tree(stale, sandbox_id)
        assert proc_state(real.pid) == "S"
        with trio.fail_after(5):
            assert await process.terminate_tree(stale, sandbox_id, stop_timeout=0.1) is False
        assert process.is_alive(real)
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
    other_env = sandboxes.env(sandbox_id, **{process.DAEMON_MARKER: "/other/daemon"})
    theirs = await sandboxes.spawn(
        "-c", "import time; time.sleep(60)", sandbox_id=sandbox_id, env=other_env
    )
    marked = process.find_marked_processes(sandboxes.daemon_marker)
    assert [p.pid for p in marked[sandbox_id]] == [ours.handle.pid]
    with trio.fail_after(5):
        await process.terminate_tree(
            ours.handle, sandbox_id, stop_timeout=5, daemon_marker=sandboxes.daemon_marker
        )
        await ours.wait()
    assert process.is_alive(theirs.handle)


async def test_kill_processes_ends_strays(sandboxes: Sandboxes, tmp_path: Path) -> None:
    sandbox_id, spawned, pids = await start_tree(sandboxes, tmp_path)
    strays = process.find_marked_processes(sandboxes.daemon_marker)[sandbox_id]
    with trio.fail_after(5):
        await process.kill_processes(strays)
        assert await spawned.wait() == process.ExitStatus(None, signal.SIGKILL)
    assert all(is_gone(pid) for pid in pids)


# --- output ------------------------------------------------------------------------------


async def test_output_stays_capped_while_a_child_writes_100_mib(
    sandboxes: Sandboxes,
) -> None:
    cap = 1 << 20
    port = free_port()
    sandbox_id = sandboxes.new_id()
    path = str(sandboxes.output_path(sandbox_id))
    rotated = process.rotated_path(path)
    spawned = await sandboxes.spawn(
        child("writer.py"), str(port), "100", sandbox_id=sandbox_id, output_cap_bytes=cap
    )
    # writer.py writes 50 MiB, waits until it sees its file truncated, writes 50 more.
    # Sweep until the first rotation, then stop: the second half stays in the file.
    await eventually(
        lambda: process.cap_outputs([path], cap) > 0 or os.path.exists(rotated), within=30
    )
    # Answering HTTP means it wrote all 100 MiB: nothing ever blocked it.
    assert await health.wait_until_ready(port, "/", timeout=20)

    # The writes after the truncation went to the file's new end (O_APPEND): no
    # hole where the truncated bytes were, the file holds only what came after.
    st = os.stat(path)
    assert st.st_size <= st.st_blocks * 512 + (64 << 10)
    assert st.st_size < 100 << 20

    assert process.cap_output(path, cap) is True
    assert os.stat(path).st_size == 0
    assert os.stat(rotated).st_size <= cap
    data, truncated = process.read_output_tail(path, 4096)
    assert truncated
    assert data.endswith("written\n")
    assert spawned.process.returncode is None


def test_cap_output_rotates_and_read_output_tail_reads_across(tmp_path: Path) -> None:
    path = str(tmp_path / "out.log")
    assert process.read_output_tail(path, 100) == ("", False)
    assert process.cap_output(path, 10) is False  # no file yet

    Path(path).write_bytes(b"0123456789abcdefghij")
    assert process.read_output_tail(path, 100) == ("0123456789abcdefghij", False)
    assert process.read_output_tail(path, 5) == ("fghij", True)
    assert process.cap_output(path, 30) is False  # under the cap: untouched

    assert process.cap_output(path, 8) is True
    assert Path(process.rotated_path(path)).read_bytes() == b"cdefghij"
    assert Path(path).read_bytes() == b""
    with open(path, "ab") as f:
        f.write(b"XYZ")
    assert process.read_output_tail(path, 5) == ("ijXYZ", True)
    # The rotation dropped the start: truncated even when all that is left is shown.
    assert process.read_output_tail(path, 100) == ("cdefghijXYZ", True)


def test_read_output_tail_drops_a_character_cut_in_half(tmp_path: Path) -> None:
    path = tmp_path / "out.log"
    path.write_bytes("é".encode() * 10)  # 2 bytes each
    assert process.read_output_tail(str(path), 5) == ("éé", True)
    path.write_bytes(b"ok \xff\xfe bad")
    assert process.read_output_tail(str(path), 100) == ("ok \ufffd\ufffd bad", False)


async def test_spawn_counts_earlier_output_against_the_cap(sandboxes: Sandboxes) -> None:
    sandbox_id = sandboxes.new_id()
    path = sandboxes.output_path(sandbox_id)
    path.write_bytes(b"old\n" * 1000)
    spawned = await sandboxes.spawn(
        "-c", "print('new')", sandbox_id=sandbox_id, output_cap_bytes=100
    )
    with trio.fail_after(5):
        await spawned.wait()
    assert path.read_text() == "new\n"
    assert os.stat(process.rotated_path(str(path))).st_size == 100
