"""Restarts: graceful (SIGTERM, on_shutdown = "keep"), and after a world that moved on.

- A graceful restart adopts every sandbox, restarts none (same pids, same
  SandboxInfo), keeps a PAUSED one stopped, resumes health checks and exit
  watching, and a subscriber that resubscribes with its last seq continues
  with no gap and no duplicate.
- Sandboxes changed while the daemon was down: one killed (MISSING), one
  whose pid now belongs to an unrelated process (MISSING, and that process
  is never signalled), one stopped and one continued by hand (the log's
  pause state wins, see docs/operations.md).
- Operations a crash cut short: a start before its process was recorded, a
  delete half-way, a sandbox whose events the log lost: after recovery every
  sandbox is in one state, no marked process outlives its sandbox, no
  working directory is left without one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import trio

from sandboxd.actors.boundary.workdirs import remove_tree
from sandboxd.actors.info import SandboxInfo
from sandboxd.events import types as ev
from sandboxd.events.projection import Status
from sandboxd.gateway.client import Client, open_client
from tests.e2e.support import (
    ROOT,
    SIGNAL_RECORDER,
    SLEEP,
    append_offline,
    continue_by_hand,
    daemon_process,
    paused,
    raw_subscription,
    read_log,
    sandbox_processes,
    seqs_of,
    spawn_stray,
    verify_log,
)
from tests.support import eventually, proc_state


async def everything(client: Client) -> dict[str, SandboxInfo]:
    return {info.id: info async for info in client.search_all()}


def events_since(state_dir: Path, seq: int) -> list[ev.Event]:
    return [e for e in read_log(state_dir) if e.seq > seq]


async def test_graceful_restart_adopts_every_sandbox_and_subscribers_continue(
    tmp_path: Path,
) -> None:
    async with daemon_process(tmp_path) as daemon:
        async with open_client(daemon.url, ROOT) as client:
            sleepers = [await client.start(spec_id="sleep") for _ in range(4)]
            agent = await client.start(spec_id="agent")
            for info in sleepers[:2]:
                await client.pause(info.id)
            before = await everything(client)
        frames: list[dict[str, object]] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(raw_subscription, daemon.url, ROOT, 0, lambda _: False, frames)
            await eventually(lambda: any("caught_up" in f for f in frames), what="catch-up")
            assert await daemon.terminate() == 0
        # The stream ended with where to resume; the connection closed (1001).
        ended = [f for f in frames if f.get("ended")]
        assert ended and ended[-1]["last_seq"] == seqs_of(frames)[-1], frames[-3:]
        stopping_seq = seqs_of(frames)[-1]
        assert frames[-2]["event"]["type"] == "daemon.stopping"  # type: ignore[index]
        for info in before.values():
            assert info.pid is not None and proc_state(info.pid) not in (None, "Z")
            assert paused(info.pid) == (info.status is Status.PAUSED)

        await daemon.start()
        async with open_client(daemon.url, ROOT) as client:
            after = await everything(client)
            head = (await client.server_info()).head_seq
        # Every sandbox adopted, none restarted: the very same SandboxInfo.
        assert after == before
        new = events_since(daemon.state_dir, stopping_seq)
        adopted = {e.sandbox_id: e.data.pid for e in new if isinstance(e.data, ev.SandboxAdopted)}
        assert adopted == {sid: info.pid for sid, info in before.items()}
        # Recorded together: one batch (its events share one ts), one fdatasync.
        assert len({e.ts for e in new if e.type == "sandbox.adopted"}) == 1
        assert not [e for e in new if e.type in ("sandbox.process_started", "sandbox.missing")]
        started = [e.data for e in new if isinstance(e.data, ev.DaemonStarted)]
        assert len(started) == 1 and started[0].recovered == len(before)
        for info in before.values():
            assert info.pid is not None
            assert paused(info.pid) == (info.status is Status.PAUSED)

        # Resubscribing with the last seq continues exactly there.
        more: list[dict[str, object]] = []
        await raw_subscription(
            daemon.url, ROOT, stopping_seq, lambda fs: any("caught_up" in f for f in fs), more
        )
        seqs = seqs_of(frames) + seqs_of(more)
        assert seqs == list(range(1, head + 1))

        async with open_client(daemon.url, ROOT) as client:
            # The adopted agent's liveness checks run again: stopped by hand, it turns
            # unhealthy (ERROR); continued, healthy (RUNNING).
            assert agent.pid is not None
            os.kill(agent.pid, signal.SIGSTOP)
            await wait_for_status(client, agent.id, Status.ERROR)
            os.kill(agent.pid, signal.SIGCONT)
            await wait_for_status(client, agent.id, Status.RUNNING)
            # Its exit is watched again (through a pidfd: it is not the daemon's child).
            victim = sleepers[3]
            assert victim.pid is not None
            psutil.Process(victim.pid).kill()
            info = await wait_for_status(client, victim.id, Status.ERROR)
            # Only a parent learns how its child ended: the code and signal are unknown here.
            assert info.pid is None and info.error is not None and "exited" in info.error
            # A paused one that stayed paused resumes.
            resumed = await client.resume(sleepers[0].id)
            assert resumed.status is Status.RUNNING and resumed.pid == sleepers[0].pid
            assert not paused(sleepers[0].pid or 0)


async def wait_for_status(client: Client, sandbox_id: str, status: Status) -> SandboxInfo:
    with trio.fail_after(15):
        while True:
            info = await client.get(sandbox_id)
            assert info is not None
            if info.status is status:
                return info
            await trio.sleep(0.02)


def signal_recorder(path: Path) -> subprocess.Popen[bytes]:
    """An unrelated process (no sandbox marker) that notes every signal it gets in ``path``."""
    return subprocess.Popen(
        [sys.executable, "-c", SIGNAL_RECORDER, str(path)],
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )


async def test_sandboxes_changed_while_the_daemon_was_down(tmp_path: Path) -> None:
    signals = tmp_path / "signals.txt"
    stranger = signal_recorder(signals)
    try:
        async with daemon_process(tmp_path) as daemon:
            async with open_client(daemon.url, ROOT) as client:
                ids = ("killed", "stopped", "continued", "running", "paused")
                infos = {sid: await client.start(spec_id="sleep", sandbox_id=sid) for sid in ids}
                for sid in ("continued", "paused"):
                    infos[sid] = await client.pause(sid)
            daemon.kill()
            pids = {sid: info.pid for sid, info in infos.items()}
            assert None not in pids.values()

            # While it is down: one killed, one stopped and one continued by hand.
            psutil.Process(pids["killed"]).kill()
            os.kill(pids["stopped"] or 0, signal.SIGSTOP)
            continue_by_hand(pids["continued"] or 0)
            await eventually(lambda: proc_state(pids["killed"] or 0) in (None, "Z"))
            await eventually(lambda: paused(pids["stopped"] or 0))
            await eventually(lambda: not paused(pids["continued"] or 0))

            # One whose pid the kernel gave to an unrelated process. A reuse cannot be
            # forced on demand; what it leaves behind can: a log whose recorded pid now
            # belongs to another process, with another start time. That log is written
            # here through the real store (codec, projection checks, fdatasync), naming
            # the pid of a live process this test started, with a start time an hour
            # before that process's own.
            await eventually(lambda: signals.exists() and "ready" in signals.read_text())
            create_time = psutil.Process(stranger.pid).create_time()
            await append_offline(
                daemon.state_dir,
                [
                    ev.PendingEvent(
                        "reused",
                        "root",
                        ev.SandboxCreated(
                            "sleep", "root", str(daemon.config.sandboxes_dir / "reused"), 39990
                        ),
                    ),
                    ev.PendingEvent(
                        "reused",
                        None,
                        ev.ProcessStarted(
                            stranger.pid, stranger.pid, create_time - 3600, [SLEEP, "600"]
                        ),
                    ),
                    ev.PendingEvent(
                        "reused",
                        None,
                        ev.SandboxRunning([ev.ExposedUrl("AGENT_SERVER", "http://x:39990")]),
                    ),
                ],
            )
            head_before = read_log(daemon.state_dir)[-1].seq

            await daemon.start()
            async with open_client(daemon.url, ROOT) as client:
                now = await everything(client)
                assert {sid: info.status for sid, info in now.items()} == {
                    "killed": Status.MISSING,
                    "stopped": Status.RUNNING,  # the log says RUNNING: continued
                    "continued": Status.PAUSED,  # the log says PAUSED: stopped again
                    "running": Status.RUNNING,
                    "paused": Status.PAUSED,
                    "reused": Status.MISSING,
                }
                assert "gone" in (now["killed"].error or "")
                assert "gone" in (now["reused"].error or "")
                for sid in ("stopped", "continued", "running", "paused"):
                    assert now[sid].pid == pids[sid]
                    assert paused(pids[sid] or 0) == (now[sid].status is Status.PAUSED), sid
                new = events_since(daemon.state_dir, head_before)
                adopted = {e.sandbox_id for e in new if e.type == "sandbox.adopted"}
                assert adopted == {"stopped", "continued", "running", "paused"}
                started = [e.data for e in new if isinstance(e.data, ev.DaemonStarted)]
                assert started and started[0].recovered == 6

                # Deleting the MISSING ones ends nothing but their own (there is none).
                assert await client.delete("reused") is True
                assert await client.delete("killed") is True
            # The stranger was never signalled, nor stopped.
            assert stranger.poll() is None
            assert signals.read_text().split() == ["ready"]
            assert not paused(stranger.pid)
    finally:
        stranger.kill()
        stranger.wait()


async def test_operations_a_crash_cut_short_finish_or_undo(tmp_path: Path) -> None:
    strays: list[subprocess.Popen[bytes]] = []
    try:
        async with daemon_process(tmp_path) as daemon:
            state_dir = daemon.state_dir
            sandboxes_dir = daemon.config.sandboxes_dir
            async with open_client(daemon.url, ROOT) as client:
                infos = {
                    sid: await client.start(spec_id="sleep", sandbox_id=sid)
                    for sid in ("deleted-half", "deleted-most", "kept")
                }
            daemon.kill()

            # A start cut after it spawned its process, before process_started was durable.
            await append_offline(
                state_dir,
                [
                    ev.PendingEvent(
                        "half-started",
                        "root",
                        ev.SandboxCreated(
                            "sleep", "root", str(sandboxes_dir / "half-started"), 39991
                        ),
                    )
                ],
            )
            (sandboxes_dir / "half-started").mkdir()
            strays.append(spawn_stray(state_dir, "half-started"))
            # Deletes cut after their processes were ended: one before its files went,
            # one after (sandbox.deleted is appended last).
            for sid in ("deleted-half", "deleted-most"):
                psutil.Process(infos[sid].pid).kill()
            remove_tree(sandboxes_dir / "deleted-most")
            # A sandbox whose every event the log lost (power loss before the sync): its
            # process, working dir and output are all that is left.
            strays.append(spawn_stray(state_dir, "lost"))
            (sandboxes_dir / "lost").mkdir()
            (state_dir / "output" / "lost.log").write_text("hello\n")
            await eventually(lambda: {"lost", "half-started"} <= set(sandbox_processes(state_dir)))

            await daemon.start()
            for stray in strays:
                with trio.fail_after(5):
                    # Ended by recovery (SIGKILL); reaped here, their parent.
                    while stray.poll() is None:  # noqa: ASYNC110
                        await trio.sleep(0.01)
                assert stray.returncode == -signal.SIGKILL
            async with open_client(daemon.url, ROOT) as client:
                now = await everything(client)
                assert {sid: i.status for sid, i in now.items()} == {
                    "deleted-half": Status.MISSING,
                    "deleted-most": Status.MISSING,
                    "kept": Status.RUNNING,
                    "half-started": Status.MISSING,
                }
                error = now["half-started"].error or ""
                assert "before the sandbox's process was recorded" in error
                assert "1 leftover processes were ended" in error
                assert set(sandbox_processes(state_dir)) == {"kept"}
                assert not (sandboxes_dir / "lost").exists()
                assert not (state_dir / "output" / "lost.log").exists()
                # The client's retry of each delete finishes it.
                for sid in ("deleted-half", "deleted-most", "half-started"):
                    assert await client.delete(sid) is True
                    assert not (sandboxes_dir / sid).exists()
                assert set(await everything(client)) == {"kept"}
            assert await daemon.terminate() == 0
            code, text = verify_log(state_dir)
            assert code == 0, text
    finally:
        for stray in strays:
            stray.kill()
            stray.wait()
