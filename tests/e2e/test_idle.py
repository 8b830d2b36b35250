"""Idle timeouts against a real `sandboxd serve`: pause, delete, what keeps a sandbox active,
and an idle period that a kill -9 of the daemon cuts in half.

The daemon sweeps every 0.1 s (``idle_check_interval``); the sandboxes are real
processes (sleep, the reference agent server, a CPU burner), a connection is a
real TCP connection to a sandbox's port. Every wait is for an event of the
log, with a deadline; the only timed wait is the kill's moment, half-way
through an idle period, which is what that test is about.
"""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from sandboxd.actors import proctree
from sandboxd.actors.idle import parse_ts
from sandboxd.actors.specs import SpecConfig
from sandboxd.events import types as ev
from sandboxd.events.projection import Status
from sandboxd.gateway.client import Client, open_client
from tests.daemon_process import SANDBOX_PYTHON, DaemonProcess, agent_command, daemon_config
from tests.e2e.support import SLEEP, end_daemon, paused, read_log, sandbox_processes
from tests.support import TOKENS

ROOT = TOKENS["root"]
SWEEP = 0.1  # idle_check_interval of these daemons

PAUSE_AFTER = 1.0
#: Sleeps: uses no CPU, and has no port anyone connects to. Paused after 1 s idle.
PAUSE_SPEC = SpecConfig(
    id="idle-pause",
    command=(SLEEP, "3600"),
    health_check_path="",
    inherit_env=("PATH",),
    idle_timeout=PAUSE_AFTER,
    idle_cpu_seconds=0.05,
)
DELETE_SPEC = SpecConfig(
    id="idle-delete",
    command=(SLEEP, "3600"),
    health_check_path="",
    inherit_env=("PATH",),
    idle_timeout=1.0,
    on_idle="delete",
    idle_cpu_seconds=0.05,
)
#: The reference agent server: something to connect to. Its own CPU is no evidence here
#: (a threshold no 0.1 s window can reach), so only connections count.
SERVER_SPEC = SpecConfig(
    id="idle-server",
    command=agent_command(),
    health_check_path="/alive",
    health_interval=0,
    inherit_env=("PATH",),
    idle_timeout=1.5,
    idle_cpu_seconds=1000.0,
)
#: Sleeps, then burns a CPU: idle, then active by its CPU alone.
BURN_SPEC = SpecConfig(
    id="idle-burn",
    command=(SANDBOX_PYTHON, "-I", "-c", "import time\ntime.sleep(1.0)\nwhile True: pass\n"),
    health_check_path="",
    inherit_env=("PATH",),
    idle_timeout=60.0,
    idle_cpu_seconds=0.005,  # 5 % of a CPU in a 0.1 s window
)
#: The same, judged over 1 s windows (SLOW_SWEEP) at 1 % of a CPU: a burner that a loaded
#: machine's scheduler starves for a whole 0.1 s window (seen: 0.00 s in one) is not
#: starved for a second.
SLOW_SWEEP = 1.0
STEADY_BURN_SPEC = SpecConfig(
    id="idle-burn-steady",
    command=(SANDBOX_PYTHON, "-I", "-c", "import time\ntime.sleep(4.0)\nwhile True: pass\n"),
    health_check_path="",
    inherit_env=("PATH",),
    idle_timeout=60.0,
    idle_cpu_seconds=0.01,
)
#: A long idle period, for the kill -9 half-way through it.
LONG_SPEC = SpecConfig(
    id="idle-long",
    command=(SLEEP, "3600"),
    health_check_path="",
    inherit_env=("PATH",),
    idle_timeout=6.0,
    idle_cpu_seconds=0.05,
)
SPECS = (PAUSE_SPEC, DELETE_SPEC, SERVER_SPEC, BURN_SPEC, LONG_SPEC)


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[DaemonProcess]:
    config = daemon_config(tmp_path / "state", SPECS, on_shutdown="keep", idle_check_interval=SWEEP)
    running = DaemonProcess(tmp_path, config)
    try:
        await running.start()
        yield running
    finally:
        end_daemon(running)
    assert "Traceback" not in running.output(), running.output()


async def next_event(
    client: Client, sandbox_id: str, types: list[str], *, after_seq: int = 0, within: float = 15
) -> ev.Event:
    """The first event of ``types`` about ``sandbox_id`` after ``after_seq``, once it is there."""
    with trio.fail_after(within):
        async with client.subscribe(after_seq, sandbox_id=sandbox_id, types=types) as events:
            async for event in events:
                return event
    raise AssertionError("the subscription ended")


