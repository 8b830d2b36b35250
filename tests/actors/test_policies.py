"""Issue 10's lifecycle policies, with real processes, a real log and the host's boundary:
making room (max_running, on_full), a resume that runs a gone sandbox again, and the
restart policy (restart = "on-failure", restart_max in restart_window).

Each policy is checked twice: in what the registry answers, and in what the log
recorded (the events, their order, their reasons), since the log is what survives.
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

import pytest
import trio

from sandboxd.actors.boundary.cgroupfs import sandbox_dir_name
from sandboxd.actors.errors import Conflict, LimitExceeded, StartFailed
from sandboxd.actors.info import SandboxInfo
from sandboxd.actors.registry import Registry
from sandboxd.actors.specs import SpecConfig
from sandboxd.events import types as ev
from sandboxd.events.projection import State, Status, apply
from tests.actors.test_registry import ADMIN, ALICE, BOB, Caller, Harness, plain, running
from tests.daemon_process import AGENT_SERVER, agent_command
from tests.support import eventually, is_paused

SLEEPER = plain("sleeper", "-c", "import time; time.sleep(600)")
#: Counts its runs in its working dir (kept across restarts), then sleeps.
COUNTER = plain(
    "counter",
    "-c",
    "import pathlib, time; p = pathlib.Path('runs'); "
    "p.write_text(str(int(p.read_text() if p.exists() else 0) + 1)); time.sleep(600)",
)


def status_of(registry: Registry, caller: Caller, sandbox_id: str) -> Status:
    info = registry.get(caller, sandbox_id)
    assert info is not None
    return info.status


def on_failure(spec_id: str, restart_max: int = 2, window: float = 3600.0) -> SpecConfig:
    return plain(
        spec_id,
        "-c",
        "import time; time.sleep(600)",
        restart="on-failure",
        restart_max=restart_max,
        restart_window=window,
    )


async def wait_for(
    harness: Harness, caller: Caller, sandbox_id: str, status: Status, *, restarts: int = 0
) -> SandboxInfo:
    def reached() -> bool:
        info = harness.registry.get(caller, sandbox_id)
        return info is not None and info.status is status and info.restarts >= restarts

    await eventually(reached, within=20, what=f"{sandbox_id} {status} after {restarts} restarts")
    info = harness.registry.get(caller, sandbox_id)
    assert info is not None
    return info


# -- making room ------------------------------------------------------------------------------


async def test_refuse_counts_running_sandboxes_per_user_and_not_paused_ones(
    tmp_path: Path,
) -> None:
    async with running(tmp_path, SLEEPER, max_running=2) as harness:
        registry = harness.registry
        first = await registry.start_sandbox(ALICE)
        await registry.start_sandbox(ALICE)
        with pytest.raises(LimitExceeded) as refused:
            await registry.start_sandbox(ALICE)
        assert str(refused.value) == (
            "user alice has 2 sandboxes running, the limit max_running is 2;"
            " pause or delete one first"
        )
        await registry.start_sandbox(BOB)  # per user: bob's count is his own
        await registry.pause(ALICE, first.id)
        third = await registry.start_sandbox(ALICE)  # a paused one does not count
        assert third.status is Status.RUNNING
        with pytest.raises(LimitExceeded, match="max_running"):
            await registry.resume(ALICE, first.id)  # resuming it would make three
        assert status_of(registry, ALICE, first.id) is Status.PAUSED


async def test_pause_oldest_pauses_the_owners_oldest_running_first_with_a_reason(
    tmp_path: Path,
) -> None:
    async with running(tmp_path, SLEEPER, max_running=2, on_full="pause_oldest") as harness:
        registry = harness.registry
        a = await registry.start_sandbox(ALICE)
        b = await registry.start_sandbox(ALICE)
        theirs = [await registry.start_sandbox(BOB) for _ in range(2)]
        admins = [await registry.start_sandbox(ADMIN) for _ in range(2)]
        c = await registry.start_sandbox(ALICE, sandbox_id="c")
        assert c.status is Status.RUNNING
        assert status_of(registry, ALICE, a.id) is Status.PAUSED
        assert status_of(registry, ALICE, b.id) is Status.RUNNING
        assert a.pid is not None and is_paused(a.pid)
        # Nobody else's sandbox made room for alice's.
        for info in theirs + admins:
            assert status_of(registry, ADMIN, info.id) is Status.RUNNING
        # The pause is recorded, with its reason, by the user whose start caused it, and
        # durable before the start it made room for began.
        events = await harness.store.log.read(0, 100_000)
        paused = next(e for e in events if e.sandbox_id == a.id and e.type == "sandbox.paused")
        created = next(e for e in events if e.sandbox_id == "c" and e.type == "sandbox.created")
        assert paused.data == ev.SandboxPaused("make room for c") and paused.by == "alice"
        assert paused.seq < created.seq
        # A resume makes room the same way: the oldest running one now is b.
        resumed = await registry.resume(ALICE, a.id)
        assert resumed.status is Status.RUNNING and resumed.pid == a.pid
        assert status_of(registry, ALICE, b.id) is Status.PAUSED
        last_b = (await harness.events_of(b.id))[-1]
        assert last_b.data == ev.SandboxPaused(f"make room for {a.id}")
        # The admin's own sandboxes count for the admin.
        await registry.start_sandbox(ADMIN)
        assert status_of(registry, ADMIN, admins[0].id) is Status.PAUSED
        assert status_of(registry, ADMIN, admins[1].id) is Status.RUNNING


async def test_pause_oldest_holds_the_limit_for_starts_fired_at_once(tmp_path: Path) -> None:
    limit = 2
    async with running(tmp_path, SLEEPER, max_running=limit, on_full="pause_oldest") as harness:
        registry = harness.registry
        for _ in range(limit):
            await registry.start_sandbox(ALICE)
        outcomes: list[SandboxInfo | LimitExceeded] = []

        async def start() -> None:
            try:
                outcomes.append(await registry.start_sandbox(ALICE))
            except LimitExceeded as exc:
                outcomes.append(exc)

        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(start)
        started = [o for o in outcomes if isinstance(o, SandboxInfo)]
        assert started and len(outcomes) == 6
        # Never more than the limit running, at any seq of the log: each pause is durable
        # before the start it made room for, and no two starts took the same room.
        state, most = State(), 0
        for event in await harness.store.log.read(0, 100_000):
            apply(state, event)
            runs = [
                r for r in state.sandboxes.values() if r.status in (Status.STARTING, Status.RUNNING)
            ]
            most = max(most, len(runs))
        assert most == limit
        paused_for = Counter(
            e.sandbox_id
            for e in await harness.store.log.read(0, 100_000)
            if isinstance(e.data, ev.SandboxPaused)
        )
        assert set(paused_for.values()) == {1}  # none paused twice
        running_now = registry.search(ALICE, status=Status.RUNNING)[0]
        assert len(running_now) == limit


# -- resume runs a gone sandbox again -------------------------------------------------------


async def test_resume_runs_an_exited_sandbox_again_keeping_id_ports_key_and_files(
    tmp_path: Path,
) -> None:
    async with running(tmp_path, COUNTER) as harness:
        registry = harness.registry
        info = await registry.start_sandbox(ALICE, env={"EXTRA": "1"})
        runs = Path(info.working_dir) / "runs"
        await eventually(lambda: runs.exists() and runs.read_text() == "1")
        key = registry.keys.key_for(info.id, registry.state.sandboxes[info.id].created_seq)
        assert info.pid is not None
        os.kill(info.pid, signal.SIGKILL)
        gone = await wait_for(harness, ALICE, info.id, Status.ERROR)
        assert gone.pid is None and "signal 9" in (gone.error or "")
        with pytest.raises(Conflict):
            await registry.pause(ALICE, info.id)

        again = await registry.resume(ALICE, info.id)
        assert again.status is Status.RUNNING and again.restarts == 1
        assert (again.id, again.port, again.working_dir) == (info.id, info.port, info.working_dir)
        assert again.session_api_key == key == info.session_api_key
        assert again.pid is not None and again.pid != info.pid
        await eventually(lambda: runs.read_text() == "2", what="the second run")  # same files
        # The client's start env too, while this daemon lives (it is never logged).
        environ = Path(f"/proc/{again.pid}/environ").read_bytes().split(b"\0")
        assert b"EXTRA=1" in environ
        restarted = [e for e in await harness.events_of(info.id) if e.type == "sandbox.restarted"]
        assert [(e.data, e.by) for e in restarted] == [
            (ev.SandboxRestarted("resumed by alice", "resume", None, signal.SIGKILL), "alice")
        ]
        # A RUNNING one resumes as before: a no-op.
        assert (await registry.resume(ALICE, info.id)).restarts == 1


async def test_resume_of_a_failed_start_goes_through_starting_and_may_fail_again(
    tmp_path: Path,
) -> None:
    # Fails its first two starts (exit 4 before answering), serves from the third on.
    flaky = plain(
        "flaky",
        "-c",
        "import os, pathlib, sys; p = pathlib.Path('tries');"
        " n = int(p.read_text() if p.exists() else 0) + 1; p.write_text(str(n));"
        " n < 3 and sys.exit(4);"
        f" os.execv(sys.executable, [sys.executable, '-I', {AGENT_SERVER!r}, '--port',"
        " sys.argv[1]])",
        "{port}",
        health_check_path="/alive",
        ready_timeout=20.0,
        health_interval=0,
    )
    async with running(tmp_path, flaky) as harness:
        registry = harness.registry
        with pytest.raises(StartFailed) as failed:
            await registry.start_sandbox(ALICE)
        sandbox_id = failed.value.sandbox.id
        with pytest.raises(StartFailed, match=r"did not start again:.*code 4") as again:
            await registry.resume(ALICE, sandbox_id)
        assert again.value.sandbox.restarts == 1 and again.value.sandbox.status is Status.ERROR
        info = await registry.resume(ALICE, sandbox_id)
        assert info.status is Status.RUNNING and info.restarts == 2 and info.exposed_urls
        types = [e.type for e in await harness.events_of(sandbox_id)]
        assert types == [
            "sandbox.created",
            "sandbox.process_started",
            "sandbox.start_failed",
            "sandbox.restarted",
            "sandbox.process_started",
            "sandbox.start_failed",
            "sandbox.restarted",
            "sandbox.process_started",
            "sandbox.running",
        ]
        restarted = [e.data for e in await harness.events_of(sandbox_id)]
        assert [d.exit_code for d in restarted if isinstance(d, ev.SandboxRestarted)] == [4, 4]


# -- restart on failure -----------------------------------------------------------------------


async def test_on_failure_restarts_a_failed_process_until_restart_max_then_gives_up(
    tmp_path: Path,
) -> None:
    spec = on_failure("restarts", restart_max=2)
    async with running(tmp_path, spec, SLEEPER) as harness:
        registry = harness.registry
        info = await registry.start_sandbox(ALICE, spec_id="restarts")
        pids = [info.pid]
        for n in (1, 2):
            assert pids[-1] is not None
            os.kill(pids[-1], signal.SIGKILL)
            info = await wait_for(harness, ALICE, info.id, Status.RUNNING, restarts=n)
            assert info.pid not in pids and info.restarts == n
            pids.append(info.pid)
        assert pids[-1] is not None
        os.kill(pids[-1], signal.SIGKILL)
        info = await wait_for(harness, ALICE, info.id, Status.ERROR)
        assert info.restarts == 2 and info.pid is None
        assert info.error == (
            "the process was killed by signal 9; restart = on-failure gave up:"
            " 2 restarts in the last 3600 s, restart_max is 2"
        )
        events = await harness.events_of(info.id)
        restarted = [e.data for e in events if isinstance(e.data, ev.SandboxRestarted)]
        assert (
            restarted
            == [
                ev.SandboxRestarted(
                    "restart = on-failure: the process was killed by signal 9",
                    "on-failure",
                    None,
                    signal.SIGKILL,
                )
            ]
            * 2
        )
        assert [e.by for e in events if e.type == "sandbox.restarted"] == [None, None]
        # A spec without the policy: an exit is an exit.
        plain_one = await registry.start_sandbox(ALICE, spec_id="sleeper")
        assert plain_one.pid is not None
        os.kill(plain_one.pid, signal.SIGKILL)
        assert (await wait_for(harness, ALICE, plain_one.id, Status.ERROR)).restarts == 0


async def test_on_failure_leaves_a_clean_exit_alone(tmp_path: Path) -> None:
    spec = plain(
        "clean",
        "-c",
        "import pathlib, sys, time\nwhile not pathlib.Path('stop').exists(): time.sleep(0.01)",
        restart="on-failure",
    )
    async with running(tmp_path, spec) as harness:
        info = await harness.registry.start_sandbox(ALICE)
        (Path(info.working_dir) / "stop").touch()
        info = await wait_for(harness, ALICE, info.id, Status.ERROR)
        assert info.restarts == 0 and info.error == "the process exited with code 0"


async def test_on_failure_restarts_an_unhealthy_sandbox(tmp_path: Path) -> None:
    spec = plain(
        "agent",
        *agent_command()[1:],
        health_check_path="/alive",
        health_interval=0.2,
        ready_timeout=20.0,
        restart="on-failure",
    )
    async with running(tmp_path, spec, unhealthy_after=2) as harness:
        info = await harness.registry.start_sandbox(ALICE)
        assert info.pid is not None
        os.kill(info.pid, signal.SIGSTOP)  # alive, but answers nothing
        again = await wait_for(harness, ALICE, info.id, Status.RUNNING, restarts=1)
        assert again.pid != info.pid
        await eventually(lambda: not os.path.exists(f"/proc/{info.pid}"), what="the old one")
        types = [e.type for e in await harness.events_of(info.id)]
        assert types[-4:] == [
            "sandbox.unhealthy",
            "sandbox.restarted",
            "sandbox.process_started",
            "sandbox.running",
        ]
        restarted = (await harness.events_of(info.id))[-3].data
        assert isinstance(restarted, ev.SandboxRestarted)
        assert restarted.reason == (
            "restart = on-failure: unhealthy: 2 health checks in a row got no 200"
        )
        assert harness.processes(info.id) == [again.pid]


async def test_the_window_counts_only_recent_restarts(tmp_path: Path) -> None:
    spec = on_failure("short", restart_max=1, window=2.0)
    async with running(tmp_path, spec) as harness:
        info = await harness.registry.start_sandbox(ALICE)
        for n in (1, 2):
            # Each failure comes after the last restart left the window: never given up.
            await trio.sleep(2.1)  # the window's length is what this test is about
            assert info.pid is not None
            os.kill(info.pid, signal.SIGKILL)
            info = await wait_for(harness, ALICE, info.id, Status.RUNNING, restarts=n)
        assert info.pid is not None
        os.kill(info.pid, signal.SIGKILL)  # within 2 s of the last: given up
        info = await wait_for(harness, ALICE, info.id, Status.ERROR)
        assert "gave up: 1 restarts in the last 2 s, restart_max is 1" in (info.error or "")


async def test_a_sandbox_runs_again_after_its_empty_cgroup_was_removed(tmp_path: Path) -> None:
    async with running(tmp_path, SLEEPER) as harness:
        cgroups = harness.registry.boundary.cgroups
        if cgroups is None:
            pytest.skip("no cgroups here: the markers boundary has nothing to remove")
        info = await harness.registry.start_sandbox(ALICE)
        assert info.pid is not None
        os.kill(info.pid, signal.SIGKILL)
        await wait_for(harness, ALICE, info.id, Status.ERROR)
        # An operator's clean-up of empty cgroups, between the sandbox's two processes.
        name = sandbox_dir_name(info.id)
        dirs = {os.path.join(d, name) for d in [cgroups.parent, *cgroups.controllers.values()]}
        for directory in sorted(dirs, key=len, reverse=True):
            os.rmdir(directory)
        again = await harness.registry.resume(ALICE, info.id)
        assert again.status is Status.RUNNING and again.pid is not None
        assert harness.processes(info.id) == [again.pid]


async def test_a_policy_restart_that_never_gets_ready_counts_as_a_failure(
    tmp_path: Path,
) -> None:
    # Serves on its first run; every later run never answers its health check.
    once = plain(
        "once",
        "-c",
        "import os, pathlib, sys, time; p = pathlib.Path('served');"
        " p.exists() and time.sleep(600); p.touch();"
        f" os.execv(sys.executable, [sys.executable, '-I', {AGENT_SERVER!r}, '--port',"
        " sys.argv[1]])",
        "{port}",
        health_check_path="/alive",
        ready_timeout=1.0,
        health_interval=0,
        restart="on-failure",
        restart_max=2,
    )
    # Ports no other suite's sandbox takes: one answering there would make a run ready.
    async with running(tmp_path, once, port_range=(21000, 21499)) as harness:
        info = await harness.registry.start_sandbox(ALICE)
        assert info.pid is not None
        os.kill(info.pid, signal.SIGKILL)
        info = await wait_for(harness, ALICE, info.id, Status.ERROR, restarts=2)
        assert info.error is not None and info.error.endswith(
            "within 1 s; restart = on-failure gave up: 2 restarts in the last 60 s,"
            " restart_max is 2"
        )
        events = [e.data for e in await harness.events_of(info.id)]
        reasons = [d.reason for d in events if isinstance(d, ev.SandboxRestarted)]
        assert reasons == [
            "restart = on-failure: the process was killed by signal 9",
            "restart = on-failure: the sandbox did not answer 200 on /alive within 1 s",
        ]
        assert isinstance(events[-1], ev.StartFailed)
        assert harness.processes(info.id) == []  # each run that never got ready was ended


async def test_a_resume_that_runs_a_gone_sandbox_again_makes_room_first(tmp_path: Path) -> None:
    async with running(tmp_path, SLEEPER, max_running=1, on_full="pause_oldest") as harness:
        registry = harness.registry
        gone = await registry.start_sandbox(ALICE)
        assert gone.pid is not None
        os.kill(gone.pid, signal.SIGKILL)
        await wait_for(harness, ALICE, gone.id, Status.ERROR)
        other = await registry.start_sandbox(ALICE)  # an exited one does not count
        again = await registry.resume(ALICE, gone.id)
        assert again.status is Status.RUNNING and again.restarts == 1
        assert status_of(registry, ALICE, other.id) is Status.PAUSED
        paused = (await harness.events_of(other.id))[-1]
        assert paused.data == ev.SandboxPaused(f"make room for {gone.id}")
        restarted = next(
            e for e in await harness.events_of(gone.id) if e.type == "sandbox.restarted"
        )
        assert paused.seq < restarted.seq
