"""A cgroup per sandbox, on this host's real hierarchy: the tree, freeze, kill, limits, usage."""

from __future__ import annotations

import os
import resource
import signal
import time
from pathlib import Path

import pytest
import trio

from sandboxd.actors.boundary.cgroupfs import parse_flat_keyed, sandbox_dir_name
from sandboxd.actors.boundary.cgroups import (
    CgroupBoundary,
    CgroupError,
    SandboxCgroup,
    remove_daemon_cgroups,
)
from sandboxd.actors.boundary.discovery import Layout
from sandboxd.actors.boundary.identities import UidPool
from sandboxd.actors.boundary.limits import Limits
from tests.actors.boundary.conftest import (
    PYTHON,
    TEST_UIDS,
    Harness,
    needs_controller,
    program,
    wait_for_file,
)
from tests.support import eventually

SLEEP = [PYTHON, "-c", "import time; time.sleep(600)"]


def cpu_ticks(pid: int) -> int | None:
    """utime + stime of a process, None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


# -- making and finding cgroups ------------------------------------------------------------


async def test_create_list_and_remove(boundary: CgroupBoundary) -> None:
    cgroup = boundary.create("build-1")
    assert os.path.basename(cgroup.tree_dir) == sandbox_dir_name("build-1") == "sb-build-1"
    assert all(os.path.isdir(d) for d in cgroup.dirs)
    # Every directory of the sandbox carries the daemon's identity in its parent.
    assert all(os.path.basename(os.path.dirname(d)) == boundary.name for d in cgroup.dirs)
    assert boundary.sandbox_ids() == ["build-1"]
    assert cgroup.pids() == [] and not cgroup.populated()
    await boundary.remove(cgroup)
    assert not any(os.path.exists(d) for d in cgroup.dirs)
    assert boundary.sandbox_ids() == []


async def test_parents_removed_while_empty_are_made_again(boundary: CgroupBoundary) -> None:
    # An operator's clean-up of empty cgroups (or another program's) may take the
    # daemon's parents while no sandbox has a cgroup: the next start still gets one.
    await boundary.remove(boundary.create("first"))
    for parent in reversed(boundary.parents):
        os.rmdir(parent)
    cgroup = boundary.create("second", Limits(pids_max=8))
    assert all(os.path.isdir(d) for d in cgroup.dirs)
    if (pids_dir := cgroup.controller_dirs.get("pids")) is not None:
        assert Path(pids_dir, "pids.max").read_text().strip() == "8"


async def test_the_child_is_in_every_cgroup_before_it_runs(harness: Harness) -> None:
    name_of = {}
    for limits in (Limits(cpu_max=0.5), Limits()):
        cgroup = harness.create(limits)
        process = await harness.spawn(cgroup, SLEEP)
        assert cgroup.pids() == [process.pid]
        assert cgroup.populated()
        name_of[process.pid] = (cgroup, limits)
    for pid, (cgroup, limits) in name_of.items():
        placed = Path(f"/proc/{pid}/cgroup").read_text()
        name = sandbox_dir_name(cgroup.sandbox_id)
        v1_cpu = cgroup.controller_dirs.get("cpu") not in (None, cgroup.tree_dir)
        for line in placed.splitlines():
            hierarchy, controllers, path = line.split(":", 2)
            joined = set(controllers.split(",")) & set(cgroup.controller_dirs)
            if v1_cpu and limits.cpu_max is None:
                # A v1 cpu group only with a quota: as a group it would weigh as one task.
                joined.discard("cpu")
            if hierarchy == "0" or joined:
                assert path.endswith(f"/{harness.boundary.name}/{name}"), line
            elif "cpu" in controllers.split(","):
                assert not path.endswith(f"/{name}"), line


async def test_limits_are_written_where_the_host_keeps_them(boundary: CgroupBoundary) -> None:
    cgroup = boundary.create("limited", Limits(memory_max=64 << 20, pids_max=32, cpu_max=0.25))
    if "memory" in cgroup.controller_dirs:
        assert cgroup.memory_limit() == 64 << 20
    if (pids_dir := cgroup.controller_dirs.get("pids")) is not None:
        assert Path(pids_dir, "pids.max").read_text().strip() == "32"
    if (cpu_dir := cgroup.controller_dirs.get("cpu")) is not None:
        if cpu_dir == cgroup.tree_dir:
            assert Path(cpu_dir, "cpu.max").read_text().split() == ["25000", "100000"]
        else:
            assert Path(cpu_dir, "cpu.cfs_quota_us").read_text().strip() == "25000"
    # Made again (a sandbox started again): the limits are replaced, not added to.
    assert boundary.create("limited", Limits()) is cgroup
    if "memory" in cgroup.controller_dirs:
        assert cgroup.memory_limit() is None


async def test_create_refuses_a_cgroup_that_still_holds_processes(harness: Harness) -> None:
    cgroup = harness.create()
    await harness.spawn(cgroup, SLEEP)
    with pytest.raises(CgroupError, match="already holds processes"):
        harness.boundary.create(cgroup.sandbox_id)


# -- the tree: escapees, freezing, killing -------------------------------------------------


async def test_an_escapee_is_frozen_and_killed(harness: Harness, tmp_path: Path) -> None:
    cgroup = harness.create()
    identity = harness.identity(cgroup)
    workdir = harness.workdir(cgroup, identity)
    root = await harness.spawn(
        cgroup, [PYTHON, program("escapee.py"), "pids"], identity=identity, cwd=workdir
    )
    text = await wait_for_file(workdir / "pids", "escaped")
    escaped = int(text.split()[1])
    assert escaped != root.pid
    # It really escaped every convention: another session, an empty environment.
    assert os.getsid(escaped) != os.getsid(root.pid)
    assert Path(f"/proc/{escaped}/environ").read_bytes() == b""
    assert set(cgroup.pids()) == {root.pid, escaped}

    await cgroup.freeze()
    assert cgroup.frozen()
    before = {pid: cpu_ticks(pid) for pid in (root.pid, escaped)}
    await trio.sleep(0.2)  # an observation window: a frozen process does not run in it
    assert {pid: cpu_ticks(pid) for pid in before} == before
    await cgroup.thaw()
    assert not cgroup.frozen()

    await cgroup.kill()
    assert not cgroup.populated()
    assert not alive(escaped)
    with trio.fail_after(5):
        assert await root.wait() == -signal.SIGKILL


async def test_a_tree_that_forks_without_pause_is_frozen_whole(harness: Harness) -> None:
    needs_controller(harness.boundary, "pids")
    # pids and cpu limits keep the churn from taking the 2 shared cores of CI.
    cgroup = harness.create(Limits(pids_max=64, cpu_max=0.5))
    await harness.spawn(cgroup, [PYTHON, program("forker.py"), "4"])
    await eventually(lambda: len(cgroup.pids()) >= 4, what="4 workers forking")

    started = time.perf_counter()
    await cgroup.freeze()
    took = time.perf_counter() - started
    members = cgroup.pids()
    ticks = {pid: cpu_ticks(pid) for pid in members}
    await trio.sleep(0.2)  # observation window: nothing forks, exits or runs
    assert cgroup.pids() == members
    assert {pid: cpu_ticks(pid) for pid in members} == ticks
    assert took < 1.0
    await cgroup.thaw()
    await eventually(lambda: cgroup.pids() != members, what="the tree to churn again")
    await cgroup.kill()
    assert cgroup.pids() == []


async def test_kill_without_cgroup_kill_reaches_a_forking_tree(
    layout: Layout, tmp_path: Path, base_dir: Path, nursery: trio.Nursery
) -> None:
    # A kernel before 5.14 has no cgroup.kill: freeze, SIGKILL each member, thaw.
    cgroups = CgroupBoundary.open(layout, state_dir=tmp_path / "old-kernel")
    cgroups.has_kill = False
    await nursery.start(cgroups.run)
    harness = Harness(cgroups, base_dir, UidPool(*TEST_UIDS))
    try:
        limits = Limits(pids_max=64, cpu_max=0.5) if "pids" in cgroups.controllers else None
        cgroup = harness.create(limits)
        await harness.spawn(cgroup, [PYTHON, program("forker.py"), "4"])
        await eventually(lambda: len(cgroup.pids()) >= 4, what="4 workers forking")
        await cgroup.kill()
        assert cgroup.pids() == []
        assert not cgroup.frozen()  # thawed again, so the next start is not born frozen
    finally:
        await harness.cleanup()
        cgroups.close(remove_parents=True)


async def test_the_tree_emptying_is_noticed_at_once(harness: Harness, tmp_path: Path) -> None:
    cgroup = harness.create()
    out = tmp_path / "out"
    # CLOCK_MONOTONIC is one clock for every process: the child stamps its last moment.
    last_words = (
        "import os, time; time.sleep(0.2); print(time.monotonic(), flush=True); os._exit(0)"
    )
    process = await harness.spawn(cgroup, [PYTHON, "-c", last_words], output=out)
    # No poll backs this wait: only the inotify event on cgroup.events can end it.
    with trio.fail_after(10):
        await cgroup.wait_empty()
    noticed = time.monotonic()
    assert not cgroup.populated()
    assert noticed - float(out.read_text()) < 0.25
    await process.wait()


async def test_one_watcher_serves_every_sandbox(harness: Harness) -> None:
    cgroups = [harness.create() for _ in range(5)]
    for i, cgroup in enumerate(cgroups):
        await harness.spawn(cgroup, [PYTHON, "-c", f"import time; time.sleep({0.1 * (i + 1)})"])
    assert len(harness.boundary.watcher) == 5
    with trio.fail_after(10):
        async with trio.open_nursery() as waits:
            for cgroup in cgroups:
                waits.start_soon(cgroup.wait_empty)
    assert not any(c.populated() for c in cgroups)


async def test_terminate_sends_sigterm_then_kills_after_the_stop_timeout(
    harness: Harness, tmp_path: Path
) -> None:
    polite = harness.create()
    await harness.spawn(polite, SLEEP)  # python dies of SIGTERM at once
    stubborn = harness.create()
    ignore = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('ready', flush=True)\n"
        "time.sleep(600)\n"
    )
    out = tmp_path / "stubborn.out"
    await harness.spawn(stubborn, [PYTHON, "-c", ignore], output=out)
    await wait_for_file(out, "ready")
    with trio.fail_after(10):
        assert await polite.terminate(stop_timeout=5) is False
        started = time.monotonic()
        assert await stubborn.terminate(stop_timeout=0.3) is True
    assert time.monotonic() - started >= 0.3
    assert not polite.populated() and not stubborn.populated()


async def test_a_paused_sandbox_is_terminated_too(harness: Harness) -> None:
    cgroup = harness.create()
    await harness.spawn(cgroup, SLEEP)
    await cgroup.freeze()
    with trio.fail_after(10):
        assert await cgroup.terminate(stop_timeout=5) is False
    assert not cgroup.populated() and not cgroup.frozen()


# -- limits in force -----------------------------------------------------------------------


async def test_a_fork_bomb_is_held_at_pids_max(harness: Harness) -> None:
    needs_controller(harness.boundary, "pids")
    cgroup = harness.create(Limits(pids_max=40, cpu_max=0.5))
    identity = harness.identity(cgroup)
    # A second guard in case the controller failed: the bomb's own uid may not pass 80.
    await harness.spawn(
        cgroup,
        [PYTHON, program("bomb.py")],
        identity=identity,
        rlimits=((resource.RLIMIT_NPROC, 80),),
    )
    pids_dir = cgroup.controller_dirs["pids"]
    await eventually(
        lambda: parse_flat_keyed(Path(pids_dir, "pids.events").read_text()).get("max", 0) > 0,
        what="the bomb to hit pids_max",
    )
    # The daemon's loop stays responsive while the bomb pushes against the limit.
    started = time.monotonic()
    for _ in range(20):
        await trio.sleep(0.005)
    assert time.monotonic() - started < 2.0
    assert cgroup.usage().pids <= 40
    await cgroup.kill()
    assert cgroup.pids() == []


async def test_a_memory_hog_is_killed_and_the_oom_is_seen(harness: Harness) -> None:
    needs_controller(harness.boundary, "memory")
    cgroup = harness.create(Limits(memory_max=64 << 20))
    identity = harness.identity(cgroup)
    workdir = harness.workdir(cgroup, identity)
    hog = await harness.spawn(
        cgroup, [PYTHON, program("hog.py"), "held"], identity=identity, cwd=workdir
    )
    with trio.fail_after(30):
        status = await hog.wait()
    assert status == -signal.SIGKILL
    assert cgroup.oom_kills() == 1
    held = [int(x) for x in (workdir / "held").read_text().split()]
    assert 0 < max(held) <= 64  # it got some, never past the limit


async def test_usage_moves(harness: Harness) -> None:
    cgroup = harness.create(Limits(cpu_max=0.5))
    identity = harness.identity(cgroup)
    workdir = harness.workdir(cgroup, identity)
    idle = cgroup.usage()
    assert idle.pids == 0
    await harness.spawn(
        cgroup, [PYTHON, program("busy.py"), "48", "ready"], identity=identity, cwd=workdir
    )
    await wait_for_file(workdir / "ready", "ready")
    first = cgroup.usage()
    assert first.pids == 1
    if "memory" in cgroup.controller_dirs:
        assert first.memory_bytes is not None and first.memory_bytes >= 48 << 20
    assert first.cpu_seconds is not None
    await eventually(
        lambda: (cgroup.usage().cpu_seconds or 0) > (first.cpu_seconds or 0) + 0.05,
        what="cpu_seconds to grow",
    )


async def test_cpu_max_throttles(harness: Harness) -> None:
    needs_controller(harness.boundary, "cpu")
    cgroup = harness.create(Limits(cpu_max=0.2))
    identity = harness.identity(cgroup)
    workdir = harness.workdir(cgroup, identity)
    await harness.spawn(
        cgroup, [PYTHON, program("busy.py"), "1", "ready"], identity=identity, cwd=workdir
    )
    await wait_for_file(workdir / "ready", "ready")
    start_cpu, start = cgroup.usage().cpu_seconds or 0.0, time.monotonic()
    await trio.sleep(1.0)  # an observation window for a rate
    used = (cgroup.usage().cpu_seconds or 0.0) - start_cpu
    assert used / (time.monotonic() - start) < 0.35  # a spinning process, held near 0.2


# -- after a restart -----------------------------------------------------------------------


async def test_a_restarted_daemon_adopts_by_cgroup_and_removes_strays(
    layout: Layout, harness: Harness, tmp_path: Path, nursery: trio.Nursery
) -> None:
    kept = harness.create()
    stray = harness.create()
    kept_child = await harness.spawn(kept, SLEEP)
    await harness.spawn(stray, SLEEP)

    # Another daemon (another state dir) on the same host sees none of it.
    other = CgroupBoundary.open(layout, state_dir=tmp_path / "another-daemon")
    try:
        assert other.sandbox_ids() == []
    finally:
        other.close(remove_parents=True)

    # The same state dir again: the same parents, the same sandboxes.
    again = CgroupBoundary.open(layout, state_dir=tmp_path / "state")
    await nursery.start(again.run)
    try:
        assert again.name == harness.boundary.name
        assert again.sandbox_ids() == sorted([kept.sandbox_id, stray.sandbox_id])
        adopted = again.adopt(kept.sandbox_id)
        assert adopted is not None and adopted.pids() == [kept_child.pid]
        assert await again.remove_strays({kept.sandbox_id}) == [stray.sandbox_id]
        assert again.sandbox_ids() == [kept.sandbox_id]
        assert adopted.populated()
        assert again.adopt("never-made") is None
    finally:
        again.close()


async def test_removing_a_dead_daemons_cgroups_kills_them_all_at_once(
    layout: Layout, harness: Harness, tmp_path: Path
) -> None:
    # What tests and benchmarks do after a daemon: its sandboxes all killed, then each
    # waited for, so that 1,000 of them take one wait, not 1,000 polls of 10 ms (which
    # here would be 0.6 s at the least).
    cgroups = [harness.create() for _ in range(60)]
    for cgroup in cgroups:
        await harness.spawn(cgroup, ["/bin/sleep", "600"])
    await eventually(lambda: all(c.pids() for c in cgroups), what="a sleep in each")
    started = time.monotonic()
    assert remove_daemon_cgroups(layout, state_dir=tmp_path / "state", timeout=0.4) == 60
    assert time.monotonic() - started < 0.4
    assert not any(os.path.exists(d) for c in cgroups for d in c.dirs)
    assert harness.boundary.sandbox_ids() == []


async def test_the_v2_only_layout_works_on_a_plain_v2_directory(
    layout: Layout, tmp_path: Path, base_dir: Path, nursery: trio.Nursery
) -> None:
    """The cgroup2 mode's code path, on a v2 directory given as ``cgroup = PATH``."""
    delegated = os.path.join(layout.tree, f"sandboxd-test-{os.getpid()}")
    os.mkdir(delegated)
    try:
        cgroups = CgroupBoundary.open(Layout(tree=delegated, controllers={}), state_dir=tmp_path)
        assert cgroups.mode == "cgroup2"
        await nursery.start(cgroups.run)
        harness = Harness(cgroups, base_dir, UidPool(*TEST_UIDS))
        try:
            cgroup: SandboxCgroup = harness.create()
            assert cgroup.tree_dir.startswith(delegated + "/")
            await harness.spawn(cgroup, SLEEP)
            await cgroup.freeze()
            await cgroup.kill()
            assert cgroup.usage().pids == 0
        finally:
            await harness.cleanup()
            cgroups.close(remove_parents=True)
    finally:
        os.rmdir(delegated)