def events_of(daemon: DaemonProcess, sandbox_id: str, event_type: str) -> list[ev.Event]:
    return [
        e for e in read_log(daemon.state_dir) if e.sandbox_id == sandbox_id and e.type == event_type
    ]


async def test_an_idle_sandbox_is_paused_with_the_reason(daemon: DaemonProcess) -> None:
    async with open_client(daemon.url, ROOT) as client:
        info = await client.start(spec_id="idle-pause")
        assert info.idle_since is None
        idle = await next_event(client, info.id, ["sandbox.idle"])
        assert isinstance(idle.data, ev.SandboxIdle)
        assert f"no connection to port {info.port}" in idle.data.reason
        seen = await client.get(info.id)
        assert seen is not None and seen.idle_since == idle.data.since

        event = await next_event(client, info.id, ["sandbox.paused"], after_seq=idle.seq)
        assert isinstance(event.data, ev.SandboxPaused) and event.by is None
        reason = event.data.reason
        assert reason is not None and reason.startswith(f"idle since {idle.data.since} for ")
        assert f"no connection to port {info.port}" in reason and "< 0.05 s" in reason
        # Not before its time: idle_timeout after the idle period began.
        assert parse_ts(event.ts) - parse_ts(idle.data.since) >= PAUSE_AFTER
        after = await client.get(info.id)
        assert after is not None and after.status is Status.PAUSED and after.idle_since is None
        (process,) = sandbox_processes(daemon.state_dir)[info.id]
        assert paused(process.pid)

        # A paused sandbox is not idle-timed; resumed, it starts a new idle period.
        resumed = await client.resume(info.id)
        assert resumed.idle_since is None
        again = await next_event(client, info.id, ["sandbox.idle"], after_seq=event.seq)
        assert isinstance(again.data, ev.SandboxIdle)
        assert parse_ts(again.data.since) >= parse_ts(resumed.updated_at)


async def test_an_idle_sandbox_is_deleted_with_the_reason(daemon: DaemonProcess) -> None:
    async with open_client(daemon.url, ROOT) as client:
        info = await client.start(spec_id="idle-delete")
        (process,) = sandbox_processes(daemon.state_dir)[info.id]
        event = await next_event(client, info.id, ["sandbox.deleted"])
        assert isinstance(event.data, ev.SandboxDeleted)
        assert event.data.reason is not None and event.data.reason.startswith("idle since ")
        assert await client.get(info.id) is None
        assert info.id not in sandbox_processes(daemon.state_dir)
        assert not proctree.is_alive(process)
        assert not Path(info.working_dir).exists()
    (idle,) = events_of(daemon, info.id, "sandbox.idle")
    assert isinstance(idle.data, ev.SandboxIdle)
    assert idle.data.since in event.data.reason


async def test_a_connection_keeps_a_sandbox_active(daemon: DaemonProcess) -> None:
    async with open_client(daemon.url, ROOT) as client:
        held = await client.start(spec_id="idle-server")
        with socket.create_connection(("127.0.0.1", held.port), timeout=5):
            # Connected before it could go idle... (its first window needs two sweeps)
            control = await client.start(spec_id="idle-server")
            paused_control = await next_event(client, control.id, ["sandbox.paused"])
            # ...it stayed active all the while its twin went idle and was paused.
            now = await client.get(held.id)
            assert now is not None and now.status is Status.RUNNING and now.idle_since is None
            assert events_of(daemon, held.id, "sandbox.idle") == []
        # Let go, it goes idle, and is paused in its turn.
        await next_event(client, held.id, ["sandbox.paused"], after_seq=paused_control.seq)

        # Idle first, a connection makes it active again, with the port as the reason.
        resumed = await client.resume(held.id)
        idle = await next_event(client, held.id, ["sandbox.idle"], after_seq=resumed.version)
        with socket.create_connection(("127.0.0.1", held.port), timeout=5):
            active = await next_event(client, held.id, ["sandbox.active"], after_seq=idle.seq)
        assert isinstance(active.data, ev.SandboxActive)
        assert active.data.reason == f"a connection to port {held.port}"


