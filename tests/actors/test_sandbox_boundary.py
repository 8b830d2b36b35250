"""The boundary through the registry, with real cgroups, uids and processes (as root).

What issues 11 and 15 ask of a running daemon's sandboxes: a tree that no
convention holds (an escapee) frozen by pause and killed by delete, a tree
that forks without pause frozen whole, a fork bomb held at ``pids_max`` while
the daemon answers, a memory hog recorded as ``reason: "oom"``, usage read
from the cgroup, a uid of its own per sandbox that drains before reuse, and
limits that fall back to rlimits (or refuse the start) without a controller.
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import attrs
import pytest
import trio

from sandboxd.actors import registry as registry_module
from sandboxd.actors.boundary.limits import Limits
from sandboxd.actors.boundary.workdirs import unreachable
from sandboxd.actors.errors import StartFailed
from sandboxd.actors.specs import default_spec, not_runnable_by_others, python_for_sandboxes
from sandboxd.events import types as ev
from sandboxd.events.projection import Status
from tests.actors.boundary.conftest import program
from tests.actors.children.support import is_gone
from tests.actors.test_registry import ADMIN, Harness, plain, running
from tests.support import eventually, ids_of, is_paused

SLEEP = ("-c", "import time; time.sleep(600)")


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: cgroups and uids of their own")


def needs_cgroups(harness: Harness, *controllers: str) -> None:
    if not harness.cgroups:
        pytest.skip(f"no cgroup boundary here: {harness.registry.boundary.reason}")
    missing = set(controllers) - harness.registry.boundary.controllers
    if missing:
        pytest.skip(f"this host has no {', '.join(sorted(missing))} controller for sandboxes")


def switches(pid: int) -> int:
    """How often the process has been scheduled off the CPU: it grows while it runs at all."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["voluntary_ctxt_switches"]) + int(fields["nonvoluntary_ctxt_switches"])


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def private_uid_range(size: int) -> tuple[int, int]:
    """uids of the default range that no other test run on this host picks at once."""
    low = 610000 + (os.getpid() % 4000) * 10
    return low, low + size - 1


# -- the tree ------------------------------------------------------------------------------


async def test_an_escapee_is_frozen_by_pause_and_killed_by_delete(tmp_path: Path) -> None:
    needs_root()
    # Forks; the child calls setsid and forks again; the grandchild execs a fresh python
    # with an empty environment and sleeps in a loop: no marker, no group, no session.
    escapee = plain("escapee", program("escapee.py"), "pids")
    async with running(tmp_path, escapee) as harness:
        needs_cgroups(harness)
        registry = harness.registry
        info = await registry.start_sandbox(ADMIN)
        assert info.pid is not None
        pids = Path(info.working_dir) / "pids"
        await eventually(lambda: pids.exists() and "escaped" in pids.read_text())
        escaped = int(pids.read_text().split()[1])
        assert Path(f"/proc/{escaped}/environ").read_bytes() == b""
        assert os.getsid(escaped) != os.getsid(info.pid)
        assert set(harness.processes(info.id)) == {info.pid, escaped}

        await registry.pause(ADMIN, info.id)
        assert is_paused(escaped) and is_paused(info.pid)
        before = switches(escaped)
        await trio.sleep(0.2)  # an observation window: a sleep loop of 10 ms would run 20 times
        assert switches(escaped) == before
        await registry.resume(ADMIN, info.id)
        await eventually(lambda: switches(escaped) > before, what="the escapee to run again")

        assert await registry.delete(ADMIN, info.id) is True
        assert is_gone(escaped)
        assert harness.processes(info.id) == []


async def test_a_tree_that_forks_without_pause_is_frozen_whole(tmp_path: Path) -> None:
    needs_root()
    # Workers forking children that fork grandchildren, without a pause: its members
    # change all the time. pids and cpu limits keep the churn off the CI's two cores.
    forker = plain("forker", program("forker.py"), "4", limits=Limits(pids_max=64, cpu_max=0.5))
    async with running(tmp_path, forker) as harness:
        needs_cgroups(harness, "pids", "cpu")
        registry = harness.registry
        info = await registry.start_sandbox(ADMIN)
        await eventually(lambda: len(harness.processes(info.id)) >= 4, what="4 workers")

        started = time.monotonic()
        await registry.pause(ADMIN, info.id)
        took = time.monotonic() - started
        members = harness.processes(info.id)
        ticks = {pid: cpu_ticks(pid) for pid in members}
        await trio.sleep(0.2)  # an observation window: nothing forks, exits or runs in it
        assert harness.processes(info.id) == members
        assert {pid: cpu_ticks(pid) for pid in members} == ticks
        assert all(is_paused(pid) for pid in members)
        assert took < 1.0

        await registry.resume(ADMIN, info.id)
        await eventually(lambda: harness.processes(info.id) != members, what="churn again")
        await registry.delete(ADMIN, info.id)
        assert harness.processes(info.id) == []


