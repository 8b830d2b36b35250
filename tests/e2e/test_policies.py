"""Issue 10's policies against kill -9 of a real `sandboxd serve`: each survives the daemon.

- A make-room cut between the pause and the start it made room for (the daemon
  stops itself exactly there, SANDBOXD_TEST_FAULT, and is killed): after the
  restart the pause stands, recorded with its reason, the start never happened
  (its id is free, nothing of it runs), and the start asked again succeeds.
- A restart counter at N-1 (restart_max 2, one restart made) survives a kill -9:
  counted from the log, it allows exactly one more restart, then ERROR says why.
- What recovery finds gone (MISSING): a resume runs it again with the same id,
  port and session key; under restart = "on-failure" the daemon does so itself.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from sandboxd.actors.info import SandboxInfo
from sandboxd.actors.specs import SpecConfig
from sandboxd.events import types as ev
from sandboxd.events.projection import Status
from sandboxd.gateway.client import Client, open_client
from tests.daemon_process import AGENT_SERVER, SANDBOX_PYTHON, DaemonProcess, daemon_config
from tests.e2e.support import (
    AGENT_SPEC,
    ROOT,
    SLEEP_SPEC,
    end_daemon,
    paused,
    read_log,
    replay,
    sandbox_processes,
    verify_log,
)
from tests.support import TOKENS, eventually, proc_state

ALICE = TOKENS["alice"]
CRASHY = attrs.evolve(
    SLEEP_SPEC, id="crashy", restart="on-failure", restart_max=2, restart_window=3600.0
)
#: Serves on its first run; every later run never answers its health check.
ONCE = SpecConfig(
    id="once",
    command=(
        SANDBOX_PYTHON,
        "-c",
        "import os, pathlib, sys, time; p = pathlib.Path('served');"
        " p.exists() and time.sleep(600); p.touch();"
        f" os.execv(sys.executable, [sys.executable, '-I', {AGENT_SERVER!r}, '--port',"
        " sys.argv[1]])",
        "{port}",
    ),
    health_check_path="/alive",
    ready_timeout=4.0,
    health_interval=0,
    inherit_env=("PATH",),
    restart="on-failure",
    restart_max=2,
)
SPECS = (SLEEP_SPEC, AGENT_SPEC, CRASHY, ONCE)


@contextlib.asynccontextmanager
async def policy_daemon(root: Path, **settings: Any) -> AsyncIterator[DaemonProcess]:
    """`sandboxd serve` with this suite's specs (``crashy`` restarts on failure)."""
    # Ports of their own: a run that never answers its health check must not be answered
    # by another suite's sandbox on the same port (sessions share this machine).
    settings.setdefault("port_range", (20500, 20999))
    config = daemon_config(root / "state", SPECS, on_shutdown="keep", **settings)
    daemon = DaemonProcess(root, config)
    try:
        await daemon.start()
        yield daemon
    finally:
        end_daemon(daemon)
    assert "Traceback" not in daemon.output(), daemon.output()


async def wait_for(
    client: Client, sandbox_id: str, status: Status, *, restarts: int = 0, within: float = 20
) -> SandboxInfo:
    with trio.fail_after(within):
        while True:
            info = await client.get(sandbox_id)
            assert info is not None
            if info.status is status and info.restarts >= restarts:
                return info
            await trio.sleep(0.02)


def kill(info: SandboxInfo) -> None:
    assert info.pid is not None
    os.kill(info.pid, signal.SIGKILL)


async def test_a_make_room_cut_between_the_pause_and_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SANDBOXD_TEST_FAULT", "stop-after-make-room")
    async with policy_daemon(tmp_path, max_running=1, on_full="pause_oldest") as daemon:
        async with open_client(daemon.url, ALICE) as client:
            oldest = await client.start(spec_id="sleep")
        assert daemon.process is not None
        pid = daemon.process.pid

        async def start_next() -> None:
            async with open_client(daemon.url, ALICE) as other:
                await other.start(spec_id="sleep", sandbox_id="next")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(start_next)
            # The daemon stops itself once the pause is durable, before the start begins.
            await eventually(lambda: proc_state(pid) == "T", within=20, what="the cut")
            daemon.kill()
            nursery.cancel_scope.cancel()  # its client's reply never comes
        at_cut = read_log(daemon.state_dir)
        assert at_cut[-1].sandbox_id == oldest.id
        assert at_cut[-1].data == ev.SandboxPaused("make room for next")
        assert not [e for e in at_cut if e.sandbox_id == "next"]

        monkeypatch.delenv("SANDBOXD_TEST_FAULT")
        await daemon.start()
        async with open_client(daemon.url, ALICE) as client:
            # The pause stands, as recorded; the start never happened.
            after = await client.get(oldest.id)
            assert after is not None and after.status is Status.PAUSED
            assert oldest.pid is not None and paused(oldest.pid)
            assert await client.get("next") is None
            assert "next" not in sandbox_processes(daemon.state_dir)
            # Asked again, the start finds its room made: nothing more is paused.
            started = await client.start(spec_id="sleep", sandbox_id="next")
            assert started.status is Status.RUNNING
            running = [i async for i in client.search_all() if i.status is Status.RUNNING]
            assert [i.id for i in running] == ["next"]
        assert verify_log(daemon.state_dir)[0] == 0
        events = read_log(daemon.state_dir)
        assert [e.type for e in events if e.sandbox_id == oldest.id][-2:] == [
            "sandbox.paused",  # for "next", before the cut
            "sandbox.adopted",  # after it: still frozen, as the log says
        ]
        state = replay(events)
        assert state.sandboxes[oldest.id].status is Status.PAUSED