async def test_cpu_keeps_a_sandbox_active(tmp_path: Path) -> None:
    config = daemon_config(
        tmp_path / "state",
        (PAUSE_SPEC, STEADY_BURN_SPEC),
        on_shutdown="keep",
        idle_check_interval=SLOW_SWEEP,
    )
    daemon = DaemonProcess(tmp_path, config)
    await daemon.start()
    try:
        await _cpu_keeps_a_sandbox_active(daemon)
    finally:
        end_daemon(daemon)
    assert "Traceback" not in daemon.output(), daemon.output()


async def _cpu_keeps_a_sandbox_active(daemon: DaemonProcess) -> None:
    async with open_client(daemon.url, ROOT) as client:
        info = await client.start(spec_id="idle-burn-steady")
        try:
            idle = await next_event(client, info.id, ["sandbox.idle"])
            # Then it burns a CPU: active again by its CPU alone (nothing connects to it).
            active = await next_event(client, info.id, ["sandbox.active"], after_seq=idle.seq)
            assert isinstance(active.data, ev.SandboxActive)
            assert active.data.reason.startswith("CPU ") and ">= 0.01 s" in active.data.reason
            # And it stays active while it burns: sweeps go by, with no idle period.
            control = await client.start(spec_id="idle-pause")
            await next_event(client, control.id, ["sandbox.paused"])
            now = await client.get(info.id)
            assert now is not None and now.status is Status.RUNNING and now.idle_since is None
            assert len(events_of(daemon, info.id, "sandbox.idle")) == 1
        finally:
            await client.delete(info.id)


async def test_an_idle_period_survives_kill_9_of_the_daemon(daemon: DaemonProcess) -> None:
    async with open_client(daemon.url, ROOT) as client:
        info = await client.start(spec_id="idle-long")
        idle = await next_event(client, info.id, ["sandbox.idle"])
    assert isinstance(idle.data, ev.SandboxIdle)
    since = parse_ts(idle.data.since)
    timeout = LONG_SPEC.idle_timeout
    assert timeout is not None
    # Half the idle period elapsed: then the crash.
    await trio.sleep(max(0.0, since + timeout / 2 - time.time()))
    daemon.kill()
    killed_at = time.time()
    assert killed_at - since < timeout  # the period was not over when the daemon died
    await daemon.start()
    async with open_client(daemon.url, ROOT) as client:
        restarted = await client.get(info.id)
        assert restarted is not None and restarted.status is Status.RUNNING
        assert restarted.idle_since == idle.data.since  # rebuilt from the log
        event = await next_event(client, info.id, ["sandbox.paused"], after_seq=idle.seq)
    assert isinstance(event.data, ev.SandboxPaused) and event.data.reason is not None
    assert event.data.reason.startswith(f"idle since {idle.data.since} for ")
    paused_at = parse_ts(event.ts)
    # The period went on from where the log had it: paused once it lasted idle_timeout,
    # long before a period begun again at the restart could have lasted as much.
    assert paused_at - since >= timeout
    assert paused_at < killed_at + timeout
    # One idle period in the log: the restarted daemon did not begin another.
    assert [e.seq for e in events_of(daemon, info.id, "sandbox.idle")] == [idle.seq]
    assert events_of(daemon, info.id, "sandbox.active") == []


async def test_idle_under_the_markers_boundary(tmp_path: Path) -> None:
    """No cgroup: CPU is read from /proc over the main process and its descendants."""
    config = daemon_config(
        tmp_path / "state", SPECS, on_shutdown="keep", idle_check_interval=SWEEP, cgroup="off"
    )
    daemon = DaemonProcess(tmp_path, config)
    try:
        await daemon.start()
        async with open_client(daemon.url, ROOT) as client:
            assert (await client.server_info()).boundary == "markers"
            burner = await client.start(spec_id="idle-burn")
            quiet = await client.start(spec_id="idle-pause")
            event = await next_event(client, quiet.id, ["sandbox.paused"])
            assert isinstance(event.data, ev.SandboxPaused) and event.data.reason is not None
            assert event.data.reason.startswith("idle since ")
            idle = await next_event(client, burner.id, ["sandbox.idle"])
            active = await next_event(client, burner.id, ["sandbox.active"], after_seq=idle.seq)
            assert isinstance(active.data, ev.SandboxActive)
            assert active.data.reason.startswith("CPU ")
            await client.delete(burner.id)
    finally:
        end_daemon(daemon)
    assert "Traceback" not in daemon.output(), daemon.output()