async def test_a_fork_bomb_is_held_at_pids_max_and_the_daemon_answers(tmp_path: Path) -> None:
    needs_root()
    bomb = plain("bomb", program("bomb.py"), limits=Limits(pids_max=40, cpu_max=0.5))
    sleeper = plain("sleeper", *SLEEP)
    async with running(tmp_path, bomb, sleeper) as harness:
        needs_cgroups(harness, "pids")
        registry = harness.registry
        info = await registry.start_sandbox(ADMIN, spec_id="bomb")
        pids_dir = registry.boundary.cgroups.controllers["pids"]  # type: ignore[union-attr]
        events = Path(pids_dir, f"sb-{info.id}", "pids.events")
        await eventually(
            lambda: int(events.read_text().split()[1]) > 0, what="the bomb to hit pids_max"
        )
        # The daemon goes on serving while the bomb pushes against its limit.
        started = time.monotonic()
        other = await registry.start_sandbox(ADMIN, spec_id="sleeper")
        for _ in range(100):
            assert registry.get(ADMIN, info.id, usage=True) is not None
        assert time.monotonic() - started < 5.0
        assert other.status is Status.RUNNING
        usage = registry.usage(ADMIN, info.id)
        assert usage is not None and 0 < usage.pids <= 40
        assert len(harness.processes(info.id)) <= 40

        assert await registry.delete(ADMIN, info.id) is True
        assert harness.processes(info.id) == []


#: Waits for "go" in its working dir (so that it is RUNNING first), then takes memory.
HOG = (
    "import os, time\n"
    "while not os.path.exists('go'):\n"
    "    time.sleep(0.01)\n"
    "held = []\n"
    "while True:\n"
    "    held.append(bytearray(16 << 20))\n"
)


async def test_a_memory_hog_ends_with_reason_oom(tmp_path: Path) -> None:
    needs_root()
    hog = plain("hog", "-c", HOG, limits=Limits(memory_max=64 << 20))
    async with running(tmp_path, hog) as harness:
        needs_cgroups(harness, "memory")
        registry = harness.registry
        info = await registry.start_sandbox(ADMIN)
        assert info.status is Status.RUNNING
        (Path(info.working_dir) / "go").touch()
        await eventually(
            lambda: registry.state.sandboxes[info.id].status is Status.ERROR,
            within=30,
            what="the OOM killer",
        )
        exited = (await harness.events_of(info.id))[-1].data
        assert exited == ev.SandboxExited(None, 9, reason="oom", memory_max=64 << 20)
        assert registry.state.sandboxes[info.id].error == "killed: out of memory (limit 64 MiB)"


# -- usage ---------------------------------------------------------------------------------


async def test_usage_comes_from_the_cgroup_and_is_null_under_markers(
    tmp_path: Path, cgroup: str
) -> None:
    busy = plain("busy", program("busy.py"), "32", "ready", limits=Limits(cpu_max=0.5))
    async with running(tmp_path, busy, cgroup=cgroup) as harness:
        registry = harness.registry
        info = await registry.start_sandbox(ADMIN)
        await eventually((Path(info.working_dir) / "ready").exists)
        got = registry.get(ADMIN, info.id, usage=True)
        assert got is not None
        [stats] = await registry.stats(ADMIN, [info.id])
        assert stats is not None and stats.id == info.id
        if not harness.cgroups:
            assert got.usage is None and stats.usage is None
            return
        assert got.usage is not None and got.usage.pids == 1
        if "memory" in registry.boundary.controllers:
            assert (got.usage.memory_bytes or 0) >= 32 << 20
        first = got.usage.cpu_seconds or 0.0

        def cpu_seconds() -> float:
            usage = registry.usage(ADMIN, info.id)
            return usage.cpu_seconds or 0.0 if usage is not None else 0.0

        await eventually(lambda: cpu_seconds() > first, what="cpu_seconds to grow")
        assert registry.get(ADMIN, info.id) == attrs.evolve(got, usage=None)  # get alone reads it