async def test_a_restart_counter_at_n_minus_1_survives_kill_9(tmp_path: Path) -> None:
    async with policy_daemon(tmp_path) as daemon:
        async with open_client(daemon.url, ALICE) as client:
            info = await client.start(spec_id="crashy")
            kill(info)
            info = await wait_for(client, info.id, Status.RUNNING, restarts=1)
        daemon.kill()
        await daemon.start()
        async with open_client(daemon.url, ALICE) as client:
            adopted = await client.get(info.id)
            assert adopted is not None and adopted.restarts == 1 and adopted.pid == info.pid
            kill(adopted)  # the second restart: the last restart_max allows
            info = await wait_for(client, info.id, Status.RUNNING, restarts=2)
            kill(info)  # counted from the log: the third failure in the window is the end
            info = await wait_for(client, info.id, Status.ERROR)
        assert info.restarts == 2 and info.pid is None
        assert info.error == (
            "the process was killed by signal 9; restart = on-failure gave up:"
            " 2 restarts in the last 3600 s, restart_max is 2"
        )
        exited = [e.data for e in read_log(daemon.state_dir) if e.sandbox_id == info.id][-1]
        assert isinstance(exited, ev.SandboxExited) and exited.signal == signal.SIGKILL


async def test_what_recovery_finds_gone_runs_again_on_resume_or_by_its_policy(
    tmp_path: Path,
) -> None:
    async with policy_daemon(tmp_path) as daemon:
        async with open_client(daemon.url, ROOT) as client:
            plain = await client.start(spec_id="sleep")
            crashy = await client.start(spec_id="crashy")
        daemon.kill()
        for info in (plain, crashy):
            kill(info)
            await eventually(lambda pid=info.pid: proc_state(pid) is None, what="its end")
        await daemon.start()
        async with open_client(daemon.url, ROOT) as client:
            missing = await client.get(plain.id)
            assert missing is not None and missing.status is Status.MISSING
            resumed = await client.resume(plain.id)
            assert resumed.status is Status.RUNNING and resumed.restarts == 1
            assert (resumed.port, resumed.working_dir) == (plain.port, plain.working_dir)
            assert resumed.session_api_key == plain.session_api_key
            assert resumed.pid is not None and resumed.pid != plain.pid
            # restart = on-failure: the daemon ran it again by itself.
            again = await wait_for(client, crashy.id, Status.RUNNING, restarts=1)
            assert again.session_api_key == crashy.session_api_key
        events = read_log(daemon.state_dir)
        restarted = {
            e.sandbox_id: (e.data, e.by) for e in events if isinstance(e.data, ev.SandboxRestarted)
        }
        assert restarted[plain.id] == (ev.SandboxRestarted("resumed by root", "resume"), "root")
        policy, by = restarted[crashy.id]
        assert by is None and policy.trigger == "on-failure"
        assert policy.reason.startswith("restart = on-failure: its process")


async def test_a_policy_restart_cut_while_it_waits_to_be_ready_still_counts(
    tmp_path: Path,
) -> None:
    async with policy_daemon(tmp_path) as daemon:
        async with open_client(daemon.url, ALICE) as client:
            info = await client.start(spec_id="once")
            kill(info)  # the policy runs it again; this run never gets ready
            starting = await wait_for(client, info.id, Status.STARTING, restarts=1)
            with trio.fail_after(10):
                while starting.pid is None:  # its process_started is next
                    await trio.sleep(0.02)
                    starting = await client.get(info.id) or starting
            assert starting.status is Status.STARTING
        daemon.kill()  # while it waits for readiness: adopted STARTING after the restart
        await daemon.start()
        async with open_client(daemon.url, ALICE) as client:
            # Its not getting ready is the policy's failure still (read from the log):
            # restarted once more, then given up.
            # Two readiness timeouts of 4 s and a start on a loaded machine: a long deadline.
            info = await wait_for(client, info.id, Status.ERROR, restarts=2, within=60)
        assert info.error is not None and info.error.endswith(
            "within 4 s; restart = on-failure gave up: 2 restarts in the last 60 s,"
            " restart_max is 2"
        )