# -- a uid per sandbox ---------------------------------------------------------------------


async def test_each_sandbox_runs_under_its_own_uid_which_drains_before_reuse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    needs_root()
    monkeypatch.setattr(registry_module, "UID_SWEEP_INTERVAL", 0.05)
    maker = plain("maker", "-c", "open('mine', 'w').close(); import time; time.sleep(600)")
    uid_range = private_uid_range(10)
    async with running(
        tmp_path, maker, uid_range=uid_range, max_sandboxes=10, allow_existing_uids=True
    ) as harness:
        registry = harness.registry
        pool = registry.boundary.uids
        assert pool is not None
        infos = [await registry.start_sandbox(ADMIN) for _ in range(3)]
        uids = [registry.state.sandboxes[i.id].uid for i in infos]
        assert len(set(uids)) == 3 and all(u is not None for u in uids)
        for info, uid in zip(infos, uids, strict=True):
            assert uid is not None and uid_range[0] <= uid <= uid_range[1]
            assert info.pid is not None and ids_of(info.pid) == ({uid}, {uid})
            made = Path(info.working_dir) / "mine"
            await eventually(made.exists)
            assert (made.stat().st_uid, made.stat().st_gid) == (uid, uid)

        # Deleted: its uid drains while something of it remains (a file in /dev/shm) ...
        gone, uid = infos[0], uids[0]
        assert uid is not None
        leftover = Path(f"/dev/shm/sandboxd-test-{os.getpid()}-{uid}")
        leftover.write_text("left behind")
        os.chown(leftover, uid, uid)
        try:
            await registry.delete(ADMIN, gone.id)
            assert uid in pool.draining
            await trio.sleep(0.3)  # a few sweeps: it stays out of the pool
            assert uid in pool.draining
        finally:
            leftover.unlink()
        # ... and returns once nothing does; a new sandbox meanwhile gets a fresh one.
        await eventually(lambda: uid not in pool.draining, what="the uid to drain")
        again = await registry.start_sandbox(ADMIN)
        assert registry.state.sandboxes[again.id].uid not in uids


async def test_the_default_spec_runs_with_isolation_on(tmp_path: Path) -> None:
    # The reference agent server by its path, with an interpreter every uid can run:
    # the daemon's own venv python lives under /root (0700), out of a sandbox's reach.
    spec = attrs.evolve(default_spec(), health_interval=0)
    assert spec.command[0] == python_for_sandboxes() and spec.command[1] == "-I"
    assert not_runnable_by_others(spec.command[0]) is None
    script = spec.command[2]  # read by the interpreter: reachable and readable by others
    assert unreachable(script) is None and os.stat(script).st_mode & 0o004
    async with running(tmp_path, spec) as harness:
        registry = harness.registry
        info = await registry.start_sandbox(ADMIN)
        assert info.status is Status.RUNNING and info.pid is not None
        uid = registry.state.sandboxes[info.id].uid
        if harness.isolated:
            assert uid is not None and ids_of(info.pid) == ({uid}, {uid})


# -- limits without a controller -----------------------------------------------------------


async def test_without_controllers_rlimits_stand_in_or_the_start_is_refused(
    tmp_path: Path,
) -> None:
    needs_root()
    limited = plain(
        "limited", *SLEEP, limits=Limits(memory_max=256 << 20, pids_max=64, cpu_max=0.5)
    )
    required = plain("required", *SLEEP, limits=Limits(cpu_max=0.5, required=True))
    async with running(tmp_path, limited, required, cgroup="off") as harness:
        registry = harness.registry
        info = await registry.start_sandbox(ADMIN, spec_id="limited")
        assert info.pid is not None
        limits = Path(f"/proc/{info.pid}/limits").read_text()
        data = next(line for line in limits.splitlines() if line.startswith("Max data size"))
        assert data.split()[3:5] == [str(256 << 20)] * 2
        assert resource.getrlimit(resource.RLIMIT_NPROC) != (64, 64)  # the daemon's untouched
        nproc = next(line for line in limits.splitlines() if line.startswith("Max processes"))
        assert nproc.split()[2:4] == ["64", "64"]  # counted for its own uid only

        with pytest.raises(StartFailed) as refused:
            await registry.start_sandbox(ADMIN, spec_id="required")
        assert "limits_required is true but cpu_max cannot be enforced here" in str(refused.value)
        assert refused.value.sandbox.pid is None
